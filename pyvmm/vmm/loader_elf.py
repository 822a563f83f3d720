"""Test-guest loader: an ELF64 x86-64 executable, started by the boot contract of pyvmm/abi/testguest_boot.h.

PT_LOAD segments go to their physical addresses (p_paddr), which must lie
in RAM at or above 512 KiB (below that sit the boot tables, see pyvmm/vmm/x86.py).
Every vCPU starts at e_entry in 64-bit mode at CPL0 with RDI = vCPU id,
RSI = GPA of struct pvsched_boot_info (at 0x1000), and RSP at the top of a
4 KiB boot stack of its own; the command line is at 0x2000.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from pyvmm.abi import boot
from pyvmm.vmm import x86
from pyvmm.vmm.memory import GuestMemory, GuestMemoryError

ELF_MAGIC = b"\x7fELF"
ELFCLASS64, ELFDATA2LSB, EM_X86_64 = 2, 1, 62
ET_EXEC = 2
PT_LOAD = 1


class ImageError(ValueError):
    """A kernel image that cannot be loaded; the message says why."""


@dataclass(frozen=True)
class Segment:
    """One PT_LOAD segment."""

    paddr: int
    offset: int
    filesz: int
    memsz: int


@dataclass(frozen=True)
class ElfImage:
    """What the loader needs from an ELF file: entry point and loadable segments."""

    entry: int
    segments: tuple[Segment, ...]


def parse_elf(data: bytes, name: str = "kernel") -> ElfImage:
    """Validate an ELF64 x86-64 executable and list its PT_LOAD segments."""
    if len(data) < 64 or data[:4] != ELF_MAGIC:
        raise ImageError(f"{name}: not an ELF file")
    if data[4] != ELFCLASS64 or data[5] != ELFDATA2LSB:
        raise ImageError(f"{name}: not a 64-bit little-endian ELF")
    e_type, e_machine = struct.unpack_from("<HH", data, 16)
    if e_machine != EM_X86_64:
        raise ImageError(f"{name}: ELF for machine {e_machine}, not x86-64")
    if e_type != ET_EXEC:
        raise ImageError(f"{name}: ELF type {e_type} is not an executable (link it with -static -no-pie)")
    e_entry, e_phoff = struct.unpack_from("<QQ", data, 24)
    e_phentsize, e_phnum = struct.unpack_from("<HH", data, 54)
    if e_phentsize < 56 or e_phoff + e_phnum * e_phentsize > len(data):
        raise ImageError(f"{name}: truncated program headers")
    segs = []
    for i in range(e_phnum):
        off = e_phoff + i * e_phentsize
        p_type, _flags, p_offset, _vaddr, p_paddr, p_filesz, p_memsz = struct.unpack_from("<IIQQQQQ", data, off)
        if p_type != PT_LOAD or p_memsz == 0:
            continue
        if p_filesz > p_memsz or p_offset + p_filesz > len(data):
            raise ImageError(f"{name}: segment {i} is larger than the file")
        segs.append(Segment(p_paddr, p_offset, p_filesz, p_memsz))
    if not segs:
        raise ImageError(f"{name}: no loadable segments")
    return ElfImage(e_entry, tuple(segs))


def load_elf(mem: GuestMemory, data: bytes, name: str = "kernel") -> ElfImage:
    """Copy the PT_LOAD segments into guest RAM at their physical addresses."""
    img = parse_elf(data, name)
    for s in img.segments:
        if s.paddr < x86.TESTGUEST_LOAD_MIN:
            raise ImageError(f"{name}: segment at {s.paddr:#x} is below {x86.TESTGUEST_LOAD_MIN:#x} "
                             "(reserved for boot tables and stacks)")
        try:
            mem.view(s.paddr, s.memsz)
        except GuestMemoryError:
            raise ImageError(f"{name}: segment {s.paddr:#x}+{s.memsz:#x} does not fit in guest RAM "
                             f"({mem.size >> 20} MiB)") from None
        mem.write(s.paddr, data[s.offset:s.offset + s.filesz])
        mem.view(s.paddr + s.filesz, s.memsz - s.filesz)[:] = bytes(s.memsz - s.filesz)
    if not any(s.paddr <= img.entry < s.paddr + s.memsz for s in img.segments):
        raise ImageError(f"{name}: entry point {img.entry:#x} is outside its loaded segments")
    return img


def boot_info_bytes(nr_vcpus: int, mem_size: int, tsc_khz: int, cmdline_gpa: int, cmdline_len: int) -> bytes:
    """struct pvsched_boot_info as testguest_boot.h defines it (through cffi, nothing copied by hand)."""
    ffi = boot.ffi()
    bi = ffi.new("struct pvsched_boot_info *")
    bi.magic = boot.C.PVSCHED_BOOT_INFO_MAGIC
    bi.nr_vcpus = nr_vcpus
    bi.mem_size = mem_size
    bi.tsc_khz = tsc_khz
    bi.cmdline_gpa = cmdline_gpa
    bi.cmdline_len = cmdline_len
    return bytes(ffi.buffer(bi))


def setup_testguest(machine, data: bytes, cmdline: str, name: str = "kernel") -> ElfImage:
    """Load a test-guest ELF and set every vCPU to its 64-bit entry by the boot contract."""
    mem = machine.memory
    raw = cmdline.encode()
    if len(raw) > x86.TESTGUEST_CMDLINE_MAX:
        raise ImageError(f"command line is {len(raw)} bytes; the test guest takes at most {x86.TESTGUEST_CMDLINE_MAX}")
    img = load_elf(mem, data, name)
    x86.write_boot_tables(mem)
    mem.write(x86.TESTGUEST_CMDLINE_ADDR, raw + b"\0")
    tsc_khz = machine.tsc_khz()
    mem.write(x86.BOOT_INFO_ADDR, boot_info_bytes(machine.nr_vcpus, mem.size, tsc_khz,
                                                  x86.TESTGUEST_CMDLINE_ADDR, len(raw)))
    for v in machine.vcpus:
        x86.set_long_mode(v, img.entry, x86.STACK_TOP - v.index * x86.STACK_SIZE, rdi=v.index,
                          rsi=x86.BOOT_INFO_ADDR)
        machine.set_runnable(v)
    return img
