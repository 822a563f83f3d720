"""`pyvmm`: boot a guest, or talk to a running VM.  A thin layer over pyvmm.boot and the control client.

Exit codes of `pyvmm boot`: the guest's own exit code (test guest: the byte
written to port 0xf4; Linux: 0 on power-off/reboot), 2 for a problem with
the input (no KVM, bad image, bad option), 124 when --timeout expired, 125
when the guest crashed the VM (triple fault, emulation failure, ...), 128+N
when stopped by signal N.  Every error is one line on stderr.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from pyvmm import abi
from pyvmm.boot import BootConfig, kernel_kind, run_vm
from pyvmm.cli.boot_report import end_lines, live_line
from pyvmm.cli.status_text import render
from pyvmm.common.control_client import ControlError, request
from pyvmm.common.safe_fs import write_file_nofollow
from pyvmm.policy import host_budget, programs
from pyvmm.vmm.console import RecordSplitter, record_lines
from pyvmm.vmm.machine import EXIT_BAD_INPUT, VmmError

EPILOG_BOOT = """output (stdout): the test guest's JSON records become human lines: the configuration and the
pvsched negotiation (version and features, or why pvsched is off) as they arrive, guest warnings
and errors, and at the end one line per vCPU: wakeup latency p50/p99/max in us (samples, missed)
and what the host policy did to its thread (boosts, throttles, boosted time, from the device).
Other console text (the test guest's own messages, any text of another ELF guest) is passed
through as the guest prints it.  A Linux bzImage's console is for people: it is echoed raw, as
with --console.  --json prints only the records; --json-out FILE keeps them whatever stdout shows.

exit status: the guest's exit code; 2 bad input; 124 --timeout expired;
125 the guest crashed the VM; 128+N stopped by signal N."""


class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage error as one line."""

    def error(self, message: str) -> None:  # type: ignore[override]
        print(f"{self.prog}: error: {message} (see --help)", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)


def _hex(s: str) -> int:
    try:
        return int(s, 16)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a hex number: {s!r}") from None


def _features(s: str) -> int:
    try:
        return abi.parse_features(s)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    except abi.AbiNotBuiltError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _key_value(s: str) -> tuple[str, str]:
    key, sep, value = s.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {s!r}")
    return key.strip(), value.strip()


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="pyvmm", description="A minimal VMM on /dev/kvm with paravirtualized vCPU scheduling.")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logs on stderr")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    b = sub.add_parser("boot", help="boot a guest (default: the bundled test guest)", epilog=EPILOG_BOOT,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    b.add_argument("--kernel", metavar="PATH",
                   help="guest kernel: a Linux bzImage or a test-guest ELF (told apart by magic); "
                        "default: the bundled test guest (built by scripts/setup.sh or the package build)")
    b.add_argument("--initrd", metavar="PATH", help="initramfs for a Linux kernel")
    b.add_argument("--cmdline", default="", metavar="STR",
                   help="guest command line; for the test guest: duration=<s> (default 5), interval=<us> "
                        "(default 1000), workload=<w>[,<w>...] one per vCPU (probe|busy|hog|idle|waker|wakee, "
                        "phases joined by '+', e.g. probe+busy), probe_policy=rr|fifo, probe_prio=8, hog_prio=99, "
                        "busy_nice=0, pvsched=0 (ignore the device); see pyvmm/guest/testguest/README.md")
    b.add_argument("--cpus", type=int, default=2, metavar="N", help="number of vCPUs (default 2)")
    b.add_argument("--mem", type=int, default=256, metavar="MIB", help="guest RAM in MiB (default 256)")
    b.add_argument("--timeout", type=float, metavar="S",
                   help="wall-clock limit in seconds: the VM is stopped and pyvmm exits 124, with one line saying where "
                        "each vCPU stood (halted or runnable, RIP, IF, LAPIC timer, pending vectors)")
    b.add_argument("--no-pvsched", action="store_true", help="boot without the pvsched PCI device")
    b.add_argument("--no-policy", action="store_true",
                   help="keep the pvsched device but run no host policy (the benchmark's 'vanilla')")
    b.add_argument("--policy-program", default=programs.DEFAULT, metavar="NAME",
                   help="the BPF policy to load: one per pyvmm/policy/*.bpf.c, e.g. pvsched (default) or "
                        "rt_only (task parameters only); `pyvmm features` lists the built ones")
    b.add_argument("--policy-set", action="append", type=_key_value, default=[], metavar="KEY=VALUE",
                   help="initial policy tunable (repeatable), as `pyvmm policy set` takes them")
    b.add_argument("--pvsched-host-version", type=_hex, metavar="HEX",
                   help="version the pvsched device offers (default: this build's), to test refusals")
    b.add_argument("--pvsched-host-features", type=_features, metavar="HEX|NAMES",
                   help="feature bits the pvsched device offers, as hex or comma-separated names "
                        "(default: every feature the header offers; `pyvmm features` lists them)")
    b.add_argument("--no-console-input", action="store_true",
                   help="do not forward stdin to the guest's serial port (default: forward it, "
                        "unless stdin is a terminal of a background job)")
    b.add_argument("--stats-out", type=Path, metavar="FILE",
                   help="at the end, write JSON of what the run did: exit code, and the pvsched device's state "
                        "and the policy's final policy.show (boosts, throttles, BPF ns per event, event-to-"
                        "sched_setattr latency), so a script need not poll the control socket")
    b.add_argument("--kvm-device", default=os.environ.get("PYVMM_KVM_DEVICE", "/dev/kvm"), metavar="PATH",
                   help="KVM device node (default /dev/kvm, or $PYVMM_KVM_DEVICE)")
    shown = b.add_mutually_exclusive_group()
    shown.add_argument("--console", action="store_true",
                       help="echo the guest's raw console to stdout, JSON records and all (the default for Linux)")
    shown.add_argument("--json", action="store_true",
                       help="print only the guest's JSON records to stdout, one per line as the guest printed "
                            "them, as they come (for scripts; other console text is dropped)")
    b.add_argument("--json-out", type=Path, metavar="FILE",
                   help="at the end, write the guest's JSON records to FILE, one per line")

    s = sub.add_parser("status", help="show a running VM (its pid may be left out when only one runs)")
    s.add_argument("pid", nargs="?", type=int, help="pid of the VMM")
    s.add_argument("--json", action="store_true", help="print the raw JSON reply")

    pol = sub.add_parser("policy", help="show or change the host policy of a running VM")
    psub = pol.add_subparsers(dest="policy_command", required=True, parser_class=_Parser)
    show = psub.add_parser("show", help="per-vCPU state, stats and tunables")
    show.add_argument("--vm", type=int, metavar="PID", help="pid of the VMM (default: the only VM running)")
    show.add_argument("--json", action="store_true", help="print the raw JSON reply")
    st = psub.add_parser("set", help="change tunables, e.g. `pyvmm policy set boost_prio=10`")
    st.add_argument("values", nargs="+", type=_key_value, metavar="KEY=VALUE")
    st.add_argument("--vm", type=int, metavar="PID", help="pid of the VMM (default: the only VM running)")
    st.add_argument("--json", action="store_true", help="print the raw JSON reply")

    sub.add_parser("features", help="list the pvsched feature bits and the BPF policies this build has")

    hb = sub.add_parser("host-budget", help="show or set the host's RT budget: the share of all CPUs that the boosted "
                                            "vCPUs of every VM may take together (root)",
                        description="The host's RT budget bounds all VMs together (each VM's vm_boost_share_pct bounds "
                                    "that VM alone). It lives in one pinned BPF map that every VM's policy counts into "
                                    "and only this command, as root, changes; VMs running now follow it at once. "
                                    "Without options: show it.")
    hb.add_argument("--share", type=int, metavar="PCT",
                    help="percent of all the host's CPUs (1..100; default until set: 50)")
    hb.add_argument("--window-ms", type=int, metavar="MS", help="accounting window (10..10000 ms; default 100)")
    hb.add_argument("--json", action="store_true", help="print it as JSON")

    # Listed here for --help only: main() hands `pyvmm bench ...` to pyvmm.bench.run, which has its own options.
    sub.add_parser("bench", add_help=False, help="benchmark vCPU scheduling configurations (pyvmm bench --help)")
    sub.add_parser("lab", add_help=False,
                   help="run a command inside a VM with nested hardware virtualization (pyvmm lab --help)")
    return p


def _out_path_problem(option: str, path: Path | None) -> str | None:
    """Why an output file option cannot be written (checked before the VM runs), or None."""
    if path is not None and not path.parent.is_dir():
        return f"{option} {path}: no such directory {path.parent}"
    if path is not None and path.is_symlink():  # checked again (O_NOFOLLOW) when written
        return f"{option} {path} is a symlink: refusing to write through it"
    return None


def _is_linux(kernel: str | None) -> bool:
    """Whether --kernel names a Linux bzImage (an unreadable file is left for run_vm to report)."""
    if kernel is None:
        return False
    try:
        with open(kernel, "rb") as f:
            return kernel_kind(f.read(0x210)) == "bzimage"
    except (OSError, VmmError):
        return False


def _write_stdout(data: bytes) -> None:
    try:
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()
    except (OSError, ValueError):
        pass  # stdout went away (closed pipe): the VM runs on


def _console_stream(args: argparse.Namespace) -> RecordSplitter | None:
    """What takes the guest's console: None for the raw console (stdout), else a splitter per --json or the report."""
    if args.console or (not args.json and _is_linux(args.kernel)):
        return None
    if args.json:
        return RecordSplitter(lambda line, rec: _write_stdout(line), lambda text: None)

    def shown(line: bytes, rec: dict) -> None:
        if (text := live_line(rec)) is not None:
            _write_stdout(text.encode() + b"\n")

    return RecordSplitter(shown, _write_stdout)


def _write_out(option: str, path: Path, text: str) -> bool:
    """Write an output file the user named (never through a symlink); False, after one line on stderr, if not."""
    try:
        write_file_nofollow(path, text)
        return True
    except OSError as e:
        print(f"pyvmm: cannot write {option} {path}: {e.strerror or e}", file=sys.stderr)
        return False


def _boot(args: argparse.Namespace) -> int:
    for option, path in (("--stats-out", args.stats_out), ("--json-out", args.json_out)):
        if (problem := _out_path_problem(option, path)) is not None:
            print(f"pyvmm: {problem}", file=sys.stderr)
            return EXIT_BAD_INPUT
    splitter = _console_stream(args)
    cfg = BootConfig(kernel=args.kernel, initrd=args.initrd, cmdline=args.cmdline, cpus=args.cpus,
                     mem_mib=args.mem, timeout=args.timeout, pvsched=not args.no_pvsched,
                     policy=not args.no_policy, tunables=dict(args.policy_set), program=args.policy_program,
                     host_version=args.pvsched_host_version, host_features=args.pvsched_host_features,
                     kvm_device=args.kvm_device, console_stream=splitter or sys.stdout.buffer,
                     console_input=None if args.no_console_input else sys.stdin.fileno())
    try:
        result = run_vm(cfg)
    except VmmError as e:
        print(f"pyvmm: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    if splitter is not None:
        splitter.finish()
        if not args.json and (lines := end_lines(result.records, result.device_stats)):
            _write_stdout("".join(line + "\n" for line in lines).encode())
    if result.message:
        print(f"pyvmm: {result.message}", file=sys.stderr)
    outputs = []
    if args.json_out:
        outputs.append(("--json-out", args.json_out, "".join(line + "\n" for line in record_lines(result.console))))
    if args.stats_out:
        stats = {"exit_code": result.exit_code, "message": result.message, "elapsed_s": round(result.elapsed_s, 3),
                 "devices": result.device_stats}
        outputs.append(("--stats-out", args.stats_out, json.dumps(stats, indent=1, default=str) + "\n"))
    for option, path, text in outputs:
        if not _write_out(option, path, text):
            return result.exit_code or EXIT_BAD_INPUT
    return result.exit_code


def _features_text() -> str:
    """The header's feature rows and the built policies, for `pyvmm features`."""
    lines = ["pvsched features (pyvmm/abi/pvsched_abi.h, PVSCHED_FEATURES):"]
    for f in abi.features():
        lines.append(f"  bit {f.bit:2}  {f.name:<18} {'offered' if f.offered else 'not offered':<12} {f.doc}")
    lines.append(f"BPF policies (--policy-program): {', '.join(programs.available()) or 'none built'}")
    return "\n".join(lines)


def _host_budget(args: argparse.Namespace) -> int:
    if os.geteuid() != 0:
        print("pyvmm host-budget: needs root (the budget is a pinned BPF map)", file=sys.stderr)
        return EXIT_BAD_INPUT
    try:
        if args.share is None and args.window_ms is not None:
            raise ValueError("--window-ms goes with --share")
        b = host_budget.read() if args.share is None else host_budget.set_share(args.share, args.window_ms)
    except ValueError as e:
        print(f"pyvmm host-budget: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except OSError as e:  # LibbpfError, UnsafePathError: one line
        print(f"pyvmm host-budget: {e}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(b, indent=2))
    else:
        print(f"host budget: {b['share_pct']}% of {b['ncpus']} CPUs, {b['budget_ms']} ms of boosted vCPU time per "
              f"{b['window_ms']} ms window for all VMs together ({b['boosted_ms']} ms used in the window counted last)")
    return 0


def _client(args: argparse.Namespace) -> int:
    if args.command == "status":
        pid, req = args.pid, {"cmd": "status"}
    elif args.policy_command == "show":
        pid, req = args.vm, {"cmd": "policy.show"}
    else:
        pid, req = args.vm, {"cmd": "policy.set", "values": dict(args.values)}
    try:
        reply = request(pid, req)
    except ControlError as e:
        print(f"pyvmm: {e}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(reply, indent=2))
    elif "error" not in reply:
        print(render(req["cmd"], reply) or json.dumps(reply, indent=2))
    if "error" in reply:
        print(f"pyvmm: {reply['error']}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `pyvmm` command."""
    argv = sys.argv[1:] if argv is None else argv
    # bench and lab are imported only when asked for (pyvmm.cli.tools): a VMM (`pyvmm boot`) that never
    # runs them would carry their modules in its resident memory for its whole life
    if argv[:1] in (["bench"], ["lab"]):
        from pyvmm.cli import tools
        return (tools.bench if argv[0] == "bench" else tools.lab)(argv[1:])
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(name)s: %(message)s", stream=sys.stderr)
    try:
        if args.command == "boot":
            return _boot(args)
        if args.command == "features":
            print(_features_text())
            return 0
        if args.command == "host-budget":
            return _host_budget(args)
        return _client(args)
    except KeyboardInterrupt:  # Ctrl-C before the VM's own signal handling is in place
        print("pyvmm: interrupted", file=sys.stderr)
        return 128 + 2

