"""One tiny real `pyvmm bench` run: vanilla and static RT on an idle host, 1 s each (real KVM, real BPF)."""

from __future__ import annotations

import importlib.util
import json
import os

import pytest

from pyvmm.bench.results import validate_record
from pyvmm.bench.run import main, thp_mode

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0 or not os.path.exists("/dev/kvm"), reason="needs root and /dev/kvm"),
    pytest.mark.skipif(importlib.util.find_spec("pyvmm.cli") is None, reason="the VMM's CLI (pyvmm/cli/) is not there"),
]


def test_tiny_bench_writes_schema_records_table_and_plot(tmp_path, capsys):
    before = thp_mode()
    other = [] if before is None else ["--thp", "never" if before != "never" else "madvise"]
    rc = main(["--out", str(tmp_path), "--configs", "vanilla,static-rt", "--groups", "idle", "--reps", "1",
               "--duration", "1", *other])
    assert rc == 0, capsys.readouterr().err[-2000:]
    if other:  # the run's THP mode is recorded and said, and the host's is back
        assert thp_mode() == before
        assert json.loads((tmp_path / "meta.json").read_text())["thp"] == other[1]
        assert f"Host transparent huge pages: {other[1]}." in (tmp_path / "results.md").read_text()
    records = json.loads((tmp_path / "results.json").read_text())
    assert [r["config"] for r in records] == ["vanilla", "static-rt"]
    for r in records:
        assert validate_record(r) == [], r
        assert r["host"] == "idle" and r["guest_samples"] > 100  # 1 s at 1000 us on two vCPUs
        assert r["host_cyclictest"]["samples"] > 0 and r["host_cyclictest"]["p99"] <= r["host_cyclictest"]["max"]
        assert r["vcpu_runqlat"]["wakeup"]["count"] > 0  # the halted vCPUs were woken by their timer
    # static RT really ran the vCPU threads at SCHED_FIFO 10; vanilla left them at SCHED_OTHER
    assert set(records[1]["vcpu_sched"].values()) == {"fifo:10"}
    assert all(v.startswith("other") for v in records[0]["vcpu_sched"].values())
    md = (tmp_path / "results.md").read_text()
    assert "| probe,probe | idle | static-rt |" in md
    assert (tmp_path / "results.png").read_bytes()[:4] == b"\x89PNG"
