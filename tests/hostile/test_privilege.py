"""Privilege: without what it needs, `pyvmm boot` says so in one line, exits non-zero, and shows no traceback.

Choice (product): a researcher who asked for pvsched (the default) and lacks
the policy's capabilities gets a clear refusal naming them, not a silent
"vanilla" run that would look like pvsched in their results; `--no-policy`
(or `--no-pvsched`) is the explicit way to boot without the host policy.
No /dev/kvm access fails first, with its own line.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
from hostile_util import ROOT

from pyvmm.vmm.machine import EXIT_BAD_INPUT

BOOT = [sys.executable, "-m", "pyvmm.cli", "boot", "--json", "--no-console-input", "--cmdline", "duration=1 workload=idle",
        "--cpus", "1", "--timeout", "30"]

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="drops privileges from root"),
    pytest.mark.skipif(not shutil.which("setpriv"), reason="needs setpriv (util-linux)"),
]


def _run(prefix: list[str], *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(["timeout", "-s", "KILL", "60", *prefix, *BOOT, *extra], cwd=ROOT, env=env,
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=90, check=False)


def _one_line(r: subprocess.CompletedProcess) -> str:
    assert "Traceback" not in r.stderr, r.stderr
    lines = r.stderr.splitlines()
    assert len(lines) == 1, r.stderr
    return lines[0]


def test_no_kvm_access_is_one_clear_line() -> None:
    if os.stat("/dev/kvm").st_mode & 0o006:
        pytest.skip("/dev/kvm is world-accessible here")
    # uid/gid nobody, no groups; CAP_DAC_READ_SEARCH only so that an interpreter installed under a private home
    # stays readable (it grants no write access, so /dev/kvm stays closed)
    r = _run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--inh-caps=+dac_read_search",
              "--ambient-caps=+dac_read_search"])
    assert r.returncode == EXIT_BAD_INPUT
    assert _one_line(r) == "pyvmm: no permission to open /dev/kvm (need read/write access, e.g. the kvm group)"


@pytest.mark.parametrize(("drop", "named"), [
    ("-bpf,-sys_admin,-perfmon", ["CAP_SYS_ADMIN", "CAP_PERFMON", "CAP_BPF"]),
    ("-bpf", ["CAP_BPF"]),
], ids=["no-bpf-admin-perfmon", "no-bpf"])
def test_root_without_the_policys_capabilities_is_refused_clearly(drop: str, named: list[str]) -> None:
    r = _run(["setpriv", f"--bounding-set={drop}", "--inh-caps=-all"])
    assert r.returncode == EXIT_BAD_INPUT, r.stderr
    line = _one_line(r)
    assert line.startswith("pyvmm: the pvsched host policy needs ") and "--no-policy" in line, line
    for cap in named:
        assert cap in line, line
    assert "CAP_SYS_NICE" not in line  # only what is missing is named


def test_without_those_capabilities_no_policy_boots_and_says_nothing() -> None:
    r = _run(["setpriv", "--bounding-set=-bpf,-sys_admin,-perfmon", "--inh-caps=-all"], "--no-policy")
    assert r.returncode == 0, r.stderr
    assert r.stderr == "", r.stderr
    assert '{"type":"pvsched","status":"active"' in r.stdout and '{"type":"done","status":"ok"}' in r.stdout
