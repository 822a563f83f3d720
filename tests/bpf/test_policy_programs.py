"""A swapped BPF policy chosen by name: rt_only keeps pvsched's maps and programs but only translates RT tasks.

Each case runs the same three vCPUs under both policies, so the test fails if the name did not reach the
loader (both would act alike): an RT task is translated 1:1 by both; a critical section and a halt are
boosted by pvsched only.
"""

from __future__ import annotations

import os

import pytest
from sched_observe import observed, sample, wait_for

from pyvmm.abi import C
from pyvmm.policy import programs

RR, OTHER = os.SCHED_RR, os.SCHED_OTHER


def test_the_built_policies_are_listed_and_a_name_is_never_a_path():
    assert {"pvsched", "rt_only"} <= set(programs.available())
    assert programs.object_path("rt_only").name == "rt_only.bpf.o"
    for bad in ("nope", "../pvsched", "/tmp/pvsched", "pvsched.bpf.o", "", "P" * 100):
        with pytest.raises(programs.ProgramError, match="policies: .*pvsched"):
            programs.object_path(bad)


@pytest.mark.parametrize("program, boosts_the_rest", [("pvsched", True), ("rt_only", False)])
def test_rt_only_translates_rt_tasks_but_boosts_no_critical_section_and_no_halt(fake_vmm, policy_child, program,
                                                                                 boosts_the_rest):
    vmm = fake_vmm(3)
    rt, irq, idle = vmm.tids
    child = policy_child(vmm, program=program)
    assert child.show()["program"] == program
    vmm.cmd(f"custom 0 sleep 0 {RR} 8 0 0")  # an RR 8 task that blocks: 1:1 under both
    vmm.cmd(f"custom 1 sleep {C.PVSCHED_FLAG_IN_HARDIRQ} {OTHER} 0 0 0")  # in an interrupt handler
    vmm.cmd("mode 2 idle")  # halts
    assert wait_for(lambda: observed(rt)[:2] == (RR, 8), 1.0), f"got {observed(rt)}"
    if boosts_the_rest:
        assert wait_for(lambda: observed(irq)[0] == RR and observed(idle)[0] == RR, 1.0), \
            f"got {observed(irq)} {observed(idle)}"
    else:
        for tid in (irq, idle):
            s = sample(tid, 0.3)
            assert s and all(pol == OTHER for _, pol, _ in s), f"{program} boosted {tid}: {s[:5]}"
        assert child.show()["stats"]["halt"]["value"] > 0  # the halts were seen, and not boosted
    child.terminate()
    assert all(observed(t) == (OTHER, 0, 0) for t in vmm.tids), "not restored"
