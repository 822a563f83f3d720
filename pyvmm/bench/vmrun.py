"""One benchmark VM: boot the test guest with `pyvmm boot` under a watchdog, apply the configuration, collect.

The configuration decides who sets the vCPU threads' host scheduling:
vanilla and the static ones boot with `--no-policy` (device and guest slot
writes present, policy absent); static-rt / static-nice then set every vCPU
thread once, the way libvirt's vcpusched does; pvsched leaves it to the policy.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from pyvmm import abi
from pyvmm.common import control_client as control
from pyvmm.common import lab_env
from pyvmm.common.sched_attr import SCHED_FIFO, SCHED_OTHER, SchedAttr, sched_getattr, sched_setattr

CONFIGS = ("vanilla", "static-rt", "static-nice", "pvsched")
# Static RT as libvirt's <vcpusched> sets it (FIFO 10): below the policy's actuator (40) and the watchdog.
STATIC_ATTRS = {"static-rt": SchedAttr(SCHED_FIFO, 10, 0), "static-nice": SchedAttr(SCHED_OTHER, 0, -20)}
# The watchdog (`timeout`) runs at the RT ladder's top (SCHED_FIFO PVSCHED_WATCHDOG_PRIO) with reset-on-fork,
# so it can always kill a livelocked VM while the VMM itself starts at SCHED_OTHER.
WATCHDOG_PRIO = abi.C.PVSCHED_WATCHDOG_PRIO
# The benchmark's own polling thread, while a VM runs: it must find the vCPU threads at once even on a busy
# host (static settings apply from then on).  It only sleeps and polls: above the actuator (40), below the
# VMM's guardian (45), which must preempt everything but the watchdogs.
POLLER_ATTR = SchedAttr(SCHED_FIFO, abi.C.PVSCHED_BENCH_POLLER_PRIO, 0)
_VCPU_COMM = re.compile(r"vcpu[\s_-]*(\d+)", re.IGNORECASE)


# A Linux guest's window opens at /init's first record, not at the vCPU threads: its boot (minutes under
# the lab's emulation, and longer the busier the host) is not what a run measures, and the host load
# started before it stretched a busy run past its bound.  The guest waits this long after /init (and its
# module's load) before cyclictest starts, so that the host load is up for the whole of cyclictest.
LINUX_SETTLE_S = 5


def cyclictest_cmdline(duration_s: float, interval_us: int, policy: str = "rr", settle_s: float = LINUX_SETTLE_S) -> str:
    """The Linux image's kernel command-line keys for its cyclictest run (pyvmm/guest/linux/init.sh).

    Inside `pyvmm lab` (PYVMM_IN_LAB) the guest also loads and unloads its module with its other CPUs
    offline (pvsched.quiesce=1): a load or unload hung there now and then (docs/linux-lab.md)."""
    quiesce = " pvsched.quiesce=1" if lab_env.in_lab() else ""
    return (f"pvsched.workload=cyclictest pvsched.duration={duration_s:g} pvsched.interval={interval_us} "
            f"pvsched.policy={policy} pvsched.settle={settle_s:g}{quiesce}")


@dataclass
class RunSpec:
    """What one benchmark run boots: configuration, guest workload (one per vCPU) and guest timing."""

    config: str
    workload: str = "probe,probe"
    duration_s: float = 5.0
    interval_us: int = 1000
    cpus: int = 2
    policy_set: tuple[str, ...] = ()  # KEY=VALUE tunables for the pvsched policy (pyvmm boot --policy-set)
    program: str = "pvsched"          # the BPF policy of the pvsched runs (pyvmm boot --policy-program)
    guest_keys: str = ""              # more test-guest command-line keys, e.g. "lock_hold_us=2"
    kernel: str | None = None          # a Linux bzImage with `initrd`: the image's cyclictest workload instead
    initrd: str | None = None
    cyclictest_policy: str = "rr"      # the Linux guest's cyclictest threads: rr (RR 8) or other (SCHED_OTHER)

    @property
    def limit_s(self) -> float:
        """Wall-clock bound of the run: the guest's duration plus boot and teardown (Linux boots for long
        inside the lab's emulation)."""
        return self.duration_s + (40 if self.kernel is None else 400)


@dataclass
class VmOutcome:
    """What came back from one VM: its exit code, the guest's JSON records and what the host saw."""

    exit_code: int | None = None
    records: list[dict] = field(default_factory=list)
    console_tail: list[str] = field(default_factory=list)
    vcpu_tids: dict[int, int] = field(default_factory=dict)
    policy_reply: dict | None = None
    status_reply: dict | None = None
    tids_after_s: float | None = None
    uptime_at_tids_s: float | None = None  # how long the guest may have run before the static setting
    vcpu_sched: dict[int, str] = field(default_factory=dict)
    wall_s: float = 0.0
    init_after_s: float | None = None  # Linux: seconds from `pyvmm boot` to /init's first record
    error: str | None = None


def boot_argv(spec: RunSpec, limit_s: float, stats_out: Path | None = None) -> list[str]:
    """The watchdog-wrapped `pyvmm boot` command line for a run (writing its end-of-run stats to stats_out)."""
    if spec.kernel is None:
        cmdline = f"duration={spec.duration_s:g} interval={spec.interval_us} workload={spec.workload}"
        cmdline += f" {spec.guest_keys}" if spec.guest_keys else ""
        guest = ["--json"]
    else:  # cyclictest (pyvmm/guest/linux/init.sh), one thread per vCPU
        cmdline = "console=ttyS0 quiet " + cyclictest_cmdline(spec.duration_s, spec.interval_us, spec.cyclictest_policy)
        guest = ["--kernel", os.path.abspath(spec.kernel), "--initrd", os.path.abspath(spec.initrd), "--mem", "512"]
    argv = ["chrt", "-f", "-R", str(WATCHDOG_PRIO), "timeout", "-s", "TERM", "-k", "3", f"{limit_s:.0f}",
            sys.executable, "-I", "-m", "pyvmm.cli", "boot", "--cpus", str(spec.cpus), *guest, "--cmdline", cmdline,
            "--timeout", f"{limit_s - 2:.0f}"]
    if stats_out is not None:
        argv += ["--stats-out", str(stats_out)]
    if spec.config != "pvsched":
        argv.append("--no-policy")
    else:
        argv += ["--policy-program", spec.program]
        for kv in spec.policy_set:
            argv += ["--policy-set", kv]
    return argv


def parse_guest_lines(lines: list[str]) -> list[dict]:
    """The guest's JSON records ({"type": ...}) among console lines, wherever a line's JSON starts."""
    out = []
    for line in lines:
        i = line.find("{")
        if i < 0:
            continue
        try:
            obj = json.loads(line[i:])
        except ValueError:
            continue
        if isinstance(obj, dict) and "type" in obj:
            out.append(obj)
    return out


def extract_vcpu_tids(reply: object) -> dict[int, int]:
    """vCPU id -> TID from a control-socket reply ("vcpu_tids" as a dict or list, or "vcpus" entries with "tid")."""
    if not isinstance(reply, dict):
        return {}
    for key in ("vcpu_tids", "vcpus"):
        v = reply.get(key)
        if isinstance(v, dict):
            try:
                return {int(k): int(t["tid"] if isinstance(t, dict) else t) for k, t in v.items()}
            except (KeyError, TypeError, ValueError):
                pass
        if isinstance(v, list):
            res = {}
            for i, t in enumerate(v):
                if isinstance(t, dict) and "tid" in t:
                    res[int(t.get("id", t.get("vcpu", i)))] = int(t["tid"])
                elif isinstance(t, int):
                    res[i] = t
            if res:
                return res
    for v in reply.values():
        if isinstance(v, dict) and (found := extract_vcpu_tids(v)):
            return found
    return {}


def tids_from_proc(pid: int) -> dict[int, int]:
    """vCPU id -> TID from the VMM's thread names (e.g. "vcpu0"), when the control socket is not up yet."""
    res = {}
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return {}
    for t in tasks:
        try:
            comm = Path(f"/proc/{pid}/task/{t}/comm").read_text().strip()
        except OSError:
            continue
        if m := _VCPU_COMM.search(comm):
            res[int(m.group(1))] = int(t)
    return res


def _child_pid(pid: int) -> int | None:
    try:
        kids = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return None
    return int(kids[0]) if kids else None


def _find_tids(vmm_pid: int, nr: int) -> tuple[dict[int, int], float | None]:
    """vCPU TIDs and the VM's uptime (s since its vCPUs were let go) when the VMM answered."""
    for cmd in ("status", "vm"):  # status also tells the uptime
        try:
            reply = control.request(vmm_pid, {"cmd": cmd}, timeout=0.5)
        except control.ControlError:
            continue
        tids = extract_vcpu_tids(reply)
        if len(tids) >= nr:
            up = reply.get("uptime_s")
            return tids, float(up) if isinstance(up, (int, float)) else None
    tids = tids_from_proc(vmm_pid)
    return (tids if len(tids) >= nr else {}), None


def _kill(pid: int | None, sig: int) -> None:
    if pid:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def read_stats_out(path: Path) -> tuple[dict | None, dict | None]:
    """(the policy's last policy.show, the device's state) as `pyvmm boot --stats-out` left them; None if absent."""
    try:
        dev = json.loads(path.read_text()).get("devices", {}).get("pvsched") or {}
    except (OSError, ValueError, AttributeError):
        return None, None
    policy = dev.get("policy") if isinstance(dev.get("policy"), dict) and "error" not in dev["policy"] else None
    return policy, dev.get("device") if isinstance(dev.get("device"), dict) else None


def _final_stats(path: Path, out: VmOutcome) -> None:
    """The policy's policy.show and the device's state as `pyvmm boot --stats-out` left them at the VM's end."""
    policy, device = read_stats_out(path)
    if policy is not None:
        out.policy_reply = policy
    if device is not None:
        out.status_reply = {"pvsched": device}


def _vm_ending(watchdog_pid: int | None, on_end) -> None:
    """The guest's window is over (a vCPU thread ended): end the host measurements, demote the watchdog.

    The watchdog (`timeout` at SCHED_FIFO WATCHDOG_PRIO) reaps the VMM, and a VMM that ends slowly under host
    load would hold a CPU at that priority until the RT throttle stops it (docs/benchmarks.md, "Method notes").
    With the vCPU threads gone nothing of the VM can livelock a CPU any more, so it may finish as an ordinary
    task."""
    if watchdog_pid is not None:
        try:
            sched_setattr(watchdog_pid, SchedAttr(SCHED_OTHER, 0, 0))
        except OSError:
            pass  # already gone
    if on_end:
        on_end()


def _once(f):
    """`f` (or nothing, if None) that runs at most once however often it is called."""
    done = False

    def call(*args) -> None:
        nonlocal done
        if not done:
            done = True
            if f:
                f(*args)

    return call


# The test guest's measured work starts at its pvsched record: vCPU 0 prints it, then sets the common start
# of every vCPU's phases a few milliseconds later.  Before it, a pvsched VM has started its policy process
# (about a second on a busy host), which a static configuration does not, and its vCPUs booted the guest
# unboosted.  (A Linux guest's is its /init's first record, the boot record.)
WINDOW_START = '"type":"pvsched"'
# The guest's measured work is over at these records: a Linux guest's end of cyclictest (before its own
# summary, slow under emulation), and the test guest's phases_end, which vCPU 0 prints when every phase
# has ended (they end at one deadline on all vCPUs), before its task turns ordinary for the report.  A
# pvsched vCPU is unboosted for the report while a static RT one stays RT, so host figures taken past
# this point compare unlike things (docs/benchmarks.md, "the host's window").  A first result record
# ends the window too, should phases_end be lost.
WINDOW_END = ('"type":"cyclictest_end"', '"type":"phases_end"', '"type":"latency"', '"type":"workload"')


def console_reader(stream, lines: list[str], out, t0: float, on_boot=None, on_end=None,
                   on_start=None) -> threading.Thread:
    """A thread (not started) appending stream's lines to `lines`.  At the Linux image's first /init record
    it sets out.init_after_s to the seconds since t0 and calls `on_boot()`; at the first WINDOW_START record
    of a guest without one it calls `on_start()`, and at the first WINDOW_END record `on_end()`: the start
    and the end of the guest's measured work."""
    def read() -> None:
        started = ended = False
        for line in stream:
            if out.init_after_s is None and '"type":"boot"' in line:
                out.init_after_s = round(time.monotonic() - t0, 2)
                if on_boot:
                    on_boot()
            elif on_start and not started and out.init_after_s is None and WINDOW_START in line:
                started = True
                on_start()
            elif on_end and not ended and any(m in line for m in WINDOW_END):
                ended = True
                on_end()
            lines.append(line)

    return threading.Thread(target=read, daemon=True)


def run_vm(spec: RunSpec, on_tids=None, on_end=None, on_start=None) -> VmOutcome:
    """Boot, apply the configuration to the vCPU threads as soon as they exist, collect; never leaves the VM behind.

    `on_tids(tids, vmm_pid)` is called once with the vCPU TIDs and the VMM's pid when the guest's window
    opens (the benchmark starts its host load there): at the vCPU threads for the test guest, at /init's
    first record for a Linux guest (LINUX_SETTLE_S).  `on_start(tids, vmm_pid)` is called once, after it,
    when the guest's measured work starts (the benchmark's runqueue probe, host latency and CPU accounting
    start there): the test guest's WINDOW_START record, or with on_tids for a Linux guest.
    `on_end()` once at the window's end: the guest's first WINDOW_END record, or else when the first vCPU
    thread has ended (or the VM ended without any).
    Nothing polls the VM while it runs: the policy's counters come from `pyvmm boot --stats-out` at its end.
    """
    out = VmOutcome()
    limit_s = spec.limit_s
    lines: list[str] = []
    err = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115 - closed in the finally below
    stats_dir = tempfile.TemporaryDirectory(prefix="pyvmm-bench-run-")
    stats_out = Path(stats_dir.name) / "stats.json"
    t0 = time.monotonic()
    # -I and cwd "/": a root child imports nothing from the caller's folder (boot_argv's paths are absolute).
    proc = subprocess.Popen(boot_argv(spec, limit_s, stats_out), stdout=subprocess.PIPE, stderr=err, stdin=subprocess.DEVNULL,
                            text=True, errors="replace", cwd="/")
    started = threading.Event()   # the test guest's measured work starts (WINDOW_START)
    measured = threading.Event()  # the guest's measured work is over (WINDOW_END): the window closes
    reader = console_reader(proc.stdout, lines, out, t0, on_end=measured.set, on_start=started.set)
    reader.start()
    vmm_pid = None
    own = sched_getattr(0)
    window = ended = False
    on_end, on_start = _once(on_end), _once(on_start)
    try:
        sched_setattr(0, POLLER_ATTR)
        while proc.poll() is None:
            if vmm_pid is None:
                vmm_pid = _child_pid(proc.pid)
            if vmm_pid and not out.vcpu_tids:
                out.vcpu_tids, out.uptime_at_tids_s = _find_tids(vmm_pid, spec.cpus)
                if out.vcpu_tids:
                    out.tids_after_s = round(time.monotonic() - t0, 3)
                    attr = STATIC_ATTRS.get(spec.config)
                    for vcpu, tid in out.vcpu_tids.items():
                        if attr is not None:
                            sched_setattr(tid, attr)
                        # read back: the record shows what the threads really ran with
                        out.vcpu_sched[vcpu] = str(sched_getattr(tid))
            if out.vcpu_tids and not window and (spec.kernel is None or out.init_after_s is not None):
                window = True
                if on_tids:
                    on_tids(list(out.vcpu_tids.values()), vmm_pid)
            if window and (spec.kernel is not None or started.is_set()):
                on_start(list(out.vcpu_tids.values()), vmm_pid)
            if window and measured.is_set():
                on_end()
            if out.vcpu_tids and not ended and not all(os.path.exists(f"/proc/{vmm_pid}/task/{t}")
                                                      for t in out.vcpu_tids.values()):
                ended = True
                _vm_ending(proc.pid, on_end)
            if time.monotonic() - t0 > limit_s + 10:
                raise TimeoutError(f"VM still running after {limit_s + 10:.0f} s")
            if window and not measured.is_set():
                measured.wait(0.02)  # ends the window as soon as the guest says so, not up to 20 ms later
            else:
                time.sleep(0.02 if out.vcpu_tids else 0.005)
        if not ended:
            _vm_ending(None, on_end)
        out.exit_code = proc.returncode
        reader.join(5)
    except (OSError, TimeoutError) as e:
        out.error = f"{type(e).__name__}: {e}"
    finally:
        sched_setattr(0, own)
        if proc.poll() is None:
            _kill(proc.pid, signal.SIGTERM)  # timeout forwards it to the VMM
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                _kill(vmm_pid, signal.SIGKILL)
                _kill(proc.pid, signal.SIGKILL)
                proc.wait(5)
        out.wall_s = round(time.monotonic() - t0, 2)
        reader.join(2)
        err.seek(0)
        stderr_tail = err.read()[-2000:].strip().splitlines()[-5:]
        err.close()
        _final_stats(stats_out, out)
        stats_dir.cleanup()
    out.records = parse_guest_lines(lines)
    out.console_tail = [ln.rstrip() for ln in lines[-10:]] + stderr_tail
    if out.error is None and out.exit_code != 0:
        guest_err = [r.get("message", "") for r in out.records if r.get("type") == "error"]
        why = guest_err[-1:] or stderr_tail[-2:] or [ln.strip() for ln in lines[-2:]]
        out.error = f"pyvmm boot exited {out.exit_code}: " + " | ".join(why)
    if out.error is None and spec.config == "pvsched" and out.policy_reply is None:
        out.error = "the pvsched policy left no final policy.show (pyvmm boot --stats-out): the run would not measure pvsched"
    if out.error is None and not out.vcpu_tids and spec.config in STATIC_ATTRS:
        out.error = "could not find the vCPU thread ids (control socket {'cmd':'vm'} or /proc thread names)"
    return out
