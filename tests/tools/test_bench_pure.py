"""The benchmark's pure parts: record schema, merging of guest records, parsers, summary, targets, table, plot."""

from __future__ import annotations

import json

import pytest

from pyvmm import abi
from pyvmm.bench import report
from pyvmm.bench.hostload import parse_cyclictest, parse_stress_metrics
from pyvmm.bench.results import (guest_summary, guest_warnings, make_record, policy_stats, resolve, summarize, targets,
                                 validate_record)
from pyvmm.bench.run import main, parse_args, plan, split_program
from pyvmm.bench.vmrun import RunSpec, boot_argv, extract_vcpu_tids, parse_guest_lines

CYCLICTEST_OUT = """# /dev/cpu_dma_latency set to 0us
T: 0 (10854) P: 0 I:1000 C:   1988 Min:     25 Act:   81 Avg:   75 Max:     759
T: 1 (10855) P: 0 I:1000 C:   1985 Min:     35 Act:   76 Avg:   76 Max:    2055
"""

STRESS_YAML = """---
metrics:
    - stressor: cpu
      bogo-ops: 2821
      bogo-ops-per-second-usr-sys-time: 2016.66
      bogo-ops-per-second-real-time: 1418.761131
    - stressor: iomix
      bogo-ops-per-second-real-time: 86004.948238
"""
STRESS_LOG = """stress-ng: metrc: [9931] cpu                2821      1.99      1.40      0.00      1418.76        2016.66
stress-ng: metrc: [9931] vm                 1090      2.00      0.10      0.18       544.33        3893.29
"""


def probe(vcpu: int, p99: float, mx: float, counts: list[int] | None = None, **kw) -> dict:
    rec = {"type": "latency", "vcpu": vcpu, "workload": "probe", "samples": 100, "min": 2.0, "avg": 10.0,
           "p50": 8.0, "p99": p99, "max": mx}
    if counts is not None:
        rec["hist"] = {"bucket_us": 10, "counts": counts}
    rec.update(kw)
    return rec


def test_guest_summary_single_vcpu_passes_numbers_through():
    g = guest_summary([{"type": "pvsched", "status": "active"}, probe(0, 40.0, 90.0)])
    assert {k: g[k] for k in ("min", "avg", "p50", "p99", "max")} == \
        {"min": 2.0, "avg": 10.0, "p50": 8.0, "p99": 40.0, "max": 90.0}


def test_guest_summary_merges_histograms_of_probe_vcpus_only():
    # vCPU 0: 100 samples all in [0,10); vCPU 1: 98 in [0,10), 2 in [50,60) -> merged p99 in the 50-60 bucket
    a = probe(0, 9.0, 9.5, [100])
    b = probe(1, 55.0, 58.0, [98, 0, 0, 0, 0, 2])
    busy = {"type": "latency", "vcpu": 1, "workload": "busy", "samples": 5, "min": 0, "avg": 0, "p50": 0,
            "p99": 0, "max": 999999}
    g = guest_summary([a, b, busy])
    assert g["samples"] == 200 and g["max"] == 58.0 and g["vcpus"] == [0, 1]
    assert g["p50"] == 9.5  # a bucket's upper edge, capped at that vCPU's max
    assert g["p99"] == 10.0  # 198 of 200 samples are below 10 us: the merged p99 falls there
    b["hist"]["counts"] = [90, 0, 0, 0, 0, 10]
    assert guest_summary([a, b])["p99"] == 58.0  # capped at the true max
    # different bucket sizes per vCPU and an overflow count (samples past the last bucket)
    c = probe(1, 900.0, 5000.0, missed=3)
    c["hist"] = {"bucket_us": 50, "counts": [50, 40], "overflow": 10}
    g = guest_summary([a, c])
    assert g["p50"] == 9.5 and g["p99"] == 5000.0 and g["missed"] == 3


def test_guest_summary_without_histograms_is_conservative():
    g = guest_summary([probe(0, 20.0, 30.0), probe(1, 70.0, 80.0)])
    assert g["p99"] == 70.0 and g["max"] == 80.0
    assert guest_summary([{"type": "pvsched", "status": "absent"}]) is None


def test_guest_warnings_are_kept_as_text_and_nothing_else_is():
    recs = [{"type": "latency", "vcpu": 0}, {"type": "warning", "message": "vCPU 1: 2 wake-up(s) came between sti and hlt"},
            {"type": "warning"}, "not a record"]
    assert guest_warnings(recs) == ["vCPU 1: 2 wake-up(s) came between sti and hlt", "None"]
    assert guest_warnings([{"type": "done", "status": "ok"}]) == []


def test_parse_cyclictest_summary():
    s = parse_cyclictest(CYCLICTEST_OUT)
    assert s["max"] == 2055 and s["min"] == 25 and s["threads"] == 2 and s["prio"] == 0
    assert 75 <= s["avg"] <= 76
    assert parse_cyclictest("nothing") is None


def test_parse_cyclictest_histogram_summary():
    text = ("# Histogram\n000000 000000\t000000\n000010 000090\t000050\n000020 000009\t000045\n"
            "000030 000000\t000005\n# Total: 000000100 000000100\n# Min Latencies: 00010 00010\n"
            "# Avg Latencies: 00012 00018\n# Max Latencies: 00025 09000\n# Histogram Overflows: 00000 00001\n")
    s = parse_cyclictest(text)
    assert (s["min"], s["avg"], s["p99"], s["max"], s["samples"], s["overflows"]) == (10, 15.0, 30, 9000, 200, 1)


def test_parse_stress_metrics_yaml_then_log_fallback():
    assert parse_stress_metrics(STRESS_YAML) == {"cpu": 1418.761131, "iomix": 86004.948238}
    assert parse_stress_metrics("", STRESS_LOG) == {"cpu": 1418.76, "vm": 544.33}


def test_parse_guest_lines_and_vcpu_tids():
    lines = ["booting\n", '{"type":"pvsched","status":"active"}\n', 'uart: {"type":"latency","vcpu":0}\n',
             "{broken\n"]
    assert [r["type"] for r in parse_guest_lines(lines)] == ["pvsched", "latency"]
    assert extract_vcpu_tids({"vcpu_tids": {"0": 11, "1": 12}}) == {0: 11, 1: 12}
    assert extract_vcpu_tids({"vm": {"vcpus": [{"id": 0, "tid": 5}, {"id": 1, "tid": 6}]}}) == {0: 5, 1: 6}
    assert extract_vcpu_tids({"text": "x"}) == {}


def test_boot_argv_vanilla_has_no_policy_and_a_watchdog():
    argv = boot_argv(RunSpec("vanilla", "probe,busy", 2, 1000), 60)
    assert argv[:5] == ["chrt", "-f", "-R", str(abi.C.PVSCHED_WATCHDOG_PRIO), "timeout"]
    assert "--no-policy" in argv and "duration=2 interval=1000 workload=probe,busy" in argv
    argv = boot_argv(RunSpec("pvsched", policy_set=("boost_on_halt=false",)), 60)
    assert "--no-policy" not in argv and argv[-2:] == ["--policy-set", "boost_on_halt=false"]
    assert argv[-4:-2] == ["--policy-program", "pvsched"]


def test_the_linux_guests_cyclictest_policy_reaches_its_command_line_and_the_peers():
    from pyvmm.bench.qemu_peer import qemu_argv

    def cmdline(spec: RunSpec) -> str:
        argv = boot_argv(spec, 60)
        return argv[argv.index("--cmdline") + 1]

    other = cmdline(RunSpec("pvsched", "cyclictest", 2, 1000, kernel="/k", initrd="/i", cyclictest_policy="other"))
    assert "pvsched.workload=cyclictest" in other and "pvsched.policy=other" in other
    assert "pvsched.policy=rr" in cmdline(RunSpec("vanilla", "cyclictest", 2, 1000, kernel="/k", initrd="/i"))
    try:
        peer = qemu_argv("/k", "/i", 2, 1000, policy="other")
    except FileNotFoundError:
        pytest.skip("no qemu-system-x86_64")
    assert "pvsched.policy=other" in peer[peer.index("-append") + 1]
    assert parse_args(["--guest", "linux", "--cyclictest-policy", "other"]).cyclictest_policy == "other"


def test_a_linux_guest_in_the_lab_loads_its_module_with_one_cpu_online(monkeypatch):
    """Inside `pyvmm lab` the guest is told to take its other CPUs offline around its module's load and
    unload (pvsched.quiesce=1, init.sh); outside, it is not."""
    spec = RunSpec("vanilla", "cyclictest", 2, 1000, kernel="/k", initrd="/i")
    monkeypatch.delenv("PYVMM_IN_LAB", raising=False)
    def keys() -> list[str]:
        argv = boot_argv(spec, 60)
        return argv[argv.index("--cmdline") + 1].split()

    assert "pvsched.quiesce=1" not in keys()
    monkeypatch.setenv("PYVMM_IN_LAB", "1")
    assert "pvsched.quiesce=1" in keys()


def test_a_linux_guest_settles_after_init_in_pyvmm_and_in_the_peer():
    """The host load starts at /init's first record: both command lines give the guest its settle time."""
    from pyvmm.bench.qemu_peer import qemu_argv
    from pyvmm.bench.vmrun import LINUX_SETTLE_S

    argv = boot_argv(RunSpec("vanilla", "cyclictest", 2, 1000, kernel="/k", initrd="/i"), 60)
    assert f"pvsched.settle={LINUX_SETTLE_S:g}" in argv[argv.index("--cmdline") + 1].split()
    try:
        peer = qemu_argv("/k", "/i", 2, 1000)
    except FileNotFoundError:
        pytest.skip("no qemu-system-x86_64")
    assert f"pvsched.settle={LINUX_SETTLE_S:g}" in peer[peer.index("-append") + 1].split()


def test_the_console_reader_opens_the_window_at_the_boot_record_and_closes_it_at_cyclictests_end():
    import io
    import time
    from types import SimpleNamespace

    from pyvmm.bench.vmrun import console_reader

    calls, ends, lines = [], [], []
    out = SimpleNamespace(init_after_s=None)
    stream = io.StringIO('early line\n{"type":"boot","kernel":"6.1"}\nx {"type":"boot"}\n'
                         '{"type":"cyclictest_end"}\n{"type":"cyclictest","rc":0}\n{"type":"done"}\n')
    t = console_reader(stream, lines, out, time.monotonic(), on_boot=lambda: calls.append(len(lines)),
                       on_end=lambda: ends.append(len(lines)))
    t.start()
    t.join(5)
    assert calls == [1]  # once, at the first boot record, before it is appended
    assert ends == [3]  # at the end of cyclictest, before the guest's summary
    assert out.init_after_s is not None and len(lines) == 6


def test_the_test_guests_measuring_runs_from_its_pvsched_record_to_its_first_result():
    """Outside it: a pvsched VM's policy start-up and unboosted boot, and the guest's unboosted report."""
    import io
    from types import SimpleNamespace

    from pyvmm.bench.vmrun import console_reader

    starts, ends, lines = [], [], []
    stream = io.StringIO('{"type":"config"}\n{"type":"pvsched","status":"active"}\n{"type":"pvsched"}\n'
                         '{"type":"phases_end"}\n{"type":"latency","vcpu":1}\n{"type":"workload","vcpu":0}\n'
                         '{"type":"done","status":"ok"}\n')
    t = console_reader(stream, lines, SimpleNamespace(init_after_s=None), 0.0, on_end=lambda: ends.append(len(lines)),
                       on_start=lambda: starts.append(len(lines)))
    t.start()
    t.join(5)
    assert starts == [1] and ends == [3] and len(lines) == 7   # once each: at phases_end, before the report
    ends.clear()
    lines.clear()
    stream = io.StringIO('{"type":"pvsched"}\n{"type":"workload","vcpu":1}\n{"type":"latency","vcpu":0}\n')
    t = console_reader(stream, lines, SimpleNamespace(init_after_s=None), 0.0, on_end=lambda: ends.append(len(lines)))
    t.start()
    t.join(5)
    assert ends == [1]   # no phases_end: the first result, whichever vCPU printed it


def test_a_variant_may_swap_the_bpf_policy_by_name():
    assert split_program(["a=1", "program=rt_only", "b=2"]) == ("rt_only", ("a=1", "b=2"))
    assert split_program(["a=1"]) == ("pvsched", ("a=1",))
    argv = boot_argv(RunSpec("pvsched", program="rt_only"), 60)
    assert argv[argv.index("--policy-program") + 1] == "rt_only"
    assert parse_args(["--variant", "rt:program=rt_only"]).variants == {"rt": ["program=rt_only"]}
    with pytest.raises(SystemExit) as e:
        parse_args(["--variant", "x:program=nope"])
    assert e.value.code == 2


def test_policy_stats_from_a_show_reply():
    reply = {"text": "...", "vcpus": [{"tid": 1, "boosts": 3, "throttles": 1}, {"tid": 2, "boosts": 4,
                                                                               "throttles": 0}],
             "prog": {"run_time_ns": 5000, "run_cnt": 10}}
    assert policy_stats(reply) == {"boosts": 7, "throttles": 1, "bpf_ns_per_event": 500.0,
                                   "apply_latency_us": None}
    assert policy_stats(None) is None
    status = {"pvsched": {"vcpus": [{"id": 0, "host": {"boosts": 9, "throttles": 2, "boosted_ns": 3_000_000}},
                                    {"id": 1, "host": {"boosts": 1, "throttles": 0, "boosted_ns": 500_000}}]}}
    s = policy_stats(reply, status)
    assert (s["boosts"], s["throttles"], s["boosted_ms"], s["bpf_ns_per_event"]) == (10, 2, 3.5, 500.0)
    # what the guest read from its slots at the end wins; the actuator's latency is taken as reported
    guest = [{"type": "host", "vcpu": 0, "boosts": 5, "throttles": 1, "boosted_us": 2500},
             {"type": "host", "vcpu": 1, "boosts": 6, "throttles": 0, "boosted_us": 500}]
    reply["actuator"] = {"events": 8, "latency_us": {"samples": 8, "p50": 121.7, "p99": 807.2, "max": 807.2}}
    s = policy_stats(reply, status, guest)
    assert (s["boosts"], s["throttles"], s["boosted_ms"]) == (11, 1, 3.0)
    assert (s["apply_latency_us"], s["apply_latency_p99_us"]) == (121.7, 807.2)
    # boosted wall time the budgets did not charge (the hypervisor's steal), from the show's vCPU rows
    reply["vcpus"][0].update(boosted_ms=40.0, boosted_wall_ms=52.5)
    reply["vcpus"][1].update(boosted_ms=10.0, boosted_wall_ms=10.0)
    assert policy_stats(reply)["uncharged_ms"] == 12.5


def _rec(config, host, p99, mx, *, wl="probe,probe", rep=0, ct=100, cpu=1000.0):
    g = {"min": 1.0, "avg": p99 / 3, "p50": p99 / 2, "p99": p99, "max": mx}
    return make_record(config, host, wl, rep, g, host_cyclictest={"min": 1, "avg": 10, "max": ct},
                       stress={"cpu": cpu, "vm": 10.0} if host == "busy" else None,
                       vcpu_runqlat={"all": {"count": 5, "avg": 1, "p50": 1, "p99": 3, "max": 9},
                                     "wakeup": {"count": 5, "avg": 1, "p50": 1, "p99": 3, "max": 9}},
                       policy={"boosts": 10, "throttles": 0, "bpf_ns_per_event": 800, "apply_latency_us": None}
                       if config == "pvsched" else None)


def _records():
    return [_rec("vanilla", "idle", 50, 900), _rec("vanilla", "busy", 4000, 12000, ct=2000),
            _rec("vanilla", "busy", 5000, 14000, rep=1, ct=2200), _rec("static-rt", "busy", 60, 700, ct=9000,
                                                                       cpu=800.0),
            _rec("static-nice", "busy", 900, 5000), _rec("pvsched", "busy", 62, 800, ct=2100, cpu=990.0),
            _rec("pvsched", "busy", 70, 900, wl="probe,busy", cpu=990.0),
            _rec("vanilla", "busy", 4000, 9000, wl="probe,busy", cpu=1000.0)]


def test_record_schema_and_validation():
    r = _rec("pvsched", "busy", 60, 700)
    assert list(r)[:3] == ["config", "host", "guest"]
    assert validate_record(r) == []
    json.dumps(r)  # serialisable as is
    assert validate_record({**r, "config": "qemu"})
    assert validate_record({**r, "guest": {"min": 5, "avg": 1, "p50": 9, "p99": 2, "max": 3}})


def test_summary_medians_spread_and_targets():
    rows = summarize(_records())
    van = next(r for r in rows if (r["config"], r["host"], r["workload"]) == ("vanilla", "busy", "probe,probe"))
    assert van["reps"] == 2 and van["guest.p99"] == {"median": 4500.0, "min": 4000, "max": 5000, "values": [4000, 5000]}
    assert rows[0]["workload"] == "probe,probe" and rows[-1]["workload"] == "probe,busy"
    t = {x["name"]: x for x in targets(rows)}
    assert t["busy pvsched guest p99 <= 1.1 x static-rt busy p99"]["ok"] is True  # 62 <= 66
    assert t["busy pvsched guest p99 <= 1.5 x vanilla idle p99"]["ok"] is True  # 62 <= 75
    assert t["busy pvsched guest p99 <= 1/5 x vanilla busy p99"]["ok"] is True
    assert t["busy pvsched guest max <= 1/10 x vanilla busy max"]["ok"] is True  # 800 <= 1300
    assert t["busy pvsched host stress-ng throughput >= 0.95 x vanilla"]["ok"] is True  # 0.995
    assert t["busy pvsched host cyclictest max <= 1.1 x vanilla"]["ok"] is True
    sr = next(r for r in rows if (r["config"], r["host"]) == ("static-rt", "busy"))
    assert sr["stress_rel"]["median"] == pytest.approx(0.9)  # (800/1000 + 10/10) / 2


def test_targets_miss_and_unmeasured():
    recs = [r for r in _records() if r["config"] != "static-rt"]
    recs.append(_rec("static-rt", "busy", 20, 700))
    t = {x["name"]: x for x in targets(summarize(recs))}
    assert t["busy pvsched guest p99 <= 1.1 x static-rt busy p99"]["ok"] is False
    only_idle = [_rec("vanilla", "idle", 50, 900)]
    assert all(x["ok"] is None for x in targets(summarize(only_idle)))


def _p99_cells(static, pv):
    """Busy probe rows of static-rt and pvsched with these guest p99s, one record per repetition."""
    return summarize([_rec("static-rt", "busy", v, 900, rep=i) for i, v in enumerate(static)]
                     + [_rec("pvsched", "busy", v, 900, rep=i) for i, v in enumerate(pv)])


P99_TARGET = "busy pvsched guest p99 <= 1.1 x static-rt busy p99"


def test_a_verdict_inside_the_repetitions_spread_is_not_resolved():
    """A real pair of busy cells (2026-12-06 18:22): PASS on the medians, but resampled the ratio crosses 1.1."""
    t = {x["name"]: x for x in targets(_p99_cells([255, 255, 265, 315, 360], [285, 245, 245, 365, 375]))}[P99_TARGET]
    assert t["ok"] is True and t["value"] == 285 and t["limit"] == pytest.approx(291.5)
    lo, hi = t["interval"]
    assert lo < 1 < hi and t["resolved"] is False
    line = next(x for x in report.target_lines(_p99_cells([255, 255, 265, 315, 360], [285, 245, 245, 365, 375]))
                if P99_TARGET in x)
    assert line.startswith("PASS") and line.endswith(", not resolved") and "0.978 x limit" in line


def test_a_verdict_outside_the_spread_is_resolved_either_way():
    ok = {x["name"]: x for x in targets(_p99_cells([300, 310, 320, 305, 315], [200, 210, 205, 215, 208]))}[P99_TARGET]
    assert ok["ok"] is True and ok["resolved"] is True and ok["interval"][1] < 1
    bad = {x["name"]: x for x in targets(_p99_cells([300, 310, 320, 305, 315], [500, 510, 490, 520, 505]))}[P99_TARGET]
    assert bad["ok"] is False and bad["resolved"] is True and bad["interval"][0] > 1
    assert not any(x.endswith("not resolved") for x in report.target_lines(
        _p99_cells([300, 310, 320, 305, 315], [500, 510, 490, 520, 505])) if P99_TARGET in x)


def test_the_interval_is_the_same_for_the_same_records_and_absent_for_one_repetition():
    cells = _p99_cells([255, 255, 265, 315, 360], [285, 245, 245, 365, 375])
    assert [x["interval"] for x in targets(cells)] == [x["interval"] for x in targets(cells)]
    one = {x["name"]: x for x in targets(_p99_cells([300], [290]))}[P99_TARGET]
    assert one["ok"] is True and one["interval"] is None and one["resolved"] is None
    assert resolve([1.0, 2.0], [0.0, 0.0], 1.1) is None  # a zero limit has no ratio


def test_a_linux_guest_run_is_judged_on_its_cyclictest_rows():
    """bench --guest linux: the same targets, on cyclictest's cells instead of n/a everywhere."""
    recs = [{**r, "workload": "cyclictest", "guest_kind": "linux"} for r in _records() if r["workload"] == "probe,probe"]
    t = {x["name"]: x for x in targets(summarize(recs))}
    assert t["busy pvsched guest p99 <= 1.1 x static-rt busy p99"]["ok"] is True  # 62 <= 66
    assert t["busy pvsched guest p99 <= 1/5 x vanilla busy p99"]["ok"] is True
    assert t["busy pvsched guest p99 <= 1/5 x vanilla busy p99"]["value"] == 62
    assert t["mixed guest (probe,busy): pvsched host throughput >= 0.95 x vanilla"]["ok"] is None  # not run


def test_table_targets_and_plot(tmp_path):
    rows = summarize(_records())
    md = report.markdown(rows, {"date": "today", "machine": "test box", "reps": 2, "duration_s": 5,
                                "interval_us": 1000})
    assert "| probe,probe | busy | vanilla | 2250 (2000-2500) | 4500 (4000-5000) | 13.0k (12.0k-14.0k) |" in md
    assert "PASS  busy pvsched guest p99 <= 1.1 x static-rt busy p99" in md
    assert "test box" in md
    png = report.plot(rows, tmp_path / "r.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10000


def test_plan_and_args():
    a = parse_args(["--quick"])
    assert (a.reps, a.duration) == (1, 2.0)
    assert parse_args([]).reps == 5 and parse_args(["--guest", "linux"]).reps == 3
    assert parse_args(["--reps", "2"]).reps == 2
    cells = plan(["vanilla", "pvsched"], ["idle", "busy", "mixed"], 2)
    assert len(cells) == 2 * (2 + 2 + 2)
    assert cells[0].rep == 0 and cells[-1].rep == 1
    assert {c.workload for c in cells if c.host == "idle"} == {"probe,probe"}
    with pytest.raises(SystemExit):
        parse_args(["--configs", "qemu"])


def test_variants_run_interleaved_and_get_their_own_rows_outside_the_targets(tmp_path):
    a = parse_args(["--variant", "bs5:backstop_ms=5,clock_ms=2", "--variant", "never:boost_on_halt=never"])
    assert a.variants == {"bs5": ["backstop_ms=5", "clock_ms=2"], "never": ["boost_on_halt=never"]}
    for bad in ("bs5", "bs5:", ":backstop_ms=5", "b s:x=1", "bs5:backstop_ms"):
        with pytest.raises(SystemExit):
            parse_args(["--variant", bad])
    for argv in (["--variant", "a:clock_ms=1", "--variant", "a:clock_ms=2"],  # the same name twice
                 ["--variant", "a:nosuch=1"], ["--variant", "a:backstop_ms=0"], ["--pvsched-set", "clock_ms=-1"]):
        with pytest.raises(SystemExit):
            parse_args(argv)
    cells = plan(["static-rt", "pvsched"], ["busy"], 2, ("bs5",))
    assert [c.label for c in cells] == ["static-rt", "pvsched", "pvsched bs5"] * 2  # interleaved per repetition
    recs = _records() + [{**_rec("pvsched", "busy", 900, 5000), "variant": "bs5"}]
    rows = summarize(recs)
    labels = [r["config"] for r in rows if (r["workload"], r["host"]) == ("probe,probe", "busy")]
    assert labels == ["vanilla", "static-rt", "static-nice", "pvsched", "pvsched bs5"]
    assert {x["name"]: x for x in targets(rows)} == {x["name"]: x for x in targets(summarize(_records()))}
    assert "| probe,probe | busy | pvsched bs5 | 450 |" in report.table(rows)
    assert report.plot(rows, tmp_path / "v.png").stat().st_size > 10000


def test_report_only_regenerates_outputs(tmp_path, capsys):
    (tmp_path / "results.json").write_text(json.dumps(_records()))
    assert main(["--report-only", "--out", str(tmp_path)]) == 0
    assert (tmp_path / "results.md").exists() and (tmp_path / "results.png").exists()
    assert "PASS" in capsys.readouterr().out
    assert main(["--report-only", "--out", str(tmp_path / "nope")]) == 2


def test_runqlat_percentiles_never_exceed_the_reported_max():
    """A max of 3721.017 us is reported as 3721.0: the p99 of its bucket must not come out above it."""
    from pyvmm.bench import runqlat

    n = runqlat.const("RUNQLAT_NR_BUCKETS")
    i = next(k for k in range(n) if runqlat.bucket_bounds_us(k)[0] <= 3721.017 < runqlat.bucket_bounds_us(k)[1])
    buckets = [0] * n
    buckets[10], buckets[i] = 98, 2
    s = runqlat.summarize(100, 100 * 50_000, 3_721_017, buckets)
    assert s["max"] == 3721.0
    assert s["p50"] <= s["p99"] <= s["max"]


def test_host_cpu_split_relative_load_table_and_targets():
    def with_cpu(rec, vcpus, vmm, policy, load):
        return {**rec, "cpu": {"window_s": 5.0, "vcpus": vcpus, "vmm": vmm, "policy": policy, "host_load": load,
                               "steal": 0.002}}

    recs = [with_cpu(_rec("vanilla", "busy", 4000, 12000), 0.17, 0.175, 0.0, 1.70),
            with_cpu(_rec("vanilla", "busy", 4000, 12000, rep=1), 0.17, 0.175, 0.0, 1.72),
            with_cpu(_rec("pvsched", "busy", 62, 800), 0.23, 0.26, 0.02, 1.62),
            with_cpu(_rec("static-rt", "busy", 60, 700), 0.22, 0.225, 0.0, 1.50)]
    rows = summarize(recs)
    pv = next(r for r in rows if r["config"] == "pvsched")
    assert pv["host_load_rel"]["median"] == pytest.approx(1.62 / 1.71, abs=1e-4)
    assert pv["cpu.vmm_other"]["median"] == pytest.approx(0.01)  # the VMM minus its vCPUs and the policy process
    t = {x["name"]: x for x in targets(rows)}
    assert t["busy pvsched host load CPU time >= 0.95 x vanilla"]["ok"] is False  # 0.947
    table = report.cpu_table(rows)
    assert "| probe,probe | busy | pvsched | - | 0.230 | 0.010 | 0.020 | 1.620 | 0.947 | 1.000 | 10 |" in table
    assert "host load CPU time" in report.markdown(rows, {})
    assert report.cpu_table(summarize(_records())) == ""  # records without CPU figures: no table


def test_max_targets_on_runs_without_hypervisor_steal():
    # a pvsched run hit by a 40 ms hypervisor stall has a 41 ms max; the calm runs show what the scheduling did
    def with_steal(rec, steal_cpus):
        return {**rec, "cpu": {"window_s": 5.0, "vcpus": 0.2, "vmm": 0.2, "host_load": 1.6, "steal": steal_cpus}}

    recs = [with_steal(_rec("vanilla", "busy", 4000, 20000), 0.0), with_steal(_rec("vanilla", "busy", 4000, 18000, rep=1), 0.0),
            with_steal(_rec("pvsched", "busy", 200, 41000), 0.008), with_steal(_rec("pvsched", "busy", 200, 41000, rep=1), 0.004),
            with_steal(_rec("pvsched", "busy", 200, 900, rep=2), 0.0)]
    t = {x["name"]: x for x in targets(summarize(recs))}
    assert t["busy pvsched guest max <= 1/10 x vanilla busy max"]["ok"] is False  # median 41 ms
    calm = t["busy pvsched guest max <= 1/10 x vanilla busy max, runs without steal"]
    assert (calm["value"], calm["limit"], calm["ok"]) == (900, 1900, True)
    # no calm run at all: not measurable, never a pass
    noisy = [r for r in recs if r["config"] == "vanilla"] + recs[2:4]
    t = {x["name"]: x for x in targets(summarize(noisy))}
    assert t["busy pvsched guest max <= 1/10 x vanilla busy max, runs without steal"]["ok"] is None


def test_cyclictest_summary_takes_the_guest_computed_percentiles_and_refuses_a_failed_run():
    from pyvmm.bench.results import cyclictest_summary

    rec = {"type": "cyclictest", "rc": 0,
           "summary": {"min": 40, "avg": 120.5, "p50": 100, "p99": 900, "max": 4000, "samples": 3990, "overflows": 2},
           "result": {"thread": {"0": {"cpu": 0, "cycles": 1995}, "1": {"cpu": 1, "cycles": 1995}}}}
    s = cyclictest_summary([{"type": "boot"}, rec])
    assert (s["min"], s["p50"], s["p99"], s["max"], s["samples"], s["vcpus"]) == (40, 100, 900, 4000, 3990, [0, 1])
    assert cyclictest_summary([{**rec, "rc": 1}]) is None
    assert cyclictest_summary([{"type": "cyclictest", "rc": 0, "summary": None, "result": None}]) is None


def test_linux_bench_plans_cyclictest_on_the_idle_and_busy_host_only():
    from pyvmm.bench import run as bench

    a = bench.parse_args(["--guest", "linux", "--quick"])
    assert a.groups == ["idle", "busy"]
    cells = bench.plan(a.configs, a.groups, a.reps, (), a.guest)
    assert {c.workload for c in cells} == {"cyclictest"} and len(cells) == 8


def _lock_rec(vcpu: int, acq: int, counts: list[int], mx: float, irqs_in_hold: int = 40, p50: float = 0.5,
              p99: float = 0.9) -> dict:
    return {"type": "latency", "vcpu": vcpu, "phase": 0, "workload": "lock", "policy": "other", "prio": 0,
            "lock_hold_us": 5, "lock_gap_us": 5, "lock_tick_us": 4000, "ms": 1000, "acquisitions": acq,
            "acq_per_s": acq, "violations": 0, "flag_lost": 0, "irqs": 250, "irqs_in_hold": irqs_in_hold,
            "irqs_nested": 0, "samples": acq, "missed": 0, "min": 0.0, "avg": 0.5, "p50": p50, "p99": p99,
            "max": mx, "hist": {"bucket_us": 1, "counts": counts, "overflow": 0}}


def test_lock_group_plans_both_hosts_and_passes_its_guest_keys():
    from pyvmm.bench.run import lock_cmdline

    a = parse_args(["--groups", "lock", "--lock-hold-us", "2"])
    cells = plan(a.configs, a.groups, 1)
    assert [(c.workload, c.host) for c in cells] == [("lock,lock", "idle")] * 4 + [("lock,lock", "busy")] * 4
    assert [c.config for c in cells[:4]] == ["vanilla", "static-rt", "static-nice", "pvsched"]
    assert lock_cmdline(a) == "lock_hold_us=2" and lock_cmdline(parse_args([])) == ""
    assert "lock" in parse_args([]).groups  # part of the whole benchmark
    argv = boot_argv(RunSpec("vanilla", "lock,lock", 1, 1000, guest_keys="lock_hold_us=2 lock_gap_us=0"), 60)
    assert "duration=1 interval=1000 workload=lock,lock lock_hold_us=2 lock_gap_us=0" in argv
    for bad in (["--lock-gap-us", "-1"], ["--lock-hold-us", "100001"], ["--guest", "linux", "--groups", "lock"]):
        with pytest.raises(SystemExit):
            parse_args(bad)


def test_lock_records_merge_the_waits_and_sum_the_rates():
    from pyvmm.bench.results import lock_summary

    recs = [{"type": "pvsched", "status": "active"}, _lock_rec(0, 90_000, [89_000, 1000], 1.9, p50=0.4, p99=1.5),
            _lock_rec(1, 80_000, [80_000], 0.9, irqs_in_hold=60, p50=0.3, p99=0.8), probe(0, 40.0, 90.0)]
    g = guest_summary(recs, "lock")
    assert (g["samples"], g["max"], g["vcpus"]) == (170_000, 1.9, [0, 1])
    # 169k of 170k waits below 1 us: the merged buckets give 1 us, which the vCPUs' own percentiles bound
    assert g["p50"] == 0.4 and g["p99"] == 1.0
    assert guest_summary(recs)["max"] == 90.0  # the probe's record, not the lock's
    s = lock_summary(recs)
    assert (s["acq_per_s"], s["acquisitions"], s["irqs_in_hold"], s["violations"], s["vcpus"]) == (170_000, 170_000, 100, 0, 2)
    assert (s["hold_us"], s["gap_us"], s["tick_us"]) == (5, 5, 4000)
    assert lock_summary([probe(0, 40.0, 90.0)]) is None


def test_lock_rows_get_their_table_and_their_own_targets(tmp_path):
    def lock_cell(config, host, p99, mx, rate, rep=0):
        rec = _rec(config, host, p99, mx, wl="lock,lock", rep=rep)
        rec["guest"] = {"min": 0.0, "avg": 1.0, "p50": 0.5, "p99": p99, "max": mx}
        return {**rec, "lock_acq_per_s": rate, "lock": {"acq_per_s": rate, "irqs_in_hold": 200}}

    locks = [lock_cell("vanilla", "busy", 900.0, 9000.0, 120_000), lock_cell("vanilla", "busy", 700.0, 8000.0, 130_000, 1),
             lock_cell("pvsched", "busy", 3.0, 500.0, 160_000), lock_cell("vanilla", "idle", 1.0, 300.0, 170_000)]
    rows = summarize(_records() + locks)
    # the probe's targets do not move; the lock lines judge the lock rows (no static-rt row here: n/a)
    probe_only = {x["name"]: x for x in targets(summarize(_records())) if not x["name"].startswith("lock")}
    got = {x["name"]: x for x in targets(rows)}
    assert {k: v for k, v in got.items() if not k.startswith("lock")} == probe_only
    assert got["lock guest: busy pvsched wait p99 <= 1/10 x vanilla busy"] == {
        "name": "lock guest: busy pvsched wait p99 <= 1/10 x vanilla busy", "value": 3.0, "limit": 80.0, "ok": True,
        "interval": None, "resolved": None}  # one pvsched repetition: nothing to resample
    assert got["lock guest: busy pvsched acquisitions/s >= 0.9 x static-rt"]["ok"] is None
    assert got["lock guest: busy pvsched throttles == 0"]["ok"] is True
    van = next(r for r in rows if (r["workload"], r["host"], r["config"]) == ("lock,lock", "busy", "vanilla"))
    assert van["lock_acq_per_s"] == {"median": 125_000, "min": 120_000, "max": 130_000, "values": [120_000, 130_000]}
    table = report.lock_table(rows)
    assert "| busy | vanilla | 1.00 | 0.50 | 800.0 (700.0-900.0) | 8500 (8000-9000) | 125.0k (120.0k-130.0k) | 200 | - | 2 |" \
        in table
    assert "| busy | pvsched | 1.00 | 0.50 | 3.0 | 500 | 160.0k | 200 | 10 / 0 | 1 |" in table
    md = report.markdown(rows, {})
    assert "acquisition wait" in md and table in md
    assert "| lock,lock | busy | vanilla |" in report.table(rows)  # and the host-cost columns as every group
    assert report.lock_table(summarize(_records())) == ""
    assert report.plot(rows, tmp_path / "l.png").stat().st_size > 10000


def test_the_cost_of_a_vmm_switch_is_derived_from_the_counters_and_the_fast_path():
    from pyvmm.bench import switchcost

    prog = {"runs": 1000, "ns_per_run": 100.0}
    # 1000 runs at 100 ns: 900 fast ones at 50 ns, so the 100 that involved the VMM took 550 ns each
    assert switchcost.vmm_switch_ns(prog, 100, 50.0) == 550.0
    assert switchcost.vmm_switch_ns(prog, 0, 50.0) is None  # no run went past the tgid check
    assert switchcost.vmm_switch_ns(prog, 2000, 50.0) is None  # counters that cannot be
    assert switchcost.vmm_switch_ns(prog, 100, None) is None and switchcost.vmm_switch_ns(None, 100, 50.0) is None
    reply = {"programs": [{"name": "pvs_switch", "run_cnt": 1000, "avg_ns": 100.0, "status": "attached"}],
             "stats": {"switch_vmm": {"value": 100, "description": "..."}}}
    pol = policy_stats(reply)
    assert pol["switch_vmm"] == 100
    recs = [{"config": "pvsched", "policy": pol}, {"config": "vanilla", "policy": None}]
    cost = {"programs": {"pvs_switch": {"runs": 60000, "ns_per_run": 50.0}, "pvs_wakeup": {"runs": 30000,
                                                                                            "ns_per_run": 20.0}},
            "floor": {"pvs_switch": {"runs": 60000, "ns_per_run": 45.0}, "pvs_wakeup": {"runs": 30000,
                                                                                      "ns_per_run": 18.0}},
            "ns_per_host_switch": 70.0, "round_trip_ns": {"off": 9000, "on": 9150, "floor": 9100},
            "added_ns_per_switch": 75.0}
    switchcost.annotate(recs, cost)
    assert recs[0]["policy"]["switch_vmm_ns"] == 550.0
    rows = [{"workload": "probe,probe", "host": "idle", "config": "pvsched", "policy.switch_vmm_ns": {"median": 550.0}}]
    lines = report.switch_cost_lines(rows, {"switch_cost": cost})
    assert "without a VM thread: 70 ns (pvs_switch 50 + pvs_wakeup 20 ns per run" in lines[0]
    assert "+75 ns per switch" in lines[0]
    assert "do nothing: 45 + 18 ns per run (round trip 9100 ns)" in lines[1]
    assert lines[2].endswith("probe,probe idle pvsched: 550 ns")
    assert report.switch_cost_lines([], {}) == []


def test_vm_counts_and_the_scale_targets():
    from pyvmm.bench import scale
    from pyvmm.bench.run import parse_args

    assert parse_args(["--vms", "16,1,4,4"]).vms == [1, 4, 16]
    for bad in ("0", "1,x", str(scale.MAX_VMS + 1), ""):
        with pytest.raises(SystemExit) as e:
            parse_args(["--vms", bad])
        assert e.value.code == 2
    point = {"vms": 1, "switch_programs": 1, "switch_ns_non_vcpu": 90.0, "switch_ns_vcpu": 900.0, "policy_cpus": 0.01, "vmm_cpus": 0.02,
             "vmm_rss_mib": 30.0, "policy_rss_mib": 40.0, "rss_mib": 70.0, "pss_mib": 55.0, "locked_mib": 50.0, "probe_p99_us": 300}
    many = dict(point, vms=16, switch_ns_non_vcpu=1500.0)
    lines = scale.targets([point, many])
    assert lines[0].startswith("MISS") and "worst 1500 ns" in lines[0]
    assert lines[1].startswith("MISS") and "(worst 70 MiB; proportional" in lines[1] and "55 MiB)" in lines[1]
    assert lines[2].startswith("PASS")
    assert scale.targets([point])[0].startswith("PASS")
    # with the floor measured, the line says what programs that do nothing cost on the same tracepoints
    assert scale.targets([point, many], 140.0)[0].endswith("(worst 1500 ns; programs that do nothing on the same "
                                                           "tracepoints: 140 ns)")
    assert "| 16 | 1 | 1500 | 900 |" in scale.table([point, many])
    # a vCPU switch: pvs_switch past the tgid lookup (its runs less the fast path's, over those that went past)
    pol = {"programs": [{"name": "pvs_switch", "run_cnt": 1000, "avg_ns": 100.0}], "stats": {"switch_vmm": 100}}
    assert scale._vcpu_switch_ns(pol, 50.0) == round((1000 * 100 - 900 * 50) / 100, 1)
    assert scale._vcpu_switch_ns({}, 50.0) is None
    # the host's one program counts every VM's vCPU switches: the other VMs' counters join the probe's
    assert scale._vcpu_switch_ns(pol, 50.0, 100) == round((1000 * 100 - 800 * 50) / 200, 1)


def test_the_qemu_peer_can_be_left_out():
    from pyvmm.bench.run import parse_args

    assert parse_args(["--guest", "linux", "--no-peer"]).no_peer
    assert not parse_args(["--guest", "linux"]).no_peer


def test_an_output_folder_given_relative_is_handed_on_absolute(tmp_path, monkeypatch) -> None:
    """`pyvmm bench --vms` passes its log folder to VMs that run with cwd "/": a relative one (the default
    bench-out) made every VM fail at --stats-out."""
    from pyvmm.common.safe_fs import make_output_dir

    monkeypatch.chdir(tmp_path)
    out = make_output_dir("bench-out/scale-logs")
    assert out.is_absolute() and out == tmp_path / "bench-out" / "scale-logs" and out.is_dir()
