"""The sandbox primitives for real, each in a throw-away child process: caps, no_new_privs, seccomp, netns."""

from __future__ import annotations

import subprocess
import sys
import textwrap


def _child(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=60,
                          check=False)


def test_seccomp_denies_exec_and_foreign_signals() -> None:
    r = _child("""
        import os, errno
        from pyvmm.policy import sandbox
        sandbox.set_no_new_privs()
        assert sandbox.install_seccomp()
        os.kill(os.getpid(), 0)  # itself: allowed
        for what, fn in (("exec", lambda: os.execv("/bin/true", ["true"])),
                         ("kill parent", lambda: os.kill(os.getppid(), 0)),
                         ("unshare", sandbox.unshare_network)):
            try:
                fn()
            except OSError as e:
                if e.errno == errno.EPERM:
                    print(what, "denied")
        """)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split("\n")[:3] == ["exec denied", "kill parent denied", "unshare denied"]


def test_readonly_mounts_close_what_uid_0_could_still_write() -> None:
    r = _child("""
        import os
        from pyvmm.policy import sandbox
        sandbox.readonly_filesystem(writable=("/sys/fs/bpf",))
        sandbox.drop_capabilities()
        for path in ("/proc/sys/kernel/sched_rt_runtime_us", f"/proc/{os.getppid()}/mem", "/etc/pvsched-test"):
            try:
                open(path, "w").close()
                print(path, "writable")
            except OSError as e:
                print(e.strerror)
        os.mkdir("/sys/fs/bpf/pvsched-ro-test")  # pins stay possible
        os.rmdir("/sys/fs/bpf/pvsched-ro-test")
        print("bpffs writable")
        """)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == ["Read-only file system"] * 3 + ["bpffs writable"]


def test_drop_capabilities_keeps_exactly_four_and_cannot_regain() -> None:
    r = _child("""
        import os, subprocess
        from pyvmm.policy import sandbox
        sandbox.unshare_network()
        sandbox.drop_capabilities()
        sandbox.set_no_new_privs()
        st = sandbox.proc_status()
        print(sorted(sandbox.cap_names(int(st["CapEff"], 16))))
        print(st["CapBnd"], st["NoNewPrivs"])
        # A child exec'd as root gets nothing back (bounding set and SECBIT_NOROOT).
        print(subprocess.run(["grep", "CapEff", "/proc/self/status"], capture_output=True, text=True).stdout.split())
        try:
            sandbox.unshare_network()
        except OSError:
            print("no CAP_SYS_ADMIN")
        with open("/proc/self/net/dev") as f:
            print([l.split(":")[0].strip() for l in f.readlines()[2:]])
        """)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == "['CAP_BPF', 'CAP_IPC_LOCK', 'CAP_PERFMON', 'CAP_SYS_NICE']"
    assert lines[1] == "000000c000804000 1"
    assert lines[2] == "['CapEff:', '0000000000000000']"
    assert lines[3] == "no CAP_SYS_ADMIN"
    assert lines[4] == "['lo']"


def test_drop_capabilities_refuses_while_another_thread_would_keep_them() -> None:
    """capset() changes only the calling thread: with a second thread alive, the drop must not pass for done."""
    r = _child("""
        import threading
        from pyvmm.policy import sandbox
        ev = threading.Event()
        t = threading.Thread(target=ev.wait)
        t.start()
        try:
            sandbox.drop_capabilities()
        except sandbox.SandboxError as e:
            print("refused:", e)
        ev.set()
        t.join()
        eff = int(sandbox.proc_status()["CapEff"], 16)
        print("full" if eff >> sandbox.CAP_SYS_ADMIN & 1 else "dropped")
        """)
    assert r.returncode == 0, r.stderr
    assert "refused: " in r.stdout and "2 threads" in r.stdout and r.stdout.strip().endswith("full"), r.stdout


def test_seccomp_is_an_allowlist_that_refuses_what_reaches_other_processes() -> None:
    """Each call that leaked through the old deny-list, made for real inside the filter: all EPERM (clone3: ENOSYS,
    so that glibc falls back to clone(), which is checked for CLONE_THREAD); threads and self-signals still work."""
    r = _child("""
        import ctypes, errno, os, socket, threading
        from pyvmm.policy import sandbox
        libc = ctypes.CDLL(None, use_errno=True)
        libc.syscall.restype = ctypes.c_long
        parent = os.getppid()
        sandbox.set_no_new_privs()
        assert sandbox.install_seccomp()
        info = (ctypes.c_int * 32)()
        lim = (ctypes.c_uint64 * 2)(1, 1)
        calls = {
            "rt_sigqueueinfo": (129, parent, 0, info),       # signal another root process
            "rt_tgsigqueueinfo": (297, parent, parent, 0, info),
            "prlimit64": (302, parent, 7, lim, 0),          # change another process's limits
            "clone(CLONE_NEWUSER)": (56, 0x10000000 | 17, 0, 0, 0, 0),
            "unshare": (272, 0x10000000),
            "socket": (41, 2, 1, 0),
            "connect": (42, 0, 0, 0),
            "io_uring_setup": (425, 8, 0),
            "perf_event_open": (298, 0, 0, -1, -1, 0),
            "execve": (59, 0, 0, 0),
            "ptrace": (101, 16, parent, 0, 0),
            "kill(parent)": (62, parent, 0),
            "clone3": (435, 0, 0),
        }
        for name, (nr, *args) in calls.items():
            rc = libc.syscall(nr, *[ctypes.c_long(a) if isinstance(a, int) else a for a in args])
            print(name, errno.errorcode.get(ctypes.get_errno(), "0") if rc < 0 else f"allowed rc={rc}")
        out = []
        t = threading.Thread(target=lambda: out.append(os.getpid()))  # clone(CLONE_THREAD): allowed
        t.start(); t.join()
        os.kill(os.getpid(), 0)
        a, b = socket.socketpair()
        print("thread", out == [os.getpid()], "self-signal ok", "socketpair ok")
        """)
    assert r.returncode == 0, r.stderr
    got = dict(line.rsplit(" ", 1) for line in r.stdout.splitlines()[:-1])
    want = {name: "EPERM" for name in got} | {"clone3": "ENOSYS"}
    assert got == want, got
    assert r.stdout.splitlines()[-1] == "thread True self-signal ok socketpair ok"


def test_confined_root_names_only_what_it_was_given(tmp_path) -> None:
    """After confine_root: root's secrets, other sockets and pins, /sys and /proc/sys cannot be named;
    code not yet imported still imports; the one writable folder takes writes, nothing else does; the
    IPC namespace is its own."""
    (tmp_path / "w").mkdir()
    r = _child(f"""
        import os, sys
        from pyvmm.policy import process as policy_process, sandbox
        parent_ipc = os.readlink("/proc/self/ns/ipc")
        sandbox.unshare_ipc()
        sandbox.readonly_filesystem()
        sandbox.confine_root(policy_process.code_paths(), [{str(tmp_path / "w")!r}])
        sandbox.set_limits()
        sandbox.drop_capabilities()
        for path in ("/etc/shadow", "/run", "/sys/fs/bpf", "/sys/kernel", "/proc/sys/kernel", "/proc/kallsyms",
                     "/dev/mem", {str(tmp_path)!r} + "/not-kept"):
            print(path, "visible" if os.path.lexists(path) else "absent")
        import fractions  # not imported before the confinement: the stdlib is there
        print("import ok", fractions.Fraction(1, 3))
        print("parent", "visible" if os.path.exists(f"/proc/{{os.getppid()}}/status") else "absent")
        open({str(tmp_path / "w" / "f")!r}, "w").write("x")
        for path in ("/x", os.path.join(policy_process.code_paths()[-1], "x")):
            try:
                open(path, "w")
                print(path, "writable")
            except OSError as e:
                print(e.strerror)
        print("ipc", "own" if os.readlink("/proc/self/ns/ipc") != parent_ipc else "shared")
        import resource
        print("nofile", resource.getrlimit(resource.RLIMIT_NOFILE), "core", resource.getrlimit(resource.RLIMIT_CORE))
        """)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert [ln.rsplit(" ", 1)[1] for ln in lines[:8]] == ["absent"] * 8, lines
    assert lines[8:] == ["import ok 1/3", "parent visible", "Read-only file system", "Read-only file system",
                         "ipc own", "nofile (256, 256) core (0, 0)"], lines
    assert (tmp_path / "w" / "f").read_text() == "x"       # written through to the host's folder
