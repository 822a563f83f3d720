"""x86-64 CPU state the loaders share: guest low-memory layout, page tables, GDT, 64-bit entry state.

Low-memory layout (Linux loads at 1 MiB; test-guest ELF segments must lie at
or above 0x80000, so nothing here can collide with them):

| GPA | what |
| --- | --- |
| 0x00500 | GDT: 0x10 code64, 0x18 data, 0x20 TSS (Linux's __BOOT_CS/__BOOT_DS) |
| 0x00520 | IDT (empty: the guest loads its own) |
| 0x01000 | test guest: struct pvsched_boot_info (pyvmm/abi/testguest_boot.h) |
| 0x02000 | test guest: command line (NUL-terminated, at most 4095 bytes) |
| 0x07000 | Linux: zero page (struct boot_params) |
| 0x10000 | PML4, then the PDPT, then one page directory per GiB mapped (2 MiB pages) |
| 0x60000-0x80000 | test guest: boot stacks, 4 KiB per vCPU (RSP of vCPU n = 0x80000 - n * 4 KiB) |
| 0x90000 | Linux: command line |
| 0x9FC00-0x100000 | reserved in e820 (EBDA/BIOS area); ACPI RSDP/XSDT/MADT at 0xE0000, MP table at 0xF0000 |

The page tables identity-map [0, max(4 GiB, end of RAM)) with 2 MiB pages,
which covers RAM, the PCI MMIO window, the IOAPIC and the LAPIC at 0xFEE00000.
"""

from __future__ import annotations

import struct

from pyvmm.vmm import kvm
from pyvmm.vmm.memory import GIB, GuestMemory

GDT_ADDR = 0x500
IDT_ADDR = 0x520
BOOT_INFO_ADDR = 0x1000
TESTGUEST_CMDLINE_ADDR = 0x2000
TESTGUEST_CMDLINE_MAX = 0x1000 - 1
ZERO_PAGE_ADDR = 0x7000
PML4_ADDR = 0x10000
PDPT_ADDR = 0x11000
PD_ADDR = 0x12000
PD_MAX = (0x60000 - PD_ADDR) // 0x1000  # page directories that fit: 78 GiB of address space
STACK_TOP = 0x80000
STACK_SIZE = 0x1000
MAX_VCPUS = (STACK_TOP - 0x60000) // STACK_SIZE  # 32
LINUX_CMDLINE_ADDR = 0x90000
LINUX_CMDLINE_MAX = 0x9FC00 - LINUX_CMDLINE_ADDR - 1
EBDA_START = 0x9FC00
MPTABLE_ADDR = 0xF0000
HIMEM_START = 0x100000
TESTGUEST_LOAD_MIN = STACK_TOP

BOOT_CS, BOOT_DS, BOOT_TSS = 0x10, 0x18, 0x20

CR0_PE, CR0_MP, CR0_ET, CR0_NE, CR0_PG = 1 << 0, 1 << 1, 1 << 4, 1 << 5, 1 << 31
CR4_PAE = 1 << 5
EFER_LME, EFER_LMA = 1 << 8, 1 << 10
PDE_PRESENT, PDE_RW, PDE_PS = 1 << 0, 1 << 1, 1 << 7


def gdt_entry(flags: int, base: int, limit: int) -> int:
    """A segment descriptor from access/flags bits (as in 0xa09b), base and 20-bit limit."""
    return (((base & 0xFF000000) << 32) | ((flags & 0xF0FF) << 40) | ((limit & 0xF0000) << 32)
            | ((base & 0xFFFFFF) << 16) | (limit & 0xFFFF))


GDT = [0, 0, gdt_entry(0xA09B, 0, 0xFFFFF), gdt_entry(0xC093, 0, 0xFFFFF), gdt_entry(0x808B, 0, 0xFFFFF)]


def segment_from_gdt(entry: int, selector: int) -> kvm.kvm_segment:
    """The kvm_segment KVM wants for a descriptor, as if the guest had loaded it."""
    g = (entry >> 55) & 1
    limit = ((entry >> 32) & 0xF0000) | (entry & 0xFFFF)
    present = (entry >> 47) & 1
    return kvm.kvm_segment(
        base=((entry >> 16) & 0xFFFFFF) | (((entry >> 56) & 0xFF) << 24),
        limit=(limit << 12) | 0xFFF if g else limit, selector=selector,
        type=(entry >> 40) & 0xF, present=present, dpl=(entry >> 45) & 3, db=(entry >> 54) & 1,
        s=(entry >> 44) & 1, l=(entry >> 53) & 1, g=g, avl=(entry >> 52) & 1, unusable=0 if present else 1)


def mapped_end(mem: GuestMemory) -> int:
    """End of the identity map: all of RAM and at least the 32-bit space (MMIO, IOAPIC, LAPIC)."""
    ram_end = max(r.gpa + r.size for r in mem.regions)
    return max(4 * GIB, (ram_end + GIB - 1) // GIB * GIB)


def write_boot_tables(mem: GuestMemory) -> None:
    """GDT, empty IDT and identity-mapping page tables into low guest memory."""
    mem.write(GDT_ADDR, b"".join(struct.pack("<Q", e) for e in GDT))
    mem.write(IDT_ADDR, bytes(8))
    nr_pd = mapped_end(mem) // GIB
    if nr_pd > PD_MAX:
        raise ValueError(f"guest address space of {nr_pd} GiB is more than the boot page tables map ({PD_MAX} GiB)")
    mem.write(PML4_ADDR, struct.pack("<Q", PDPT_ADDR | PDE_PRESENT | PDE_RW) + bytes(4088))
    mem.write(PDPT_ADDR, b"".join(struct.pack("<Q", (PD_ADDR + i * 0x1000) | PDE_PRESENT | PDE_RW)
                                  for i in range(nr_pd)) + bytes(8 * (512 - nr_pd)))
    for i in range(nr_pd):
        mem.write(PD_ADDR + i * 0x1000,
                  b"".join(struct.pack("<Q", (i * GIB + j * (2 << 20)) | PDE_PRESENT | PDE_RW | PDE_PS)
                           for j in range(512)))


def set_long_mode(vcpu: kvm.Vcpu, rip: int, rsp: int, rdi: int = 0, rsi: int = 0) -> None:
    """Put a vCPU straight into 64-bit mode at CPL0 with paging on (no real mode, no INIT/SIPI)."""
    s = vcpu.get_sregs()
    code = segment_from_gdt(GDT[BOOT_CS // 8], BOOT_CS)
    data = segment_from_gdt(GDT[BOOT_DS // 8], BOOT_DS)
    s.cs = code
    s.ds = s.es = s.fs = s.gs = s.ss = data
    s.tr = segment_from_gdt(GDT[BOOT_TSS // 8], BOOT_TSS)
    s.gdt.base, s.gdt.limit = GDT_ADDR, len(GDT) * 8 - 1
    s.idt.base, s.idt.limit = IDT_ADDR, 7
    s.cr0 = CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_PG
    s.cr3 = PML4_ADDR
    s.cr4 = CR4_PAE
    s.efer = EFER_LME | EFER_LMA
    vcpu.set_sregs(s)
    r = kvm.kvm_regs(rip=rip, rsp=rsp, rbp=0, rdi=rdi, rsi=rsi, rflags=2)
    vcpu.set_regs(r)


APIC_LVT0, APIC_LVT1 = 0x350, 0x360
APIC_MODE_NMI, APIC_MODE_EXTINT = 0x4, 0x7


def set_lint(vcpu: kvm.Vcpu) -> None:
    """LINT0 = ExtINT (the PIC), LINT1 = NMI, as firmware leaves the local APIC."""
    st = vcpu.get_lapic()
    buf = memoryview(st).cast("B")
    for off, mode in ((APIC_LVT0, APIC_MODE_EXTINT), (APIC_LVT1, APIC_MODE_NMI)):
        v = struct.unpack_from("<I", buf, off)[0]
        struct.pack_into("<I", buf, off, (v & ~0x700) | (mode << 8))
    vcpu.set_lapic(st)


CPUID_1_ECX_AVX, CPUID_1_ECX_HYPERVISOR = 1 << 28, 1 << 31
CPUID_7_EBX_MPX, CPUID_7_EBX_AVX512F, CPUID_7_ECX_PKU = 1 << 14, 1 << 16, 1 << 3
XSAVE_LEGACY_SIZE = 576  # the FXSAVE area (512) plus the XSAVE header (64): XCR0 = x87 | SSE
# XCR0 bits -> the CPUID bit (leaf, register, mask) without which Linux does not enable that state.
XFEATURE_NEEDS = {2: (1, "ecx", CPUID_1_ECX_AVX), 3: (7, "ebx", CPUID_7_EBX_MPX), 4: (7, "ebx", CPUID_7_EBX_MPX),
                  5: (7, "ebx", CPUID_7_EBX_AVX512F), 6: (7, "ebx", CPUID_7_EBX_AVX512F),
                  7: (7, "ebx", CPUID_7_EBX_AVX512F), 9: (7, "ecx", CPUID_7_ECX_PKU)}


def _leaf(c: object, function: int, index: int = 0) -> object | None:
    for i in range(c.nent):
        e = c.entries[i]
        if e.function == function and e.index == index:
            return e
    return None


def _fix_xsave_leaf(c: object) -> None:
    """Make leaf 0xD agree with the rest: offer only the XCR0 states whose feature bits are offered
    (Linux enables every state it is offered and whose feature bit it sees), ECX sized for all of them.

    EBX is the size for the states enabled in XCR0: KVM recomputes it from its view of the guest's XCR0,
    so the value here is only the one at reset (x87 | SSE)."""
    d0 = _leaf(c, 0xD, 0)
    if d0 is None:
        return
    mask = d0.eax | d0.edx << 32
    for bit, (leaf, reg, need) in XFEATURE_NEEDS.items():
        e = _leaf(c, leaf, 0)
        if mask >> bit & 1 and (e is None or not getattr(e, reg) & need):
            mask &= ~(1 << bit)
    end = XSAVE_LEGACY_SIZE
    for i in range(c.nent):
        e = c.entries[i]
        if e.function == 0xD and e.index >= 2:
            if mask >> e.index & 1:
                end = max(end, e.ebx + e.eax)      # offset + size of a user state
            else:
                e.eax = e.ebx = e.ecx = e.edx = 0
    d0.eax, d0.edx = mask & 0xFFFFFFFF, mask >> 32
    d0.ebx, d0.ecx = XSAVE_LEGACY_SIZE, end


def vcpu_cpuid(supported: object, vcpu_id: int) -> object:
    """The supported CPUID for one vCPU: its APIC id in leaves 1 and 0xB/0x1F, the hypervisor bit (so the
    guest finds KVM's paravirtual leaves at 0x40000000: kvm-clock, a TSC of known frequency), leaf 0xD
    consistent with the features offered."""
    t = type(supported)
    c = t.from_buffer_copy(supported)
    for i in range(c.nent):
        e = c.entries[i]
        if e.function == 1:
            e.ebx = (e.ebx & 0x00FFFFFF) | (vcpu_id << 24)
            e.ecx |= CPUID_1_ECX_HYPERVISOR
        elif e.function in (0xB, 0x1F):
            e.edx = vcpu_id
    _fix_xsave_leaf(c)
    return c
