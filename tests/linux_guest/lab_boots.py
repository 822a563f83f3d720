"""Run inside `pyvmm lab`: boot Linux images under pyvmm and print one JSON line per boot for the tests.

    python -m tests.linux_guest.lab_boots OUT.json KERNEL INITRD END [KERNEL INITRD END ...] [-- CMDLINE]

END is poweroff or reboot (the image's pvsched.end=).  Each line holds the exit code, pyvmm's message, the
guest's records and the boot log's warnings, clocksource and last lines.

While a boot runs, its console goes to stderr line by line ("L2| ..."), a line every 30 s says the lab's
userspace is alive, and if the boot outlives its timeout by a minute every thread's stack is dumped: a lab
that stalls then shows whether the guest, pyvmm or the lab itself stopped, and where.
"""

from __future__ import annotations

import faulthandler
import json
import logging
import os
import re
import sys
import threading
import time

from pyvmm.boot import BootConfig, run_vm
from pyvmm.vmm.console import parse_records

BAD = re.compile(r"WARNING:|BUG:|Oops|Call Trace|\[Firmware Bug\]")
TRACE = re.compile(r"-+\[ cut here \]-+.*?---\[ end trace [0-9a-f]+ \]---", re.DOTALL)
# Seen only in the lab (QEMU TCG's nested SVM): the nested KVM's CPUID 0xD.0 EBX stays at the size for
# XCR0 = x87|SSE after the guest enabled AVX and PKRU, as if L1 never saw the guest's XSETBV.  Kept apart
# so that every other WARNING still fails the test (docs/linux-lab.md, "Open").
LAB_ONLY = "XSAVE consistency problem"
BOOT_TIMEOUT_S = 300   # pyvmm's --timeout for each boot; one took 43-63 s in the lab on 2026-12-06


def bad_lines(console: str) -> tuple[list[str], bool]:
    """WARNING/BUG/Oops/Firmware Bug lines outside the lab-only XSAVE trace, and whether that trace appeared."""
    lab_only = False

    def drop(m: re.Match) -> str:
        nonlocal lab_only
        if LAB_ONLY in m.group(0):
            lab_only = True
            return ""
        return m.group(0)

    rest = TRACE.sub(drop, console)
    return [ln for ln in rest.splitlines() if BAD.search(ln)], lab_only


class PrefixedLines:
    """A console stream that writes each line to `out` behind a prefix (the guest's, told from the lab's)."""

    def __init__(self, out, prefix: bytes):
        self.out, self.prefix, self.at_start = out, prefix, True

    def write(self, data: bytes) -> int:
        for piece in data.splitlines(keepends=True):
            self.out.write((self.prefix if self.at_start else b"") + piece)
            self.at_start = piece.endswith(b"\n")
        return len(data)

    def flush(self) -> None:
        self.out.flush()


def heartbeat(label: str, start: float, done: threading.Event, every: float = 30) -> None:
    """A line every `every` s until done: if they stop, the lab's userspace stopped, not only pyvmm."""
    while not done.wait(every):
        print(f"lab_boots: {label}: alive at {time.monotonic() - start:.0f} s", file=sys.stderr, flush=True)


class KeptLog(logging.Handler):
    """pyvmm's own WARNING and ERROR lines during one boot, kept for its result: a check that fails after
    the lab ended well still shows what pyvmm said (the lab's stderr is shown only when it fails)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(f"{record.levelname} {record.name}: {record.getMessage()}")


def boot(kernel: str, initrd: str, end: str, extra: str, timeout: float = BOOT_TIMEOUT_S) -> dict:
    """One pyvmm boot of a Linux image with the pvsched device and the policy; what the tests check.

    `extra` is more kernel command line; it names the workload (default pvsched.workload=device)."""
    if "pvsched.workload=" not in extra:
        extra = f"pvsched.workload=device {extra}"
    # pvsched.quiesce=1: the module's load and unload with the guest's other CPUs offline.  In the lab,
    # 1 boot in about 40 hung at the unload with a soft lockup on both guest CPUs (docs/linux-lab.md).
    cmdline = f"console=ttyS0 pvsched.end={end} pvsched.quiesce=1 {extra}".strip()
    kept = KeptLog()
    logging.getLogger().addHandler(kept)
    try:
        r = run_vm(BootConfig(kernel=kernel, initrd=initrd, cmdline=cmdline, mem_mib=512, timeout=timeout,
                              console_stream=PrefixedLines(sys.stderr.buffer, b"L2| ")))
    finally:
        logging.getLogger().removeHandler(kept)
    bad, xsave_lab_only = bad_lines(r.console)
    lines = r.console.splitlines()
    counted = set(bad)  # lines carry the guest's timestamps: those of the lab-only trace are not in it
    first_bad = next((i for i, ln in enumerate(lines) if ln in counted), None)
    clock = re.findall(r"clocksource: Switched to clocksource (\S+)", r.console)
    dev = r.device_stats.get("pvsched") or {}
    policy = dev.get("policy") or {}
    return {"kernel": kernel, "end": end, "exit_code": r.exit_code, "message": r.message,
            "records": parse_records(r.console), "bad_lines": bad, "xsave_lab_only": xsave_lab_only,
            "clocksource": clock[-1] if clock else None, "tail": lines[-3:],
            "programs": policy.get("programs"), "policy_stats": policy.get("stats"),
            "policy_error": policy.get("error"),
            "policy_process": (dev.get("device") or {}).get("policy"), "pyvmm_log": kept.lines[-20:],
            # the first report the checks fail on, whole: where a soft lockup or a WARNING stood
            "first_bad_block": lines[first_bad:first_bad + 60] if first_bad is not None else [],
            "host_areas": [v.get("host") for v in (dev.get("device") or {}).get("vcpus") or []]}


def main(argv: list[str]) -> int:
    """Boot each (kernel, initrd, end) triple; the results so far as a JSON list in argv[0] after each."""
    # pyvmm's warnings on stderr, as the lab showed them before KeptLog (a root handler ends logging's
    # last-resort printing)
    logging.basicConfig(stream=sys.stderr, level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    extra = ""
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], " ".join(argv[i + 1:])
    out, rest = argv[0], argv[1:]
    results = []
    for i in range(0, len(rest), 3):
        kernel, _, end = rest[i:i + 3]
        start = time.monotonic()
        print(f"lab_boots: boot {i // 3 + 1} ({os.path.basename(kernel)}, {end}): starting", file=sys.stderr, flush=True)
        label, done = f"boot {i // 3 + 1}", threading.Event()
        beat = threading.Thread(target=heartbeat, args=(label, start, done), daemon=True)
        beat.start()
        faulthandler.dump_traceback_later(BOOT_TIMEOUT_S + 60)  # pyvmm's own timeout did not end it
        try:
            results.append(boot(*rest[i:i + 3], extra))
        finally:
            faulthandler.cancel_dump_traceback_later()
            done.set()
            beat.join()
        print(f"lab_boots: boot {i // 3 + 1}: exit {results[-1]['exit_code']} ({results[-1]['message']}) after "
              f"{time.monotonic() - start:.0f} s", file=sys.stderr, flush=True)
        with open(out, "w") as f:   # after each boot: if the lab itself dies, the boots before it are kept
            json.dump(results, f)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
