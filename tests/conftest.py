"""Shared fixtures: run the `pyvmm` CLI as a subprocess that is always killed by PID."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# test helpers shared by several folders: the stand-in VMM (fakevmm), the policy benchmark
sys.path.insert(0, str(ROOT / "tests" / "standin"))


def _kill(p: subprocess.Popen) -> None:
    if p.poll() is None:
        os.kill(p.pid, signal.SIGKILL)
        p.wait()


@pytest.fixture
def pyvmm():
    """Run `python -m pyvmm.cli ARGS...` to completion: pyvmm(*args, timeout=60, input=None) -> CompletedProcess."""
    procs: list[subprocess.Popen] = []

    def run(*args: str, timeout: float = 60, env: dict | None = None,
            input: str | None = None) -> subprocess.CompletedProcess:
        p = subprocess.Popen([sys.executable, "-m", "pyvmm.cli", *args], cwd=ROOT, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, stdin=subprocess.DEVNULL if input is None else subprocess.PIPE,
                             text=True, env={**os.environ, **(env or {})})
        procs.append(p)
        try:
            out, err = p.communicate(input, timeout=timeout)
        finally:
            _kill(p)
        return subprocess.CompletedProcess(p.args, p.returncode, out, err)

    yield run
    for p in procs:
        _kill(p)


@pytest.fixture
def pyvmm_bg():
    """Start `python -m pyvmm.cli ARGS...` in the background; every process is SIGKILLed by PID at teardown."""
    procs: list[subprocess.Popen] = []

    def start(*args: str, env: dict | None = None) -> subprocess.Popen:
        p = subprocess.Popen([sys.executable, "-m", "pyvmm.cli", *args], cwd=ROOT, stdin=subprocess.DEVNULL,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env={**os.environ, **(env or {})})
        procs.append(p)
        return p

    yield start
    for p in procs:
        _kill(p)


@pytest.fixture
def host_share():
    """set(pct): the host budget's share for this test (all VMs' boosted vCPUs together); the admin's share and
    window are put back afterwards.  A test that lifts one VM's budget (vm_boost_share_pct=100) lifts this too."""
    from pyvmm.policy import host_budget

    before = host_budget.read()
    yield host_budget.set_share
    host_budget.set_share(before["share_pct"], before["window_ms"] or None)
