"""Guest RAM: GPA translation refuses what is not RAM, and the memfd others receive cannot be resized."""

from __future__ import annotations

import os

import pytest

from pyvmm.vmm.memory import GIB, HIGH_RAM_START, LOW_RAM_END, MIB, GuestMemory, GuestMemoryError


def test_gpa_to_hva_within_ram_and_refusals_outside() -> None:
    m = GuestMemory(64 * MIB)
    try:
        m.write(0x1000, b"pvsc")
        assert m.read(0x1000, 4) == b"pvsc"
        assert m.hva(0x1000) == m.base + 0x1000
        for gpa, length in [(64 * MIB - 1, 2), (64 * MIB, 1), (LOW_RAM_END, 4), (-1, 1), ((1 << 64) - 1, 2)]:
            with pytest.raises(GuestMemoryError):
                m.hva(gpa, length)
    finally:
        m.close()


def test_ram_above_the_mmio_hole_lands_at_4g() -> None:
    m = GuestMemory(3 * GIB + 64 * MIB)
    try:
        assert [(r.gpa, r.size) for r in m.regions] == [(0, LOW_RAM_END), (HIGH_RAM_START, 3 * GIB + 64 * MIB - LOW_RAM_END)]
        assert m.file_offset(HIGH_RAM_START) == LOW_RAM_END
        with pytest.raises(GuestMemoryError):
            m.hva(LOW_RAM_END - 4, 8)  # straddles the hole
    finally:
        m.close()


def test_guest_ram_memfd_is_sealed_against_resizing() -> None:
    """A policy process holding a dup of the fd must not be able to SIGBUS the VMM by shrinking RAM."""
    m = GuestMemory(16 * MIB)
    try:
        dup = os.dup(m.fd)
        try:
            with pytest.raises(PermissionError):
                os.ftruncate(dup, 4096)
            with pytest.raises(PermissionError):
                os.ftruncate(dup, 32 * MIB)
            assert os.fstat(dup).st_size == 16 * MIB
        finally:
            os.close(dup)
    finally:
        m.close()


def test_too_small_memory_is_refused_with_a_clear_message() -> None:
    with pytest.raises(GuestMemoryError, match="too small"):
        GuestMemory(1 * MIB)
