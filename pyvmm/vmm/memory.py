"""Guest RAM: one memfd mapped into the VMM, split around the 32-bit MMIO hole.

The memfd matters beyond the VMM: the pvsched policy process receives a dup
of it and maps the shared area itself.  `hva()` is the one place that turns a
guest physical address into a host address; it refuses anything outside RAM.
"""

from __future__ import annotations

import ctypes
import fcntl
import mmap
import os
from dataclasses import dataclass

MIB = 1 << 20
GIB = 1 << 30
# RAM below this GPA; the rest of RAM is placed at 4 GiB.  [LOW_RAM_END, 4 GiB)
# holds the PCI MMIO window, the IOAPIC and the LAPIC.
LOW_RAM_END = 0xC000_0000
HIGH_RAM_START = 4 * GIB
PCI_MMIO_START = 0xC000_0000
PCI_MMIO_END = 0xFEC0_0000  # IOAPIC at 0xFEC00000, LAPIC at 0xFEE00000
MIN_MEM = 16 * MIB


class GuestMemoryError(ValueError):
    """A guest physical range that is not (entirely) guest RAM."""


@dataclass(frozen=True)
class Region:
    """A contiguous piece of guest RAM: where it sits in the guest and in the memfd."""

    slot: int
    gpa: int
    size: int
    file_offset: int

    def contains(self, gpa: int, length: int) -> bool:
        """True when [gpa, gpa+length) lies entirely in this region."""
        return length >= 0 and self.gpa <= gpa and gpa + length <= self.gpa + self.size


class GuestMemory:
    """memfd-backed guest RAM, mapped once into this process."""

    def __init__(self, size: int, name: str = "pyvmm-ram"):
        if size < MIN_MEM:
            raise GuestMemoryError(f"guest memory {size // MIB} MiB is too small (minimum {MIN_MEM // MIB} MiB)")
        if size % mmap.PAGESIZE:
            raise GuestMemoryError("guest memory must be a multiple of the page size")
        self.size = size
        self.fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        os.ftruncate(self.fd, size)
        # The policy process gets a dup of this fd: sealed, it cannot shrink RAM
        # under the VMM's mapping (which would SIGBUS the VMM) nor grow it.
        fcntl.fcntl(self.fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL)
        self.map = mmap.mmap(self.fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self.base = ctypes.addressof(ctypes.c_char.from_buffer(self.map))
        low = min(size, LOW_RAM_END)
        self.regions = [Region(0, 0, low, 0)]
        if size > low:
            self.regions.append(Region(1, HIGH_RAM_START, size - low, low))

    def region_of(self, gpa: int, length: int = 1) -> Region:
        """The RAM region holding all of [gpa, gpa+length), or GuestMemoryError."""
        if gpa < 0 or length < 0 or gpa + length > (1 << 64):
            raise GuestMemoryError(f"GPA range {gpa:#x}+{length:#x} is not valid")
        for r in self.regions:
            if r.contains(gpa, length):
                return r
        raise GuestMemoryError(f"GPA range {gpa:#x}+{length:#x} is not guest RAM")

    def file_offset(self, gpa: int, length: int = 1) -> int:
        """Offset in the memfd of a GPA range that lies in RAM."""
        r = self.region_of(gpa, length)
        return r.file_offset + (gpa - r.gpa)

    def hva(self, gpa: int, length: int = 1) -> int:
        """Host virtual address (in this process) of a GPA range that lies in RAM."""
        return self.base + self.file_offset(gpa, length)

    def view(self, gpa: int, length: int) -> memoryview:
        """A writable memoryview of a GPA range that lies in RAM."""
        off = self.file_offset(gpa, length)
        return memoryview(self.map)[off : off + length]

    def read(self, gpa: int, length: int) -> bytes:
        """Copy bytes out of guest RAM."""
        return bytes(self.view(gpa, length))

    def write(self, gpa: int, data: bytes) -> None:
        """Copy bytes into guest RAM."""
        self.view(gpa, len(data))[:] = data

    def close(self) -> None:
        """Unmap and close; views handed out before must be released first."""
        try:
            self.map.close()
        except BufferError:
            pass  # a view is still alive; the mapping goes with the process
        os.close(self.fd)
