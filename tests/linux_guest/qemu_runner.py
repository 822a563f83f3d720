"""Boot the Linux test image under QEMU with TCG and collect its console.

TCG because this machine's KVM (PVM backend) cannot run a stock Linux:
QEMU emulates the CPU instead and boots the Debian cloud kernel in seconds.
The guest's /init prints one JSON object per line; run_qemu() returns them
as records next to the raw console.

    python -m qemu_runner [--flavor cloud] [--workload selftest|cyclictest|shell] [--timeout 60]
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field

from pyvmm.guest.linux import build_image
from pyvmm.vmm.console import parse_records


class QemuError(RuntimeError):
    """QEMU is missing, failed, or the guest did not finish in time."""


@dataclass
class QemuResult:
    """What one guest boot printed."""

    returncode: int
    console: str
    records: list[dict] = field(default_factory=list)
    seconds: float = 0.0

    def of_type(self, kind: str) -> list[dict]:
        """Records whose "type" is kind."""
        return [r for r in self.records if r.get("type") == kind]

    def dmesg(self) -> str:
        """The dmesg dump /init printed between its markers ('' when absent)."""
        text = self.console.replace("\r\n", "\n")
        start = text.find("=== dmesg begin\n")
        end = text.find("=== dmesg end", start)
        return text[start + len("=== dmesg begin\n") : end] if start >= 0 and end >= 0 else ""


def qemu_command(
    image: build_image.Image, cmdline: str, cpus: int = 2, mem_mib: int = 512, extra_args: list[str] | None = None
) -> list[str]:
    """The qemu-system-x86_64 command line that boots image with TCG on the serial console."""
    qemu = shutil.which("qemu-system-x86_64")
    if qemu is None:
        raise QemuError("qemu-system-x86_64 not found (apt package qemu-system-x86)")
    # Single-threaded TCG: with one host thread per vCPU (MTTCG), the module's load or unload hung in about
    # 3% of boots here.  text_poke_bp() patches the call_function_single_entry tracepoint site inside the very
    # IPI handler it then waits on, and the other vCPU looped on the int3 there (soft lockups, RCU stalls).
    return [
        qemu, "-accel", "tcg,thread=single", "-nographic", "-serial", "stdio", "-monitor", "none",
        "-no-reboot", "-smp", str(cpus), "-m", str(mem_mib), "-nic", "none",
        "-kernel", str(image.kernel), "-initrd", str(image.initrd),
        "-append", f"console=ttyS0 panic=-1 {cmdline}", *(extra_args or []),
    ]  # fmt: skip


def run_qemu(
    image: build_image.Image,
    workload: str = "selftest",
    extra_cmdline: str = "",
    cpus: int = 2,
    mem_mib: int = 512,
    timeout: float = 60.0,
    extra_args: list[str] | None = None,
) -> QemuResult:
    """Boot image running workload; return its console once it powers off, killing QEMU (by PID) after timeout."""
    cmdline = f"quiet pvsched.workload={workload} {extra_cmdline}".strip()
    cmd = qemu_command(image, cmdline, cpus, mem_mib, extra_args)
    t0 = time.monotonic()
    proc = subprocess.Popen(
        cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True
    )
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # its own session: QEMU and nothing else
        out, _ = proc.communicate()
        console = out.decode(errors="replace")
        raise QemuError(f"guest did not power off within {timeout:.0f} s; console tail:\n{console[-3000:]}") from None
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    console = out.decode(errors="replace")
    return QemuResult(proc.returncode, console, parse_records(console), time.monotonic() - t0)


def main(argv: list[str] | None = None) -> int:
    """CLI: build the image if needed, boot it, print the console (interactive with --workload shell)."""
    ap = argparse.ArgumentParser(prog="python -m qemu_runner", description=__doc__.splitlines()[0])
    ap.add_argument("--flavor", default="cloud")
    ap.add_argument("--workload", default="selftest", help="selftest, cyclictest or shell")
    ap.add_argument("--append", default="", help="extra kernel command line (e.g. pvsched.duration=3)")
    ap.add_argument("--cpus", type=int, default=2)
    ap.add_argument("--mem", type=int, default=512, help="MiB")
    ap.add_argument("--timeout", type=float, default=120.0)
    ap.add_argument("--device", action="append", default=[], help="extra QEMU -device (repeatable), e.g. edu")
    args = ap.parse_args(argv)
    try:
        image = build_image.build_image(args.flavor)
        if args.workload == "shell":
            devices = [a for d in args.device for a in ("-device", d)]
            cmd = qemu_command(image, f"pvsched.workload=shell {args.append}", args.cpus, args.mem, devices)
            return subprocess.call(cmd)
        devices = [a for d in args.device for a in ("-device", d)]
        res = run_qemu(image, args.workload, args.append, args.cpus, args.mem, args.timeout, devices)
    except (build_image.ImageBuildError, build_image.kernel.KernelFetchError, QemuError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    sys.stdout.write(res.console)
    print(f"# {len(res.records)} records, {res.seconds:.1f} s, qemu exit {res.returncode}", file=sys.stderr)
    return res.returncode


if __name__ == "__main__":
    sys.exit(main())
