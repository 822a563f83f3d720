"""Benchmark records (the keys the README's "Benchmark" section lists), their summary over repetitions, the targets.

Pure functions only: no processes, no files; tests drive them with made-up records.
"""

from __future__ import annotations

import random
import statistics
from collections.abc import Iterable

GUEST_KEYS = ("min", "avg", "p50", "p99", "max")
HOSTS = ("idle", "busy")
PRIMARY = "probe,probe"
MIXED = "probe,busy"
TICKING = "probe,tick"  # the probe next to a normal-priority task that wakes every interval
LOCK = "lock,lock"      # both vCPUs contend one guest spinlock; "guest" is then the acquisition wait
LINUX = "cyclictest"    # the Linux guest's one workload (bench --guest linux): cyclictest, one RR 8 thread per vCPU


def _hist_points(rec: dict) -> list[tuple[float, int]] | None:
    """(upper edge in us, count) per bucket of a guest histogram, overflow at the record's max; None if absent."""
    h = rec.get("hist")
    if not isinstance(h, dict) or not isinstance(h.get("counts"), list) or not h.get("bucket_us"):
        return None
    b, mx = float(h["bucket_us"]), float(rec["max"])
    pts = [(min((i + 1) * b, mx), int(n)) for i, n in enumerate(h["counts"]) if n]
    if h.get("overflow"):
        pts.append((mx, int(h["overflow"])))
    return pts


def _pct(points: list[tuple[float, int]], q: float) -> float:
    points = sorted(points)
    total = sum(n for _, n in points)
    need, seen = q * total, 0
    for v, n in points:
        seen += n
        if seen >= need:
            return v
    return points[-1][0]


def guest_summary(records: list[dict], workload: str = "probe") -> dict | None:
    """Merge the guest's per-vCPU `workload` records into one {"min","avg","p50","p99","max","samples","vcpus"} (us).

    Those of the probe (the default), or of the lock workload: their latency is the acquisition wait.
    One vCPU: its numbers as printed.  Several: min/max/avg exact, percentiles from the merged
    histograms (each bucket counted at its upper edge, so at most one bucket pessimistic) when every record
    has one, else the worst vCPU's (conservative).  "missed" adds up the ticks the guest lost.
    """
    probes = [r for r in records if r.get("type") == "latency" and r.get("workload", "probe") == workload
              and all(isinstance(r.get(k), (int, float)) for k in GUEST_KEYS)]
    if not probes:
        return None
    missed = sum(int(p.get("missed") or 0) for p in probes)
    if len(probes) == 1:
        p = probes[0]
        return {**{k: p[k] for k in GUEST_KEYS}, "samples": p.get("samples"), "missed": missed,
                "vcpus": [p.get("vcpu")]}
    n = [max(int(p.get("samples") or 0), 0) for p in probes]
    total = sum(n)
    res = {"min": min(p["min"] for p in probes), "max": max(p["max"] for p in probes),
           "avg": round(sum(p["avg"] * k for p, k in zip(probes, n)) / total, 2) if total
           else max(p["avg"] for p in probes)}
    hists = [_hist_points(p) for p in probes]
    if all(hists) and any(n for h in hists for _, n in h):
        merged = [pt for h in hists for pt in h]
        res["p50"] = _pct(merged, 0.50)
        res["p99"] = _pct(merged, 0.99)
        if workload == "lock":
            # Most waits sit inside the first 1-us bucket, which its upper edge would read as 1 us.  A mixture's
            # quantile lies between its parts' own, so the vCPUs' exact percentiles bound the merged one.
            for k in ("p50", "p99"):
                res[k] = min(max(res[k], min(p[k] for p in probes)), max(p[k] for p in probes))
    else:
        res["p50"] = max(p["p50"] for p in probes)
        res["p99"] = max(p["p99"] for p in probes)
    return {**{k: res[k] for k in GUEST_KEYS}, "samples": total, "missed": missed,
            "vcpus": [p.get("vcpu") for p in probes]}


LOCK_COUNTS = ("acquisitions", "acq_per_s", "violations", "flag_lost", "irqs", "irqs_in_hold", "irqs_nested")


def lock_summary(records: list[dict]) -> dict | None:
    """The lock workload's counters over its vCPUs (summed: "acq_per_s" is the whole guest's rate) and its
    settings, or None without a lock record.  Its waits are guest_summary(records, "lock")."""
    locks = [r for r in records if r.get("type") == "latency" and r.get("workload") == "lock"]
    if not locks:
        return None
    out: dict = {k: sum(int(r.get(k) or 0) for r in locks) for k in LOCK_COUNTS}
    for k in ("lock_hold_us", "lock_gap_us", "lock_tick_us", "lock_busy_us"):
        out[k.removeprefix("lock_")] = locks[0].get(k)
    out["vcpus"] = len(locks)
    return out


def guest_warnings(records: list[dict]) -> list[str]:
    """The guest's warning records, as text (the test guest's wake-ups that came between sti and hlt)."""
    return [str(r.get("message")) for r in records if isinstance(r, dict) and r.get("type") == "warning"]


def _host_areas(status: dict | None) -> list[dict]:
    """The slots' host areas (what the policy applied and counted) in a "status" reply with a pvsched part."""
    vcpus = ((status or {}).get("pvsched") or {}).get("vcpus") or []
    return [v["host"] for v in vcpus if isinstance(v, dict) and isinstance(v.get("host"), dict)]


def policy_stats(reply: dict | None, status: dict | None = None, guest_records: list[dict] | None = None
                 ) -> dict | None:
    """Boosts, throttles, boosted ms, BPF ns per event and event-to-apply latency (None without a policy).

    Boosts and throttles are the counters the policy writes into each slot's host area: as the guest read
    them at its end ({"type":"host"} records), else from the last "status", else from policy.show."""
    guest_host = [r for r in guest_records or [] if r.get("type") == "host" and "boosts" in r]
    if not reply and not _host_areas(status) and not guest_host:
        return None
    reply = reply or {}
    found: dict[str, list[float]] = {}

    def walk(obj: object, path: tuple[str, ...]) -> None:
        if isinstance(obj, dict):
            for k, v in obj.items():
                walk(v, path + (str(k),))
        elif isinstance(obj, list):
            for v in obj:
                walk(v, path)
        elif isinstance(obj, (int, float)) and not isinstance(obj, bool) and path:
            found.setdefault(path[-1], []).append(obj)
            if len(path) >= 2 and path[-1] == "value":  # stats as {"name": {"value": n, "desc": ...}}
                found.setdefault(path[-2], []).append(obj)

    walk({k: v for k, v in reply.items() if k not in ("text", "tunables", "actuator")}, ())

    def first(*names: str) -> float | None:
        for n in names:
            if n in found:
                return found[n][0]
        return None

    def total(*names: str) -> float | None:
        for n in names:
            if n in found:
                return sum(found[n])
        return None

    res = {"boosts": total("boosts"), "throttles": total("throttles"),
           "bpf_ns_per_event": first("bpf_ns_per_event", "ns_per_event", "avg_run_ns"),
           "apply_latency_us": first("apply_latency_us", "event_to_apply_us", "apply_p50_us")}
    hosts = _host_areas(status)
    if guest_host:
        res["boosts"] = sum(int(h.get("boosts") or 0) for h in guest_host)
        res["throttles"] = sum(int(h.get("throttles") or 0) for h in guest_host)
        res["boosted_ms"] = round(sum(int(h.get("boosted_us") or 0) for h in guest_host) / 1e3, 1)
    elif hosts:
        res["boosts"] = sum(int(h.get("boosts") or 0) for h in hosts)
        res["throttles"] = sum(int(h.get("throttles") or 0) for h in hosts)
        res["boosted_ms"] = round(sum(int(h.get("boosted_ns") or 0) for h in hosts) / 1e6, 1)
    lat = (reply.get("actuator") or {}).get("latency_us")
    if isinstance(lat, dict) and lat.get("p50") is not None:
        res["apply_latency_us"] = lat.get("p50")
        res["apply_latency_p99_us"] = lat.get("p99")
    run_ns, run_cnt = total("run_time_ns"), total("run_cnt")
    if res["bpf_ns_per_event"] is None and run_ns is not None and run_cnt:
        res["bpf_ns_per_event"] = round(run_ns / run_cnt, 1)
    if programs := program_stats(reply):
        res["programs"] = programs
    # boosted wall time the budgets did not charge, as the vCPUs still listed at the last show had it: the
    # hypervisor's steal while they ran boosted (less the charge's lag, a clock period at most)
    rows = [v for v in reply.get("vcpus") or [] if isinstance(v, dict) and "boosted_wall_ms" in v]
    if rows:
        res["uncharged_ms"] = round(sum(float(v["boosted_wall_ms"]) - float(v.get("boosted_ms") or 0) for v in rows), 1)
    if (vmm := first("switch_vmm")) is not None:  # pvs_switch runs that involved the VMM (switchcost.vmm_switch_ns)
        res["switch_vmm"] = int(vmm)
    return res


def program_stats(reply: dict | None) -> dict[str, dict]:
    """BPF program name -> {"runs": N, "ns_per_run": x} from policy.show (attached and loaded programs)."""
    out = {}
    for p in (reply or {}).get("programs") or []:
        if isinstance(p, dict) and isinstance(p.get("name"), str) and isinstance(p.get("run_cnt"), int):
            out[p["name"]] = {"runs": p["run_cnt"], "ns_per_run": p.get("avg_ns"), "status": p.get("status")}
    return out


def cyclictest_summary(records: list[dict]) -> dict | None:
    """The Linux guest's cyclictest run as {"min","avg","p50","p99","max","samples","vcpus"} (us), all threads
    merged: percentiles from the 1-us histograms (-h), overflows counted at the run's max."""
    rec = next((r for r in records if r.get("type") == "cyclictest"), None)
    summary = rec.get("summary") if rec else None
    if rec and rec.get("rc") == 0 and isinstance(summary, dict) and all(
            isinstance(summary.get(k), (int, float)) for k in (*GUEST_KEYS, "samples")):
        # computed in the guest from the histogram (pyvmm/guest/linux/init.sh)
        threads = (rec.get("result") or {}).get("thread") or {}
        return {**{k: float(summary[k]) for k in GUEST_KEYS}, "samples": int(summary["samples"]),
                "missed": 0, "overflows": summary.get("overflows"),
                "vcpus": sorted(int(t.get("cpu", -1)) for t in threads.values() if isinstance(t, dict))}
    result = rec.get("result") if rec else None
    threads = (result or {}).get("thread") if isinstance(result, dict) else None
    if rec is None or rec.get("rc") != 0 or not isinstance(threads, dict) or not threads:
        return None
    ts = [t for t in threads.values() if isinstance(t, dict) and isinstance(t.get("cycles"), int) and t["cycles"] > 0]
    if not ts:
        return None
    mx = max(float(t["max"]) for t in ts)
    points: list[tuple[float, int]] = []
    for t in ts:
        hist = {int(k): int(v) for k, v in (t.get("histogram") or {}).items()}
        points += [(float(k + 1), n) for k, n in hist.items()]
        overflow = t["cycles"] - sum(hist.values())
        if overflow > 0:
            points.append((mx, overflow))
    total = sum(t["cycles"] for t in ts)
    return {"min": min(float(t["min"]) for t in ts), "avg": round(sum(t["avg"] * t["cycles"] for t in ts) / total, 2),
            "p50": min(_pct(points, 0.50), mx), "p99": min(_pct(points, 0.99), mx), "max": mx, "samples": total,
            "missed": 0, "vcpus": sorted(int(t.get("cpu", -1)) for t in ts)}


def make_record(config: str, host: str, workload: str, rep: int, guest: dict, *, host_cyclictest: dict | None = None,
                stress: dict[str, float] | None = None, vcpu_runqlat: dict | None = None,
                policy: dict | None = None, extra: dict | None = None) -> dict:
    """One results.json record: the pinned keys first (config, host, guest), then the benchmark's own."""
    rec = {"config": config, "host": host, "guest": {k: guest[k] for k in GUEST_KEYS},
           "workload": workload, "rep": rep, "guest_samples": guest.get("samples"),
           "guest_missed": guest.get("missed"),
           "host_cyclictest": host_cyclictest,
           "stress_bogo_ops_s": round(sum(stress.values()), 1) if stress else None,
           "stress_metrics": stress or None,
           "vcpu_runqlat": vcpu_runqlat, "policy": policy}
    rec.update(extra or {})
    return rec


def validate_record(rec: dict) -> list[str]:
    """Problems with a record against the pinned schema ([] when it is fine)."""
    errs = []
    if rec.get("config") not in ("vanilla", "static-rt", "static-nice", "pvsched"):
        errs.append(f"config {rec.get('config')!r}")
    if rec.get("host") not in HOSTS:
        errs.append(f"host {rec.get('host')!r}")
    g = rec.get("guest")
    if not isinstance(g, dict) or any(not isinstance(g.get(k), (int, float)) for k in GUEST_KEYS):
        errs.append("guest must hold numbers min, avg, p50, p99, max")
    elif not g["min"] <= g["p50"] <= g["p99"] <= g["max"]:
        errs.append(f"guest values out of order: {g}")
    return errs


def get(rec: dict, path: str) -> float | None:
    """A nested number by dotted path ("guest.p99", "vcpu_runqlat.all.p99"), None when missing."""
    cur: object = rec
    for part in path.split("."):
        if not isinstance(cur, dict):
            return None
        cur = cur.get(part)
    return cur if isinstance(cur, (int, float)) and not isinstance(cur, bool) else None


METRICS = ("guest.p50", "guest.p99", "guest.max", "guest.avg", "vcpu_runqlat.wakeup.p99", "vcpu_runqlat.wakeup.max",
           "vcpu_runqlat.all.p99", "vcpu_runqlat.all.max", "guest_missed",
           "host_cyclictest.max", "host_cyclictest.p99", "host_cyclictest.avg", "stress_bogo_ops_s", "stress_rel", "policy.boosts",
           "policy.throttles", "policy.bpf_ns_per_event", "policy.switch_vmm_ns", "policy.apply_latency_us",
           "guest_samples", "cpu.vcpus", "cpu.vmm_other", "cpu.policy", "cpu.host_load", "host_load_rel",
           "cpu.steal_ms", "calm.guest_max", "calm.host_cyclictest_max", "lock_acq_per_s", "lock.irqs_in_hold")
# A run is "calm" when /proc/stat counted no steal in its window (its unit is a 10 ms tick).  On a host that
# is itself a VM, when the hypervisor below it does not run its CPUs, every task stalls for that long, RT or not, so a
# max over a few seconds measures the hypervisor, not the host scheduling under test.  The max targets are
# printed both on every run and on the calm runs only.
CALM_STEAL_MS = 10


def _stress_rel(records: list[dict]) -> None:
    """Give each busy record "stress_rel": median over stressors of its bogo-ops/s over vanilla's median."""
    base: dict[tuple[str, str], dict[str, float]] = {}
    for host, wl in {(r["host"], r["workload"]) for r in records}:
        van = [r["stress_metrics"] for r in records if r["config"] == "vanilla" and r["host"] == host
               and r["workload"] == wl and r.get("stress_metrics")]
        if van:
            names = set.intersection(*(set(v) for v in van))
            base[(host, wl)] = {n: statistics.median(v[n] for v in van) for n in names}
    for r in records:
        b = base.get((r["host"], r["workload"]))
        m = r.get("stress_metrics")
        ratios = [m[n] / b[n] for n in b if m and n in m and b[n] > 0] if b else []
        r["stress_rel"] = round(statistics.median(ratios), 4) if ratios else None


def _cpu_split(records: list[dict]) -> None:
    """Give each record's "cpu" a "vmm_other" (the VMM's threads besides the vCPUs and the policy process) and a
    "steal_ms" (the hypervisor's steal over the window), and each busy record "host_load_rel": the host load's
    CPU time over vanilla's median (same host and guest)."""
    for r in records:
        c = r.get("cpu")
        if isinstance(c, dict) and all(isinstance(c.get(k), (int, float)) for k in ("vmm", "vcpus")):
            r["cpu"] = c = {**c, "vmm_other": round(max(c["vmm"] - c["vcpus"] - (c.get("policy") or 0.0), 0.0), 3)}
        if isinstance(c, dict) and isinstance(c.get("steal"), (int, float)) and c.get("window_s"):
            r["cpu"] = c = {**c, "steal_ms": round(c["steal"] * c["window_s"] * 1000)}
            if c["steal_ms"] < CALM_STEAL_MS:
                r["calm"] = {"guest_max": get(r, "guest.max"), "host_cyclictest_max": get(r, "host_cyclictest.max")}
    base = {}
    for host, wl in {(r["host"], r["workload"]) for r in records}:
        van = [v for r in records if r["config"] == "vanilla" and (r["host"], r["workload"]) == (host, wl)
               and (v := get(r, "cpu.host_load"))]
        if van:
            base[(host, wl)] = statistics.median(van)
    for r in records:
        b, v = base.get((r["host"], r["workload"])), get(r, "cpu.host_load")
        r["host_load_rel"] = round(v / b, 4) if b and v is not None else None


def config_label(config: str, variant: str | None) -> str:
    """A configuration as tables show it: "pvsched bs5" for the pvsched variant bs5 (bench --variant)."""
    return f"{config} {variant}" if variant else config


def summarize(records: Iterable[dict]) -> list[dict]:
    """One row per (workload, host, config): median, min, max and the values over repetitions of every metric.

    A record of a pvsched variant (bench --variant) gets its own row, config "pvsched NAME"; the targets
    read the plain "pvsched" row only."""
    recs = [dict(r) for r in records]
    _stress_rel(recs)
    _cpu_split(recs)
    cells: dict[tuple[str, str, str, str], list[dict]] = {}
    for r in recs:
        cells.setdefault((r.get("workload", PRIMARY), r["host"], r["config"], r.get("variant") or ""), []).append(r)
    order = {c: i for i, c in enumerate(("vanilla", "static-rt", "static-nice", "pvsched"))}

    def key(kv):
        wl, host, config, variant = kv[0]
        return wl != PRIMARY, wl, HOSTS.index(host), order.get(config, len(order)), variant

    rows = []
    for (wl, host, config, variant), rs in sorted(cells.items(), key=key):
        row: dict = {"workload": wl, "host": host, "config": config_label(config, variant), "reps": len(rs)}
        for m in METRICS:
            vals = [v for r in rs if (v := get(r, m)) is not None]
            row[m] = ({"median": statistics.median(vals), "min": min(vals), "max": max(vals), "values": vals}
                      if vals else None)
        rows.append(row)
    return rows


def cell(rows: list[dict], config: str, host: str, metric: str, workload: str = PRIMARY) -> float | None:
    """The median of one metric in one summary cell, None when not measured."""
    for r in rows:
        if (r["config"], r["host"], r["workload"]) == (config, host, workload) and r.get(metric):
            return r[metric]["median"]
    return None


def cell_values(rows: list[dict], config: str, host: str, metric: str, workload: str = PRIMARY) -> list[float]:
    """One metric's value in each repetition of one summary cell, [] when not measured."""
    for r in rows:
        if (r["config"], r["host"], r["workload"]) == (config, host, workload) and r.get(metric):
            return list(r[metric].get("values") or [r[metric]["median"]])
    return []


RESOLVE_LEVEL = 0.90   # the resampling interval printed next to each verdict
RESOLVE_DRAWS = 4000


def resolve(value: list[float], basis: list[float] | None, factor: float, draws: int = RESOLVE_DRAWS,
            seed: int = 0) -> tuple[float, float] | None:
    """The RESOLVE_LEVEL interval of median(value) / (factor x median(basis)), resampling both cells' repetitions.

    `basis` None means a constant limit `factor`.  A verdict whose interval holds 1 is not resolved: the
    repetitions' spread is wider than the distance to the limit, and another run of the same code can turn
    it (docs/benchmarks.md, "What a 5-repetition verdict resolves").  None with fewer than 2 repetitions a side."""
    if len(value) < 2 or (basis is not None and len(basis) < 2):
        return None
    rng = random.Random(seed)  # the same records print the same interval
    ratios = []
    for _ in range(draws):
        lim = factor * statistics.median(rng.choices(basis, k=len(basis))) if basis is not None else factor
        if lim <= 0:
            return None
        ratios.append(statistics.median(rng.choices(value, k=len(value))) / lim)
    ratios.sort()
    tail = (1 - RESOLVE_LEVEL) / 2
    return ratios[int(tail * draws)], ratios[min(draws - 1, int((1 - tail) * draws))]


def targets(rows: list[dict]) -> list[dict]:
    """The benchmark's targets on the summary medians: {"name","value","limit","ok","interval","resolved"}.

    ok is None when a needed cell was not measured.  "interval" is resolve()'s interval of value/limit
    (None with a single repetition), and "resolved" says whether it lies wholly on one side of the limit."""
    out = []

    def unmeasured(name: str, value: tuple) -> None:
        out.append({"name": name, "value": cell(rows, *value), "limit": None, "ok": None, "interval": None,
                    "resolved": None})

    def add(name: str, value: tuple, basis: tuple | None, factor: float, higher_is_better: bool = False) -> None:
        """Target `value` (a cell's key) <= (or >=) factor x the median of cell `basis`, or factor itself."""
        v = cell(rows, *value)
        if basis is None:
            limit: float | None = factor
        else:
            base = cell(rows, *basis)
            limit = None if base is None else factor * base
        ok = interval = resolved = None
        if v is not None and limit is not None:
            ok = v >= limit if higher_is_better else v <= limit
            interval = resolve(cell_values(rows, *value), cell_values(rows, *basis) if basis is not None else None,
                               factor)
            resolved = None if interval is None else not interval[0] <= 1 <= interval[1]
        out.append({"name": name, "value": v, "limit": limit, "ok": ok, "interval": interval, "resolved": resolved})

    def add_fixed(name: str, value: tuple, limit: float, higher_is_better: bool = True) -> None:
        """A metric relative to vanilla's (stress_rel, host_load_rel) against a fixed limit, where vanilla ran.

        Each repetition's value is already divided by vanilla's median, so its interval resamples this cell only."""
        if cell(rows, "vanilla", "busy", value[2], value[3]) is None:
            unmeasured(name, value)
        else:
            add(name, value, None, limit, higher_is_better)

    # The primary targets read the test guest's probe rows, or cyclictest's in a Linux-guest run.
    main = LINUX if not any(r["workload"] == PRIMARY for r in rows) and any(r["workload"] == LINUX for r in rows) \
        else PRIMARY
    pv_p99 = ("pvsched", "busy", "guest.p99", main)
    add("busy pvsched guest p99 <= 1.1 x static-rt busy p99", pv_p99, ("static-rt", "busy", "guest.p99", main), 1.1)
    add("busy pvsched guest p99 <= 1.5 x vanilla idle p99", pv_p99, ("vanilla", "idle", "guest.p99", main), 1.5)
    add("busy pvsched guest p99 <= 1/5 x vanilla busy p99", pv_p99, ("vanilla", "busy", "guest.p99", main), 0.2)
    add("busy pvsched guest max <= 1/10 x vanilla busy max", ("pvsched", "busy", "guest.max", main),
        ("vanilla", "busy", "guest.max", main), 0.1)
    add("busy pvsched guest max <= 1/10 x vanilla busy max, runs without steal",
        ("pvsched", "busy", "calm.guest_max", main), ("vanilla", "busy", "calm.guest_max", main), 0.1)
    add_fixed("busy pvsched host stress-ng throughput >= 0.95 x vanilla", ("pvsched", "busy", "stress_rel", main), 0.95)
    # "No worse than vanilla", with 10% for run-to-run noise of a max over a few seconds.
    add("busy pvsched host cyclictest max <= 1.1 x vanilla", ("pvsched", "busy", "host_cyclictest.max", main),
        ("vanilla", "busy", "host_cyclictest.max", main), 1.1)
    add("busy pvsched host cyclictest max <= 1.1 x vanilla, runs without steal",
        ("pvsched", "busy", "calm.host_cyclictest_max", main), ("vanilla", "busy", "calm.host_cyclictest_max", main),
        1.1)
    add_fixed("mixed guest (probe,busy): pvsched host throughput >= 0.95 x vanilla",
              ("pvsched", "busy", "stress_rel", MIXED), 0.95)
    # The same targets on the host load's CPU time, which is what the scheduling decides and, unlike
    # bogo-ops over a few seconds of file I/O and page faults, steady from run to run.
    for wl, label in ((main, "busy"), (MIXED, "mixed guest (probe,busy):"), (TICKING, "tick guest (probe,tick):")):
        add_fixed(f"{label} pvsched host load CPU time >= 0.95 x vanilla", ("pvsched", "busy", "host_load_rel", wl),
                  0.95)
    # Lock-holder preemption (the lock group): "guest" is there the acquisition wait.
    lock_p99 = ("pvsched", "busy", "guest.p99", LOCK)
    add("lock guest: busy pvsched wait p99 <= 1/10 x vanilla busy", lock_p99, ("vanilla", "busy", "guest.p99", LOCK),
        0.1)
    add("lock guest: busy pvsched wait p99 <= 1.2 x static-rt busy", lock_p99, ("static-rt", "busy", "guest.p99", LOCK),
        1.2)
    # Most acquisitions wait under a microsecond whatever the host does: a preempted holder shows in the max.
    add("lock guest: busy pvsched wait max <= 1/10 x vanilla busy", ("pvsched", "busy", "guest.max", LOCK),
        ("vanilla", "busy", "guest.max", LOCK), 0.1)
    add("lock guest: busy pvsched acquisitions/s >= 0.9 x static-rt", ("pvsched", "busy", "lock_acq_per_s", LOCK),
        ("static-rt", "busy", "lock_acq_per_s", LOCK), 0.9, higher_is_better=True)
    add_fixed("lock guest: busy pvsched host load CPU time >= 0.95 x vanilla",
              ("pvsched", "busy", "host_load_rel", LOCK), 0.95)
    lock_throttles = ("pvsched", "busy", "policy.throttles", LOCK)
    if cell(rows, *lock_throttles) is None:
        unmeasured("lock guest: busy pvsched throttles == 0", lock_throttles)
    else:
        add("lock guest: busy pvsched throttles == 0", lock_throttles, None, 0)
    return out


def static_rt_harm(rows: list[dict]) -> dict:
    """How much static RT costs the host on a busy host, next to vanilla (for the report, not a target)."""
    res = {}
    for wl in (PRIMARY, MIXED, TICKING, LOCK):
        res[wl] = {"stress_rel": cell(rows, "static-rt", "busy", "stress_rel", wl),
                   "host_load_rel": cell(rows, "static-rt", "busy", "host_load_rel", wl),
                   "host_cyclictest_max": cell(rows, "static-rt", "busy", "host_cyclictest.max", wl),
                   "vanilla_host_cyclictest_max": cell(rows, "vanilla", "busy", "host_cyclictest.max", wl)}
    return res
