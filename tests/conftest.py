"""Shared fixtures: run the `pyvmm` CLI as a subprocess that is always killed by PID; a guard for native hangs."""

from __future__ import annotations

import faulthandler
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# test helpers shared by several folders: the stand-in VMM (fakevmm), the policy benchmark
sys.path.insert(0, str(ROOT / "tests" / "standin"))

# A hang that pytest-timeout's signal method cannot end: a thread blocked in native code (a second pthread_join
# of one thread, in a cffi call) never returns to the interpreter to run the SIGALRM handler, and CI waited out
# its whole limit.  faulthandler's watchdog thread needs no interpreter: HANG_GRACE_S after a test's own
# timeout it prints every thread's stack to the real stderr and ends the run with exit code 1.  The grace lets
# the signal method, and the teardown it starts, go first; nothing is torn down after the hard exit.
HANG_GRACE_S = float(os.environ.get("PVSCHED_TEST_HANG_GRACE_S", "60"))
_stderr_fd = -1


def pytest_configure(config: pytest.Config) -> None:
    """Keep a copy of the real stderr (capturing is suspended here) for the hang guard's dump."""
    global _stderr_fd
    _stderr_fd = os.dup(2)


def pytest_unconfigure(config: pytest.Config) -> None:
    """Close the hang guard's copy of stderr."""
    global _stderr_fd
    if _stderr_fd >= 0:
        os.close(_stderr_fd)
        _stderr_fd = -1


def _timeout_of(item: pytest.Item) -> float:
    """The test's pytest-timeout limit in seconds (its marker, else --timeout, else the ini's); 0: none."""
    m = item.get_closest_marker("timeout")
    if m is not None and (m.args or "timeout" in m.kwargs):
        return float(m.args[0] if m.args else m.kwargs["timeout"])
    opt = item.config.getoption("timeout", None)
    return float(opt if opt is not None else item.config.getini("timeout") or 0)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None):
    """Arm the hang guard for the test's setup, call and teardown."""
    limit = _timeout_of(item)
    if limit > 0 and _stderr_fd >= 0:
        faulthandler.dump_traceback_later(limit + HANG_GRACE_S, exit=True, file=_stderr_fd)
    try:
        yield
    finally:
        faulthandler.cancel_dump_traceback_later()


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
