"""`pyvmm lab` without booting: the guest script, the vng command line, and bad input."""

from __future__ import annotations

import shlex
import subprocess
import sys

from pyvmm import lab


def test_guest_script_loads_kvm_mounts_bpffs_and_execs_the_command_where_the_caller_was():
    s = lab.guest_script(["pyvmm", "boot", "--cmdline", "a b; rm -rf /"], "/work dir", "/usr/bin:/bin")
    lines = s.splitlines()
    assert lines[0].startswith("modprobe -q kvm_amd")
    assert any("mount -t bpf -o mode=0700 bpf /sys/fs/bpf" in ln for ln in lines)
    assert "cd '/work dir' || exit 125" in lines
    assert "export PATH=/usr/bin:/bin" in lines
    assert lines[-1] == "exec pyvmm boot --cmdline 'a b; rm -rf /'"   # one argument, never shell code
    assert shlex.split(lines[-1])[1:] == ["pyvmm", "boot", "--cmdline", "a b; rm -rf /"]


def test_vng_command_offers_nested_svm_under_tcg_and_shares_only_the_rwdirs(monkeypatch):
    monkeypatch.setattr(lab.shutil, "which", lambda name: f"/usr/bin/{name}")
    cmd = lab.vng_command(lab.Path("/k/boot/vmlinuz-6.1"), "/tmp/x/run.sh", 2, 3072, "/w", ["/w", "/o"], "tcg")
    assert cmd[:3] == ["/usr/bin/vng", "--run", "/k/boot/vmlinuz-6.1"]
    assert "--disable-kvm" in cmd and "--qemu-opts=-cpu max -accel tcg,thread=multi" in cmd
    # the lab kernel's TSC trusted, its KVM on shadow paging: what kept guests from drifting clocks and
    # triple faults under TCG (docs/linux-lab.md)
    assert cmd[cmd.index("--append") + 1].split() == ["tsc=reliable", "kvm_amd.npt=0"]
    assert [c for c in cmd if c.startswith("--rwdir")] == ["--rwdir=/w", "--rwdir=/o"]
    assert cmd[-2:] == ["--exec", "sh /tmp/x/run.sh"]   # by path: the kernel command line is cut at 2048
    assert cmd[cmd.index("--cwd") + 1] == "/w" and cmd[cmd.index("--memory") + 1] == "3072M"
    kvm = lab.vng_command(lab.Path("/k"), "/s", 2, 3072, "/w", [], "kvm")
    assert "--disable-kvm" not in kvm and "--qemu-opts=-cpu host" in kvm


def _lab(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pyvmm.cli", "lab", *args], capture_output=True, text=True,
                          timeout=60, check=False)


def test_bad_input_is_one_line_and_exit_2():
    for args in ((), ("--",), ("--cpus", "0", "--", "true"), ("--mem", "100", "--", "true"),
                 ("--rwdir", "/nonexistent-dir", "--", "true"), ("--kernel", "/nonexistent", "--", "true"),
                 ("--cpus", "x", "--", "true")):
        r = _lab(*args)
        assert r.returncode == 2, (args, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr, (args, r.stderr)


def test_help_says_what_the_lab_is_for_and_what_it_costs():
    r = _lab("--help")
    assert r.returncode == 0
    text = " ".join(r.stdout.split())
    assert "nested" in text and "hardware virtualization" in text
    assert "compare configurations within one lab run" in text and "emulated" in text
