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
    """Resident, proportional and locked memory of process `pid` in KiB, None if it is gone.

    {"rss_kb", "locked_kb"} always, "pss_kb" where smaps_rollup is readable.  rss_kb counts every
    page the process maps, the interpreter's and its libraries' text too, which all Python
    processes on the host share; pss_kb divides each page by the number of processes mapping
    it, so summed over a host it adds up to what the host spends.  locked_kb is VmLck: what the
    kernel charges against RLIMIT_MEMLOCK, whole mappings under mlockall, touched or not.
    """
    try:
        with open(f"/proc/{pid}/status") as f:
            fields = dict(line.split(":", 1) for line in f if line.startswith(("VmRSS:", "VmLck:")))
    except (FileNotFoundError, ProcessLookupError):
        return None
    if len(fields) != 2:  # a zombie has no memory lines
        return None
    out = {"rss_kb": int(fields["VmRSS"].split()[0]), "locked_kb": int(fields["VmLck"].split()[0])}
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            pss = next((line.split()[1] for line in f if line.startswith("Pss:")), None)
    except OSError:  # gone meanwhile, or not ours to read (ptrace rules)
        pss = None
    if pss is not None and pss.isdigit():
        out["pss_kb"] = int(pss)
    return out


def format_memory(m: dict[str, int]) -> str:
    """memory_kb() in words: "rss 35.0 MiB, pss 27.9 MiB, locked 0.1 MiB"."""
    pss = f", pss {m['pss_kb'] / 1024:.1f} MiB" if "pss_kb" in m else ""
    return f"rss {m['rss_kb'] / 1024:.1f} MiB{pss}, locked {m['locked_kb'] / 1024:.1f} MiB"
