"""The ACPI fixed-hardware PM block that the FADT of pyvmm/vmm/acpi.py points at (I/O ports 0x600-0x60f).

PM1a status/enable read 0 and take writes (no fixed event is ever raised);
PM1a control reads SCI_EN (ACPI mode, there being no SMI_CMD) and ends the
VM when the guest writes SLP_EN with SLP_TYP = S5 (power-off); the PM timer
counts at 3.579545 MHz from the host's monotonic clock (32 bits, as the
FADT's TMR_VAL_EXT says); the reset register ends the VM when the guest
writes RESET_VALUE (reboot).  Sleep states other than S5 are not supported:
such a write is logged once and ignored.  Reference: ACPI 6.4, section 4.8.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from pyvmm.vmm import acpi

log = logging.getLogger("pyvmm.acpi")


class AcpiPm:
    """PM1a event/control, PM timer and reset register; `on_power(kind)` gets "poweroff" or "reset"."""

    def __init__(self, on_power: Callable[[str], None]):
        self._on_power = on_power
        self._pm1_enable = 0
        self._warned: set[str] = set()

    def io_read(self, offset: int, size: int) -> int:
        """Guest read of the PM block at PM_BASE + offset."""
        port = acpi.PM_BASE + offset
        if acpi.PM_TMR <= port < acpi.PM_TMR + acpi.PM_TMR_LEN:
            ticks = time.monotonic_ns() * acpi.PM_TIMER_HZ // 1_000_000_000
            return (ticks & 0xFFFFFFFF) >> (8 * (port - acpi.PM_TMR))
        if port == acpi.PM1A_EVT + 2:
            return self._pm1_enable
        if acpi.PM1A_CNT <= port < acpi.PM1A_CNT + acpi.PM1_CNT_LEN:
            return acpi.PM1_CNT_SCI_EN >> (8 * (port - acpi.PM1A_CNT))
        return 0

    def io_write(self, offset: int, size: int, value: int) -> None:
        """Guest write of the PM block: power-off through PM1a_CNT, reset through RESET_REG."""
        port = acpi.PM_BASE + offset
        if port == acpi.PM1A_EVT + 2:
            self._pm1_enable = value & 0xFFFF
        elif port == acpi.PM1A_CNT and size >= 2 and value & acpi.PM1_CNT_SLP_EN:
            slp_typ = (value >> acpi.PM1_CNT_SLP_TYP_SHIFT) & acpi.PM1_CNT_SLP_TYP_MASK
            if slp_typ == acpi.SLP_TYP_S5:
                self._on_power("poweroff")
            else:
                self._once("sleep", "guest asked for sleep type %d, which pyvmm does not support: ignored", slp_typ)
        elif port == acpi.RESET_REG and value & 0xFF == acpi.RESET_VALUE:
            self._on_power("reset")

    def _once(self, key: str, fmt: str, *args: object) -> None:
        if key not in self._warned:
            self._warned.add(key)
            log.warning("acpi-pm: " + fmt, *args)
