"""The actuator: applies the BPF policy's decisions to vCPU threads and writes each slot's host area.

One dedicated thread at SCHED_FIFO 40 (RT ladder: above every boosted vCPU,
<= 30, below watchdogs, >= 50) blocks in poll() on the ring buffer's epoll fd
and a stop eventfd (the GIL released); it wakes for records, and every
COUNTERS_MS to refresh the guests' counters, and never spins.  What is
periodic is a native thread's (pyvmm/policy/backstop_loop.c, same priority): the
re-read of every slot each backstop_ms, with the same BPF backstop program, so
a vCPU that never leaves its CPU has its slot re-read by the same code as
every event (its throttle is the kernel clock's job: pyvmm/policy/pvsched.bpf.c), and
the policy process's heartbeat, written while this thread keeps up.
Restoring a thread's original attributes happens here too, under one lock.
"""

from __future__ import annotations

import collections
import ctypes
import errno
import logging
import os
import select
import struct
import threading
import time
from dataclasses import dataclass, field

from pyvmm import abi
from pyvmm.common import libbpf
from pyvmm.common.procfs import is_thread_of
from pyvmm.common.sched_attr import (
    RT_POLICIES,
    SCHED_BATCH,
    SCHED_IDLE,
    SCHED_OTHER,
    SchedAttr,
    sched_getattr,
    sched_setattr,
)
from pyvmm.policy.backstop_loop import BackstopLoop
from pyvmm.policy.loader import BpfPolicy
from pyvmm.policy.policy_types import consts, enum_name
from pyvmm.policy.policy_types import ffi as pffi

log = logging.getLogger("pvsched.actuator")

SCHED_FIFO = 1
MCL_CURRENT, MCL_FUTURE = 1, 2
LATENCY_SAMPLES = 20000
# Period of the guests' counter refresh (boosted time moves without records; the rest comes with them).  Every
# wake-up of this thread runs a cold Python interpreter at SCHED_FIFO, taken from a boosted vCPU, and shows in the
# busy-host guest p99.  So it wakes for records, and for this once a second.
COUNTERS_MS = 1000

_libc = ctypes.CDLL(None, use_errno=True)


def _host_offsets() -> dict[str, int]:
    off = {name: abi.offsetof("struct pvsched_slot", "host", name)
           for name in ("seq", "state", "policy", "rt_priority", "nice", "boosts", "throttles", "boosted_ns")}
    return off


@dataclass
class VcpuHandle:
    """What the actuator knows about one vCPU thread."""

    tid: int
    vm_id: int
    vcpu_id: int
    slot: memoryview
    slot_ptr: object           # cffi pointer into `slot` (the backstop's read address)
    original: SchedAttr
    applied: SchedAttr
    state: int = 0
    gen: int = 0
    gone: bool = False
    errors: int = 0
    counters: tuple[int, int, int] = (0, 0, 0)
    pid: int = 0               # the VMM process the thread must belong to (0: not checked, unit tests)
    slot_uaddr: int = 0        # address of `slot` here: what the backstop program reads

    def __post_init__(self) -> None:
        self.slot_uaddr = int(pffi().cast("uintptr_t", self.slot_ptr))


@dataclass
class ActuatorStats:
    """Counters of the userspace side (the BPF side has its own stats map)."""

    applied: int = 0           # sched_setattr calls that changed a thread
    events: int = 0            # ring-buffer records consumed
    stale: int = 0             # records for a vCPU no longer registered, or out of order
    errors: int = 0            # sched_setattr failures
    iterations: int = 0        # wake-ups of the actuator thread
    backstop_rounds: int = 0   # rounds run from Python (set_tunables); the periodic ones are the native loop's
    rechecks: int = 0          # slot re-reads the kernel clock asked for (a vCPU running boosted, unread)
    # throttles by the event that caught them (enum pvsched_source: clock, preempt, backstop, ...)
    throttle_sources: collections.Counter = field(default_factory=collections.Counter)
    latency_ns: collections.deque = field(default_factory=lambda: collections.deque(maxlen=LATENCY_SAMPLES))

    def latency_summary(self) -> dict:
        """p50/p99/max of event-to-sched_setattr latency in microseconds."""
        lat = sorted(self.latency_ns)
        if not lat:
            return {"samples": 0}
        pick = lambda q: round(lat[min(len(lat) - 1, int(q * len(lat)))] / 1000, 1)
        return {"samples": len(lat), "p50": pick(0.50), "p99": pick(0.99), "max": round(lat[-1] / 1000, 1)}


def clamp_attr(attr: SchedAttr, original: SchedAttr) -> SchedAttr:
    """What the actuator may apply for `attr`, whatever a map or the ring buffer held.

    The thread's own attributes, OTHER/BATCH/IDLE at nice -20..19, or RR/FIFO at
    1..PVSCHED_RT_PRIO_LIMIT with the original nice; any other policy means no change.
    """
    if attr == original:
        return attr
    if attr.policy in RT_POLICIES:
        return SchedAttr(attr.policy, min(max(attr.priority, 1), consts().PVSCHED_RT_PRIO_LIMIT), original.nice)
    if attr.policy in (SCHED_OTHER, SCHED_BATCH, SCHED_IDLE):
        return SchedAttr(attr.policy, 0, min(max(attr.nice, -20), 19))
    return original


def write_host_area(slot: memoryview, state: int, attr: SchedAttr, counters: tuple[int, int, int]) -> None:
    """Publish what the host applied in the slot's host area, under the host seqcount."""
    o = _OFF
    seq = struct.unpack_from("<I", slot, o["seq"])[0]
    seq = ((seq + 1) | 1) & 0xFFFFFFFF  # odd: writing (the guest can write any seq here: wrap, never overflow)
    struct.pack_into("<I", slot, o["seq"], seq)
    struct.pack_into("<I", slot, o["state"], state)
    struct.pack_into("<i", slot, o["policy"], attr.policy)
    struct.pack_into("<I", slot, o["rt_priority"], attr.priority)
    struct.pack_into("<i", slot, o["nice"], attr.nice)
    struct.pack_into("<QQQ", slot, o["boosts"], *counters)
    struct.pack_into("<I", slot, o["seq"], (seq + 1) & 0xFFFFFFFF)


_OFF = _host_offsets()


class Actuator:
    """Ring-buffer consumer + backstop timer + sched_setattr, in one RT thread."""

    def __init__(self, policy: BpfPolicy, backstop_ms: int, realtime: bool = True):
        self.policy = policy
        self.backstop_ms = backstop_ms
        self.realtime = realtime
        self.vcpus: dict[int, VcpuHandle] = {}
        self.stats = ActuatorStats()
        self.lock = threading.Lock()
        self.thread_tid: int | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._next_refresh = 0.0
        f = libbpf.ffi()
        self._sample_cb = f.callback("int(void *, void *, size_t)", self._on_sample)
        self._rb = libbpf.check_ptr(
            libbpf.lib().ring_buffer__new(policy.maps["events"], self._sample_cb, f.NULL, f.NULL), "ring_buffer__new")
        self._wake_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._poller = select.poll()
        self._poller.register(libbpf.lib().ring_buffer__epoll_fd(self._rb), select.POLLIN)
        self._poller.register(self._wake_fd, select.POLLIN)
        self.loop = BackstopLoop(policy.programs["pvs_backstop"].fd)

    # --- registration (called from the engine's thread) ---------------------
    def register(self, h: VcpuHandle) -> None:
        """Track a vCPU; its host area starts as NORMAL with its original attributes."""
        with self.lock:
            self.vcpus[h.tid] = h
            write_host_area(h.slot, 0, h.original, (0, 0, 0))
            self._loop_vcpus()

    def unregister(self, tid: int, restore: bool = True) -> None:
        """Forget a vCPU and give its thread back its original attributes."""
        with self.lock:
            h = self.vcpus.pop(tid, None)
            if h is None:
                return
            self._loop_vcpus()
            if restore and not h.gone:
                self._restore(h)
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

    def _still_ours(self, h: VcpuHandle) -> bool:
        """True while h.tid is a thread of its VMM; else it is marked gone, under self.lock (its EXITED record may
        have been lost to a full ring buffer, and the TID may name another process's thread by now)."""
        if h.pid and not is_thread_of(h.pid, h.tid):
            if not h.gone:
                log.info("pvsched: vCPU %d (tid %d) is no longer a thread of VMM %d: left alone", h.vcpu_id, h.tid,
                         h.pid)
                h.gone = True
                self._loop_vcpus()  # the native backstop loop stops re-reading its slot too
            return False
        return True

    def _restore(self, h: VcpuHandle) -> None:
        if not self._still_ours(h):
            return
        try:
            if sched_getattr(h.tid) != h.original:
                sched_setattr(h.tid, h.original)
        except OSError as e:
            if e.errno != errno.ESRCH:
                log.warning("pvsched: restoring vCPU %d (tid %d) to %s failed: %s", h.vcpu_id, h.tid, h.original, e)
            return
        h.applied, h.state = h.original, 0
        write_host_area(h.slot, 0, h.original, h.counters)

    # --- the thread ----------------------------------------------------------
    def start(self) -> None:
        """Start the actuator thread (idempotent)."""
        if self._thread is not None:
            return
        self._stop.clear()
        try:
            os.eventfd_read(self._wake_fd)  # a previous stop's wake-up
        except BlockingIOError:
            pass
        self._thread = threading.Thread(target=self._main, name="pvsched-actuator", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the thread (woken at once through an eventfd) and with it the native backstop loop."""
        self._stop.set()
        os.eventfd_write(self._wake_fd, 1)
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def close(self) -> None:
        """Stop, restore every thread, free the ring buffer."""
        self.stop()
        self.loop.stop()  # stopped with the thread; again here in case that join timed out
        self.restore_all()
        self.loop.close()
        if self._rb is not None:
            libbpf.lib().ring_buffer__free(self._rb)
            self._rb = None
            os.close(self._wake_fd)

    def _go_realtime(self) -> None:
        self.thread_tid = threading.get_native_id()
        if not self.realtime:
            return
        if _libc.mlockall(MCL_CURRENT | MCL_FUTURE) != 0:
            log.warning("pvsched: mlockall failed: %s (need CAP_IPC_LOCK)", os.strerror(ctypes.get_errno()))
        try:
            sched_setattr(0, SchedAttr(SCHED_FIFO, consts().PVSCHED_ACTUATOR_PRIO, 0))
        except OSError as e:
            log.warning("pvsched: actuator stays SCHED_OTHER: %s (need CAP_SYS_NICE)", e)

    def _main(self) -> None:
        self._go_realtime()  # first: mlockall covers the native loop's stack too
        self.loop.start(self.backstop_ms, consts().PVSCHED_ACTUATOR_PRIO if self.realtime else 0)
        try:
            while not self._stop.is_set():
                try:
                    self._iteration()
                except Exception:  # the thread must outlive any bad input: it applies the throttle
                    self.stats.errors += 1
                    log.exception("pvsched: actuator iteration failed; continuing")
                    self._stop.wait(0.1)  # never spin on a repeating error
        finally:
            self.loop.stop()

    def _iteration(self) -> None:
        """Consume the ring buffer; refresh the guests' counters every COUNTERS_MS; block until either is due."""
        self.stats.iterations += 1
        rc = libbpf.lib().ring_buffer__consume(self._rb)
        if rc < 0:
            log.error("pvsched: ring buffer consume failed: %s", os.strerror(-rc))
            self._stop.wait(0.1)  # never spin on a broken ring buffer
        now = time.monotonic()
        if now >= self._next_refresh:
            self.refresh_counters()
            self._next_refresh = now + COUNTERS_MS / 1000
        self._poller.poll(max(1, int((self._next_refresh - time.monotonic()) * 1000 + 0.999)))  # GIL released

    def join(self) -> None:
        """Block until the actuator thread ends: when stopped, or broken (a watcher's wait)."""
        t = self._thread
        if t is not None:
            t.join()

    @property
    def alive(self) -> bool:
        """True while the actuator thread runs."""
        return self._thread is not None and self._thread.is_alive()

    def set_backstop_ms(self, ms: int) -> None:
        """A new period for the native backstop loop, in effect at once."""
        self.backstop_ms = ms
        self.loop.set_period(ms)

    def backstop_round(self, reason: int = 0) -> None:
        """Run the BPF backstop for every vCPU now (with `reason` forced), then refresh the guests' counters."""
        self.stats.backstop_rounds += 1
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
        """Copy each vCPU's boosts, throttles and boosted time into its host area, where they changed.

        They are feedback for the guest: COUNTERS_MS old is fine (records carry them too), and each refresh is a
        map lookup per vCPU.  This thread preempts the vCPUs it serves (SCHED_FIFO 40), so it wakes rarely."""
        with self.lock:
            handles = list(self.vcpus.values())
        for h in handles:
            if h.gone:
                continue
            v = self.policy.vcpu(h.tid)
            if v is not None:
                counters = (v.boosts, v.throttles, v.boosted_ns)
                with self.lock:
                    if counters != h.counters and h.tid in self.vcpus:
                        h.counters = counters
                        write_host_area(h.slot, h.state, h.applied, counters)

    def _recheck(self, tid: int) -> None:
        """Read one vCPU's slot now (the clock asked): its result is posted like any other event's."""
        h = self.vcpus.get(tid)
        if h is None or h.gone:
            self.stats.stale += 1
            return
        self.stats.rechecks += 1
        try:
            self.policy.backstop(h.tid, h.slot_uaddr, 0)
        except OSError as e:
            log.warning("pvsched: re-reading the slot of tid %d failed: %s", h.tid, e)

    def _on_sample(self, _ctx, data, size) -> int:
        try:
            self._apply(pffi().cast("struct pvsched_event *", data))
        except Exception:  # a callback must not raise into C; log and keep consuming
            log.exception("pvsched: applying an event failed")
        return 0

    def _apply(self, ev) -> None:
        self.stats.events += 1
        if ev.kind == consts().PVSCHED_EV_RECHECK:
            self._recheck(ev.tid)
            return
        tid = ev.tid
        with self.lock:
            h = self.vcpus.get(tid)
            if h is None or h.gone or ev.gen and ev.gen <= h.gen:
                self.stats.stale += 1
                return
            if ev.kind == consts().PVSCHED_EV_EXITED:
                h.gone = True
                self._loop_vcpus()
                self.policy.remove_vcpu(tid, h.vcpu_id)
                log.info("pvsched: vCPU %d (tid %d) exited", h.vcpu_id, tid)
                return
            h.gen = ev.gen
            if ev.reason == consts().PVSCHED_REASON_THROTTLE:
                self.stats.throttle_sources[enum_name("pvsched_source", ev.source)] += 1
            attr = clamp_attr(SchedAttr(ev.params.policy, ev.params.rt_priority, ev.params.nice), h.original)
            if attr != h.applied:
                if not self._still_ours(h):
                    self.stats.stale += 1
                    return
                try:
                    sched_setattr(tid, attr)
                except OSError as e:
                    self.stats.errors += 1
                    if e.errno == errno.ESRCH:
                        h.gone = True
                    elif h.errors == 0:
                        log.warning("pvsched: sched_setattr(%d, %s) failed: %s", tid, attr, e)
                    h.errors += 1
                    return
                self.stats.applied += 1
                self.stats.latency_ns.append(time.monotonic_ns() - ev.ts_ns)
                h.applied = attr
            h.state = ev.state
            h.counters = (ev.boosts, ev.throttles, ev.boosted_ns)
            write_host_area(h.slot, h.state, h.applied, h.counters)
