"""The actuator: applies the BPF policy's decisions to vCPU threads and writes each slot's host area.

The work is native (pyvmm/policy/actuator_loop.c): one thread at SCHED_FIFO 40 (RT ladder: above every
boosted vCPU, <= 30, below watchdogs, >= 50) waits in poll() on the ring buffer, and for each record clamps,
checks the TID, calls sched_setattr and publishes the result in the slot's host area; once a second it
copies the guests' counters.  It locks only what it touches (its state, its stack, the code of the
policy's native libraries and libc, the slots), not the Python process.  What is periodic is another native
thread's (pyvmm/policy/backstop_loop.c, same priority): the re-read of every slot each backstop_ms, and the
policy process's heartbeat, written while the actuator keeps up.

Python keeps what is rare and slow: registration, restoring a thread on request, and a watcher thread
(blocked until the native loop tells it something) that logs a vCPU the native loop gave up on (it exited,
or its TID left the VMM) and forgets its map entry.  No Python runs on the RT path, so no GIL is taken
there; the Python threads run at FIFO 35 only so that a killed process exits at once (engine.start).
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import select
import threading
from dataclasses import dataclass
from typing import Any

import cffi

from pyvmm.common import native
from pyvmm.common.sched_attr import SchedAttr
from pyvmm.policy.backstop_loop import BackstopLoop
from pyvmm.policy.loader import BpfPolicy
from pyvmm.policy.policy_types import consts, enum_name
from pyvmm.policy.policy_types import ffi as pffi

log = logging.getLogger("pvsched.actuator")

_GONE_WHY = {1: "exited", 2: "is no longer a thread of its VMM: left alone", 3: "is gone (ESRCH)"}


class ActuatorError(OSError):
    """The actuator library is missing, or its thread could not start."""


@functools.cache
def ffi() -> cffi.FFI:
    """The actuator loop's API (actuator_loop.h's build-time cdef)."""
    return native.ffi("actuator")


@functools.cache
def _lib() -> Any:
    try:
        return native.dlopen("actuator", ffi())
    except native.NativeError as e:
        raise ActuatorError(str(e)) from None


@dataclass
class VcpuHandle:
    """What Python knows about one vCPU thread (what it applied is the native loop's: Actuator.vcpu_state)."""

    tid: int
    vm_id: int
    vcpu_id: int
    slot: memoryview
    slot_ptr: object           # cffi pointer into `slot` (the backstop's read address)
    original: SchedAttr
    pid: int = 0               # the VMM process the thread must belong to (0: not checked, unit tests)
    gone: bool = False         # the native loop gave up on it (the watcher saw it)
    slot_uaddr: int = 0        # address of `slot` here: what the backstop program reads

    def __post_init__(self) -> None:
        self.slot_uaddr = int(pffi().cast("uintptr_t", self.slot_ptr))


def clamp_attr(attr: SchedAttr, original: SchedAttr) -> SchedAttr:
    """What the actuator may apply for `attr`, whatever a map or the ring buffer held (the native loop's rule).

    The thread's own attributes, OTHER/BATCH/IDLE at nice -20..19, or RR/FIFO at
    1..PVSCHED_RT_PRIO_LIMIT with the original nice; any other policy means no change.
    """
    f = ffi()
    out = f.new("int32_t[3]")
    _lib().pvsched_actuator_clamp([attr.policy, attr.priority, attr.nice],
                                  [original.policy, original.priority, original.nice], out)
    return SchedAttr(out[0], out[1], out[2])


def latency_summary(samples: list[int]) -> dict:
    """p50/p99/max of event-to-sched_setattr latency in microseconds."""
    lat = sorted(samples)
    if not lat:
        return {"samples": 0}
    pick = lambda q: round(lat[min(len(lat) - 1, int(q * len(lat)))] / 1000, 1)
    return {"samples": len(lat), "p50": pick(0.50), "p99": pick(0.99), "max": round(lat[-1] / 1000, 1)}


class Actuator:
    """The native actuator loop and the backstop loop, registered vCPUs, and the Python watcher thread."""

    def __init__(self, policy: BpfPolicy, backstop_ms: int, realtime: bool = True):
        self.policy = policy
        self.backstop_ms = backstop_ms
        self.realtime = realtime
        self.vcpus: dict[int, VcpuHandle] = {}
        self.lock = threading.Lock()  # self.vcpus, and the backstop loop's list
        self.backstop_rounds = 0      # rounds run from Python (set_tunables); the periodic ones are the loop's
        self._lib = _lib()
        err = ffi().new("int *")
        self._loop = self._lib.pvsched_actuator_loop_new(policy.maps["events"], policy.programs["pvs_backstop"].fd,
                                                         policy.maps["vcpus"], err)
        if self._loop == ffi().NULL:
            raise ActuatorError(err[0], f"actuator loop: {os.strerror(err[0])}")
        self._stop = threading.Event()
        self._wake_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self.ended_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)  # readable once the watcher has ended
        self._thread: threading.Thread | None = None
        self._errors_logged = 0
        self._last_info: dict[str, int] = {}
        self.loop = BackstopLoop(policy.programs["pvs_backstop"].fd)

    # --- registration (called from the engine's thread) ---------------------
    def register(self, h: VcpuHandle) -> None:
        """Track a vCPU; its host area starts as NORMAL with its original attributes."""
        o = h.original
        with self.lock:
            rc = self._lib.pvsched_actuator_loop_add(self._loop, h.tid, h.pid, h.slot_uaddr, o.policy, o.priority,
                                                     o.nice)
            if rc < 0:
                raise ActuatorError(-rc, f"actuator: vCPU thread {h.tid}: {os.strerror(-rc)}")
            self.vcpus[h.tid] = h
            self._loop_vcpus()

    def unregister(self, tid: int, restore: bool = True) -> None:
        """Forget a vCPU and give its thread back its original attributes."""
        with self.lock:
            h = self.vcpus.pop(tid, None)
            if h is None:
                return
            self._loop_vcpus()
            rc = self._lib.pvsched_actuator_loop_remove(self._loop, tid, int(restore))
            if rc < 0 and rc != -errno.ESRCH:
                log.warning("pvsched: restoring vCPU %d (tid %d) to %s failed: %s", h.vcpu_id, tid, h.original,
                            os.strerror(-rc))
            try:
                pffi().release(h.slot_ptr)
            except (ValueError, TypeError):
                pass
            h.slot.release()

    def _loop_vcpus(self) -> None:
        """Hand the native backstop loop the vCPUs it re-reads (under self.lock)."""
        self.loop.set_vcpus([(h.tid, h.slot_uaddr) for h in self.vcpus.values() if not h.gone])

    def restore_all(self) -> None:
        """Every registered thread back to its original attributes (the single cleanup path)."""
        for tid in list(self.vcpus):
            self.unregister(tid, restore=True)

    def vcpu_state(self, tid: int) -> dict[str, Any] | None:
        """What the native loop last applied to `tid`: attributes, host state, gen, errors, gone."""
        out = ffi().new("struct pvsched_actuator_vcpu *")
        if self._loop is None or self._lib.pvsched_actuator_loop_vcpu(self._loop, tid, out) < 0:
            return None
        return {"applied": SchedAttr(out.policy, out.priority, out.nice), "state": out.state, "gen": out.gen,
                "errors": out.errors, "gone": bool(out.gone)}

    # --- the threads ---------------------------------------------------------
    def start(self) -> None:
        """Start the native actuator and backstop loops and the watcher (idempotent)."""
        if self._thread is not None:
            return
        self._stop.clear()
        for fd in (self._wake_fd, self.ended_fd):  # a previous stop's
            try:
                os.eventfd_read(fd)
            except BlockingIOError:
                pass
        prio = consts().PVSCHED_ACTUATOR_PRIO if self.realtime else 0
        rc = self._lib.pvsched_actuator_loop_start(self._loop, prio)
        if rc < 0:
            raise ActuatorError(-rc, f"starting the actuator loop: {os.strerror(-rc)}")
        self.loop.start(self.backstop_ms, prio)
        if self.realtime and self.info()["prio"] == 0:
            log.warning("pvsched: the actuator stays SCHED_OTHER (need CAP_SYS_NICE)")
        self._thread = threading.Thread(target=self._watch, name="pvsched-actuator-watch", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the watcher and both native loops."""
        self._stop.set()
        os.eventfd_write(self._wake_fd, 1)
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        self._stop_native()

    def _stop_native(self) -> None:
        if self._loop is not None:
            self._lib.pvsched_actuator_loop_stop(self._loop)
        self.loop.stop()

    def close(self) -> None:
        """Stop, restore every thread, free both loops."""
        self.stop()
        self.restore_all()
        self.loop.close()
        if self._loop is not None:
            self._last_info = self.info()
            self._lib.pvsched_actuator_loop_free(self._loop)
            self._loop = None
            os.close(self._wake_fd)
            os.close(self.ended_fd)

    def _watch(self) -> None:
        """The watcher: wakes only when the native loop gave up on a vCPU, failed a sched_setattr or ended (its
        notify eventfd) or on stop(); ends, stopping both loops (so the heartbeat stops), when the loop ended."""
        poller = select.poll()
        poller.register(self._lib.pvsched_actuator_loop_notify_fd(self._loop), select.POLLIN)
        poller.register(self._wake_fd, select.POLLIN)
        try:
            while not self._stop.is_set():
                try:
                    if not self._watch_once():
                        break
                except Exception:  # a log line or a map entry must not end the actuator
                    log.exception("pvsched: the actuator's watcher failed; continuing")
                poller.poll()
        finally:
            self._stop_native()
            os.eventfd_write(self.ended_fd, 1)

    def _watch_once(self) -> bool:
        """Log and forget what the native loop gave up on; False once that loop has stopped by itself."""
        f = ffi()
        gone = f.new("struct pvsched_actuator_gone[16]")
        while (n := self._lib.pvsched_actuator_loop_gone(self._loop, gone, 16)) > 0:
            for g in gone[0:n]:
                self._forget(g.tid, g.why)
        info = self.info()
        if info["errors"] > self._errors_logged:
            log.warning("pvsched: sched_setattr failed %d times (the last: %s)", info["errors"],
                        os.strerror(info["last_errno"]) if info["last_errno"] else "ESRCH")
            self._errors_logged = info["errors"]
        if not info["running"] and not self._stop.is_set():
            log.error("pvsched: the native actuator loop stopped")
            return False
        return True

    def _forget(self, tid: int, why: int) -> None:
        with self.lock:
            h = self.vcpus.get(tid)
            if h is None or h.gone:
                return
            h.gone = True
            self._loop_vcpus()  # the native backstop loop stops re-reading its slot too
        if why == 1:  # exited: the programs stop posting for it
            self.policy.remove_vcpu(tid, h.vcpu_id)
        log.info("pvsched: vCPU %d (tid %d) %s", h.vcpu_id, tid, _GONE_WHY.get(why, "is gone"))

    @property
    def alive(self) -> bool:
        """True while the watcher and the native actuator loop run."""
        return self._thread is not None and self._thread.is_alive() and bool(self.info()["running"])

    def info(self) -> dict[str, Any]:
        """The native loop's counters (actuator_loop.h's struct, field by field) and throttles by source."""
        if self._loop is None:
            return dict(self._last_info)
        out = ffi().new("struct pvsched_actuator_loop_info *")
        self._lib.pvsched_actuator_loop_info(self._loop, out)
        d: dict[str, Any] = {k: int(getattr(out, k)) for k, _ in ffi().typeof("struct pvsched_actuator_loop_info").fields
                             if k != "throttles"}
        d["throttle_sources"] = {enum_name("pvsched_source", i): int(out.throttles[i])
                                 for i in range(len(out.throttles)) if out.throttles[i]}
        return d

    def latency_us(self) -> dict:
        """p50/p99/max of the last event-to-sched_setattr latencies, in microseconds."""
        if self._loop is None:
            return {"samples": 0}
        f = ffi()
        n_max = self._lib.PVSCHED_ACTUATOR_LATENCY_SAMPLES
        buf = f.new("uint64_t[]", n_max)
        n = self._lib.pvsched_actuator_loop_latencies(self._loop, buf, n_max)
        return latency_summary(list(buf[0:n]))

    def set_backstop_ms(self, ms: int) -> None:
        """A new period for the native backstop loop, in effect at once."""
        self.backstop_ms = ms
        self.loop.set_period(ms)

    def backstop_round(self, reason: int = 0) -> None:
        """Run the BPF backstop for every vCPU now (with `reason` forced), then refresh the guests' counters."""
        self.backstop_rounds += 1
        with self.lock:
            handles = list(self.vcpus.values())
        for h in handles:
            if h.gone:
                continue
            try:
                self.policy.backstop(h.tid, h.slot_uaddr, reason)
            except OSError as e:
                log.warning("pvsched: backstop for tid %d failed: %s", h.tid, e)
        self.refresh_counters()

    def refresh_counters(self) -> None:
        """Copy each vCPU's boosts, throttles and boosted time into its host area now (the loop does it each second)."""
        if self._loop is not None:
            self._lib.pvsched_actuator_loop_refresh(self._loop)

