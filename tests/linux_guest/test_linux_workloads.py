"""Other workloads of the Linux image: cyclictest (the seed's guest benchmark), the device-mode probe, and pyvmm."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from guest_image.linux import qemu

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


def _has_hw_virt() -> bool:
    flags = Path("/proc/cpuinfo").read_text()
    return bool(re.search(r"^flags\s*:.*\b(vmx|svm)\b", flags, re.MULTILINE))


@pytest.mark.skipif(
    not _has_hw_virt(),
    reason="needs VMX/SVM: pyvmm cannot run Linux under this machine's PVM KVM "
    "(reaching the Linux banner is covered by the VMM's slow bzImage test)",
)
def test_pyvmm_boots_linux_and_the_module_negotiates(linux_image):
    image = linux_image("cloud")
    cmdline = "console=ttyS0 panic=-1 pvsched.workload=device"
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "vmm.cli",
            "boot",
            "--kernel",
            str(image.kernel),
            "--initrd",
            str(image.initrd),
            "--cmdline",
            cmdline,
            "--timeout",
            "120",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    console = r.stdout + r.stderr
    assert re.search(r"pvsched 0000:[0-9a-f:.]+: active: version 0x10000 features 0x1f", console), console[-3000:]
    info = [rec for rec in qemu.parse_records(console) if rec["type"] == "info"]
    assert info and info[0]["mode"] == "device"
    assert {"type": "module", "event": "unload", "rc": 0} in qemu.parse_records(console)
