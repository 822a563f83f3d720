"""Minimal ACPI tables for Linux guests: RSDP -> XSDT -> MADT (CPUs, IOAPIC, LINT1 NMI).

Kernels built without CONFIG_X86_MPPARSE (Debian's cloud kernel among them)
find their CPUs only through the MADT.  There is deliberately no FADT/DSDT:
Linux enumerates CPUs and the IOAPIC from the MADT early in setup_arch, then
finds no ACPI namespace, disables the ACPI interpreter, and probes PCI
directly (configuration mechanism #1), as it does without ACPI at all; the
legacy PIC and PIT stay in use.  ISA IRQs map 1:1 to IOAPIC pins, matching
KVM's default GSI routing (no interrupt source overrides).
Reference: ACPI 6.4, sections 5.2.5 (RSDP), 5.2.8 (XSDT), 5.2.12 (MADT).
"""

from __future__ import annotations

import struct

RSDP_ADDR = 0xE0000  # Linux scans 0xE0000-0xFFFFF for "RSD PTR "
OEM_ID = b"PYVMM "
OEM_TABLE_ID = b"PVSCHED "
LAPIC_ADDR, IOAPIC_ADDR = 0xFEE00000, 0xFEC00000
MADT_PCAT_COMPAT = 1
MADT_LAPIC, MADT_IOAPIC, MADT_LAPIC_NMI = 0, 1, 4
LAPIC_ENABLED = 1


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


def acpi_tables(nr_vcpus: int, addr: int = RSDP_ADDR) -> bytes:
    """RSDP at addr, followed by the XSDT and the MADT, as one blob to copy to guest memory at addr."""
    xsdt_addr = addr + 48          # RSDP is 36 bytes; keep tables 16-byte aligned
    madt_addr = xsdt_addr + 48     # XSDT is 36 + 8 bytes
    xsdt = sdt(b"XSDT", 1, struct.pack("<Q", madt_addr))
    rsdp = bytearray(struct.pack("<8sB6sBIIQB3x", b"RSD PTR ", 0, OEM_ID, 2, 0, 36, xsdt_addr, 0))
    rsdp[8] = _checksum(rsdp[:20])
    rsdp[32] = _checksum(rsdp)
    blob = bytes(rsdp).ljust(48, b"\0") + xsdt.ljust(48, b"\0") + madt(nr_vcpus)
    return blob
