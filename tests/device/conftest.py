"""Fixtures for the pvsched device tests: a stand-in machine and a device with its policy process."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator

import pytest
import trio

sys.path.insert(0, os.path.dirname(__file__))

from device_harness import Running
from standin import StandinVm

from pyvmm.device.device import PvschedDevice


@pytest.fixture
def vm() -> Iterator[StandinVm]:
    """A stand-in machine with 2 vCPU-like threads and 64 MiB of guest RAM."""
    m = StandinVm(2)
    yield m
    m.close()


@pytest.fixture
def running(vm: StandinVm) -> Iterator[Running]:
    """Device attached and started (policy process up), supervision running; stopped afterwards."""
    dev = PvschedDevice()
    vm.add_pci_device(dev)
    trio.run(dev.start, vm)  # from the main thread, as the VMM does
    r = Running(vm, dev)
    r.thread.start()
    try:
        yield r
    finally:
        dev.stop()
        r.thread.join(10)
        dev.restore_threads()
