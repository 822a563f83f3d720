"""Stand-in VMM for tests and the benchmark: tests/standin/fakevmm.c's threads write slots like a guest would.

Always started under an RT watchdog above every boost and the actuator
(`chrt -f 50 timeout -s KILL`), with its own alarm(); stop() restores its
threads to SCHED_OTHER and kills it by PID.
"""

from __future__ import annotations

import json
import mmap
import os
import signal
import subprocess
from pathlib import Path

from pyvmm import abi

WATCHDOG_PRIO = abi.C.PVSCHED_WATCHDOG_PRIO
BINARY = Path(__file__).resolve().parent / "build" / "fakevmm"


def fakevmm_binary() -> Path:
    """The built stand-in (tests/standin/Makefile, which scripts/test.sh runs); a clear error if missing."""
    if not BINARY.exists():
        raise FileNotFoundError(f"{BINARY} is missing: run make -C tests/standin (scripts/test.sh does)")
    return BINARY


class FakeVmm:
    """The stand-in VMM process: threads writing slots; commands over a pipe; slot area mapped here too."""

    def __init__(self, binary: Path, nthreads: int, max_s: int):
        self.proc = subprocess.Popen(
            ["chrt", "-f", str(WATCHDOG_PRIO), "timeout", "-s", "KILL", str(max_s + 5), "chrt", "-o", "0", str(binary),
             str(nthreads), str(max_s)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.info = json.loads(self.proc.stdout.readline())
        self.pid: int = self.info["pid"]
        self.tids: list[int] = self.info["tids"]
        self.memfd_path = f"/proc/{self.pid}/fd/{self.info['memfd']}"
        fd = os.open(self.memfd_path, os.O_RDWR)
        self.fd = fd
        self.map = mmap.mmap(fd, 4096)

    def cmd(self, line: str) -> dict:
        """Send one command, return its JSON reply."""
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())

    def host_area(self, i: int) -> dict:
        """The host area of slot i as the guest would read it."""
        off = self.info["slot_offset"] + 128 * i
        raw = bytes(self.map[off:off + 128])
        f = abi.ffi()
        s = f.cast("struct pvsched_slot *", f.from_buffer(bytearray(raw)))
        h = s.host
        return {"seq": h.seq, "state": h.state, "policy": h.policy, "rt_priority": h.rt_priority, "nice": h.nice,
                "boosts": h.boosts, "throttles": h.throttles, "boosted_ns": h.boosted_ns}

    def stop(self) -> None:
        """Restore every thread to SCHED_OTHER, then kill the process and its watchdog by PID; idempotent."""
        if self.fd < 0:
            return
        for tid in self.tids:
            try:
                os.sched_setscheduler(tid, os.SCHED_OTHER, os.sched_param(0))
            except OSError:
                pass
        try:
            os.kill(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.kill()  # the watchdog chain (timeout), by its PID
        self.proc.wait()
        try:
            self.map.close()
        except BufferError:
            pass
        os.close(self.fd)
        self.fd = -1
