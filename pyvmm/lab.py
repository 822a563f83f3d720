"""`pyvmm lab`: run one command inside a Linux VM that offers hardware virtualization to its own guests.

Hosts without VMX/SVM (or whose /dev/kvm cannot run Linux guests, such as
KVM's PVM backend) cannot run a Linux guest under pyvmm, nor fire KVM's
`kvm_exit`/`kvm_entry` tracepoints.  QEMU's TCG with `-cpu max` offers AMD
SVM to its guest, where Debian's generic kernel loads `kvm_amd` (told to use
shadow paging, see vng_command) and has a working /dev/kvm.  The lab boots that kernel with
virtme-ng (`vng`): the host's root file system is shared read-only (with
throwaway overlays on /etc, /usr, /var, /tmp, ...), the working directory is
shared writable so results come back, and COMMAND runs as root in the
caller's working directory with the caller's PATH.  The lab exits with
COMMAND's status and passes its stdout and stderr through.

The inner kernel is resolved through Debian's meta package
(`linux-image-amd64`) and unpacked with its modules into the project's build
cache; nothing is installed on the host for it.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import BinaryIO

from pyvmm.common import lab_env
from pyvmm.guest.linux.kernel import KernelFetchError, fetch_lab_kernel

EXIT_BAD_INPUT = 2
EXIT_LAB_FAILED = 125   # the lab itself did not run the command (boot failure, no /dev/kvm inside)
DEFAULT_CPUS = 2
DEFAULT_MEM_MIB = 3072
# udev names the virtio-serial ports through which vng carries the command's stdin, stdout, stderr and
# exit status; without udevd in the shared root, vng falls back to the console and loses the status.
UDEVD = (Path("/lib/systemd/systemd-udevd"), Path("/usr/lib/systemd/systemd-udevd"))

DESCRIPTION = __doc__.split("\n\n")[0]
EPILOG = """What it costs: every instruction of the lab's kernel, of pyvmm and of the host's own
processes inside the lab is emulated by QEMU TCG, about 10-50x slower than
native, and a guest of pyvmm runs nested under that.  Absolute times inside
the lab mean nothing; compare configurations within one lab run (ratios),
never against runs outside it.  Booting the lab and starting Python take
about 20 s before COMMAND runs.

Examples:
  pyvmm lab -- pyvmm boot --cmdline duration=2
  pyvmm lab -- pyvmm bench --guest linux --quick
  pyvmm lab --cpus 2 --mem 4096 -- sh -c 'grep -c svm /proc/cpuinfo'

exit status: COMMAND's; 2 bad input or a missing prerequisite; 125 the lab
did not get to run COMMAND."""


class LabError(RuntimeError):
    """The lab cannot start; the message says what is missing."""


def host_has_hw_virt() -> bool:
    """True when this host's CPU advertises VMX or SVM and /dev/kvm exists (QEMU can then use KVM)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return bool(re.search(r"^flags\s*:.*\b(vmx|svm)\b", flags, re.MULTILINE)) and os.path.exists("/dev/kvm")


# Every lab CPU but cpu0 (the boot CPU, which cannot go offline), offline or back online.
OTHER_CPUS = "for c in /sys/devices/system/cpu/cpu[1-9]*/online; do [ -e \"$c\" ] && echo {} > \"$c\"; done"


def guest_script(argv: list[str], cwd: str, path: str, hold_keys: bool = False) -> str:
    """The shell the lab's guest runs: load KVM, mount bpffs, then run COMMAND in cwd with PATH.

    hold_keys (under TCG): first turn on, with one CPU online, the static keys and static calls a pyvmm boot
    flips, and keep them on (pyvmm/lab_keys.py); after COMMAND, take the other CPUs offline again, so that the
    holder's end at power-off flips them back with one CPU running too."""
    lines = [
        # kvm_amd under TCG's nested SVM; kvm_intel where QEMU runs on KVM over a VMX host.
        "modprobe -q kvm_amd 2>/dev/null || modprobe -q kvm_intel 2>/dev/null",
        ("if [ ! -e /dev/kvm ]; then echo 'pyvmm lab: no /dev/kvm inside the lab "
         "(kvm_amd/kvm_intel did not load)' >&2; exit 125; fi"),
        "grep -qs ' /sys/fs/bpf bpf ' /proc/mounts || mount -t bpf -o mode=0700 bpf /sys/fs/bpf",
    ]
    if hold_keys:
        lines += [OTHER_CPUS.format(0),
                  f"{shlex.quote(sys.executable)} -I -m pyvmm.lab_keys || exit 125",
                  OTHER_CPUS.format(1)]
    lines += [
        f"export PATH={shlex.quote(path)}",
        f"export {lab_env.IN_LAB_VAR}=1",
        f"cd {shlex.quote(cwd)} || exit 125",
    ]
    if hold_keys:
        lines += [shlex.join(argv), "rc=$?", OTHER_CPUS.format(0), "exit $rc"]
    else:
        lines.append(f"exec {shlex.join(argv)}")
    return "\n".join(lines)


def vng_command(kernel: Path, script: str, cpus: int, mem_mib: int, cwd: str, rwdirs: list[str],
                accel: str, monitor: str | None = None) -> list[str]:
    """The vng command line that runs the shell script at path `script` (a host file the lab sees) in the lab.

    The script goes by path, not inline: vng passes --exec on the kernel command line, which x86 cuts at
    2048 bytes, and a cut command line leaves the lab's init waiting for ever."""
    vng = shutil.which("vng")
    if vng is None:
        raise LabError("vng (PyPI virtme-ng) is not installed: run scripts/setup.sh")
    cmd = [vng, "--run", str(kernel), "--disable-microvm", "--cpus", str(cpus), "--memory", f"{mem_mib}M",
           "--cwd", cwd]
    # Under TCG: -cpu max advertises SVM with nested paging; thread=multi runs the lab's CPUs in parallel
    # (thread=single, tried against the hang that pyvmm/lab_keys.py avoids, stalled a Linux guest's boot
    # for 290 s at its first lines, and ran it several times slower).
    # tsc=reliable: QEMU TCG derives every lab CPU's TSC from one host counter (cpu_get_ticks), yet the lab
    # kernel's TSC sync check fails under emulation ("TSCs unsynchronized").  With a TSC it calls unstable,
    # the lab's KVM lets each vCPU's TSC drift apart until a guest CPU's timers stop.
    # kvm_amd.npt=0: with nested paging, guests triple-fault while the emulated CPU delivers an injected
    # interrupt, and QEMU as the inner VMM can hang the lab; with the lab's KVM on shadow paging, QEMU TCG's
    # nested page walk is out of the way (docs/linux-lab.md, "The lab's triple faults and hangs").
    # idle=poll: now and then a lab CPU halted for good after leaving a guest, IF set, never taking the
    # timer, IPI and device vectors its local APIC held nor an NMI (as if its GIF had stayed clear), and
    # every thread woken onto it waited for ever.  A polling idle CPU needs no interrupt to see a wake-up:
    # it runs the woken thread, and if its GIF is what stayed clear, the next VMRUN sets it again
    # (docs/linux-lab.md, 2026-12-07).  The price: an idle lab CPU spins on a host CPU.
    tcg = accel == "tcg"
    qemu = "-cpu max -accel tcg,thread=multi" if tcg else "-cpu host"
    append = ["tsc=reliable", "kvm_amd.npt=0", "idle=poll"] if tcg else []
    if monitor is not None:
        # QEMU's human monitor answers while the lab's kernel is stuck (`info registers -a`, `info lapic`),
        # and its `sendkey alt-sysrq-w` asks the lab's kernel for its blocked tasks: Debian's kernel.sysrq
        # leaves out the dumps unless they are always enabled.
        qemu += f" -monitor unix:{monitor},server=on,wait=off"
        append.append("sysrq_always_enabled")
    if tcg:
        cmd.append("--disable-kvm")
    cmd.append(f"--qemu-opts={qemu}")
    if append:
        cmd += ["--append", " ".join(append)]
    for d in rwdirs:
        cmd.append(f"--rwdir={d}")
    cmd += ["--exec", f"sh {shlex.quote(script)}"]
    return cmd


def _pump(src: BinaryIO, dst: BinaryIO) -> None:
    """Copy src to dst as data arrives, until EOF."""
    while chunk := os.read(src.fileno(), 65536):
        dst.write(chunk)
        dst.flush()
    src.close()


def _check_monitor_path(path: str) -> str:
    """The absolute path QEMU may create its monitor socket at: a new name in an existing folder.

    QEMU removes whatever is at that path before it binds, so an existing file is refused rather than
    lost.  vng joins --qemu-opts into one command line that it splits again, and a comma ends QEMU's
    option: the path is held to letters, digits and _ . / - (an allowlist)."""
    full = os.path.abspath(path)
    if not re.fullmatch(r"[A-Za-z0-9_./-]+", full):
        raise LabError(f"--monitor {path}: use only letters, digits and _ . / - in the path")
    if not os.path.isdir(os.path.dirname(full)):
        raise LabError(f"--monitor {path}: no such directory")
    if os.path.lexists(full):
        raise LabError(f"--monitor {path}: already exists (QEMU would remove it)")
    return full


def _resolve_kernel(kernel: str | None) -> Path:
    if kernel is not None:
        p = Path(kernel)
        if not p.is_file():
            raise LabError(f"--kernel {kernel}: no such file")
        return p
    try:
        return fetch_lab_kernel()
    except KernelFetchError as e:
        raise LabError(f"cannot fetch the lab kernel (Debian linux-image-amd64): {e}") from None


def check_prerequisites() -> None:
    """Raise LabError naming what the lab needs and this host lacks."""
    if shutil.which("qemu-system-x86_64") is None:
        raise LabError("qemu-system-x86_64 is missing (apt package qemu-system-x86): run scripts/setup.sh")
    if not any(p.exists() for p in UDEVD):
        raise LabError("systemd-udevd is missing (apt package udev): the lab needs it to return COMMAND's "
                       "output and exit status; run scripts/setup.sh")
    if os.geteuid() != 0:
        raise LabError("the lab runs COMMAND as root inside its VM and shares the working directory "
                       "writable: run it as root")


def run_lab(argv: list[str], kernel: str | None = None, cpus: int = DEFAULT_CPUS, mem_mib: int = DEFAULT_MEM_MIB,
            rwdirs: list[str] | None = None, verbose: bool = False, monitor: str | None = None) -> int:
    """Run argv inside the lab and return its exit status (raises LabError before starting)."""
    if not argv:
        raise LabError("no COMMAND given (pyvmm lab [options] -- COMMAND...)")
    if cpus < 1:
        raise LabError(f"--cpus must be at least 1 (got {cpus})")
    if mem_mib < 512:
        raise LabError(f"--mem {mem_mib}: the lab needs at least 512 MiB")
    if monitor is not None:
        monitor = _check_monitor_path(monitor)
    check_prerequisites()
    kpath = _resolve_kernel(kernel)
    cwd = os.getcwd()
    dirs = [cwd] if rwdirs is None else rwdirs
    for d in dirs:
        if not os.path.isdir(d):
            raise LabError(f"--rwdir {d}: no such directory")
    accel = "kvm" if host_has_hw_virt() else "tcg"
    # The lab sees the host's /tmp through an overlay: a private directory there carries the script.
    tmp = tempfile.mkdtemp(prefix="pyvmm-lab-")
    try:
        script = os.path.join(tmp, "run.sh")
        with open(script, "x") as f:
            f.write(guest_script(argv, cwd, os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
                                 hold_keys=accel == "tcg") + "\n")
        cmd = vng_command(kpath, script, cpus, mem_mib, cwd, [os.path.abspath(d) for d in dirs], accel,
                          monitor)
        return _run_vng(cmd, kpath, accel, cpus, mem_mib, verbose)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _run_vng(cmd: list[str], kpath: Path, accel: str, cpus: int, mem_mib: int, verbose: bool) -> int:
    if verbose:
        cmd.insert(1, "--verbose")
        print(f"pyvmm lab: {shlex.join(cmd)}", file=sys.stderr)
    how = "QEMU TCG, nested SVM" if accel == "tcg" else "QEMU on KVM, nested"
    print(f"pyvmm lab: booting {kpath.name} ({how}, {cpus} CPUs, {mem_mib} MiB)", file=sys.stderr, flush=True)
    # QEMU opens vng's /proc/self/fd/1 and /2 as chardev files, truncating a file they point to (and
    # writing both from offset 0): hand it pipes and copy them out, so `pyvmm lab ... > log` keeps all.
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL if not sys.stdin.isatty() else None,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    pumps = [threading.Thread(target=_pump, args=(src, dst), daemon=True)
             for src, dst in ((proc.stdout, sys.stdout.buffer), (proc.stderr, sys.stderr.buffer))]
    for t in pumps:
        t.start()
    try:
        rc = proc.wait()
    except KeyboardInterrupt:
        proc.terminate()
        proc.wait()
        rc = 128 + 2
    for t in pumps:
        t.join()
    # vng reports its own failures (QEMU did not start, no status came back) as 255.
    if rc == 255:
        print("pyvmm lab: the lab VM ended without COMMAND's exit status (run with -v to see its console)",
              file=sys.stderr)
        return EXIT_LAB_FAILED
    return rc


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        print(f"{self.prog}: error: {message} (see --help)", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)


def parser() -> argparse.ArgumentParser:
    """The `pyvmm lab` argument parser."""
    p = _Parser(prog="pyvmm lab", description=DESCRIPTION, epilog=EPILOG,
                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kernel", metavar="VMLINUZ",
                   help="the lab's kernel (default: Debian's current generic kernel, fetched through the "
                        "linux-image-amd64 meta package with its modules; its modules are looked for in "
                        "../lib/modules/<release> next to a given image)")
    p.add_argument("--cpus", type=int, default=DEFAULT_CPUS, metavar="N", help=f"lab CPUs (default {DEFAULT_CPUS})")
    p.add_argument("--mem", type=int, default=DEFAULT_MEM_MIB, metavar="MIB",
                   help=f"lab RAM in MiB (default {DEFAULT_MEM_MIB})")
    p.add_argument("--rwdir", action="append", metavar="DIR",
                   help="a host directory the lab may write (repeatable; default: the working directory); "
                        "everything else is read-only, with throwaway overlays")
    p.add_argument("-v", "--verbose", action="store_true", help="show the lab's console and the vng command")
    p.add_argument("--monitor", metavar="SOCKET",
                   help="serve QEMU's human monitor on this new unix socket, to look into a lab that stalls "
                        "from outside: `python -m pyvmm.lab_monitor SOCKET` prints where each lab CPU is and "
                        "asks the lab's kernel (SysRq) for its blocked tasks, shown on its console with -v")
    p.add_argument("command", nargs=argparse.REMAINDER, metavar="-- COMMAND...",
                   help="what to run inside the lab")
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of `pyvmm lab`."""
    args = parser().parse_args(sys.argv[1:] if argv is None else argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    try:
        return run_lab(command, args.kernel, args.cpus, args.mem, args.rwdir, args.verbose, args.monitor)
    except LabError as e:
        print(f"pyvmm lab: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
