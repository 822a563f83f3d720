"""The backstop loop from Python: backstop_loop.c's native thread, which re-reads every slot each backstop_ms.

The policy process loads build/libpvsched_backstop.so with cffi in ABI mode (pyvmm.common.native:
the cdef is backstop_loop.h itself, made at build time, so nothing is declared twice).  The thread runs the same BPF backstop
program as the actuator loop's event-driven re-reads (actuator_loop.c), without the GIL and without Python:
each wake-up preempts a boosted vCPU, and a Python one (a cold interpreter) costs several times a native one.
It also writes the policy process's heartbeat, while the actuator keeps up with the ring buffer.
"""

from __future__ import annotations

import functools
import os
from typing import Any

import cffi

from pyvmm.common import native


class BackstopLoopError(OSError):
    """The backstop-loop library is missing, or its thread could not start."""


@functools.cache
def ffi() -> cffi.FFI:
    """The loop's API (backstop_loop.h's build-time cdef)."""
    return native.ffi("backstop")


@functools.cache
def _lib() -> Any:
    try:
        return native.dlopen("backstop", ffi())
    except native.NativeError as e:
        raise BackstopLoopError(str(e)) from None


class BackstopLoop:
    """One native thread that runs the backstop program `prog_fd` for every registered vCPU, periodically."""

    def __init__(self, prog_fd: int) -> None:
        self._lib = _lib()
        self._loop = self._lib.pvsched_backstop_loop_new(prog_fd)
        if self._loop == ffi().NULL:
            raise BackstopLoopError("pvsched_backstop_loop_new: out of memory")
        self._last: dict[str, int] = {}

    def set_vcpus(self, vcpus: list[tuple[int, int]]) -> None:
        """The vCPUs to re-read, as (TID, slot address in this process); replaces the previous list."""
        if self._loop is None:
            return
        f = ffi()
        tids = f.new("uint32_t[]", [t for t, _ in vcpus] or [0])
        addrs = f.new("uint64_t[]", [a for _, a in vcpus] or [0])
        rc = self._lib.pvsched_backstop_loop_set_vcpus(self._loop, len(vcpus), tids, addrs)
        if rc < 0:
            raise BackstopLoopError(-rc, f"backstop loop: {len(vcpus)} vCPUs: {os.strerror(-rc)}")

    def set_heartbeat(self, address: int, ringbuf_fd: int) -> None:
        """Beat the 64-bit counter at `address` while the consumer of ring buffer `ringbuf_fd` keeps up (0: stop).

        The caller keeps the counter mapped until close() or set_heartbeat(0, -1)."""
        if self._loop is None:
            return
        f = ffi()
        rc = self._lib.pvsched_backstop_loop_set_heartbeat(self._loop, f.cast("uint64_t *", address), ringbuf_fd)
        if rc < 0:
            raise BackstopLoopError(-rc, f"backstop loop: mapping the ring buffer's positions: {os.strerror(-rc)}")

    def set_period(self, period_ms: int) -> None:
        """A new period, in effect at once (the schedule restarts from now)."""
        if self._loop is None:
            return
        self._lib.pvsched_backstop_loop_set_period(self._loop, period_ms)

    def start(self, period_ms: int, prio: int) -> None:
        """Start the thread at SCHED_FIFO `prio` (0: stay SCHED_OTHER; also when RT is refused, see info)."""
        if self._loop is None:
            raise BackstopLoopError("starting the backstop loop: it is closed")
        rc = self._lib.pvsched_backstop_loop_start(self._loop, period_ms, prio)
        if rc < 0:
            raise BackstopLoopError(-rc, f"starting the backstop loop: {os.strerror(-rc)}")

    def stop(self) -> None:
        """Stop and join the thread (at once: it sleeps on a condition variable); idempotent."""
        if self._loop is None:
            return
        self._lib.pvsched_backstop_loop_stop(self._loop)

    def info(self) -> dict[str, int]:
        """The thread's counters: rounds, runs, errors, late rounds, longest round, beats, its RT priority."""
        if self._loop is None:
            return dict(self._last)  # as they were when it closed
        out = ffi().new("struct pvsched_backstop_loop_info *")
        self._lib.pvsched_backstop_loop_info(self._loop, out)
        return {k: int(getattr(out, k)) for k, _ in ffi().typeof("struct pvsched_backstop_loop_info").fields}

    def close(self) -> None:
        """Stop the thread and free the loop."""
        if self._loop is not None:
            self._lib.pvsched_backstop_loop_stop(self._loop)
            self._last = self.info()
            self._lib.pvsched_backstop_loop_free(self._loop)
            self._loop = None
