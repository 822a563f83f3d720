"""PIO and MMIO buses: address ranges mapped to device callbacks.

vCPU threads look ranges up concurrently; registration (e.g. a PCI BAR being
moved by the guest) swaps in a new sorted tuple under a lock, so lookups
never take a lock.  An access nobody claims reads as all-ones and is
otherwise ignored (logged once per address), like an unclaimed bus cycle.
"""

from __future__ import annotations

import bisect
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass

ReadFn = Callable[[int, int], int]            # (offset, size) -> value
WriteFn = Callable[[int, int, int], None]     # (offset, size, value)

log = logging.getLogger("pyvmm.bus")


class BusConflict(ValueError):
    """Two devices claim overlapping ranges."""


@dataclass(frozen=True)
class Mapping:
    """A range [base, base+length) owned by one device."""

    base: int
    length: int
    read: ReadFn
    write: WriteFn
    label: str
    owner: object = None


class Bus:
    """A set of non-overlapping address ranges, each served by a read and a write callback."""

    def __init__(self, name: str):
        self.name = name
        self._lock = threading.Lock()
        self._maps: tuple[Mapping, ...] = ()
        self._starts: tuple[int, ...] = ()
        self._warned: set[int] = set()

    def register(self, base: int, length: int, read: ReadFn, write: WriteFn, label: str,
                 owner: object = None) -> Mapping:
        """Claim [base, base+length) for a device; refuses overlaps."""
        if length <= 0:
            raise ValueError(f"{self.name}: empty range for {label}")
        m = Mapping(base, length, read, write, label, owner)
        with self._lock:
            for o in self._maps:
                if base < o.base + o.length and o.base < base + length:
                    raise BusConflict(f"{self.name}: {label} at {base:#x}+{length:#x} overlaps {o.label} "
                                      f"at {o.base:#x}+{o.length:#x}")
            maps = sorted(self._maps + (m,), key=lambda x: x.base)
            self._maps, self._starts = tuple(maps), tuple(x.base for x in maps)
        return m

    def unregister(self, mapping: Mapping) -> None:
        """Release a range claimed with register()."""
        with self._lock:
            maps = tuple(x for x in self._maps if x is not mapping)
            self._maps, self._starts = maps, tuple(x.base for x in maps)

    def find(self, addr: int) -> Mapping | None:
        """The mapping that contains addr, if any."""
        maps, starts = self._maps, self._starts
        i = bisect.bisect_right(starts, addr) - 1
        if i >= 0:
            m = maps[i]
            if addr < m.base + m.length:
                return m
        return None

    def read(self, addr: int, size: int) -> int:
        """A guest read of `size` bytes at addr."""
        m = self.find(addr)
        if m is None:
            self._unclaimed(addr, size, "read")
            return (1 << (8 * size)) - 1
        return m.read(addr - m.base, size) & ((1 << (8 * size)) - 1)

    def write(self, addr: int, size: int, value: int) -> None:
        """A guest write of `size` bytes of value at addr."""
        m = self.find(addr)
        if m is None:
            self._unclaimed(addr, size, "write")
            return
        m.write(addr - m.base, size, value)

    def _unclaimed(self, addr: int, size: int, what: str) -> None:
        if addr not in self._warned and len(self._warned) < 4096:
            self._warned.add(addr)
            log.debug("%s: unclaimed %d-byte %s at %#x", self.name, size, what, addr)
