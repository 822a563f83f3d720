"""Open, load, attach and pin the BPF policy object; map access; per-program run-time stats; one cleanup.

Works with CAP_BPF + CAP_PERFMON (no CAP_SYS_ADMIN): tp_btf programs, syscall
programs for the backstop and for starting the throttle clock (a BPF timer),
maps pinned under <pin_root>/<vmm-pid>/ (the clock's map is not: its timer
stops with the process).
Links are never pinned: when the process dies, even by SIGKILL, its links
close and every program detaches; only map pins can outlive it, and
remove_stale_pins() clears those at the next start.
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
from pyvmm.common.safe_fs import ensure_private_dir
from pyvmm.policy import host_budget
from pyvmm.policy.policy_types import consts, stat_descriptions
from pyvmm.policy.policy_types import ffi as pffi
from pyvmm.policy.tunables import Tunables

log = logging.getLogger("pvsched.bpf")

# Programs without which there is no policy; the rest are attached where the kernel has them.
REQUIRED_PROGS = ("pvs_switch", "pvs_wakeup", "pvs_exit", "pvs_backstop", "pvs_clock_start")
PINNED_MAPS = ("vcpus", "tunables", "stats", "events", "apic_tid", "vm_budget")
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
    """One BPF program of the object and what became of it."""

    name: str
    section: str
    ptr: object
    link: object = None
    status: str = "not loaded"  # attached | loaded | unavailable: <why>
    fd: int = -1


@dataclass
class BpfPolicy:
    """The loaded policy object: programs, links, map fds and pins for one VMM."""

    obj_path: Path
    vmm_pid: int
    pin_dir: Path | None
    programs: dict[str, Program] = field(default_factory=dict)
    maps: dict[str, int] = field(default_factory=dict)
    _obj: object = None
    _map_ptrs: dict[str, object] = field(default_factory=dict)
    _closed: bool = False
    host_budget_fd: int = -1  # libbpf's, closed with the object

    # --- set-up ---------------------------------------------------------
    def open_load_attach(self, tunables: Tunables) -> None:
        """Open the object, drop programs this kernel lacks, load, set tunables, attach, pin."""
        _route_libbpf_output()
        lib, f = libbpf.lib(), libbpf.ffi()
        self._obj = check_ptr(lib.bpf_object__open_file(str(self.obj_path).encode(), f.NULL),
                              f"opening {self.obj_path}")
        prog = lib.bpf_object__next_program(self._obj, f.NULL)
        while prog != f.NULL:
            name, sec = string(lib.bpf_program__name(prog)), string(lib.bpf_program__section_name(prog))
            p = Program(name, sec, prog)
            self.programs[name] = p
            if sec.startswith("tp_btf/") and name not in REQUIRED_PROGS and not _tracepoint_in_btf(sec[7:]):
                lib.bpf_program__set_autoload(prog, False)
                p.status = f"unavailable: no tracepoint {sec[7:]} in this kernel"
                log.info("pvsched: optional program %s not loaded (%s)", name, p.status)
            prog = lib.bpf_object__next_program(self._obj, prog)
        missing = [n for n in REQUIRED_PROGS if n not in self.programs]
        if missing:
            raise LibbpfError(errno.ENOENT, f"{self.obj_path} lacks programs {missing}: rebuild bpf/")
        self._set_rodata({"vmm_pid": self.vmm_pid})
        self._share_host_budget()
        check(lib.bpf_object__load(self._obj), f"loading BPF policy {self.obj_path.name}")
        self.host_budget_fd = lib.bpf_map__fd(check_ptr(lib.bpf_object__find_map_by_name(self._obj, b"host_budget"),
                                                        "map host_budget"))
        for name in PINNED_MAPS:
            m = check_ptr(lib.bpf_object__find_map_by_name(self._obj, name.encode()), f"map {name}")
            self._map_ptrs[name] = m
            self.maps[name] = check(lib.bpf_map__fd(m), f"fd of map {name}")
        self.set_tunables(tunables)
        for p in self.programs.values():
            if p.status.startswith("unavailable"):
                continue
            p.fd = lib.bpf_program__fd(p.ptr)
            p.status = "loaded"
            if p.section == "syscall":
                continue  # run on demand (backstop, clock start), never attached
            link = lib.bpf_program__attach(p.ptr)
            if link == f.NULL:
                err = f.errno or errno.EIO
                if p.name in REQUIRED_PROGS:
                    raise LibbpfError(err, f"attaching {p.name} ({p.section}): {os.strerror(err)}")
                p.status = f"unavailable: attach failed: {os.strerror(err)}"
                log.warning("pvsched: optional program %s not attached (%s)", p.name, os.strerror(err))
                continue
            p.link, p.status = link, "attached"
        if self.pin_dir is not None:
            self._pin()
        self.start_clock()
        attached = [p.name for p in self.programs.values() if p.status == "attached"]
        absent = [p.name for p in self.programs.values() if p.status.startswith("unavailable")]
        log.info("pvsched: attached %s%s", ", ".join(attached) or "nothing",
                 f"; not on this kernel: {', '.join(absent)}" if absent else "")

    def _share_host_budget(self) -> None:
        """Put the host's pinned budget map (read-only fd) in place of the object's own, before load.

        Without pins (a bench's or a test's private load) the object keeps its own, zeroed: no host budget."""
        if self.pin_dir is None:
            return
        lib = libbpf.lib()
        m = check_ptr(lib.bpf_object__find_map_by_name(self._obj, b"host_budget"), "map host_budget")
        fd = host_budget.shared_fd(self.pin_dir.parent)
        try:
            check(lib.bpf_map__reuse_fd(m, fd), "sharing the host budget map")
        finally:
            os.close(fd)  # libbpf keeps its own duplicate

    def host_budget(self) -> dict:
        """The host budget's entry as this object's programs see it ({} if unreadable; zeros without pins)."""
        f = pffi()
        v = f.new("struct pvsched_host_budget *")
        if self.host_budget_fd < 0 or libbpf.lib().bpf_map_lookup_elem(self.host_budget_fd, f.new("__u32 *", 0), v):
            return {}
        return host_budget.describe(v)

    def _rodata(self) -> tuple[object, int, dict[str, tuple[int, int]]]:
        """The .rodata map, its size, and each of its variables' (offset, size), from the object's BTF."""
        lib, f = libbpf.lib(), libbpf.ffi()
        m = check_ptr(lib.bpf_object__find_map_by_name(self._obj, b".rodata"), f"{self.obj_path.name}: map .rodata")
        size = f.new("size_t *")
        lib.bpf_map__initial_value(m, size)
        btf = check_ptr(lib.bpf_object__btf(self._obj), f"{self.obj_path.name}: BTF")
        sec_id = check(lib.btf__find_by_name_kind(btf, b".rodata", libbpf.BTF_KIND_DATASEC), ".rodata in BTF")
        sec = lib.btf__type_by_id(btf, sec_id)
        infos = f.cast("struct btf_var_secinfo *", sec + 1)  # vlen (info's low 16 bits) records follow a DATASEC
        vars_ = {}
        for i in range(sec.info & 0xFFFF):
            name = string(lib.btf__name_by_offset(btf, lib.btf__type_by_id(btf, infos[i].type).name_off))
            vars_[name] = (infos[i].offset, infos[i].size)
        return m, size[0], vars_

    def _set_rodata(self, values: dict[str, int]) -> None:
        """Set __u32 `const volatile` globals before load, found by name in the BTF (what a skeleton does).

        libbpf freezes .rodata at load: the verifier then knows these values, and nothing can change them."""
        lib, f = libbpf.lib(), libbpf.ffi()
        m, size, vars_ = self._rodata()
        data = f.cast("char *", check_ptr(lib.bpf_map__initial_value(m, f.new("size_t *")), ".rodata initial value"))
        for name, value in values.items():
            off, n = vars_.get(name, (0, 0))
            if n != 4 or off + n > size:
                raise LibbpfError(errno.ENOENT, f"{self.obj_path} has no const volatile __u32 {name}: "
                                                "rebuild pyvmm/policy")
            f.cast("uint32_t *", data + off)[0] = value

    def rodata_value(self, name: str) -> int:
        """A __u32 `const volatile` global as the kernel holds it (the frozen .rodata map, read back)."""
        lib, f = libbpf.lib(), libbpf.ffi()
        m, size, vars_ = self._rodata()
        buf = f.new("char[]", size)
        check(lib.bpf_map_lookup_elem(lib.bpf_map__fd(m), f.new("uint32_t *", 0), buf), "reading .rodata")
        return f.cast("uint32_t *", buf + vars_[name][0])[0]

    def _pin(self) -> None:
        lib = libbpf.lib()
        ensure_private_dir(self.pin_dir.parent)  # both 0700 and our own, or refused (pyvmm/common/pins.py)
        ensure_private_dir(self.pin_dir)
        for name, m in self._map_ptrs.items():
            path = self.pin_dir / name
            if path.exists():
                path.unlink()  # a previous run for the same VMM pid
            check(lib.bpf_map__pin(m, str(path).encode()), f"pinning map {name} at {path}")

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
        ncpu = lib.libbpf_num_possible_cpus()
        vals = f.new("__u64[]", max(ncpu, 1))
        out = {}
        for i, name in enumerate(stat_descriptions()):
            if lib.bpf_map_lookup_elem(self.maps["stats"], f.new("__u32 *", i), vals) == 0:
                out[name] = sum(vals[c] for c in range(ncpu))
            else:
                out[name] = 0
        return out

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
    def close(self) -> None:
        """Detach every link, unpin, remove the pin directory, free the object; idempotent."""
        if self._closed:
            return
        self._closed = True
        lib = libbpf.lib()
        for p in self.programs.values():
            if p.link is not None:
                lib.bpf_link__destroy(p.link)
                p.link, p.status = None, "detached"
        if self.pin_dir is not None:
            remove_pin_dir(self.pin_dir)
        if self._obj is not None:
            lib.bpf_object__close(self._obj)
            self._obj = None
        self.maps.clear()


def stats_enabled() -> bool:
    """True when the kernel collects BPF run time (kernel.bpf_stats_enabled or an open stats fd)."""
    try:
        return BPF_STATS_ENABLED.read_text().strip() == "1"
    except OSError:
        return False


def enable_stats() -> int:
    """Turn on BPF run-time stats while the returned fd stays open (needs CAP_SYS_ADMIN: call before sandboxing)."""
    return check(libbpf.lib().bpf_enable_stats(libbpf.BPF_STATS_RUN_TIME), "enabling BPF stats")
