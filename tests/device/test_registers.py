"""The BAR0 register file alone (pure logic): the table against pvsched_abi.h, reads, writes, bad accesses.

No device and no VM: the table is built over plain latches with a recording CONTROL, so each rule of
registers.py is seen on its own.  Offsets, access modes and constants come from the header (through
pyvmm.abi and its text), never from numbers written here.
"""

from __future__ import annotations

import re
import threading
from dataclasses import fields

import pytest

from pyvmm import abi
from pyvmm.device.registers import REG, Access, Latches, Register, RegisterFile, pvsched_bar0

C = abi.C
HOST_VERSION = C.PVSCHED_VERSION
HOST_FEATURES = C.PVSCHED_F_ALL
NR_VCPUS = 3


def _header_access() -> dict[str, Access]:
    """Each register's access as pvsched_abi.h's comments state it ("/* RO */", "/* RW */", "/* WO */")."""
    text = abi.ABI_HEADER.read_text()
    found = re.findall(r"PVSCHED_REG_(\w+)\s*=\s*\w+,\s*/\*\s*(RO|RW|WO)\b", text)
    return {name: Access[mode] for name, mode in found}


class Bar0:
    """A register file over plain latches; CONTROL writes and reports are recorded."""

    def __init__(self) -> None:
        self.latches = Latches()
        self.controls: list[int] = []
        self.reports: list[str] = []
        self.control_warning: tuple[str, str] | None = None
        self.file = RegisterFile(pvsched_bar0(self.latches, HOST_VERSION, HOST_FEATURES, lambda: NR_VCPUS,
                                              self._control),
                                 C.PVSCHED_BAR0_SIZE, threading.Lock(), self.reports.append)

    def _control(self, value: int) -> tuple[str, str] | None:
        self.controls.append(value)
        return self.control_warning


@pytest.fixture
def bar0() -> Bar0:
    """A fresh BAR0 register file."""
    return Bar0()


def test_the_table_is_the_headers_register_map(bar0: Bar0) -> None:
    header = _header_access()
    assert len(header) == len(abi.ffi().typeof("enum pvsched_reg").elements) > 0  # every register has a mode
    table = {r.name: r for r in bar0.file.registers()}
    assert set(table) == set(header) == set(REG)
    for name, reg in table.items():
        assert reg.offset == getattr(C, f"PVSCHED_REG_{name}"), name
        assert reg.access is header[name], name
        assert reg.size == 4  # "32-bit little-endian accesses only"


def test_every_register_reads_at_its_offset_and_size(bar0: Bar0) -> None:
    bar0.latches.guest_features, bar0.latches.guest_version = C.PVSCHED_F_WAKE_HINT, C.PVSCHED_VERSION
    bar0.latches.gpa_lo, bar0.latches.gpa_hi, bar0.latches.shm_size = 0x1000, 0x2, 8192
    bar0.latches.status = C.PVSCHED_STATUS_BAD_FEATURE  # negative: read as its 32 bits
    expected = {
        "MAGIC": C.PVSCHED_MAGIC, "HOST_VERSION": HOST_VERSION, "HOST_FEATURES": HOST_FEATURES,
        "GUEST_FEATURES": C.PVSCHED_F_WAKE_HINT, "GUEST_VERSION": C.PVSCHED_VERSION, "NR_VCPUS": NR_VCPUS,
        "SHM_GPA_LO": 0x1000, "SHM_GPA_HI": 0x2, "SHM_SIZE": 8192, "CONTROL": 0,  # write-only
        "STATUS": C.PVSCHED_STATUS_BAD_FEATURE & 0xFFFFFFFF,
    }
    assert set(expected) == set(REG)
    for reg in bar0.file.registers():
        assert bar0.file.read(reg.offset, reg.size) == expected[reg.name], reg.name
    assert bar0.reports == []  # good accesses are not logged


def test_rw_registers_latch_32_bits_and_reset_clears_them(bar0: Bar0) -> None:
    for i, reg in enumerate(r for r in bar0.file.registers() if r.access is Access.RW):
        bar0.file.write(reg.offset, 4, (0xAB << 32) | (0x1000 + i))  # bits above 32 are dropped
        assert bar0.file.read(reg.offset, 4) == 0x1000 + i, reg.name
    assert bar0.latches.gpa == (0x1000 + 3) << 32 | (0x1000 + 2)  # SHM_GPA_HI:SHM_GPA_LO
    bar0.latches.status = C.PVSCHED_STATUS_ACTIVE
    bar0.latches.reset()
    assert [bar0.file.read(REG[n], 4) for n in ("GUEST_FEATURES", "GUEST_VERSION", "SHM_GPA_LO", "SHM_GPA_HI",
                                                 "SHM_SIZE", "STATUS")] == [0] * 5 + [C.PVSCHED_STATUS_IDLE]


def test_writes_to_read_only_registers_are_ignored_and_logged_once(bar0: Bar0) -> None:
    ro = [r for r in bar0.file.registers() if r.access is Access.RO]
    assert {r.name for r in ro} >= {"MAGIC", "HOST_VERSION", "HOST_FEATURES", "NR_VCPUS", "STATUS"}
    before = {r.name: bar0.file.read(r.offset, 4) for r in ro}
    for _ in range(3):
        for r in ro:
            bar0.file.write(r.offset, 4, 0x12345678)
    assert {r.name: bar0.file.read(r.offset, 4) for r in ro} == before
    assert bar0.latches == Latches() and bar0.controls == []
    assert len(bar0.reports) == 1 and "read-only register" in bar0.reports[0]


def test_control_gets_the_value_and_its_warning_is_logged_once(bar0: Bar0) -> None:
    bar0.control_warning = ("ctl-unknown", "unknown CONTROL value ignored")
    for value in (C.PVSCHED_CTRL_ENABLE, 0x77, (1 << 40) | C.PVSCHED_CTRL_RESET):
        bar0.file.write(REG["CONTROL"], 4, value)
    assert bar0.controls == [C.PVSCHED_CTRL_ENABLE, 0x77, C.PVSCHED_CTRL_RESET]
    assert bar0.reports == ["unknown CONTROL value ignored"]


BAD_ACCESSES = {
    # kind: (offset, size) accesses of that kind, all matching no register exactly
    "unaligned": [(REG["MAGIC"] + 1, 4), (REG["SHM_SIZE"] + 2, 4), (REG["STATUS"] + 3, 4)],
    "oversized": [(REG["MAGIC"], 8), (REG["SHM_GPA_LO"], 8)],
    "undersized": [(REG["SHM_SIZE"], 1), (REG["STATUS"], 2)],
    "out of range": [(max(REG.values()) + 4, 4), (C.PVSCHED_BAR0_SIZE - 4, 4), (C.PVSCHED_BAR0_SIZE, 4),
                     (C.PVSCHED_BAR0_SIZE + 0x100, 4)],
}


@pytest.mark.parametrize("kind", BAD_ACCESSES)
def test_bad_accesses_read_0_change_nothing_and_warn_once(bar0: Bar0, kind: str) -> None:
    latches = Latches(guest_features=1, guest_version=2, gpa_lo=3, gpa_hi=4, shm_size=5)
    for f in fields(latches):
        setattr(bar0.latches, f.name, getattr(latches, f.name))
    for _ in range(5):
        for offset, size in BAD_ACCESSES[kind]:
            assert bar0.file.read(offset, size) == 0, (offset, size)
            bar0.file.write(offset, size, 0xFFFFFFFF)
    assert bar0.latches == latches and bar0.controls == []
    # One line per kind of misbehaviour however often it recurs: reads and writes of an unknown offset are
    # two kinds, a wrong access size (read or write) is one.
    if kind in ("oversized", "undersized"):
        assert len(bar0.reports) == 1 and "only 32-bit accesses" in bar0.reports[0], bar0.reports
    else:
        assert len(bar0.reports) == 2, bar0.reports
        assert "read of unknown offset" in bar0.reports[0] and "write to unknown offset" in bar0.reports[1]


def test_a_table_with_overlapping_or_inconsistent_registers_is_refused() -> None:
    lock = threading.Lock()
    a = Register("A", 0x0, Access.RO, read=lambda: 1)
    with pytest.raises(ValueError, match="overlaps"):
        RegisterFile([a, Register("B", 0x2, Access.RO, read=lambda: 2, size=2)], 16, lock, print)
    with pytest.raises(ValueError, match="overlaps"):  # unaligned
        RegisterFile([Register("B", 0x6, Access.RO, read=lambda: 2)], 16, lock, print)
    with pytest.raises(ValueError, match="outside the BAR"):
        RegisterFile([Register("B", 0x10, Access.RO, read=lambda: 2)], 16, lock, print)
    with pytest.raises(ValueError, match="access ro"):  # a read-only register with a writer
        RegisterFile([Register("B", 0x4, Access.RO, read=lambda: 2, write=lambda v: None)], 16, lock, print)
    with pytest.raises(ValueError, match="access wo"):  # a write-only register with a reader
        RegisterFile([Register("B", 0x4, Access.WO, read=lambda: 2, write=lambda v: None)], 16, lock, print)
