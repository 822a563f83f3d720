"""Load or share the host's BPF policy programs, make this VM's maps, pin them; map access; run-time stats; one cleanup.

Works with CAP_BPF + CAP_PERFMON (no CAP_SYS_ADMIN) once set up: tp_btf programs, syscall programs
for the backstop and for starting the throttle clock (a BPF timer), this VM's maps pinned under
<pin_root>/<vmm-pid>/ (the clock's map is not: its timer stops with the process).  Setting up takes
CAP_SYS_ADMIN where a later VM shares the host's programs (pyvmm/policy/host_programs.py).
Links are never pinned: each policy process holds an fd of every link, so the programs detach when
the last policy process dies, even by SIGKILL; only map pins can outlive it, and the next start
clears those (remove_stale_pins(), host_programs.collect()).
"""

from __future__ import annotations

import errno
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from pyvmm.common import libbpf
from pyvmm.common.libbpf import LibbpfError, check, check_ptr, string
from pyvmm.common.pins import remove_pin_dir
from pyvmm.common.safe_fs import ensure_private_dir, remove_tree_nofollow
from pyvmm.policy import host_budget, host_programs
from pyvmm.policy.policy_types import consts, stat_descriptions
from pyvmm.policy.policy_types import ffi as pffi
from pyvmm.policy.tunables import Tunables

log = logging.getLogger("pvsched.bpf")

# Programs without which there is no policy; the rest are attached where the kernel has them.
REQUIRED_PROGS = ("pvs_switch", "pvs_wakeup", "pvs_exit", "pvs_backstop", "pvs_clock_start")
# This VM's own maps, pinned for bpftool (the clock's is not: its timer lives as long as the policy process).
PINNED_MAPS = ("vcpus", "tunables", "stats", "events", "apic_tid", "vm_budget")
VM_MAPS = (*PINNED_MAPS, "clock")
KVM_BTF_MODULES = ("kvm", "kvm_intel", "kvm_amd", "kvm_pvm")
BPF_STATS_ENABLED = Path("/proc/sys/kernel/bpf_stats_enabled")

_print_cb = None  # keeps the libbpf print callback alive


def _route_libbpf_output() -> None:
    """Send libbpf's own messages to logging (warnings as warnings, debug only when asked)."""
    global _print_cb
    if _print_cb is not None:
        return
    f = libbpf.ffi()
    f.cdef("int vsnprintf(char *str, size_t size, const char *format, void *ap);")
    libc = f.dlopen(None)
    levels = {0: logging.WARNING, 1: logging.INFO, 2: logging.DEBUG}

    @f.callback("int(int, const char *, void *)")
    def cb(level, fmt, ap):
        lvl = levels.get(level, logging.DEBUG)
        if log.isEnabledFor(lvl):
            buf = f.new("char[]", 1 << 18)
            libc.vsnprintf(buf, 1 << 18, fmt, ap)
            log.log(lvl, "%s", f.string(buf).decode(errors="replace").rstrip())
        return 0

    _print_cb = cb
    libbpf.lib().libbpf_set_print(cb)


def _tracepoint_in_btf(tp: str) -> bool:
    """True when this kernel's BTF (vmlinux or a KVM module) has tracepoint `tp`."""
    lib, f = libbpf.lib(), libbpf.ffi()
    name = f"btf_trace_{tp}".encode()
    vml = lib.btf__load_vmlinux_btf()
    if vml == f.NULL:
        return True  # cannot tell: let load/attach decide
    try:
        if lib.btf__find_by_name_kind(vml, name, libbpf.BTF_KIND_TYPEDEF) > 0:
            return True
        for mod in KVM_BTF_MODULES:
            if not Path(f"/sys/kernel/btf/{mod}").exists():
                continue
            mb = lib.btf__load_module_btf(mod.encode(), vml)
            if mb == f.NULL:
                continue
            try:
                if lib.btf__find_by_name_kind(mb, name, libbpf.BTF_KIND_TYPEDEF) > 0:
                    return True
            finally:
                lib.btf__free(mb)
        return False
    finally:
        lib.btf__free(vml)


@dataclass
class Program:
    """One BPF program of the host's set and what this process holds of it."""

    name: str
    section: str
    ptr: object = None
    status: str = "not loaded"  # attached | loaded | unavailable: <why>
    fd: int = -1                # this process's own fd (a dup, or taken by ID): kept after the object closes
    link_fd: int = -1           # this process's fd of the program's link: the link lives while any VM holds one


@dataclass
class BpfPolicy:
    """One VM's share of the host's policy: the programs (loaded by the first VM), this VM's maps, its pins.

    With `pin_dir` None the set is private to this object (a bench's or a test's load): nothing is pinned
    or shared, there is no host budget, and the outer maps stay open (alias_vm())."""

    obj_path: Path
    vmm_pid: int
    pin_dir: Path | None
    programs: dict[str, Program] = field(default_factory=dict)
    maps: dict[str, int] = field(default_factory=dict)
    shared: bool = False         # True: this VM joined programs another VM's policy process loaded
    host_budget_fd: int = -1
    _outer: dict[str, int] = field(default_factory=dict)  # private sets only
    _closed: bool = False

    # --- set-up ---------------------------------------------------------
    def open_load_attach(self, tunables: Tunables) -> None:
        """Join the host's programs (or load and attach them first), make and register this VM's maps, pin."""
        _route_libbpf_output()
        if self.pin_dir is None:
            self._setup(None, tunables)
        else:
            ensure_private_dir(self.pin_dir.parent)  # both 0700 and our own, or refused (pyvmm/common/pins.py)
            with host_programs.locked(self.pin_dir.parent):
                self._setup(host_programs.host_dir(self.pin_dir.parent, self.obj_path), tunables)
        self.start_clock()
        attached = [p.name for p in self.programs.values() if p.status == "attached"]
        absent = [p.name for p in self.programs.values() if p.status.startswith("unavailable")]
        log.info("pvsched: %s %s%s", "joined the host's programs:" if self.shared else "attached",
                 ", ".join(attached) or "nothing", f"; not on this kernel: {', '.join(absent)}" if absent else "")

    def _setup(self, folder: Path | None, tunables: Tunables) -> None:
        """The set-up under the host's lock (`folder`: the host's pins, None for a private set)."""
        lib, f = libbpf.lib(), libbpf.ffi()
        obj = check_ptr(lib.bpf_object__open_file(str(self.obj_path).encode(), f.NULL), f"opening {self.obj_path}")
        try:
            names = self._programs(obj)
            taken = None
            if folder is not None:
                ids = host_programs.read_ids(folder) if folder.is_dir() else None
                taken = host_programs.take(ids, names) if ids is not None else None
                if taken is None:
                    remove_tree_nofollow(folder)  # stale or none: this VM loads the host's programs
            self.shared = taken is not None
            if self.shared:
                for p in self.programs.values():
                    lib.bpf_program__set_autoload(p.ptr, False)  # only the maps: this VM's own, and the host's
                self._reuse_shared(obj, folder)
            self._share_host_budget(obj)
            check(lib.bpf_object__load(obj), f"loading BPF policy {self.obj_path.name}")
            for name in VM_MAPS:
                fd = check(lib.bpf_map__fd(check_ptr(lib.bpf_object__find_map_by_name(obj, name.encode()),
                                                     f"map {name}")), f"fd of map {name}")
                self.maps[name] = os.dup(fd)
            if folder is not None:
                self.host_budget_fd = os.dup(_map_fd(obj, "host_budget"))
            self.set_tunables(tunables)  # before the VM is registered: the programs never see it without them
            if self.shared:
                self._adopt(taken)
            else:
                self._attach(obj, folder)
            outer = {n: _map_fd(obj, n) for n in host_programs.SHARED_MAPS}
            self._register(outer)
            if folder is None:
                self._outer = {n: os.dup(fd) for n, fd in outer.items()}
            else:
                host_programs.collect(outer)
                self._pin()
        except BaseException:
            self._close_fds()
            raise
        finally:
            lib.bpf_object__close(obj)  # its fds of the host's maps go with it: kept are this VM's and our dups

    def _programs(self, obj) -> list[str]:
        """Record the object's programs (object order, which host_ids follows); drop those this kernel lacks."""
        lib, f = libbpf.lib(), libbpf.ffi()
        self.programs.clear()
        prog = lib.bpf_object__next_program(obj, f.NULL)
        while prog != f.NULL:
            name, sec = string(lib.bpf_program__name(prog)), string(lib.bpf_program__section_name(prog))
            p = Program(name, sec, prog)
            self.programs[name] = p
            if sec.startswith("tp_btf/") and name not in REQUIRED_PROGS and not _tracepoint_in_btf(sec[7:]):
                lib.bpf_program__set_autoload(prog, False)
                p.status = f"unavailable: no tracepoint {sec[7:]} in this kernel"
                log.info("pvsched: optional program %s not loaded (%s)", name, p.status)
            prog = lib.bpf_object__next_program(obj, prog)
        missing = [n for n in REQUIRED_PROGS if n not in self.programs]
        if missing:
            raise LibbpfError(errno.ENOENT, f"{self.obj_path} lacks programs {missing}: rebuild bpf/")
        if len(self.programs) > consts().PVSCHED_MAX_PROGS:
            raise LibbpfError(errno.E2BIG, f"{self.obj_path} has more than {consts().PVSCHED_MAX_PROGS} programs")
        return list(self.programs)

    def _reuse_shared(self, obj, folder: Path) -> None:
        """Put the host's pinned outer maps in place of the object's own, before load."""
        lib = libbpf.lib()
        fds = host_programs.open_shared(folder)
        try:
            for name, fd in fds.items():
                check(lib.bpf_map__reuse_fd(_map(obj, name), fd), f"sharing the host's map {name}")
        finally:
            for fd in fds.values():
                os.close(fd)  # libbpf keeps its own duplicates, closed with the object

    def _share_host_budget(self, obj) -> None:
        """Put the host's pinned budget map (read-only fd) in place of the object's own, before load.

        Without pins (a bench's or a test's private load) the object keeps its own, zeroed: no host budget."""
        if self.pin_dir is None:
            return
        fd = host_budget.shared_fd(self.pin_dir.parent)
        try:
            check(libbpf.lib().bpf_map__reuse_fd(_map(obj, "host_budget"), fd), "sharing the host budget map")
        finally:
            os.close(fd)  # libbpf keeps its own duplicate

    def _adopt(self, taken: list[tuple[int, int]]) -> None:
        """Hold the host's running programs and links (fds taken by ID) as this VM's own."""
        for p, (prog, link) in zip(self.programs.values(), taken):
            p.ptr, p.fd, p.link_fd = None, prog, link
            if prog < 0:
                p.status = p.status if p.status.startswith("unavailable") else "unavailable: not loaded on this host"
            else:
                p.status = "attached" if link >= 0 else "loaded"

    def _attach(self, obj, folder: Path | None) -> None:
        """First VM on the host: attach every loaded program, keep our own fds, record their IDs, pin the host's maps."""
        lib, f = libbpf.lib(), libbpf.ffi()
        ids = []
        for p in self.programs.values():
            if p.status.startswith("unavailable"):
                ids.append(host_programs.ProgIds(0, 0))
                continue
            p.fd = os.dup(check(lib.bpf_program__fd(p.ptr), f"fd of {p.name}"))
            p.status = "loaded"
            if p.section != "syscall":  # syscall programs run on demand (backstop, clock start), never attached
                link = lib.bpf_program__attach(p.ptr)
                if link == f.NULL:
                    err = f.errno or errno.EIO
                    if p.name in REQUIRED_PROGS:
                        raise LibbpfError(err, f"attaching {p.name} ({p.section}): {os.strerror(err)}")
                    p.status = f"unavailable: attach failed: {os.strerror(err)}"
                    log.warning("pvsched: optional program %s not attached (%s)", p.name, os.strerror(err))
                else:
                    # our own fd holds the link; libbpf's goes with bpf_link__destroy
                    p.link_fd = os.dup(lib.bpf_link__fd(link))
                    lib.bpf_link__destroy(link)
                    p.status = "attached"
            ids.append(host_programs.ProgIds(_obj_id(p.fd), _obj_id(p.link_fd, "link") if p.link_fd >= 0 else 0))
        if folder is None:
            return
        host_ids = _map_fd(obj, "host_ids")
        host_programs.write_ids(host_ids, ids)
        ensure_private_dir(folder.parent)
        ensure_private_dir(folder)
        for name in host_programs.SHARED_MAPS:
            check(lib.bpf_map__pin(_map(obj, name), str(folder / name).encode()), f"pinning the host's map {name}")

    def _register(self, outer: dict[str, int]) -> None:
        """Put this VM's maps into the host's outer maps, at a slot for its VMM's tgid; this process serves that VM."""
        lib, f = libbpf.lib(), pffi()
        check(lib.bpf_map_update_elem(outer["policy_vm"], f.new("__u32 *", os.getpid()), f.new("__u32 *", self.vmm_pid),
                                      libbpf.BPF_ANY), "registering this policy process")
        host_programs.register_vm(outer, self.vmm_pid, self.maps)

    def alias_vm(self, tgid: int) -> None:
        """A private set only: register this VM's maps under one more tgid (a bench's N VMs in one set)."""
        if not self._outer:
            raise ValueError("alias_vm needs a private set (pin_dir None)")
        host_programs.register_vm(self._outer, tgid, self.maps)

    def host_budget(self) -> dict:
        """The host budget's entry as the programs see it ({} without pins or if unreadable)."""
        f = pffi()
        v = f.new("struct pvsched_host_budget *")
        if self.host_budget_fd < 0 or libbpf.lib().bpf_map_lookup_elem(self.host_budget_fd, f.new("__u32 *", 0), v):
            return {}
        return host_budget.describe(v)

    def _pin(self) -> None:
        ensure_private_dir(self.pin_dir)
        for name in PINNED_MAPS:
            path = self.pin_dir / name
            if path.exists():
                path.unlink()  # a previous run for the same VMM pid
            check(libbpf.lib().bpf_obj_pin(self.maps[name], str(path).encode()), f"pinning map {name} at {path}")

    # --- maps -------------------------------------------------------------
    def set_tunables(self, t: Tunables) -> None:
        """Write the whole tunables entry (the BPF side reads it at every event)."""
        f = pffi()
        val = f.new("struct pvsched_tunables *")
        t.fill(val)
        key = f.new("__u32 *", 0)
        check(libbpf.lib().bpf_map_update_elem(self.maps["tunables"], key, val, libbpf.BPF_ANY), "updating tunables")

    def add_vcpu(self, tid: int, value) -> None:
        """Register a vCPU thread (value: cffi struct pvsched_vcpu *); refuses a TID already there."""
        f = pffi()
        key = f.new("__u32 *", tid)
        check(libbpf.lib().bpf_map_update_elem(self.maps["vcpus"], key, value, libbpf.BPF_NOEXIST),
              f"registering vCPU thread {tid}")
        if 0 <= value.vcpu_id < consts().PVSCHED_MAX_VCPUS:
            check(libbpf.lib().bpf_map_update_elem(self.maps["apic_tid"], f.new("__u32 *", value.vcpu_id),
                                                   key, libbpf.BPF_ANY), "apic_tid")

    def remove_vcpu(self, tid: int, vcpu_id: int) -> None:
        """Unregister a vCPU thread: the programs stop posting for it."""
        f, lib = pffi(), libbpf.lib()
        lib.bpf_map_delete_elem(self.maps["vcpus"], f.new("__u32 *", tid))
        slot = f.new("__u32 *", vcpu_id)
        cur = f.new("__u32 *")
        if (0 <= vcpu_id < consts().PVSCHED_MAX_VCPUS and lib.bpf_map_lookup_elem(self.maps["apic_tid"], slot, cur) == 0
                and cur[0] == tid):
            lib.bpf_map_update_elem(self.maps["apic_tid"], slot, f.new("__u32 *", 0), libbpf.BPF_ANY)

    def vcpu(self, tid: int):
        """A copy of the vCPU entry (cffi struct pvsched_vcpu *), or None if not registered."""
        f = pffi()
        val = f.new("struct pvsched_vcpu *")
        if libbpf.lib().bpf_map_lookup_elem(self.maps["vcpus"], f.new("__u32 *", tid), val) != 0:
            return None
        return val

    def vm_budget(self) -> tuple[int, int]:
        """The VM's budget window: (window number, boosted ns of all vCPUs in it)."""
        f = pffi()
        val = f.new("struct pvsched_vm_budget *")
        if libbpf.lib().bpf_map_lookup_elem(self.maps["vm_budget"], f.new("__u32 *", 0), val) != 0:
            return 0, 0
        return val.window, val.boosted_ns

    def stats(self) -> dict[str, int]:
        """Per-CPU counters summed, by name (enum order)."""
        f, lib = pffi(), libbpf.lib()
        ncpu = max(lib.libbpf_num_possible_cpus(), 1)
        per_cpu = f.new("struct pvsched_stats[]", ncpu)  # the one entry, once per possible CPU
        if lib.bpf_map_lookup_elem(self.maps["stats"], f.new("__u32 *", 0), per_cpu) != 0:
            return dict.fromkeys(stat_descriptions(), 0)
        return {name: sum(per_cpu[c].count[i] for c in range(ncpu)) for i, name in enumerate(stat_descriptions())}

    def _run(self, name: str, what: str, ctx=None, ctx_size: int = 0) -> int:
        """Run syscall program `name` once (BPF_PROG_TEST_RUN) with `ctx`; its return value."""
        lf = libbpf.ffi()
        opts = lf.new("struct bpf_test_run_opts *")
        opts.sz = lf.sizeof("struct bpf_test_run_opts")
        if ctx is not None:
            opts.ctx_in, opts.ctx_size_in = ctx, ctx_size
        check(libbpf.lib().bpf_prog_test_run_opts(self.programs[name].fd, opts), what)
        return lf.cast("int32_t", opts.retval)

    def start_clock(self) -> None:
        """(Re)start the in-kernel throttle clock at the tunables' clock period."""
        rc = self._run("pvs_clock_start", "starting the throttle clock")
        if rc != 0:
            raise LibbpfError(-rc if rc < 0 else errno.EINVAL, f"starting the throttle clock: {os.strerror(-rc)}")

    def backstop(self, tid: int, slot_uaddr: int, reason: int = 0) -> int:
        """Run the backstop program for one vCPU (same decision code as the tracepoints)."""
        pf = pffi()
        ctx = pf.new("struct pvsched_backstop_ctx *")
        ctx.tid, ctx.reason, ctx.slot_uaddr = tid, reason, slot_uaddr
        return self._run("pvs_backstop", "running backstop", ctx, pf.sizeof("struct pvsched_backstop_ctx"))

    # --- introspection ----------------------------------------------------
    def program_stats(self) -> list[dict]:
        """Name, section, status and run_cnt/run_time_ns (bpf_prog_info) of every program."""
        f, lib = libbpf.ffi(), libbpf.lib()
        out = []
        for p in self.programs.values():
            row = {"name": p.name, "section": p.section, "status": p.status}
            if p.fd >= 0:
                info = f.new("struct bpf_prog_info *")
                n = f.new("uint32_t *", f.sizeof("struct bpf_prog_info"))
                if lib.bpf_obj_get_info_by_fd(p.fd, info, n) == 0:
                    row.update(id=info.id, run_cnt=info.run_cnt, run_time_ns=info.run_time_ns,
                               avg_ns=round(info.run_time_ns / info.run_cnt, 1) if info.run_cnt else None)
            out.append(row)
        return out

    # --- cleanup ------------------------------------------------------------
    def _close_fds(self) -> None:
        for p in self.programs.values():
            for fd in (p.link_fd, p.fd):
                if fd >= 0:
                    os.close(fd)
            p.fd = p.link_fd = -1
            p.ptr = None
            if p.status in ("attached", "loaded"):
                p.status = "detached"
        for fd in (*self.maps.values(), *self._outer.values(), self.host_budget_fd):
            if fd >= 0:
                os.close(fd)
        self.maps.clear()
        self._outer.clear()
        self.host_budget_fd = -1

    def close(self) -> None:
        """Let go of the programs (the last VM's close detaches them), unpin, leave the host's maps; idempotent.

        Inside the sandbox the host's folder is out of sight: the VMM removes this VM's entries once
        this process has ended (host_programs.leave())."""
        if self._closed:
            return
        self._closed = True
        self._close_fds()
        if self.pin_dir is not None:
            remove_pin_dir(self.pin_dir)
            if host_programs.host_root(self.pin_dir.parent).is_dir():
                try:
                    host_programs.leave(self.vmm_pid, os.getpid(), self.pin_dir.parent)
                except OSError as e:
                    log.debug("pvsched: leaving the host's maps: %s", e)


def stats_enabled() -> bool:
    """True when the kernel collects BPF run time (kernel.bpf_stats_enabled or an open stats fd)."""
    try:
        return BPF_STATS_ENABLED.read_text().strip() == "1"
    except OSError:
        return False


def enable_stats() -> int:
    """Turn on BPF run-time stats while the returned fd stays open (needs CAP_SYS_ADMIN: call before sandboxing)."""
    return check(libbpf.lib().bpf_enable_stats(libbpf.BPF_STATS_RUN_TIME), "enabling BPF stats")


def _map(obj, name: str):
    return check_ptr(libbpf.lib().bpf_object__find_map_by_name(obj, name.encode()), f"map {name}")


def _map_fd(obj, name: str) -> int:
    return check(libbpf.lib().bpf_map__fd(_map(obj, name)), f"fd of map {name}")


def _obj_id(fd: int, kind: str = "prog") -> int:
    """The kernel's ID of a program (or link) fd."""
    f = libbpf.ffi()
    info = f.new(f"struct bpf_{kind}_info *")
    n = f.new("uint32_t *", f.sizeof(f"struct bpf_{kind}_info"))
    check(libbpf.lib().bpf_obj_get_info_by_fd(fd, info, n), f"{kind} info")
    return info.id
