"""Where the policy's maps are pinned, and how their folders are made and removed safely.

Layout: <PIN_ROOT>/<vmm-pid>/<map name>, visible to bpftool.  The root is 0700 and root's own:
bpffs is world-writable and sticky on many hosts, so a local user could otherwise plant a folder
or a symlink there that the (root) policy process would then use or delete through.  Every step
here lstat()s and follows no symlink (pyvmm.common.safe_fs).
"""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

from pyvmm.common.procfs import pid_alive
from pyvmm.common.safe_fs import UnsafePathError, check_private_dir, ensure_private_dir, remove_tree_nofollow

__all__ = ["PIN_ROOT", "UnsafePathError", "ensure_pin_dir", "remove_pin_dir", "remove_stale_pins"]

PIN_ROOT = "/sys/fs/bpf/pvsched"

log = logging.getLogger("pvsched.pins")


def ensure_pin_dir(pin_root: str, vmm_pid: int) -> Path:
    """Create (or check) the 0700 root and this VMM's 0700 folder under it; UnsafePathError if either is not ours."""
    ensure_private_dir(pin_root)
    return ensure_private_dir(os.path.join(pin_root, str(vmm_pid)))


def remove_pin_dir(path: str | os.PathLike[str]) -> None:
    """Unlink every pin under `path` and remove it (bpffs: unlink drops the pin's reference); no symlink is followed.

    Inside the policy process's confined root the folder is a mount point, which cannot be removed
    there: it is emptied, and the VMM removes the folder once that process has ended."""
    remove_tree_nofollow(path, keep_top=os.path.ismount(path))


def remove_stale_pins(pin_root: str = PIN_ROOT) -> list[int]:
    """Remove <pin_root>/<pid>/ folders whose VMM is gone (a SIGKILL'd run); returns those pids.

    Only real folders named by a pid are touched: a symlink or a file there is left alone (and
    logged), and a root that is not our own 0700 folder is refused with UnsafePathError.
    """
    removed: list[int] = []
    try:
        check_private_dir(pin_root)
    except FileNotFoundError:
        return removed
    fd = os.open(pin_root, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        for name in os.listdir(fd):
            if not name.isdigit():
                continue
            try:
                st = os.lstat(name, dir_fd=fd)
            except FileNotFoundError:
                continue  # another VMM's policy process, starting too, removed it first
            if not stat.S_ISDIR(st.st_mode):
                log.warning("pvsched: %s/%s is not a pin folder (%s): left alone", pin_root, name,
                            "a symlink" if stat.S_ISLNK(st.st_mode) else "not a directory")
                continue
            if st.st_uid != os.geteuid() or pid_alive(int(name)):
                continue
            remove_tree_nofollow(name, dir_fd=fd)
            removed.append(int(name))
    finally:
        os.close(fd)
    return removed
