"""Pure C of the test guest (command line, latency statistics, JSON text), built for the host and checked."""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

ROOT = Path(__file__).resolve().parents[2]
GUEST = ROOT / "pyvmm" / "guest" / "testguest"


@pytest.fixture(scope="module")
def harness(tmp_path_factory) -> Path:
    """The guest's cmdline.c/stats.c/fmt.c linked with unit_harness.c for this host."""
    exe = tmp_path_factory.mktemp("tg") / "unit_harness"
    srcs = [Path(__file__).with_name("unit_harness.c")] + [GUEST / f for f in ("cmdline.c", "stats.c", "fmt.c")]
    subprocess.run(["gcc", "-O2", "-Wall", "-Wextra", "-Werror", "-DTG_HOST_TEST", f"-I{GUEST}",
                    f"-I{ROOT / 'pyvmm' / 'abi'}", "-o", str(exe), *map(str, srcs)], check=True)
    return exe


def parse(harness: Path, cmdline: str, nr_vcpus: int = 2) -> dict:
    out = subprocess.run([str(harness), "cmdline", str(nr_vcpus), cmdline], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def test_cmdline_defaults(harness):
    c = parse(harness, "", 2)
    assert c["rc"] == 0
    assert (c["duration_ms"], c["interval_us"]) == (5000, 1000)
    assert (c["probe_policy"], c["probe_prio"], c["hog_prio"]) == (2, 8, 99)  # SCHED_RR 8, hog FIFO 99
    assert (c["pvsched"], c["version"], c["features"], c["force_features"]) == (1, 0x10000, 0x1F, 0)
    assert c["timer_oneshot"] == 0
    assert c["workload"] == ["probe", "probe"]


def test_cmdline_every_key(harness):
    c = parse(harness, "  duration=1.25 interval=250\tworkload=probe+busy,hog+idle+probe probe_policy=fifo "
                       "probe_prio=12 hog_prio=40 busy_nice=-7 pvsched_version=0x10001 pvsched_features=1f pvsched=0 timer=oneshot ", 2)
    assert c["rc"] == 0
    assert (c["duration_ms"], c["interval_us"]) == (1250, 250)
    assert c["workload"] == ["probe+busy", "hog+idle+probe"]
    assert (c["probe_policy"], c["probe_prio"], c["hog_prio"]) == (1, 12, 40)
    assert (c["version"], c["features"], c["force_features"], c["pvsched"]) == (0x10001, 0x1F, 1, 0)
    assert c["timer_oneshot"] == 1 and c["busy_nice"] == -7
    assert parse(harness, "busy_nice=19")["busy_nice"] == 19
    assert parse(harness, "")["tick_us"] == 200 and parse(harness, "tick_us=0")["tick_us"] == 0
    assert parse(harness, "workload=probe,tick tick_us=350", 2)["workload"] == ["probe", "tick"]


def test_cmdline_remote_wakeup_workloads(harness):
    assert parse(harness, "workload=waker,wakee+idle", 2)["workload"] == ["waker", "wakee+idle"]


def test_cmdline_last_workload_repeats(harness):
    assert parse(harness, "workload=probe,busy", 4)["workload"] == ["probe", "busy", "busy", "busy"]
    assert parse(harness, "workload=hog", 3)["workload"] == ["hog"] * 3


def test_cmdline_unknown_key_is_a_warning(harness):
    c = parse(harness, "durration=1 duration=2")
    assert c["rc"] == 1 and "durration" in c["warning"]
    assert c["duration_ms"] == 2000


@pytest.mark.parametrize("bad", [
    "duration=0", "duration=1.2345", "duration=-1", "duration=", "duration=3601",
    "interval=10", "interval=x", "interval=1000001",
    "workload=probe,busy,hog", "workload=probe+", "workload=", "workload=probe,", "workload=fast",
    "workload=probe+probe+probe+probe+probe+probe+probe+probe+probe",
    "probe_prio=0", "probe_prio=100", "hog_prio=abc", "probe_policy=deadline", "busy_nice=20", "busy_nice=-21", "busy_nice=-", "tick_us=-1",
    "pvsched_version=xyz", "pvsched_features=0x123456789", "pvsched=2", "noequals", "timer=hpet",
])
def test_cmdline_bad_values_are_errors(harness, bad):
    c = parse(harness, f"duration=1 {bad}", 2)
    assert c["rc"] == -1 and c["error"], c


def run_stats(harness: Path, values: list[int]) -> dict:
    out = subprocess.run([str(harness), "stats"], input=" ".join(map(str, values)), capture_output=True,
                         text=True, check=True)
    return json.loads(out.stdout)


def nearest_rank(sorted_vals: list[int], p: float) -> int:
    return sorted_vals[max(1, math.ceil(round(len(sorted_vals) * p, 6))) - 1]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=20_000_000), min_size=1, max_size=3000))
def test_stats_match_a_reference(harness, values):
    s = run_stats(harness, values)
    v = sorted(values)

    def us(ns: int) -> float:
        return round(ns / 1000, 3)

    assert s["samples"] == len(v) and s["missed"] == 0
    assert s["min"] == us(v[0]) and s["max"] == us(v[-1])
    assert s["max_at"] == values.index(v[-1])  # when in the run the max happened
    assert s["avg"] == us(sum(v) // len(v))
    for key, p in (("p50", 0.5), ("p90", 0.9), ("p99", 0.99), ("p999", 0.999)):
        assert s[key] == us(nearest_rank(v, p)), key
    h = s["hist"]
    width = h["bucket_us"] * 1000
    assert h["bucket_us"] in {d * m for d in (1, 10, 100, 1000, 10000, 100000) for m in (1, 2, 5)}
    assert len(h["counts"]) <= 200
    assert sum(h["counts"]) + h["overflow"] == len(v)
    for i, c in enumerate(h["counts"]):
        assert c == sum(1 for x in v if i * width <= x < (i + 1) * width)
    # The width keeps p99 within the first 100 buckets, and no narrower width would.
    assert nearest_rank(v, 0.99) < 100 * width


def test_stats_keeps_min_avg_max_of_dropped_samples(harness):
    out = subprocess.run([str(harness), "stats"], input="5000 1000 9000", capture_output=True, text=True,
                         check=True, env={"CAP": "1"})
    s = json.loads(out.stdout)
    assert s["samples"] == 1 and s["dropped"] == 2
    assert (s["min"], s["avg"], s["max"]) == (1.0, 5.0, 9.0)
    assert s["max_at"] == 2  # a dropped sample still counts in the index


@pytest.mark.parametrize("ns,text", [(0, "0.000"), (12, "0.012"), (12345, "12.345"), (1_000_000, "1000.000"),
                                     (2**64 - 1, "18446744073709551.615")])
def test_microseconds_with_three_decimals(harness, ns, text):
    out = subprocess.run([str(harness), "us3", str(ns)], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == text


def test_json_strings_are_escaped(harness):
    raw = 'a"b\\c\n\x01\x7f'
    out = subprocess.run([str(harness), "jstr", raw], capture_output=True, text=True, check=True).stdout.strip()
    assert json.loads(out) == raw
