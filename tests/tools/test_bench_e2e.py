"""One tiny real `pyvmm bench` run: vanilla and static RT on an idle host, 1 s each (real KVM, real BPF)."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

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


def test_the_cost_curve_against_the_number_of_vms(tmp_path, capsys):
    """`pyvmm bench --vms 1,2`: each point boots its VMs with their policies, measures them, and ends them."""
    rc = main(["--out", str(tmp_path), "--vms", "2,1", "--duration", "2"])
    out = capsys.readouterr()
    assert rc == 0, out.err[-2000:]
    data = json.loads((tmp_path / "scale.json").read_text())
    points = data["points"]
    assert data["meta"]["floor_ns_per_host_switch"] > 0  # empty programs on the same tracepoints, measured once
    assert [p["vms"] for p in points] == [1, 2]  # in order, whatever the order given
    for p in points:
        # one set of programs per host, whatever the number of VMs
        assert p["switch_programs"] == 1, p
        assert p["switch_ns_non_vcpu"] > 0 and p["switch_ns_vcpu"] and p["switch_ns_vcpu"] > 0, p
        assert p["vmm_rss_mib"] > 5 and p["policy_rss_mib"] > 5 and p["locked_mib"] > 0, p
        # shared pages (the interpreter's text, mapped by every Python process) are divided up, not counted whole
        assert 5 < p["pss_mib"] < p["rss_mib"], p
        assert p["policy_cpus"] >= 0 and p["vmm_cpus"] >= 0, p
        assert p["probe_p99_us"] and p["probe_p99_us"] <= p["probe_max_us"], p
    assert len(data["targets"]) == 3 and all(t.startswith(("PASS: ", "MISS: ")) for t in data["targets"])
    assert "| VMs | pvs_switch programs | BPF ns / non-vCPU switch |" in out.out
    assert (tmp_path / "scale.png").read_bytes()[:4] == b"\x89PNG"
    assert sorted(f.name for f in (tmp_path / "scale-logs").glob("*.log")) == ["n1-probe.log", "n2-idle0.log",
                                                                              "n2-probe.log"]
    # every VM it started has ended (no child of this process is left), and so have their pins
    children = [c for t in os.listdir("/proc/self/task")
                for c in Path(f"/proc/self/task/{t}/children").read_text().split()]
    assert not children, children
    assert not [d for d in os.listdir("/sys/fs/bpf/pvsched") if d.isdigit() and not os.path.exists(f"/proc/{d}")]
