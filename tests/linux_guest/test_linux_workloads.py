"""Other workloads of the Linux image under QEMU TCG: cyclictest (the seed's guest benchmark) and the device-mode probe.

Linux under pyvmm itself runs in the lab: tests/linux_guest/test_linux_lab.py."""

from __future__ import annotations

import re
from pathlib import Path

import qemu_runner as qemu

ROOT = Path(__file__).resolve().parents[2]


def test_cyclictest_runs_with_the_module_loaded(linux_image):
    res = qemu.run_qemu(linux_image("cloud"), "cyclictest", "pvsched.selftest=1 pvsched.duration=2", timeout=120)
    assert res.returncode == 0 and res.of_type("done"), res.console[-3000:]
    (ct,) = res.of_type("cyclictest")
    assert ct["rc"] == 0, res.console[-3000:]
    threads = ct["result"]["thread"]
    assert sorted(t["cpu"] for t in threads.values()) == [0, 1]
    for t in threads.values():
        assert t["cycles"] > 100 and 0 < t["min"] <= t["avg"] <= t["max"]
    (st,) = res.of_type("stats")
    assert st["switch_rt"] > 100, "cyclictest's RR threads never showed in the slots"


def test_probe_unwinds_on_a_device_that_is_not_pvsched(linux_image):
    """Offer the driver QEMU's edu device (1234:11e8): probe enables it, maps BAR0, finds no magic and unwinds."""
    res = qemu.run_qemu(
        linux_image("cloud"), "device", "pvsched.new_id=1234:11e8", extra_args=["-device", "edu"], timeout=120
    )
    assert res.returncode == 0 and res.of_type("done"), res.console[-3000:]
    assert {"type": "pvsched", "status": "unbound"} in res.records
    assert {"type": "iomem", "pvsched_regions": 0} in res.records, "BAR0 region left requested after a failed probe"
    assert {"type": "module", "event": "unload", "rc": 0} in res.records
    dmesg = res.dmesg()
    assert re.search(r"pvsched 0000:[0-9a-f:.]+: BAR0 has no pvsched magic \[rc=-19\]", dmesg), dmesg
    assert not re.search(r"WARNING:|BUG:|Oops|Call Trace", dmesg), dmesg
