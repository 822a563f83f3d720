"""Fixtures of the hostile-guest and fault tests (helpers in hostile_util.py)."""

from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))

from hostile_util import Vm, start_vm


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
