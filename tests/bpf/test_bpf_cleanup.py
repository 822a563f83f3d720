"""Cleanup and sandbox: SIGTERM restores and unpins, SIGKILL leaves no link, stale pins go, caps suffice."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest
from sched_observe import observed, wait_for

from pyvmm import abi
from pyvmm.common.lone_error import lone_error

RR, OTHER = os.SCHED_RR, os.SCHED_OTHER
SANDBOX_CAPS = (1 << 14) | (1 << 23) | (1 << 38) | (1 << 39)  # IPC_LOCK, SYS_NICE, PERFMON, BPF


def _prog_ids(child, attached_only: bool = False) -> set[int]:
    return {p["id"] for p in child.show()["programs"]
            if "id" in p and (p["status"] == "attached" or not attached_only)}


def _live_prog_ids() -> set[int]:
    out = subprocess.run(["bpftool", "-j", "prog", "show"], capture_output=True, text=True, check=True).stdout
    return {p["id"] for p in json.loads(out)}


def _linked_prog_ids() -> set[int]:
    out = subprocess.run(["bpftool", "-j", "link", "show"], capture_output=True, text=True, check=True).stdout
    return {link.get("prog_id") for link in json.loads(out)}


def test_sandbox_caps_are_enough(fake_vmm, policy_child):
    vmm = fake_vmm(1)
    child = policy_child(vmm)
    assert child.ready["caps"] == SANDBOX_CAPS, f"child kept caps {child.ready['caps']:#x}"
    vmm.cmd("mode 0 idle")
    assert wait_for(lambda: observed(vmm.tids[0])[0] == RR, 1.0), "no boost with the sandbox's caps"
    show = child.show()
    progs = {p["name"]: p["status"] for p in show["programs"]}
    assert progs["pvs_switch"] == "attached" and progs["pvs_wakeup"] == "attached"
    # the actuator (native) runs at FIFO PVSCHED_ACTUATOR_PRIO with what it touches locked
    act = show["actuator"]["tid"]
    assert os.sched_getscheduler(act) == os.SCHED_FIFO
    assert os.sched_getparam(act).sched_priority == abi.C.PVSCHED_ACTUATOR_PRIO
    # and the Python threads sit above the boosts too (so that a killed policy process can exit at once)
    assert os.sched_getscheduler(child.pid) == os.SCHED_FIFO
    assert os.sched_getparam(child.pid).sched_priority == abi.C.PVSCHED_CALLER_PRIO
    status = Path(f"/proc/{child.pid}/status").read_text()
    vmlck = int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmLck:")))
    vmrss = int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS:")))
    assert 0 < vmlck < 8 * 1024 and vmlck < vmrss // 2, f"VmLck {vmlck} KiB of VmRSS {vmrss} KiB: not the RT path alone"
    # maps are pinned where bpftool can inspect them
    pin = child.ready["pin_dir"]
    assert sorted(os.listdir(pin)) == ["apic_tid", "events", "stats", "tunables", "vcpus", "vm_budget"]
    out = subprocess.run(["bpftool", "map", "dump", "pinned", f"{pin}/vcpus"], capture_output=True, text=True,
                         check=True)
    assert f'"key": {vmm.tids[0]},' in out.stdout and '"vm_id": 1,' in out.stdout, out.stdout[:500]
    child.terminate()


def test_sigterm_restores_detaches_and_unpins(fake_vmm, policy_child):
    vmm = fake_vmm(2)
    child = policy_child(vmm)
    vmm.cmd("mode 0 idle")
    vmm.cmd("mode 1 hog")
    assert wait_for(lambda: observed(vmm.tids[0])[0] == RR and observed(vmm.tids[1])[0] == RR, 1.0)
    ids = _prog_ids(child)
    pin = child.ready["pin_dir"]
    assert child.terminate() == 0
    assert [observed(t) for t in vmm.tids] == [(OTHER, 0, 0)] * 2, "threads not restored on SIGTERM"
    assert not os.path.exists(pin), "pin directory left behind"
    assert wait_for(lambda: not ids & _live_prog_ids(), 2.0, 0.05), "programs still loaded"
    vmm.cmd("mode 1 idle")


def test_sigkill_leaves_no_link_and_stale_pins_are_removed(fake_vmm, policy_child, pin_root):
    from pyvmm.policy.engine import remove_stale_pins

    vmm = fake_vmm(1)
    child = policy_child(vmm)
    vmm.cmd("mode 0 idle")
    assert wait_for(lambda: observed(vmm.tids[0])[0] == RR, 1.0)
    ids = _prog_ids(child)
    assert _prog_ids(child, attached_only=True) <= _linked_prog_ids()
    pin = child.ready["pin_dir"]
    child.kill()
    # the kernel closes the links with the process: nothing stays attached
    assert wait_for(lambda: not ids & _live_prog_ids(), 2.0, 0.05), "programs outlived SIGKILL"
    assert not ids & _linked_prog_ids()
    # restoring after SIGKILL is the VMM supervisor's job; here the test does it
    os.sched_setscheduler(vmm.tids[0], OTHER, os.sched_param(0))
    assert os.path.isdir(pin), "expected the maps' pins to survive SIGKILL"
    assert remove_stale_pins(str(pin_root)) == [], "removed the pins of a live VMM"
    vmm.stop()
    deadline = time.monotonic() + 2
    while os.path.exists(f"/proc/{vmm.pid}") and time.monotonic() < deadline:
        time.sleep(0.01)
    assert remove_stale_pins(str(pin_root)) == [vmm.pid]
    assert not os.path.exists(pin)


def test_next_start_removes_stale_pins(fake_vmm, policy_child, pin_root):
    old = fake_vmm(1)
    first = policy_child(old)
    stale = first.ready["pin_dir"]
    first.kill()
    old.stop()
    vmm = fake_vmm(1)
    second = policy_child(vmm)
    assert not os.path.exists(stale), "stale pins of a dead VMM survived the next start"
    assert os.path.isdir(second.ready["pin_dir"])
    second.terminate()


def test_add_vcpu_refuses_threads_outside_the_vmm_and_bad_input(fake_vmm, bpf_object, pin_root):
    from pyvmm.common.sched_attr import sched_getattr
    from pyvmm.policy.engine import PolicyEngine
    from pyvmm.policy.tunables import TunableError

    vmm = fake_vmm(1)
    with pytest.raises(TunableError, match="boost_prio"):
        PolicyEngine(vmm.pid, {"boost_prio": "50"}, str(pin_root), realtime=False)
    with pytest.raises(OSError, match="bpffs"):
        PolicyEngine(vmm.pid, {}, "/tmp/not-bpffs", realtime=False)
    eng = PolicyEngine(vmm.pid, {}, str(pin_root), realtime=False)
    try:
        off = vmm.info["slot_offset"]
        view = memoryview(vmm.map)[off:off + 128]
        with pytest.raises(ValueError, match="not a thread of VMM"):
            eng.add_vcpu(1, 0, os.getpid(), vmm.info["hva"] + off, view, sched_getattr(0))
        with pytest.raises(ValueError, match="expected 128"):
            eng.add_vcpu(1, 0, vmm.tids[0], vmm.info["hva"] + off, view[:64], sched_getattr(vmm.tids[0]))
        eng.add_vcpu(1, 0, vmm.tids[0], vmm.info["hva"] + off, view, sched_getattr(vmm.tids[0]))
        with pytest.raises(ValueError, match="already registered"):
            eng.add_vcpu(1, 0, vmm.tids[0], vmm.info["hva"] + off, view, sched_getattr(vmm.tids[0]))
    finally:
        eng.close()
        eng.close()  # idempotent
    assert not (pin_root / str(vmm.pid)).exists()


def test_actuator_survives_a_hostile_host_seq(fake_vmm, bpf_object, pin_root):
    import struct

    import trio

    from pyvmm import abi
    from pyvmm.common.sched_attr import sched_getattr
    from pyvmm.policy.engine import PolicyEngine

    vmm = fake_vmm(1)
    tid = vmm.tids[0]
    off = vmm.info["slot_offset"]
    # the host area is guest memory: a guest may leave any seq there
    struct.pack_into("<I", vmm.map, off + abi.offsetof("struct pvsched_slot", "host", "seq"), 0xFFFFFFFF)
    eng = PolicyEngine(vmm.pid, {}, str(pin_root), realtime=False)
    try:
        eng.add_vcpu(1, 0, tid, vmm.info["hva"] + off, memoryview(vmm.map)[off:off + 128], sched_getattr(tid))
        vmm.cmd("mode 0 idle")

        async def main() -> None:
            async with trio.open_nursery() as n:
                n.start_soon(eng.run)
                await trio.sleep(0.5)
                assert eng._actuator.alive
                n.cancel_scope.cancel()

        trio.run(main)
        assert observed(tid)[0] == RR, "no boost"
        assert vmm.host_area(0)["seq"] % 2 == 0 and vmm.host_area(0)["state"] == 1
    finally:
        eng.close()
    assert observed(tid) == (OTHER, 0, 0)


def test_engine_run_fails_loudly_when_the_native_actuator_stops(fake_vmm, bpf_object, pin_root):
    import trio

    from pyvmm.policy.engine import PolicyEngine

    vmm = fake_vmm(1)
    eng = PolicyEngine(vmm.pid, {}, str(pin_root), realtime=False)

    async def main() -> None:
        async with trio.open_nursery() as n:
            n.start_soon(eng.run)
            await trio.sleep(0.2)
            act = eng._actuator
            act._lib.pvsched_actuator_loop_stop(act._loop)
            # run() must notice by itself (the loop's end wakes the watcher), not hang.  The bound starts at
            # the stop: a start-up slowed by cold caches (the first run after a build) is not what is tested.
            n.cancel_scope.deadline = trio.current_time() + 3
        assert not n.cancel_scope.cancelled_caught, "run() did not end within 3 s of the native loop's stop"

    try:
        with pytest.raises(RuntimeError, match="actuator thread died"), lone_error():
            trio.run(main)
        assert eng._actuator.loop.info()["running"] == 0, "the native backstop loop outlived its actuator"
    finally:
        eng.close()


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_engine_run_fails_loudly_when_the_actuator_thread_dies(fake_vmm, bpf_object, pin_root):
    import trio

    from pyvmm.policy.engine import PolicyEngine

    vmm = fake_vmm(1)
    eng = PolicyEngine(vmm.pid, {}, str(pin_root), realtime=False)

    def die() -> None:
        raise SystemExit("injected")  # not an Exception: the thread's catch-all lets it end

    eng._actuator._watch_once = die

    async def main() -> None:
        with trio.fail_after(3):  # run() must notice by itself, not hang
            await eng.run()

    try:
        with pytest.raises(RuntimeError, match="actuator thread died"):
            trio.run(main)
        assert eng._actuator.loop.info()["running"] == 0, "the native backstop loop outlived its actuator"
    finally:
        eng.close()
