"""PCI host bridge: a guest enumerates bus 0, sizes and moves a BAR and reaches the device; bus logic unit tests."""

from __future__ import annotations

from test_exits import cfg

from pyvmm.boot import run_vm
from pyvmm.vmm.bus import Bus
from pyvmm.vmm.machine import Machine
from pyvmm.vmm.memory import PCI_MMIO_END, PCI_MMIO_START
from pyvmm.vmm.pci import PciBus
from pyvmm.vmm.pci_device import BarKind, BarSpec, PciDevice


class ProbeDevice(PciDevice):
    """A 4 KiB MMIO BAR0 that answers 0xCAFE0000 | offset and records every access."""

    label = "probe"
    vendor_id = 0x1234
    device_id = 0xBEEF
    class_code = 0xFF
    bars = (BarSpec(0, 4096),)

    def __init__(self) -> None:
        super().__init__()
        self.accesses: list[tuple] = []
        self.attached_to = None

    def attach(self, vm) -> None:
        self.attached_to = vm

    def read_bar(self, bar: int, offset: int, size: int) -> int:
        self.accesses.append(("r", bar, offset, size))
        return 0xCAFE0000 | offset

    def write_bar(self, bar: int, offset: int, size: int, value: int) -> None:
        self.accesses.append(("w", bar, offset, size, value))


# PCI_FIND, CFG_R, CFG_W: config mechanism #1, from the tiny guests' prelude (tests/tiny_guest.py).
PCI_GUEST = r"""
_start:
    PCI_FIND 0xbeef1234
    CFG_R 0x8
    shr $24, %eax
    cmp $0xff, %eax             # class code
    jne fail3
    CFG_R 0x10                  # where firmware put BAR0
    mov $0x530, %dx
    out %eax, %dx
    CFG_W 0x4, 0                # decoding off while sizing
    CFG_W 0x10, 0xffffffff
    CFG_R 0x10
    and $0xfffffff0, %eax
    neg %eax
    mov $0x531, %dx
    out %eax, %dx               # report the size
    CFG_W 0x10, 0xd0000000
    CFG_W 0x4, 2                # memory decoding on
    mov $0xd0000000, %edi
    movl $0x12345678, 0x8(%rdi)
    movl 0x10(%rdi), %eax
    cmp $0xcafe0010, %eax
    jne fail4
    EXIT 0
fail3: EXIT 3
fail4: EXIT 4
"""


def test_guest_enumerates_sizes_programs_bar_and_reaches_device(guest):
    dev = ProbeDevice()
    reports = {}

    def setup(m: Machine) -> None:
        m.add_pci_device(dev)
        m.pio.register(0x530, 2, lambda o, s: 0, lambda o, s, v: reports.__setitem__(o, v), "report")
        setup.machine = m

    r = run_vm(cfg(guest(PCI_GUEST), [setup]))
    assert r.exit_code == 0, r.message
    assert dev.attached_to is setup.machine
    assert PCI_MMIO_START <= reports[0] < PCI_MMIO_END and reports[0] % 4096 == 0  # firmware-like placement
    assert reports[1] == 4096
    assert dev.accesses == [("w", 0, 8, 4, 0x12345678), ("r", 0, 0x10, 4)]
    assert setup.machine.pci.bar_address(dev, 0) == 0xD0000000


def _cfg(bus: PciBus, slot: int, reg: int, value: int | None = None) -> int:
    bus.pio.write(0xCF8, 4, 0x80000000 | slot << 11 | reg)
    if value is not None:
        bus.pio.write(0xCFC, 4, value)
        return 0
    return bus.pio.read(0xCFC, 4)


def test_bus_logic_bars_decoding_and_routing():
    pio, mmio = Bus("pio"), Bus("mmio")
    bus = PciBus(pio, mmio)

    class IoDev(ProbeDevice):
        bars = (BarSpec(0, 256), BarSpec(2, 32, BarKind.PIO))

    dev = IoDev()
    fn = bus.add(dev)
    assert _cfg(bus, 0, 0) == 0x12378086  # host bridge
    assert _cfg(bus, 0, 0x8) >> 24 == 0x06
    assert _cfg(bus, 5, 0) == 0xFFFFFFFF  # empty slot
    bar0 = _cfg(bus, fn.slot, 0x10)
    bar2 = _cfg(bus, fn.slot, 0x18)
    assert bar0 & 0xF == 0 and PCI_MMIO_START <= bar0 < PCI_MMIO_END
    assert bar2 & 1 == 1
    assert mmio.read(bar0 + 4, 4) == 0xCAFE0004
    assert pio.read((bar2 & ~3) + 2, 1) == 0x02  # 0xCAFE0002 cut to one byte
    # Sizing with decoding on does not map the all-ones address; moving the BAR moves the routing.
    _cfg(bus, fn.slot, 0x10, 0xFFFFFFFF)
    assert _cfg(bus, fn.slot, 0x10) == 0xFFFFFF00
    assert mmio.find(bar0) is None
    _cfg(bus, fn.slot, 0x10, 0xD0000000)
    assert mmio.read(0xD0000010, 4) == 0xCAFE0010
    _cfg(bus, fn.slot, 0x4, 0)  # decoding off: nothing answers
    assert mmio.read(0xD0000010, 4) == 0xFFFFFFFF
    # Byte write to 0xCFB (Linux's type-2 probe) leaves the address latch alone.
    pio.write(0xCF8, 4, 0x80000000)
    pio.write(0xCFB, 1, 0x01)
    assert pio.read(0xCF8, 4) == 0x80000000


def test_a_raising_device_does_not_raise_into_the_vcpu():
    class Broken(ProbeDevice):
        def read_bar(self, bar, offset, size):
            raise RuntimeError("bug")

    pio, mmio = Bus("pio"), Bus("mmio")
    bus = PciBus(pio, mmio)
    dev = Broken()
    bus.add(dev)
    assert mmio.read(bus.bar_address(dev, 0), 4) == 0
