"""The host's RT budget: one pinned map shared by every VM's policy, set only by the host's admin.

A VM's budget (tunable vm_boost_share_pct) bounds one VM; N VMs would still take N times it.
This map bounds them together: the boosted vCPUs of all VMs may take `share_pct` of all of the
host's CPUs per window.  It is pinned at <pin_root>/host_budget, created on first use with the
default share, and kept across VMs (the admin's setting outlives them).

Who may change it: each policy process gets a read-only fd (BPF_F_RDONLY) to put in its object;
its programs count into the map, but its own fd cannot update it, and the pin is mode 0400, so
a process without CAP_DAC_OVERRIDE (every policy process after its sandbox drops capabilities)
cannot open it for writing.  `pyvmm host-budget` (root) sets it.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

from pyvmm.common import libbpf
from pyvmm.common.libbpf import LibbpfError, check
from pyvmm.common.pins import PIN_ROOT
from pyvmm.common.safe_fs import ensure_private_dir
from pyvmm.policy.policy_types import consts
from pyvmm.policy.policy_types import ffi as pffi

MAP_NAME = "host_budget"
PIN_MODE = 0o400
SHARE_RANGE = (1, 100)
WINDOW_MS_RANGE = (10, 10_000)


def pin_path(pin_root: str | os.PathLike[str] = PIN_ROOT) -> Path:
    """Where the host budget map is pinned."""
    return Path(pin_root) / MAP_NAME


def budget_ns(share_pct: int, window_ms: int, ncpus: int) -> int:
    """Boosted run time per window that `share_pct` of `ncpus` CPUs allows."""
    return share_pct * max(1, ncpus) * window_ms * 1_000_000 // 100


def _value(share_pct: int, window_ms: int, ncpus: int):
    v = pffi().new("struct pvsched_host_budget *")
    v.window_ns = window_ms * 1_000_000
    v.budget_ns = budget_ns(share_pct, window_ms, ncpus)
    v.share_pct = share_pct
    v.ncpus = ncpus
    return v


def describe(v) -> dict[str, int | float]:
    """A `struct pvsched_host_budget *` in words: share, CPUs, window, budget and the counted window's use."""
    return {"share_pct": v.share_pct, "ncpus": v.ncpus, "window_ms": v.window_ns // 1_000_000,
            "budget_ms": round(v.budget_ns / 1e6, 3), "window": v.window, "boosted_ms": round(v.boosted_ns / 1e6, 3)}


def _get(path: Path, flags: int) -> int:
    opts = libbpf.ffi().new("struct bpf_obj_get_opts *", {"sz": libbpf.ffi().sizeof("struct bpf_obj_get_opts"),
                                                           "file_flags": flags})
    return libbpf.lib().bpf_obj_get_opts(str(path).encode(), opts)


def _create(path: Path) -> None:
    """Create the map with the default share and pin it read-only; a racing creator's pin wins (EEXIST)."""
    lib, c = libbpf.lib(), consts()
    size = pffi().sizeof("struct pvsched_host_budget")
    fd = check(lib.bpf_map_create(libbpf.BPF_MAP_TYPE_ARRAY, MAP_NAME.encode(), 4, size, 1, libbpf.ffi().NULL),
               "creating the host budget map")
    try:
        value = _value(c.PVSCHED_HOST_SHARE_DEFAULT_PCT, c.PVSCHED_HOST_WINDOW_DEFAULT_MS, os.cpu_count() or 1)
        check(lib.bpf_map_update_elem(fd, pffi().new("__u32 *", 0), value, libbpf.BPF_ANY), "host budget value")
        if lib.bpf_obj_pin(fd, str(path).encode()) != 0:
            err = libbpf.ffi().errno
            if err != errno.EEXIST:
                raise LibbpfError(err, f"pinning the host budget at {path}: {os.strerror(err)}")
            return  # another VM's policy pinned its own first: that one is the host's
        os.chmod(path, PIN_MODE)
    finally:
        os.close(fd)


def shared_fd(pin_root: str | os.PathLike[str] = PIN_ROOT) -> int:
    """A read-only fd of the host's budget map, created and pinned on first use (root, before the sandbox)."""
    ensure_private_dir(pin_root)
    path = pin_path(pin_root)
    for _ in range(2):
        fd = _get(path, libbpf.BPF_F_RDONLY)
        if fd >= 0:
            return fd
        err = libbpf.ffi().errno
        if err != errno.ENOENT:
            raise LibbpfError(err, f"opening the host budget at {path}: {os.strerror(err)}")
        _create(path)
    raise LibbpfError(errno.ENOENT, f"the host budget at {path} vanished while it was created")


def read(pin_root: str | os.PathLike[str] = PIN_ROOT) -> dict[str, int]:
    """The host budget as it stands: share, window, budget and the current window's count."""
    fd = shared_fd(pin_root)
    try:
        v = pffi().new("struct pvsched_host_budget *")
        check(libbpf.lib().bpf_map_lookup_elem(fd, pffi().new("__u32 *", 0), v), "reading the host budget")
        return describe(v)
    finally:
        os.close(fd)


def set_share(share_pct: int, window_ms: int | None = None, pin_root: str | os.PathLike[str] = PIN_ROOT) -> dict:
    """Set the host's share (and window) for every VM, running or to come; ValueError out of range (root)."""
    if not SHARE_RANGE[0] <= share_pct <= SHARE_RANGE[1]:
        raise ValueError(f"share must be {SHARE_RANGE[0]}..{SHARE_RANGE[1]} (% of all CPUs), got {share_pct}")
    if window_ms is None:
        window_ms = read(pin_root)["window_ms"] or consts().PVSCHED_HOST_WINDOW_DEFAULT_MS
    if not WINDOW_MS_RANGE[0] <= window_ms <= WINDOW_MS_RANGE[1]:
        raise ValueError(f"window must be {WINDOW_MS_RANGE[0]}..{WINDOW_MS_RANGE[1]} ms, got {window_ms}")
    os.close(shared_fd(pin_root))  # created if absent
    path = pin_path(pin_root)
    fd = _get(path, 0)  # read-write: the pin is 0400, so this needs CAP_DAC_OVERRIDE (the admin's root)
    if fd < 0:
        err = libbpf.ffi().errno
        raise LibbpfError(err, f"opening the host budget at {path} for writing: {os.strerror(err)}")
    try:
        value = _value(share_pct, window_ms, os.cpu_count() or 1)
        check(libbpf.lib().bpf_map_update_elem(fd, pffi().new("__u32 *", 0), value, libbpf.BPF_ANY),
              "setting the host budget")
    finally:
        os.close(fd)
    return read(pin_root)
