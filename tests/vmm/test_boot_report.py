"""`pyvmm boot`'s human lines (pyvmm.cli.boot_report) and the console splitter that feeds them (pyvmm.vmm.console).

The records are from real boots of the test guest (`pyvmm boot --stats-out ... <boot>`, each case's "boot"
giving its options and command line), with the latency histograms and the device fields the report
does not read left out.
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pyvmm.cli.boot_report import device_pvsched_line, end_lines, live_line, vcpu_lines
from pyvmm.vmm.console import MAX_RECORD_LINE, RecordSplitter, parse_records, record_lines

CASES = json.loads((Path(__file__).parent / "boot_report_records.json").read_text())
FEATURES = "critical_sections,task_params,host_feedback,wake_hint,rt_waiter"


def case(name: str) -> tuple[list[dict], dict]:
    c = CASES[name]
    return copy.deepcopy(c["records"]), copy.deepcopy(c["device_stats"])


def live(records: list[dict]) -> list[str]:
    return [line for r in records if (line := live_line(r)) is not None]


def test_default_boot_gives_config_and_negotiation_live_then_one_line_per_vcpu():
    recs, stats = case("default")
    assert live(recs) == [
        "guest: 2 vCPUs, 1 s, interval 1000 us, workload probe,probe, timer tsc-deadline",
        f"pvsched: active, version 1.0, features {FEATURES}",
    ]
    assert end_lines(recs, stats) == [
        ("vCPU 0  probe  p50   210.0 us  p99  6856.6 us  max 49757.1 us  (756 samples, 244 missed)  |  "
         "boosts 2, throttles 1, boosted 188.0 ms"),
        ("vCPU 1  probe  p50   162.1 us  p99  8354.7 us  max 49465.9 us  (769 samples, 231 missed)  |  "
         "boosts 2, throttles 1, boosted 192.3 ms"),
    ]


def test_host_counts_come_from_the_device_at_stop_else_from_the_guest_host_record():
    recs, stats = case("default")
    stats["pvsched"]["device"]["vcpus"][0]["host"].update(boosts=5, boosted_ns=250_000_000)
    line0 = vcpu_lines(recs, stats)[0]
    assert line0.endswith("boosts 5, throttles 1, boosted 250.0 ms")   # the device's view wins
    line0 = vcpu_lines(recs, {})[0]
    assert line0.endswith("boosts 2, throttles 1, boosted 188.0 ms")   # the guest's {"type":"host"} record


def test_phases_and_workloads_without_latency():
    recs, stats = case("mixed")
    lines = end_lines(recs, stats)
    assert len(lines) == 2
    assert lines[0].startswith("vCPU 0  probe+busy  p50   149.1 us  p99  7820.2 us  max 11179.9 us")
    assert lines[1] == "vCPU 1  hog         no latency measured  |  boosts 8, throttles 7, boosted 229.0 ms"


def test_waker_and_wakee_each_get_their_latency():
    recs, stats = case("waker")
    lines = end_lines(recs, stats)
    assert [ln.split()[:3] for ln in lines] == [["vCPU", "0", "waker"], ["vCPU", "1", "wakee"]]
    assert "max  7658.7 us" in lines[1] and "boosts 4, throttles 4" in lines[0]


def test_no_policy_says_so_instead_of_zero_boosts():
    recs, stats = case("nopolicy")
    assert all(ln.endswith("|  no host policy") for ln in end_lines(recs, stats))
    assert live(recs)[1] == f"pvsched: active, version 1.0, features {FEATURES}"


@pytest.mark.parametrize("name, words", [
    ("nopv", "pvsched: off, the guest found no pvsched device"),
    ("pv0", "pvsched: off, the guest was told not to use it (pvsched=0)"),
    ("refused", ("pvsched: off, refused by the device: BAD_FEATURE (the guest asked for features the device does "
                 f"not offer); the guest asked version 1.0, features unknown:0x20; the device offers version 1.0, "
                 f"features {FEATURES}")),
    ("badver", ("pvsched: off, refused by the device: BAD_VERSION (the device does not speak the guest's version); "
                f"the guest asked version 1.0, features {FEATURES}; the device offers version 2.0, "
                f"features {FEATURES}")),
])
def test_pvsched_off_says_why_and_vcpu_lines_have_no_host_counts(name, words):
    recs, stats = case(name)
    assert words in live(recs)
    lines = end_lines(recs, stats)
    assert len(lines) == 2 and all("p50" in ln and "p99" in ln and "max" in ln for ln in lines)
    assert not any("boosts" in ln for ln in lines)


def test_guest_warning_and_error_are_shown_live():
    recs, _ = case("unknown")
    assert "guest warning: ignoring unknown key: 'foo'" in live(recs)
    recs, stats = case("badcmd")
    assert live(recs) == ["guest error: bad value: 'duration=abc' (exit 2)"]
    # no pvsched record came (the guest stopped first): the device tells the negotiation at the end
    assert end_lines(recs, stats) == ["pvsched: off, the guest never enabled the device"]


def test_a_guest_without_records_gets_the_negotiation_from_the_device():
    """A Linux guest (or any ELF) prints no pvsched record: the device's state at the end says it."""
    _, stats = case("default")
    lines = end_lines([], stats)
    assert lines[0] == f"pvsched: active, version 1.0, features {FEATURES}"
    assert lines[1:] == ["vCPU 0  boosts 2, throttles 1, boosted 188.0 ms", "vCPU 1  boosts 2, throttles 1, boosted 192.3 ms"]
    dev = case("refused")[1]["pvsched"]["device"]
    assert device_pvsched_line(dev).startswith("pvsched: off, refused by the device: BAD_FEATURE")
    assert end_lines([], {}) == []   # no device, no records: nothing to say


JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
                    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=6), c, max_size=3),
                    max_leaves=8)
FIELDS = st.sampled_from(["vcpu", "phase", "workload", "p50", "p99", "max", "samples", "missed", "status", "reason",
                          "version", "features", "host_version", "host_features", "vcpus", "duration_ms", "message",
                          "exit", "boosts", "throttles", "boosted_us", "interval_us", "timer"])
RECORD = st.builds(lambda t, kv: {"type": t, **kv},
                   st.sampled_from(["config", "pvsched", "latency", "workload", "host", "warning", "error", "done", "x"]),
                   st.dictionaries(FIELDS, JSON, max_size=8))


@settings(max_examples=300, deadline=None)
@given(st.lists(RECORD, max_size=6))
def test_any_record_a_guest_prints_gives_lines_never_an_exception(recs):
    """Records are guest output: the report runs on the vCPU threads' console path and must not raise."""
    for r in recs:
        line = live_line(r)
        assert line is None or isinstance(line, str)
    assert all(isinstance(ln, str) for ln in end_lines(recs, case("default")[1]))


def console_text(name: str) -> str:
    return "pvsched-testguest: booting\n" + "".join(json.dumps(r, separators=(",", ":")) + "\n"
                                                     for r in CASES[name]["records"])


def run_splitter(chunks: list[bytes], flush_each: bool) -> tuple[list[tuple[bytes, dict]], list[bytes]]:
    recs: list[tuple[bytes, dict]] = []
    text: list[bytes] = []
    s = RecordSplitter(lambda line, rec: recs.append((line, rec)), text.append)
    for c in chunks:
        s.write(c)
        if flush_each:
            s.flush()
    s.finish()
    return recs, text


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(min_value=1, max_value=400), min_size=1, max_size=40), st.booleans())
def test_splitter_finds_the_same_records_as_parse_records_however_the_console_is_cut(cuts, flush_each):
    raw = (console_text("mixed") + "a prompt> {not json\n  {\"no type\":1}\ntail without newline").encode()
    chunks, i = [], 0
    for n in cuts:
        chunks.append(raw[i:i + n])
        i += n
    chunks.append(raw[i:])
    recs, text = run_splitter(chunks, flush_each)
    assert [rec for _, rec in recs] == parse_records(raw.decode())
    assert [line.decode().strip() for line, _ in recs] == record_lines(raw.decode())
    # everything else reaches on_text, in order and whole
    others = b"".join(ln for ln in raw.splitlines(keepends=True) if parse_records(ln.decode()) == [])
    assert b"".join(text) == others


def test_splitter_passes_a_partial_line_at_flush_but_holds_one_that_may_be_a_record():
    recs, text = [], []
    s = RecordSplitter(lambda line, rec: recs.append(rec), text.append)
    s.write(b"ready\npartial")
    s.flush()
    assert text == [b"ready\n", b"partial"]          # a prompt shows while the guest waits
    s.write(b" more\n{\"type\":\"do")
    s.flush()
    assert text[-1] == b" more\n" and recs == []      # the record's beginning waits for its end
    s.write(b"ne\",\"status\":\"ok\"}\n")
    assert recs == [{"type": "done", "status": "ok"}] and len(text) == 3
    # a line that never ends is not held for ever: past MAX_RECORD_LINE it is text
    s.write(b"{" + b"x" * MAX_RECORD_LINE)
    s.flush()
    assert len(text) == 4 and len(text[-1]) == MAX_RECORD_LINE + 1
    s.write(b"}\n")
    assert recs == [{"type": "done", "status": "ok"}] and text[-1] == b"}\n"


def test_record_lines_are_the_lines_as_printed():
    text = console_text("default")
    lines = record_lines(text)
    assert len(lines) == len(CASES["default"]["records"]) and all(re.match(r'^\{"type":"', ln) for ln in lines)
    assert [json.loads(ln) for ln in lines] == parse_records(text)
