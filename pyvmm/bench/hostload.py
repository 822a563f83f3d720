"""Host-side companions of a benchmark run: the busy host's stress-ng load and a normal-priority cyclictest.

Each runs under `timeout` (bounded even if the benchmark dies), is stopped
with a signal when the VM ends (both print their summary on SIGINT), and
is killed by PID in `stop()`'s finally block.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import tempfile
from pathlib import Path

# The busy host's load: CPU hogs plus file I/O, memory and fork churn.
STRESS_ARGS = ["--cpu", "2", "--iomix", "1", "--vm", "1", "--vm-bytes", "128M", "--fork", "1"]

_CT_LINE = re.compile(r"T:\s*(\d+)\s*\(\s*\d+\)\s*P:\s*(\d+)\s*I:\s*(\d+)\s*C:\s*(\d+)\s*Min:\s*(\d+)"
                      r"\s*Act:\s*(\d+)\s*Avg:\s*(\d+)\s*Max:\s*(\d+)")
_YAML_STRESSOR = re.compile(r"-\s*stressor:\s*(\S+)")
_YAML_RATE = re.compile(r"bogo-ops-per-second-real-time:\s*([0-9.eE+-]+)")
_TEXT_METRIC = re.compile(r"metrc:\s*\[\d+\]\s+(\S+)\s+(\d+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)")


def _hash_row(text: str, label: str) -> list[int]:
    m = re.search(rf"^# {label}:\s*([\d ]+)$", text, re.MULTILINE)
    return [int(x) for x in m.group(1).split()] if m else []


def parse_cyclictest_hist(text: str) -> dict | None:
    """Summary of `cyclictest -q -h N` output: {"min","avg","p99","max","samples","threads","overflows"} (us)."""
    tot, mins, avgs, maxs = (_hash_row(text, k) for k in ("Total", "Min Latencies", "Avg Latencies",
                                                           "Max Latencies"))
    if not tot or not maxs:
        return None
    over = _hash_row(text, "Histogram Overflows") or [0] * len(tot)
    merged: list[tuple[int, int]] = []
    for line in text.splitlines():
        if line[:1].isdigit():
            cols = [int(x) for x in line.split()]
            if len(cols) > 1 and sum(cols[1:]):
                merged.append((cols[0], sum(cols[1:])))
    samples = sum(tot)
    need, seen, p99 = 0.99 * samples, 0, max(maxs)
    for us, n in merged:  # already in bucket order; overflows lie past the last bucket
        seen += n
        if seen >= need:
            p99 = us
            break
    avg = sum(a * n for a, n in zip(avgs, tot)) / samples if samples else float(avgs[0] if avgs else 0)
    return {"min": min(mins) if mins else None, "avg": round(avg, 1), "p99": p99, "max": max(maxs),
            "samples": samples, "threads": len(tot), "overflows": sum(over)}


def parse_cyclictest(text: str) -> dict | None:
    """Summary of cyclictest -q output: {"min","avg","max"} in us over all threads, "samples", "threads", "prio"."""
    rows = [tuple(int(x) for x in m.groups()) for m in _CT_LINE.finditer(text)]
    if not rows:
        return parse_cyclictest_hist(text)
    samples = sum(r[3] for r in rows)
    avg = sum(r[6] * r[3] for r in rows) / samples if samples else float(rows[0][6])
    return {"min": min(r[4] for r in rows), "avg": round(avg, 1), "max": max(r[7] for r in rows),
            "samples": samples, "threads": len(rows), "prio": max(r[1] for r in rows)}


def parse_stress_metrics(yaml_text: str, log_text: str = "") -> dict[str, float]:
    """Bogo-ops per second (real time) per stressor, from stress-ng's --yaml file or its --metrics-brief log."""
    rates: dict[str, float] = {}
    current = None
    for line in yaml_text.splitlines():
        if m := _YAML_STRESSOR.search(line):
            current = m.group(1)
        elif (m := _YAML_RATE.search(line)) and current:
            rates[current] = float(m.group(1))
    if not rates:
        for m in _TEXT_METRIC.finditer(log_text):
            rates[m.group(1)] = float(m.group(6))
    return rates


class _Bounded:
    """A child process under `timeout -s INT`, stopped by signal and killed by PID at the end."""

    def __init__(self, argv: list[str], limit_s: float, workdir: Path) -> None:
        self.log = workdir / "log.txt"
        self._logf = open(self.log, "w")  # noqa: SIM115 - closed in stop(), outlives __init__
        # timeout forwards any signal it gets as SIGINT, the signal both tools summarise on; chrt -o 0 because
        # the benchmark may start these from its SCHED_FIFO polling thread: they must run as ordinary tasks.
        cmd = ["chrt", "-o", "0", "timeout", "-s", "INT", "-k", "5", f"{limit_s:.0f}", *argv]
        self.proc = subprocess.Popen(cmd, stdout=self._logf, stderr=subprocess.STDOUT, cwd=workdir,
                                     stdin=subprocess.DEVNULL)

    def stop(self, grace_s: float = 10.0) -> str:
        """Ask it to finish (SIGTERM to timeout, SIGINT to the tool), wait, kill if needed; return its output."""
        try:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(grace_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        finally:
            if self.proc.poll() is None:
                os.kill(self.proc.pid, signal.SIGKILL)
            self._logf.close()
        return self.log.read_text(errors="replace")


class StressLoad:
    """The busy host's stress-ng load in a temporary folder (iomix writes files there)."""

    def __init__(self, limit_s: float, run_s: float | None = None) -> None:
        """Start it: for run_s seconds (default: until stop()), killed after limit_s in any case."""
        self._tmp = tempfile.TemporaryDirectory(prefix="pyvmm-bench-stress-")
        d = Path(self._tmp.name)
        self._yaml = d / "stress.yaml"
        argv = ["stress-ng", *STRESS_ARGS, "--temp-path", str(d), "--metrics-brief",
                "--yaml", str(self._yaml), "-t", str(max(1, round(run_s or limit_s)))]
        self._p = _Bounded(argv, limit_s + 10, d)
        self.output = ""  # stress-ng's log, once stopped

    @property
    def pid(self) -> int:
        """PID of the load's root process (its watchdog; stress-ng and its workers are below it)."""
        return self._p.proc.pid

    def stop(self) -> dict[str, float]:
        """Stop the load; bogo-ops/s per stressor over its lifetime ({} if stress-ng printed none)."""
        try:
            self.output = log = self._p.stop()
            y = self._yaml.read_text(errors="replace") if self._yaml.exists() else ""
            return parse_stress_metrics(y, log)
        finally:
            self._tmp.cleanup()


class HostCyclictest:
    """cyclictest at normal priority (SCHED_OTHER), one thread per CPU, 1000 us: the host's own latency.

    With a histogram of 1-us buckets up to HIST_US, so the summary has a p99 next to the (noisy) max."""

    HIST_US = 10000

    def __init__(self, limit_s: float, interval_us: int = 1000) -> None:
        self._tmp = tempfile.TemporaryDirectory(prefix="pyvmm-bench-ct-")
        # -p 0 must come before --policy=other, else cyclictest picks RT priority 3.
        argv = ["cyclictest", "-q", "-m", "-p", "0", "--policy=other", "-S", "-d", "0", "-i", str(interval_us),
                "-h", str(self.HIST_US)]
        self._p = _Bounded(argv, limit_s, Path(self._tmp.name))

    def thread_policies(self) -> list[int]:
        """Scheduling policy numbers of cyclictest's threads now (0 = SCHED_OTHER), to check it runs unboosted."""
        try:
            child = Path(f"/proc/{self._p.proc.pid}/task/{self._p.proc.pid}/children").read_text().split()[0]
            out = []
            for t in os.listdir(f"/proc/{child}/task"):
                stat = Path(f"/proc/{child}/task/{t}/stat").read_text()
                out.append(int(stat[stat.rfind(")") + 2:].split()[38]))
            return out
        except (OSError, IndexError):
            return []

    def stop(self) -> dict | None:
        """Stop it; its summary (see parse_cyclictest) or None if it printed none."""
        try:
            return parse_cyclictest(self._p.stop())
        finally:
            self._tmp.cleanup()
