"""ACPI tables for Linux guests: RSDP -> XSDT -> FADT (-> FACS, DSDT) and MADT.

- MADT: one enabled local APIC per vCPU (APIC id = vCPU id), the IOAPIC at
  GSI 0, NMI on LINT1.  Kernels built without CONFIG_X86_MPPARSE (Debian's
  cloud kernel among them) find their CPUs only here.  ISA IRQs map 1:1 to
  IOAPIC pins, matching KVM's default GSI routing (no source overrides).
- FADT: a fixed-hardware PM block in I/O space (pyvmm/vmm/acpi_pm.py serves it):
  PM1a event and control registers, a 32-bit PM timer, and a reset
  register.  No SMI_CMD, so the guest finds ACPI already enabled.  Writing
  SLP_TYP=S5 with SLP_EN to PM1a_CNT is power-off (what `poweroff` does once
  the DSDT names \\_S5); the reset register is what `reboot` tries first.
  There is no CMOS RTC (ports 0x70/0x71 read all ones, on which Linux's
  RTC probe spins for seconds per access), and the FADT says so.
- DSDT: `\\_S5` and a PCI root bridge (PNP0A03, bus 0).  With ACPI active,
  Linux finds PCI buses only through root bridges in the namespace; its
  _CRS names bus 0-255, the I/O ports and the 32-bit MMIO window, and since
  no PCI device of pyvmm raises INTx there is no _PRT.

References: ACPI 6.4, sections 5.2.5 (RSDP), 5.2.8 (XSDT), 5.2.9 (FADT),
5.2.10 (FACS), 5.2.12 (MADT), 4.8 (fixed hardware registers), 19/20 (AML).
"""

from __future__ import annotations

import struct

from pyvmm.vmm.memory import PCI_MMIO_END, PCI_MMIO_START

RSDP_ADDR = 0xE0000  # Linux scans 0xE0000-0xFFFFF for "RSD PTR "
OEM_ID = b"PYVMM "
OEM_TABLE_ID = b"PVSCHED "
LAPIC_ADDR, IOAPIC_ADDR = 0xFEE00000, 0xFEC00000
MADT_PCAT_COMPAT = 1
MADT_LAPIC, MADT_IOAPIC, MADT_LAPIC_NMI = 0, 1, 4
LAPIC_ENABLED = 1

# The fixed-hardware PM block in I/O space (QEMU's PIIX4 uses the same base).
PM_BASE = 0x600
PM1A_EVT, PM1_EVT_LEN = PM_BASE, 4         # PM1 status (2 bytes), then PM1 enable (2 bytes)
PM1A_CNT, PM1_CNT_LEN = PM_BASE + 4, 2
PM_TMR, PM_TMR_LEN = PM_BASE + 8, 4
RESET_REG = PM_BASE + 0xC
PM_BLOCK_LEN = 0x10
RESET_VALUE = 0x01
SCI_IRQ = 9
SLP_TYP_S5 = 5                               # the value \_S5 tells the guest to write as SLP_TYP
PM1_CNT_SCI_EN, PM1_CNT_SLP_EN = 1 << 0, 1 << 13
PM1_CNT_SLP_TYP_SHIFT, PM1_CNT_SLP_TYP_MASK = 10, 0x7
PM_TIMER_HZ = 3_579_545

FADT_REVISION, FADT_MINOR = 6, 4
FADT_LEN = 276
FADT_WBINVD, FADT_PWR_BUTTON, FADT_SLP_BUTTON, FADT_TMR_VAL_EXT, FADT_RESET_REG_SUP = (
    1 << 0, 1 << 4, 1 << 5, 1 << 8, 1 << 10)
IAPC_LEGACY_DEVICES = 1 << 0                 # PIT, PIC, UART; no i8042 keyboard controller (bit 1)
IAPC_NO_CMOS_RTC = 1 << 5                    # no MC146818: Linux takes wall-clock time from kvm-clock
GAS_SYSTEM_IO = 1
GAS_ACCESS_BYTE, GAS_ACCESS_WORD, GAS_ACCESS_DWORD = 1, 2, 3
FACS_LEN = 64


def _checksum(b: bytes | bytearray) -> int:
    return (-sum(b)) & 0xFF


def sdt(signature: bytes, revision: int, body: bytes) -> bytes:
    """A system description table: the 36-byte header with length and checksum, then body."""
    header = struct.pack("<4sIBB6s8sI4sI", signature, 36 + len(body), revision, 0, OEM_ID, OEM_TABLE_ID, 1,
                         b"PYVM", 1)
    t = bytearray(header + body)
    t[9] = _checksum(t)
    return bytes(t)


def madt(nr_vcpus: int) -> bytes:
    """MADT: one enabled local APIC per vCPU (APIC id = vCPU id), the IOAPIC at GSI 0, NMI on LINT1."""
    body = struct.pack("<II", LAPIC_ADDR, MADT_PCAT_COMPAT)
    for i in range(nr_vcpus):
        body += struct.pack("<BBBBI", MADT_LAPIC, 8, i, i, LAPIC_ENABLED)
    body += struct.pack("<BBBBII", MADT_IOAPIC, 12, nr_vcpus, 0, IOAPIC_ADDR, 0)
    body += struct.pack("<BBBHB", MADT_LAPIC_NMI, 6, 0xFF, 0, 1)
    return sdt(b"APIC", 4, body)


def gas(address: int, bit_width: int, access: int, space: int = GAS_SYSTEM_IO) -> bytes:
    """A Generic Address Structure (12 bytes)."""
    return struct.pack("<BBBBQ", space, bit_width, 0, access, address)


def facs() -> bytes:
    """FACS: no waking vector, no global lock owner (the guest never sleeps to S1-S4 here)."""
    return struct.pack("<4sIIIIIB3sII24s", b"FACS", FACS_LEN, 0, 0, 0, 0, 2, b"\0" * 3, 0, 0, b"\0" * 24)


def fadt(dsdt_addr: int, facs_addr: int) -> bytes:
    """FADT revision 6 with the PM block at PM_BASE, SCI on IRQ 9, and the reset register."""
    b = bytearray(FADT_LEN - 36)

    def put(off: int, fmt: str, *v: int | bytes) -> None:
        struct.pack_into(fmt, b, off - 36, *v)

    put(36, "<II", facs_addr, dsdt_addr)
    put(46, "<H", SCI_IRQ)
    put(56, "<I", PM1A_EVT)
    put(64, "<I", PM1A_CNT)
    put(76, "<I", PM_TMR)
    put(88, "<BBBB", PM1_EVT_LEN, PM1_CNT_LEN, 0, PM_TMR_LEN)
    put(96, "<HH", 101, 1001)            # C2/C3 latencies above 100/1000 us: no C2/C3
    put(109, "<H", IAPC_LEGACY_DEVICES | IAPC_NO_CMOS_RTC)
    put(112, "<I", FADT_WBINVD | FADT_PWR_BUTTON | FADT_SLP_BUTTON | FADT_TMR_VAL_EXT | FADT_RESET_REG_SUP)
    b[116 - 36:128 - 36] = gas(RESET_REG, 8, GAS_ACCESS_BYTE)
    put(128, "<B", RESET_VALUE)
    put(131, "<B", FADT_MINOR)
    put(132, "<QQ", facs_addr, dsdt_addr)
    b[148 - 36:160 - 36] = gas(PM1A_EVT, 8 * PM1_EVT_LEN, GAS_ACCESS_WORD)
    b[172 - 36:184 - 36] = gas(PM1A_CNT, 8 * PM1_CNT_LEN, GAS_ACCESS_WORD)
    b[208 - 36:220 - 36] = gas(PM_TMR, 8 * PM_TMR_LEN, GAS_ACCESS_DWORD)
    return sdt(b"FACP", FADT_REVISION, bytes(b))


# --- AML: just the encodings the DSDT below needs (ACPI 6.4, section 20) ---
AML_ZERO, AML_ONE, AML_BYTE, AML_DWORD = 0x00, 0x01, 0x0A, 0x0C
AML_NAME, AML_SCOPE, AML_PACKAGE = 0x08, 0x10, 0x12
AML_EXT, AML_DEVICE = 0x5B, 0x82


def aml_pkglength(n: int) -> bytes:
    """PkgLength encoding of a body of n bytes (the length counts its own encoding)."""
    for size in (1, 2, 3, 4):
        total = n + size
        if size == 1 and total < 0x40:
            return bytes([total])
        if size > 1 and total < 1 << (4 + 8 * (size - 1)):
            out = [((size - 1) << 6) | (total & 0xF)]
            total >>= 4
            for _ in range(size - 1):
                out.append(total & 0xFF)
                total >>= 8
            return bytes(out)
    raise ValueError(f"AML object of {n} bytes is too large")


def aml_name_seg(name: str) -> bytes:
    """A 4-character NameSeg, padded with '_'."""
    if not 1 <= len(name) <= 4:
        raise ValueError(f"AML name {name!r} is not 1-4 characters")
    return name.ljust(4, "_").encode()


def aml_integer(v: int) -> bytes:
    """The shortest AML integer constant for v (32 bits at most here)."""
    if v == 0:
        return bytes([AML_ZERO])
    if v == 1:
        return bytes([AML_ONE])
    if v < 0x100:
        return bytes([AML_BYTE, v])
    return bytes([AML_DWORD]) + struct.pack("<I", v)


def aml_name(name: str, value: bytes) -> bytes:
    """Name(name, value)."""
    return bytes([AML_NAME]) + aml_name_seg(name) + value


def aml_package(*elements: int) -> bytes:
    """Package() { integers... }."""
    body = bytes([len(elements)]) + b"".join(aml_integer(e) for e in elements)
    return bytes([AML_PACKAGE]) + aml_pkglength(len(body)) + body


def aml_scope(path: bytes, *terms: bytes) -> bytes:
    """Scope(path) { terms... }; path is raw NameString bytes (e.g. b"\\\\_SB_")."""
    body = path + b"".join(terms)
    return bytes([AML_SCOPE]) + aml_pkglength(len(body)) + body


def aml_device(name: str, *terms: bytes) -> bytes:
    """Device(name) { terms... }."""
    body = aml_name_seg(name) + b"".join(terms)
    return bytes([AML_EXT, AML_DEVICE]) + aml_pkglength(len(body)) + body


def eisa_id(s: str) -> int:
    """The compressed EISA id of a 7-character PNP id such as "PNP0A03"."""
    c = [ord(ch) - 0x40 for ch in s[:3]]
    v = (c[0] << 26) | (c[1] << 21) | (c[2] << 16) | int(s[3:], 16)
    return int.from_bytes(v.to_bytes(4, "big"), "little")


AML_BUFFER = 0x11
RES_IO, RES_END = 0x47, 0x79
RES_WORD, RES_DWORD = 0x88, 0x87
RES_TYPE_MEMORY, RES_TYPE_IO, RES_TYPE_BUS = 0, 1, 2
RES_MIN_MAX_FIXED = 0x0C       # general flags: _MIF and _MAF, a producer with positive decode


def aml_buffer(data: bytes) -> bytes:
    """Buffer() { data }."""
    body = aml_integer(len(data)) + data
    return bytes([AML_BUFFER]) + aml_pkglength(len(body)) + body


def res_word(kind: int, lo: int, hi: int) -> bytes:
    """A Word Address Space descriptor (bus numbers or I/O ports) for [lo, hi]."""
    return struct.pack("<BHBBBHHHHH", RES_WORD, 13, kind, RES_MIN_MAX_FIXED, 0, 0, lo, hi, 0, hi - lo + 1)


def res_dword_memory(lo: int, hi: int) -> bytes:
    """A DWord memory window [lo, hi] (non-cacheable, read-write)."""
    return struct.pack("<BHBBBIIIII", RES_DWORD, 23, RES_TYPE_MEMORY, RES_MIN_MAX_FIXED, 1, 0, lo, hi, 0,
                       hi - lo + 1)


def pci_root_crs(mmio_start: int, mmio_end: int) -> bytes:
    """The root bridge's resources: bus 0-255, config ports 0xCF8-0xCFF, the rest of I/O, the MMIO window."""
    io_cf8 = struct.pack("<BBHHBB", RES_IO, 1, 0xCF8, 0xCF8, 1, 8)
    body = (res_word(RES_TYPE_BUS, 0, 0xFF) + io_cf8 + res_word(RES_TYPE_IO, 0, 0xCF7)
            + res_word(RES_TYPE_IO, 0xD00, 0xFFFF) + res_dword_memory(mmio_start, mmio_end - 1))
    return aml_buffer(body + bytes([RES_END, 0]))


def dsdt() -> bytes:
    """DSDT: \\_S5 (SLP_TYP for PM1a and PM1b) and the PCI root bridge \\_SB.PCI0 on bus 0."""
    s5 = aml_name("_S5", aml_package(SLP_TYP_S5, SLP_TYP_S5, 0, 0))
    pci0 = aml_device("PCI0",
                      aml_name("_HID", aml_integer(eisa_id("PNP0A03"))),
                      aml_name("_UID", aml_integer(0)),
                      aml_name("_SEG", aml_integer(0)),
                      aml_name("_BBN", aml_integer(0)),
                      aml_name("_CRS", pci_root_crs(PCI_MMIO_START, PCI_MMIO_END)))
    return sdt(b"DSDT", 2, s5 + aml_scope(b"\\_SB_", pci0))


def _align(n: int, a: int = 16) -> int:
    return (n + a - 1) // a * a


def acpi_tables(nr_vcpus: int, addr: int = RSDP_ADDR) -> bytes:
    """RSDP at addr followed by the XSDT, FADT, FACS, DSDT and MADT, as one blob to copy to guest memory."""
    offsets: dict[str, int] = {}
    cursor = 36  # after the RSDP

    def place(name: str, length: int, align: int = 16) -> int:
        nonlocal cursor
        cursor = _align(cursor, align)
        offsets[name] = cursor
        cursor += length
        return addr + offsets[name]

    xsdt_addr = place("xsdt", 36 + 16)
    fadt_addr = place("fadt", FADT_LEN)
    facs_addr = place("facs", FACS_LEN, 64)
    d = dsdt()
    dsdt_addr = place("dsdt", len(d))
    m = madt(nr_vcpus)
    madt_addr = place("madt", len(m))
    tables = {"xsdt": sdt(b"XSDT", 1, struct.pack("<QQ", fadt_addr, madt_addr)),
              "fadt": fadt(dsdt_addr, facs_addr), "facs": facs(), "dsdt": d, "madt": m}
    rsdp = bytearray(struct.pack("<8sB6sBIIQB3x", b"RSD PTR ", 0, OEM_ID, 2, 0, 36, xsdt_addr, 0))
    rsdp[8] = _checksum(rsdp[:20])
    rsdp[32] = _checksum(rsdp)
    blob = bytearray(_align(cursor))
    blob[:36] = rsdp
    for name, t in tables.items():
        blob[offsets[name]:offsets[name] + len(t)] = t
    return bytes(blob)
