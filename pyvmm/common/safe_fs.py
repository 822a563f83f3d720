"""File-system steps a root process takes safely: private folders, writes and deletes that follow no symlink.

pyvmm runs as root in folders other users can write (/sys/fs/bpf is world-writable and sticky on
many hosts, /tmp everywhere, and `fs.protected_symlinks` may be 0).  The rule: never follow a
symlink we did not make, never delete through one, and use a folder only once lstat shows it is
a real directory owned by us that nobody else can write.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path


class UnsafePathError(OSError):
    """A path is a symlink, has the wrong owner, or is writable by others: refused."""


def ensure_private_dir(path: str | os.PathLike[str], mode: int = 0o700) -> Path:
    """Create `path` (and missing parents, 0755) if needed; refuse unless it is our own directory, then set `mode`."""
    p = Path(path)
    if not p.parent.exists():
        p.parent.mkdir(parents=True, mode=0o755, exist_ok=True)
    try:
        os.mkdir(p, mode)
    except FileExistsError:
        pass
    check_private_dir(p, fix_mode=mode)
    return p


def check_private_dir(path: str | os.PathLike[str], fix_mode: int | None = None) -> None:
    """Raise UnsafePathError unless `path` is a directory (not a symlink) owned by this euid and closed to others.

    With `fix_mode`, a looser mode on a directory we own is tightened to it instead of refused.
    """
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode):
        raise UnsafePathError(errno.ELOOP, f"{path} is a symlink: refusing to use it")
    if not stat.S_ISDIR(st.st_mode):
        raise UnsafePathError(errno.ENOTDIR, f"{path} is not a directory")
    if st.st_uid != os.geteuid():
        raise UnsafePathError(errno.EPERM, f"{path} belongs to uid {st.st_uid}, not {os.geteuid()}: refusing "
                                           "to use it (remove it, or check who made it)")
    if fix_mode is None:
        if st.st_mode & 0o022:
            raise UnsafePathError(errno.EPERM, f"{path} is writable by others (mode {st.st_mode & 0o7777:o})")
    elif st.st_mode & 0o7777 != fix_mode:
        os.chmod(path, fix_mode, follow_symlinks=False)


def write_file_nofollow(path: str | os.PathLike[str], data: str | bytes, mode: int = 0o644,
                        append: bool = False) -> None:
    """Write (or append to) a regular file at `path`; refuse if `path` is a symlink (O_NOFOLLOW).

    Only the last component is checked: a symlink planted at the name in a shared folder is the
    attack; folders above it are the caller's choice.
    """
    flags = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC | (os.O_APPEND if append else os.O_TRUNC)
    try:
        fd = os.open(path, flags, mode)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise UnsafePathError(errno.ELOOP, f"{path} is a symlink: refusing to write through it") from None
        raise
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise UnsafePathError(errno.EINVAL, f"{path} is not a regular file")
        buf = data.encode() if isinstance(data, str) else data
        while buf:
            buf = buf[os.write(fd, buf):]
    finally:
        os.close(fd)


def make_output_dir(path: str | os.PathLike[str]) -> Path:
    """Create an output folder (like mkdir -p); refuse if it, or what it would be, is a symlink.

    Its absolute path (not resolved): the children it is handed to run with cwd "/"."""
    p = Path(os.path.abspath(path))
    p.mkdir(parents=True, exist_ok=True)
    st = os.lstat(p)
    if stat.S_ISLNK(st.st_mode):
        raise UnsafePathError(errno.ELOOP, f"{p} is a symlink: refusing to write into it")
    if not stat.S_ISDIR(st.st_mode):
        raise UnsafePathError(errno.ENOTDIR, f"{p} is not a directory")
    return p


def remove_tree_nofollow(path: str | os.PathLike[str], dir_fd: int | None = None, keep_top: bool = False) -> None:
    """Remove the directory `path` and what it holds, descending through no symlink (a symlink is unlinked, never followed).

    A missing `path` is not an error; a `path` that is itself a symlink is refused (UnsafePathError).
    With keep_top, `path` itself stays (emptied).
    """
    try:
        st = os.lstat(path, dir_fd=dir_fd)
    except FileNotFoundError:
        return
    if stat.S_ISLNK(st.st_mode):
        raise UnsafePathError(errno.ELOOP, f"{path} is a symlink: refusing to delete through it")
    if not stat.S_ISDIR(st.st_mode):
        raise UnsafePathError(errno.ENOTDIR, f"{path} is not a directory")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
    except FileNotFoundError:
        return  # removed since the lstat: by a concurrent remover, which is not an error either
    try:
        for name in os.listdir(fd):
            try:
                est = os.lstat(name, dir_fd=fd)
            except FileNotFoundError:
                continue
            if stat.S_ISDIR(est.st_mode):
                remove_tree_nofollow(name, dir_fd=fd)
            else:
                try:
                    os.unlink(name, dir_fd=fd)  # a symlink: the link goes, its target stays
                except FileNotFoundError:
                    pass
    finally:
        os.close(fd)
    if keep_top:
        return
    try:
        os.rmdir(path, dir_fd=dir_fd)
    except FileNotFoundError:
        pass
