"""The hang guard (tests/conftest.py) ends a run whose test hangs where pytest-timeout's signal cannot reach."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TARGET = "PVSCHED_TEST_HANG_TARGET"


@pytest.mark.skipif(os.environ.get(TARGET) != "1", reason="the hang that the test below starts in a pytest of its own")
@pytest.mark.timeout(1)
def test_hang_target():
    # SIGALRM blocked: pytest-timeout's handler never runs, as in a thread stuck in a native call
    signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGALRM])
    time.sleep(120)


def test_a_hang_the_signal_cannot_end_ends_the_run_with_every_stack():
    env = {**os.environ, TARGET: "1", "PVSCHED_TEST_HANG_GRACE_S": "1"}
    # bounded: without the guard, the target's whole 120 s sleep (subprocess.run SIGKILLs it by PID)
    p = subprocess.run([sys.executable, "-I", "-m", "pytest", "-q", "-p", "no:cacheprovider", "--rootdir", str(ROOT),
                        "-c", str(ROOT / "pyproject.toml"), f"{ROOT}/tests/test_hang_guard.py::test_hang_target"],
                       cwd="/", env=env, capture_output=True, text=True, timeout=60)
    assert p.returncode == 1, (p.returncode, p.stdout[-1000:], p.stderr[-1000:])
    assert "Timeout (0:00:02)!" in p.stderr and "in test_hang_target" in p.stderr, p.stderr[-2000:]
