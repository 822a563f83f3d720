"""The guest console: bytes from the UART, teed to a stream and kept for the caller.

Output is flushed to the stream at each newline (and at exit), so a guest's
lines appear as they are printed without one write per byte.  The kept copy
feeds BootResult.console and the JSON records the test guest prints.
"""

from __future__ import annotations

import json
import os
import termios
import threading
import tty
from collections.abc import Callable
from typing import BinaryIO, Self

MAX_KEEP = 64 << 20  # bytes kept for BootResult; a runaway guest cannot eat the host's memory


class Console:
    """Collects guest output; thread-safe (vCPU threads write, the main thread flushes)."""

    def __init__(self, stream: BinaryIO | None = None, keep: bool = True):
        self.stream = stream
        self.keep = keep
        self._lock = threading.Lock()
        self._pending = bytearray()
        self._kept = bytearray()

    def write(self, data: bytes) -> None:
        """Guest output; written to the stream at each newline."""
        with self._lock:
            if self.keep and len(self._kept) < MAX_KEEP:
                self._kept += data
            if self.stream is not None:
                self._pending += data
                if b"\n" in data or len(self._pending) >= 4096:
                    self._flush_locked()

    def flush(self) -> None:
        """Write out whatever is pending (a partial line at exit)."""
        with self._lock:
            self._flush_locked()

    def _flush_locked(self) -> None:
        if self.stream is not None and self._pending:
            try:
                self.stream.write(bytes(self._pending))
                self.stream.flush()
            except (OSError, ValueError):
                self.stream = None  # stdout went away (closed pipe): keep running, keep collecting
            self._pending.clear()

    def text(self) -> str:
        """Everything the guest printed, decoded leniently."""
        with self._lock:
            return self._kept.decode("utf-8", errors="replace")


def parse_records(text: str) -> list[dict]:
    """JSON objects with a "type" key, one per console line (other lines are ignored)."""
    records = []
    for line in text.splitlines():
        line = line.strip()
        if not line.startswith("{"):
            continue
        try:
            obj = json.loads(line)
        except ValueError:
            continue
        if isinstance(obj, dict) and "type" in obj:
            records.append(obj)
    return records


class ConsoleInput:
    """Feeds bytes read from a file descriptor (the CLI's stdin) to the guest's UART, from a daemon thread.

    A terminal is put in cbreak mode (no line editing or local echo: the guest
    echoes; Ctrl-C still stops pyvmm) and restored on exit.  Reading stops at EOF.
    """

    def __init__(self, fd: int, feed: Callable[[bytes], None]):
        self.fd, self.feed = fd, feed
        self._saved: list | None = None

    @staticmethod
    def usable(fd: int) -> bool:
        """False for a terminal we do not own (a background job would be stopped by SIGTTIN)."""
        try:
            if os.isatty(fd):
                return os.tcgetpgrp(fd) == os.getpgrp()
            os.fstat(fd)
        except OSError:
            return False
        return True

    def __enter__(self) -> Self:
        if os.isatty(self.fd):
            self._saved = termios.tcgetattr(self.fd)
            tty.setcbreak(self.fd)
        threading.Thread(target=self._pump, name="console-input", daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._saved is not None:
            termios.tcsetattr(self.fd, termios.TCSADRAIN, self._saved)

    def _pump(self) -> None:
        while True:
            try:
                data = os.read(self.fd, 1024)
            except OSError:
                return
            if not data:
                return
            self.feed(data)
