"""The host's one set of policy programs, shared by every VM's policy process.

Every host context switch runs each attached `sched_switch` program, so the programs are loaded once
per host (per policy object), not once per VM.  What each VM owns lives in its own maps, which the
host's outer maps (`ARRAY_OF_MAPS`) hold at the VM's slot, and `vm_slot` maps the VMM's tgid to that
slot (pvsched.bpf.c).

Lifetime, without a daemon and without a race:
- The links are never pinned.  Every policy process holds an fd of every link, so the programs stay
  attached while any VM's policy process lives and detach when the last one ends, even by SIGKILL.
- The first policy process loads and attaches the programs, and pins the outer maps and the IDs of
  the programs and links in <pin_root>/host/<policy>-<digest of its object>/.  A later one takes fds
  of the same programs and links by those IDs (it still holds CAP_SYS_ADMIN then) and checks that
  each is the one named.  If any is gone, no policy process holds them any more: the pins are stale
  and it loads afresh.
- Joins and leaves take an exclusive flock on <pin_root>/host, so two VMs that start or end at once
  see one state.

Who writes what: a policy process inserts its own maps into the outer maps while it is still
privileged, then closes every fd of the outer maps; once sandboxed it holds fds of its own VM's maps
only.  The VMM (trusted) removes the entries after its policy process has ended (leave()), and the
last VM to leave removes the host's pins.  Entries of VMMs that are gone (SIGKILL) are dropped by the
next join.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from pyvmm.common import libbpf
from pyvmm.common.libbpf import check, string
from pyvmm.common.pins import PIN_ROOT
from pyvmm.common.procfs import pid_alive
from pyvmm.common.safe_fs import check_private_dir, ensure_private_dir, remove_tree_nofollow
from pyvmm.policy.policy_types import consts
from pyvmm.policy.policy_types import ffi as pffi

__all__ = ["OUTER_MAPS", "SHARED_MAPS", "ProgIds", "collect", "host_dir", "leave", "locked", "map_keys", "mark_vmm",
           "open_shared", "read_ids", "register_vm", "take", "write_ids"]

log = logging.getLogger("pvsched.host")

HOST = "host"
# Each VM's map (the object's name) -> the host's outer map that holds it at the VM's slot.
OUTER_MAPS = {"vcpus": "vm_vcpus", "tunables": "vm_tunables", "stats": "vm_stats", "apic_tid": "vm_apic_tid",
              "events": "vm_events", "vm_budget": "vm_budgets", "clock": "vm_clock"}
# Pinned in the host's folder: the outer maps, each VMM's slot in them and its bit, whom each policy
# process serves, the programs' IDs.
SHARED_MAPS = (*OUTER_MAPS.values(), "vm_slot", "vmm_bits", "policy_vm", "host_ids")


@dataclass
class ProgIds:
    """One program of the object as the host runs it: its ID, and its link's (0 for a syscall program)."""

    prog_id: int
    link_id: int


def host_root(pin_root: str | os.PathLike[str] = PIN_ROOT) -> Path:
    """The folder of every policy's host pins, and the lock that orders joins and leaves."""
    return Path(pin_root) / HOST


def host_dir(pin_root: str | os.PathLike[str], obj_path: str | os.PathLike[str]) -> Path:
    """Where the host's shared maps of the policy object `obj_path` are pinned: <policy>-<digest of the object>.

    A VM joins only programs built from the same object: after an upgrade, the new build's VMs load a set
    of their own (map layouts may differ), and the old set goes with the last of the old VMs."""
    data = Path(obj_path).read_bytes()
    return host_root(pin_root) / f"{Path(obj_path).name.removesuffix('.bpf.o')}-{hashlib.sha256(data).hexdigest()[:16]}"


@contextlib.contextmanager
def locked(pin_root: str | os.PathLike[str] = PIN_ROOT) -> Iterator[Path]:
    """Hold the host's lock (flock on <pin_root>/host, a 0700 folder of ours) while joining or leaving."""
    root = ensure_private_dir(host_root(pin_root))
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield root
    finally:
        os.close(fd)  # releases the lock


def _get(path: Path, flags: int = 0) -> int:
    """fd of the object pinned at `path` (-1 with errno set if there is none)."""
    f = libbpf.ffi()
    opts = f.new("struct bpf_obj_get_opts *", {"sz": f.sizeof("struct bpf_obj_get_opts"), "file_flags": flags})
    return libbpf.lib().bpf_obj_get_opts(str(path).encode(), opts)


def read_ids(folder: Path) -> list[ProgIds] | None:
    """The programs' and links' IDs pinned in `folder`, in the object's order; None if there are none."""
    fd = _get(folder / "host_ids", libbpf.BPF_F_RDONLY)
    if fd < 0:
        return None
    try:
        out, v = [], pffi().new("struct pvsched_prog_ids *")
        for i in range(consts().PVSCHED_MAX_PROGS):
            check(libbpf.lib().bpf_map_lookup_elem(fd, pffi().new("__u32 *", i), v), "reading the host's program IDs")
            out.append(ProgIds(v.prog_id, v.link_id))
        return out
    finally:
        os.close(fd)


def write_ids(fd: int, ids: list[ProgIds]) -> None:
    """Record the programs' and links' IDs (object order) in the host_ids map `fd`."""
    v = pffi().new("struct pvsched_prog_ids *")
    for i, pid in enumerate(ids):
        v.prog_id, v.link_id = pid.prog_id, pid.link_id
        check(libbpf.lib().bpf_map_update_elem(fd, pffi().new("__u32 *", i), v, libbpf.BPF_ANY),
              "recording the host's program IDs")


def _prog_name(fd: int) -> str:
    f = libbpf.ffi()
    info = f.new("struct bpf_prog_info *")
    n = f.new("uint32_t *", f.sizeof("struct bpf_prog_info"))
    check(libbpf.lib().bpf_obj_get_info_by_fd(fd, info, n), "program info")
    return string(info.name)


def _link_prog(fd: int) -> int:
    f = libbpf.ffi()
    info = f.new("struct bpf_link_info *")
    n = f.new("uint32_t *", f.sizeof("struct bpf_link_info"))
    check(libbpf.lib().bpf_obj_get_info_by_fd(fd, info, n), "link info")
    return info.prog_id


def take(ids: list[ProgIds], names: list[str]) -> list[tuple[int, int]] | None:
    """fds (program, link or -1) of the host's running programs, one per name of `names` (object order).

    None when any of them is gone or is not the program of that name: then no policy process holds
    them any more and the caller loads its own.  Needs CAP_SYS_ADMIN (get-fd-by-ID)."""
    lib, out = libbpf.lib(), []
    try:
        for pid, name in zip(ids, names):
            if not pid.prog_id:
                out.append((-1, -1))
                continue
            link = -1
            if pid.link_id:
                link = _by_id(lib.bpf_link_get_fd_by_id, pid.link_id, "link")
                if link < 0 or _link_prog(link) != pid.prog_id:
                    raise LookupError(f"link {pid.link_id}")
            out.append((-1, link))  # recorded before the program's fd, so a failure below closes the link
            prog = _by_id(lib.bpf_prog_get_fd_by_id, pid.prog_id, "program")
            if prog < 0 or _prog_name(prog) != name[:15]:
                if prog >= 0:
                    os.close(prog)
                raise LookupError(f"program {pid.prog_id}")
            out[-1] = (prog, link)
        return out
    except BaseException as e:
        for prog, link in out:
            for fd in (prog, link):
                if fd >= 0:
                    os.close(fd)
        if isinstance(e, LookupError):
            log.info("pvsched: the host's programs are gone (%s): loading them afresh", e)
            return None
        raise


def _by_id(get, obj_id: int, what: str) -> int:
    """An fd of the object with ID `obj_id`, or -1 if there is none; LibbpfError if we may not take it."""
    fd = get(obj_id)
    if fd < 0:
        err = libbpf.ffi().errno or errno.ENOENT
        if err != errno.ENOENT:
            raise libbpf.LibbpfError(err, f"taking the host's {what} {obj_id}: {os.strerror(err)} (a later VM "
                                          "shares the host's programs by ID, which needs CAP_SYS_ADMIN)")
    return fd


def _links_alive(folder: Path) -> bool:
    """Whether any link recorded in `folder` still exists (True when that cannot be told)."""
    try:
        ids = read_ids(folder)
    except OSError:
        return True
    for pid in ids or []:
        if pid.link_id:
            try:
                fd = _by_id(libbpf.lib().bpf_link_get_fd_by_id, pid.link_id, "link")
            except OSError:
                return True
            if fd >= 0:
                os.close(fd)
                return True
    return False


def map_keys(fd: int) -> list[int]:
    """The keys of the hash map `fd` (VMM tgids in vm_slot, policy process pids in policy_vm)."""
    lib, f = libbpf.lib(), pffi()
    keys, key, nxt = [], f.NULL, f.new("__u32 *")
    while lib.bpf_map_get_next_key(fd, key, nxt) == 0:
        keys.append(nxt[0])
        key = f.new("__u32 *", nxt[0])
    return keys


def mark_vmm(bits_fd: int, tgid: int, on: bool) -> None:
    """Set (or clear) VMM `tgid`'s bit in the vmm_bits map, the programs' fast path; under the host's lock."""
    lib, f = libbpf.lib(), pffi()
    if not 0 < tgid < 64 * consts().PVSCHED_TGID_WORDS:
        raise ValueError(f"tgid {tgid} is outside the kernel's PID range")
    word, value = f.new("__u32 *", tgid // 64), f.new("__u64 *")
    check(lib.bpf_map_lookup_elem(bits_fd, word, value), f"reading the VMM bits of tgid {tgid}")
    bit = 1 << (tgid % 64)
    value[0] = value[0] | bit if on else value[0] & ~bit
    check(lib.bpf_map_update_elem(bits_fd, word, value, libbpf.BPF_ANY), f"writing the VMM bits of tgid {tgid}")


def _slot(outer: dict[str, int], tgid: int) -> int | None:
    value = pffi().new("__u32 *")
    if libbpf.lib().bpf_map_lookup_elem(outer["vm_slot"], pffi().new("__u32 *", tgid), value) != 0:
        return None
    return value[0]


def register_vm(outer: dict[str, int], tgid: int, vm_maps: dict[str, int]) -> int:
    """Put VMM `tgid`'s maps (name -> fd) at a free slot of the outer maps, then its slot, then its bit:
    the programs see the VM only once all of it is in place.  Under the host's lock; the slot."""
    lib, f = libbpf.lib(), pffi()
    slot = _slot(outer, tgid)  # a VMM registered again keeps its slot
    if slot is None:
        used = {_slot(outer, t) for t in map_keys(outer["vm_slot"])}
        slot = next((i for i in range(consts().PVSCHED_MAX_VMS) if i not in used), None)
        if slot is None:
            raise libbpf.LibbpfError(errno.ENOSPC, f"the host's programs serve {consts().PVSCHED_MAX_VMS} VMs "
                                                   "already: no slot for another")
    key = f.new("__u32 *", slot)
    for name, outer_name in OUTER_MAPS.items():
        check(lib.bpf_map_update_elem(outer[outer_name], key, f.new("__u32 *", vm_maps[name]), libbpf.BPF_ANY),
              f"registering the VM's map {name}")
    check(lib.bpf_map_update_elem(outer["vm_slot"], f.new("__u32 *", tgid), key, libbpf.BPF_ANY),
          "registering the VM's slot")
    mark_vmm(outer["vmm_bits"], tgid, True)
    return slot


def _delete_vm(outer: dict[str, int], tgid: int) -> None:
    mark_vmm(outer["vmm_bits"], tgid, False)  # first: the programs stop looking for the VM before its maps go
    slot = _slot(outer, tgid)
    if slot is None:
        return
    libbpf.lib().bpf_map_delete_elem(outer["vm_slot"], pffi().new("__u32 *", tgid))
    for name in OUTER_MAPS.values():
        libbpf.lib().bpf_map_delete_elem(outer[name], pffi().new("__u32 *", slot))


def collect(outer: dict[str, int]) -> list[int]:
    """Drop the entries of VMMs and policy processes that are gone (a SIGKILL'd run); the VMMs' tgids."""
    gone = [t for t in map_keys(outer["vm_slot"]) if not pid_alive(t)]
    for tgid in gone:
        _delete_vm(outer, tgid)
    for pid in map_keys(outer["policy_vm"]):
        if not pid_alive(pid):
            libbpf.lib().bpf_map_delete_elem(outer["policy_vm"], pffi().new("__u32 *", pid))
    return gone


def open_shared(folder: Path) -> dict[str, int]:
    """fds of the host's shared maps pinned in `folder` (read-write: the caller is trusted and privileged)."""
    fds: dict[str, int] = {}
    try:
        for name in SHARED_MAPS:
            fd = _get(folder / name)
            if fd < 0:
                err = libbpf.ffi().errno or errno.ENOENT
                raise libbpf.LibbpfError(err, f"opening {folder / name}: {os.strerror(err)}")
            fds[name] = fd
    except BaseException:
        for fd in fds.values():
            os.close(fd)
        raise
    return fds


def leave(vmm_pid: int, policy_pid: int | None = None, pin_root: str | os.PathLike[str] = PIN_ROOT) -> None:
    """Remove VMM `vmm_pid`'s entries (and policy process `policy_pid`'s) from every policy's host maps;
    the last VM out removes the host's pins.  For the VMM, once its policy process has ended."""
    root = host_root(pin_root)
    try:
        check_private_dir(root)
    except FileNotFoundError:
        return
    with locked(pin_root):
        for folder in sorted(p for p in root.iterdir() if not p.is_symlink() and p.is_dir()):
            try:
                outer = open_shared(folder)
            except OSError as e:
                # another build's layout, or a first load that died half-way: removed once nothing runs from it
                if not _links_alive(folder):
                    log.info("pvsched: %s is incomplete (%s) and nothing runs from it: removed", folder, e)
                    remove_tree_nofollow(folder)
                continue
            try:
                _delete_vm(outer, vmm_pid)
                if policy_pid:
                    libbpf.lib().bpf_map_delete_elem(outer["policy_vm"], pffi().new("__u32 *", policy_pid))
                collect(outer)
                empty = not map_keys(outer["vm_slot"])
            finally:
                for fd in outer.values():
                    os.close(fd)
            if empty:
                remove_tree_nofollow(folder)
