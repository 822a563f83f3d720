"""The sandboxed policy process: one per VM, a child of the VMM (`python -m pyvmm.policy.process`).

It maps the guest's shared area through a dup of the guest-RAM memfd, runs the BPF policy
through pyvmm.policy.engine.PolicyEngine, and answers the device over a SOCK_SEQPACKET socketpair
(pyvmm/common/protocol.py). Start-up order (pyvmm/device/README.md, "The policy process"):
parent-death signal, network namespace, BPF stats and pin directories while still privileged,
then only CAP_BPF/CAP_PERFMON/CAP_SYS_NICE/CAP_IPC_LOCK, no_new_privs, the engine, seccomp.
Every way out (SIGTERM from the parent's death, "shutdown", end of the socket, an error)
goes through one cleanup path: unregister (restores threads) and PolicyEngine.close() (unpins).
With --heartbeat-fd, the engine's native backstop loop bumps a counter in that memfd at least
every 100 ms while the actuator keeps up with the ring buffer: the VMM's guardian (guardian.c)
kills this process when it stops moving.
"""

from __future__ import annotations

import argparse
import json
import logging
import mmap
import os
import selectors
import signal
import socket
import sys
from dataclasses import dataclass, field
from typing import Any

import pyvmm
from pyvmm import abi
from pyvmm.abi import slots
from pyvmm.common import protocol
from pyvmm.common.pins import PIN_ROOT, ensure_pin_dir, remove_stale_pins
from pyvmm.common.sched_attr import SchedAttr, sched_setattr
from pyvmm.policy import programs, sandbox
from pyvmm.policy.engine import PolicyEngine
from pyvmm.policy.heartbeat import Heartbeat

log = logging.getLogger("pvsched.policy")

MAX_VCPUS = abi.C.PVSCHED_MAX_VCPUS
MAX_LOGGED_REGISTRATIONS = 8


@dataclass
class Vcpu:
    """One registered vCPU thread."""

    id: int
    tid: int
    original: SchedAttr


@dataclass
class Registration:
    """The VM's shared area as mapped here, and its vCPUs."""

    vm_id: int
    nr_vcpus: int
    shm_hva: int
    shm_gpa: int
    shm_size: int
    version: int
    features: int
    area: mmap.mmap
    vcpus: list[Vcpu] = field(default_factory=list)

    def slot(self, vcpu_id: int) -> memoryview:
        """128-byte view of vCPU `vcpu_id`'s slot in this process's mapping."""
        off = slots.slot_offset(vcpu_id)
        return memoryview(self.area)[off : off + slots.slot_size()]


def _int(msg: dict[str, Any], key: str, lo: int, hi: int) -> int:
    v = msg.get(key)
    if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
        raise ValueError(f"{key}: expected an integer in [{lo}, {hi}], got {v!r}")
    return v


def _attr(obj: Any) -> SchedAttr:
    if not isinstance(obj, dict):
        raise TypeError("original: expected an object")
    return SchedAttr(_int(obj, "policy", 0, 7), _int(obj, "priority", 0, 99), _int(obj, "nice", -20, 19))


class PolicyService:
    """Serves the device's requests; owns the registration and the engine."""

    def __init__(self, vmm_pid: int, engine: Any | None, engine_error: str | None, pin_dir: str | None = None) -> None:
        self.vmm_pid = vmm_pid
        self.pin_dir = pin_dir
        self.engine = engine
        self.engine_error = engine_error
        self.reg: Registration | None = None
        self._registrations = 0

    def handle(self, msg: dict[str, Any], fds: list[int]) -> dict[str, Any]:
        """Dispatch one request; errors become {"error": ...}, never an exception."""
        op = msg.get("op")
        try:
            if op == "register":
                return self.register(msg, fds)
            for fd in fds:  # only register carries an fd
                os.close(fd)
            if op == "unregister":
                self.unregister()
                return {"ok": True}
            if op == "status":
                return self.status()
            if op == "ping":
                return {"ok": True}
            if op == "policy.show":
                return {"ok": True, **self._engine().show()}
            if op == "policy.set":
                values = msg.get("values")
                if not isinstance(values, dict) or not all(isinstance(v, str) for v in values.values()):
                    raise ValueError("values: expected an object of strings")
                return {"ok": True, "tunables": self._engine().set_tunables(values)}
            if op == "shutdown":
                return {"ok": True}
            return {"error": f"unknown op {op!r}"}
        except (ValueError, TypeError, OSError, KeyError, RuntimeError) as e:
            return {"error": str(e)}

    def _engine(self) -> Any:
        if self.engine is None:
            raise RuntimeError(f"no BPF policy engine in this policy process ({self.engine_error})")
        return self.engine

    def register(self, msg: dict[str, Any], fds: list[int]) -> dict[str, Any]:
        """Map the shared area through the memfd and hand every vCPU to the engine."""
        try:
            if len(fds) != 1:
                raise ValueError(f"register needs exactly one fd (the guest-RAM memfd), got {len(fds)}")
            nr = _int(msg, "nr_vcpus", 1, MAX_VCPUS)
            size = _int(msg, "shm_size", slots.min_shm_size(nr), 1 << 32)
            if size % mmap.PAGESIZE:
                raise ValueError("shm_size is not a multiple of the page size")
            offset = _int(msg, "file_offset", 0, 1 << 48)
            if offset % mmap.PAGESIZE:
                raise ValueError("file_offset is not page aligned")
            vcpus_in = msg.get("vcpus")
            if not isinstance(vcpus_in, list) or len(vcpus_in) > nr:
                raise ValueError("vcpus: expected a list of at most nr_vcpus entries")
            vcpus = []
            for v in vcpus_in:
                if not isinstance(v, dict):
                    raise TypeError("vcpus: expected objects")
                vcpus.append(Vcpu(_int(v, "id", 0, nr - 1), _int(v, "tid", 1, 1 << 31), _attr(v.get("original"))))
            if len({v.id for v in vcpus}) != len(vcpus):
                raise ValueError("vcpus: duplicate vCPU id")
            if self.reg is not None:
                self.unregister()
            # Only the header and the slots: SHM_SIZE has no upper bound (a guest's choice), and the policy
            # process holds no more of guest RAM than it reads; the actuator locks the slots' pages alone.
            used = -(-slots.min_shm_size(nr) // mmap.PAGESIZE) * mmap.PAGESIZE
            area = mmap.mmap(fds[0], min(size, used), mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE,
                             offset=offset)
        finally:
            for fd in fds:
                os.close(fd)
        self.reg = Registration(_int(msg, "vm_id", 0, (1 << 32) - 1), nr, _int(msg, "shm_hva", 1, (1 << 64) - 1),
                                _int(msg, "shm_gpa", 0, (1 << 64) - 1), size, _int(msg, "version", 0, (1 << 32) - 1),
                                _int(msg, "features", 0, (1 << 32) - 1), area)
        for v in vcpus:
            if self.engine is not None:
                self.engine.add_vcpu(self.reg.vm_id, v.id, v.tid, self.reg.shm_hva + slots.slot_offset(v.id),
                                     self.reg.slot(v.id), v.original, features=self.reg.features)
            self.reg.vcpus.append(v)
        self._log("registered VM %d: %d vCPUs (TIDs %s), shared area GPA %#x size %d", self.reg.vm_id, nr,
                  ",".join(str(v.tid) for v in vcpus), self.reg.shm_gpa, size)
        return {"ok": True, "vcpus": len(vcpus), "engine": self.engine is not None}

    def unregister(self) -> None:
        """Forget the VM: the engine restores each thread's original attributes; unmap the area."""
        reg, self.reg = self.reg, None
        if reg is None:
            return
        for v in reg.vcpus:
            if self.engine is not None:
                try:
                    self.engine.remove_vcpu(v.tid)
                except (OSError, KeyError, ValueError, RuntimeError) as e:
                    log.warning("remove_vcpu(%d): %s; restoring it here", v.tid, e)
                    _restore(v)
        try:
            reg.area.close()
        except BufferError:
            pass  # the engine still holds a slot view; the mapping goes with it
        self._log("unregistered VM %d", reg.vm_id)

    def _log(self, msg: str, *args: Any) -> None:
        # The guest decides how often it re-registers: the first few at INFO, the rest at DEBUG.
        self._registrations += 1
        log.log(logging.INFO if self._registrations <= MAX_LOGGED_REGISTRATIONS else logging.DEBUG, msg, *args)

    def status(self) -> dict[str, Any]:
        """What this process sees: sandbox, engine, and every slot read through its own mapping."""
        st = sandbox.proc_status()
        out: dict[str, Any] = {
            "ok": True,
            "pid": os.getpid(),
            "vmm_pid": self.vmm_pid,
            "engine": self.engine is not None,
            "engine_error": self.engine_error,
            "sandbox": {
                "cap_eff": sandbox.cap_names(int(st["CapEff"], 16)),
                "no_new_privs": st.get("NoNewPrivs") == "1",
                "seccomp": int(st.get("Seccomp", "0")),
                "net_ifaces": _net_ifaces(),
            },
            "registered": self.reg is not None,
        }
        if self.reg is not None:
            r = self.reg
            hdr = abi.ffi().from_buffer("struct pvsched_shm_header *", memoryview(r.area)[: abi.C.PVSCHED_SHM_HEADER_SIZE])
            out.update(vm_id=r.vm_id, nr_vcpus=r.nr_vcpus, shm_hva=r.shm_hva, shm_gpa=r.shm_gpa, shm_size=r.shm_size,
                       header_magic=hdr.magic, vcpus=[{
                           "id": v.id, "tid": v.tid,
                           "original": {"policy": v.original.policy, "priority": v.original.priority,
                                        "nice": v.original.nice},
                           "guest": slots.read_guest_area(r.slot(v.id)),
                           "host": slots.read_host_area(r.slot(v.id)),
                       } for v in r.vcpus])
        return out

    def close(self) -> None:
        """The single cleanup path: restore threads (unregister), then detach and unpin (engine.close)."""
        try:
            self.unregister()
        finally:
            if self.engine is not None:
                self.engine.close()
            if self.pin_dir:
                try:
                    os.rmdir(self.pin_dir)  # made before the sandbox; normally already gone with the engine
                except OSError:
                    pass


def _restore(v: Vcpu) -> None:
    try:
        sched_setattr(v.tid, v.original)
    except OSError as e:
        log.warning("restoring TID %d: %s", v.tid, e)


def _net_ifaces() -> list[str]:
    with open("/proc/self/net/dev") as f:
        return [line.split(":")[0].strip() for line in f.readlines()[2:]]


EXIT_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class _ExitRequest:
    """Whether the way out has been asked for: it is asked for once, and then runs to its end.

    A dying VMM sends more than one SIGTERM: the kernel sends the parent-death signal at every
    reparenting (forget_original_parent), and a multi-threaded VMM hands its children from each
    exiting thread to the next before init takes them.  The first signal starts the cleanup; a
    later one must neither interrupt it (pins left behind) nor kill the process once Python's
    finalization has put the default action back.
    """

    asked = False


_EXIT = _ExitRequest()


def _on_exit_signal(signum: int, frame: Any) -> None:
    """Outside serve(): the first SIGTERM/SIGINT unwinds to the cleanup; later ones are dropped."""
    if not _EXIT.asked:
        _EXIT.asked = True
        raise SystemExit(128 + signum)


def _ignore_exit_signals() -> None:
    """The cleanup is under way: ignore SIGTERM/SIGINT (SIG_IGN, unlike a handler, outlives finalization)."""
    _EXIT.asked = True
    for sig in EXIT_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


def serve(sock: socket.socket, service: PolicyService) -> None:
    """Answer requests until shutdown, end of stream or SIGTERM/SIGINT; the engine runs alongside.

    One thread blocks in select() on the VMM's socket, the signals' wake-up pipe and the actuator's end.
    No event-loop library: trio cost this process 5.5 MiB resident per VM (it loads ssl; docs/scale.md),
    and there is one socket to serve, one request at a time.
    """
    rfd, wfd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signals: list[int] = []
    old_wakeup = signal.set_wakeup_fd(wfd, warn_on_full_buffer=False)
    old_handlers = {sig: signal.signal(sig, lambda s, _f: signals.append(s)) for sig in EXIT_SIGNALS}
    engine = service.engine
    try:
        if engine is not None:
            engine.start()  # before `ready`: boosting is in place before the vCPUs run
        _serve(sock, service, rfd, signals)
    finally:
        _EXIT.asked = True  # before the handlers go back: from here a late SIGTERM must not interrupt the way out
        for sig, handler in old_handlers.items():
            signal.signal(sig, handler)
        signal.set_wakeup_fd(old_wakeup)
        os.close(rfd)
        os.close(wfd)
        if engine is not None:
            engine.stop()


def _serve(sock: socket.socket, service: PolicyService, signal_fd: int, signals: list[int]) -> None:
    engine = service.engine
    with selectors.DefaultSelector() as sel:
        sel.register(sock, selectors.EVENT_READ, "socket")
        sel.register(signal_fd, selectors.EVENT_READ, "signal")
        if engine is not None:
            sel.register(engine.ended_fd(), selectors.EVENT_READ, "actuator")
        protocol.send_blocking(sock, {"op": "ready", "pid": os.getpid(), "engine": engine is not None,
                                      "engine_error": service.engine_error})
        while True:
            ready = {key.data for key, _ in sel.select()}
            if signals:
                log.info("%s: cleaning up", signal.Signals(signals[0]).name)
                return
            if "actuator" in ready:  # fail loudly: the VMM restores the threads
                raise RuntimeError("pvsched: the actuator thread died")
            if "socket" not in ready:
                continue
            msg, fds = protocol.recv_blocking(sock)
            if msg is None:
                log.info("VMM closed the socket: cleaning up")
                return
            reply = service.handle(msg, fds)
            reply["id"] = msg.get("id")
            protocol.send_blocking(sock, reply)
            if msg.get("op") == "shutdown":
                return


def setup_privileged(vmm_pid: int, pin_root: str) -> int | None:
    """Steps that need privileges we then drop: network namespace, BPF stats fd, stale and own pin dirs."""
    sandbox.unshare_network()
    sandbox.unshare_ipc()
    stats_fd = None
    try:
        stats_fd = sandbox.enable_bpf_stats()
    except OSError as e:
        log.warning("BPF run-time stats unavailable: %s", e)
    # A pin root that is a symlink or not root's own 0700 folder stops the start (UnsafePathError is an
    # OSError): the policy process never pins into, or deletes under, a folder a local user controls.
    ensure_pin_dir(pin_root, vmm_pid)
    remove_stale_pins(pin_root)
    return stats_fd


def code_paths() -> list[str]:
    """What the process reads after the root is confined: the interpreter's import path (stdlib,
    extension modules, site-packages) and the folders of this project's packages (editable installs
    resolve them outside sys.path)."""
    return [p for p in sys.path if os.path.isabs(p)] + [os.path.dirname(os.path.abspath(pyvmm.__file__))]


def confine(engine: Any | None) -> None:
    """The last privileged step: a root holding only code_paths() (read-only) and this VMM's own pin
    folder (writable), then lowered rlimits."""
    if engine is not None:
        engine.warm_up()  # libbpf reads /sys once (the possible CPUs) and caches it
    writable = [str(engine.pin_dir)] if engine is not None else []
    sandbox.confine_root(code_paths(), writable)
    sandbox.set_limits()


def _bpffs_of(path: str) -> str | None:
    """Mount point of the bpf filesystem holding `path` (kept writable for the pins), if any."""
    best = None
    with open("/proc/self/mounts") as f:
        for line in f:
            _, mnt, fstype = line.split()[:3]
            inside = path == mnt or path.startswith(mnt.rstrip("/") + "/")
            if fstype == "bpf" and inside and (best is None or len(mnt) > len(best)):
                best = mnt
    return best


def make_engine(vmm_pid: int, tunables: dict[str, str], pin_root: str,
                stats_fd: int | None = None, program: str = programs.DEFAULT) -> tuple[Any | None, str | None]:
    """The BPF policy engine, or (None, reason) if it fails to start."""
    try:
        return PolicyEngine(vmm_pid, tunables or None, pin_root=pin_root, stats_fd=stats_fd, program=program), None
    except Exception as e:  # noqa: BLE001 - any engine failure leaves the VM running without boosting
        reason = f"PolicyEngine failed: {type(e).__name__}: {e}"
        log.error("running without BPF: %s", reason)
        return None, reason


def main(argv: list[str] | None = None) -> int:
    """Entry point: sandbox, engine, serve; exit code 0 after a clean shutdown."""
    p = argparse.ArgumentParser(prog="pvsched-policy", description=__doc__.splitlines()[0])
    p.add_argument("--fd", type=int, required=True, help="socket inherited from the VMM")
    p.add_argument("--vmm-pid", type=int, required=True)
    p.add_argument("--tunables", default="{}", help="initial tunables as a JSON object of strings")
    p.add_argument("--pin-root", default=PIN_ROOT)
    p.add_argument("--program", default=programs.DEFAULT, help="the BPF policy: a name of programs.available()")
    p.add_argument("--heartbeat-fd", type=int, help="the VMM guardian's heartbeat memfd (guardian.py)")
    p.add_argument("--no-seccomp", action="store_true", help="debugging only")
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(stream=sys.stderr, level=logging.DEBUG if args.verbose else logging.INFO,
                        format="pvsched-policy[%(process)d]: %(message)s")

    # Before anything else: die with the VMM's main thread; catch the case where it is already gone.
    for sig in EXIT_SIGNALS:
        signal.signal(sig, _on_exit_signal)
    sandbox.set_parent_death_signal(signal.SIGTERM)
    if os.getppid() != args.vmm_pid:
        log.error("VMM %d is gone before start-up", args.vmm_pid)
        return 1
    try:
        tunables = json.loads(args.tunables)
        if not isinstance(tunables, dict):
            raise TypeError("--tunables is not a JSON object")
        sock = socket.socket(fileno=args.fd)
        heartbeat = _heartbeat(args.heartbeat_fd)
        abi.ffi()  # preprocesses the ABI header with cc: before mounts go read-only and exec is forbidden
        stats_fd = setup_privileged(args.vmm_pid, args.pin_root)
        bpffs = _bpffs_of(args.pin_root)
        sandbox.readonly_filesystem(writable=(bpffs,) if bpffs else ())
    except (OSError, ValueError, TypeError) as e:
        log.error("sandbox setup failed: %s", e)
        return 1
    # The policy is loaded before CAP_SYS_ADMIN goes: libbpf finds the BTF of tracepoints in modules
    # (kvm_exit where KVM is a module, as on every Debian host) by iterating BTF objects, and a VM
    # that is not the host's first takes the host's programs and links by ID; the kernel allows both
    # only with CAP_SYS_ADMIN.  Once loaded, this process holds fds of its own VM's maps only.
    # Nothing hostile is read yet: only the installed object and the admin's tunables; the VMM's
    # socket is read after the drop, and no thread exists before it.
    engine, engine_error = make_engine(args.vmm_pid, tunables, args.pin_root, stats_fd, args.program)
    try:
        confine(engine)
        sandbox.drop_capabilities()
        sandbox.set_no_new_privs()
        sandbox.trim_memory()
    except (OSError, ValueError, TypeError) as e:
        log.error("sandbox setup failed: %s", e)
        if engine is not None:
            engine.close()
        return 1
    if engine is not None and heartbeat is not None and hasattr(engine, "set_heartbeat"):
        engine.set_heartbeat(heartbeat)  # beats while the actuator keeps up: the guardian sees the throttler live
    service = PolicyService(args.vmm_pid, engine, engine_error, os.path.join(args.pin_root, str(args.vmm_pid)))
    try:
        if args.no_seccomp:
            log.warning("seccomp disabled (--no-seccomp)")
        elif not sandbox.install_seccomp():
            # fail closed: a policy process without its allowlist holds CAP_SYS_NICE and CAP_BPF unconfined
            log.error("libseccomp not found: refusing to run without the seccomp allowlist (scripts/setup.sh)")
            return 1
        serve(sock, service)
    except Exception as e:  # one line in the VMM's log (traceback with -v); the VMM restores the threads
        log.error("policy process failed: %s: %s", type(e).__name__, e, exc_info=args.verbose)
        return 1
    finally:
        _ignore_exit_signals()
        service.close()
        if heartbeat is not None:
            if engine is not None and hasattr(engine, "set_heartbeat"):
                engine.set_heartbeat(None)
            heartbeat.close()
    return 0


def _heartbeat(fd: int | None) -> Heartbeat | None:
    """Map the VMM guardian's heartbeat memfd (if given) and close the descriptor."""
    if fd is None:
        return None
    try:
        return Heartbeat(fd)
    finally:
        os.close(fd)


if __name__ == "__main__":
    sys.exit(main())
