"""The policy process's sandbox: prctl, capabilities, network namespace and seccomp through ctypes.

Python's os module has none of capset/PR_CAPBSET_DROP/PR_SET_NO_NEW_PRIVS, and no maintained
libseccomp binding installs into this interpreter from the package index (the official one ships
only with the distribution's own Python), so libseccomp's stable C API is called through ctypes.
Order matters: privileged setup first (network and mount namespaces, read-only mounts, bpf stats, and
loading the BPF object, which needs CAP_SYS_ADMIN to find module BTF), then drop (single-threaded: it
changes the calling thread only), then no_new_privs, then seccomp (which needs no_new_privs when
CAP_SYS_ADMIN is gone).
"""

from __future__ import annotations

import ctypes
import errno
import functools
import os
import resource
import signal
import threading
from collections.abc import Sequence

PR_SET_PDEATHSIG = 1
PR_CAPBSET_DROP = 24
PR_SET_SECUREBITS = 28
PR_SET_NO_NEW_PRIVS = 38
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4

CAP_SETPCAP = 8
CAP_IPC_LOCK = 14
CAP_SYS_ADMIN = 21
CAP_SYS_NICE = 23
CAP_PERFMON = 38
CAP_BPF = 39
KEEP_CAPS = (CAP_BPF, CAP_PERFMON, CAP_SYS_NICE, CAP_IPC_LOCK)
# What start-up needs before dropping to KEEP_CAPS: a network namespace and a later VM's taking the host's programs
# by ID (SYS_ADMIN), bounding-set drops (SETPCAP).
START_CAPS = (CAP_SYS_ADMIN, CAP_SETPCAP, *KEEP_CAPS)
CAP_NAMES = {CAP_SETPCAP: "CAP_SETPCAP", CAP_IPC_LOCK: "CAP_IPC_LOCK", CAP_SYS_ADMIN: "CAP_SYS_ADMIN", CAP_SYS_NICE: "CAP_SYS_NICE",
             CAP_PERFMON: "CAP_PERFMON", CAP_BPF: "CAP_BPF"}

# Root keeps no implicit powers (no caps regained on exec or setuid), and the bits are locked.
SECBIT_NOROOT, SECBIT_NOROOT_LOCKED = 1 << 0, 1 << 1
SECBIT_NO_SETUID_FIXUP, SECBIT_NO_SETUID_FIXUP_LOCKED = 1 << 2, 1 << 3
SECBIT_KEEP_CAPS_LOCKED, SECBIT_NO_CAP_AMBIENT_RAISE, SECBIT_NO_CAP_AMBIENT_RAISE_LOCKED = 1 << 5, 1 << 6, 1 << 7
SECUREBITS = (SECBIT_NOROOT | SECBIT_NOROOT_LOCKED | SECBIT_NO_SETUID_FIXUP | SECBIT_NO_SETUID_FIXUP_LOCKED
              | SECBIT_KEEP_CAPS_LOCKED | SECBIT_NO_CAP_AMBIENT_RAISE | SECBIT_NO_CAP_AMBIENT_RAISE_LOCKED)

CLONE_NEWNET = 0x40000000
CLONE_NEWNS = 0x00020000
CLONE_NEWIPC = 0x08000000
SYS_pivot_root, SYS_open_tree, SYS_move_mount, SYS_mount_setattr = 155, 428, 429, 442  # x86_64
OPEN_TREE_CLONE, OPEN_TREE_CLOEXEC = 1, os.O_CLOEXEC
MOVE_MOUNT_F_EMPTY_PATH = 0x4
MS_NOSUID, MS_NODEV, MS_NOEXEC = 0x2, 0x4, 0x8
MNT_DETACH = 2
AT_FDCWD = -100
AT_RECURSIVE = 0x8000
MOUNT_ATTR_RDONLY, MOUNT_ATTR_NOSUID, MOUNT_ATTR_NODEV, MOUNT_ATTR_NOEXEC = 0x1, 0x2, 0x4, 0x8
MS_PRIVATE = 1 << 18
_LINUX_CAPABILITY_VERSION_3 = 0x20080522
SYS_bpf = 321  # x86_64
BPF_ENABLE_STATS = 32
BPF_STATS_RUN_TIME = 0
M_ARENA_MAX = -8  # mallopt
THREAD_STACK_BYTES = 512 * 1024  # the actuator's watcher and trio's worker threads: shallow Python, no deep C recursion

_libc = ctypes.CDLL(None, use_errno=True)
_libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
_libc.syscall.restype = ctypes.c_long


class SandboxError(OSError):
    """A sandboxing step failed; the policy process must not run half-confined."""


def _check(rc: int, what: str) -> int:
    if rc < 0:
        e = ctypes.get_errno()
        raise SandboxError(e, f"{what}: {os.strerror(e)}")
    return rc


def prctl(option: int, a2: int = 0, a3: int = 0, a4: int = 0, a5: int = 0) -> int:
    """prctl(2); raises SandboxError on failure."""
    return _check(_libc.prctl(option, a2, a3, a4, a5), f"prctl({option})")


def set_parent_death_signal(sig: int = signal.SIGTERM) -> None:
    """Ask for `sig` when the thread that forked us (the VMM's main thread) dies."""
    prctl(PR_SET_PDEATHSIG, sig)


def unshare_network() -> None:
    """Move into a fresh network namespace: only a down loopback interface, no route anywhere."""
    _check(_libc.unshare(CLONE_NEWNET), "unshare(CLONE_NEWNET)")


class _MountAttr(ctypes.Structure):
    _fields_ = [("attr_set", ctypes.c_uint64), ("attr_clr", ctypes.c_uint64), ("propagation", ctypes.c_uint64),
                ("userns_fd", ctypes.c_uint64)]


def _mount_setattr(path: str, flags: int, attr: _MountAttr) -> None:
    rc = _libc.syscall(SYS_mount_setattr, AT_FDCWD, path.encode(), flags, ctypes.byref(attr), ctypes.sizeof(attr))
    _check(rc, f"mount_setattr({path})")


def readonly_filesystem(writable: tuple[str, ...] = ()) -> None:
    """Private mount namespace with every mount read-only (and nosuid, nodev) except `writable` mounts.

    Dropping capabilities leaves uid 0, which still owns (and may write) root's files, /proc/sys
    included, and may open /proc/<pid>/mem of other root processes; read-only mounts close that.
    """
    _check(_libc.unshare(CLONE_NEWNS), "unshare(CLONE_NEWNS)")
    _mount_setattr("/", AT_RECURSIVE, _MountAttr(
        attr_set=MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV, propagation=MS_PRIVATE))
    for path in writable:
        _mount_setattr(path, 0, _MountAttr(attr_clr=MOUNT_ATTR_RDONLY))


def unshare_ipc() -> None:
    """Move into a fresh IPC namespace: no System V IPC or POSIX message queue of anyone else."""
    _check(_libc.unshare(CLONE_NEWIPC), "unshare(CLONE_NEWIPC)")


def _clone_tree(path: str) -> int:
    """A detached copy of the mount tree at `path` (open_tree OPEN_TREE_CLONE), symlinks in `path` followed."""
    return _check(_libc.syscall(SYS_open_tree, AT_FDCWD, path.encode(), OPEN_TREE_CLONE | OPEN_TREE_CLOEXEC
                                | AT_RECURSIVE), f"open_tree({path})")


def outermost_paths(paths: list[str]) -> list[str]:
    """`paths` without those inside another one (a bind of the outer one already holds them), sorted."""
    out: list[str] = []
    for p in sorted({os.path.normpath(p) for p in paths}):
        if not any(p == o or p.startswith(o.rstrip("/") + "/") for o in out):
            out.append(p)
    return out


# Folders of the old root that may hold the new root while it is built (the first one not holding a kept path).
SCRATCH_CANDIDATES = ("/mnt", "/tmp", "/media", "/srv", "/var")


def _scratch_for(paths: Sequence[str]) -> str:
    """A folder to build the new root on: a kept tree cannot be moved into a mount that covers its own source."""
    for d in SCRATCH_CANDIDATES:
        if os.path.isdir(d) and not os.path.islink(d) and not any(p == d or p.startswith(d + "/") for p in paths):
            return d
    raise SandboxError(errno.ENOENT, f"no folder to build the confined root on: all of {SCRATCH_CANDIDATES} "
                                     "are missing or hold a kept path")


def confine_root(readable: Sequence[str], writable: Sequence[str] = ()) -> None:
    """Make the root an empty read-only tmpfs that holds only `readable` (read-only, nosuid, nodev),
    `writable` (nosuid, nodev, noexec) at their own paths, and a /proc of processes only (subset=pid:
    no /proc/sys, kallsyms or kcore); the old root is detached, so nothing else can be named again.

    Needs CAP_SYS_ADMIN in a private mount namespace (readonly_filesystem first).  Each tree is cloned
    (open_tree) and moved into a tmpfs mounted on a scratch folder of the old root, which then becomes
    the root.  Missing paths are skipped.  An allowlist: what the process may name after this is
    exactly what was given.
    """
    keep = [(p, False) for p in outermost_paths([p for p in readable if os.path.exists(p)])]
    keep += [(p, True) for p in outermost_paths([p for p in writable if os.path.exists(p)])]
    scratch = _scratch_for([p for p, _ in keep])
    cap_last()          # what the later steps read from the file system, read while it is there
    load_seccomp()
    clones = [(p, w, _clone_tree(p)) for p, w in keep]
    try:
        _check(_libc.mount(b"tmpfs", scratch.encode(), b"tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC,
                           b"mode=0755,size=1m,nr_inodes=256"), f"mount tmpfs on {scratch}")
        for path, w, fd in clones:
            target = scratch.rstrip("/") + path
            if os.path.isdir(path):
                os.makedirs(target, mode=0o755, exist_ok=True)
            else:  # a file (a zip on sys.path): bound onto an empty file
                os.makedirs(os.path.dirname(target), mode=0o755, exist_ok=True)
                os.close(os.open(target, os.O_CREAT | os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644))
            _check(_libc.syscall(SYS_move_mount, fd, b"", AT_FDCWD, target.encode(), MOVE_MOUNT_F_EMPTY_PATH),
                   f"move_mount({path})")
            attr = (_MountAttr(attr_set=MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV | MOUNT_ATTR_NOEXEC,
                               attr_clr=MOUNT_ATTR_RDONLY) if w else
                    _MountAttr(attr_set=MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV))
            _mount_setattr(target, AT_RECURSIVE, attr)
    finally:
        for _, _, fd in clones:
            os.close(fd)
    proc = scratch.rstrip("/") + "/proc"
    os.makedirs(proc, mode=0o555, exist_ok=True)
    _check(_libc.mount(b"proc", proc.encode(), b"proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, b"subset=pid"),
           "mount proc (subset=pid)")
    # pivot_root(".", "."): the old root ends up stacked on the new one and is then detached.
    os.chdir(scratch)
    _check(_libc.syscall(SYS_pivot_root, b".", b"."), "pivot_root")
    _check(_libc.umount2(b".", MNT_DETACH), "umount the old root")
    os.chdir("/")
    _mount_setattr("/", 0, _MountAttr(attr_set=MOUNT_ATTR_RDONLY))


# What the sandboxed process may hold: no core dumps of a process that maps guest memory, a bounded
# number of descriptors (it needs about 30: maps, links, ring buffer, memfds, sockets).
RLIMITS = {"RLIMIT_CORE": 0, "RLIMIT_NOFILE": 256}


def set_limits() -> None:
    """Lower the RLIMITS (both soft and hard: they cannot be raised again without CAP_SYS_RESOURCE)."""
    for name, value in RLIMITS.items():
        res = getattr(resource, name)
        hard = resource.getrlimit(res)[1]
        value = value if hard == resource.RLIM_INFINITY else min(value, hard)
        resource.setrlimit(res, (value, value))


def enable_bpf_stats() -> int:
    """BPF_ENABLE_STATS (needs CAP_SYS_ADMIN, so before dropping it): run-time stats while the fd lives."""

    class _Attr(ctypes.Structure):
        _fields_ = [("type", ctypes.c_uint32), ("pad", ctypes.c_uint8 * 124)]

    attr = _Attr(type=BPF_STATS_RUN_TIME)
    return _check(_libc.syscall(SYS_bpf, BPF_ENABLE_STATS, ctypes.byref(attr), ctypes.sizeof(attr)), "BPF_ENABLE_STATS")


def trim_memory() -> None:
    """Small thread stacks and one malloc arena, before any thread: memory per VM stays small.

    Nothing is locked here.  The RT path is native (actuator_loop.c, backstop_loop.c) and locks what
    it touches; the Python process is not on it, and locking it whole (mlockall) cost 30-40 MiB a VM.
    Each thread's own arena would reserve 64 MiB of address space, and a thread's default 8 MiB stack.
    """
    threading.stack_size(THREAD_STACK_BYTES)
    if _libc.mallopt(M_ARENA_MAX, 1) != 1:
        raise OSError("mallopt(M_ARENA_MAX, 1) failed")


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


@functools.cache
def cap_last() -> int:
    """The highest capability this kernel knows (read once: a confined root has no /proc/sys)."""
    with open("/proc/sys/kernel/cap_last_cap") as f:
        return int(f.read())


def drop_capabilities(keep: tuple[int, ...] = KEEP_CAPS) -> None:
    """Keep only `keep` (bounding, permitted, effective), clear inheritable/ambient, lock root's powers."""
    # capset() and the securebits change only the calling thread: another thread would keep everything.
    threads = os.listdir("/proc/self/task")
    if len(threads) != 1:
        raise SandboxError(errno.EBUSY, f"dropping capabilities with {len(threads)} threads: only this one "
                                        "would lose them")
    for cap in range(cap_last() + 1):
        if cap not in keep:
            rc = _libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0)
            if rc < 0 and ctypes.get_errno() != errno.EINVAL:  # EINVAL: cap unknown to this kernel
                _check(rc, f"PR_CAPBSET_DROP({cap})")
    prctl(PR_SET_SECUREBITS, SECUREBITS)
    prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL)
    mask = 0
    for cap in keep:
        mask |= 1 << cap
    data = (_CapData * 2)()
    for i in range(2):
        word = (mask >> (32 * i)) & 0xFFFFFFFF
        data[i].effective = data[i].permitted = word
        data[i].inheritable = 0
    hdr = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
    _check(_libc.capset(ctypes.byref(hdr), data), "capset")


def set_no_new_privs() -> None:
    """No exec can ever grant privileges again (also what lets seccomp load without CAP_SYS_ADMIN)."""
    prctl(PR_SET_NO_NEW_PRIVS, 1)


def proc_status(pid: int | str = "self") -> dict[str, str]:
    """/proc/PID/status as a dict (CapEff, NoNewPrivs, Seccomp, ...)."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            out[key] = value.strip()
    return out


def missing_capabilities(caps: tuple[int, ...] = START_CAPS, pid: int | str = "self") -> list[str]:
    """Names of `caps` missing from `pid`'s effective set: what the policy process would fail on at start."""
    eff = int(proc_status(pid)["CapEff"], 16)
    return [CAP_NAMES.get(c, f"cap{c}") for c in caps if not eff >> c & 1]


def cap_names(mask: int) -> list[str]:
    """Names of the capabilities in a CapEff-style mask (numbers for ones not named here)."""
    return [CAP_NAMES.get(b, f"cap{b}") for b in range(64) if mask >> b & 1]


# --- seccomp through libseccomp (Debian libseccomp2) ---------------------------------------------------

SCMP_ACT_ALLOW = 0x7FFF0000
SCMP_CMP_NE, SCMP_CMP_EQ, SCMP_CMP_MASKED_EQ = 1, 4, 7


def scmp_act_errno(e: int) -> int:
    """Action: fail the syscall with errno `e`."""
    return 0x00050000 | (e & 0xFFFF)


class _ArgCmp(ctypes.Structure):
    _fields_ = [("arg", ctypes.c_uint), ("op", ctypes.c_int), ("datum_a", ctypes.c_uint64),
                ("datum_b", ctypes.c_uint64)]


# An allowlist: the calls the policy process makes once the filter is in (Python, trio, cffi, libbpf's
# map and program-run calls, the actuator's sched_setattr); docs/hardening.md (point 10) says how the
# list was found.  Everything else fails with EPERM.  Calls that could reach
# another process are allowed only in their self-directed form, below.
ALLOWED_SYSCALLS = (
    # memory
    "brk", "mmap", "munmap", "mprotect", "mremap", "madvise", "mlock", "munlock", "membarrier",
    # files already open, and reads of /proc, its own pins and the installed Python (mounts are read-only)
    "read", "pread64", "readv", "write", "pwrite64", "writev", "close", "lseek", "fstat", "newfstatat", "statx",
    "openat", "getdents64", "readlink", "readlinkat", "access", "faccessat", "faccessat2", "fcntl", "dup",
    "dup2", "dup3", "ioctl", "getcwd", "unlink", "unlinkat", "rmdir",
    # waiting and time
    "futex", "nanosleep", "clock_nanosleep", "clock_gettime", "clock_getres", "gettimeofday", "sched_yield",
    "poll", "ppoll", "select", "pselect6", "epoll_create1", "epoll_ctl", "epoll_wait", "epoll_pwait",
    "eventfd2", "pipe2", "timerfd_create", "timerfd_settime", "timerfd_gettime",
    # its sockets: the socketpair from the VMM and trio's wake-up pair
    "socketpair", "sendmsg", "recvmsg", "sendto", "recvfrom", "shutdown", "getsockopt", "setsockopt",
    "getsockname", "getpeername",
    # signals (to itself only: kill and tgkill below)
    "rt_sigaction", "rt_sigprocmask", "rt_sigreturn", "sigaltstack", "rt_sigtimedwait", "restart_syscall",
    # scheduling: the actuator's job
    "sched_setattr", "sched_getattr", "sched_setscheduler", "sched_getscheduler", "sched_setparam",
    "sched_getparam", "sched_get_priority_max", "sched_get_priority_min", "sched_getaffinity",
    "setpriority", "getpriority",
    # identity, threads, exit
    "getpid", "gettid", "getppid", "getuid", "geteuid", "getgid", "getegid", "getresuid", "getresgid",
    "getgroups", "capget", "uname", "sysinfo", "getrusage", "times", "getrandom", "set_robust_list",
    "get_robust_list", "rseq", "set_tid_address", "arch_prctl", "prctl", "exit", "exit_group",
    # the BPF policy: map reads and writes, BPF_PROG_RUN of the backstop, object info
    "bpf",
)
# clone() only for threads (CLONE_THREAD): no new process, no new namespace (CLONE_NEW*).
CLONE_THREAD = 0x00010000
# Signals and limits only for itself: as uid 0 it could otherwise signal or limit every root process.
SELF_ONLY_SYSCALLS = {"kill": 0, "tgkill": 0, "tkill": 0, "prlimit64": 0}  # name -> the argument naming the target
ENOSYS_SYSCALLS = ("clone3",)  # glibc falls back to clone(), which the rule below can inspect


_seccomp_lib: ctypes.CDLL | None = None


def load_seccomp() -> bool:
    """dlopen libseccomp now (before confine_root hides the library folders); False if it is not installed."""
    global _seccomp_lib
    if _seccomp_lib is None:
        try:
            _seccomp_lib = ctypes.CDLL("libseccomp.so.2", use_errno=True)  # the soname: find_library would exec gcc
        except OSError:
            return False
    return True


def install_seccomp() -> bool:
    """Install the allowlist seccomp filter (EPERM for anything else); False if libseccomp is not installed."""
    if not load_seccomp():
        return False
    lib = _seccomp_lib
    lib.seccomp_init.restype = ctypes.c_void_p
    lib.seccomp_init.argtypes = [ctypes.c_uint32]
    lib.seccomp_rule_add_array.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int, ctypes.c_uint,
                                           ctypes.POINTER(_ArgCmp)]
    lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
    lib.seccomp_load.argtypes = [ctypes.c_void_p]
    lib.seccomp_release.argtypes = [ctypes.c_void_p]
    ctx = lib.seccomp_init(scmp_act_errno(errno.EPERM))
    if not ctx:
        raise SandboxError(errno.ENOMEM, "seccomp_init failed")

    def rule(action: int, name: str, *cmps: _ArgCmp) -> None:
        nr = lib.seccomp_syscall_resolve_name(name.encode())
        if nr < 0:
            return  # not a syscall on this architecture
        arr = (_ArgCmp * len(cmps))(*cmps) if cmps else None
        rc = lib.seccomp_rule_add_array(ctx, action, nr, len(cmps), arr)
        if rc < 0:
            raise SandboxError(-rc, f"seccomp_rule_add({name}): {os.strerror(-rc)}")

    try:
        for name in ALLOWED_SYSCALLS:
            rule(SCMP_ACT_ALLOW, name)
        me = os.getpid()
        for name, arg in SELF_ONLY_SYSCALLS.items():
            rule(SCMP_ACT_ALLOW, name, _ArgCmp(arg, SCMP_CMP_EQ, me, 0))
            if name == "prlimit64":
                rule(SCMP_ACT_ALLOW, name, _ArgCmp(arg, SCMP_CMP_EQ, 0, 0))  # pid 0: the caller
        rule(SCMP_ACT_ALLOW, "clone", _ArgCmp(0, SCMP_CMP_MASKED_EQ, CLONE_THREAD, CLONE_THREAD))
        for name in ENOSYS_SYSCALLS:
            rule(scmp_act_errno(errno.ENOSYS), name)
        rc = lib.seccomp_load(ctx)
        if rc < 0:
            raise SandboxError(-rc, f"seccomp_load: {os.strerror(-rc)}")
    finally:
        lib.seccomp_release(ctx)
    return True
