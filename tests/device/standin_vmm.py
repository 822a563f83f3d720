"""A stand-in VMM process for the "kill the VMM" test: device started, policy PID printed, then supervise."""

from __future__ import annotations

import json
import os
import sys

import trio

sys.path.insert(0, os.path.dirname(__file__))

from standin import StandinVm

from pyvmm.device.device import PvschedDevice


def main() -> None:
    """Start a device with its policy process and run until killed."""
    vm = StandinVm(2)
    dev = PvschedDevice()
    vm.add_pci_device(dev)
    trio.run(dev.start, vm)
    assert dev.supervisor is not None
    print(json.dumps({"policy_pid": dev.supervisor.pid, "tids": list(vm.vcpu_tids.values())}), flush=True)
    trio.run(dev.run, vm)


if __name__ == "__main__":
    main()
