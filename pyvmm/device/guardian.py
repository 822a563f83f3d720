"""The guardian from Python: guardian.c's thread in the VMM, which watches the policy process.

The VMM loads build/libpvsched_guardian.so with cffi in ABI mode (pyvmm.common.native: the
cdef is guardian.h itself, made at build time, so nothing is declared twice) and starts one native thread per policy process
that restores the vCPU threads' original attributes the moment that process dies, and
kills it (then restores) when its heartbeat stops, all without the GIL: with
boosted vCPUs on every CPU, Python in the VMM can wait ~1 s for a starved GIL holder.
The policy process maps the heartbeat memfd (struct pvsched_heartbeat of the ABI header), and its
native backstop loop bumps a counter in it (pyvmm/policy/heartbeat.py).
"""

from __future__ import annotations

import functools
import logging
import os
from typing import Any

import cffi

from pyvmm import abi
from pyvmm.common import native
from pyvmm.common.sched_attr import SchedAttr

log = logging.getLogger("pyvmm.pvsched.guardian")

_U64 = (1 << 64) - 1


@functools.cache
def ffi() -> cffi.FFI:
    """The guardian's API (guardian.h's build-time cdef) over the ABI header's types and constants (RT ladder)."""
    return native.ffi("guardian", abi.ffi())


def _names(enum: str, prefix: str) -> dict[int, str]:
    """Value -> short lower-case name of a guardian.h enum (the header is the one list)."""
    return {v: n.removeprefix(prefix).lower() for v, n in ffi().typeof(f"enum {enum}").elements.items()}


@functools.cache
def _lib() -> Any:
    return native.dlopen("guardian", ffi())


@functools.cache
def constants() -> Any:
    """The headers' enum constants (PVSCHED_GUARDIAN_PRIO, ..._PERIOD_MS, ..._STALE_MS) without loading the library."""
    return ffi().dlopen(None)  # the process itself: only its enum values are read


class GuardianError(OSError):
    """The guardian library is missing, could not be built, or refused to start."""


class Guardian:
    """One guardian: a heartbeat memfd for the policy process, and the native thread watching that process."""

    def __init__(self) -> None:
        try:
            self._lib = _lib()
        except (OSError, RuntimeError) as e:  # BuildError is a RuntimeError
            raise GuardianError(f"guardian library unavailable: {e}") from None
        self._g = self._lib.pvsched_guardian_new()
        if self._g == ffi().NULL:
            raise GuardianError("pvsched_guardian_new failed (memfd, mmap or eventfd)")
        self._last: dict[str, Any] | None = None

    @property
    def heartbeat_fd(self) -> int:
        """The sealed heartbeat memfd to hand to the policy process (close-on-exec: pass it explicitly)."""
        return int(self._lib.pvsched_guardian_heartbeat_fd(self._g))

    def set_threads(self, originals: dict[int, SchedAttr]) -> None:
        """The vCPU threads (TID -> original attributes) to restore; may be called again at any time."""
        if self._g is None:
            raise GuardianError("guardian is closed")
        items = sorted(originals.items())
        f = ffi()
        arrays = [f.new("int32_t[]", [v for v in col]) for col in (
            [t for t, _ in items], [a.policy for _, a in items], [a.priority for _, a in items],
            [a.nice for _, a in items])] if items else [f.NULL] * 4
        rc = self._lib.pvsched_guardian_set_threads(self._g, len(items), *arrays)
        if rc < 0:
            raise GuardianError(-rc, f"guardian: cannot guard {len(items)} threads: {os.strerror(-rc)}")

    def start(self, pid: int, pidfd: int, prio: int | None = None, period_ms: int | None = None,
              stale_ms: int | None = None) -> None:
        """Start watching child process `pid` through `pidfd` (dup'ed; the caller keeps its own, and must not reap
        the child before the guardian has stopped or seen it gone)."""
        if self._g is None:
            raise GuardianError("guardian is closed")
        c = constants()
        rc = self._lib.pvsched_guardian_start(
            self._g, pid, pidfd, c.PVSCHED_GUARDIAN_PRIO if prio is None else prio,
            c.PVSCHED_GUARDIAN_PERIOD_MS if period_ms is None else period_ms,
            c.PVSCHED_GUARDIAN_STALE_MS if stale_ms is None else stale_ms)
        if rc < 0:
            raise GuardianError(-rc, f"guardian did not start: {os.strerror(-rc)}")

    def disarm(self) -> None:
        """Clean shutdown begins: a silent heartbeat no longer gets the policy process killed (death still restores)."""
        if self._g is not None:
            self._lib.pvsched_guardian_disarm(self._g)

    def restore(self) -> int:
        """Restore every guarded thread now, from the calling thread; how many were set (0 once closed)."""
        if self._g is None:
            return 0
        return int(self._lib.pvsched_guardian_restore(self._g))

    def stop(self) -> None:
        """Stop and join the thread (idempotent)."""
        if self._g is not None:
            self._lib.pvsched_guardian_stop(self._g)

    def info(self) -> dict[str, Any]:
        """What the thread saw and did: state, cause, priority, memory lock, restores, event times (monotonic s)."""
        if self._g is None:
            return dict(self._last or {})
        i = ffi().new("struct pvsched_guardian_info *")
        self._lib.pvsched_guardian_info(self._g, i)
        states = _names("pvsched_guardian_state", "PVSCHED_GUARDIAN_")
        causes = {**_names("pvsched_guardian_cause", "PVSCHED_GUARDIAN_CAUSE_"), 0: None}
        return {
            "state": states.get(i.state, str(i.state)), "cause": causes.get(i.cause, str(i.cause)),
            "prio": i.prio, "locked": bool(i.locked), "armed": bool(i.armed), "threads": i.nr_threads,
            "restored": i.restored, "restores": i.restores, "watched": i.watched, "errors": i.errors,
            "last_error": os.strerror(i.last_errno) if i.last_errno else None, "beats": i.beats,
            "silent_ms": i.silent_ms, "event_s": i.event_ns / 1e9 if i.event_ns else None,
            "restore_s": i.restore_ns / 1e9 if i.restore_ns else None,
        }

    def close(self) -> None:
        """Stop the thread, free its state and the heartbeat memfd (idempotent; info() keeps the last view)."""
        if self._g is None:
            return
        self.stop()
        self._last = self.info()
        self._lib.pvsched_guardian_free(self._g)
        self._g = None
