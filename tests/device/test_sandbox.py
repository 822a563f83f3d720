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
        from pvsched_device import sandbox
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
        from pvsched_device import sandbox
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
        from pvsched_device import sandbox
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
        from pvsched_device import sandbox
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
