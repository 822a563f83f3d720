"""BAR0 of the pvsched device as a table: each register's offset, size, access, and what a read or write does.

The offsets come from pvsched_abi.h (through pyvmm.abi): `REG` names them, `pvsched_bar0()` builds the table,
and `RegisterFile.read/write` only look an access up in it.  An access that matches no register exactly (an
unknown or unaligned offset, a wrong size, beyond the BAR) reads 0 or is ignored and is logged once per kind,
so a hostile guest can neither crash the vCPU loop nor flood the log.  vCPU threads race here: every reader and
writer runs under the lock the owner passes in, the one that guards the rest of its register state.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, fields
from enum import Enum

from pyvmm import abi

C = abi.C

# pvsched_abi.h's BAR0 registers (its enum pvsched_reg), name without the prefix -> offset, by offset.
REG = {name.removeprefix("PVSCHED_REG_"): offset
       for offset, name in sorted(abi.ffi().typeof("enum pvsched_reg").elements.items())}

# pvsched_abi.h's enum pvsched_status, value -> name as the status register's readers spell it ("BAD_GPA")
STATUS_NAMES = {v: n.upper() for v, n in abi.enum_names("pvsched_status", "PVSCHED_STATUS_").items()}

GuestWarning = tuple[str, str]  # (kind, message): logged once per kind


class Access(Enum):
    """Who may do what to a register."""

    RO = "ro"  # writes are ignored (and logged once)
    RW = "rw"  # the guest latches a value and reads it back
    WO = "wo"  # a write acts; a read returns 0


@dataclass(frozen=True)
class Register:
    """One register: where it sits, how wide it is, and what reading or writing it does."""

    name: str
    offset: int
    access: Access
    read: Callable[[], int] | None = None  # RO, RW: the value a read returns
    write: Callable[[int], GuestWarning | None] | None = None  # RW, WO: a write's effect; a warning to log once
    size: int = 4


class RegisterFile:
    """The registers of one BAR, indexed by offset; read/write never raise into the vCPU loop."""

    def __init__(self, registers: Iterable[Register], bar_size: int, lock: threading.Lock,
                 report: Callable[[str], None]) -> None:
        self.bar_size = bar_size
        self._lock = lock
        self._report = report
        self._warned: set[str] = set()
        self._regs: dict[int, Register] = {}
        end = 0
        for r in sorted(registers, key=lambda r: r.offset):
            if r.offset % r.size or r.offset < end or r.offset + r.size > bar_size:
                raise ValueError(f"register {r.name} at {r.offset:#x} overlaps, is unaligned or lies outside the BAR")
            if (r.read is None) != (r.access is Access.WO) or (r.write is None) != (r.access is Access.RO):
                raise ValueError(f"register {r.name}: its reader/writer do not match access {r.access.value}")
            self._regs[r.offset] = r
            end = r.offset + r.size
        # The width an access must have where no register is (all of pvsched's are 32-bit).
        self.access_size = min((r.size for r in self._regs.values()), default=4)

    def registers(self) -> list[Register]:
        """The table, by offset."""
        return list(self._regs.values())

    def warn_once(self, kind: str, msg: str) -> None:
        """Report a guest misbehaviour the first time its kind is seen (call without the lock held)."""
        with self._lock:
            if kind in self._warned:
                return
            self._warned.add(kind)
        self._report(msg)

    def read(self, offset: int, size: int) -> int:
        """A guest read: the register's value, or 0 for an access that matches no register."""
        reg = self._regs.get(offset)
        if size != (reg.size if reg else self.access_size):
            self.warn_once("size", f"ignored {size}-byte read at {offset:#x}: only {8 * self.access_size}-bit "
                                   "accesses are supported")
            return 0
        if reg is None:
            self.warn_once("r-unknown", f"read of unknown offset {offset:#x} (returns 0; further ones not logged)")
            return 0
        if reg.read is None:
            return 0  # write-only
        with self._lock:
            return reg.read() & ((1 << 8 * reg.size) - 1)

    def write(self, offset: int, size: int, value: int) -> None:
        """A guest write: RW registers latch, WO registers act, anything else is ignored."""
        reg = self._regs.get(offset)
        if size != (reg.size if reg else self.access_size):
            self.warn_once("size", f"ignored {size}-byte write at {offset:#x}: only {8 * self.access_size}-bit "
                                   "accesses are supported")
            return
        warn: GuestWarning | None
        if reg is None:
            warn = ("w-unknown", f"write to unknown offset {offset:#x} ignored (further ones not logged)")
        elif reg.write is None:
            warn = ("w-readonly", f"write to read-only register at {offset:#x} ignored (further ones not logged)")
        else:
            with self._lock:
                warn = reg.write(value & ((1 << 8 * reg.size) - 1))
        if warn:
            self.warn_once(*warn)


@dataclass
class Latches:
    """The values the guest latched in BAR0 (the RW registers) and the STATUS it reads back."""

    guest_features: int = 0
    guest_version: int = 0
    gpa_lo: int = 0
    gpa_hi: int = 0
    shm_size: int = 0
    status: int = C.PVSCHED_STATUS_IDLE

    @property
    def gpa(self) -> int:
        """SHM_GPA_HI:SHM_GPA_LO as one 64-bit guest-physical address."""
        return self.gpa_hi << 32 | self.gpa_lo

    def reset(self) -> None:
        """Clear every RW register and STATUS (CONTROL RESET)."""
        for f in fields(self):
            setattr(self, f.name, f.default)


def pvsched_bar0(latches: Latches, host_version: int, host_features: int, nr_vcpus: Callable[[], int],
                 control: Callable[[int], GuestWarning | None]) -> list[Register]:
    """The table of pvsched_abi.h's BAR0: identity and offers (RO), the guest's latches (RW), CONTROL, STATUS."""
    def rw(name: str, field: str) -> Register:
        def latch(value: int) -> None:
            setattr(latches, field, value)
        return Register(name, REG[name], Access.RW, read=lambda: getattr(latches, field), write=latch)

    return [
        Register("MAGIC", REG["MAGIC"], Access.RO, read=lambda: C.PVSCHED_MAGIC),
        Register("HOST_VERSION", REG["HOST_VERSION"], Access.RO, read=lambda: host_version),
        Register("HOST_FEATURES", REG["HOST_FEATURES"], Access.RO, read=lambda: host_features),
        rw("GUEST_FEATURES", "guest_features"),
        rw("GUEST_VERSION", "guest_version"),
        Register("NR_VCPUS", REG["NR_VCPUS"], Access.RO, read=nr_vcpus),
        rw("SHM_GPA_LO", "gpa_lo"),
        rw("SHM_GPA_HI", "gpa_hi"),
        rw("SHM_SIZE", "shm_size"),
        Register("CONTROL", REG["CONTROL"], Access.WO, write=control),
        Register("STATUS", REG["STATUS"], Access.RO, read=lambda: latches.status),  # an s32: its 32 bits
    ]
