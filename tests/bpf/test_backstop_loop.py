"""The native backstop loop (pyvmm/policy/backstop_loop.c) in a real engine: it re-reads slots and beats without Python."""

from __future__ import annotations

import os
import threading
import time

import pytest
import trio
from sched_observe import observed, wait_for

from pyvmm import abi
from pyvmm.common.sched_attr import sched_getattr
from pyvmm.policy.engine import PolicyEngine
from pyvmm.policy.heartbeat import Heartbeat

RR = os.SCHED_RR


@pytest.fixture
def engine(fake_vmm, bpf_object, pin_root):
    """A PolicyEngine for a one-thread stand-in VMM, its vCPU registered, a heartbeat memfd attached."""
    vmm = fake_vmm(1)
    tid = vmm.tids[0]
    off = vmm.info["slot_offset"]
    # realtime, as in the policy process: the native loops at SCHED_FIFO above every boost.  At SCHED_OTHER
    # they wait behind the RR 8 spinner a test makes, on its CPU, until it is throttled, which needs them:
    # with the test on one CPU, 2-3 beats came in 300 ms instead of 15.
    eng = PolicyEngine(vmm.pid, {}, str(pin_root))
    fd = os.memfd_create("heartbeat")
    os.ftruncate(fd, 4096)
    hb = Heartbeat(fd)
    os.close(fd)
    eng.set_heartbeat(hb)
    eng.add_vcpu(1, 0, tid, vmm.info["hva"] + off, memoryview(vmm.map)[off:off + 128], sched_getattr(tid))
    try:
        yield vmm, eng, hb
    finally:
        eng.close()
        eng.set_heartbeat(None)
        hb.close()


def _running(eng: PolicyEngine, body) -> None:
    """Run the engine (actuator and loop threads) while `body()` runs in a worker thread."""

    async def main() -> None:
        async with trio.open_nursery() as n:
            n.start_soon(eng.run)
            await trio.to_thread.run_sync(body)
            n.cancel_scope.cancel()

    trio.run(main)


def test_the_loop_rereads_slots_and_beats_while_python_sleeps(engine):
    _, eng, hb = engine
    eng.set_tunables({"backstop_ms": "10"})
    seen = {}

    def body() -> None:
        time.sleep(0.3)  # started, and the first counter refresh done
        a0, b0, l0 = eng._actuator.info()["wakeups"], hb.beats, eng.show()["actuator"]["backstop_loop"]
        time.sleep(1.0)
        a1, b1, l1 = eng._actuator.info()["wakeups"], hb.beats, eng.show()["actuator"]["backstop_loop"]
        seen.update(python=a1 - a0, beats=b1 - b0, rounds=l1["rounds"] - l0["rounds"], runs=l1["runs"] - l0["runs"],
                    errors=l1["errors"], nr=l1["nr_vcpus"])

    _running(eng, body)
    # every 10 ms for its one vCPU; the actuator woke for the counter refresh only (once a second, maybe a record)
    assert 60 <= seen["rounds"] <= 110 and seen["runs"] == seen["rounds"] and seen["nr"] == 1, seen
    assert seen["errors"] == 0 and seen["beats"] >= seen["rounds"] - 1, seen
    assert seen["python"] <= 3, f"the actuator woke {seen['python']} times in 1 s with nothing to apply"
    assert eng.show()["stats"]["backstop"]["value"] >= seen["runs"], "the BPF program did not count the runs"


def test_the_rounds_do_not_keep_one_phase(engine):
    # A fixed 20 ms grid phase-locks with a guest's 1 ms timer, so that every round preempts the same vCPU
    # at the same point of its wake-up; each gap is drawn from 0.75-1.25 of the period instead.  The rounds
    # are seen through the heartbeat, which the loop writes at each round (at 20 ms, before its 100 ms beat).
    _, eng, hb = engine
    eng.set_tunables({"backstop_ms": "20"})
    seen: list[float] = []

    def body() -> None:
        time.sleep(0.3)
        last, end = hb.beats, time.monotonic() + 1.5
        while time.monotonic() < end:
            if (b := hb.beats) != last:
                seen.append(time.monotonic())
                last = b
            time.sleep(0.0002)

    _running(eng, body)
    gaps = sorted((b - a) * 1000 for a, b in zip(seen, seen[1:]))
    assert len(gaps) >= 40, gaps
    median, iqr = gaps[len(gaps) // 2], gaps[3 * len(gaps) // 4] - gaps[len(gaps) // 4]
    # uniform over 15-25 ms: median 20, interquartile range 5; a fixed grid's is the poll's noise (< 1 ms)
    assert 16 <= median <= 24 and iqr >= 2.5, (median, iqr, gaps)


def test_a_stuck_actuator_stops_the_heartbeat_and_a_recovered_one_restarts_it(engine):
    vmm, eng, hb = engine
    tid = vmm.tids[0]
    act = eng._actuator
    release = threading.Event()
    seen = {}

    def body() -> None:
        time.sleep(0.3)
        b0 = hb.beats
        time.sleep(0.3)
        seen["idle"] = hb.beats - b0  # nothing to apply: an idle actuator is not a hung one
        # The watcher must not end the engine while the loop is held, and must still drain the loop's notify
        # eventfd (the real _watch_once does): left readable, its poll() returns at once and the watcher spins.
        watch_once = act._watch_once
        act._watch_once = lambda: watch_once() or True
        act._lib.pvsched_actuator_loop_stop(act._loop)  # held: records wait unconsumed, as behind a hung thread
        vmm.cmd(f"custom 0 spin 0 {RR} 8 0 0")  # a boost request: a record nobody consumes
        time.sleep(0.3)
        b1 = hb.beats
        time.sleep(0.4)
        seen["stuck"] = hb.beats - b1
        seen["withheld"] = act.loop.info()["withheld"]
        assert act._lib.pvsched_actuator_loop_start(act._loop, abi.C.PVSCHED_ACTUATOR_PRIO) == 0
        release.set()
        seen["boosted"] = wait_for(lambda: observed(tid)[:2] == (RR, 8), 2.0)
        b2 = hb.beats
        time.sleep(0.3)
        seen["after"] = hb.beats - b2
        vmm.cmd("custom 0 spin 0 0 0 0 0")

    try:
        _running(eng, body)
    finally:
        release.set()
    assert seen["idle"] >= 2, seen  # >= every 100 ms (the backstop's 20 ms rounds beat too)
    assert seen["stuck"] == 0 and seen["withheld"] > 0, seen
    assert seen["boosted"] and seen["after"] >= 2, seen
