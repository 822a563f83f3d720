"""The pvsched PCI device: BAR0 negotiation, GPA to HVA, and the supervised policy process.

Register map and status codes: pvsched_abi.h, as a table in registers.py.  The guest
negotiates version and features, hands over the GPA and size of its shared area, and sets
ENABLE; the device validates the area against guest RAM, translates it to an HVA and
registers the VM with the policy process (supervisor.py). Errors are not sticky: every
ENABLE is judged from scratch. vCPU threads call read_bar/write_bar concurrently, so all
register state sits behind one lock.  Control replies are data; `pyvmm` (cli/status_text.py)
turns them into text.
"""

from __future__ import annotations

import errno
import inspect
import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any, NoReturn

from pyvmm import abi
from pyvmm.abi import slots
from pyvmm.common import lab_env
from pyvmm.common.procfs import is_thread_of, memory_kb
from pyvmm.common.sched_attr import SchedAttr, sched_getattr, sched_setattr
from pyvmm.device.guardian import Guardian, GuardianError
from pyvmm.device.guardian import constants as guardian_constants
from pyvmm.device.rate_limit import TokenBucket
from pyvmm.device.registers import REG, STATUS_NAMES, GuestWarning, Latches, RegisterFile, pvsched_bar0
from pyvmm.device.supervisor import PolicySupervisor, PolicyUnavailable, Reply
from pyvmm.policy import programs, sandbox
from pyvmm.policy.tunables import TunableError, parse
from pyvmm.vmm.machine import VmmError
from pyvmm.vmm.memory import HIGH_RAM_START, PCI_MMIO_START, GuestMemoryError
from pyvmm.vmm.pci_device import BarSpec, MachineHandle, PciDevice

__all__ = ["REG", "STATUS_NAMES", "PolicyLoadError", "PvschedConfigError", "PvschedDevice",
           "slowdown", "version_str"]

C = abi.C
U32 = 0xFFFFFFFF
STATUS_TIMEOUT_S = 2.0
FINAL_SHOW_TIMEOUT_S = 1.0  # the policy's last policy.show at shutdown: short, the VM is ending
MAX_LOGGED_TRANSITIONS = 8
# Inside `pyvmm lab` (lab_env.in_lab()) every instruction is emulated, 10-50x slower, and limits
# set for native speed misfire (a healthy policy process taken for hung, a final policy.show timed out:
# docs/linux-lab.md).  There the hang limit and the request timeouts are this much longer.
LAB_SLOWDOWN = 10


def slowdown() -> int:
    """How much longer this device's time limits are: LAB_SLOWDOWN inside `pyvmm lab`, else 1."""
    return LAB_SLOWDOWN if lab_env.in_lab() else 1


# Registrations a guest may cause: a few at once (boot, a driver reload), then a few a second.
REGISTRATION_BURST = 4
REGISTRATION_RATE_PER_S = 2.0


class PvschedConfigError(VmmError, ValueError):
    """A bad device option (host version/features, initial tunables); the CLI prints it as one line."""


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
                 host_version: int | None = None, host_features: int | None = None,
                 program: str = programs.DEFAULT) -> None:
        super().__init__()
        self.host_version = C.PVSCHED_VERSION if host_version is None else host_version
        self.host_features = C.PVSCHED_F_DEFAULT_OFFER if host_features is None else host_features
        if not 0 <= self.host_version <= U32:
            raise PvschedConfigError(f"pvsched host version {self.host_version:#x} does not fit 32 bits")
        if self.host_features & ~C.PVSCHED_F_ALL or self.host_features < 0:
            raise PvschedConfigError(f"pvsched host features {self.host_features:#x}: this device knows only "
                                     f"{C.PVSCHED_F_ALL:#x} ({','.join(abi.feature_names(C.PVSCHED_F_ALL))})")
        self.policy = policy
        self.program = program
        if policy:
            try:
                programs.object_path(program)
            except programs.ProgramError as e:
                raise PvschedConfigError(str(e)) from None
        self.tunables = dict(tunables or {})
        if policy and self.tunables:
            _check_tunables(self.tunables)
        if policy and (missing := sandbox.missing_capabilities()):
            # A researcher who asked for pvsched must not get a silent "vanilla" run: refuse, say what is missing.
            raise PvschedConfigError(f"the pvsched host policy needs {', '.join(missing)}, which pyvmm lacks "
                                     "(run it as root, or boot with --no-policy or --no-pvsched)")
        self.vm: MachineHandle | None = None
        self.supervisor: PolicySupervisor | None = None
        self.policy_error: str | None = None
        self.stop_timeout_s = 3.0  # how long stop() lets the policy process clean up before killing it
        self.guardian: Guardian | None = None
        # hung after this much silence
        self.guardian_stale_ms = int(guardian_constants().PVSCHED_GUARDIAN_STALE_MS) * slowdown()
        self._lock = threading.Lock()  # every register, `active` and `enables`
        self.regs = Latches()
        self.bar0 = RegisterFile(pvsched_bar0(self.regs, self.host_version, self.host_features,
                                              lambda: self.nr_vcpus, self._control),
                                 C.PVSCHED_BAR0_SIZE, self._lock, lambda msg: self.log.warning("%s: %s", self.label, msg))
        self.active: dict[str, Any] | None = None  # the accepted configuration while ACTIVE
        self._transitions = 0
        self._registrations = TokenBucket(REGISTRATION_RATE_PER_S, REGISTRATION_BURST)
        self.enables = {"accepted": 0, "again": 0}  # ENABLEs that registered, and those the rate limit refused
        self.final_stats: dict[str, Any] | None = None  # set at stop(): device snapshot and policy.show
        self._final_policy: dict[str, Any] | None = None  # the last policy.show, if run() took it when cancelled

    # --- registers -----------------------------------------------------------------------------------

    @property
    def nr_vcpus(self) -> int:
        """vCPUs of the VM the device is attached to (0 before attach)."""
        return int(self.vm.nr_vcpus) if self.vm is not None else 0

    def warn_once(self, key: str, msg: str) -> None:
        """Log a guest misbehaviour once per kind (thread-safe: vCPU threads race here)."""
        with self._lock:
            if key in self._warned:
                return
            self._warned.add(key)
        self.log.warning("%s: %s", self.label, msg)

    def read_bar(self, bar: int, offset: int, size: int) -> int:
        """Guest read of BAR0 (registers.py's table); anything that is not a register reads 0."""
        if bar != 0:
            self.warn_once(f"bar{bar}", f"access to BAR{bar}, which does not exist")
            return 0
        return self.bar0.read(offset, size)

    def write_bar(self, bar: int, offset: int, size: int, value: int) -> None:
        """Guest write to BAR0; CONTROL acts, RW registers latch, anything else is ignored."""
        if bar != 0:
            self.warn_once(f"bar{bar}", f"access to BAR{bar}, which does not exist")
            return
        self.bar0.write(offset, size, value)

    def _control(self, value: int) -> GuestWarning | None:
        """Act on a CONTROL write (lock held); returns a warning to log once, if any."""
        regs = self.regs
        if value == C.PVSCHED_CTRL_ENABLE:
            if self.active is not None:
                regs.status = C.PVSCHED_STATUS_BUSY
            else:
                regs.status = self._validate()
                if regs.status == C.PVSCHED_STATUS_ACTIVE and not self._registrations.take():
                    # Each registration is work at RT in the policy process: a guest toggling DISABLE/ENABLE
                    # gets AGAIN beyond the bucket, and may ENABLE again later.
                    regs.status = C.PVSCHED_STATUS_AGAIN
                    self.enables["again"] += 1
                    return ("ctl-rate", (f"ENABLE refused (AGAIN): more than {REGISTRATION_BURST} registrations "
                                        f"at once, {REGISTRATION_RATE_PER_S:g}/s after (further ones not logged)"))
                if regs.status == C.PVSCHED_STATUS_ACTIVE:
                    self.enables["accepted"] += 1
                    self._activate()
        elif value == C.PVSCHED_CTRL_DISABLE:
            self._deactivate()
            regs.status = C.PVSCHED_STATUS_IDLE
        elif value == C.PVSCHED_CTRL_RESET:
            self._deactivate()
            regs.reset()
        else:
            return ("ctl-unknown", f"unknown CONTROL value {value:#x} ignored (further ones not logged)")
        return None

    def _validate(self) -> int:
        """Judge the latched registers for ENABLE: the status code to report."""
        regs = self.regs
        gv, hv = regs.guest_version, self.host_version
        if gv >> 16 != hv >> 16 or (gv & 0xFFFF) > (hv & 0xFFFF):
            return C.PVSCHED_STATUS_BAD_VERSION
        if regs.guest_features & ~self.host_features:
            return C.PVSCHED_STATUS_BAD_FEATURE
        gpa, size = regs.gpa, regs.shm_size
        if gpa % C.PVSCHED_PAGE_SIZE:
            return C.PVSCHED_STATUS_BAD_GPA
        if size % C.PVSCHED_PAGE_SIZE or size < slots.min_shm_size(self.nr_vcpus):
            return C.PVSCHED_STATUS_TOO_SMALL
        if gpa + size > 1 << 64:  # wraps
            return C.PVSCHED_STATUS_BAD_GPA
        if gpa < HIGH_RAM_START and gpa + size > PCI_MMIO_START:  # overlaps the MMIO hole
            return C.PVSCHED_STATUS_BAD_GPA
        memory = self.vm.memory if self.vm is not None else None
        if memory is None:
            return C.PVSCHED_STATUS_BAD_GPA
        try:
            memory.region_of(gpa, size)
        except GuestMemoryError:
            return C.PVSCHED_STATUS_BAD_GPA
        return C.PVSCHED_STATUS_ACTIVE

    def _activate(self) -> None:
        regs, vm = self.regs, self.vm
        assert vm is not None and vm.memory is not None  # _validate() accepted the area in this RAM
        gpa, size, memory = regs.gpa, regs.shm_size, vm.memory
        self.active = {
            "gpa": gpa, "size": size, "hva": memory.hva(gpa, size), "file_offset": memory.file_offset(gpa, size),
            "version": regs.guest_version, "features": regs.guest_features,
        }
        self._log_transition("pvsched: active, version %s, features %#x (%s), shared area GPA %#x size %d",
                             version_str(regs.guest_version), regs.guest_features,
                             ",".join(abi.feature_names(regs.guest_features)) or "none", gpa, size)
        if self.supervisor is not None and self.supervisor.alive:
            vcpus = []
            for vid, tid in sorted(dict(vm.vcpu_tids).items()):
                orig = vm.original_sched.get(tid, SchedAttr())
                vcpus.append({"id": vid, "tid": tid,
                              "original": {"policy": orig.policy, "priority": orig.priority, "nice": orig.nice}})
            msg = {"op": "register", "vm_id": int(vm.vmm_pid), "nr_vcpus": self.nr_vcpus,
                   "shm_hva": self.active["hva"], "shm_gpa": gpa, "shm_size": size,
                   "file_offset": self.active["file_offset"], "version": regs.guest_version,
                   "features": regs.guest_features, "vcpus": vcpus}
            self.supervisor.post(msg, (memory.fd,), coalesce="registration", on_reply=self._log_reply("register"))

    def _deactivate(self) -> None:
        if self.active is None:
            return
        self.active = None
        self._log_transition("pvsched: disabled")
        if self.supervisor is not None and self.supervisor.alive and self.vm is not None:
            msg = {"op": "unregister", "vm_id": int(self.vm.vmm_pid)}
            self.supervisor.post(msg, coalesce="registration", on_reply=self._log_reply("unregister"))

    def _log_transition(self, msg: str, *args: Any) -> None:
        # A guest toggling ENABLE/DISABLE must not flood the log: the first few at INFO, the rest at DEBUG.
        self._transitions += 1
        if self._transitions <= MAX_LOGGED_TRANSITIONS:
            self.log.info(msg, *args)
            if self._transitions == MAX_LOGGED_TRANSITIONS:
                self.log.info("pvsched: further ENABLE/DISABLE transitions are logged at debug level")
        else:
            self.log.debug(msg, *args)

    def _log_reply(self, what: str) -> Callable[[Reply | Exception], None]:
        def done(reply: Reply | Exception) -> None:
            if isinstance(reply, Exception):
                self.log.warning("pvsched: %s: %s", what, reply)
            elif "error" in reply:
                self.log.warning("pvsched: policy process refused %s: %s", what, reply["error"])
        return done

    # --- lifecycle -------------------------------------------------------------------------------------

    def attach(self, vm: MachineHandle) -> None:
        """Remember the machine and register the control commands (status, policy.show, policy.set)."""
        self.vm = vm
        handlers = vm.control_handlers
        previous = handlers.get("status")
        handlers["status"] = lambda req: self.handle_status(req, previous)
        handlers["policy.show"] = self.handle_policy_show
        handlers["policy.set"] = self.handle_policy_set

    async def start(self, vm: MachineHandle) -> None:
        """Start the policy process and await its ready (the VMM's loop goes on serving its control socket)."""
        sup = self._new_supervisor(vm)
        if sup is None:
            return
        try:
            ready = await sup.spawn()
        except BaseException as e:  # noqa: BLE001  # _spawn_failed raises it again (or as PolicyLoadError)
            self._spawn_failed(e)
        self._spawned(ready)

    def _new_supervisor(self, vm: MachineHandle) -> PolicySupervisor | None:
        """The policy process's supervisor and guardian, not started; None when the policy is switched off."""
        self.vm = vm
        if not self.policy:
            return None
        verbose = self.log.isEnabledFor(logging.DEBUG)
        self.guardian = self._new_guardian(vm)
        self.supervisor = PolicySupervisor(int(vm.vmm_pid), self.tunables, self._policy_died, verbose=verbose,
                                           extra_args=("--program", self.program),
                                           heartbeat_fd=self.guardian.heartbeat_fd if self.guardian else None,
                                           time_scale=slowdown())
        return self.supervisor

    def _spawn_failed(self, e: BaseException) -> NoReturn:
        # The supervisor killed the policy process before its ready, so before it could boost anything:
        # there is nothing to restore, only the supervisor and the guardian to drop.
        self.supervisor = None
        self._close_guardian()
        if isinstance(e, (PolicyUnavailable, OSError)):
            self.policy_error = str(e)
            raise PolicyLoadError(f"{e} (--no-policy runs without it)") from None
        raise e

    def _spawned(self, ready: dict[str, Any]) -> None:
        assert self.supervisor is not None
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

    def _new_guardian(self, vm: MachineHandle) -> Guardian | None:
        """A guardian for the vCPU threads' original attributes (not started), or None if it is unavailable."""
        try:
            g = Guardian()
        except GuardianError as e:
            self.log.warning("pvsched: no guardian (%s); restores after a policy death rely on Python", e)
            return None
        try:
            g.set_threads(dict(vm.original_sched))
        except GuardianError as e:
            self.log.warning("pvsched: no guardian (%s); restores after a policy death rely on Python", e)
            g.close()
            return None
        return g

    def _close_guardian(self) -> None:
        if self.guardian is not None:
            self.guardian.close()  # joins its thread; info() keeps the last view for status

    async def run(self, vm: MachineHandle) -> None:
        """Supervise the policy process until it ends (the VMM cancels this at shutdown: then the last policy.show)."""
        if self.supervisor is not None:
            await self.supervisor.run(on_cancel=self._last_policy_show)

    async def _last_policy_show(self) -> None:
        # The VMM cancels run() before it calls stop(), on its trio thread: the final policy.show is taken
        # here, while requests are still served, rather than by a blocking wait in stop().
        sup = self.supervisor
        if sup is not None:
            try:
                self._final_policy = self._clean(await sup.request({"op": "policy.show"},
                                                                    FINAL_SHOW_TIMEOUT_S * slowdown()))
            except (PolicyUnavailable, ValueError) as e:
                self._final_policy = {"error": str(e)}

    def stop(self) -> None:
        """End the policy process cleanly (bounded wait, then kill); restore threads if it could not."""
        sup = self.supervisor
        self._take_final_stats()
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

    def _take_final_stats(self) -> None:
        # What the run did, kept for `pyvmm boot --stats-out` before the policy process goes: a benchmark
        # then needs no polling while it measures.  The policy's part is the policy.show that run() took
        # when the VMM cancelled it (stop() runs on the trio thread, where it must not wait).
        self.final_stats = {"device": self.snapshot()}
        if self._final_policy is not None:
            self.final_stats["policy"] = {k: v for k, v in self._final_policy.items() if k != "text"}

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
        for tid, attr in dict(self.vm.original_sched if self.vm is not None else {}).items():
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
            status = self.regs.status
            enables = dict(self.enables)
        vm = self.vm
        tids = dict(vm.vcpu_tids) if vm is not None else {}
        out: dict[str, Any] = {
            "state": "active" if active else "idle",
            "status": status, "status_name": STATUS_NAMES.get(status, str(status)),
            "host_version": self.host_version, "host_features": self.host_features,
            "version": active["version"] if active else None,
            "features": active["features"] if active else None,
            "feature_names": abi.feature_names(active["features"]) if active else [],
            "shm_gpa": active["gpa"] if active else None, "shm_size": active["size"] if active else None,
            "shm_hva": active["hva"] if active else None,
            "nr_vcpus": self.nr_vcpus,
            "enables": enables,
            "policy": self._policy_summary(),
            "vcpus": [],
        }
        original = dict(vm.original_sched) if vm is not None else {}
        for vid, tid in sorted(tids.items()):
            v: dict[str, Any] = {"id": vid, "tid": tid}
            try:
                v["sched"] = str(sched_getattr(tid))
            except OSError:
                v["sched"] = None
            if tid in original:
                v["original"] = str(original[tid])
            if active and vid < self.nr_vcpus and vm is not None and vm.memory is not None:
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
                "returncode": sup.returncode, "guardian": guardian,
                "memory": memory_kb(sup.pid) if sup.pid and sup.alive else None}

    async def handle_status(self, req: dict[str, Any], previous: Callable[[dict], Any] | None = None) -> Any:
        """Control command "status": the VMM's own status, the device, and the policy process's own view."""
        base = previous(req) if previous else {}
        if inspect.isawaitable(base):
            base = await base
        sup = self.supervisor
        view = await sup.ask({"op": "status"}, STATUS_TIMEOUT_S * slowdown()) if sup is not None and sup.alive else None
        data = self.snapshot()
        if view is not None:
            data["policy"]["process"] = _policy_view(view)
        return {**base, "pvsched": data}

    async def _forward(self, msg: dict[str, Any]) -> dict[str, Any]:
        """A control request for the policy process: its reply, cleaned."""
        if not self.policy:
            return {"error": "pvsched policy is off (--no-policy)"}
        sup = self.supervisor
        if sup is None or not sup.alive:
            return {"error": f"pvsched policy process is not running ({self.policy_error or 'not started'})"}
        return self._clean(await sup.ask(msg))

    @staticmethod
    def _clean(reply: dict[str, Any]) -> dict[str, Any]:
        reply = dict(reply)
        reply.pop("id", None)
        reply.pop("ok", None)
        return reply

    async def handle_policy_show(self, req: dict[str, Any]) -> dict[str, Any]:
        """Control command "policy.show": the engine's state, stats and tunables."""
        return await self._forward({"op": "policy.show"})

    async def handle_policy_set(self, req: dict[str, Any]) -> dict[str, Any]:
        """Control command "policy.set": validate and apply tunables in the policy process."""
        values = req.get("values")
        if not isinstance(values, dict) or not values:
            return {"error": "policy.set needs \"values\": {KEY: VALUE, ...}"}
        return await self._forward({"op": "policy.set", "values": {str(k): str(v) for k, v in values.items()}})

    async def policy_status(self, timeout: float = 2.0) -> dict[str, Any]:
        """The policy process's own view (sandbox, registration, slots as it reads them)."""
        if self.supervisor is None:
            raise PolicyUnavailable("no policy process")
        return await self.supervisor.request({"op": "status"}, timeout)


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
