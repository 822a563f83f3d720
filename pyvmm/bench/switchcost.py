"""What the policy's BPF programs cost a host context switch that involves no VM.

`sched_switch` and `sched_wakeup` fire for every task on the host, so the policy's programs run for
switches between tasks that have nothing to do with any VM.  This measures that path on its own: the
policy's programs are loaded and attached privately, with VMs registered for tgids no process has (the
top of the PID range), so every run takes the fast path, and two host processes ping-pong a byte through pipes on one CPU
(each round trip is two context switches and two wake-ups).  It reports the BPF run time per program
run (`bpf_stats`) and the round trip's wall time with the programs attached and without, alternated; and
the same for programs on the same tracepoints that do nothing (pyvmm/bench/bpf/floor.bpf.c), the floor
that no check can go below.

The cost of a switch that does involve the VMM comes from a real pvsched run: `vmm_switch_ns()` takes
`pvs_switch`'s run time there, less its fast-path runs at the cost measured here, over the runs that
went past the tgid lookup (stat `switch_vmm`).
"""

from __future__ import annotations

import contextlib
import os
import statistics
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

from pyvmm.common import libbpf
from pyvmm.common.artifacts import BuildError, ensure_built
from pyvmm.common.libbpf import LibbpfError
from pyvmm.policy import loader, programs
from pyvmm.policy.tunables import parse

__all__ = ["SwitchCostError", "annotate", "floor_switch_ns", "host_switch_ns", "measure", "vmm_switch_ns"]

# The VMs registered for the measurement are for tgids no task has now: the highest below pid_max.
PID_MAX = Path("/proc/sys/kernel/pid_max")
# The programs that run for every host task (the rest filter on the VMM's process context or never fire).
HOST_WIDE = ("pvs_switch", "pvs_wakeup")
# floor.bpf.c's programs, by the name of the policy's program they stand beside
FLOOR = {"floor_switch": "pvs_switch", "floor_wakeup": "pvs_wakeup"}

# Two processes on one CPU pass one byte back and forth N times; prints the elapsed ns.  A fork of a
# single-threaded interpreter that inherits the CPU affinity: every round trip is two switches.
_PINGPONG = r"""
import os, sys, time
n, cpu = int(sys.argv[1]), int(sys.argv[2])
os.sched_setaffinity(0, {cpu})
a_r, a_w = os.pipe()
b_r, b_w = os.pipe()
pid = os.fork()
if pid == 0:
    for _ in range(n):
        os.read(a_r, 1)
        os.write(b_w, b"x")
    os._exit(0)
t = time.perf_counter_ns()
for _ in range(n):
    os.write(a_w, b"x")
    os.read(b_r, 1)
elapsed = time.perf_counter_ns() - t
os.waitpid(pid, 0)
print(elapsed)
"""


class SwitchCostError(Exception):
    """The measurement could not be made (no policy object, BPF refused, the ping-pong failed)."""


def _round_trip_ns(round_trips: int, cpu: int) -> float:
    """Wall ns of one ping-pong round trip (two context switches) on `cpu`."""
    try:
        r = subprocess.run([sys.executable, "-I", "-c", _PINGPONG, str(round_trips), str(cpu)], cwd="/",
                           capture_output=True, text=True, timeout=120, check=False)
    except subprocess.TimeoutExpired:
        raise SwitchCostError("the host ping-pong did not finish in 120 s") from None
    if r.returncode != 0 or not r.stdout.strip().isdigit():
        raise SwitchCostError(f"the host ping-pong failed: {r.stderr.strip()[-200:]}")
    return int(r.stdout) / round_trips


def _unused_tgids(n: int) -> list[int]:
    """`n` tgids that no process has now, from the top of the PID range down (new PIDs start low)."""
    out, pid = [], int(PID_MAX.read_text()) - 1
    while len(out) < n and pid > 1:
        if not os.path.exists(f"/proc/{pid}"):
            out.append(pid)
        pid -= 1
    return out


def _runs(policy: loader.BpfPolicy) -> dict[str, tuple[int, int]]:
    """(run_cnt, run_time_ns) of each host-wide program."""
    return {s["name"]: (s.get("run_cnt", 0), s.get("run_time_ns", 0))
            for s in policy.program_stats() if s["name"] in HOST_WIDE}


def _add(totals: dict[str, list[int]], before: dict[str, tuple[int, int]], after: dict[str, tuple[int, int]]) -> None:
    """Add each program's runs and run time between `before` and `after` to `totals`."""
    for name, total in totals.items():
        b, a = before.get(name, (0, 0)), after.get(name, (0, 0))
        total[0] += a[0] - b[0]
        total[1] += a[1] - b[1]


def _with_policy(obj: Path, round_trips: int, cpu: int, totals: dict[str, list[int]], vms: int = 1) -> tuple[float, int]:
    """One ping-pong with the policy's one set of programs attached and `vms` VMs registered in it, each for
    a VMM no task belongs to: (round trip ns, runs past the tgid check); the runs are added to `totals`."""
    tgids = _unused_tgids(vms)
    policy = loader.BpfPolicy(obj, tgids[0], pin_dir=None)
    try:
        policy.open_load_attach(parse(None))
        for tgid in tgids[1:]:
            policy.alias_vm(tgid)
        before = _runs(policy)
        ns = _round_trip_ns(round_trips, cpu)
        _add(totals, before, _runs(policy))
        return ns, policy.stats().get("switch_vmm", 0)
    except LibbpfError as e:
        raise SwitchCostError(f"cannot load the policy to measure it: {e}") from None
    finally:
        policy.close()


def _with_floor(obj: Path, round_trips: int, cpu: int, totals: dict[str, list[int]]) -> float:
    """One ping-pong with the floor programs attached (pyvmm/bench/bpf/floor.bpf.c): round trip ns."""
    try:
        o, progs = libbpf.open_load_attach(obj)
    except LibbpfError as e:
        raise SwitchCostError(f"cannot load {obj.name}: {e}") from None

    def stats() -> dict[str, tuple[int, int]]:
        return {FLOOR[n]: libbpf.prog_run_stats(fd) for n, (fd, _) in progs.items() if n in FLOOR}

    try:
        before = stats()
        ns = _round_trip_ns(round_trips, cpu)
        _add(totals, before, stats())
        return ns
    finally:
        libbpf.close_object(o, progs)


@contextlib.contextmanager
def _bpf_stats() -> Iterator[None]:
    """BPF run-time stats on while inside (CAP_SYS_ADMIN); SwitchCostError if they cannot be."""
    try:
        stats_fd = loader.enable_stats()
    except LibbpfError as e:
        raise SwitchCostError(f"cannot turn on BPF run-time stats: {e}") from None
    try:
        yield
    finally:
        os.close(stats_fd)


def _per_run(totals: dict[str, list[int]]) -> dict[str, dict]:
    return {name: {"runs": n, "ns_per_run": round(t / n, 1) if n else None} for name, (n, t) in totals.items()}


def measure(round_trips: int = 20_000, rounds: int = 3, cpu: int | None = None) -> dict:
    """Fast-path cost of the host-wide programs, and of programs that do nothing on the same tracepoints.

    Needs root (CAP_BPF, CAP_PERFMON, CAP_SYS_ADMIN for the stats fd).  Returns {"programs": {name: {"runs",
    "ns_per_run"}}, "floor": the same for the empty programs (keyed by the policy's names),
    "ns_per_host_switch": the policy's BPF ns per switch (one switch and one wake-up), "round_trip_ns": {"off",
    "on", "floor"} medians, "added_ns_per_switch": (on - off) / 2, with bpf_stats on, which adds its own clock
    reads, "vmm_runs": runs past the tgid check (0)}."""
    cpu = (os.cpu_count() or 1) - 1 if cpu is None else cpu
    try:
        obj, floor_obj = programs.object_path(programs.DEFAULT), ensure_built("floor")
    except BuildError as e:
        raise SwitchCostError(str(e)) from None
    trips: dict[str, list[float]] = {"off": [], "on": [], "floor": []}
    totals = {name: [0, 0] for name in HOST_WIDE}
    floor = {name: [0, 0] for name in HOST_WIDE}
    vmm_runs = 0  # runs past the tgid check: none, since no task has the VMs' tgids
    with _bpf_stats():
        for _ in range(rounds):  # alternated, so a drift of the machine weighs on all three alike
            trips["off"].append(_round_trip_ns(round_trips, cpu))
            ns, vmm = _with_policy(obj, round_trips, cpu, totals)
            trips["on"].append(ns)
            vmm_runs += vmm
            trips["floor"].append(_with_floor(floor_obj, round_trips, cpu, floor))
    progs = _per_run(totals)
    med = {k: statistics.median(v) for k, v in trips.items()}
    return {"programs": progs, "floor": _per_run(floor),
            "ns_per_host_switch": round(sum(p["ns_per_run"] or 0 for p in progs.values()), 1),
            "round_trips": round_trips * rounds, "vmm_runs": vmm_runs,
            "round_trip_ns": {k: round(v) for k, v in med.items()},
            "added_ns_per_switch": round((med["on"] - med["off"]) / 2, 1)}


def host_switch_ns(vms: int, round_trips: int = 10_000, rounds: int = 3, cpu: int | None = None) -> dict:
    """BPF ns per host switch between non-vCPU tasks with `vms` VMs registered in the host's one set of programs.

    {"vms", "ns_per_host_switch": pvs_switch's and pvs_wakeup's ns per run, added up (one switch and one
    wake-up), "switch_fast_ns": pvs_switch's alone}.  Root, as measure()."""
    cpu = (os.cpu_count() or 1) - 1 if cpu is None else cpu
    try:
        obj = programs.object_path(programs.DEFAULT)
    except BuildError as e:
        raise SwitchCostError(str(e)) from None
    totals = {name: [0, 0] for name in HOST_WIDE}
    with _bpf_stats():
        for _ in range(rounds):
            _with_policy(obj, round_trips, cpu, totals, vms)
    # one set of programs, whatever the number of VMs: each ran once per switch and once per wake-up
    per_run = {name: t / n if n else 0.0 for name, (n, t) in totals.items()}
    total = sum(per_run.values())
    return {"vms": vms, "ns_per_host_switch": round(total, 1), "switch_fast_ns": round(per_run["pvs_switch"], 1)}


def floor_switch_ns(round_trips: int = 10_000, rounds: int = 3, cpu: int | None = None) -> float:
    """BPF ns per host switch of programs that do nothing on the same two tracepoints (floor.bpf.c), with
    `bpf_stats` on: what no fast path can go below on this machine.  Root, as measure()."""
    cpu = (os.cpu_count() or 1) - 1 if cpu is None else cpu
    try:
        floor_obj = ensure_built("floor")
    except BuildError as e:
        raise SwitchCostError(str(e)) from None
    floor = {name: [0, 0] for name in HOST_WIDE}
    with _bpf_stats():
        for _ in range(rounds):
            _with_floor(floor_obj, round_trips, cpu, floor)
    return round(sum(t / n if n else 0.0 for n, t in floor.values()), 1)


def vmm_switch_ns(program: dict | None, vmm_runs: int | None, fast_ns: float | None) -> float | None:
    """BPF ns per `pvs_switch` run that involved the VMM, from a pvsched run's counters; None if unknown.

    program: policy.programs["pvs_switch"] ({"runs", "ns_per_run"}); vmm_runs: its runs past the tgid check
    (stat switch_vmm); fast_ns: the fast path's ns per run (measure())."""
    if not program or fast_ns is None:
        return None
    runs, ns = program.get("runs") or 0, program.get("ns_per_run")
    vmm = vmm_runs or 0
    if not runs or ns is None or not 0 < vmm <= runs:
        return None
    return round(max(0.0, (runs * ns - (runs - vmm) * fast_ns) / vmm), 1)


def annotate(records: list[dict], cost: dict | None) -> None:
    """Give each pvsched record's "policy" a "switch_vmm_ns" (vmm_switch_ns with the fast path of `cost`)."""
    fast = (((cost or {}).get("programs") or {}).get("pvs_switch") or {}).get("ns_per_run")
    for rec in records:
        pol = rec.get("policy")
        if isinstance(pol, dict):
            ns = vmm_switch_ns((pol.get("programs") or {}).get("pvs_switch"), pol.get("switch_vmm"), fast)
            if ns is not None:
                pol["switch_vmm_ns"] = ns
