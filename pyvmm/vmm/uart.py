"""A 16550A UART (COM1 at 0x3f8, IRQ 4) good enough for Linux earlyprintk/console and the test guest.

Transmit is instantaneous (THR is always empty again right after a write),
so output goes to the console as the guest writes it. Interrupts follow the
chip: RX data and "THR empty" (cleared by reading IIR or writing THR); the
IRQ line is high while one is pending, so the edge-triggered ISA pin sees a
new edge each time the guest's handler has cleared the previous one.
Reference: the PC16550D datasheet; Linux drivers/tty/serial/8250.
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Callable

COM1_BASE = 0x3F8
COM1_IRQ = 4
NR_PORTS = 8

# register offsets
RBR_THR_DLL, IER_DLM, IIR_FCR, LCR, MCR, LSR, MSR, SCR = range(8)
IER_RDI, IER_THRI = 0x01, 0x02
IIR_NO_INT, IIR_THRI, IIR_RDI, IIR_FIFO_BITS = 0x01, 0x02, 0x04, 0xC0
FCR_ENABLE_FIFO, FCR_CLEAR_RCVR = 0x01, 0x02
LCR_DLAB = 0x80
MCR_DTR, MCR_RTS, MCR_OUT1, MCR_OUT2, MCR_LOOP = 0x01, 0x02, 0x04, 0x08, 0x10
LSR_DR, LSR_THRE, LSR_TEMT = 0x01, 0x20, 0x40
MSR_CTS, MSR_DSR, MSR_RI, MSR_DCD = 0x10, 0x20, 0x40, 0x80
RX_FIFO_MAX = 4096


class Uart16550:
    """One 16550A; `out(bytes)` receives transmitted bytes, `set_irq(level)` drives its IRQ line."""

    def __init__(self, out: Callable[[bytes], None], set_irq: Callable[[int], None]):
        self._out = out
        self._set_irq = set_irq
        self._lock = threading.Lock()
        self.ier = self.lcr = self.mcr = self.scr = self.fcr = 0
        self.dll, self.dlm = 0x0C, 0  # 9600 baud
        self.rx: collections.deque[int] = collections.deque()
        self.thri_pending = False
        self.irq_level = 0

    # --- bus callbacks ---
    def io_read(self, offset: int, size: int) -> int:
        """Guest read of a UART register (byte accesses; wider ones read the first register)."""
        with self._lock:
            v = self._read(offset)
            self._update_irq()
        return v

    def io_write(self, offset: int, size: int, value: int) -> None:
        """Guest write of a UART register."""
        with self._lock:
            self._write(offset, value & 0xFF)
            self._update_irq()

    def feed(self, data: bytes) -> None:
        """Host input: bytes the guest will read from RBR."""
        with self._lock:
            for b in data[: max(0, RX_FIFO_MAX - len(self.rx))]:
                self.rx.append(b)
            self._update_irq()

    # --- chip logic (lock held) ---
    def _iir(self) -> int:
        if self.ier & IER_RDI and self.rx:
            iir = IIR_RDI
        elif self.ier & IER_THRI and self.thri_pending:
            iir = IIR_THRI
        else:
            iir = IIR_NO_INT
        return iir | (IIR_FIFO_BITS if self.fcr & FCR_ENABLE_FIFO else 0)

    def _update_irq(self) -> None:
        level = 0 if self._iir() & IIR_NO_INT else 1
        if level != self.irq_level:
            self.irq_level = level
            self._set_irq(level)

    def _read(self, off: int) -> int:
        dlab = self.lcr & LCR_DLAB
        if off == RBR_THR_DLL:
            if dlab:
                return self.dll
            return self.rx.popleft() if self.rx else 0
        if off == IER_DLM:
            return self.dlm if dlab else self.ier
        if off == IIR_FCR:
            iir = self._iir()
            if iir & 0x0F == IIR_THRI:
                self.thri_pending = False  # reading IIR clears a THRE interrupt
            return iir
        if off == LCR:
            return self.lcr
        if off == MCR:
            return self.mcr
        if off == LSR:
            return LSR_THRE | LSR_TEMT | (LSR_DR if self.rx else 0)
        if off == MSR:
            if self.mcr & MCR_LOOP:  # loopback: modem inputs mirror the outputs
                m = self.mcr
                return ((MSR_CTS if m & MCR_RTS else 0) | (MSR_DSR if m & MCR_DTR else 0)
                        | (MSR_RI if m & MCR_OUT1 else 0) | (MSR_DCD if m & MCR_OUT2 else 0))
            return MSR_DCD | MSR_DSR | MSR_CTS
        if off == SCR:
            return self.scr
        return 0

    def _write(self, off: int, v: int) -> None:
        dlab = self.lcr & LCR_DLAB
        if off == RBR_THR_DLL:
            if dlab:
                self.dll = v
                return
            if self.mcr & MCR_LOOP:
                if len(self.rx) < RX_FIFO_MAX:
                    self.rx.append(v)
            else:
                self._out(bytes((v,)))
            self.thri_pending = True  # THR is empty again at once
        elif off == IER_DLM:
            if dlab:
                self.dlm = v
            else:
                if v & IER_THRI and not self.ier & IER_THRI:
                    self.thri_pending = True  # enabling THRI with THR empty interrupts at once
                self.ier = v & 0x0F
        elif off == IIR_FCR:
            self.fcr = v & (FCR_ENABLE_FIFO | 0xC0)
            if v & FCR_CLEAR_RCVR:
                self.rx.clear()
        elif off == LCR:
            self.lcr = v
        elif off == MCR:
            self.mcr = v & 0x1F
        elif off == SCR:
            self.scr = v
