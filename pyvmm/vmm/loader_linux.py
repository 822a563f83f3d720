"""Linux loader: a bzImage by the x86 boot protocol, entered at its 64-bit entry point.

What firmware and a boot loader would leave behind, in guest memory (layout
in pyvmm/vmm/x86.py): the protected-mode kernel at 1 MiB, a zero page (struct
boot_params) at 0x7000 with the image's setup header, an e820 map, the
command line at 0x90000 and the initramfs at the top of low RAM; an MP table
at 0xF0000 and an ACPI MADT (RSDP at 0xE0000, see pyvmm/vmm/acpi.py) so an SMP
kernel finds its CPUs and the IOAPIC whether or not it parses MP tables.  The
boot vCPU starts at load address + 0x200 (startup_64) in 64-bit mode with
RSI = zero page; the other vCPUs wait for INIT/SIPI in the in-kernel LAPIC.
References: Documentation/arch/x86/boot.rst (64-bit boot protocol),
arch/x86/include/uapi/asm/bootparam.h, Intel MultiProcessor Specification 1.4.
"""

from __future__ import annotations

import struct

from pyvmm.vmm import acpi, x86
from pyvmm.vmm.loader_elf import ImageError
from pyvmm.vmm.memory import LOW_RAM_END, GuestMemory

# setup header (offsets in the image and in boot_params)
HDR_SETUP_SECTS, HDR_BOOT_FLAG, HDR_JUMP, HDR_MAGIC, HDR_VERSION = 0x1F1, 0x1FE, 0x200, 0x202, 0x206
HDR_VID_MODE, HDR_TYPE_OF_LOADER, HDR_LOADFLAGS = 0x1FA, 0x210, 0x211
HDR_RAMDISK_IMAGE, HDR_RAMDISK_SIZE, HDR_HEAP_END_PTR = 0x218, 0x21C, 0x224
HDR_CMD_LINE_PTR, HDR_INITRD_ADDR_MAX, HDR_XLOADFLAGS, HDR_CMDLINE_SIZE = 0x228, 0x22C, 0x236, 0x238
HDR_INIT_SIZE = 0x260
BP_EXT_RAMDISK_IMAGE, BP_EXT_RAMDISK_SIZE, BP_EXT_CMD_LINE_PTR = 0x0C0, 0x0C4, 0x0C8
BP_E820_ENTRIES, BP_E820_TABLE, E820_MAX = 0x1E8, 0x2D0, 128
E820_RAM, E820_RESERVED = 1, 2
LOADED_HIGH, CAN_USE_HEAP = 0x01, 0x80
XLF_KERNEL_64 = 0x1
MIN_PROTOCOL = 0x20C  # 2.12: xloadflags, the 64-bit entry
KERNEL_LOAD_ADDR = x86.HIMEM_START
STARTUP_64_OFFSET = 0x200
LOADER_TYPE_UNDEFINED = 0xFF
DEFAULT_CMDLINE = "console=ttyS0"

# MP table
MP_APIC_VERSION, MP_IOAPIC_VERSION = 0x14, 0x11
IOAPIC_ADDR, LAPIC_ADDR = 0xFEC00000, 0xFEE00000
MP_CPU_ENABLED, MP_CPU_BSP = 1, 2
MP_INT, MP_NMI, MP_EXTINT = 0, 1, 3
NR_IOAPIC_PINS = 24


def _u16(b: bytes, off: int) -> int:
    return struct.unpack_from("<H", b, off)[0]


def _u32(b: bytes, off: int) -> int:
    return struct.unpack_from("<I", b, off)[0]


def e820_map(mem: GuestMemory) -> list[tuple[int, int, int]]:
    """(addr, size, type) entries: base memory, the BIOS hole, RAM above 1 MiB and above 4 GiB."""
    entries = [(0, x86.EBDA_START, E820_RAM), (x86.EBDA_START, x86.HIMEM_START - x86.EBDA_START, E820_RESERVED)]
    for r in mem.regions:
        start = max(r.gpa, x86.HIMEM_START)
        if r.gpa + r.size > start:
            entries.append((start, r.gpa + r.size - start, E820_RAM))
    return entries


def _checksum(b: bytes) -> int:
    return (-sum(b)) & 0xFF


def mp_table(nr_vcpus: int, addr: int = x86.MPTABLE_ADDR) -> bytes:
    """An MP floating pointer followed by its configuration table: CPUs, ISA bus, IOAPIC, interrupts."""
    ioapic_id = nr_vcpus + 1
    entries = []
    for i in range(nr_vcpus):
        flags = MP_CPU_ENABLED | (MP_CPU_BSP if i == 0 else 0)
        entries.append(struct.pack("<BBBBII8x", 0, i, MP_APIC_VERSION, flags, 0x600, 0x201))
    entries.append(struct.pack("<BB6s", 1, 0, b"ISA   "))
    entries.append(struct.pack("<BBBBI", 2, ioapic_id, MP_IOAPIC_VERSION, 1, IOAPIC_ADDR))
    for irq in range(16):
        entries.append(struct.pack("<BBHBBBB", 3, MP_INT, 0, 0, irq, ioapic_id, irq))
    entries.append(struct.pack("<BBHBBBB", 4, MP_EXTINT, 0, 0, 0, 0, 0))      # LINT0 of the BSP: the PIC
    entries.append(struct.pack("<BBHBBBB", 4, MP_NMI, 0, 0, 0, 0xFF, 1))      # LINT1 of all CPUs: NMI
    body = b"".join(entries)
    length = 44 + len(body)
    header = struct.pack("<4sHBB8s12sIHHIHBB", b"PCMP", length, 4, 0, b"PYVMM   ", b"PVSCHED     ", 0, 0,
                         len(entries), LAPIC_ADDR, 0, 0, 0)
    table = bytearray(header + body)
    table[7] = _checksum(table)
    fp = bytearray(struct.pack("<4sIBBBB4x", b"_MP_", addr + 16, 1, 4, 0, 0))
    fp[10] = _checksum(fp)
    return bytes(fp + table)


def setup_linux(machine, data: bytes, cmdline: str, initrd: bytes | None, name: str = "kernel") -> None:
    """Load a bzImage (and initramfs) and set the boot vCPU to its 64-bit entry."""
    mem: GuestMemory = machine.memory
    if len(data) < 0x400 or data[HDR_MAGIC:HDR_MAGIC + 4] != b"HdrS" or _u16(data, HDR_BOOT_FLAG) != 0xAA55:
        raise ImageError(f"{name}: not a Linux bzImage")
    version = _u16(data, HDR_VERSION)
    if version < MIN_PROTOCOL or not _u16(data, HDR_XLOADFLAGS) & XLF_KERNEL_64:
        raise ImageError(f"{name}: boot protocol {version >> 8}.{version & 0xFF} without a 64-bit entry "
                         "(need 2.12+ and a 64-bit kernel)")
    if not data[HDR_LOADFLAGS] & LOADED_HIGH:
        raise ImageError(f"{name}: a zImage (loaded low) is not supported")
    setup_sects = data[HDR_SETUP_SECTS] or 4
    kernel = data[(setup_sects + 1) * 512:]
    init_size = _u32(data, HDR_INIT_SIZE)
    low_end = min(mem.size, LOW_RAM_END)
    kernel_end = KERNEL_LOAD_ADDR + max(len(kernel), init_size)
    if kernel_end > low_end:
        raise ImageError(f"{name}: needs {kernel_end >> 20} MiB of RAM to decompress; the guest has "
                         f"{mem.size >> 20} MiB (use --mem)")
    mem.write(KERNEL_LOAD_ADDR, kernel)

    zp = bytearray(4096)
    hdr_end = HDR_MAGIC + data[HDR_JUMP + 1]  # the setup header ends where its jump lands
    zp[HDR_SETUP_SECTS:hdr_end] = data[HDR_SETUP_SECTS:hdr_end]
    zp[HDR_TYPE_OF_LOADER] = LOADER_TYPE_UNDEFINED
    zp[HDR_LOADFLAGS] |= CAN_USE_HEAP
    struct.pack_into("<H", zp, HDR_VID_MODE, 0xFFFF)
    struct.pack_into("<H", zp, HDR_HEAP_END_PTR, 0xFE00)

    raw = (cmdline or DEFAULT_CMDLINE).encode()
    limit = min(_u32(data, HDR_CMDLINE_SIZE) or 255, x86.LINUX_CMDLINE_MAX)
    if len(raw) > limit:
        raise ImageError(f"command line is {len(raw)} bytes; this kernel takes at most {limit}")
    mem.write(x86.LINUX_CMDLINE_ADDR, raw + b"\0")
    struct.pack_into("<I", zp, HDR_CMD_LINE_PTR, x86.LINUX_CMDLINE_ADDR)
    struct.pack_into("<I", zp, BP_EXT_CMD_LINE_PTR, 0)

    if initrd:
        max_addr = min(_u32(data, HDR_INITRD_ADDR_MAX) or 0x37FFFFFF, low_end - 1)
        start = (max_addr + 1 - len(initrd)) & ~0xFFF
        if start < kernel_end:
            raise ImageError(f"initrd of {len(initrd) >> 20} MiB does not fit in guest RAM with the kernel "
                             "(use --mem)")
        mem.write(start, initrd)
        struct.pack_into("<II", zp, HDR_RAMDISK_IMAGE, start, len(initrd))

    e820 = e820_map(mem)
    zp[BP_E820_ENTRIES] = len(e820)
    for i, (addr, size, typ) in enumerate(e820[:E820_MAX]):
        struct.pack_into("<QQI", zp, BP_E820_TABLE + 20 * i, addr, size, typ)
    mem.write(x86.ZERO_PAGE_ADDR, bytes(zp))
    mem.write(x86.MPTABLE_ADDR, mp_table(machine.nr_vcpus))
    mem.write(acpi.RSDP_ADDR, acpi.acpi_tables(machine.nr_vcpus))
    x86.write_boot_tables(mem)

    bsp = machine.vcpus[0]
    x86.set_long_mode(bsp, KERNEL_LOAD_ADDR + STARTUP_64_OFFSET, rsp=x86.ZERO_PAGE_ADDR, rsi=x86.ZERO_PAGE_ADDR)
    machine.set_runnable(bsp)
