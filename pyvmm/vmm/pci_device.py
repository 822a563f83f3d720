"""The interface a PCI device implements to sit on pyvmm's PCI bus.

A device describes its identity and BARs; the bus (pyvmm/vmm/pci.py) owns
configuration space (type 0 header, BAR sizing and programming through
mechanism #1 at 0xCF8/0xCFC) and routes guest accesses that fall inside a
programmed BAR to `read_bar` / `write_bar` with the offset inside that BAR.
Devices never raise into the vCPU loop: a bad access is logged once and
ignored (reads return 0).

Lifecycle hooks, all optional, called by the VMM:
- `attach(vm)`: once the device is on the bus, before vCPUs run;
  `vm` is a `MachineHandle`: the part of the machine a device may use.
- `start(vm)` (a coroutine): awaited by the VMM's trio loop on its main
  thread after every vCPU thread exists (their TIDs are known) and before
  any vCPU runs; where a device starts helper processes and awaits them
  without stalling the loop (the control socket is served meanwhile).
  Callers without the VMM (tests, stand-ins) run it with trio.run.
- `run(vm)` (a coroutine, if the device has one): a trio task in the VMM's
  nursery from start until shutdown, which cancels it.
- `stop()`: at shutdown, from the main thread, on every exit path.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, MutableMapping
from dataclasses import dataclass
from enum import Enum
from typing import Any, Protocol

from pyvmm.common.sched_attr import SchedAttr


class BarKind(Enum):
    """What address space a BAR decodes."""

    MMIO32 = "mmio32"
    PIO = "pio"


@dataclass(frozen=True)
class BarSpec:
    """One BAR: its index (0-5), size (a power of two, >= 16 for MMIO, >= 4 for PIO) and kind."""

    index: int
    size: int
    kind: BarKind = BarKind.MMIO32
    prefetchable: bool = False


class GuestRam(Protocol):
    """Guest RAM as a device sees it: GPA ranges translated to the VMM's mapping and to the memfd behind it.

    Every method raises GuestMemoryError for a range that is not entirely inside one RAM region.
    """

    @property
    def fd(self) -> int:
        """The memfd holding guest RAM (a device may pass it to a helper process)."""
        ...

    def region_of(self, gpa: int, length: int = 1) -> object:
        """The RAM region holding [gpa, gpa + length)."""
        ...

    def hva(self, gpa: int, length: int = 1) -> int:
        """Host virtual address of gpa in the VMM's mapping."""
        ...

    def file_offset(self, gpa: int, length: int = 1) -> int:
        """Offset of gpa in the memfd."""
        ...

    def view(self, gpa: int, length: int) -> memoryview:
        """A live view of [gpa, gpa + length) (release it when done)."""
        ...


class MachineHandle(Protocol):
    """What a device may use of the machine it sits in (pyvmm.vmm.machine.Machine provides it)."""

    @property
    def memory(self) -> GuestRam | None:
        """Guest RAM (None only once the machine is closed)."""
        ...

    @property
    def nr_vcpus(self) -> int:
        """Number of vCPUs."""
        ...

    @property
    def vmm_pid(self) -> int:
        """PID of the VMM process."""
        ...

    @property
    def vcpu_tids(self) -> Mapping[int, int]:
        """vCPU index -> native TID of its thread (filled in before start())."""
        ...

    @property
    def original_sched(self) -> Mapping[int, SchedAttr]:
        """TID -> the vCPU thread's scheduling attributes before any device changed them (known at start())."""
        ...

    @property
    def control_handlers(self) -> MutableMapping[str, Callable[[dict], Any]]:
        """The control socket's commands: a device may add its own (a handler may return an awaitable)."""
        ...


class PciDevice:
    """Base class of PCI devices; subclasses set the identity and override read_bar/write_bar."""

    label = "pci-device"
    vendor_id = 0xFFFF
    device_id = 0xFFFF
    class_code = 0xFF  # base class
    subclass = 0x00
    prog_if = 0x00
    revision = 0
    subsystem_vendor_id = 0
    subsystem_id = 0
    interrupt_pin = 0  # 0 = none, 1 = INTA#
    bars: tuple[BarSpec, ...] = ()
    final_stats: dict | None = None  # what the device kept at stop, for the boot's result (None: nothing)

    def __init__(self) -> None:
        self._warned: set[str] = set()
        self.log = logging.getLogger(f"pyvmm.{self.label}")

    def warn_once(self, key: str, msg: str) -> None:
        """Log a guest misbehaviour once per kind, so a hostile guest cannot flood the log."""
        if key not in self._warned:
            self._warned.add(key)
            self.log.warning("%s: %s", self.label, msg)

    def read_bar(self, bar: int, offset: int, size: int) -> int:
        """Guest read of `size` bytes at `offset` inside BAR `bar`; returns the value."""
        self.warn_once(f"r{bar}", f"read of unimplemented BAR{bar}")
        return 0

    def write_bar(self, bar: int, offset: int, size: int, value: int) -> None:
        """Guest write of `size` bytes of `value` at `offset` inside BAR `bar`."""
        self.warn_once(f"w{bar}", f"write to unimplemented BAR{bar}")

    def attach(self, vm: MachineHandle) -> None:
        """Called once the device is on the bus, before vCPUs run."""

    async def start(self, vm: MachineHandle) -> None:
        """Awaited in the VMM's trio loop once every vCPU thread exists, before any runs."""

    def stop(self) -> None:
        """Called at VM shutdown on every exit path."""
