"""PolicyEngine: the BPF policy for one VMM, as the policy process (pyvmm/policy/process.py) drives it.

    engine = PolicyEngine(vmm_pid, {"boost_prio": "8"})   # open, tunables, load, attach, pin
    engine.add_vcpu(vm_id, vcpu_id, tid, slot_hva, slot_view, original)
    await engine.run()                                      # actuator + backstop until cancelled
    engine.close()                                          # restore threads, detach, unpin

Needs CAP_BPF, CAP_PERFMON (load/attach tracing programs, read user memory),
CAP_SYS_NICE (sched_setattr on the VMM's threads, the actuator at FIFO 40),
CAP_IPC_LOCK (the native RT threads lock what they touch); CAP_SYS_ADMIN only while loading on a kernel whose
KVM is a module (libbpf finds module BTF by iterating BTF objects, which
needs it) and to join programs another VM loaded (taken by ID): the policy
process constructs the engine before dropping it, and runs it after.  Per-program run time needs BPF
stats enabled: pass `stats_fd` from `enable_bpf_stats()` called before the
sandbox, or have kernel.bpf_stats_enabled=1; otherwise it shows 'unavailable'.
"""

from __future__ import annotations

import errno
import logging
import os
import time
from pathlib import Path
from typing import Self

from pyvmm.abi.slots import policy_name
from pyvmm.common import libbpf
from pyvmm.common.pins import PIN_ROOT, remove_stale_pins
from pyvmm.common.procfs import is_thread_of
from pyvmm.common.sched_attr import SCHED_FIFO, SCHED_RR, SchedAttr, sched_getattr, sched_setattr
from pyvmm.policy import programs
from pyvmm.policy.actuator import Actuator, VcpuHandle
from pyvmm.policy.heartbeat import Heartbeat
from pyvmm.policy.loader import BpfPolicy, enable_stats, stats_enabled
from pyvmm.policy.policy_types import consts, enum_name, stat_descriptions
from pyvmm.policy.policy_types import ffi as pffi
from pyvmm.policy.tunables import DESCRIPTIONS, TunableError, parse

__all__ = ["PolicyEngine", "TunableError", "enable_bpf_stats", "remove_stale_pins"]

log = logging.getLogger("pvsched.engine")

# What a vCPU thread keeps across unregister/register: its throttle window, its throttle, its counters.
CARRIED_FIELDS = ("window_start_ns", "window_boosted_ns", "throttle_until_ns", "boosts", "throttles", "boosted_ns",
                  "boosted_wall_ns", "gen")


def enable_bpf_stats() -> int:
    """Turn BPF run-time stats on for as long as the returned fd is open (CAP_SYS_ADMIN; before sandboxing)."""
    return enable_stats()


def _attr_dict(a: SchedAttr) -> dict:
    return {"policy": policy_name(a.policy), "priority": a.priority, "nice": a.nice}


class PolicyEngine:
    """The BPF policy of one VMM: maps, programs, actuator; restores everything it changed on close()."""

    def __init__(self, vmm_pid: int, tunables: dict[str, str] | None = None, pin_root: str = PIN_ROOT,
                 *, stats_fd: int | None = None, realtime: bool = True, program: str = programs.DEFAULT):
        if vmm_pid <= 0:
            raise ValueError(f"vmm_pid {vmm_pid} is not a process id")
        self.vmm_pid = vmm_pid
        self.program = program
        self.tunables = parse(tunables)
        self.pin_root = Path(pin_root)
        self._stats_fd = stats_fd
        self._realtime = realtime
        self._own_stats_fd: int | None = None
        self._closed = False
        self._policy: BpfPolicy | None = None
        self._actuator: Actuator | None = None
        self._caller: SchedAttr | bool | None = None  # start()'s thread as it was (False: left unchanged)
        # Budget and throttle state of unregistered vCPU threads, by TID, for this VMM's whole life: a
        # guest that re-registers (CONTROL DISABLE + ENABLE) gets back the window it had, not a fresh one.
        self._carried: dict[int, dict[str, int]] = {}
        if not stats_enabled() and stats_fd is None:
            try:
                self._own_stats_fd = enable_stats()
            except libbpf.LibbpfError:
                pass  # no CAP_SYS_ADMIN: program run time is reported as unavailable
        _require_bpffs(self.pin_root)
        remove_stale_pins(str(self.pin_root))
        self._policy = BpfPolicy(programs.object_path(program), vmm_pid,
                                 self.pin_root / str(vmm_pid))
        try:
            self._policy.open_load_attach(self.tunables)
            self._actuator = Actuator(self._policy, self.tunables.backstop_ms, realtime=realtime)
        except BaseException:
            self.close()
            raise
        log.info("pvsched: policy loaded for VMM %d, maps pinned in %s", vmm_pid, self._policy.pin_dir)

    @property
    def pin_dir(self) -> Path:
        """Where this engine's maps are pinned (bpftool map show pinned <dir>/vcpus)."""
        return self.pin_root / str(self.vmm_pid)

    def warm_up(self) -> None:
        """Read now what is read from the file system only once and then cached (libbpf's count of
        possible CPUs, from /sys), so that the engine works in a root that holds no /sys."""
        self._policy.stats()

    # --- vCPUs -------------------------------------------------------------------
    def add_vcpu(self, vm_id: int, vcpu_id: int, tid: int, slot_hva: int, slot: memoryview,
                 original: SchedAttr, features: int = 0) -> None:
        """Register a vCPU thread of the VMM: BPF reads its slot at slot_hva, the actuator uses `slot`.

        `features` are the guest's negotiated pvsched features (F_RT_WAITER changes the halt boost)."""
        slot_size = consts().PVSCHED_SLOT_SIZE
        if len(slot) < slot_size:
            raise ValueError(f"slot view of vCPU {vcpu_id} is {len(slot)} bytes, expected {slot_size}")
        if tid in self._actuator.vcpus:
            raise ValueError(f"vCPU thread {tid} is already registered")
        if not Path(f"/proc/{self.vmm_pid}/task/{tid}").exists():
            raise ValueError(f"thread {tid} is not a thread of VMM {self.vmm_pid}")
        f = pffi()
        v = f.new("struct pvsched_vcpu *")
        v.vm_id, v.vcpu_id, v.slot_hva, v.features = vm_id, vcpu_id, slot_hva, features
        v.orig.policy, v.orig.rt_priority, v.orig.nice = original.policy, original.priority, original.nice
        v.posted = v.orig
        if _thread_running(self.vmm_pid, tid):
            v.running, v.run_start_ns = 1, time.monotonic_ns()  # same clock as bpf_ktime_get_ns
        carried = self._carried.pop(tid, None)
        if carried is not None:
            for name, value in carried.items():
                setattr(v, name, value)
            if v.throttle_until_ns > time.monotonic_ns():
                v.state = consts().PVSCHED_STATE_THROTTLED  # still serving its throttle: no boost before its end
        view = memoryview(slot).cast("B")[:slot_size]
        ptr = f.from_buffer(view, require_writable=True)
        h = VcpuHandle(tid=tid, vm_id=vm_id, vcpu_id=vcpu_id, slot=view, slot_ptr=ptr,
                       original=original, pid=self.vmm_pid)
        self._actuator.register(h)
        try:
            self._policy.add_vcpu(tid, v)
        except OSError:
            self._actuator.unregister(tid, restore=False)
            raise

    def remove_vcpu(self, tid: int) -> None:
        """Unregister a vCPU thread and restore its original attributes."""
        h = self._actuator.vcpus.get(tid) if self._actuator else None
        if h is None:
            return
        v = self._policy.vcpu(tid)
        if v is not None and not h.gone:
            self._carried[tid] = {name: getattr(v, name) for name in CARRIED_FIELDS}
            # Bounded: only TIDs that are still threads of the VMM (an ended thread's TID may come back).
            for old in [t for t in self._carried if not is_thread_of(self.vmm_pid, t)]:
                del self._carried[old]
        self._policy.remove_vcpu(tid, h.vcpu_id)
        self._actuator.unregister(tid, restore=True)

    # --- tunables ----------------------------------------------------------------
    def set_tunables(self, values: dict[str, str]) -> dict[str, str]:
        """Validate and apply at run time (all or nothing); every vCPU is re-evaluated at once."""
        t = parse(values, base=self.tunables.as_strings())
        self._policy.set_tunables(t)
        self._policy.start_clock()  # a new clock_ms takes effect now, not after the old period
        self.tunables = t
        self._actuator.set_backstop_ms(t.backstop_ms)
        self._actuator.backstop_round(reason=consts().PVSCHED_REASON_TUNABLES)
        return t.as_strings()

    def set_heartbeat(self, heartbeat: Heartbeat | None) -> None:
        """Beat `heartbeat` (the VMM guardian's) at least every 100 ms while the actuator keeps up; None: stop.

        The native backstop loop beats, so Python never wakes just to say it lives; it withholds the beat when
        a ring-buffer record has waited 100 ms (pyvmm/policy/backstop_loop.c), so a stuck actuator is still seen."""
        if heartbeat is None:
            self._actuator.loop.set_heartbeat(0, -1)
        else:
            self._actuator.loop.set_heartbeat(heartbeat.address, self._policy.maps["events"])

    # --- running -----------------------------------------------------------------
    def start(self) -> None:
        """Start the actuator (its native loops and their Python watcher); with `realtime`, raise this thread.

        No Python is on the RT path: the native threads never take the GIL.  With `realtime`, the calling
        thread still runs at SCHED_FIFO CALLER_PRIO until stop(), and so do the threads it starts (the
        watcher): a killed policy process is gone only once each of its threads has run its exit, and a
        SCHED_OTHER one waits behind boosted vCPUs on every CPU, so the VMM's guardian would restore only
        when the heartbeat goes stale (250 ms, measured) instead of at the death.  They only ever block.
        """
        if self._caller is None:
            self._caller = _raise_caller(self._realtime) or False
        self._actuator.start()

    def ended_fd(self) -> int:
        """An fd readable once the actuator has ended (stopped, or its native loop died: then fail loudly)."""
        return self._actuator.ended_fd

    def stop(self) -> None:
        """Stop the actuator and put the thread that called start() back as it was (call it from there)."""
        self._actuator.stop()
        self._restore_caller()

    def _restore_caller(self) -> None:
        if self._caller:
            sched_setattr(0, self._caller)
        self._caller = None

    async def run(self) -> None:
        """start(), then wait until cancelled (a trio task, for callers that run a loop); stop() on the way out.

        It waits on ended_fd(), as serve() does, so it does not wake while all is well.  A dead actuator also
        stops the heartbeat, so the VMM's guardian restores the threads even if this wakes late.
        """
        import trio  # here, not at the top: the policy process serves without trio (serve() in process.py)

        self.start()
        try:
            await trio.lowlevel.wait_readable(self.ended_fd())
            raise RuntimeError("pvsched: the actuator thread died")  # fail loudly: the VMM restores the threads
        finally:
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(self._actuator.stop)
            self._restore_caller()

    def close(self) -> None:
        """Restore every thread, detach every program, unpin and remove the pin directory; idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            if self._actuator is not None:
                self._actuator.close()
        finally:
            if self._policy is not None:
                self._policy.close()
            if self._own_stats_fd is not None:
                os.close(self._own_stats_fd)
                self._own_stats_fd = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- introspection -----------------------------------------------------------
    def show(self) -> dict:
        """Per-vCPU state, stats with descriptions, tunables, per-program run time, actuator latency."""
        vcpus = []
        for tid, h in sorted(self._actuator.vcpus.items(), key=lambda kv: (kv[1].vm_id, kv[1].vcpu_id)):
            native = self._actuator.vcpu_state(tid)
            row = {"tid": tid, "vm": h.vm_id, "vcpu": h.vcpu_id,
                   "applied": _attr_dict(native["applied"] if native else h.original),
                   "original": _attr_dict(h.original), "gone": h.gone or bool(native and native["gone"])}
            try:
                row["observed"] = _attr_dict(sched_getattr(tid))
            except OSError:
                row["observed"] = None
            v = self._policy.vcpu(tid)
            if v is not None:
                row.update(
                    state=enum_name("pvsched_host_state", v.state), reason=enum_name("pvsched_reason", v.reason),
                    halted=bool(v.halted), hold=bool(v.hold), boosts=v.boosts, throttles=v.throttles,
                    boosted_ms=round(v.boosted_ns / 1e6, 3), window_boosted_ms=round(v.window_boosted_ns / 1e6, 3),
                    boosted_wall_ms=round(v.boosted_wall_ns / 1e6, 3),
                    changes=v.gen,
                    slot={"flags": v.last_slot.flags, "policy": v.last_slot.policy,
                          "rt_priority": v.last_slot.rt_priority, "nice": v.last_slot.nice,
                          "wake_hint": v.last_slot.wake_hint},
                )
            vcpus.append(row)
        counts = self._policy.stats()
        desc = stat_descriptions()
        stats = {k: {"value": counts.get(k, 0), "description": d} for k, d in desc.items()}
        progs = self._policy.program_stats()
        # the sysctl does not show an fd-held enable: any of the three counts
        enabled = stats_enabled() or self._stats_fd is not None or self._own_stats_fd is not None
        if not enabled:
            for p in progs:
                for k in ("run_cnt", "run_time_ns", "avg_ns"):
                    if k in p:
                        p[k] = "unavailable"
        tun = self.tunables.as_strings()
        window, vm_ns = self._policy.vm_budget()
        now_window = time.monotonic_ns() // (self.tunables.throttle_window_ms * 1_000_000)
        a = self._actuator.info()
        loop = self._actuator.loop.info()
        out = {
            "vmm_pid": self.vmm_pid,
            "program": self.program,
            "shared": self._policy.shared,  # True: the host's programs were loaded by another VM's policy process
            "pin_dir": str(self.pin_dir),
            "vcpus": vcpus,
            "stats": stats,
            "tunables": {k: {"value": v, "description": DESCRIPTIONS[k]} for k, v in tun.items()},
            "vm_budget": {"budget_ms": self.tunables.vm_boost_budget_ns() / 1e6, "host_cpus": os.cpu_count(),
                          "window_boosted_ms": round(vm_ns / 1e6, 3) if window == now_window else 0.0},
            "host_budget": self._policy.host_budget(),
            "programs": progs,
            "prog_stats": "enabled" if enabled else "unavailable (BPF stats off: needs CAP_SYS_ADMIN or a stats fd)",
            "actuator": {"tid": a.get("tid"), "prio": a.get("prio"), "events": a.get("events"),
                         "applied": a.get("applied"), "errors": a.get("errors"), "stale": a.get("stale"),
                         "wakeups": a.get("wakeups"), "rechecks": a.get("rechecks"),
                         "backstop_rounds": loop["rounds"] + self._actuator.backstop_rounds,
                         "throttle_sources": a.get("throttle_sources", {}),
                         "locked_kib": (a.get("locked_bytes") or 0) // 1024,
                         "backstop_loop": loop,
                         "latency_us": self._actuator.latency_us()},
        }
        out["text"] = format_show(out)
        return out


CALLER_PRIO = consts().PVSCHED_CALLER_PRIO  # RT ladder (pvsched_abi.h): above every boost, below the actuator


def _raise_caller(realtime: bool) -> SchedAttr | None:
    """Put the calling thread at SCHED_FIFO CALLER_PRIO; its previous attributes, or None if unchanged."""
    if not realtime:
        return None
    try:
        before = sched_getattr(0)
        if before.policy in (SCHED_FIFO, SCHED_RR) and before.priority >= CALLER_PRIO:
            return None
        sched_setattr(0, SchedAttr(SCHED_FIFO, CALLER_PRIO, before.nice))
        return before
    except OSError as e:
        log.warning("pvsched: policy thread stays %s: %s (need CAP_SYS_NICE)", "unchanged", e)
        return None


def _require_bpffs(pin_root: Path) -> None:
    """Refuse early, with the fix in the message, when pin_root is not on a mounted bpffs."""
    try:
        mounts = [line.split() for line in Path("/proc/mounts").read_text().splitlines()]
    except OSError:
        return  # cannot tell: pinning will say
    bpf_mounts = [m[1] for m in mounts if len(m) > 2 and m[2] == "bpf"]
    if not any(str(pin_root) == m or str(pin_root).startswith(m.rstrip("/") + "/") for m in bpf_mounts):
        raise OSError(errno.ENOENT, f"{pin_root} is not on a mounted bpffs (mount -t bpf bpf /sys/fs/bpf)")


def _thread_running(pid: int, tid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/task/{tid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] == "R"


def format_show(d: dict) -> str:
    """Human-readable `policy show` text."""
    lines = [f"pvsched policy for VMM {d['vmm_pid']} (maps pinned in {d['pin_dir']})", "vCPUs:"]
    for v in d["vcpus"]:
        obs = v.get("observed")
        o = f"{obs['policy']}:{obs['priority']}/nice {obs['nice']}" if obs else "gone"
        lines.append(f"  vm {v['vm']} vcpu {v['vcpu']} tid {v['tid']}: {v.get('state', '?')} ({v.get('reason', '?')}),"
                     f" thread {o}, boosts {v.get('boosts', 0)}, throttles {v.get('throttles', 0)},"
                     f" boosted {v.get('boosted_ms', 0)} ms run ({v.get('boosted_wall_ms', 0)} ms wall)")
    lines.append("tunables:")
    lines += [f"  {k} = {t['value']}    # {t['description']}" for k, t in d["tunables"].items()]
    b = d["vm_budget"]
    lines.append(f"VM budget: {b['window_boosted_ms']} of {b['budget_ms']} ms boosted in this window "
                 f"(all vCPUs, {b['host_cpus']} host CPUs)")
    if h := d.get("host_budget"):
        lines.append(f"host budget: {h['share_pct']}% of all CPUs, {h['budget_ms']} ms per {h['window_ms']} ms window "
                     "(every VM's boosted vCPUs together; pyvmm host-budget sets it)")
    lines.append("stats:")
    lines += [f"  {k:<18} {s['value']:>10}  {s['description']}" for k, s in d["stats"].items()]
    whose = "shared with the host's other VMs" if d.get("shared") else "loaded by this VM, shared with later ones"
    lines.append(f"programs, one set per host ({whose}; {d['prog_stats']}; run time is all VMs'):")
    for p in d["programs"]:
        avg = p.get("avg_ns")
        lines.append(f"  {p['name']:<16} {p['status']:<10} runs {p.get('run_cnt', '-')}, avg ns "
                     f"{'-' if avg is None else avg}")
    a = d["actuator"]
    lines.append(f"actuator: events {a['events']}, applied {a['applied']}, errors {a['errors']},"
                 f" latency {a['latency_us']}, wake-ups {a['wakeups']}, rechecks {a['rechecks']},"
                 f" {'SCHED_FIFO ' + str(a['prio']) if a['prio'] else 'SCHED_OTHER'}, {a['locked_kib']} KiB locked")
    b = a["backstop_loop"]
    lines.append(f"backstop loop: rounds {b['rounds']} over {b['nr_vcpus']} vCPUs, late {b['late']},"
                 f" longest {b['max_round_ns'] / 1000:.1f} us, errors {b['errors']}, heartbeats {b['beats']}"
                 f" (withheld {b['withheld']}),"
                 f" {'SCHED_FIFO ' + str(b['prio']) if b['prio'] else 'SCHED_OTHER'}")
    return "\n".join(lines)
