"""Look at a thread's scheduling class from outside the policy: os.sched_getscheduler and /proc/<tid>/sched."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable
from pathlib import Path


def observed(tid: int) -> tuple[int, int, int]:
    """(policy, rt priority, nice) of thread `tid`, as the kernel reports it."""
    return os.sched_getscheduler(tid), os.sched_getparam(tid).sched_priority, os.getpriority(os.PRIO_PROCESS, tid)


def proc_sched(tid: int) -> dict[str, int]:
    """The 'policy' and 'prio' lines of /proc/<tid>/sched (prio: 99 - rt priority for RT, 120 + nice else)."""
    out = {}
    for line in Path(f"/proc/{tid}/sched").read_text().splitlines():
        k, _, v = line.partition(":")
        if k.strip() in ("policy", "prio"):
            out[k.strip()] = int(v.strip())
    return out


def wait_for(pred: Callable[[], bool], timeout: float, interval: float = 0.002) -> bool:
    """Poll `pred` (at the observer's RT priority) until true or `timeout` seconds pass."""
    with observer_rt():
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if pred():
                return True
            time.sleep(interval)
        return pred()


SAMPLER_PRIO = 20  # RT ladder: above boosted vCPUs (<= 10 here), below the actuator (40) and watchdogs (50)


@contextlib.contextmanager
def observer_rt():
    """Run the observer at SCHED_FIFO 20 (reset on fork) so a boosted spinner or host load cannot starve it.

    The observer sleeps between looks, so it never starves anything itself.
    """
    old = os.sched_getscheduler(0), os.sched_getparam(0)
    if old[0] == os.SCHED_FIFO:
        yield  # nested
        return
    os.sched_setscheduler(0, os.SCHED_FIFO | os.SCHED_RESET_ON_FORK, os.sched_param(SAMPLER_PRIO))
    try:
        yield
    finally:
        os.sched_setscheduler(0, old[0], old[1])


def sample(tid: int, seconds: float, interval: float = 0.001) -> list[tuple[float, int, int]]:
    """(time, policy, rt priority) of `tid` every `interval` for `seconds`, observed at SCHED_FIFO 20."""
    out = []
    with observer_rt():
        end = time.monotonic() + seconds
        while (now := time.monotonic()) < end:
            out.append((now, os.sched_getscheduler(tid), os.sched_getparam(tid).sched_priority))
            time.sleep(interval)
    return out


def runs(samples: list[tuple[float, int, int]], pred: Callable[[int, int], bool]) -> list[float]:
    """Durations (s) of the maximal stretches where pred(policy, prio) holds."""
    out, start = [], None
    for t, pol, prio in samples:
        if pred(pol, prio):
            start = t if start is None else start
        elif start is not None:
            out.append(t - start)
            start = None
    return out
