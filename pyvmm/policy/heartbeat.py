"""The policy process's side of the guardian's heartbeat: its mapping of the VMM's heartbeat memfd.

The VMM's guardian (pyvmm/device/guardian.c) kills the policy process when the
counter stops moving; the policy's native backstop loop bumps it (at
Heartbeat.address) while its actuator keeps up.  The layout is struct
pvsched_heartbeat of the ABI header.
"""

from __future__ import annotations

import mmap
import os

from pyvmm import abi

_U64 = (1 << 64) - 1


class Heartbeat:
    """The policy process's side: its own mapping of the heartbeat memfd, bumped by the policy's backstop loop."""

    def __init__(self, fd: int) -> None:
        size = os.fstat(fd).st_size
        if size < abi.sizeof("struct pvsched_heartbeat"):
            raise ValueError(f"heartbeat memfd of {size} bytes is too small")
        self._map = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self._words = memoryview(self._map).cast("Q")
        self._i = abi.offsetof("struct pvsched_heartbeat", "beats") // 8
        self._buf = abi.ffi().from_buffer(self._map)

    @property
    def address(self) -> int:
        """Where the counter is in this process: the policy's native backstop loop beats there."""
        return int(abi.ffi().cast("uintptr_t", self._buf)) + self._i * 8

    def beat(self) -> None:
        """One sign of life from Python (tests; the policy's own beats are native: Heartbeat.address)."""
        self._words[self._i] = (self._words[self._i] + 1) & _U64

    @property
    def beats(self) -> int:
        """The counter as it stands."""
        return int(self._words[self._i])

    def close(self) -> None:
        """Unmap (nobody may beat any more: the policy's backstop loop is stopped or told so first)."""
        abi.ffi().release(self._buf)
        self._words.release()
        self._map.close()
