"""A local user, or a careless admin: symlinks and folders planted where root writes, files in the caller's
folder, and the control socket.  Each test attacks one boundary with the real code and the real kernel.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import trio
from hostile_util import PIN_ROOT, wait_active

from pyvmm.bench import run as bench
from pyvmm.common import control_client
from pyvmm.common.pins import ensure_pin_dir, remove_stale_pins
from pyvmm.common.safe_fs import UnsafePathError, ensure_private_dir, make_output_dir, write_file_nofollow
from pyvmm.device.supervisor import PolicySupervisor
from pyvmm.vmm import control
from pyvmm.vmm.machine import EXIT_BAD_INPUT

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="root's side of each boundary")
NOBODY = 65534


def _gone_pid() -> int:
    """A PID no process can have: above pid_max."""
    return int(Path("/proc/sys/kernel/pid_max").read_text()) + 7


@pytest.fixture
def victim(tmp_path: Path) -> Path:
    d = tmp_path / "victim"
    d.mkdir()
    (d / "precious").write_text("keep me")
    return d


# --- pins (issue point 6) --------------------------------------------------------------------------------------

def test_a_symlink_planted_among_the_pins_is_never_followed_by_pyvmm_boot(vms, victim: Path) -> None:
    """The case seen on this machine: <pin root>/<dead pid> -> a folder; the next boot emptied it."""
    ensure_pin_dir(str(PIN_ROOT), os.getpid())  # the root as pyvmm makes it (0700, root's)
    os.rmdir(PIN_ROOT / str(os.getpid()))
    link = PIN_ROOT / str(_gone_pid())
    stale = PIN_ROOT / str(_gone_pid() + 1)
    os.symlink(victim, link)
    stale.mkdir()
    try:
        vm = wait_active(vms("duration=2 workload=idle", cpus=1, seconds=2))
        assert (victim / "precious").read_text() == "keep me", "the boot deleted through a planted symlink"
        assert link.is_symlink(), "the symlink itself is not pyvmm's to remove"
        assert not stale.exists(), "a real stale pin folder was left"
        assert (PIN_ROOT.stat().st_mode & 0o777) == 0o700 and PIN_ROOT.stat().st_uid == 0
        assert (vm.pin_dir.stat().st_mode & 0o777) == 0o700
    finally:
        link.unlink()


def test_remove_stale_pins_removes_only_real_folders_of_dead_vmms(tmp_path: Path, victim: Path) -> None:
    root = ensure_pin_dir(str(tmp_path / "pins"), os.getpid()).parent
    (root / str(_gone_pid())).symlink_to(victim)
    dead = root / str(_gone_pid() + 1)
    (dead / "sub").mkdir(parents=True)
    (dead / "sub" / "evil").symlink_to(victim / "precious")  # a link inside: unlinked, never followed
    assert remove_stale_pins(str(root)) == [_gone_pid() + 1]
    assert (victim / "precious").read_text() == "keep me"
    assert (root / str(os.getpid())).is_dir(), "a live VMM's folder was removed"


def _remove_stale_pins_at(root: str, start: float) -> None:
    while time.monotonic() < start:
        pass  # every remover lists the folder at about the same moment
    remove_stale_pins(root)


def test_policy_processes_starting_together_each_remove_stale_pins_without_error(tmp_path: Path) -> None:
    """Eight VMs that start at once each sweep the pin root; a folder another one removed between its
    listing and its lstat is skipped, not an error that stops that VM's policy process."""
    root = ensure_pin_dir(str(tmp_path / "pins"), os.getpid()).parent
    for i in range(400):
        (root / str(_gone_pid() + i) / "sub").mkdir(parents=True)
        (root / str(_gone_pid() + i) / "sub" / "map").write_text("")
    start = time.monotonic() + 0.5
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_remove_stale_pins_at, args=(str(root), start)) for _ in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(30)
    assert [p.exitcode for p in procs] == [0] * 4, "a concurrent sweep failed on a folder another one removed"
    assert sorted(x.name for x in root.iterdir()) == [str(os.getpid())]


def test_a_pin_root_that_is_not_roots_own_private_folder_is_refused(tmp_path: Path, victim: Path) -> None:
    link = tmp_path / "link-root"
    link.symlink_to(victim)
    with pytest.raises(UnsafePathError, match="symlink"):
        ensure_pin_dir(str(link), 1)
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    os.chown(theirs, NOBODY, NOBODY)
    with pytest.raises(UnsafePathError, match="belongs to uid 65534"):
        ensure_pin_dir(str(theirs), 1)
    with pytest.raises(UnsafePathError):
        remove_stale_pins(str(theirs))
    loose = tmp_path / "loose"
    loose.mkdir(mode=0o777)
    os.chmod(loose, 0o1777)
    ensure_pin_dir(str(loose), 1)
    assert loose.stat().st_mode & 0o7777 == 0o700, "a world-writable root of ours was not tightened"
    assert (loose / "1").stat().st_mode & 0o777 == 0o700


# --- files in the caller's folder (point 7) ----------------------------------------------------------------------

HOSTILE_MODULE = "import pathlib; pathlib.Path({marker!r}).write_text('imported as root')\n"


def test_the_policy_process_imports_nothing_from_the_callers_folder_or_pythonpath(tmp_path: Path, monkeypatch) -> None:
    marker = tmp_path / "marker"
    evil = tmp_path / "evil"
    evil.mkdir()
    for name in ("json", "trio", "cffi", "argparse"):
        (evil / f"{name}.py").write_text(HOSTILE_MODULE.format(marker=str(marker)))
    monkeypatch.chdir(evil)
    monkeypatch.setenv("PYTHONPATH", str(evil))
    sup = PolicySupervisor(os.getpid(), {}, lambda rc: None, pin_root=str(tmp_path / "pins"))
    try:
        ready = trio.run(sup.spawn)
        assert ready.get("op") == "ready"
        cwd = os.readlink(f"/proc/{sup.pid}/cwd")
        environ = Path(f"/proc/{sup.pid}/environ").read_bytes().split(b"\0")
    finally:
        sup.stop()
    assert not marker.exists(), "a module from the caller's folder ran inside the policy process"
    assert cwd == "/"
    assert not any(e.startswith(b"PYTHONPATH=") for e in environ)


def test_the_benchs_vm_children_start_isolated_with_absolute_paths(tmp_path: Path, monkeypatch) -> None:
    from pyvmm.bench.vmrun import RunSpec, boot_argv

    monkeypatch.chdir(tmp_path)
    spec = RunSpec(config="vanilla", duration_s=1, kernel="vmlinuz", initrd="initrd.gz")
    argv = boot_argv(spec, 30)
    py = argv.index(sys.executable)
    assert argv[py + 1:py + 4] == ["-I", "-m", "pyvmm.cli"]
    assert argv[argv.index("--kernel") + 1] == str(tmp_path / "vmlinuz")
    assert argv[argv.index("--initrd") + 1] == str(tmp_path / "initrd.gz")


# --- output paths (point 9) -----------------------------------------------------------------------------------

def test_stats_out_through_a_symlink_is_refused_before_the_vm_starts(tmp_path: Path, victim: Path) -> None:
    link = tmp_path / "stats.json"
    link.symlink_to(victim / "precious")
    r = subprocess.run([sys.executable, "-I", "-m", "pyvmm.cli", "boot", "--no-console-input", "--cpus", "1",
                        "--no-policy", "--cmdline", "duration=1 workload=idle", "--stats-out", str(link)],
                       cwd="/", capture_output=True, text=True, timeout=60, check=False)
    assert r.returncode == EXIT_BAD_INPUT
    assert r.stderr.strip().splitlines() == [f"pyvmm: --stats-out {link} is a symlink: refusing to write through it"]
    assert (victim / "precious").read_text() == "keep me"


def test_bench_outputs_never_write_through_a_symlink(tmp_path: Path, victim: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "results.json").symlink_to(victim / "precious")
    with pytest.raises(UnsafePathError):
        bench.write_outputs(out, [], {})
    assert (victim / "precious").read_text() == "keep me"
    link_dir = tmp_path / "out-link"
    link_dir.symlink_to(victim)
    with pytest.raises(UnsafePathError):
        make_output_dir(link_dir)
    with pytest.raises(UnsafePathError):
        write_file_nofollow(out / "results.json", "x", append=True)  # the peer table's append, too
    assert (victim / "precious").read_text() == "keep me"


# --- the control socket (point 8) --------------------------------------------------------------------------------

def test_control_socket_folder_is_private_and_stale_sockets_are_swept(vms, tmp_path: Path, victim: Path) -> None:
    ensure_private_dir(control_client.SOCKET_DIR)
    stale = control_client.SOCKET_DIR / f"{_gone_pid()}.sock"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(stale))
    s.close()
    link = control_client.SOCKET_DIR / f"{_gone_pid() + 1}.sock"
    link.symlink_to(victim / "precious")
    try:
        vm = wait_active(vms("duration=2 workload=idle", cpus=1, seconds=2))
        st = control_client.SOCKET_DIR.stat()
        assert st.st_mode & 0o777 == 0o700 and st.st_uid == 0
        assert not stale.exists(), "a dead VMM's socket was left"
        assert link.is_symlink() and (victim / "precious").read_text() == "keep me"
        assert "error" not in vm.status()
    finally:
        link.unlink()


def _socketpair_made_by(uid: int) -> tuple[socket.socket, socket.socket]:
    """Both ends of a socketpair created by a process running as `uid` (SO_PEERCRED names the creator)."""
    chan_parent, chan_child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    pid = os.fork()
    if pid == 0:  # the child: becomes `uid`, makes the pair, hands both ends over, exits
        try:
            os.setresgid(uid, uid, uid)
            os.setresuid(uid, uid, uid)
            a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            socket.send_fds(chan_child, [b"x"], [a.fileno(), b.fileno()])
        finally:
            os._exit(0)
    os.waitpid(pid, 0)
    _, fds, _, _ = socket.recv_fds(chan_parent, 1, 2)
    chan_parent.close()
    chan_child.close()
    return socket.socket(fileno=fds[0]), socket.socket(fileno=fds[1])


def test_control_server_refuses_a_client_of_another_uid() -> None:
    """SO_PEERCRED with the real kernel: a uid-65534 peer gets one error line, and no handler runs."""
    ran: list[dict] = []
    handlers = {"status": lambda req: ran.append(req) or {"ok": True}}
    server_end, client_end = _socketpair_made_by(NOBODY)
    assert control.peer_uid(server_end) == NOBODY
    client_end.sendall(b'{"cmd": "status"}\n')

    async def main() -> None:
        await control._Server(handlers)(trio.SocketStream(trio.socket.from_stdlib_socket(server_end)))

    trio.run(main)
    client_end.settimeout(5)
    reply = client_end.recv(4096)
    client_end.close()
    assert json.loads(reply) == {"error": f"uid {NOBODY} may not control this VM"}
    assert ran == [], "a request of another uid was handled"


def test_control_socket_bounds_requests_and_connections(vms) -> None:
    vm = wait_active(vms("duration=8 workload=idle", cpus=1, seconds=8))
    path = control_client.socket_path(vm.pid)
    # the case: a 2 MB policy.set of "é" (re-encoded past the policy channel's limit before the fix)
    big = {"cmd": "policy.set", "values": {"boost_prio": "é" * 700_000}}
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(str(path))
        try:
            s.sendall(json.dumps(big, ensure_ascii=False).encode() + b"\n")
        except BrokenPipeError:
            pass  # the server stopped reading at the bound and closed: its error line is still there to read
        buf = b""
        while not buf.endswith(b"\n"):
            chunk = s.recv(65536)
            if not chunk:
                break
            buf += chunk
    assert json.loads(buf)["error"] == f"request longer than {control.MAX_REQUEST} bytes"
    # just under the bound, yet over the policy channel's after JSON's \u escapes: refused whole, not fatal
    r = vm.request("policy.set", values={"boost_prio": "é" * 30_000})
    assert "error" in r
    assert vm.show()["tunables"], "the policy path stopped answering after oversized requests"
    # at most MAX_CLIENTS at once; the next one is told so, and a slot frees when one leaves
    held = []
    try:
        for _ in range(control.MAX_CLIENTS):
            c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            c.settimeout(10)
            c.connect(str(path))
            c.sendall(b'{"cmd": "status"}\n')
            assert c.recv(65536), "no answer"  # answered: its handler holds a slot now
            held.append(c)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as extra:
            extra.settimeout(5)
            extra.connect(str(path))
            assert b"busy" in extra.recv(4096)
    finally:
        for c in held:
            c.close()
    # the server sees each close as end of stream and frees its slot; a new client may have to wait for that
    deadline = time.monotonic() + 5
    while "busy" in (r := vm.status()).get("error", "") and time.monotonic() < deadline:
        time.sleep(0.01)
    assert "error" not in r, r
