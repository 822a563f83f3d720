"""Where the host's CPU time goes during a benchmark run: vCPU threads, the rest of the VMM, its policy
process, the host load (stress-ng), and what a hypervisor below the host took (steal).

A host-throughput ratio (stress-ng bogo-ops/s against vanilla) mixes two things: the CPU a configuration
gives the guest (a guest served on time does more work) and what the mechanism itself costs. Sampling CPU
time per party separates them. Per-task times come from /proc, which the kernel scales to the precise
runtime (/proc/stat's per-CPU tick counts are not: they miss threads that run between ticks, as vCPU
threads woken in step with the tick do), sampled by a thread every `period_s`. A party's figure
is its CPU seconds between the first and the last sample, divided by that window: in CPUs (1.0 = one CPU
for the whole window).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

_TICK = os.sysconf("SC_CLK_TCK")


def _proc_cpu_s(pid: int) -> float | None:
    """CPU seconds of a process (all its threads), plus its reaped children's; None when it has ended."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    f = stat[stat.rfind(")") + 2:].split()
    if f[0] in ("Z", "X"):
        return None
    # fields 14-17 of proc(5): utime stime cutime cstime, here at 11-14 after dropping pid and comm
    ticks = int(f[11]) + int(f[12]) + int(f[13]) + int(f[14])
    return ticks / _TICK


def _children(pid: int) -> list[int]:
    out = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for t in tasks:
        try:
            out += [int(c) for c in Path(f"/proc/{pid}/task/{t}/children").read_text().split()]
        except OSError:
            pass
    return out


def tree_cpu_s(root: int) -> float | None:
    """CPU seconds of a process and all its live descendants (reaped ones are in their parent's cutime).

    None once the root has ended: its children's time would vanish from the sum."""
    total, todo, seen = 0.0, [root], set()
    while todo:
        pid = todo.pop()
        if pid in seen:
            continue
        seen.add(pid)
        t = _proc_cpu_s(pid)
        if t is None and pid == root:
            return None
        total += t or 0.0  # a child between exit and reaping is briefly missing: sampling noise, not a trend
        todo += _children(pid)
    return total


def children_cpu_s(parent: int) -> float | None:
    """CPU seconds of a process's descendants, without itself (e.g. the VMM's policy process)."""
    if _proc_cpu_s(parent) is None:
        return None
    return sum(tree_cpu_s(c) or 0.0 for c in _children(parent))


def threads_cpu_s(tids: list[int]) -> float | None:
    """CPU seconds of some threads, from /proc/<tid>/schedstat (nanoseconds, not ticks); None once one ended."""
    total = 0
    for tid in tids:
        try:
            total += int(Path(f"/proc/{tid}/schedstat").read_text().split()[0])
        except (OSError, IndexError, ValueError):
            return None
    return total / 1e9


def steal_s() -> float | None:
    """CPU seconds the host's CPUs were ready but not run by a hypervisor below it (/proc/stat steal).

    Counted in ticks (USER_HZ), so only stalls of 10 ms and more show; on a VM host they stall every task,
    RT or not, vCPU threads included."""
    try:
        f = Path("/proc/stat").read_text().split("\n", 1)[0].split()
        return int(f[8]) / _TICK
    except (OSError, ValueError, IndexError):
        return None


class CpuMeter:
    """Samples cumulative CPU-second counters in a thread; `stop()` gives each one's rate over the window.

    The window ends at the last sample where every counter still answered: once a measured party ends (the
    VM, or the host load's timer) the figures would no longer cover the same time."""

    def __init__(self, counters: dict[str, Callable[[], float | None]], period_s: float = 0.1) -> None:
        """Start sampling now: `counters` maps a name to a function returning cumulative CPU seconds or None."""
        self._counters = counters
        self._period = period_s
        self._first: tuple[float, dict[str, float]] | None = None
        self._last: tuple[float, dict[str, float]] | None = None
        self._stop = threading.Event()
        self._ended = False
        self._sample()
        self._thread = threading.Thread(target=self._loop, name="bench-cpumeter", daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        if self._ended:
            return
        vals = {k: f() for k, f in self._counters.items()}
        if any(v is None for v in vals.values()):
            self._ended = True
            return
        snap = (time.monotonic(), vals)
        if self._first is None:
            self._first = snap
        self._last = snap

    def _loop(self) -> None:
        while not self._stop.wait(self._period):
            self._sample()

    def stop(self) -> dict[str, float] | None:
        """Stop; {"window_s": s, name: CPUs used in the window, ...}, None if the window is too short."""
        self._stop.set()
        self._thread.join(2)
        self._sample()
        if not self._first or not self._last:
            return None
        (t0, a), (t1, b) = self._first, self._last
        if t1 - t0 < 0.5:
            return None
        res = {"window_s": round(t1 - t0, 2)}
        for k in a:
            res[k] = round(max(b[k] - a[k], 0.0) / (t1 - t0), 3)
        return res
