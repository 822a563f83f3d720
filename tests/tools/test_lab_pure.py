"""`pyvmm lab` without booting: the guest script, the vng command line, bad input, and the monitor client."""

from __future__ import annotations

import re
import shlex
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from pyvmm import lab, lab_monitor


def test_guest_script_loads_kvm_mounts_bpffs_and_execs_the_command_where_the_caller_was():
    s = lab.guest_script(["pyvmm", "boot", "--cmdline", "a b; rm -rf /"], "/work dir", "/usr/bin:/bin")
    lines = s.splitlines()
    assert lines[0].startswith("modprobe -q kvm_amd")
    assert any("mount -t bpf -o mode=0700 bpf /sys/fs/bpf" in ln for ln in lines)
    assert "cd '/work dir' || exit 125" in lines
    assert "export PATH=/usr/bin:/bin" in lines
    assert "export PYVMM_IN_LAB=1" in lines   # what lab_env.in_lab() reads there: the device's limits scale by it
    assert lines[-1] == "exec pyvmm boot --cmdline 'a b; rm -rf /'"   # one argument, never shell code
    assert shlex.split(lines[-1])[1:] == ["pyvmm", "boot", "--cmdline", "a b; rm -rf /"]



def test_under_tcg_the_script_holds_the_static_keys_with_one_cpu_online_and_ends_with_one_again():
    """The lab's kernel hung when a static key flipped code its other CPU ran (pyvmm/lab_keys.py)."""
    s = lab.guest_script(["pyvmm", "boot", "--cmdline", "a b"], "/w", "/usr/bin", hold_keys=True)
    lines = s.splitlines()
    offline, online = lab.OTHER_CPUS.format(0), lab.OTHER_CPUS.format(1)
    hold = next(i for i, ln in enumerate(lines) if "-m pyvmm.lab_keys" in ln)
    assert lines[hold].startswith(shlex.quote(sys.executable) + " -I ") and lines[hold].endswith("|| exit 125")
    assert lines[hold - 1] == offline and lines[hold + 1] == online
    assert hold > next(i for i, ln in enumerate(lines) if ln.startswith("modprobe"))   # kvm's keys exist
    assert lines[-4:] == ["pyvmm boot --cmdline 'a b'", "rc=$?", offline, "exit $rc"]
    assert "lab_keys" not in lab.guest_script(["true"], "/w", "/usr/bin")            # not on KVM hosts


def test_the_cpu_loop_names_every_cpu_but_the_boot_cpu(tmp_path):
    for name in ("cpu0", "cpu1", "cpu12", "cpufreq", "cpuidle"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "online").write_text("1\n")
    loop = lab.OTHER_CPUS.format(0).replace("/sys/devices/system/cpu", str(tmp_path))
    subprocess.run(["sh", "-c", loop], check=True)
    assert {d.name: (d / "online").read_text() for d in tmp_path.iterdir()} == {
        "cpu0": "1\n", "cpu1": "0\n", "cpu12": "0\n", "cpufreq": "1\n", "cpuidle": "1\n"}


def test_the_key_holder_turns_on_every_event_the_programs_attach_to_with_tracing_off(tmp_path):
    from pyvmm import lab_keys
    (tmp_path / "tracing_on").write_text("1\n")
    for e in lab_keys.EVENTS:
        (tmp_path / "events" / e).mkdir(parents=True)
    inst = tmp_path / "instances" / lab_keys.INSTANCE
    for e in lab_keys.EVENTS:  # what tracefs makes for a new instance
        (inst / "events" / e).mkdir(parents=True)
    lab_keys.hold_events(tmp_path)
    # two trace arrays, so two probes on each tracepoint: an attach then never patches its static call
    for array in (tmp_path, inst):
        assert (array / "tracing_on").read_text() == "0\n"
        assert all((array / "events" / e / "enable").read_text() == "1\n" for e in lab_keys.EVENTS)
    assert (inst / "buffer_size_kb").read_text() == "4\n"
    root = Path(__file__).resolve().parents[2]
    attached = set()
    for src in [*root.glob("pyvmm/policy/*.bpf.c"), *root.glob("pyvmm/bench/bpf/*.bpf.c")]:
        attached |= set(re.findall(r'SEC\("tp_btf/(\w+)"\)', src.read_text()))
    assert attached and attached == {e.split("/")[1] for e in lab_keys.EVENTS}

def test_vng_command_offers_nested_svm_under_tcg_and_shares_only_the_rwdirs(monkeypatch):
    monkeypatch.setattr(lab.shutil, "which", lambda name: f"/usr/bin/{name}")
    cmd = lab.vng_command(lab.Path("/k/boot/vmlinuz-6.1"), "/tmp/x/run.sh", 2, 3072, "/w", ["/w", "/o"], "tcg")
    assert cmd[:3] == ["/usr/bin/vng", "--run", "/k/boot/vmlinuz-6.1"]
    assert "--disable-kvm" in cmd and "--qemu-opts=-cpu max -accel tcg,thread=multi" in cmd
    # the lab kernel's TSC trusted, its KVM on shadow paging, its idle CPUs polling: what kept guests from
    # drifting clocks and triple faults, and threads from waiting on a lab CPU no interrupt woke under TCG
    # (docs/linux-lab.md)
    assert cmd[cmd.index("--append") + 1].split() == ["tsc=reliable", "kvm_amd.npt=0", "idle=poll"]
    assert [c for c in cmd if c.startswith("--rwdir")] == ["--rwdir=/w", "--rwdir=/o"]
    assert cmd[-2:] == ["--exec", "sh /tmp/x/run.sh"]   # by path: the kernel command line is cut at 2048
    assert cmd[cmd.index("--cwd") + 1] == "/w" and cmd[cmd.index("--memory") + 1] == "3072M"
    kvm = lab.vng_command(lab.Path("/k"), "/s", 2, 3072, "/w", [], "kvm")
    assert "--disable-kvm" not in kvm and "--qemu-opts=-cpu host" in kvm
    mon = lab.vng_command(lab.Path("/k"), "/s", 2, 3072, "/w", [], "tcg", monitor="/t/mon.sock")
    assert "--qemu-opts=-cpu max -accel tcg,thread=multi -monitor unix:/t/mon.sock,server=on,wait=off" in mon


def _lab(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pyvmm.cli", "lab", *args], capture_output=True, text=True,
                          timeout=60, check=False)


def test_bad_input_is_one_line_and_exit_2():
    for args in ((), ("--",), ("--cpus", "0", "--", "true"), ("--mem", "100", "--", "true"),
                 ("--rwdir", "/nonexistent-dir", "--", "true"), ("--kernel", "/nonexistent", "--", "true"),
                 ("--cpus", "x", "--", "true"), ("--monitor", "/tmp/a,b", "--", "true"),
                 ("--monitor", "/nonexistent-dir/mon", "--", "true"), ("--monitor", "/etc/passwd", "--", "true")):
        r = _lab(*args)
        assert r.returncode == 2, (args, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr, (args, r.stderr)


def test_help_says_what_the_lab_is_for_and_what_it_costs():
    r = _lab("--help")
    assert r.returncode == 0
    text = " ".join(r.stdout.split())
    assert "nested" in text and "hardware virtualization" in text
    assert "compare configurations within one lab run" in text and "emulated" in text


@pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None, reason="needs QEMU (scripts/setup.sh)")
def test_lab_monitor_asks_a_real_qemu_and_says_why_when_none_answers(tmp_path):
    sock = tmp_path / "mon.sock"
    qemu = subprocess.Popen(["qemu-system-x86_64", "-nodefaults", "-display", "none", "-S", "-smp", "2",
                             "-monitor", f"unix:{sock},server=on,wait=off"], stdin=subprocess.DEVNULL)
    try:
        for _ in range(100):
            if sock.exists():
                break
            time.sleep(0.05)
        answers = lab_monitor.ask(str(sock), ["info status", "info cpus", "info registers -a"])
        assert answers.error is None, answers
        text = answers.text
        assert "(qemu) info status\nVM status: paused (prelaunch)\n" in text
        assert text.count("CPU#") == 2 and text.count("EIP=0000fff0") == 2, text   # both at the reset vector
        r = subprocess.run([sys.executable, "-m", "pyvmm.lab_monitor", str(sock), "info status"],
                           capture_output=True, text=True, timeout=30, check=False)
        assert r.returncode == 0 and "VM status: paused" in r.stdout, r
    finally:
        qemu.kill()
        qemu.wait()
    gone = subprocess.run([sys.executable, "-m", "pyvmm.lab_monitor", str(sock)], capture_output=True, text=True,
                          timeout=30, check=False)
    assert gone.returncode == 1 and gone.stdout == "" and "Traceback" not in gone.stderr
    assert gone.stderr.startswith(f"monitor {sock}: ") and gone.stderr.count("\n") == 1, gone.stderr


def test_lab_monitor_that_hangs_up_mid_way_gives_the_answers_so_far_and_the_error_apart(tmp_path):
    """A QEMU that dies between two questions: the first answer is kept, and the error is not taken for one."""
    sock = str(tmp_path / "mon.sock")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(sock)
    server.listen(1)

    def serve() -> None:
        conn, _ = server.accept()
        with conn:
            conn.sendall(b"QEMU 7.2 monitor\r\n(qemu) ")
            conn.recv(100)
            conn.sendall(b"info status\r\nVM status: running\r\n(qemu) ")
            conn.recv(100)  # the second question, then hang up without an answer

    t = threading.Thread(target=serve)
    t.start()
    try:
        answers = lab_monitor.ask(sock, ["info status", "info cpus"], timeout=10)
    finally:
        t.join()
        server.close()
    assert answers.text == "(qemu) info status\nVM status: running\n"
    assert answers.error == f"monitor {sock}: the monitor closed the connection"
    assert answers.report().endswith("running\n" + answers.error + "\n")
