"""`pyvmm` end to end as a subprocess: guest exit codes, crashes, bad input, timeout, control socket, signals."""

from __future__ import annotations

import json
import os
import re
import signal
import time

import pytest

from pyvmm.common import control_client as control

HELLO = r"""
_start:
    lea msg(%rip), %rsi
    mov $0x3f8, %dx
1:  lodsb
    test %al, %al
    jz 2f
    out %al, %dx
    jmp 1b
2:  EXIT 7
msg: .asciz "hello from the guest\n"
"""

# Prints a line and a partial line, then halts for good (with interrupts off).
HANG = r"""
_start:
    test %edi, %edi
    jnz 3f
    lea msg(%rip), %rsi
    mov $0x3f8, %dx
1:  lodsb
    test %al, %al
    jz 3f
    out %al, %dx
    jmp 1b
3:  cli
    hlt
    jmp 3b
msg: .asciz "ready\npartial"
"""

TRIPLE_FAULT = r"""
_start:
    ud2                 # #UD with an empty IDT: #GP, #DF, shutdown
"""

EMULATION_FAILURE = r"""
_start:
    lea buf(%rip), %rdi
    lock cmpxchg16b (%rdi)     # CPL0 code is emulated here; the emulator lacks cmpxchg16b
    EXIT 0
.balign 16
buf: .quad 0, 0
"""


def one_error_line(stderr: str) -> str:
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert "Traceback" not in stderr
    assert len(lines) == 1, stderr
    return lines[0]


def test_guest_exit_code_and_console(pyvmm, guest):
    r = pyvmm("boot", "--kernel", str(guest(HELLO)), "--no-pvsched", "--cpus", "1")
    assert r.returncode == 7, r.stderr
    assert r.stdout == "hello from the guest\n"


def test_triple_fault_ends_with_one_line(pyvmm, guest):
    r = pyvmm("boot", "--kernel", str(guest(TRIPLE_FAULT)), "--no-pvsched", "--cpus", "1")
    assert r.returncode == 125
    line = one_error_line(r.stderr)
    assert "vCPU 0" in line and "triple fault" in line and "KVM_EXIT_SHUTDOWN" in line and "RIP 0x100000" in line


def test_emulation_failure_ends_with_one_line(pyvmm, guest):
    r = pyvmm("boot", "--kernel", str(guest(EMULATION_FAILURE)), "--no-pvsched", "--cpus", "1")
    if r.returncode == 0:
        pytest.skip("this host's KVM runs cmpxchg16b at CPL0 (hardware virtualization)")
    assert r.returncode == 125
    line = one_error_line(r.stderr)
    assert "vCPU 0" in line and "emulation failure" in line and "RIP 0x" in line
    assert "instruction f0 48 0f c7" in line  # the lock cmpxchg16b it stopped at


@pytest.mark.parametrize("args, expect", [
    (["--kvm-device", "/nonexistent/kvm"], "does not exist"),
    (["--kvm-device", "/dev/null"], "not a KVM device"),
    (["--cpus", "0"], "--cpus must be at least 1"),
    (["--mem", "4"], "too small"),
    (["--cpus", "x"], "invalid int value"),
    (["--timeout", "0"], "--timeout must be positive"),
])
def test_bad_input_is_one_line_and_exit_2(pyvmm, guest, args, expect):
    r = pyvmm("boot", "--kernel", str(guest(HELLO)), "--no-pvsched", *args)
    assert r.returncode == 2
    assert expect in one_error_line(r.stderr)


def test_kernel_that_is_not_elf_or_bzimage(pyvmm, tmp_path):
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"\x00" * 4096)
    r = pyvmm("boot", "--kernel", str(junk), "--no-pvsched")
    assert r.returncode == 2
    assert "not an ELF file nor a Linux bzImage" in one_error_line(r.stderr)
    r = pyvmm("boot", "--kernel", str(tmp_path / "missing"), "--no-pvsched")
    assert r.returncode == 2 and "no such file" in one_error_line(r.stderr)


def test_timeout_exits_124_with_console_flushed(pyvmm, guest):
    t0 = time.monotonic()
    r = pyvmm("boot", "--kernel", str(guest(HANG)), "--no-pvsched", "--timeout", "1")
    assert r.returncode == 124
    assert time.monotonic() - t0 < 15
    assert r.stdout == "ready\npartial"  # the partial line is flushed too
    line = one_error_line(r.stderr)
    # the same line says where each vCPU stood: both halted for good with interrupts off
    assert re.fullmatch(r"pyvmm: timeout: VM stopped after 1 s \(read \d+ ms after the stop: vCPU 0 halted at RIP 0x[0-9a-f]+, IF=0, [^;]+; "
                        r"vCPU 1 halted at RIP 0x[0-9a-f]+, IF=0, [^;]+\)", line), line


def _wait_for_socket(p, timeout: float = 20) -> None:
    path = control.socket_path(p.pid)
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert p.poll() is None, p.communicate()
        assert time.monotonic() < deadline, "control socket did not appear"
        time.sleep(0.05)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_control_socket_status_and_clean_shutdown_on_signal(pyvmm, pyvmm_bg, guest, sig):
    p = pyvmm_bg("boot", "--kernel", str(guest(HANG)), "--no-pvsched", "--cpus", "2", "--timeout", "60")
    _wait_for_socket(p)
    r = pyvmm("status", str(p.pid), "--json", timeout=20)
    assert r.returncode == 0, r.stderr
    st = json.loads(r.stdout)
    assert st["pid"] == p.pid and st["nr_vcpus"] == 2 and st["mem"] == 256 << 20
    tids = [int(t) for t in st["vcpu_tids"].values()]
    assert len(set(tids)) == 2 and all(os.path.exists(f"/proc/{p.pid}/task/{t}") for t in tids)
    r = pyvmm("status", str(p.pid), timeout=20)
    assert r.returncode == 0 and f"VM pid {p.pid}: 2 vCPUs" in r.stdout
    # No pvsched device: policy commands get a clear error from the VM.
    r = pyvmm("policy", "show", "--vm", str(p.pid), timeout=20)
    assert r.returncode == 1 and "unknown command 'policy.show'" in one_error_line(r.stderr)
    os.kill(p.pid, sig)
    out, err = p.communicate(timeout=20)
    assert p.returncode == 128 + sig
    assert out == "ready\npartial"
    assert f"stopped by {sig.name}" in one_error_line(err)
    assert not control.socket_path(p.pid).exists()


def test_status_of_a_vm_that_is_not_running(pyvmm):
    r = pyvmm("status", "999999999")
    assert r.returncode == 1 and "no VM with pid 999999999" in one_error_line(r.stderr)


def test_help_explains_every_boot_option_and_bench_is_delegated(pyvmm):
    r = pyvmm("boot", "--help")
    assert r.returncode == 0
    for opt in ("--kernel", "--initrd", "--cmdline", "--cpus", "--mem", "--timeout", "--no-pvsched", "--no-policy",
                "--policy-set", "--pvsched-host-version", "--pvsched-host-features", "--kvm-device", "--console",
                "--json", "--json-out"):
        assert opt in r.stdout
    r = pyvmm("bench", "--help")
    assert r.returncode == 0 and "usage: pyvmm bench" in r.stdout


def test_partial_line_reaches_stdout_while_the_vm_runs(pyvmm_bg, guest):
    import select

    p = pyvmm_bg("boot", "--kernel", str(guest(HANG)), "--no-pvsched", "--cpus", "1", "--timeout", "30")
    got = b""
    deadline = time.monotonic() + 15
    while not got.endswith(b"partial") and time.monotonic() < deadline:
        ready, _, _ = select.select([p.stdout], [], [], 1)
        if ready:
            got += os.read(p.stdout.fileno(), 100)
    assert got == b"ready\npartial" and p.poll() is None


ECHO = r"""
_start:
    mov $0x3fd, %dx         # LSR: wait for data
1:  in %dx, %al
    test $1, %al
    jz 1b
    mov $0x3f8, %dx
    in %dx, %al
    mov $0x3f8, %dx
    out %al, %dx            # echo it
    mov $0xf4, %dx
    out %al, %dx            # and exit with it
"""


def test_stdin_reaches_the_guest_uart(pyvmm, guest):
    r = pyvmm("boot", "--kernel", str(guest(ECHO)), "--no-pvsched", "--cpus", "1", "--timeout", "30", input="A")
    assert r.returncode == ord("A"), r.stderr
    assert r.stdout == "A"


def test_no_permission_on_the_kvm_device_is_one_clear_line():
    """A real EACCES: a child drops root and opens /dev/kvm (mode 0600 root) itself."""
    from pyvmm.vmm.machine import Machine, VmmError

    if os.stat("/dev/kvm").st_mode & 0o006:
        pytest.skip("/dev/kvm is world-accessible here")
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: no pytest machinery from here on, just report and _exit
        msg = "opened"
        try:
            os.setgroups([])
            os.setresgid(65534, 65534, 65534)
            os.setresuid(65534, 65534, 65534)
            Machine(1, 16)
        except VmmError as e:
            msg = str(e)
        except BaseException as e:  # noqa: BLE001 - the child must always report and exit
            msg = f"unexpected {e!r}"
        os.write(wfd, msg.encode())
        os._exit(0)
    os.close(wfd)
    try:
        msg = os.read(rfd, 4096).decode()
    finally:
        os.close(rfd)
        os.waitpid(pid, 0)
    assert msg == "no permission to open /dev/kvm (need read/write access, e.g. the kvm group)"


def test_status_without_pid_finds_the_only_vm(pyvmm, pyvmm_bg, guest, tmp_path):
    env = {"PYVMM_RUN_DIR": str(tmp_path / "run")}  # a private socket dir: other VMs on the host are not seen
    r = pyvmm("status", env=env)
    assert r.returncode == 1 and "no VM is running" in one_error_line(r.stderr)
    p = pyvmm_bg("boot", "--kernel", str(guest(HANG)), "--no-pvsched", "--cpus", "1", "--timeout", "60", env=env)
    sock = tmp_path / "run" / f"{p.pid}.sock"
    deadline = time.monotonic() + 20
    while not sock.exists():
        assert p.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    r = pyvmm("status", env=env)
    assert r.returncode == 0 and f"VM pid {p.pid}: 1 vCPUs" in r.stdout
    os.kill(p.pid, signal.SIGTERM)
    p.communicate(timeout=20)
    assert not sock.exists()


VCPU_LINE = re.compile(r"^vCPU (\d+)  probe  p50 +[\d.]+ us  p99 +[\d.]+ us  max +[\d.]+ us  \(\d+ samples, \d+ missed\)"
                       r"  \|  boosts \d+, throttles \d+, boosted [\d.]+ ms$")


def test_default_boot_prints_human_lines_and_no_json(pyvmm):
    """The test guest with the default output: the negotiation in words, one line per vCPU, no JSON record."""
    r = pyvmm("boot", "--cmdline", "duration=1", "--timeout", "60", timeout=90)
    assert r.returncode == 0, r.stderr[-2000:]
    lines = r.stdout.splitlines()
    assert not [ln for ln in lines if ln.lstrip().startswith("{")], r.stdout
    assert "pvsched-testguest: booting" in lines                   # the guest's own text passes through
    assert "pvsched: active, version 1.0, features critical_sections,task_params,host_feedback,wake_hint," \
           "rt_waiter" in lines, r.stdout
    vcpus = [int(m.group(1)) for ln in lines if (m := VCPU_LINE.match(ln))]
    assert vcpus == [0, 1], r.stdout


def test_json_out_holds_the_records_and_json_prints_exactly_them(pyvmm, tmp_path):
    out = tmp_path / "records.jsonl"
    r = pyvmm("boot", "--cmdline", "duration=0.5", "--timeout", "60", "--json-out", str(out), timeout=90)
    assert r.returncode == 0, r.stderr[-2000:]
    recs = [json.loads(ln) for ln in out.read_text().splitlines()]
    assert [x["type"] for x in recs if x["type"] in ("config", "pvsched", "done")] == ["config", "pvsched", "done"]
    assert sorted(x["vcpu"] for x in recs if x["type"] == "latency") == [0, 1]
    assert "vCPU 0  probe" in r.stdout and '{"type"' not in r.stdout   # stdout stays human
    # --json: stdout holds the record lines and nothing else, the same lines --json-out writes
    r = pyvmm("boot", "--json", "--cmdline", "duration=0.5", "--timeout", "60", "--json-out", str(out), timeout=90)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout == out.read_text() and r.stdout.startswith('{"type":"config"')


def test_console_echoes_the_raw_console(pyvmm):
    r = pyvmm("boot", "--console", "--no-pvsched", "--cmdline", "duration=0.2", "--timeout", "60", timeout=90)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.startswith("pvsched-testguest: booting\n{\"type\":\"config\"")
    assert '{"type":"pvsched","status":"absent"}' in r.stdout and "vCPU 0" not in r.stdout


def test_json_out_refuses_a_symlink_and_a_missing_folder(pyvmm, guest, tmp_path):
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "target")
    r = pyvmm("boot", "--kernel", str(guest(HELLO)), "--no-pvsched", "--json-out", str(link))
    assert r.returncode == 2 and "is a symlink: refusing to write through it" in one_error_line(r.stderr)
    assert not (tmp_path / "target").exists()
    r = pyvmm("boot", "--kernel", str(guest(HELLO)), "--no-pvsched", "--json-out", str(tmp_path / "no" / "f"))
    assert r.returncode == 2 and "no such directory" in one_error_line(r.stderr)
    r = pyvmm("boot", "--console", "--json")
    assert r.returncode == 2 and "not allowed with argument" in one_error_line(r.stderr)
