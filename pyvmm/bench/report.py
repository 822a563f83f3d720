"""The benchmark's human outputs: a Markdown table with the targets, and a PNG plot (matplotlib, Agg)."""

from __future__ import annotations

from pathlib import Path

from pyvmm.bench.results import LOCK, MIXED, PRIMARY, RESOLVE_LEVEL, TICKING, static_rt_harm, targets
from pyvmm.common.safe_fs import write_file_nofollow


def _fmt(v: float | None, digits: int = 0) -> str:
    if v is None:
        return "-"
    if abs(v) >= 10000:
        return f"{v / 1000:.1f}k" if abs(v) < 1e6 else f"{v / 1e6:.2f}M"
    return f"{v:.{digits}f}"


def _spread(stat: dict | None, digits: int = 0) -> str:
    """"median" alone for one repetition, "median (min-max)" for several."""
    if not stat:
        return "-"
    if stat["min"] == stat["max"]:
        return _fmt(stat["median"], digits)
    return f"{_fmt(stat['median'], digits)} ({_fmt(stat['min'], digits)}-{_fmt(stat['max'], digits)})"


def table(rows: list[dict]) -> str:
    """Markdown table of the summary rows (medians, with min-max over repetitions in parentheses)."""
    head = ("| guest workload | host | config | guest p50 us | guest p99 us | guest max us | vCPU wake-to-run p99 us "
            "| vCPU wake-to-run max us | host cyclictest p99 us | host cyclictest max us | host stress-ng vs vanilla | boosts / throttles "
            "| BPF ns/event | event to setattr p50 us | reps |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        pol = "-"
        if r.get("policy.boosts") or r.get("policy.throttles"):
            pol = f"{_fmt((r.get('policy.boosts') or {}).get('median'))} / " \
                  f"{_fmt((r.get('policy.throttles') or {}).get('median'))}"
        rel = r.get("stress_rel")
        lines.append(
            f"| {r['workload']} | {r['host']} | {r['config']} | {_spread(r.get('guest.p50'))} "
            f"| {_spread(r.get('guest.p99'))} | {_spread(r.get('guest.max'))} "
            f"| {_spread(r.get('vcpu_runqlat.wakeup.p99'))} | {_spread(r.get('vcpu_runqlat.wakeup.max'))} "
            f"| {_spread(r.get('host_cyclictest.p99'))} | {_spread(r.get('host_cyclictest.max'))} | {_spread(rel, 3) if rel else '-'} | {pol} "
            f"| {_fmt((r.get('policy.bpf_ns_per_event') or {}).get('median'))} "
            f"| {_fmt((r.get('policy.apply_latency_us') or {}).get('median'))} | {r['reps']} |")
    return "\n".join(lines)


def cpu_table(rows: list[dict]) -> str:
    """Markdown table of where the host's CPU went (in CPUs over the guest's window), for rows that measured it."""
    head = ("| guest workload | host | config | guest samples | vCPU threads | VMM other threads | policy process "
            "| host load (stress-ng) | host load CPU vs vanilla | stress-ng bogo-ops vs vanilla | hypervisor steal ms |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        if not r.get("cpu.vcpus"):
            continue
        lines.append(
            f"| {r['workload']} | {r['host']} | {r['config']} | {_spread(r.get('guest_samples'))} "
            f"| {_spread(r.get('cpu.vcpus'), 3)} | {_spread(r.get('cpu.vmm_other'), 3)} "
            f"| {_spread(r.get('cpu.policy'), 3)} | {_spread(r.get('cpu.host_load'), 3)} "
            f"| {_spread(r.get('host_load_rel'), 3)} | {_spread(r.get('stress_rel'), 3)} "
            f"| {_spread(r.get('cpu.steal_ms'))} |")
    return "\n".join(lines) if len(lines) > 2 else ""


def lock_table(rows: list[dict]) -> str:
    """Markdown table of the lock group: the guest's acquisition wait and its acquisitions per second ("" without
    lock rows; their host cost is in the other two tables)."""
    # avg too: a preempted holder makes one long wait among some 100k short ones a second, which p99 hardly sees
    head = ("| host | config | wait avg us | wait p50 us | wait p99 us | wait max us | acquisitions/s (both vCPUs) "
            "| ticks that found the flag set | boosts / throttles | reps |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        if r["workload"] != LOCK:
            continue
        pol = "-"
        if r.get("policy.boosts") or r.get("policy.throttles"):
            pol = f"{_fmt((r.get('policy.boosts') or {}).get('median'))} / " \
                  f"{_fmt((r.get('policy.throttles') or {}).get('median'))}"
        lines.append(
            f"| {r['host']} | {r['config']} | {_spread(r.get('guest.avg'), 2)} | {_spread(r.get('guest.p50'), 2)} "
            f"| {_spread(r.get('guest.p99'), 1)} "
            f"| {_spread(r.get('guest.max'))} | {_spread(r.get('lock_acq_per_s'))} "
            f"| {_spread(r.get('lock.irqs_in_hold'))} | {pol} | {r['reps']} |")
    return "\n".join(lines) if len(lines) > 2 else ""


def target_lines(rows: list[dict]) -> list[str]:
    """One line per target: PASS/MISS (or n/a when a needed cell was not measured), value and limit, and with
    several repetitions how far from the limit the verdict is and whether the repetitions resolve it."""
    out = []
    for t in targets(rows):
        verdict = {True: "PASS", False: "MISS", None: "n/a "}[t["ok"]]
        line = (f"{verdict}  {t['name']}: {_fmt(t['value'], 3 if (t['value'] or 0) < 10 else 0)}"
                f" (limit {_fmt(t['limit'], 3 if (t['limit'] or 0) < 10 else 0)})")
        if t.get("interval"):
            lo, hi = t["interval"]
            line += (f"; {t['value'] / t['limit']:.3g} x limit, {RESOLVE_LEVEL:.0%} resampled {lo:.3g}-{hi:.3g}"
                     + ("" if t["resolved"] else ", not resolved"))
        out.append(line)
    harm = static_rt_harm(rows)
    for wl, h in harm.items():
        if h["stress_rel"] is not None or h["host_cyclictest_max"] is not None:
            out.append(f"info  static-rt host cost, guest {wl}: stress-ng {_fmt(h['stress_rel'], 3)} x vanilla "
                       f"(CPU time {_fmt(h.get('host_load_rel'), 3)} x), "
                       f"host cyclictest max {_fmt(h['host_cyclictest_max'])} us "
                       f"(vanilla {_fmt(h['vanilla_host_cyclictest_max'])} us)")
    return out


def switch_cost_lines(rows: list[dict], meta: dict) -> list[str]:
    """What the policy's BPF costs per host context switch: without a VM thread (meta's switch_cost, a host
    ping-pong) and with one of the VMM's (pvsched rows, derived from their counters); [] when neither."""
    out = []
    if c := meta.get("switch_cost"):
        p = c.get("programs") or {}
        out.append(f"BPF per host switch without a VM thread: {_fmt(c.get('ns_per_host_switch'))} ns "
                   f"(pvs_switch {_fmt((p.get('pvs_switch') or {}).get('ns_per_run'))} + pvs_wakeup "
                   f"{_fmt((p.get('pvs_wakeup') or {}).get('ns_per_run'))} ns per run; goal 300); host ping-pong "
                   f"round trip (wall clock, as noisy as the host) {_fmt(c['round_trip_ns']['on'])} ns with the "
                   f"programs, {_fmt(c['round_trip_ns']['off'])} ns without ({c['added_ns_per_switch']:+.0f} ns per "
                   "switch)")
        if fl := c.get("floor"):
            out.append(f"the floor, programs on the same tracepoints that do nothing: "
                       f"{_fmt((fl.get('pvs_switch') or {}).get('ns_per_run'))} + "
                       f"{_fmt((fl.get('pvs_wakeup') or {}).get('ns_per_run'))} ns per run (round trip "
                       f"{_fmt(c['round_trip_ns'].get('floor'))} ns)")
    for r in rows:
        if ns := (r.get("policy.switch_vmm_ns") or {}).get("median"):
            out.append(f"BPF per pvs_switch run with a VMM thread, {r['workload']} {r['host']} {r['config']}: "
                       f"{_fmt(ns)} ns")
    return out


def markdown(rows: list[dict], meta: dict) -> str:
    """The whole results.md: where and how it was measured, the table, the targets."""
    m = meta
    parts = [
        "# pyvmm bench results",
        "",
        (f"Measured {m.get('date', '?')} on {m.get('machine', '?')}; {m.get('reps', '?')} repetition(s) of "
         f"{m.get('duration_s', '?')} s per cell, guest probe interval {m.get('interval_us', '?')} us, "
         f"{m.get('cpus', 2)} vCPUs. Latencies in microseconds: median over repetitions, (min-max) when "
         "there are several.")
        + (f" pvsched tunables: {' '.join(m['pvsched_set'])}." if m.get("pvsched_set") else "")
        + (f" Host transparent huge pages: {m['thp']}." if m.get("thp") else "")
        + (" The Linux guest's cyclictest threads ran at SCHED_OTHER." if m.get("cyclictest_policy") == "other"
           else ""),
        "",
        table(rows),
        "",
        *(["Host CPU, in CPUs over the guest's window (2.0 = the whole host), from the per-task times in /proc:",
           "", cpu_table(rows), ""] if cpu_table(rows) else []),
        *([("The lock group (guest lock,lock): the acquisition wait, first attempt to acquisition (it is the "
            "guest latency of its rows above), and the guest's acquisitions per second:"),
           "", lock_table(rows), ""] if lock_table(rows) else []),
        *(["What the policy's BPF costs per host context switch (bpf_stats):", "", "```",
            *switch_cost_lines(rows, meta), "```", ""] if switch_cost_lines(rows, meta) else []),
        ("Targets (medians; printed, not asserted). With several repetitions each line adds the value as a multiple "
         f"of the limit and the {RESOLVE_LEVEL:.0%} interval of that multiple over the repetitions resampled; "
         "\"not resolved\" when the interval holds 1, where another run of the same code can turn the verdict:"),
        "",
        "```",
        *target_lines(rows),
        "```",
    ]
    if m.get("failures"):
        parts += ["", "Failed runs (left out of the table):", ""] + [f"- {f}" for f in m["failures"]]
    return "\n".join(parts) + "\n"


def plot(rows: list[dict], path: Path) -> Path:
    """PNG bar charts of guest p99 and max, vCPU wake-to-run p99, host cyclictest max and the host load's throughput
    and CPU time per configuration, written to `path` without following a symlink there."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = [(PRIMARY, "idle", "idle host"), (PRIMARY, "busy", "busy host"),
              (MIXED, "busy", "busy host, guest probe,busy"), (TICKING, "busy", "busy host, guest probe,tick"),
              (LOCK, "idle", "idle host, guest lock,lock (acquisition wait)"),
              (LOCK, "busy", "busy host, guest lock,lock (acquisition wait)")]
    groups = [g for g in groups if any(r["workload"] == g[0] and r["host"] == g[1] for r in rows)]
    configs = list(dict.fromkeys(r["config"] for r in rows))  # summarize()'s order, variants after pvsched
    panels = [("guest.p99", "guest p99 (us)", True), ("guest.max", "guest max (us)", True),
              ("vcpu_runqlat.wakeup.p99", "vCPU wake-to-run p99 (us)", True),
              ("host_cyclictest.max", "host cyclictest max (us)", True),
              ("stress_rel", "host stress-ng bogo-ops / vanilla", False),
              ("host_load_rel", "host load (stress-ng) CPU time / vanilla", False)]
    fig, axes = plt.subplots(2, 3, figsize=(17, 8))
    width = 0.8 / max(len(groups), 1)
    for ax, (metric, label, log) in zip(axes.flat, panels):
        for gi, (wl, host, glabel) in enumerate(groups):
            meds, lo, hi = [], [], []
            for c in configs:
                stat = next((r.get(metric) for r in rows if (r["config"], r["host"], r["workload"]) == (c, host, wl)),
                            None)
                med = stat["median"] if stat else 0.0
                meds.append(med)
                lo.append(med - stat["min"] if stat else 0.0)
                hi.append(stat["max"] - med if stat else 0.0)
            xs = [i + (gi - (len(groups) - 1) / 2) * width for i in range(len(configs))]
            ax.bar(xs, meds, width, yerr=[lo, hi], capsize=3, label=glabel)
        ax.set_xticks(range(len(configs)), configs)
        ax.set_ylabel(label)
        if log and any(r.get(metric) for r in rows):
            ax.set_yscale("log")
        if metric in ("stress_rel", "host_load_rel"):
            ax.axhline(0.95, color="grey", linestyle="--", linewidth=1)  # the targets' 5% host budget
        ax.grid(axis="y", alpha=0.3)
    axes.flat[0].legend(fontsize=8)
    fig.suptitle("pyvmm bench: guest latency and host cost per vCPU scheduling configuration")
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=100)
    plt.close(fig)
    write_file_nofollow(path, png.getvalue())
    return path
