"""Who a PID or TID is now, read from /proc: alive or not, and which process a thread belongs to.

A number alone names nothing for long: pid_max is 32768 on many hosts and a busy host (the
bench's `stress-ng --fork`) recycles it within seconds.
"""

from __future__ import annotations

import os


def _stat_fields(tid: int) -> list[str] | None:
    try:
        with open(f"/proc/{tid}/stat") as f:
            line = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # comm (field 2) may hold spaces and parentheses: split after its last ")".
    return line.rsplit(")", 1)[1].split()  # [0] is field 3 (state)


def pid_alive(pid: int) -> bool:
    """True while process `pid` exists and is not a zombie (a dead VMM nobody reaped yet)."""
    try:
        fields = _stat_fields(pid)
    except OSError:
        return True  # exists but unreadable
    return fields is not None and fields[0] not in ("Z", "X")


def is_thread_of(pid: int, tid: int) -> bool:
    """True if `tid` names a live thread of process `pid` now (/proc/<pid>/task/<tid> exists).

    The kernel resolves that path only within `pid`'s thread group, so a TID that was recycled
    for another process fails it: the check to make before acting on a recorded TID.
    """
    try:
        os.stat(f"/proc/{pid}/task/{tid}")
    except OSError:
        return False
    return True
