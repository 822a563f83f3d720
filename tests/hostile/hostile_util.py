"""Helpers of the hostile-guest and fault tests: real `pyvmm boot` VMs under an RT watchdog, seen from outside.

Reused: tests/bpf/sched_observe.py (the observer at SCHED_FIFO 20, below the
actuator at 40 and the watchdog at 50) and the VMM's own control-socket client.
Every VM runs as `chrt -f 50 timeout -s KILL N chrt -o 0 pyvmm boot ...` and is
SIGKILLed by PID (VMM, watchdog, policy process) at teardown.
"""

from __future__ import annotations

import itertools
import mmap
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self

from pyvmm import abi
from pyvmm.common import control_client as control
from pyvmm.common import pins
from pyvmm.common.sched_attr import SCHED_FIFO, SCHED_RR, SchedAttr, sched_getattr

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "bpf"))
from sched_observe import observer_rt, wait_for  # tests/bpf: the observer at SCHED_FIFO 20

PIN_ROOT = Path(pins.PIN_ROOT)
WATCHDOG_PRIO = abi.C.PVSCHED_WATCHDOG_PRIO
RT = (SCHED_FIFO, SCHED_RR)
KNOWN_POLICIES = (0, 1, 2, 3, 5)  # OTHER FIFO RR BATCH IDLE: never DEADLINE, EXT or anything else


def alive(pid: int) -> bool:
    """True while `pid` exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def kill_pid(pid: int | None) -> None:
    """SIGKILL one process by PID if it is still there."""
    if pid:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def children(pid: int) -> list[int]:
    """Direct children of `pid` (all threads' lists)."""
    out: list[int] = []
    try:
        for t in os.listdir(f"/proc/{pid}/task"):
            out += [int(c) for c in Path(f"/proc/{pid}/task/{t}/children").read_text().split()]
    except OSError:
        pass
    return out


@dataclass
class Vm:
    """One `pyvmm boot` under its watchdog: pids, vCPU TIDs, and the pieces of its pvsched state."""

    watchdog: subprocess.Popen
    pid: int = 0
    tids: dict[int, int] = field(default_factory=dict)
    policy_pid: int | None = None
    prog_ids: set[int] = field(default_factory=set)
    st: dict = field(default_factory=dict)

    def request(self, cmd: str, **kw) -> dict:
        """One control-socket request ({"cmd": cmd, ...}) to this VM."""
        return control.request(self.pid, {"cmd": cmd, **kw}, timeout=10)

    def status(self) -> dict:
        return self.request("status")

    def show(self) -> dict:
        return self.request("policy.show")

    def stats(self) -> dict[str, int]:
        """The BPF policy's stats counters by name."""
        return {k: v["value"] for k, v in self.show()["stats"].items()}

    @property
    def pin_dir(self) -> Path:
        return PIN_ROOT / str(self.pid)

    def finish(self, timeout: float = 40) -> tuple[str, str]:
        """Wait for the VM to end by itself; (stdout, stderr)."""
        out, err = self.watchdog.communicate(timeout=timeout)
        return out, err

    def kill(self) -> str:
        """SIGKILL the VMM, its watchdog and its policy process, by PID; idempotent.  The VMM's stderr so far."""
        kill_pid(self.pid)
        if self.watchdog.poll() is None:
            self.watchdog.kill()
        err = ""
        try:
            err = self.watchdog.communicate(timeout=10)[1] or ""
        except (ValueError, subprocess.TimeoutExpired):
            pass
        if self.policy_pid and alive(self.policy_pid):
            kill_pid(self.policy_pid)
        return err


def _vmm_pid(watchdog: subprocess.Popen, timeout: float = 15) -> int:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        kids = children(watchdog.pid)
        if kids:
            return kids[0]
        if watchdog.poll() is not None:
            raise AssertionError(f"pyvmm exited at once: {watchdog.communicate()}")
        time.sleep(0.01)
    raise AssertionError("pyvmm did not start")


def start_vm(cmdline: str, cpus: int = 2, seconds: float = 5, args: tuple[str, ...] = (),
             env: dict | None = None, stdout=subprocess.PIPE) -> Vm:
    """Start `pyvmm boot` with the test guest under the RT watchdog; returns at once (see wait_active)."""
    e = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    cmd = ["chrt", "-f", str(WATCHDOG_PRIO), "timeout", "-s", "KILL", str(int(seconds + 40)), "chrt", "-o", "0",
           sys.executable, "-m", "pyvmm.cli", "boot", "--json", "--no-console-input", "--cpus", str(cpus), "--cmdline", cmdline,
           "--timeout", str(int(seconds + 25)), *args]
    p = subprocess.Popen(cmd, cwd=ROOT, env=e, stdin=subprocess.DEVNULL, stdout=stdout, stderr=subprocess.PIPE,
                         text=True)
    vm = Vm(p)
    vm.pid = _vmm_pid(p)
    return vm


def registered(st: dict) -> bool:
    """The guest's pvsched is active and the policy process has registered it (a `status` reply)."""
    pv = st.get("pvsched", {})
    return pv.get("state") == "active" and bool(pv.get("policy", {}).get("process", {}).get("registered"))


def wait_active(vm: Vm, timeout: float = 20, ready: Callable[[dict], bool] = registered) -> Vm:
    """Wait until `ready(status)` (default: the guest enabled pvsched and the policy process registered it);
    fills tids/policy_pid/prog_ids."""
    st: dict = {}

    def active() -> bool:
        nonlocal st
        try:
            st = vm.status()
        except control.ControlError:
            return False
        return ready(st)

    end = time.monotonic() + timeout
    while not active():
        assert vm.watchdog.poll() is None, f"VM ended early: {vm.watchdog.communicate()}"
        if time.monotonic() >= end:
            raise AssertionError(f"pvsched never active: {st}\nVMM stderr: {vm.kill()[-3000:]}")
        time.sleep(0.05)
    vm.st = st
    vm.tids = {int(k): v for k, v in st["vcpu_tids"].items()}
    vm.policy_pid = st["pvsched"]["policy"]["pid"]
    vm.prog_ids = {p["id"] for p in vm.show()["programs"] if "id" in p}
    return vm


def shm_map(vm: Vm) -> mmap.mmap:
    """The VM's shared area, mapped through its guest-RAM memfd (what a hostile guest controls)."""
    pv = vm.st["pvsched"]
    gpa, size = pv["shm_gpa"], pv["shm_size"]
    assert gpa + size <= 0xC0000000, "shared area above 4 GiB: file offset != GPA"  # low RAM: memfd offset == GPA
    for fd in os.listdir(f"/proc/{vm.pid}/fd"):
        try:
            target = os.readlink(f"/proc/{vm.pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("/memfd:pyvmm-ram"):
            f = os.open(f"/proc/{vm.pid}/fd/{fd}", os.O_RDWR)
            try:
                return mmap.mmap(f, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE, offset=gpa)
            finally:
                os.close(f)
    raise AssertionError(f"no guest-RAM memfd among VMM {vm.pid}'s fds")


def map_tids(pin_dir) -> set[int]:
    """The TIDs in a VM's pinned vcpus map (bpftool map dump)."""
    import json

    out = subprocess.run(["bpftool", "-j", "map", "dump", "pinned", f"{pin_dir}/vcpus"], capture_output=True,
                         text=True, check=True).stdout
    # with BTF each entry has "formatted"; else the key is a list of hex bytes (a little-endian u32)
    return {e["formatted"]["key"] if "formatted" in e else int.from_bytes(bytes(int(x, 16) for x in e["key"]), "little")
            for e in json.loads(out)}


def link_prog_ids() -> set[int]:
    """Program ids of every BPF link on the host (bpftool link list)."""
    import json

    out = subprocess.run(["bpftool", "-j", "link", "list"], capture_output=True, text=True, check=True).stdout
    return {link.get("prog_id") for link in json.loads(out or "[]")}


def loaded_prog_ids() -> set[int]:
    """Ids of every loaded BPF program (bpftool prog show)."""
    import json

    out = subprocess.run(["bpftool", "-j", "prog", "show"], capture_output=True, text=True, check=True).stdout
    return {p["id"] for p in json.loads(out or "[]")}


@dataclass(frozen=True)
class Caps:
    """The admin limits a vCPU thread's attributes must stay within."""

    max_rt_prio: int = 10
    allow_fifo: bool = False
    min_nice: int = -10

    def violation(self, attr: SchedAttr, original: SchedAttr) -> str | None:
        """Why `attr` is outside the limits, or None."""
        if attr == original:
            return None
        if attr.policy not in KNOWN_POLICIES:
            return f"policy {attr.policy}"
        if attr.policy == SCHED_FIFO and not self.allow_fifo:
            return "FIFO while allow_fifo=false"
        if attr.policy in RT and not 1 <= attr.priority <= self.max_rt_prio:
            return f"RT priority {attr.priority} > cap {self.max_rt_prio}"
        if attr.policy not in RT and not min(self.min_nice, original.nice) <= attr.nice <= 19:
            return f"nice {attr.nice} < floor {self.min_nice}"
        return None


class Sampler:
    """Reads threads' real attributes and run time from outside the policy, every ~1 ms, at SCHED_FIFO 20.

    Samples are (monotonic s, tid, SchedAttr or None if gone, run ns from /proc/<pid>/task/<tid>/schedstat).
    """

    def __init__(self, pid: int, tids: list[int], interval: float = 0.001, cpu: int | None = None):
        self.pid, self.tids, self.interval, self.cpu = pid, list(tids), interval, cpu
        self.samples: list[tuple[float, int, SchedAttr | None, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="hostile-sampler", daemon=True)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(5)

    def _read(self, tid: int) -> tuple[SchedAttr | None, int]:
        try:
            attr = sched_getattr(tid)
            run_ns = int(Path(f"/proc/{self.pid}/task/{tid}/schedstat").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None, 0
        return attr, run_ns

    def _run(self) -> None:
        if self.cpu is not None:
            os.sched_setaffinity(0, {self.cpu})
        with observer_rt():
            while not self._stop.is_set():
                now = time.monotonic()
                for tid in self.tids:
                    attr, run_ns = self._read(tid)
                    self.samples.append((now, tid, attr, run_ns))
                time.sleep(self.interval)

    def of(self, tid: int) -> list[tuple[float, SchedAttr, int]]:
        """The samples of one thread while it existed."""
        return [(t, a, r) for t, x, a, r in self.samples if x == tid and a is not None]

    def violations(self, caps: Caps, original: dict[int, SchedAttr]) -> list[str]:
        """Every sample outside the admin limits, described."""
        out = []
        for t, tid, attr, _ in self.samples:
            if attr is not None and (why := caps.violation(attr, original[tid])):
                out.append(f"t={t:.3f} tid {tid}: {attr} ({why})")
        return out

    def rt_run_s(self, tid: int) -> float:
        """Run time of `tid` while at an RT policy: an interval counts if RT at either end (an upper bound)."""
        s = self.of(tid)
        return sum((r1 - r0) for (_, a0, r0), (_, a1, r1) in itertools.pairwise(s)
                   if a0.policy in RT or a1.policy in RT) / 1e9

    def run_s(self, tid: int) -> float:
        """Total run time of `tid` over the sampled span."""
        s = self.of(tid)
        return (s[-1][2] - s[0][2]) / 1e9 if len(s) > 1 else 0.0

    def max_gap_s(self) -> float:
        """Longest time between two consecutive sampling rounds (the sampler's own delays)."""
        times = sorted({t for t, _, _, _ in self.samples})
        return max((b - a for a, b in itertools.pairwise(times)), default=0.0)

    def span_s(self) -> float:
        return self.samples[-1][0] - self.samples[0][0] if self.samples else 0.0


__all__ = [
    "PIN_ROOT",
    "ROOT",
    "Caps",
    "Sampler",
    "Vm",
    "alive",
    "children",
    "kill_pid",
    "link_prog_ids",
    "loaded_prog_ids",
    "observer_rt",
    "shm_map",
    "start_vm",
    "wait_active",
    "wait_for",
]
