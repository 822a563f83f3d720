"""Fixtures of the hostile-guest and fault tests (helpers in hostile_util.py)."""

from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))

from hostile_util import Vm, start_vm

from pyvmm.policy import host_budget


@pytest.fixture
def vms():
    """start(cmdline, ...) -> Vm; every VM (and its policy process) SIGKILLed by PID at teardown."""
    started: list[Vm] = []

    def start(cmdline: str, **kw) -> Vm:
        vm = start_vm(cmdline, **kw)
        started.append(vm)
        return vm

    yield start
    for vm in started:
        vm.kill()


@pytest.fixture
def host_share():
    """set(pct): the host budget's share for this test; the admin's share and window are put back afterwards."""
    before = host_budget.read()
    yield host_budget.set_share
    host_budget.set_share(before["share_pct"], before["window_ms"] or None)
