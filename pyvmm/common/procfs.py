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


def memory_kb(pid: int) -> dict[str, int] | None:
    """Resident and locked memory of process `pid` in KiB ({"rss_kb", "locked_kb"}), None if it is gone.

    locked_kb is VmLck: what the kernel charges against RLIMIT_MEMLOCK, whole mappings under
    mlockall, touched or not.
    """
    try:
        with open(f"/proc/{pid}/status") as f:
            fields = dict(line.split(":", 1) for line in f if line.startswith(("VmRSS:", "VmLck:")))
    except (FileNotFoundError, ProcessLookupError):
        return None
    if len(fields) != 2:  # a zombie has no memory lines
        return None
    return {"rss_kb": int(fields["VmRSS"].split()[0]), "locked_kb": int(fields["VmLck"].split()[0])}


def format_memory(m: dict[str, int]) -> str:
    """memory_kb() in words: "rss 35.0 MiB, locked 0.1 MiB"."""
    return f"rss {m['rss_kb'] / 1024:.1f} MiB, locked {m['locked_kb'] / 1024:.1f} MiB"
