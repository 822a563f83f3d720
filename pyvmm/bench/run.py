"""`pyvmm bench`: guest latency and host cost of vCPU scheduling configurations (vanilla, static RT, static nice,
pvsched), on an idle and a busy host, with repetitions; writes results.json, results.md and results.png.

Each run boots the test guest (2 vCPUs, the RT probe at 1000 us) with `pyvmm boot` under a SCHED_FIFO 50
watchdog, alongside a normal-priority host cyclictest and, on a busy host, a stress-ng load, and
measures the vCPU threads' host runqueue latency with a small BPF program (pyvmm/bench/bpf/runqlat.bpf.c).
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import platform
import re
import shutil
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from pyvmm.bench import report, scale, switchcost
from pyvmm.bench.cpuacct import CpuMeter, children_cpu_s, steal_s, threads_cpu_s, tree_cpu_s
from pyvmm.bench.results import (
    LINUX,
    LOCK,
    MIXED,
    PRIMARY,
    TICKING,
    config_label,
    cyclictest_summary,
    guest_summary,
    guest_warnings,
    lock_summary,
    make_record,
    policy_stats,
    summarize,
    validate_record,
)
from pyvmm.common import artifacts, lab_env
from pyvmm.common.safe_fs import make_output_dir, write_file_nofollow
from pyvmm.guest.linux import build_image, kernel
from pyvmm.policy import programs
from pyvmm.policy.tunables import TunableError, parse

CONFIGS = ("vanilla", "static-rt", "static-nice", "pvsched")
GUEST_KINDS = ("testguest", "linux")
LINUX_GROUPS = ("idle", "busy")
BPF_STATS = Path("/proc/sys/kernel/bpf_stats_enabled")
THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")
THP_MODES = ("always", "madvise", "never")


class BenchError(RuntimeError):
    """Something the benchmark needs is missing or wrong; the message says what to do."""


@dataclass(frozen=True)
class Cell:
    """One run of the plan: a configuration on a host state with a guest workload, repetition `rep`."""

    config: str
    host: str
    workload: str
    rep: int
    variant: str = ""  # a named pvsched variant (--variant), "" for the configuration itself

    @property
    def label(self) -> str:
        """The configuration as tables show it: "pvsched bs5" for variant bs5."""
        return config_label(self.config, self.variant)


# group -> its cells' (guest workload, host state)
GROUPS = {"idle": ((PRIMARY, "idle"),), "busy": ((PRIMARY, "busy"),), "mixed": ((MIXED, "busy"),),
          "tick": ((TICKING, "busy"),), "lock": ((LOCK, "idle"), (LOCK, "busy"))}


def plan(configs: list[str], groups: list[str], reps: int, variants: tuple[str, ...] = (),
         guest: str = "testguest") -> list[Cell]:
    """Runs in order; repetitions outermost so slow drifts of the machine spread over every configuration.

    Groups: "idle" and "busy" run the probe on both vCPUs on an idle / busy host; "mixed" runs the probe on
    vCPU 0 and normal-priority busy work on vCPU 1 on a busy host; "tick" the probe next to a normal-priority
    task that wakes every interval (what boost-on-halt costs the host: that vCPU halts ~1000 times a second);
    "lock" both vCPUs contending one guest spinlock, its holder marked PREEMPT_DISABLED, on an idle and a busy
    host (what lock-holder preemption costs the guest).
    `variants` (names) run as extra pvsched cells right after the configurations, interleaved the same way."""
    return [Cell(c, host, LINUX if guest == "linux" else wl, rep, v)
            for rep in range(reps) for g in groups for wl, host in GROUPS[g]
            for c, v in [(c, "") for c in configs] + [("pvsched", v) for v in variants]]


def _bad_kv(items: list[str]) -> bool:
    """True when an item is not KEY=VALUE."""
    return any("=" not in kv or kv.startswith("=") for kv in items)


def _variant(text: str) -> tuple[str, list[str]]:
    """NAME:KEY=VALUE[,KEY=VALUE...] -> (NAME, ["KEY=VALUE", ...])."""
    name, _, kvs = text.partition(":")
    items = [kv.strip() for kv in kvs.split(",") if kv.strip()]
    if not name.strip() or not name.strip().replace("-", "").replace("_", "").isalnum() or not items \
            or _bad_kv(items):
        raise argparse.ArgumentTypeError(f"expected NAME:KEY=VALUE[,KEY=VALUE...] with a NAME of letters, digits, "
                                         f"- or _ (got {text!r})")
    return name.strip(), items


def _csv(choices: tuple[str, ...]):
    def parse(text: str) -> list[str]:
        items = [t.strip() for t in text.split(",") if t.strip()]
        bad = [t for t in items if t not in choices]
        if bad or not items:
            raise argparse.ArgumentTypeError(f"choose from {','.join(choices)} (got {text!r})")
        return items
    return parse


class _Parser(argparse.ArgumentParser):
    """argparse reporting a usage error as one line (exit 2), like the rest of pyvmm."""

    def error(self, message: str) -> None:  # type: ignore[override]
        print(f"{self.prog}: error: {message} (see --help)", file=sys.stderr)
        sys.exit(2)


def _vm_counts(text: str) -> list[int]:
    try:
        counts = [int(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated VM counts, got {text!r}") from None
    if not counts or any(not 1 <= n <= scale.MAX_VMS for n in counts):
        raise argparse.ArgumentTypeError(f"each VM count must be in 1..{scale.MAX_VMS}")
    return sorted(set(counts))


def split_program(kvs: list[str]) -> tuple[str, tuple[str, ...]]:
    """The BPF policy named by a `program=NAME` among KEY=VALUE settings (the last wins), and the tunables."""
    program, tunables = programs.DEFAULT, []
    for kv in kvs:
        key, _, value = kv.partition("=")
        if key.strip() == "program":
            program = value.strip()
        else:
            tunables.append(kv)
    return program, tuple(tunables)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command line of `pyvmm bench` (also `python -m pyvmm.bench.run`)."""
    p = _Parser(prog="pyvmm bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="1 repetition of 2 s per cell (within 2 minutes)")
    p.add_argument("--out", type=Path, default=Path("bench-out"), help="output folder (default: bench-out)")
    p.add_argument("--reps", type=int, help="repetitions per cell (default 5, 3 with --guest linux, --quick 1)")
    p.add_argument("--duration", type=float, help="guest probe seconds per run (default 5, --quick 2)")
    p.add_argument("--interval", type=int, default=1000, help="guest probe interval in us (default 1000)")
    p.add_argument("--configs", type=_csv(CONFIGS), default=list(CONFIGS), help="comma-separated subset")
    p.add_argument("--groups", type=_csv(tuple(GROUPS)), default=list(GROUPS),
                   help="comma-separated subset of idle,busy,mixed,tick,lock (mixed: guest probe,busy on a busy host; "
                        "tick: guest probe,tick, a normal-priority task woken every interval, on a busy host; "
                        "lock: guest lock,lock, both vCPUs contending one spinlock, on an idle and a busy host: "
                        "its guest latency is the acquisition wait)")
    p.add_argument("--lock-hold-us", type=int, metavar="US",
                   help="lock group: how long the guest holds the lock (default: the guest's, 5)")
    p.add_argument("--lock-gap-us", type=int, metavar="US",
                   help="lock group: the guest's work outside the lock between acquisitions (default: the guest's, 5)")
    p.add_argument("--lock-busy-us", type=int, metavar="US",
                   help="lock group: the guest contends only this long of every --interval and halts the rest "
                        "(a mostly idle guest taking a lock in bursts; default 0: all the time)")
    p.add_argument("--pvsched-set", action="append", default=[], metavar="KEY=VALUE",
                   help="policy tunable for the pvsched runs (repeatable), e.g. boost_on_halt=false; "
                        "program=NAME picks the BPF policy (pyvmm features lists them)")
    p.add_argument("--variant", action="append", default=[], type=_variant, metavar="NAME:KEY=VALUE[,...]",
                   help="an extra pvsched configuration with these tunables (on top of --pvsched-set), run "
                        "interleaved with the others and shown as 'pvsched NAME' (repeatable), e.g. "
                        "bs5:backstop_ms=5, or a swapped BPF policy: rt:program=rt_only; compare policy "
                        "variants within one run, as the machine drifts between runs")
    p.add_argument("--thp", choices=THP_MODES,
                   help="the host's transparent huge pages for the run, restored after (default: as they are). "
                        "On a kernel without full preemption, khugepaged's collapses of stress-ng's --vm memory "
                        "run for milliseconds without a scheduling point, ahead of RT tasks too: 'never' takes "
                        "that out of the guest max (docs/benchmarks.md)")
    p.add_argument("--guest", choices=GUEST_KINDS, default="testguest",
                   help="testguest (default: the bundled test guest's RT probe) or linux: "
                        "`cyclictest -p 8 --policy=rr` in the Debian cloud kernel's image with the pvsched "
                        "module, one thread per vCPU (idle and busy groups only; needs VMX/SVM: inside "
                        "`pyvmm lab` on hosts without them)")
    p.add_argument("--cyclictest-policy", choices=("rr", "other"), default="rr",
                   help="--guest linux: cyclictest's threads at RR 8 (default) or at SCHED_OTHER, where only the "
                        "guest's interrupt and softirq flags can boost their vCPUs (compare pvsched with "
                        "--variant rt:program=rt_only)")
    p.add_argument("--no-runqlat", action="store_true", help="do not measure the vCPU threads' runqueue latency")
    p.add_argument("--no-peer", action="store_true",
                   help="--guest linux: leave out the QEMU peer runs (they take most of a lab run's time)")
    p.add_argument("--report-only", action="store_true", help="redo results.md/.png from OUT/results.json")
    p.add_argument("--vms", type=_vm_counts, metavar="N,N,...",
                   help="instead of the groups, the cost curve against the number of VMs, e.g. 1,2,4,8,16: for each "
                        "N, N-1 idle test guests and one probe guest with the policy on a busy host; BPF ns per host "
                        "switch, CPU and memory per VM, the probe's p99 (OUT/scale.md, scale.png, scale.json; "
                        "about a minute per point on 2 CPUs)"),
    a = p.parse_args(argv)
    if a.guest == "linux":
        bad = [g for g in a.groups if g not in LINUX_GROUPS]
        if bad and a.groups != list(GROUPS):
            p.error(f"--guest linux runs the groups {','.join(LINUX_GROUPS)} only (got {','.join(bad)})")
        a.groups = [g for g in a.groups if g in LINUX_GROUPS]
    # 5: with 3, the busy group's p99 target against static RT (1.1x, on medians) flipped between runs on
    # the spread alone (docs/benchmarks.md, "Method notes"); a Linux guest's run is minutes in the lab
    a.reps = a.reps if a.reps is not None else (1 if a.quick else 3 if a.guest == "linux" else 5)
    a.duration = a.duration if a.duration is not None else (2.0 if a.quick else 5.0)
    if _bad_kv(a.pvsched_set):
        p.error("--pvsched-set takes KEY=VALUE")
    a.variants = dict(a.variant)
    if len(a.variants) != len(a.variant):
        p.error("--variant names must differ")

    for name, kvs in [("--pvsched-set", [])] + [(f"--variant {n}", v) for n, v in a.variants.items()]:
        program, tunables = split_program([*a.pvsched_set, *kvs])
        try:  # every pvsched run would fail on it: say so now, once
            parse(dict(kv.split("=", 1) for kv in tunables))
            programs.object_path(program)
        except (TunableError, programs.ProgramError) as e:
            p.error(f"{name}: {e}")
    if a.reps < 1 or not 0.5 <= a.duration <= 120 or not 100 <= a.interval <= 100000:
        p.error("--reps >= 1, --duration in 0.5..120 s, --interval in 100..100000 us")
    if any(v is not None and not 0 <= v <= 100000 for v in (a.lock_hold_us, a.lock_gap_us)):
        p.error("--lock-hold-us and --lock-gap-us in 0..100000 us")
    if a.lock_busy_us is not None and not 0 <= a.lock_busy_us < a.interval:
        p.error("--lock-busy-us must be below --interval (0: contend all the time)")
    return a


def lock_cmdline(args: argparse.Namespace) -> str:
    """The guest command-line keys of the lock group's settings ("" for the guest's defaults)."""
    keys = [(k, getattr(args, k, None)) for k in ("lock_hold_us", "lock_gap_us", "lock_busy_us")]
    return " ".join(f"{k}={v}" for k, v in keys if v is not None)


def machine() -> str:
    """A one-line description of the host the numbers come from."""
    model = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    backend = "KVM (PVM backend)" if Path("/sys/module/kvm_pvm").exists() else "KVM"
    return f"{model}, {os.cpu_count()} CPUs, Linux {platform.release()}, {backend}"


def linux_image():
    """The Linux guest image (Debian cloud kernel + initramfs with the pvsched module), built if stale."""

    try:
        return build_image.build_image("cloud")
    except (kernel.KernelFetchError, build_image.ImageBuildError) as e:
        raise BenchError(f"cannot build the Linux guest image: {e}") from None


def preflight(runqlat_wanted: bool) -> None:
    """Fail early, with one line, on what would make every run fail."""
    if os.geteuid() != 0:
        raise BenchError("pyvmm bench needs root (KVM, BPF, sched_setattr)")
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        raise BenchError("/dev/kvm is missing or not accessible")
    for tool in ("stress-ng", "cyclictest", "chrt", "timeout"):
        if shutil.which(tool) is None:
            raise BenchError(f"{tool} not found (scripts/setup.sh installs stress-ng and rt-tests)")
    if importlib.util.find_spec("pyvmm.cli") is None:
        raise BenchError("pyvmm.cli is missing: pyvmm boot is needed to run the benchmark")

    try:
        artifacts.ensure_built("testguest")
        artifacts.ensure_built("bpf")
    except (artifacts.BuildError, KeyError) as e:
        raise BenchError(str(e)) from e
    if runqlat_wanted:
        from pyvmm.bench import runqlat

        runqlat.build()


def _progress(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def run_cell(cell: Cell, args: argparse.Namespace, probe) -> tuple[dict | None, str | None]:
    """One run: host load and host cyclictest around one VM; returns (record, None) or (None, why it failed)."""
    from pyvmm.bench.hostload import HostCyclictest, StressLoad
    from pyvmm.bench.vmrun import RunSpec, run_vm

    program, policy_set = split_program([*args.pvsched_set, *args.variants.get(cell.variant, ())])
    image = getattr(args, "image", None)
    spec = RunSpec(cell.config, cell.workload, args.duration, args.interval, policy_set=policy_set, program=program,
                   guest_keys=lock_cmdline(args) if cell.workload == LOCK else "",
                   kernel=str(image.kernel) if image else None, initrd=str(image.initrd) if image else None,
                   cyclictest_policy=args.cyclictest_policy)
    limit = spec.limit_s + 50
    loads: dict = {}
    ct_summary = stress_rates = cpu = rq = None

    def guest_starts(tids: list[int], vmm_pid: int) -> None:
        # The vCPU threads exist (a Linux guest: at /init): the host load starts, so that the guest boots on
        # the host the run is about, whatever the configuration.
        if cell.host == "busy":
            # until stopped at the VM's end (a -t of the guest's duration could end before the guest does)
            loads["stress"] = StressLoad(limit)

    def measuring_starts(tids: list[int], vmm_pid: int) -> None:
        # The guest's measured work starts (run_vm's on_start): the vCPUs' wake-ups, the host's own latency
        # and every CPU time are measured from here to its end, the same for every configuration.  The
        # VMM's and the policy process's start-up, and a pvsched guest's unboosted boot, stay outside: they
        # differ a lot under load, and they are not what a boost changes.
        if probe:
            probe.track(tids)
        loads["ct"] = HostCyclictest(limit, args.interval)
        loads["cpu"] = cpu_meter(tids, vmm_pid, loads.get("stress"))

    def guest_ended() -> None:
        # Same window for every configuration: what the VMM's teardown costs is not part of the run.
        nonlocal ct_summary, stress_rates, cpu, rq
        try:
            if probe and "cpu" in loads:   # the window's wake-ups, before the teardown's
                rq = probe.read()
            if "cpu" in loads:
                cpu = loads.pop("cpu").stop()
            if "ct" in loads:
                ct_summary = loads.pop("ct").stop()
        finally:
            if "stress" in loads:
                stress_rates = loads.pop("stress").stop()

    try:
        if probe:
            probe.reset()
        out = run_vm(spec, on_tids=guest_starts, on_end=guest_ended, on_start=measuring_starts)
    finally:
        guest_ended()  # a no-op when run_vm called it; else (an error) the loads must not outlive the run
    if out.error:  # what the guest got to, to tell a lost vCPU from a failed boot afterwards
        done = sorted({r.get("vcpu") for r in out.records if r.get("type") in ("latency", "workload")}, key=str)
        return None, f"{out.error} (vCPUs with a result record: {done}; console: {' | '.join(out.console_tail[-3:])})"
    lock = cell.workload == LOCK
    guest = cyclictest_summary(out.records) if image else guest_summary(out.records, "lock" if lock else "probe")
    if guest is None:
        tail = " | ".join(out.console_tail[-3:])
        what = "complete cyclictest record" if image else f"{'lock' if lock else 'probe'} latency record"
        return None, f"the guest printed no {what} (console: {tail})"
    pv = next((r for r in out.records if r.get("type") == "pvsched"), None)
    per_vcpu = [{k: r.get(k) for k in ("vcpu", "workload", "samples", "min", "avg", "p50", "p99", "max", "max_at")}
                for r in out.records if r.get("type") == "latency"]
    loops = [r["loops"] for r in out.records if r.get("type") == "workload" and isinstance(r.get("loops"), int)]
    extra = {"policy_set": list(policy_set) if cell.config == "pvsched" else [], "guest_busy_loops": sum(loops) if loops else None, "duration_s": args.duration, "interval_us": args.interval, "vm_wall_s": out.wall_s,
             "tids_after_s": out.tids_after_s, "uptime_at_tids_s": out.uptime_at_tids_s, "vcpu_sched": {str(k): v for k, v in out.vcpu_sched.items()},
             "pvsched_status": pv.get("status") if pv else None, "cpu": cpu,
             "guest_per_vcpu": per_vcpu, "guest_kind": "linux" if image else "testguest",
             "init_after_s": out.init_after_s}
    if cell.variant:
        extra["variant"] = cell.variant
    if warnings := guest_warnings(out.records):
        extra["guest_warnings"] = warnings
    if lock and (counts := lock_summary(out.records)):
        # the guest's acquisitions per second (both vCPUs), apart from its waits in "guest"
        extra["lock_acq_per_s"] = counts["acq_per_s"]
        extra["lock"] = counts
    if cell.host == "busy" and not stress_rates:
        extra["note"] = "stress-ng printed no metrics"
    rec = make_record(cell.config, cell.host, cell.workload, cell.rep, guest, host_cyclictest=ct_summary,
                      stress=stress_rates, vcpu_runqlat=rq, policy=policy_stats(out.policy_reply, out.status_reply, out.records)
                      if cell.config == "pvsched" else None, extra=extra)
    return rec, None


def run_peers(args: argparse.Namespace) -> list[dict]:
    """QEMU/KVM booting the same image with the same cyclictest, once per host state (pyvmm/bench/qemu_peer.py)."""
    from pyvmm.bench.hostload import StressLoad
    from pyvmm.bench.qemu_peer import run_peer

    peers = []
    for host in args.groups:
        loads: list = []

        def start_load(host: str = host, loads: list = loads) -> None:
            # at /init, as pyvmm's runs (vmrun.LINUX_SETTLE_S): both boots run on an idle host
            if host == "busy":
                loads.append(StressLoad(600))

        def stop_load(loads: list = loads) -> None:
            try:  # called by the console reader at the window's end, and again here after the run
                load = loads.pop()
            except IndexError:
                return
            load.stop()
        try:
            r = run_peer(host, str(args.image.kernel), str(args.image.initrd), args.duration, args.interval,
                         policy=args.cyclictest_policy, on_boot=start_load, on_end=stop_load)
        finally:
            stop_load()
        g = r.guest or {}
        _progress(f"[peer] qemu -accel kvm {host:<4}: " + (f"FAILED: {r.error}" if r.error else
                  f"/init after {r.init_after_s} s, guest p99 {g.get('p99', 0):.0f} us max {g.get('max', 0):.0f} us"))
        peers.append({"peer": "qemu-kvm", "host": host, "init_after_s": r.init_after_s, "guest": r.guest,
                      "wall_s": r.wall_s, "error": r.error})
    return peers


def peer_table(peers: list[dict], records: list[dict]) -> str:
    """Markdown: QEMU/KVM against pyvmm's vanilla runs of the same image (medians over repetitions)."""
    lines = ["| VMM | host | time to /init (s) | guest p50 (us) | p99 (us) | max (us) |",
             "| --- | --- | --- | --- | --- | --- |"]

    def med(xs: list[float]) -> float | None:
        xs = sorted(x for x in xs if x is not None)
        return xs[len(xs) // 2] if xs else None

    def fmt(v: float | None, digits: int = 0) -> str:
        return "-" if v is None else f"{v:.{digits}f}"

    for p in peers:
        van = [r for r in records if r["config"] == "vanilla" and r["host"] == p["host"]]
        rows = [("pyvmm (vanilla)", med([r.get("init_after_s") for r in van]),
                 *(med([r["guest"][k] for r in van]) for k in ("p50", "p99", "max")))]
        g = p.get("guest") or {}
        rows.append(("qemu -accel kvm", p.get("init_after_s"), g.get("p50"), g.get("p99"), g.get("max")))
        for name, init, p50, p99, mx in rows:
            lines.append(f"| {name} | {p['host']} | {fmt(init, 1)} | {fmt(p50)} | {fmt(p99)} | {fmt(mx)} |")
    return "\n".join(lines)


def cpu_meter(tids: list[int], vmm: int, stress) -> CpuMeter:
    """CPU time of the vCPU threads, the whole VMM (vCPUs, main loop, policy process), its policy process, the
    host load and the hypervisor's steal, sampled from the guest's start (see pyvmm/bench/cpuacct.py)."""
    counters = {"vcpus": lambda: threads_cpu_s(tids), "steal": steal_s, "vmm": lambda: tree_cpu_s(vmm),
                "policy": lambda: children_cpu_s(vmm)}
    if stress is not None:
        counters["host_load"] = lambda: tree_cpu_s(stress.pid)
    return CpuMeter(counters)


def write_outputs(out_dir: Path, records: list[dict], meta: dict) -> list[dict]:
    """results.json (the records), summary.json (rows, targets, meta), results.md and results.png."""
    from pyvmm.bench.results import targets

    out_dir = make_output_dir(out_dir)  # refuses a symlink; each file below is written with O_NOFOLLOW
    write_file_nofollow(out_dir / "results.json", json.dumps(records, indent=1) + "\n")
    rows = summarize(records)
    write_file_nofollow(out_dir / "summary.json", json.dumps({"meta": meta, "rows": rows, "targets": targets(rows)},
                                                             indent=1) + "\n")
    write_file_nofollow(out_dir / "results.md", report.markdown(rows, meta))
    if rows:
        report.plot(rows, out_dir / "results.png")
    return rows


def _bpf_stats_on() -> str | None:
    """Enable kernel.bpf_stats_enabled (policy.show's BPF ns/event needs it); return the old value."""
    try:
        old = BPF_STATS.read_text().strip()
        BPF_STATS.write_text("1")
        return old
    except OSError:
        return None


def thp_mode() -> str | None:
    """The host's transparent-huge-page mode (always, madvise, never), None without THP."""
    try:
        m = re.search(r"\[(\w+)\]", THP.read_text())
    except OSError:
        return None
    return m.group(1) if m else None


def _set_thp(mode: str) -> None:
    try:
        THP.write_text(mode)
    except OSError as e:
        raise BenchError(f"cannot set {THP} to {mode}: {e.strerror}") from None


def bench(args: argparse.Namespace) -> int:
    """Run the plan, write the outputs, print the table and the targets; 0 when every run worked."""
    preflight(not args.no_runqlat)
    args.image = linux_image() if args.guest == "linux" else None
    cells = plan(args.configs, args.groups, args.reps, tuple(args.variants), args.guest)
    old_thp = thp_mode()
    if args.thp and old_thp is None:
        raise BenchError(f"--thp {args.thp}: this kernel has no transparent huge pages ({THP} is missing)")
    meta = {"date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "machine": machine(), "reps": args.reps, "duration_s": args.duration, "interval_us": args.interval,
            "cpus": 2, "quick": args.quick, "pvsched_set": args.pvsched_set, "variants": args.variants,
            "thp": args.thp or old_thp, "guest_kind": args.guest, "in_lab": lab_env.in_lab(),
            "cyclictest_policy": args.cyclictest_policy if args.guest == "linux" else None,
            "failures": []}
    if args.image:
        meta["linux_kernel"] = args.image.release
    records: list[dict] = []
    probe = None
    old_stats = _bpf_stats_on()
    try:
        if args.thp and args.thp != old_thp:
            _set_thp(args.thp)
            _progress(f"bench: transparent huge pages {args.thp} for this run (were {old_thp})")
        if not args.no_runqlat:
            from pyvmm.bench.runqlat import Runqlat, RunqlatError

            try:
                probe = Runqlat()
            except RunqlatError as e:
                _progress(f"bench: vCPU runqueue latency not measured: {e}")
        t0 = time.monotonic()
        try:  # before the first run, not after an hour of them
            make_output_dir(args.out)
        except OSError as e:
            raise BenchError(f"--out {args.out}: {e.strerror or e}") from None
        if any(c.config == "pvsched" for c in cells):
            _progress("bench: what the policy's BPF costs a host context switch without a VM thread (ping-pong)")
            try:
                meta["switch_cost"] = switchcost.measure()
            except switchcost.SwitchCostError as e:
                _progress(f"bench: switch cost not measured: {e}")
        _progress(f"bench: {len(cells)} runs of {args.duration:g} s -> {args.out}/")
        for i, cell in enumerate(cells, 1):
            t = time.monotonic()
            rec, why = run_cell(cell, args, probe)
            took = time.monotonic() - t
            eta = (time.monotonic() - t0) / i * (len(cells) - i)
            what = f"[{i:>2}/{len(cells)}] {cell.label:<11} {cell.host:<4} {cell.workload:<11} rep {cell.rep}"
            if rec:
                records.append(rec)
                g = rec["guest"]
                rq = (rec.get("vcpu_runqlat") or {}).get("wakeup") or {}
                rate = f", {rec['lock_acq_per_s']} acq/s" if rec.get("lock_acq_per_s") is not None else ""
                _progress(f"{what}: guest p99 {g['p99']:.0f} us max {g['max']:.0f} us{rate}, vCPU wake-to-run p99 "
                          f"{rq.get('p99', '-')} us ({took:.1f} s, ~{eta:.0f} s left)")
            else:
                meta["failures"].append(f"{cell.label} {cell.host} {cell.workload} rep {cell.rep}: {why}")
                _progress(f"{what}: FAILED: {why}")
        if args.image and not args.no_peer:
            meta["peer"] = run_peers(args)
    finally:
        if probe:
            probe.close()
        if args.thp and old_thp and thp_mode() != old_thp:
            _set_thp(old_thp)
        if old_stats is not None:
            try:
                BPF_STATS.write_text(old_stats)
            except OSError:
                pass
    switchcost.annotate(records, meta.get("switch_cost"))
    bad = [e for r in records for e in validate_record(r)]
    if bad:
        meta["failures"].append("schema: " + "; ".join(bad[:5]))
    rows = write_outputs(args.out, records, meta)
    if meta.get("peer"):
        write_file_nofollow(args.out / "results.md", "\n## A peer: QEMU with -accel kvm, the same image\n\n"
                            + peer_table(meta["peer"], records) + "\n", append=True)
    write_file_nofollow(args.out / "meta.json", json.dumps(meta, indent=1) + "\n")
    print(report.table(rows))
    print()
    for extra in (report.cpu_table(rows), report.lock_table(rows)):
        if extra:
            print(extra)
            print()
    print("\n".join(report.target_lines(rows)))
    if cost := report.switch_cost_lines(rows, meta):
        print("\n" + "\n".join(cost))
    if meta.get("peer"):
        print("\n" + peer_table(meta["peer"], records))
    print(f"\nwrote {args.out}/results.json, results.md, results.png")
    if meta["failures"]:
        _progress(f"bench: {len(meta['failures'])} run(s) failed, see {args.out}/results.md")
        return 1
    return 0


def bench_scale(args: argparse.Namespace) -> int:
    """The cost curve against the number of VMs (pyvmm.bench.scale): outputs, table, targets; 0 when it ran."""
    preflight(False)
    try:
        out = make_output_dir(args.out)
    except OSError as e:
        raise BenchError(f"--out {args.out}: {e.strerror or e}") from None
    logs = make_output_dir(out / "scale-logs")
    meta = {"date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"), "machine": machine(),
            "duration_s": args.duration, "vcpus_per_vm": scale.VCPUS}
    _progress(f"bench: the cost curve for {','.join(map(str, args.vms))} VMs -> {out}/")
    try:
        # the floor: what BPF on these two tracepoints costs here before any check (bpf_stats adds its clock reads)
        meta["floor_ns_per_host_switch"] = switchcost.floor_switch_ns()
    except switchcost.SwitchCostError as e:
        _progress(f"bench: no floor for the switch cost: {e}")
        meta["floor_ns_per_host_switch"] = None
    try:
        points = scale.curve(args.vms, args.duration, logs, _progress)
    except scale.ScaleError as e:
        raise BenchError(str(e)) from None
    lines = scale.targets(points, meta["floor_ns_per_host_switch"])
    write_file_nofollow(out / "scale.json", json.dumps({"meta": meta, "points": points, "targets": lines},
                                                       indent=1) + "\n")
    write_file_nofollow(out / "scale.md", f"# Cost against the number of VMs ({meta['date']}, {meta['machine']})\n\n"
                        + scale.table(points) + "\n\n" + "\n".join(f"- {t}" for t in lines) + "\n")
    scale.plot(points, out / "scale.png")
    print(scale.table(points))
    print("\n" + "\n".join(lines))
    print(f"\nwrote {out}/scale.json, scale.md, scale.png")
    return 0


def report_only(args: argparse.Namespace) -> int:
    """Regenerate results.md and results.png from an earlier run's results.json."""
    src = args.out / "results.json"
    try:
        records = json.loads(src.read_text())
    except (OSError, ValueError) as e:
        raise BenchError(f"cannot read {src}: {e}") from e
    meta_path = args.out / "meta.json"
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    rows = write_outputs(args.out, records, meta)
    print(report.table(rows))
    if lock := report.lock_table(rows):
        print("\n" + lock + "\n")
    print("\n".join(report.target_lines(rows)))
    return 0


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    """Entry point of `pyvmm bench`: returns the exit code; errors become one line on stderr."""
    args = parse_args(argv)
    main_thread = threading.current_thread() is threading.main_thread()  # only there can handlers be set
    old = signal.signal(signal.SIGTERM, _interrupt) if main_thread else None  # clean up as on Ctrl-C
    try:
        if args.report_only:
            return report_only(args)
        return bench_scale(args) if args.vms else bench(args)
    except BenchError as e:
        print(f"pyvmm bench: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("pyvmm bench: interrupted", file=sys.stderr)
        return 130
    finally:
        if main_thread and old is not None:  # None: a handler not set from Python, which cannot be put back
            signal.signal(signal.SIGTERM, old)


if __name__ == "__main__":
    sys.exit(main())
