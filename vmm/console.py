"""The guest console: bytes from the UART, teed to a stream and kept for the caller.

Output is flushed to the stream at each newline (and at exit), so a guest's
lines appear as they are printed without one write per byte.  The kept copy
feeds BootResult.console and the JSON records the test guest prints.
"""

from __future__ import annotations

import json
import threading
from typing import BinaryIO

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
