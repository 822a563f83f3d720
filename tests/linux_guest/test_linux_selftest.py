"""The module's probes under QEMU TCG in self-test mode (no pvsched device): what a host would read in the slots.

One boot per kernel flavor runs the self-test workload of the image's /init: load with selftest=1, an RR 8
spinner pinned to CPU 1 (killed once sampled), RT wakeups across CPUs through a FIFO, stats, unload, dmesg.
"""

from __future__ import annotations

import re

import pytest
import qemu_runner as qemu

from pyvmm import abi
from pyvmm.guest.linux import kernel

C = abi.C
BAD_DMESG = re.compile(r"WARNING:|BUG:|Oops|Call Trace|general protection|UBSAN|refcount_t|list_del corruption")


@pytest.fixture(scope="module", params=list(kernel.FLAVORS))
def selftest(request, linux_image) -> qemu.QemuResult:
    """Console and records of one self-test boot of flavor (QEMU killed by PID after the timeout)."""
    res = qemu.run_qemu(linux_image(request.param), "selftest", timeout=120)
    assert res.returncode == 0, res.console[-3000:]
    assert res.of_type("done"), f"/init did not finish:\n{res.console[-3000:]}"
    return res


def _slots(res: qemu.QemuResult, phase: str, cpu: int) -> list[dict]:
    return [r["slot"] for r in res.of_type("slot") if r["phase"] == phase and r["slot"]["cpu"] == cpu]


def _stats(res: qemu.QemuResult) -> dict:
    (stats,) = res.of_type("stats")
    return stats


def test_module_loads_and_unloads_without_warnings(selftest):
    events = [(r["event"], r["rc"]) for r in selftest.of_type("module")]
    assert events == [("load", 0), ("unload", 0)] * 2  # load, run, unload; then load and unload again
    assert not selftest.of_type("error"), selftest.of_type("error")
    dmesg = selftest.dmesg()
    assert dmesg.count("pvsched: self-test: 2 slots") == 2
    bad = [line for line in dmesg.splitlines() if BAD_DMESG.search(line)]
    assert not bad, "\n".join(bad)


def _rt_tasks(res: qemu.QemuResult, phase: str) -> list[int]:
    (rec,) = [r for r in res.of_type("rt_tasks") if r["phase"] == phase]
    return rec["pids"]


def test_rr_task_shows_in_its_cpus_slot_while_it_runs(selftest):
    assert len(_rt_tasks(selftest, "rt")) == 1, "the spinner must be the only RT user process while sampled"
    samples = _slots(selftest, "rt", 1)
    assert len(samples) == 3
    for s in samples:
        assert s["consistent"] and s["seq"] % 2 == 0
        assert (s["policy"], s["rt_priority"]) == (C.PVSCHED_POLICY_RR, 8), s
        assert not s["flags"] & C.PVSCHED_FLAG_IDLE
    # chrt gave the spinner RR 8 on CPU 1 and exec'd it, with no switch after: an interrupt published it again
    assert _stats(selftest)["task_refreshed"] >= 1
    # The reader ran on CPU 0: its own slot shows an ordinary task, not the spinner.
    assert all(s["policy"] == C.PVSCHED_POLICY_OTHER for s in _slots(selftest, "rt", 0))


def test_a_running_task_made_rt_from_another_cpu_shows_as_rt_without_a_switch(selftest):
    """chrt -p 8 from CPU 0 on a SCHED_OTHER spinner that keeps CPU 1: the module publishes it at an interrupt."""
    before = _slots(selftest, "other", 1)
    assert [(s["policy"], s["flags"] & C.PVSCHED_FLAG_IDLE) for s in before] == [(C.PVSCHED_POLICY_OTHER, 0)], before
    assert len(_rt_tasks(selftest, "promoted")) == 1
    promoted = _slots(selftest, "promoted", 1)
    assert len(promoted) == 3
    assert all((s["policy"], s["rt_priority"]) == (C.PVSCHED_POLICY_RR, 8) for s in promoted), promoted


def test_slot_shows_idle_after_the_rr_task(selftest):
    # no RT user process is left to run on CPU 1 (busybox timeout left one, its RR 8 watcher)
    assert _rt_tasks(selftest, "after") == []
    after = _slots(selftest, "after", 1)
    assert any(s["flags"] & C.PVSCHED_FLAG_IDLE and s["policy"] == C.PVSCHED_POLICY_OTHER for s in after), after
    # the test's RR 8 task is gone from the slot (a kernel RT thread, such as migration/1 at FIFO 99, may
    # still be caught running on CPU 1 by a sample: that is a real RT task, not a stale one)
    assert not any(s["policy"] == C.PVSCHED_POLICY_RR and s["rt_priority"] == 8 for s in after), after
    # the RT tasks have exited: no RT task sleeps on CPU 1 any more
    assert not any(s["flags"] & C.PVSCHED_FLAG_RT_WAITING for s in after), after


def test_idle_shows_rt_waiting_while_an_rt_task_sleeps_on_that_cpu(selftest):
    """F_RT_WAITER: the RR reader pinned to CPU 1 blocks on its FIFO; CPU 1 idles with RT_WAITING meanwhile."""
    st = _stats(selftest)
    assert 1 <= st["switch_idle_rt_waiting"] <= st["switch_idle"], st


def test_shared_area_reads_back_through_the_abi(selftest):
    """Decode the raw debugfs shm blob with the ABI header (cffi), as the host side would."""
    (shm,) = [r for r in selftest.of_type("shm") if r["phase"] == "rt"]
    raw = bytes.fromhex(shm["hex"])
    assert len(raw) == C.PVSCHED_PAGE_SIZE
    ffi = abi.ffi()
    hdr = ffi.from_buffer("struct pvsched_shm_header *", raw)
    assert hdr.magic == C.PVSCHED_MAGIC
    assert (hdr.version, hdr.features, hdr.nr_vcpus) == (C.PVSCHED_VERSION, C.PVSCHED_F_ALL, 2)
    assert (hdr.slot_size, hdr.slot_offset) == (C.PVSCHED_SLOT_SIZE, C.PVSCHED_SLOT_OFFSET)
    slot1 = ffi.from_buffer("struct pvsched_slot *", raw[C.PVSCHED_SLOT_OFFSET + C.PVSCHED_SLOT_SIZE :])
    assert (slot1.guest.policy, slot1.guest.rt_priority) == (C.PVSCHED_POLICY_RR, 8), selftest.of_type("error")
    assert slot1.guest.guest_ns > 0
    assert bytes(ffi.buffer(ffi.addressof(slot1.host))) == bytes(abi.sizeof("struct pvsched_host_area")), (
        "the guest wrote into the host area"
    )


def test_hardirq_and_softirq_flags_seen_set_and_cleared(selftest):
    st = _stats(selftest)
    for ctx in ("hardirq", "softirq"):
        assert st[f"{ctx}_entry"] > 10, st
        assert st[f"{ctx}_seen_set"] == st[f"{ctx}_entry"], st
        # At most one interrupt per CPU may be in flight while the stats are read.
        assert st[f"{ctx}_seen_set"] - 2 <= st[f"{ctx}_seen_clear"] <= st[f"{ctx}_seen_set"], st
    assert st["readback_mismatch"] == 0
    assert st["switch_rt"] > 0 and st["switch_idle"] > 0


def test_rt_wakeup_across_cpus_sets_and_clears_wake_hint(selftest):
    st = _stats(selftest)
    assert st["wake_hint_set"] >= 5, st  # 10 writes from CPU 0 wake the RR reader pinned to CPU 1
    assert st["wake_hint_cleared"] >= 1, st
    assert not any(s["wake_hint"] for s in _slots(selftest, "after", 1))


def test_tracepoints_found_and_missing_ones_reported(selftest):
    state = {r["name"]: r["state"] for r in selftest.of_type("tracepoint")}
    for name in (
        "sched_switch",
        "sched_waking",
        "sched_wakeup",
        "irq_handler_entry",
        "irq_handler_exit",
        "softirq_entry",
        "softirq_exit",
        "local_timer_entry",
        "local_timer_exit",
        "nmi_handler",
    ):
        assert state[name] == "registered", state
    # Debian kernels are built without CONFIG_PREEMPT_TRACER: no preempt_* tracepoints to hook.
    assert state["preempt_disable"] == state["preempt_enable"] == "absent"
