"""Benchmark of the BPF policy (not a test): BPF ns per event and event-to-sched_setattr latency.

    python -m policy_bench [--seconds 3] [--load] [--json]

Runs the stand-in VMM (tests/standin/fakevmm.c) with one vCPU per workload (default:
probe, idle, alt: `alt` changes its request at every switch-out, so it
produces one decision per millisecond), the engine in this process with BPF
stats on (needs root), optionally with the host busy (stress-ng, bounded),
and prints per program the runs and average ns per run, plus the actuator's
event-to-applied latency p50/p99/max.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys

import trio
from fakevmm import FakeVmm, fakevmm_binary

from pyvmm.common.artifacts import ensure_built
from pyvmm.common.sched_attr import sched_getattr
from pyvmm.policy.engine import PolicyEngine, enable_bpf_stats


def _prog_counts(engine: PolicyEngine) -> dict[str, tuple[int, int]]:
    return {p["name"]: (p.get("run_cnt", 0), p.get("run_time_ns", 0)) for p in engine.show()["programs"]
            if isinstance(p.get("run_cnt"), int)}


def run(seconds: float, workloads: list[str], load: bool, pin_root: str) -> dict:
    """Run the benchmark; returns the numbers it prints."""
    ensure_built("bpf", quiet=True)  # a clear error naming scripts/setup.sh
    vmm = FakeVmm(fakevmm_binary(), len(workloads), int(seconds) + 20)
    stress = None
    engine = None
    try:
        stats_fd = enable_bpf_stats()
        engine = PolicyEngine(vmm.pid, {}, pin_root, stats_fd=stats_fd)
        for i, tid in enumerate(vmm.tids):
            off = vmm.info["slot_offset"] + 128 * i
            engine.add_vcpu(1, i, tid, vmm.info["hva"] + off, memoryview(vmm.map)[off:off + 128], sched_getattr(tid))
        if load:
            stress = subprocess.Popen(["timeout", "-s", "KILL", str(int(seconds) + 5), "stress-ng", "--cpu", "2",
                                       "--timeout", f"{int(seconds) + 1}s", "-q"],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for i, w in enumerate(workloads):
            vmm.cmd(f"mode {i} {w}")
        for i in range(len(workloads)):
            vmm.cmd(f"lat {i}")  # reset
        before = _prog_counts(engine)

        async def main() -> None:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(engine.run)
                await trio.sleep(seconds)
                nursery.cancel_scope.cancel()

        trio.run(main)
        after = _prog_counts(engine)
        show = engine.show()
        progs = {}
        for name, (cnt, ns) in after.items():
            c0, n0 = before.get(name, (0, 0))
            runs = cnt - c0
            progs[name] = {"runs": runs, "avg_ns": round((ns - n0) / runs, 1) if runs else None}
        guest = {w: vmm.cmd(f"lat {i}") for i, w in enumerate(workloads) if w == "probe"}
        return {"seconds": seconds, "host_load": load, "workloads": workloads, "programs": progs,
                "actuator_latency_us": show["actuator"]["latency_us"], "applied": show["actuator"]["applied"],
                "posted": show["stats"]["posted"]["value"], "probe_wake_latency_us": guest}
    finally:
        if engine is not None:
            engine.close()
        try:
            os.rmdir(pin_root)  # only when empty: this run's own root
        except OSError:
            pass
        if stress is not None:
            stress.kill()
            stress.wait()
        vmm.stop()


def main(argv: list[str] | None = None) -> int:
    """CLI entry: print the table (or JSON); one line and exit 1 on failure."""
    p = argparse.ArgumentParser(prog="python -m policy_bench", description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=3.0)
    p.add_argument("--load", action="store_true", help="host busy with stress-ng --cpu 2 while measuring")
    p.add_argument("--workloads", default="probe,idle,alt", help="stand-in vCPU workloads, comma separated")
    p.add_argument("--pin-root", default="/sys/fs/bpf/pvsched-bench")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if not 0.5 <= args.seconds <= 60:
        print("policy_bench: --seconds must be within 0.5..60", file=sys.stderr)
        return 2
    try:
        r = run(args.seconds, args.workloads.split(","), args.load, args.pin_root)
    except (OSError, ValueError, RuntimeError) as e:
        print(f"policy_bench: {e}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(r, indent=1))
        return 0
    print(f"pvsched BPF policy, {r['seconds']} s, workloads {','.join(r['workloads'])}, "
          f"host {'busy' if r['host_load'] else 'idle'}")
    print(f"{'program':<18}{'runs':>10}{'avg ns/run':>12}")
    for name, v in r["programs"].items():
        print(f"{name:<18}{v['runs']:>10}{v['avg_ns'] if v['avg_ns'] is not None else '-':>12}")
    lat = r["actuator_latency_us"]
    print(f"decisions posted {r['posted']}, applied {r['applied']}; event -> sched_setattr latency (us): "
          f"p50 {lat.get('p50', '-')}, p99 {lat.get('p99', '-')}, max {lat.get('max', '-')} "
          f"({lat.get('samples', 0)} samples)")
    for w, g in r["probe_wake_latency_us"].items():
        print(f"{w} vCPU wake lateness (us): p50 {g['p50']}, p99 {g['p99']}, max {g['max']} ({g['samples']} ticks)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
