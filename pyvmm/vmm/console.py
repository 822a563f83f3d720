"""The guest console: bytes from the UART, teed to a stream and kept for the caller.

Output is flushed to the stream at each newline (and at exit), so a guest's
lines appear as they are printed without one write per byte.  The kept copy
feeds BootResult.console and the JSON records the test guest prints.  A
RecordSplitter as the stream tells those records from the rest while the guest
runs (the CLI shows them as human lines, or alone as JSON).
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
MAX_RECORD_LINE = 1 << 20  # a longer line is no record to RecordSplitter: what it holds stays bounded


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


def record_of_line(line: str | bytes) -> dict | None:
    """The JSON record a console line holds (an object with a "type" key, alone on its line), else None."""
    line = line.strip()
    if not line.startswith(b"{" if isinstance(line, bytes) else "{"):
        return None
    try:
        obj = json.loads(line)
    except ValueError:
        return None
    return obj if isinstance(obj, dict) and "type" in obj else None


def record_lines(text: str) -> list[str]:
    """The console lines that hold JSON records, stripped, in order (other lines are ignored)."""
    return [line.strip() for line in text.splitlines() if record_of_line(line) is not None]


def parse_records(text: str) -> list[dict]:
    """JSON objects with a "type" key, one per console line (other lines are ignored)."""
    return [rec for line in text.splitlines() if (rec := record_of_line(line)) is not None]


class RecordSplitter:
    """A console stream that hands the guest's JSON record lines and its other text to two callbacks.

    on_record(line, record) gets each record line whole (its bytes as printed, newline included);
    on_text(data) gets everything else, as it comes.  A partial line is passed on at flush() unless
    it may still become a record (it starts with "{" and is not longer than MAX_RECORD_LINE): that
    part waits for its newline or finish().
    Console calls write() and flush() under its lock, so the callbacks are never run concurrently.
    """

    def __init__(self, on_record: Callable[[bytes, dict], None], on_text: Callable[[bytes], None]):
        self.on_record, self.on_text = on_record, on_text
        self._line = bytearray()   # the current line, not yet passed on
        self._passed = False       # part of the current line already went to on_text: it is text

    def write(self, data: bytes) -> None:
        """Console output; complete lines are classified and passed on at once."""
        *lines, rest = bytes(data).split(b"\n")
        for part in lines:
            self._line += part + b"\n"
            self._end_line()
        self._line += rest

    def _end_line(self) -> None:
        line, passed = bytes(self._line), self._passed
        self._line.clear()
        self._passed = False
        rec = None if passed else record_of_line(line)
        if rec is not None:
            self.on_record(line, rec)
        elif line:
            self.on_text(line)

    def flush(self) -> None:
        """Pass on a partial line that cannot be a record (a prompt, progress dots)."""
        head = self._line.lstrip()
        if self._passed or len(self._line) > MAX_RECORD_LINE or (head and not head.startswith(b"{")):
            self.on_text(bytes(self._line))
            self._line.clear()
            self._passed = True

    def finish(self) -> None:
        """The console ended: pass on what is left of the last line as text."""
        if self._line:
            self.on_text(bytes(self._line))
            self._line.clear()
        self._passed = False


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
