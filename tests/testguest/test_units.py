"""Pure C of the test guest (command line, latency statistics, JSON text), built for the host and checked."""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pyvmm.abi import C

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


@pytest.fixture(scope="module")
def lock_harness(tmp_path_factory) -> Path:
    """critsec.h (the lock workload's lock, its CPL3 slot mark, the kernel's interrupt-time writes) on host threads."""
    exe = tmp_path_factory.mktemp("tg") / "lock_harness"
    subprocess.run(["gcc", "-O2", "-Wall", "-Wextra", "-Werror", "-pthread", f"-I{GUEST}", f"-I{ROOT / 'pyvmm' / 'abi'}",
                    "-o", str(exe), str(Path(__file__).with_name("lock_harness.c"))], check=True)
    return exe


def parse(harness: Path, cmdline: str, nr_vcpus: int = 2) -> dict:
    out = subprocess.run([str(harness), "cmdline", str(nr_vcpus), cmdline], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def test_cmdline_defaults(harness):
    c = parse(harness, "", 2)
    assert c["rc"] == 0
    assert (c["duration_ms"], c["interval_us"]) == (5000, 1000)
    assert (c["probe_policy"], c["probe_prio"], c["hog_prio"]) == (2, 8, 99)  # SCHED_RR 8, hog FIFO 99
    # the test guest asks for every feature it implements: today, all the header defines
    assert (c["pvsched"], c["version"], c["features"], c["force_features"]) == (1, 0x10000, C.PVSCHED_F_ALL, 0)
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


def test_cmdline_lock_workload_and_its_keys(harness):
    c = parse(harness, "workload=lock,lock+idle", 2)
    assert c["rc"] == 0 and c["workload"] == ["lock", "lock+idle"]
    assert (c["lock_hold_us"], c["lock_gap_us"], c["lock_tick_us"]) == (5, 5, 4000)  # a few us held, a 250 Hz tick
    c = parse(harness, "workload=lock lock_hold_us=0 lock_gap_us=100000 lock_tick_us=0", 3)
    assert c["workload"] == ["lock"] * 3
    assert (c["lock_hold_us"], c["lock_gap_us"], c["lock_tick_us"]) == (0, 100000, 0)
    assert parse(harness, "lock_tick_us=100")["lock_tick_us"] == 100
    assert parse(harness, "")["lock_busy_us"] == 0  # contend all the time
    assert parse(harness, "lock_busy_us=200 interval=1000")["lock_busy_us"] == 200


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
    "lock_hold_us=100001", "lock_hold_us=-1", "lock_gap_us=x", "lock_gap_us=", "lock_tick_us=99", "lock_tick_us=1000001", "lock_busy_us=-1", "lock_busy_us=1000001",
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


PD, HARDIRQ = 8, 2  # PVSCHED_FLAG_PREEMPT_DISABLED, PVSCHED_FLAG_IN_HARDIRQ


def test_kernel_slot_write_nested_in_the_tasks_mark_keeps_the_seqcount_and_the_flag(lock_harness):
    """critsec.h's rule, step by step: an interrupt's writes keep PREEMPT_DISABLED, and inside the task's open
    mark (seq odd) they leave seq alone, so the task's closing increment ends both sections."""
    out = subprocess.run([str(lock_harness), "nest"], capture_output=True, text=True, check=True).stdout
    steps = {s["step"]: (s["seq"], s["flags"], s["extra"]) for s in json.loads(out)}
    assert steps["enter"] == (6, PD | HARDIRQ, PD)  # a section of its own; returns the kept bit, not nested
    assert steps["exit"][:2] == (8, PD)
    assert steps["unmark"][:2] == (10, 0)  # the task's mark: one section, flag word 0
    assert steps["nested_enter"] == (11, HARDIRQ, 1 << 16)  # nested: seq stays odd
    assert steps["nested_exit"][:2] == (11, 0)
    assert steps["close"][:2] == (12, PD)


@pytest.mark.parametrize("threads,hold,signals", [(2, 300, 1), (3, 0, 1), (2, 2000, 0)])
def test_lock_excludes_and_its_flag_is_set_exactly_while_held(lock_harness, threads, hold, signals):
    """Threads contend the lock while an observer reads the lock and every slot as the host does, and (signals)
    the threads are interrupted at random by the kernel's own interrupt-time writes."""
    cycles = 200_000
    out = subprocess.run([str(lock_harness), "race", str(threads), str(cycles), str(hold), str(signals)],
                         capture_output=True, text=True, check=True, timeout=60).stdout
    r = json.loads(out)
    # Mutual exclusion: every acquisition counted, and gen (bumped non-atomically inside the lock) lost nothing.
    assert r["acquisitions"] == threads * cycles and r["gen"] == 2 * r["acquisitions"], r
    assert r["violations"] == 0 and r["flag_lost"] == 0 and r["end_bad_slots"] == 0, r
    # The flag only ever on the holder's slot during its hold; never torn, never a stray flag, seq never back.
    assert r["free_with_pd"] == 0 and r["other_with_pd"] == 0 and r["bad_flags"] == 0 and r["backwards"] == 0, r
    assert r["looks"] > 1000 and r["held"] > 100, r
    # ... and on it from the mark to the unmark: the holder checks that at each release (flag_lost above), and the
    # observer sees it (not in every look at a hold: the host may preempt a holder right next to its mark)
    assert r["held_pd"] > 0, r
    if signals:
        assert r["irqs"] > 0, r
