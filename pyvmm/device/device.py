"""The pvsched PCI device: BAR0 negotiation, GPA to HVA, and the supervised policy process.

Register map and status codes: shared DESIGN.md, "BAR0" (constants from pvsched_abi.h).
The guest negotiates version and features, hands over the GPA and size of its shared
area, and sets ENABLE; the device validates the area against guest RAM, translates it
to an HVA and registers the VM with the policy process (supervisor.py). Errors are not
sticky: every ENABLE is judged from scratch. vCPU threads call read_bar/write_bar
concurrently, so all register state sits behind one lock.
"""

from __future__ import annotations

import errno
import inspect
import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any

from pyvmm import abi
from pyvmm.abi import slots
from pyvmm.common.procfs import is_thread_of
from pyvmm.common.sched_attr import SchedAttr, sched_getattr, sched_setattr
from pyvmm.device.guardian import Guardian, GuardianError
from pyvmm.device.guardian import constants as guardian_constants
from pyvmm.device.rate_limit import TokenBucket
from pyvmm.device.supervisor import PolicySupervisor, PolicyUnavailable
from pyvmm.policy import sandbox
from pyvmm.policy.tunables import TunableError, parse
from pyvmm.vmm.machine import VmmError
from pyvmm.vmm.memory import HIGH_RAM_START, PCI_MMIO_START, GuestMemoryError
from pyvmm.vmm.pci_device import BarSpec, PciDevice

C = abi.C
U32 = 0xFFFFFFFF
STATUS_TIMEOUT_S = 2.0
FINAL_SHOW_TIMEOUT_S = 1.0  # the policy's last policy.show at shutdown: short, the VM is ending
MAX_LOGGED_TRANSITIONS = 8
# Inside `pyvmm lab` (PYVMM_IN_LAB, which it sets) every instruction is emulated, 10-50x slower, and limits
# set for native speed misfire: a healthy policy process fell silent for 253 ms during its start there and
# the guardian killed it; in another boot the run's record ended with no policy stats, most likely the
# final policy.show missing its 1 s (2026-12-03).  There the hang limit and the request timeouts are this
# much longer.
LAB_SLOWDOWN = 10


def slowdown() -> int:
    """How much longer this device's time limits are: LAB_SLOWDOWN inside `pyvmm lab`, else 1."""
    return LAB_SLOWDOWN if os.environ.get("PYVMM_IN_LAB") else 1


# Registrations a guest may cause: a few at once (boot, a driver reload), then a few a second.
REGISTRATION_BURST = 4
REGISTRATION_RATE_PER_S = 2.0
REG = {
    "MAGIC": C.PVSCHED_REG_MAGIC, "HOST_VERSION": C.PVSCHED_REG_HOST_VERSION,
    "HOST_FEATURES": C.PVSCHED_REG_HOST_FEATURES, "GUEST_FEATURES": C.PVSCHED_REG_GUEST_FEATURES,
    "GUEST_VERSION": C.PVSCHED_REG_GUEST_VERSION, "NR_VCPUS": C.PVSCHED_REG_NR_VCPUS,
    "SHM_GPA_LO": C.PVSCHED_REG_SHM_GPA_LO, "SHM_GPA_HI": C.PVSCHED_REG_SHM_GPA_HI,
    "SHM_SIZE": C.PVSCHED_REG_SHM_SIZE, "CONTROL": C.PVSCHED_REG_CONTROL, "STATUS": C.PVSCHED_REG_STATUS,
}
STATUS_NAMES = {
    C.PVSCHED_STATUS_IDLE: "IDLE", C.PVSCHED_STATUS_ACTIVE: "ACTIVE", C.PVSCHED_STATUS_BAD_GPA: "BAD_GPA",
    C.PVSCHED_STATUS_TOO_SMALL: "TOO_SMALL", C.PVSCHED_STATUS_BAD_VERSION: "BAD_VERSION",
    C.PVSCHED_STATUS_BAD_FEATURE: "BAD_FEATURE", C.PVSCHED_STATUS_BUSY: "BUSY", C.PVSCHED_STATUS_AGAIN: "AGAIN",
}
_RW_ATTR = {
    C.PVSCHED_REG_GUEST_FEATURES: "guest_features", C.PVSCHED_REG_GUEST_VERSION: "guest_version",
    C.PVSCHED_REG_SHM_GPA_LO: "gpa_lo", C.PVSCHED_REG_SHM_GPA_HI: "gpa_hi", C.PVSCHED_REG_SHM_SIZE: "shm_size",
}
FEATURE_NAMES = {
    C.PVSCHED_F_CRITICAL_SECTIONS: "critical_sections", C.PVSCHED_F_TASK_PARAMS: "task_params",
    C.PVSCHED_F_HOST_FEEDBACK: "host_feedback", C.PVSCHED_F_WAKE_HINT: "wake_hint",
    C.PVSCHED_F_RT_WAITER: "rt_waiter",
}


class PvschedConfigError(VmmError, ValueError):
    """A bad device option (host version/features, initial tunables); the CLI prints it as one line."""


def feature_names(bits: int) -> list[str]:
    """Names of the feature bits in `bits` (unknown ones as hex)."""
    names = [n for b, n in FEATURE_NAMES.items() if bits & b]
    if bits & ~C.PVSCHED_F_ALL_V1:
        names.append(f"unknown:{bits & ~C.PVSCHED_F_ALL_V1:#x}")
    return names


def version_str(v: int) -> str:
    """major.minor of a major << 16 | minor version word."""
    return f"{v >> 16}.{v & 0xFFFF}"


class PolicyLoadError(RuntimeError):
    """The host policy was asked for and could not be started; the VM must not run as if it were."""


class PvschedDevice(PciDevice):
    """pvsched on pyvmm's PCI bus: BAR0 registers plus the policy process it supervises."""

    label = "pvsched"
    vendor_id = C.PVSCHED_PCI_VENDOR_ID
    device_id = C.PVSCHED_PCI_DEVICE_ID
    class_code = C.PVSCHED_PCI_CLASS
    revision = C.PVSCHED_PCI_REVISION
    bars = (BarSpec(0, C.PVSCHED_BAR0_SIZE),)

    def __init__(self, policy: bool = True, tunables: dict[str, str] | None = None,
                 host_version: int | None = None, host_features: int | None = None) -> None:
        super().__init__()
        self.host_version = C.PVSCHED_VERSION if host_version is None else host_version
        self.host_features = C.PVSCHED_F_ALL_V1 if host_features is None else host_features
        if not 0 <= self.host_version <= U32:
            raise PvschedConfigError(f"pvsched host version {self.host_version:#x} does not fit 32 bits")
        if self.host_features & ~C.PVSCHED_F_ALL_V1 or self.host_features < 0:
            raise PvschedConfigError(f"pvsched host features {self.host_features:#x}: this device knows only "
                                     f"{C.PVSCHED_F_ALL_V1:#x}")
        self.policy = policy
        self.tunables = dict(tunables or {})
        if policy and self.tunables:
            _check_tunables(self.tunables)
        if policy and (missing := sandbox.missing_capabilities()):
            # A researcher who asked for pvsched must not get a silent "vanilla" run: refuse, say what is missing.
            raise PvschedConfigError(f"the pvsched host policy needs {', '.join(missing)}, which pyvmm lacks "
                                     "(run it as root, or boot with --no-policy or --no-pvsched)")
        self.vm: Any = None
        self.supervisor: PolicySupervisor | None = None
        self.policy_error: str | None = None
        self.stop_timeout_s = 3.0  # how long stop() lets the policy process clean up before killing it
        self.guardian: Guardian | None = None
        # hung after this much silence
        self.guardian_stale_ms = int(guardian_constants().PVSCHED_GUARDIAN_STALE_MS) * slowdown()
        self._lock = threading.Lock()
        self._reset_registers()
        self.active: dict[str, Any] | None = None  # the accepted configuration while ACTIVE
        self._transitions = 0
        self._registrations = TokenBucket(REGISTRATION_RATE_PER_S, REGISTRATION_BURST)
        self.enables = {"accepted": 0, "again": 0}  # ENABLEs that registered, and those the rate limit refused
        self.final_stats: dict[str, Any] | None = None  # set at stop(): device snapshot and policy.show

    # --- registers -----------------------------------------------------------------------------------

    def _reset_registers(self) -> None:
        self.guest_features = 0
        self.guest_version = 0
        self.gpa_lo = 0
        self.gpa_hi = 0
        self.shm_size = 0
        self.status = C.PVSCHED_STATUS_IDLE

    @property
    def nr_vcpus(self) -> int:
        """vCPUs of the VM the device is attached to (0 before attach)."""
        return int(getattr(self.vm, "nr_vcpus", 0))

    def warn_once(self, key: str, msg: str) -> None:
        """Log a guest misbehaviour once per kind (thread-safe: vCPU threads race here)."""
        with self._lock:
            if key in self._warned:
                return
            self._warned.add(key)
        self.log.warning("%s: %s", self.label, msg)

    def read_bar(self, bar: int, offset: int, size: int) -> int:
        """Guest read of BAR0; unknown offsets and non-32-bit accesses read 0."""
        if bar != 0:
            self.warn_once(f"bar{bar}", f"access to BAR{bar}, which does not exist")
            return 0
        if size != 4:
            self.warn_once("size", f"ignored {size}-byte read at {offset:#x}: only 32-bit accesses are supported")
            return 0
        with self._lock:
            if offset == REG["MAGIC"]:
                return C.PVSCHED_MAGIC
            if offset == REG["HOST_VERSION"]:
                return self.host_version
            if offset == REG["HOST_FEATURES"]:
                return self.host_features
            if offset == REG["GUEST_FEATURES"]:
                return self.guest_features
            if offset == REG["GUEST_VERSION"]:
                return self.guest_version
            if offset == REG["NR_VCPUS"]:
                return self.nr_vcpus
            if offset == REG["SHM_GPA_LO"]:
                return self.gpa_lo
            if offset == REG["SHM_GPA_HI"]:
                return self.gpa_hi
            if offset == REG["SHM_SIZE"]:
                return self.shm_size
            if offset == REG["STATUS"]:
                return self.status & U32
            if offset == REG["CONTROL"]:
                return 0  # write-only
        self.warn_once("r-unknown", f"read of unknown offset {offset:#x} (returns 0; further ones not logged)")
        return 0

    def write_bar(self, bar: int, offset: int, size: int, value: int) -> None:
        """Guest write to BAR0; CONTROL acts, RW registers latch, anything else is ignored."""
        if bar != 0:
            self.warn_once(f"bar{bar}", f"access to BAR{bar}, which does not exist")
            return
        if size != 4:
            self.warn_once("size", f"ignored {size}-byte write at {offset:#x}: only 32-bit accesses are supported")
            return
        value &= U32
        warn: tuple[str, str] | None = None
        with self._lock:
            if offset in _RW_ATTR:
                setattr(self, _RW_ATTR[offset], value)
            elif offset == REG["CONTROL"]:
                warn = self._control(value)
            elif offset in REG.values():
                warn = ("w-readonly", f"write to read-only register at {offset:#x} ignored (further ones not logged)")
            else:
                warn = ("w-unknown", f"write to unknown offset {offset:#x} ignored (further ones not logged)")
        if warn:
            self.warn_once(*warn)

    def _control(self, value: int) -> tuple[str, str] | None:
        """Act on a CONTROL write (lock held); returns a warning to log once, if any."""
        if value == C.PVSCHED_CTRL_ENABLE:
            if self.active is not None:
                self.status = C.PVSCHED_STATUS_BUSY
            else:
                self.status = self._validate()
                if self.status == C.PVSCHED_STATUS_ACTIVE and not self._registrations.take():
                    # Each registration is work at RT in the policy process: a guest toggling DISABLE/ENABLE
                    # gets AGAIN beyond the bucket, and may ENABLE again later.
                    self.status = C.PVSCHED_STATUS_AGAIN
                    self.enables["again"] += 1
                    return ("ctl-rate", (f"ENABLE refused (AGAIN): more than {REGISTRATION_BURST} registrations "
                                        f"at once, {REGISTRATION_RATE_PER_S:g}/s after (further ones not logged)"))
                if self.status == C.PVSCHED_STATUS_ACTIVE:
                    self.enables["accepted"] += 1
                    self._activate()
        elif value == C.PVSCHED_CTRL_DISABLE:
            self._deactivate()
            self.status = C.PVSCHED_STATUS_IDLE
        elif value == C.PVSCHED_CTRL_RESET:
            self._deactivate()
            self._reset_registers()
        else:
            return ("ctl-unknown", f"unknown CONTROL value {value:#x} ignored (further ones not logged)")
        return None

    def _validate(self) -> int:
        """Judge the latched registers for ENABLE: the status code to report."""
        gv, hv = self.guest_version, self.host_version
        if gv >> 16 != hv >> 16 or (gv & 0xFFFF) > (hv & 0xFFFF):
            return C.PVSCHED_STATUS_BAD_VERSION
        if self.guest_features & ~self.host_features:
            return C.PVSCHED_STATUS_BAD_FEATURE
        gpa, size = self.gpa_hi << 32 | self.gpa_lo, self.shm_size
        if gpa % C.PVSCHED_PAGE_SIZE:
            return C.PVSCHED_STATUS_BAD_GPA
        if size % C.PVSCHED_PAGE_SIZE or size < slots.min_shm_size(self.nr_vcpus):
            return C.PVSCHED_STATUS_TOO_SMALL
        if gpa + size > 1 << 64:  # wraps
            return C.PVSCHED_STATUS_BAD_GPA
        if gpa < HIGH_RAM_START and gpa + size > PCI_MMIO_START:  # overlaps the MMIO hole
            return C.PVSCHED_STATUS_BAD_GPA
        memory = getattr(self.vm, "memory", None)
        if memory is None:
            return C.PVSCHED_STATUS_BAD_GPA
        try:
            memory.region_of(gpa, size)
        except GuestMemoryError:
            return C.PVSCHED_STATUS_BAD_GPA
        return C.PVSCHED_STATUS_ACTIVE

    def _activate(self) -> None:
        gpa, size = self.gpa_hi << 32 | self.gpa_lo, self.shm_size
        memory = self.vm.memory
        self.active = {
            "gpa": gpa, "size": size, "hva": memory.hva(gpa, size), "file_offset": memory.file_offset(gpa, size),
            "version": self.guest_version, "features": self.guest_features,
        }
        self._log_transition("pvsched: active, version %s, features %#x (%s), shared area GPA %#x size %d",
                             version_str(self.guest_version), self.guest_features,
                             ",".join(feature_names(self.guest_features)) or "none", gpa, size)
        if self.supervisor is not None and self.supervisor.alive:
            vm = self.vm
            vcpus = []
            for vid, tid in sorted(dict(vm.vcpu_tids).items()):
                orig = vm.original_sched.get(tid, SchedAttr())
                vcpus.append({"id": vid, "tid": tid,
                              "original": {"policy": orig.policy, "priority": orig.priority, "nice": orig.nice}})
            msg = {"op": "register", "vm_id": int(vm.vmm_pid), "nr_vcpus": self.nr_vcpus,
                   "shm_hva": self.active["hva"], "shm_gpa": gpa, "shm_size": size,
                   "file_offset": self.active["file_offset"], "version": self.guest_version,
                   "features": self.guest_features, "vcpus": vcpus}
            self.supervisor.post(msg, (memory.fd,), coalesce="registration").add_done_callback(self._log_reply("register"))

    def _deactivate(self) -> None:
        if self.active is None:
            return
        self.active = None
        self._log_transition("pvsched: disabled")
        if self.supervisor is not None and self.supervisor.alive:
            msg = {"op": "unregister", "vm_id": int(self.vm.vmm_pid)}
            self.supervisor.post(msg, coalesce="registration").add_done_callback(self._log_reply("unregister"))

    def _log_transition(self, msg: str, *args: Any) -> None:
        # A guest toggling ENABLE/DISABLE must not flood the log: the first few at INFO, the rest at DEBUG.
        self._transitions += 1
        if self._transitions <= MAX_LOGGED_TRANSITIONS:
            self.log.info(msg, *args)
            if self._transitions == MAX_LOGGED_TRANSITIONS:
                self.log.info("pvsched: further ENABLE/DISABLE transitions are logged at debug level")
        else:
            self.log.debug(msg, *args)

    def _log_reply(self, what: str) -> Callable[[Any], None]:
        def done(fut: Any) -> None:
            e = fut.exception()
            if e is not None:
                self.log.warning("pvsched: %s: %s", what, e)
            elif "error" in fut.result():
                self.log.warning("pvsched: policy process refused %s: %s", what, fut.result()["error"])
        return done

    # --- lifecycle -------------------------------------------------------------------------------------

    def attach(self, vm: Any) -> None:
        """Remember the machine and register the control commands (status, policy.show, policy.set)."""
        self.vm = vm
        handlers = vm.control_handlers
        previous = handlers.get("status")
        handlers["status"] = lambda req: self.handle_status(req, previous)
        handlers["policy.show"] = self.handle_policy_show
        handlers["policy.set"] = self.handle_policy_set

    def start(self, vm: Any) -> None:
        """Start the policy process (from the VMM's main thread) unless the policy is switched off."""
        self.vm = vm
        if not self.policy:
            return
        verbose = self.log.isEnabledFor(logging.DEBUG)
        self.guardian = self._new_guardian(vm)
        self.supervisor = PolicySupervisor(int(vm.vmm_pid), self.tunables, self._policy_died, verbose=verbose,
                                           heartbeat_fd=self.guardian.heartbeat_fd if self.guardian else None)
        try:
            ready = self.supervisor.spawn()
        except (PolicyUnavailable, OSError) as e:
            self.policy_error = str(e)
            self.supervisor = None
            self._close_guardian()
            raise PolicyLoadError(f"{e} (--no-policy runs without it)") from None
        if not ready.get("engine"):
            # Asked for and absent is an error: a run without BPF would pass for a pvsched run.
            self.policy_error = f"the BPF policy did not load: {ready.get('engine_error')}"
            raise PolicyLoadError(f"{self.policy_error} (--no-policy runs without it)")
        if self.guardian is not None:
            try:
                self.guardian.start(self.supervisor.pid, self.supervisor.pidfd, stale_ms=self.guardian_stale_ms)
            except GuardianError as e:
                self.log.warning("pvsched: %s; restores after a policy death rely on Python", e)
                self._close_guardian()
        self.log.info("pvsched: policy process %d started (%s)", self.supervisor.pid,
                      "BPF policy loaded" if ready.get("engine") else f"no BPF: {ready.get('engine_error')}")

    def _new_guardian(self, vm: Any) -> Guardian | None:
        """A guardian for the vCPU threads' original attributes (not started), or None if it is unavailable."""
        try:
            g = Guardian()
        except GuardianError as e:
            self.log.warning("pvsched: no guardian (%s); restores after a policy death rely on Python", e)
            return None
        try:
            g.set_threads(dict(getattr(vm, "original_sched", {}) or {}))
        except GuardianError as e:
            self.log.warning("pvsched: no guardian (%s); restores after a policy death rely on Python", e)
            g.close()
            return None
        return g

    def _close_guardian(self) -> None:
        if self.guardian is not None:
            self.guardian.close()  # joins its thread; info() keeps the last view for status

    async def run(self, vm: Any) -> None:
        """Supervise the policy process until it ends (the VMM cancels this at shutdown)."""
        if self.supervisor is not None:
            await self.supervisor.run()

    def stop(self) -> None:
        """End the policy process cleanly (bounded wait, then kill); restore threads if it could not."""
        sup = self.supervisor
        self._take_final_stats(sup)
        if sup is None or sup.proc is None:
            self._close_guardian()
            return
        if self.guardian is not None:
            self.guardian.disarm()  # it stops beating while it cleans up: not a hang (its death still restores)
        was_dead = sup.dead
        rc = sup.stop(self.stop_timeout_s)
        self._close_guardian()
        if not was_dead and rc != 0:
            self.log.warning("pvsched: policy process %d ended with %s: restoring vCPU threads", sup.pid, rc)
            self.restore_threads()

    def _take_final_stats(self, sup: PolicySupervisor | None) -> None:
        # What the run did, kept for `pyvmm boot --stats-out` before the policy process goes: a benchmark
        # then needs no polling while it measures.
        self.final_stats = {"device": self.snapshot()}
        if sup is not None and sup.alive and not sup.dead:
            try:
                reply = self._clean(sup.request({"op": "policy.show"}, FINAL_SHOW_TIMEOUT_S * slowdown()))
            except PolicyUnavailable as e:
                reply = {"error": str(e)}
            self.final_stats["policy"] = {k: v for k, v in reply.items() if k != "text"}

    def _policy_died(self, returncode: int) -> None:
        """The policy process died under us: restore every vCPU thread (again, after the guardian), unpin, go on."""
        pid = self.supervisor.pid if self.supervisor else "?"
        g = self.guardian.info() if self.guardian is not None else {}
        if g.get("cause") == "stale":
            self.log.error("pvsched: policy process %s stopped beating: the guardian killed it after %d ms of "
                           "silence and restored the vCPU threads", pid, g["silent_ms"])
        n = self.restore_threads()  # the second line: idempotent, and the only one without a guardian
        how = f"killed by signal {-returncode}" if returncode < 0 else f"exit code {returncode}"
        self.policy_error = f"policy process died ({how})"
        if g.get("cause") == "stale":
            self.policy_error += f": hung, no heartbeat for {g['silent_ms']} ms"
        early = ""
        if g.get("restore_s"):
            early = f" (the guardian did {max(0.0, time.monotonic() - g['restore_s']) * 1000:.1f} ms earlier)"
        self.log.error("pvsched: policy process %s died (%s); restored %d vCPU threads' original scheduling%s, "
                       "VM continues without boosting", pid, how, n, early)
        if self.supervisor is not None:
            self.supervisor.remove_pins()

    def restore_threads(self) -> int:
        """Apply every vCPU thread's original scheduling attributes (vm.original_sched); count restored."""
        n = 0
        for tid, attr in dict(getattr(self.vm, "original_sched", {}) or {}).items():
            if not is_thread_of(os.getpid(), tid):  # ended: its TID may be another process's thread now
                continue
            try:
                sched_setattr(tid, attr)
                n += 1
            except OSError as e:
                if e.errno != errno.ESRCH:  # a thread that already ended needs nothing
                    self.log.warning("pvsched: restoring TID %d: %s", tid, e)
        return n

    # --- control commands ------------------------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        """Device state as data: registers, negotiated values, shared area, vCPUs and their slots."""
        with self._lock:
            active = dict(self.active) if self.active else None
            status = self.status
            enables = dict(self.enables)
        vm = self.vm
        tids = dict(getattr(vm, "vcpu_tids", {}) or {})
        out: dict[str, Any] = {
            "state": "active" if active else "idle",
            "status": status, "status_name": STATUS_NAMES.get(status, str(status)),
            "host_version": self.host_version, "host_features": self.host_features,
            "version": active["version"] if active else None,
            "features": active["features"] if active else None,
            "feature_names": feature_names(active["features"]) if active else [],
            "shm_gpa": active["gpa"] if active else None, "shm_size": active["size"] if active else None,
            "shm_hva": active["hva"] if active else None,
            "nr_vcpus": self.nr_vcpus,
            "enables": enables,
            "policy": self._policy_summary(),
            "vcpus": [],
        }
        original = dict(getattr(vm, "original_sched", {}) or {})
        for vid, tid in sorted(tids.items()):
            v: dict[str, Any] = {"id": vid, "tid": tid}
            try:
                v["sched"] = str(sched_getattr(tid))
            except OSError:
                v["sched"] = None
            if tid in original:
                v["original"] = str(original[tid])
            if active and vid < self.nr_vcpus:
                view = vm.memory.view(active["gpa"] + slots.slot_offset(vid), slots.slot_size())
                try:
                    v["guest"] = slots.read_guest_area(view)
                    v["host"] = slots.read_host_area(view)
                finally:
                    view.release()
            out["vcpus"].append(v)
        return out

    def _policy_summary(self) -> dict[str, Any]:
        sup = self.supervisor
        if not self.policy:
            return {"enabled": False}
        guardian = self.guardian.info() if self.guardian is not None else None
        if sup is None:
            return {"enabled": True, "running": False, "error": self.policy_error, "guardian": guardian}
        return {"enabled": True, "running": sup.alive, "pid": sup.pid, "engine": bool(sup.ready.get("engine")),
                "engine_error": sup.ready.get("engine_error"), "error": self.policy_error,
                "returncode": sup.returncode, "guardian": guardian}

    def handle_status(self, req: dict[str, Any], previous: Callable[[dict], Any] | None = None) -> Any:
        """Control command "status": the VMM's own status, the device, and the policy process's own view.

        Returns a dict, or (on the VMM's trio thread, where waiting would block the loop) an awaitable of one.
        """
        base = previous(req) if previous else {}
        sup = self.supervisor
        if inspect.isawaitable(base) or (sup is not None and sup.alive and sup.in_trio_thread()):
            async def status() -> dict[str, Any]:
                b = await base if inspect.isawaitable(base) else base
                view: dict[str, Any] | None = None
                if sup is not None and sup.alive:
                    try:
                        view = _policy_view(await sup.arequest({"op": "status"}, STATUS_TIMEOUT_S * slowdown()))
                    except PolicyUnavailable as e:
                        view = {"error": str(e)}
                return self._compose_status(b, view)
            return status()
        view = None
        if sup is not None and sup.alive:
            try:
                view = _policy_view(sup.request({"op": "status"}, STATUS_TIMEOUT_S * slowdown()))
            except PolicyUnavailable as e:
                view = {"error": str(e)}
        return self._compose_status(base, view)

    def _compose_status(self, base: dict[str, Any], view: dict[str, Any] | None) -> dict[str, Any]:
        data = self.snapshot()
        if view is not None:
            data["policy"]["process"] = view
        lines = [base["text"]] if base.get("text") else []
        lines.append(format_status(data))
        return {**{k: v for k, v in base.items() if k != "text"}, "pvsched": data, "text": "\n".join(lines)}

    def _forward(self, msg: dict[str, Any], finish: Callable[[dict[str, Any]], dict[str, Any]]) -> Any:
        """Send a control request to the policy process; from the trio thread, return an awaitable instead."""
        if not self.policy:
            return {"error": "pvsched policy is off (--no-policy)"}
        sup = self.supervisor
        if sup is None or not sup.alive:
            return {"error": f"pvsched policy process is not running ({self.policy_error or 'not started'})"}
        if sup.in_trio_thread():  # the VMM's control server awaits what a handler returns
            async def forward() -> dict[str, Any]:
                try:
                    return finish(await sup.arequest(msg))
                except PolicyUnavailable as e:
                    return {"error": str(e)}
            return forward()
        try:
            return finish(sup.request(msg))
        except PolicyUnavailable as e:
            return {"error": str(e)}

    @staticmethod
    def _clean(reply: dict[str, Any]) -> dict[str, Any]:
        reply = dict(reply)
        reply.pop("id", None)
        reply.pop("ok", None)
        return reply

    def handle_policy_show(self, req: dict[str, Any]) -> Any:
        """Control command "policy.show": the engine's state, stats and tunables (dict, or awaitable of one)."""
        def finish(reply: dict[str, Any]) -> dict[str, Any]:
            reply = self._clean(reply)
            if "error" not in reply and "text" not in reply:
                reply["text"] = format_policy_show(reply)
            return reply
        return self._forward({"op": "policy.show"}, finish)

    def handle_policy_set(self, req: dict[str, Any]) -> Any:
        """Control command "policy.set": validate and apply tunables in the policy process."""
        values = req.get("values")
        if not isinstance(values, dict) or not values:
            return {"error": "policy.set needs \"values\": {KEY: VALUE, ...}"}

        def finish(reply: dict[str, Any]) -> dict[str, Any]:
            reply = self._clean(reply)
            tun = reply.get("tunables")
            if "error" not in reply and isinstance(tun, dict):
                reply["text"] = "\n".join(f"{k} = {v}" for k, v in sorted(tun.items()))
            return reply
        return self._forward({"op": "policy.set", "values": {str(k): str(v) for k, v in values.items()}}, finish)

    def policy_status(self, timeout: float = 2.0) -> dict[str, Any]:
        """The policy process's own view (sandbox, registration, slots as it reads them)."""
        if self.supervisor is None:
            raise PolicyUnavailable("no policy process")
        return self.supervisor.request({"op": "status"}, timeout)


def _check_tunables(tunables: dict[str, str]) -> None:
    """Refuse bad initial tunables before boot (the policy process would otherwise run without its policy)."""
    try:
        parse({str(k): str(v) for k, v in tunables.items()})
    except TunableError as e:
        raise PvschedConfigError(f"--policy-set: {e}") from None


def _policy_view(reply: dict[str, Any]) -> dict[str, Any]:
    """The policy process's status reply, trimmed to what it alone can tell: sandbox, registration, slot reads."""
    if "error" in reply:
        return {"error": reply["error"]}
    return {"pid": reply.get("pid"), "sandbox": reply.get("sandbox"), "registered": reply.get("registered"),
            "engine": reply.get("engine"),
            "vcpus": [{"id": v.get("id"), "tid": v.get("tid"), "guest": v.get("guest")} for v in reply.get("vcpus", [])]}


def format_status(d: dict[str, Any]) -> str:
    """Human form of PvschedDevice.snapshot()."""
    lines = [(f"pvsched: {d['state']} (STATUS {d['status_name']}), host offers v{version_str(d['host_version'])} "
              f"features {d['host_features']:#x}")]
    if d["state"] == "active":
        lines.append(f"  negotiated v{version_str(d['version'])} features {d['features']:#x} "
                     f"({','.join(d['feature_names']) or 'none'}); shared area GPA {d['shm_gpa']:#x} "
                     f"size {d['shm_size']}")
    p = d["policy"]
    if not p["enabled"]:
        lines.append("  policy: off")
    elif p.get("running"):
        lines.append(f"  policy: process {p['pid']}, " + ("BPF policy loaded" if p["engine"]
                                                         else f"no BPF ({p.get('engine_error')})"))
        view = p.get("process") or {}
        sb = view.get("sandbox")
        if sb:
            lines.append(f"    sandbox: {' '.join(sb['cap_eff'])}, no_new_privs {int(sb['no_new_privs'])}, "
                         f"seccomp {sb['seccomp']}, interfaces {','.join(sb['net_ifaces'])}; "
                         + ("VM registered" if view.get("registered") else "VM not registered"))
        elif "error" in view:
            lines.append(f"    (no answer: {view['error']})")
        lines.append("    " + format_guardian(p.get("guardian")))
    else:
        lines.append(f"  policy: not running ({p.get('error') or 'stopped'}); vCPUs at their original scheduling")
        if p.get("guardian"):
            lines.append("    " + format_guardian(p["guardian"]))
    for v in d["vcpus"]:
        lines.append(f"  vCPU {v['id']}: TID {v['tid']}, now {v.get('sched')}, original {v.get('original')}")
        if "guest" in v:
            lines.append("    " + slots.format_guest(v["guest"]))
            lines.append("    " + slots.format_host(v["host"]))
    return "\n".join(lines)


def format_guardian(g: dict[str, Any] | None) -> str:
    """One line on the guardian thread (guardian.py's info())."""
    if not g:
        return "guardian: none (restores after a policy death rely on Python)"
    prio = f"FIFO {g['prio']}" if g["prio"] else "not real-time"
    live = f"heartbeat {g['beats']}" + (", checked" if g["armed"] else ", not checked")
    text = f"guardian: {g['state']}, {prio}, memory {'locked' if g['locked'] else 'not locked'}, {live}"
    if g.get("cause"):
        text += f"; {g['cause']}: restored {g['restored']} threads"
    if g.get("errors"):
        text += f"; {g['errors']} errors (last: {g['last_error']})"
    return text


def format_policy_show(d: dict[str, Any]) -> str:
    """Generic human form of the engine's show() data (the engine may supply its own "text")."""
    lines = []
    for key, value in d.items():
        if isinstance(value, dict):
            lines.append(f"{key}:")
            lines.extend(f"  {k} = {v}" for k, v in value.items())
        elif isinstance(value, list):
            lines.append(f"{key}:")
            lines.extend(f"  {item}" for item in value)
        else:
            lines.append(f"{key}: {value}")
    return "\n".join(lines)
