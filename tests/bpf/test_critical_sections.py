"""Critical-section boosts on real threads: a boost lasts for the section it was granted for (section_boost).

The stand-in vCPU spins and rewrites its slot every 100 us with PREEMPT_DISABLED set, as a vCPU that enters
short critical sections all the time does (a lock loop): each write is a new section.
"""

from __future__ import annotations

import time

import pytest
from sched_observe import observed, wait_for

from pyvmm.abi import C


def _stats(child) -> dict:
    return {k: v["value"] for k, v in child.show()["stats"].items()}


@pytest.mark.parametrize("section_boost", ["true", "false"])
def test_a_vcpu_in_ever_new_short_sections_is_unboosted_at_a_re_read(fake_vmm, policy_child, section_boost):
    vmm = fake_vmm(1)
    (tid,) = vmm.tids
    child = policy_child(vmm, {"section_boost": section_boost, "backstop_ms": "50"})
    vmm.cmd(f"custom 0 spin {C.PVSCHED_FLAG_PREEMPT_DISABLED} 0 0 0 0")
    assert wait_for(lambda: observed(tid)[0] != 0, 1.0), "never boosted for its critical section"
    time.sleep(1.0)
    st = _stats(child)
    vmm.cmd("mode 0 block")
    shown = {k: v for k, v in st.items() if v}
    if section_boost == "true":
        # a re-read that finds the slot written since ends the boost (the section it was for is over); a
        # switch-out inside a section, or a later re-read of the unboosted vCPU, boosts it again
        assert st["unboost"] >= 3 and st["boost"] >= st["unboost"], shown
    else:
        # held while any critical flag shows: only the throttle ends it, never an unboost
        assert st["unboost"] == 0 and st["throttle"] >= 2, shown
    child.terminate()
    assert observed(tid) == (0, 0, 0), "not restored"
