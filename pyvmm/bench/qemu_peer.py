"""A peer beside pyvmm: QEMU with `-accel kvm` booting the same Linux image and running the same cyclictest.

Used by `pyvmm bench --guest linux`: the same kernel, initramfs, command line, vCPU count and host load as
pyvmm's vanilla runs, without the pvsched device (QEMU does not have it; the module then finds no device
and cyclictest runs as on a plain VM).  Reported: the time from starting QEMU to the image's /init printing
its first record, and cyclictest's p50/p99/max.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field

from pyvmm.bench.results import cyclictest_summary
from pyvmm.bench.vmrun import console_reader, cyclictest_cmdline, parse_guest_lines


@dataclass
class PeerRun:
    """One QEMU run: how long /init took to start, the guest's cyclictest summary, or why it failed."""

    host: str
    init_after_s: float | None = None
    guest: dict | None = None
    wall_s: float = 0.0
    error: str | None = None
    console_tail: list[str] = field(default_factory=list)


def qemu_argv(kernel: str, initrd: str, duration_s: float, interval_us: int, cpus: int = 2,
              mem_mib: int = 512, policy: str = "rr") -> list[str]:
    """The QEMU command line of the peer run (KVM, no pvsched device, serial console on stdout)."""
    qemu = shutil.which("qemu-system-x86_64")
    if qemu is None:
        raise FileNotFoundError("qemu-system-x86_64 (apt package qemu-system-x86)")
    cmdline = "console=ttyS0 quiet panic=-1 " + cyclictest_cmdline(duration_s, interval_us, policy)
    return [qemu, "-accel", "kvm", "-cpu", "host", "-smp", str(cpus), "-m", str(mem_mib), "-nographic",
            "-serial", "stdio", "-monitor", "none", "-no-reboot", "-nic", "none",
            "-kernel", kernel, "-initrd", initrd, "-append", cmdline]


def run_peer(host: str, kernel: str, initrd: str, duration_s: float, interval_us: int,
             limit_s: float = 400, policy: str = "rr", on_boot=None, on_end=None) -> PeerRun:
    """Boot the image under QEMU/KVM once and collect; QEMU is killed (its own session) after limit_s.
    `on_boot()` and `on_end()` are called where pyvmm's runs open and close their window (console_reader)."""
    out = PeerRun(host)
    t0 = time.monotonic()
    try:
        argv = qemu_argv(kernel, initrd, duration_s, interval_us, policy=policy)
    except FileNotFoundError as e:
        out.error = f"not found: {e}"
        return out
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, errors="replace", start_new_session=True)
    lines: list[str] = []

    reader = console_reader(proc.stdout, lines, out, t0, on_boot, on_end)
    reader.start()
    try:
        rc = proc.wait(limit_s)
        if rc != 0:
            out.error = f"QEMU exited {rc}"
    except subprocess.TimeoutExpired:
        out.error = f"QEMU still running after {limit_s:.0f} s"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        reader.join(5)
    out.wall_s = round(time.monotonic() - t0, 2)
    out.console_tail = [ln.rstrip() for ln in lines[-5:]]
    out.guest = cyclictest_summary(parse_guest_lines(lines))
    if out.error is None and out.guest is None:
        out.error = "no complete cyclictest record"
    return out
