"""The guardian (pyvmm/device/guardian.c) on its own: a real child process, real threads, real priorities.

The guarded "vCPU" threads here block (StandinVm), so putting them at RT is safe. The live-VM cases
(boosted spinners on every CPU, a SIGSTOPped policy process) are in tests/hostile/test_faults.py.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from device_harness import Running
from standin import StandinVm

from pyvmm import abi
from pyvmm.cli.status_text import render
from pyvmm.common.sched_attr import SCHED_FIFO, SchedAttr, sched_getattr, sched_setattr
from pyvmm.device.guardian import Guardian, constants
from pyvmm.policy.heartbeat import Heartbeat
from pyvmm.policy.policy_types import consts
from pyvmm.policy.tunables import RT_PRIO_LIMIT

STALE_MS = 100
WATCHDOG_PRIO = abi.C.PVSCHED_WATCHDOG_PRIO  # tests' and benchmarks' watchdogs (the ABI header's RT ladder)
GONE_TID = 2**22 + 12345  # above the default pid_max: no such thread (sched_setattr: ESRCH, not an error)


def _wait(pred, timeout: float, interval: float = 0.0005) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(interval)
    return bool(pred())


def _guardian_thread() -> int | None:
    """TID of the guardian thread in this process, if there is one."""
    for tid in os.listdir("/proc/self/task"):
        if Path(f"/proc/self/task/{tid}/comm").read_text().strip() == "pvsched-guard":
            return int(tid)
    return None


class Watched:
    """A child process (the policy process stand-in), a guardian on it, and a blocking thread to guard."""

    def __init__(self, vm: StandinVm) -> None:
        self.vm = vm
        self.tid = vm.vcpu_tids[0]
        self.child = subprocess.Popen(["sleep", "60"])
        self.pidfd = os.pidfd_open(self.child.pid)
        self.g = Guardian()
        self.g.set_threads({self.tid: vm.original_sched[self.tid], GONE_TID: SchedAttr()})
        self.hb = Heartbeat(os.dup(self.g.heartbeat_fd))

    def start(self) -> None:
        self.g.start(self.child.pid, self.pidfd, stale_ms=STALE_MS)
        assert _wait(lambda: self.g.info()["state"] == "watching", 2), self.g.info()

    def boost(self) -> None:
        """What the actuator does to a vCPU thread."""
        sched_setattr(self.tid, SchedAttr(SCHED_FIFO, 5))

    def restored(self) -> bool:
        return sched_getattr(self.tid) == self.vm.original_sched[self.tid]

    def close(self) -> None:
        self.g.close()
        self.hb.close()
        if self.child.poll() is None:
            self.child.kill()
        self.child.wait()
        os.close(self.pidfd)
        sched_setattr(self.tid, self.vm.original_sched[self.tid])


@pytest.fixture
def watched(vm: StandinVm) -> Iterator[Watched]:
    w = Watched(vm)
    try:
        yield w
    finally:
        w.close()


def test_death_restores_at_once_from_a_locked_fifo_45_thread(watched: Watched) -> None:
    w = watched
    w.start()
    tid = _guardian_thread()
    assert tid is not None, "no pvsched-guard thread"
    assert os.sched_getscheduler(tid) == SCHED_FIFO
    assert os.sched_getparam(tid).sched_priority == constants().PVSCHED_GUARDIAN_PRIO
    # RT ladder: boosts < policy process (caller, actuator) < guardian < watchdogs
    assert RT_PRIO_LIMIT < consts().PVSCHED_ACTUATOR_PRIO < constants().PVSCHED_GUARDIAN_PRIO < WATCHDOG_PRIO
    info = w.g.info()
    assert info["prio"] == constants().PVSCHED_GUARDIAN_PRIO and info["locked"], info
    w.boost()
    os.kill(w.child.pid, signal.SIGKILL)
    t0 = time.monotonic()
    assert _wait(w.restored, 1.0), "not restored 1 s after the death"
    ms = (time.monotonic() - t0) * 1000
    print(f"restored {ms:.2f} ms after SIGKILL")
    assert ms < 20
    assert _wait(lambda: w.g.info()["state"] == "done", 1)
    info = w.g.info()
    assert info["cause"] == "died" and info["restored"] == 1 and info["errors"] == 0, info  # the gone TID: ESRCH
    assert _guardian_thread() is None, "the guardian thread outlived its job"


def test_a_stale_heartbeat_gets_the_process_killed_and_the_threads_restored(watched: Watched) -> None:
    w = watched
    w.start()
    w.boost()
    for _ in range(5):  # the actuator's beats: from now on, silence means a hang
        w.hb.beat()
        time.sleep(0.005)
    t0 = time.monotonic()
    assert _wait(w.restored, 2.0), "a silent heartbeat left the thread boosted"
    ms = (time.monotonic() - t0) * 1000
    assert STALE_MS - 10 <= ms < STALE_MS + constants().PVSCHED_GUARDIAN_PERIOD_MS + 50, ms
    w.child.wait(2)
    assert w.child.returncode == -signal.SIGKILL
    info = w.g.info()
    assert info["cause"] == "stale" and info["silent_ms"] >= STALE_MS and info["beats"] == 5, info
    assert _wait(lambda: w.g.info()["state"] == "done", 1), w.g.info()


def test_a_heartbeat_that_keeps_beating_is_left_alone_and_the_thread_sleeps(watched: Watched) -> None:
    w = watched
    w.start()
    gtid = _guardian_thread()
    cpu0 = int(Path(f"/proc/self/task/{gtid}/schedstat").read_text().split()[0])
    end = time.monotonic() + 3 * STALE_MS / 1000
    while time.monotonic() < end:
        w.hb.beat()
        time.sleep(0.005)
    cpu_ms = (int(Path(f"/proc/self/task/{gtid}/schedstat").read_text().split()[0]) - cpu0) / 1e6
    print(f"guardian CPU time: {cpu_ms:.2f} ms in {3 * STALE_MS} ms")
    assert cpu_ms < 3 * STALE_MS * 0.02, "the guardian busy-waits"
    assert w.child.poll() is None
    info = w.g.info()
    assert info["state"] == "watching" and info["armed"] and info["cause"] is None, info


@pytest.mark.skipif(os.cpu_count() < 2, reason="holds CPU 1 from the guardian while this thread runs on another")
def test_a_guardian_that_was_not_run_itself_does_not_blame_the_policy(watched: Watched) -> None:
    """A stall of the whole machine (the hypervisor below it, up to 100 ms here) also stops the guardian.

    Stand-in: the guardian is held off its only CPU for 300 ms by a bounded FIFO 70 spinner (watchdog at
    FIFO 80) while nobody beats.  It wakes 275 ms late, which tells it the silence is not the policy's."""
    w = watched
    w.start()
    w.boost()
    for _ in range(5):
        w.hb.beat()
        time.sleep(0.005)
    gtid = _guardian_thread()
    os.sched_setaffinity(gtid, {1})
    w.hb.beat()
    os.sched_setaffinity(0, {0})
    spin = "import time\nend = time.monotonic() + 0.3\nwhile time.monotonic() < end: pass"
    # the guardian has seen the last beat: the silence starts before the stall
    assert _wait(lambda: w.g.info()["beats"] == 6, 2 * constants().PVSCHED_GUARDIAN_PERIOD_MS / 1000)
    subprocess.run(["chrt", "-f", "80", "timeout", "-s", "KILL", "3", "chrt", "-f", "70", "taskset", "-c", "1",
                    sys.executable, "-c", spin], check=True, timeout=10)
    time.sleep(0.02)  # the guardian has woken (late) by now; the "policy" resumes beating
    end = time.monotonic() + 2 * STALE_MS / 1000
    while time.monotonic() < end:
        w.hb.beat()
        time.sleep(0.005)
    os.sched_setaffinity(0, range(os.cpu_count()))
    info = w.g.info()
    assert w.child.poll() is None and info["cause"] is None, f"killed for the guardian's own stall: {info}"
    assert not w.restored() and info["state"] == "watching", info


def test_never_beating_or_disarmed_is_not_a_hang(watched: Watched) -> None:
    """No beat yet (no engine, or before the actuator starts) and a clean shutdown's silence: no kill."""
    w = watched
    w.start()
    time.sleep(3 * STALE_MS / 1000)
    assert w.child.poll() is None and not w.g.info()["armed"]
    w.hb.beat()
    assert _wait(lambda: w.g.info()["armed"], 4 * constants().PVSCHED_GUARDIAN_PERIOD_MS / 1000), w.g.info()
    w.g.disarm()
    time.sleep(3 * STALE_MS / 1000)
    assert w.child.poll() is None, "killed after disarm"
    t0 = time.monotonic()
    w.g.stop()
    assert time.monotonic() - t0 < 0.1, "stop() waited for a poll timeout"
    assert w.g.info()["state"] == "stopped" and _guardian_thread() is None


def test_the_heartbeat_memfd_is_sealed(watched: Watched) -> None:
    """The policy process writes the page but cannot shrink it under the VMM (that would be SIGBUS in the VMM)."""
    fd = watched.g.heartbeat_fd
    with pytest.raises(PermissionError):
        os.ftruncate(fd, 0)
    with pytest.raises(PermissionError):
        os.ftruncate(fd, 1 << 20)


def test_start_refuses_a_pidfd_of_another_process(watched: Watched) -> None:
    with pytest.raises(OSError):
        watched.g.start(os.getpid(), watched.pidfd)


def test_the_device_runs_one_and_status_shows_it(running: Running) -> None:
    """The real policy process beats (its actuator), the device's guardian watches it; `pyvmm status` says so."""
    g = running.dev.guardian
    assert g is not None, "the device started no guardian"
    assert _wait(lambda: g.info()["armed"], 5, 0.01), g.info()
    beats = g.info()["beats"]
    time.sleep(0.1)
    assert g.info()["beats"] > beats, "the actuator's heartbeat does not move"
    text = render("status", running.control("status"))
    assert f"guardian: watching, FIFO {constants().PVSCHED_GUARDIAN_PRIO}, memory locked, heartbeat" in text, text
    running.dev.stop()  # clean: disarmed first, so the policy's shutdown is not taken for a hang
    assert running.dev.supervisor.returncode == 0
    assert g.info()["cause"] in (None, "died") and g.info()["state"] in ("done", "stopped"), g.info()


def _thread_that_exits() -> int:
    """TID of a thread of this process that has ended (and been released by the kernel)."""
    import threading

    got: list[int] = []
    t = threading.Thread(target=lambda: got.append(threading.get_native_id()))
    t.start()
    t.join()
    assert _wait(lambda: not Path(f"/proc/self/task/{got[0]}").exists(), 2)
    return got[0]


def _process_on_tid(tid: int) -> subprocess.Popen | None:
    """A child process (sleep) whose PID is `tid`, placed there with ns_last_pid; None if another fork won."""
    last_pid = Path("/proc/sys/kernel/ns_last_pid")
    for _ in range(20):
        last_pid.write_text(str(tid - 1))
        p = subprocess.Popen(["sleep", "30"])
        if p.pid == tid:
            return p
        p.kill()
        p.wait()
    return None


@pytest.mark.skipif(os.geteuid() != 0, reason="ns_last_pid needs CAP_SYS_ADMIN")
def test_a_tid_reused_by_another_process_is_left_alone() -> None:
    """A guarded vCPU thread exits; another process gets its TID; a restore must not touch that process."""
    tid = _thread_that_exits()
    other = _process_on_tid(tid)
    if other is None:
        pytest.skip(f"could not place a process on TID {tid} (a busy host kept forking)")
    g = Guardian()
    try:
        sched_setattr(other.pid, SchedAttr(os.SCHED_BATCH, 0, 7))  # the other process's own choice
        g.set_threads({tid: SchedAttr()})  # what the guardian recorded for the vCPU thread: OTHER, nice 0
        assert g.restore() == 0
        assert sched_getattr(other.pid) == SchedAttr(os.SCHED_BATCH, 0, 7), "restored a thread that is not ours"
        assert g.info()["errors"] == 0
    finally:
        g.close()
        other.kill()
        other.wait()


def test_stop_returns_only_once_the_thread_is_gone(vm: StandinVm) -> None:
    """pthread_join alone returns before the kernel releases the thread (its /proc entry lingers)."""
    child = subprocess.Popen(["sleep", "60"])
    pidfd = os.pidfd_open(child.pid)
    try:
        for i in range(30):
            g = Guardian()
            g.set_threads({vm.vcpu_tids[0]: vm.original_sched[vm.vcpu_tids[0]]})
            g.start(child.pid, pidfd, stale_ms=STALE_MS)
            assert _wait(lambda g=g: g.info()["state"] == "watching", 2)
            g.stop()
            assert _guardian_thread() is None, f"round {i}: the guardian thread was still there after stop()"
            g.close()
    finally:
        child.kill()
        child.wait()
        os.close(pidfd)
