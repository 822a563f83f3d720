"""Helpers for the pvsched device tests: a BAR0 driver and a running device (imported by name, not via conftest)."""

from __future__ import annotations

import json
import threading
from typing import Any

import trio
from standin import StandinVm

from pyvmm import abi
from pyvmm.device.device import REG, PvschedDevice
from pyvmm.vmm import control

C = abi.C
SHM_GPA = 0x200000


class Bar:
    """Drives BAR0 the way the guest does (32-bit accesses)."""

    def __init__(self, dev: PvschedDevice) -> None:
        self.dev = dev

    def read(self, reg: str) -> int:
        """32-bit read of a named register."""
        return self.dev.read_bar(0, REG[reg], 4)

    def write(self, reg: str, value: int) -> None:
        """32-bit write of a named register."""
        self.dev.write_bar(0, REG[reg], 4, value)

    def status(self) -> int:
        """STATUS as the guest reads it (s32)."""
        v = self.read("STATUS")
        return v - (1 << 32) if v & 0x80000000 else v

    def negotiate(self, gpa: int = SHM_GPA, size: int = 4096, version: int | None = None,
                  features: int = C.PVSCHED_F_ALL) -> int:
        """Full guest negotiation: version, features, GPA, size, ENABLE; returns STATUS."""
        self.write("GUEST_VERSION", C.PVSCHED_VERSION if version is None else version)
        self.write("GUEST_FEATURES", features)
        self.write("SHM_GPA_LO", gpa & 0xFFFFFFFF)
        self.write("SHM_GPA_HI", gpa >> 32)
        self.write("SHM_SIZE", size)
        self.write("CONTROL", C.PVSCHED_CTRL_ENABLE)
        return self.status()


class Running:
    """A device with its policy process, supervised by `run()` in a trio thread like the VMM's."""

    def __init__(self, vm: StandinVm, dev: PvschedDevice) -> None:
        self.vm, self.dev, self.bar = vm, dev, Bar(dev)
        self.thread = threading.Thread(target=trio.run, args=(dev.run, vm), name="trio-vmm", daemon=True)

    @property
    def policy_pid(self) -> int:
        """PID of the policy process."""
        assert self.dev.supervisor is not None and self.dev.supervisor.pid is not None
        return self.dev.supervisor.pid

    def control(self, cmd: str, **kw: Any) -> dict:
        """A control command through the VMM's dispatch, as `pyvmm status` sends it (in a loop of its own)."""
        line = json.dumps({"cmd": cmd, **kw}).encode()
        return trio.run(control.dispatch, self.vm.control_handlers, line)
