"""PCI bus 0 behind a host bridge: configuration mechanism #1 (0xCF8/0xCFC), BARs, MMIO/PIO routing.

Each device is function 0 of its own slot (slot 0 is the host bridge).  The
bus gives every BAR an address as firmware would (memory BARs in the
0xC0000000 window, I/O BARs from 0xC000) and enables decoding; the guest may
size and move BARs, and accesses inside a decoding BAR reach the owning
device's read_bar/write_bar with the offset inside the BAR.  A device that
raises is logged once and the access ignored: nothing raises into a vCPU.
Reference: PCI Local Bus Specification 3.0, 3.2.2.3.2 and 6.2.5.
"""

from __future__ import annotations

import logging
import struct
import threading

from pyvmm.vmm.bus import Bus, BusConflict, Mapping
from pyvmm.vmm.memory import PCI_MMIO_END, PCI_MMIO_START
from pyvmm.vmm.pci_device import BarKind, BarSpec, PciDevice

log = logging.getLogger("pyvmm.pci")

CONFIG_ADDRESS, CONFIG_DATA = 0xCF8, 0xCFC
PIO_BAR_START, PIO_BAR_END = 0xC000, 0x10000
MAX_SLOTS = 32

# configuration header offsets
VENDOR_ID, COMMAND, STATUS, REVISION, CACHE_LINE, LATENCY, HEADER_TYPE = 0x00, 0x04, 0x06, 0x08, 0x0C, 0x0D, 0x0E
BAR0, SUBSYS_VENDOR, CAP_PTR, INT_LINE, INT_PIN = 0x10, 0x2C, 0x34, 0x3C, 0x3D
CMD_IO, CMD_MEM, CMD_MASTER = 0x1, 0x2, 0x4
CMD_WRITABLE = 0x0547  # IO, MEM, MASTER, PARITY, SERR, INTX_DISABLE
BAR_IO = 0x1
BAR_PREFETCH = 0x8


class HostBridge(PciDevice):
    """00:00.0, an i440FX-compatible host bridge, so guests (Linux's pci_sanity_check) find a PCI bus."""

    label = "host-bridge"
    vendor_id = 0x8086
    device_id = 0x1237
    class_code = 0x06
    subclass = 0x00


class PciFunction:
    """Configuration space of one device and the state of its BARs."""

    def __init__(self, dev: PciDevice, slot: int):
        self.dev = dev
        self.slot = slot
        self.command = 0
        self.cache_line = self.latency = 0
        self.int_line = 0
        self.bars: dict[int, BarSpec] = {}
        self.bar_addr: dict[int, int] = {}
        for b in dev.bars:
            self._check_bar(b)
            self.bars[b.index] = b
            self.bar_addr[b.index] = 0
        self.mappings: list[Mapping] = []

    def _check_bar(self, b: BarSpec) -> None:
        minimum = 16 if b.kind is BarKind.MMIO32 else 4
        if not 0 <= b.index <= 5 or b.size < minimum or b.size & (b.size - 1):
            raise ValueError(f"{self.dev.label}: bad BAR {b}")
        if b.index in self.bars:
            raise ValueError(f"{self.dev.label}: BAR{b.index} declared twice")

    def bar_register(self, index: int) -> int:
        b = self.bars.get(index)
        if b is None:
            return 0
        if b.kind is BarKind.PIO:
            return (self.bar_addr[index] & ~(b.size - 1) & 0xFFFFFFFC) | BAR_IO
        return (self.bar_addr[index] & ~(b.size - 1) & 0xFFFFFFF0) | (BAR_PREFETCH if b.prefetchable else 0)

    def read_dword(self, reg: int) -> int:
        """The 32-bit configuration register at reg (a multiple of 4)."""
        d = self.dev
        if reg == VENDOR_ID:
            return d.vendor_id | d.device_id << 16
        if reg == COMMAND:
            return self.command  # status 0: no capabilities list
        if reg == REVISION:
            return d.revision | d.prog_if << 8 | d.subclass << 16 | d.class_code << 24
        if reg == CACHE_LINE:
            return self.cache_line | self.latency << 8  # header type 0, single function
        if BAR0 <= reg < BAR0 + 24:
            return self.bar_register((reg - BAR0) // 4)
        if reg == SUBSYS_VENDOR:
            return d.subsystem_vendor_id | d.subsystem_id << 16
        if reg == INT_LINE:
            return self.int_line | d.interrupt_pin << 8
        return 0

    def write(self, reg: int, offset: int, size: int, value: int) -> bool:
        """A write of size bytes at reg+offset; True when decoding (command or a BAR) changed."""
        old = self.read_dword(reg)
        shift = offset * 8
        mask = ((1 << (size * 8)) - 1) << shift
        new = (old & ~mask) | ((value << shift) & mask)
        if reg == COMMAND:
            self.command = new & CMD_WRITABLE
            return True
        if reg == CACHE_LINE:
            self.cache_line, self.latency = new & 0xFF, (new >> 8) & 0xFF
        elif BAR0 <= reg < BAR0 + 24:
            index = (reg - BAR0) // 4
            if index in self.bars:
                self.bar_addr[index] = new & ~(self.bars[index].size - 1) & 0xFFFFFFFF
                return True
        elif reg == INT_LINE:
            self.int_line = new & 0xFF
        return False


class PciBus:
    """Bus 0: config mechanism #1 on the PIO bus and BAR routing on the PIO/MMIO buses."""

    def __init__(self, pio: Bus, mmio: Bus):
        self.pio, self.mmio = pio, mmio
        self.lock = threading.RLock()
        self.address = 0
        self.functions: dict[int, PciFunction] = {}
        self._next_mmio = PCI_MMIO_START
        self._next_pio = PIO_BAR_START
        pio.register(CONFIG_ADDRESS, 4, self._addr_read, self._addr_write, "pci-config-address")
        pio.register(CONFIG_DATA, 4, self._data_read, self._data_write, "pci-config-data")
        self.add(HostBridge())

    # --- devices ---
    def add(self, dev: PciDevice) -> PciFunction:
        """Plug a device into the next free slot, give its BARs addresses and enable decoding."""
        with self.lock:
            slot = next((s for s in range(MAX_SLOTS) if s not in self.functions), None)
            if slot is None:
                raise ValueError("PCI bus 0 is full")
            fn = PciFunction(dev, slot)
            for i, b in sorted(fn.bars.items()):
                fn.bar_addr[i] = self._allocate(b)
            fn.command = CMD_MEM | CMD_IO | CMD_MASTER if fn.bars else 0
            self.functions[slot] = fn
            self._remap(fn)
            log.debug("pci 00:%02x.0 %s %04x:%04x bars %s", slot, dev.label, dev.vendor_id, dev.device_id,
                      {i: hex(a) for i, a in fn.bar_addr.items()})
            return fn

    def _allocate(self, b: BarSpec) -> int:
        if b.kind is BarKind.PIO:
            addr = (self._next_pio + b.size - 1) & ~(b.size - 1)
            if addr + b.size > PIO_BAR_END:
                raise ValueError("PCI I/O space exhausted")
            self._next_pio = addr + b.size
            return addr
        addr = (self._next_mmio + b.size - 1) & ~(b.size - 1)
        if addr + b.size > PCI_MMIO_END:
            raise ValueError("PCI MMIO window exhausted")
        self._next_mmio = addr + b.size
        return addr

    def bar_address(self, dev: PciDevice, index: int) -> int:
        """Where the guest has placed a device's BAR now (0 if unknown)."""
        for fn in self.functions.values():
            if fn.dev is dev:
                return fn.bar_addr.get(index, 0)
        return 0

    def _remap(self, fn: PciFunction) -> None:
        for m in fn.mappings:
            (self.pio if m.owner == "pio" else self.mmio).unregister(m)
        fn.mappings = []
        for i, b in fn.bars.items():
            base = fn.bar_addr[i]
            is_pio = b.kind is BarKind.PIO
            if not fn.command & (CMD_IO if is_pio else CMD_MEM) or base == 0:
                continue
            limit = 0x10000 if is_pio else 1 << 32
            if base + b.size > limit:
                continue  # e.g. all-ones while the guest sizes the BAR with decoding on
            bus = self.pio if is_pio else self.mmio
            try:
                fn.mappings.append(bus.register(base, b.size, self._bar_reader(fn.dev, i),
                                                self._bar_writer(fn.dev, i),
                                                f"{fn.dev.label} BAR{i}", "pio" if is_pio else "mmio"))
            except BusConflict as e:
                fn.dev.warn_once(f"conflict{i}", f"BAR{i} not decoded: {e}")

    @staticmethod
    def _bar_reader(dev: PciDevice, index: int):
        def read(offset: int, size: int) -> int:
            try:
                return dev.read_bar(index, offset, size)
            except Exception as e:  # a device bug must not kill the vCPU  # noqa: BLE001
                dev.warn_once(f"raise-r{index}", f"read_bar raised {e!r}")
                return 0
        return read

    @staticmethod
    def _bar_writer(dev: PciDevice, index: int):
        def write(offset: int, size: int, value: int) -> None:
            try:
                dev.write_bar(index, offset, size, value)
            except Exception as e:  # a device bug must not kill the vCPU  # noqa: BLE001
                dev.warn_once(f"raise-w{index}", f"write_bar raised {e!r}")
        return write

    # --- mechanism #1 ---
    def _addr_read(self, offset: int, size: int) -> int:
        return (self.address >> (offset * 8)) & ((1 << (size * 8)) - 1)

    def _addr_write(self, offset: int, size: int, value: int) -> None:
        if offset == 0 and size == 4:  # byte writes to 0xCFB are another mechanism's probe
            self.address = value & 0x80FFFFFC

    def _target(self) -> tuple[PciFunction | None, int]:
        a = self.address
        if not a & 0x80000000 or (a >> 16) & 0xFF or (a >> 8) & 0x7:
            return None, 0
        return self.functions.get((a >> 11) & 0x1F), a & 0xFC

    def _data_read(self, offset: int, size: int) -> int:
        with self.lock:
            fn, reg = self._target()
            if fn is None:
                return (1 << (size * 8)) - 1
            v = fn.read_dword(reg)
        return (v >> (offset * 8)) & ((1 << (size * 8)) - 1)

    def _data_write(self, offset: int, size: int, value: int) -> None:
        with self.lock:
            fn, reg = self._target()
            if fn is not None and offset + size <= 4 and fn.write(reg, offset, size, value):
                self._remap(fn)


def config_bytes(fn: PciFunction) -> bytes:
    """The first 64 bytes of a function's configuration space (for status output and tests)."""
    return b"".join(struct.pack("<I", fn.read_dword(r)) for r in range(0, 64, 4))
