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
    p = subprocess.Popen([sys.executable, "-I", "-m", "pytest", "-q", "-p", "no:cacheprovider", "--rootdir", str(ROOT),
                          "-c", str(ROOT / "pyproject.toml"), f"{ROOT}/tests/test_hang_guard.py::test_hang_target"],
                         cwd="/", env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = p.communicate(timeout=60)  # without the guard: the target's whole 120 s sleep
    finally:
        if p.poll() is None:
            os.kill(p.pid, signal.SIGKILL)
            p.wait()
    assert p.returncode == 1, (p.returncode, out[-1000:], err[-1000:])
    assert "Timeout (0:00:02)!" in err and "in test_hang_target" in err, err[-2000:]
