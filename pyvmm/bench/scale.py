"""What a host pays per VM as VMs are added: `pyvmm bench --vms 1,2,4,8,16`.

For each N, on a host busy with the bench's stress-ng load:
- BPF ns per host context switch between two non-vCPU tasks, with N VMs registered in the host's one
  set of programs; switchcost.host_switch_ns, measured before any VM starts;
- N VMs: N-1 idle test guests and one probe guest (the RT probe, as the bench's busy group), each with
  its pvsched policy.  While the probe runs: CPU of the policy processes and of the VMMs outside their
  vCPU threads, in CPUs; resident and locked memory per VM (VMM plus policy process); the probe's p99;
  the BPF ns of one of its vCPU switches (pvs_switch past the tgid lookup); and how many pvs_switch
  programs the kernel has loaded (one, whatever N).

Every VM is a `pyvmm boot` child of this process, started with -I from "/", ended by PID.
"""

from __future__ import annotations

import os
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from pyvmm.bench import switchcost
from pyvmm.bench.cpuacct import threads_cpu_s, tree_cpu_s
from pyvmm.bench.hostload import StressLoad
from pyvmm.bench.results import guest_summary, policy_stats
from pyvmm.bench.vmrun import parse_guest_lines, read_stats_out
from pyvmm.common import control_client, libbpf
from pyvmm.common.procfs import memory_kb
from pyvmm.common.safe_fs import write_file_nofollow

DEFAULT_VMS = (1, 2, 4, 8, 16)
MAX_VMS = 32
VCPUS = 2
MEM_MIB = 64  # the test guest needs a few MiB: the VM's own size does not blur the VMM's figure
READY_S = 90.0  # one VM's boot until its policy process has registered it (BPF load on a busy host)
SETTLE_S = 1.0  # after the probe guest's policy registered, before the window opens


class ScaleError(Exception):
    """The curve could not be measured (a VM did not start, the switch cost could not be loaded)."""


@dataclass
class _Vm:
    proc: subprocess.Popen
    log: Path
    policy_pid: int = 0
    vcpu_tids: list[int] = field(default_factory=list)


def _boot(cmdline: str, limit_s: float, log: Path, stats_out: Path | None = None) -> _Vm:
    """A `pyvmm boot` child; with `stats_out`, its guest records come on its stdout (--json)."""
    argv = [sys.executable, "-I", "-m", "pyvmm.cli", "boot", "--cmdline", cmdline, "--cpus", str(VCPUS),
            "--mem", str(MEM_MIB), "--timeout", f"{limit_s:.0f}", "--no-console-input"]
    if stats_out is not None:
        argv += ["--json", "--stats-out", str(stats_out)]
    write_file_nofollow(log, "")  # refuses a symlink planted at the name; then opened without following one
    err = os.open(log, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stderr=err, cwd="/", text=True,
                                stdout=subprocess.PIPE if stats_out is not None else subprocess.DEVNULL)
    finally:
        os.close(err)
    return _Vm(proc, log)


def _registered(vm: _Vm, deadline: float) -> None:
    """Wait until the VM's policy process has registered its guest; fill its policy PID and vCPU TIDs."""
    while time.monotonic() < deadline:
        if vm.proc.poll() is not None:
            tail = vm.log.read_text(errors="replace").strip().splitlines()[-1:] or ["no output"]
            raise ScaleError(f"VM {vm.proc.pid} ended with {vm.proc.returncode} before its policy registered: {tail[0]}")
        try:
            st = control_client.request(vm.proc.pid, {"cmd": "status"}, timeout=5)
        except control_client.ControlError:
            st = {}
        pv = st.get("pvsched") or {}
        pol = pv.get("policy") or {}
        if pv.get("state") == "active" and (pol.get("process") or {}).get("registered"):
            vm.policy_pid = int(pol["pid"])
            vm.vcpu_tids = [int(t) for t in (st.get("vcpu_tids") or {}).values()]
            return
        time.sleep(0.1)
    raise ScaleError(f"VM {vm.proc.pid}: its policy did not register within {READY_S:g} s")


def _end(vms: list[_Vm]) -> None:
    """SIGTERM every VM still running (each ends its policy process and restores its threads), then wait."""
    for vm in vms:
        if vm.proc.poll() is None:
            vm.proc.send_signal(signal.SIGTERM)
    for vm in vms:
        try:
            vm.proc.wait(30)
        except subprocess.TimeoutExpired:
            vm.proc.kill()
            vm.proc.wait()


def _cpu(vms: list[_Vm]) -> tuple[float, float]:
    """CPU seconds so far of the policy processes, and of the VMMs outside their vCPU threads and policy.

    /proc counts in clock ticks: over a short window the second figure may come out a tick below zero."""
    policy = vmm = 0.0
    for vm in vms:
        p = tree_cpu_s(vm.policy_pid) or 0.0
        whole = tree_cpu_s(vm.proc.pid) or 0.0  # the VMM with its children: the policy process
        policy += p
        vmm += whole - p - (threads_cpu_s(vm.vcpu_tids) or 0.0)
    return policy, vmm


def _memory(vms: list[_Vm]) -> dict[str, float]:
    """Mean MiB per VM: VMM and policy process resident and proportional (PSS), and locked (VmLck)."""
    rows = [(memory_kb(vm.proc.pid) or {}, memory_kb(vm.policy_pid) or {}) for vm in vms]
    def mean(key: str, which: int) -> float:
        return round(statistics.mean(r[which].get(key, 0) for r in rows) / 1024, 1)
    return {"vmm_rss_mib": mean("rss_kb", 0), "policy_rss_mib": mean("rss_kb", 1),
            "rss_mib": round(mean("rss_kb", 0) + mean("rss_kb", 1), 1),
            "pss_mib": round(mean("pss_kb", 0) + mean("pss_kb", 1), 1),
            "locked_mib": round(mean("locked_kb", 0) + mean("locked_kb", 1), 1)}


def _vcpu_switch_ns(show: dict, fast_ns: float, other_vm_switches: int = 0) -> float | None:
    """BPF ns of one vCPU switch (pvs_switch past the tgid lookup), from the probe guest's last policy.show.

    The program is the host's, so its run time counts every VM's vCPU switches, and the probe's counter
    (stat switch_vmm) only its own: `other_vm_switches` adds the other VMs' counters."""
    pol = policy_stats(show) or {}
    if pol.get("switch_vmm") is None:
        return None
    return switchcost.vmm_switch_ns((pol.get("programs") or {}).get("pvs_switch"),
                                    pol["switch_vmm"] + other_vm_switches, fast_ns)


def _switch_vmm(vm: _Vm) -> int:
    """The VM's counter of pvs_switch runs past the tgid lookup (0 if its policy does not answer)."""
    try:
        reply = control_client.request(vm.proc.pid, {"cmd": "policy.show"}, timeout=5)
    except control_client.ControlError:
        return 0
    return int(((reply.get("stats") or {}).get("switch_vmm") or {}).get("value") or 0)


def measure_n(n: int, duration_s: float, workdir: Path, progress) -> dict:
    """One point of the curve: N VMs (N-1 idle, one probe) on a busy host; see the module's docstring."""
    progress(f"scale: {n} VM(s): BPF cost of a host switch with {n} VMs registered")
    try:
        sw = switchcost.host_switch_ns(n)
    except switchcost.SwitchCostError as e:
        raise ScaleError(f"switch cost with {n} policies: {e}") from None
    idle: list[_Vm] = []
    vms = idle
    limit = READY_S * n + duration_s + 120
    load = None
    try:
        for i in range(n - 1):
            idle.append(_boot("workload=idle duration=3600", limit, workdir / f"n{n}-idle{i}.log"))
            _registered(idle[-1], time.monotonic() + READY_S)
        progress(f"scale: {n} VM(s): {n - 1} idle up; the probe guest for {duration_s:g} s on a busy host")
        load = StressLoad(limit_s=duration_s + READY_S + 60)
        stats_out = workdir / f"n{n}-probe-stats.json"
        probe = _boot(f"duration={duration_s:g} workload=probe,probe", limit, workdir / f"n{n}-probe.log", stats_out)
        vms = [*idle, probe]
        _registered(probe, time.monotonic() + READY_S)
        time.sleep(SETTLE_S)
        mem = _memory(vms)
        switch_programs = libbpf.loaded_programs("pvs_switch")
        cpu0, t0 = _cpu(vms), time.monotonic()
        time.sleep(max(0.5, duration_s - SETTLE_S - 1.0))  # the window ends before the probe guest does
        cpu1, t1 = _cpu(vms), time.monotonic()
        out, _ = probe.proc.communicate(timeout=duration_s + 60)
        other_switches = sum(_switch_vmm(vm) for vm in idle)  # as close to the probe's last counters as can be
        if probe.proc.returncode != 0:
            raise ScaleError(f"the probe guest exited {probe.proc.returncode} (log: {probe.log})")
        g = guest_summary(parse_guest_lines(out.splitlines()))
        final = read_stats_out(stats_out)[0] or {}
    finally:
        if load is not None:
            load.stop()
        _end(vms)
    window = max(t1 - t0, 1e-3)
    return {"vms": n, "switch_ns_non_vcpu": sw["ns_per_host_switch"],
            "switch_ns_vcpu": _vcpu_switch_ns(final, sw["switch_fast_ns"], other_switches),
            "switch_programs": switch_programs,
            "policy_cpus": round(max(0.0, cpu1[0] - cpu0[0]) / window, 3),
            "vmm_cpus": round(max(0.0, cpu1[1] - cpu0[1]) / window, 3),
            **mem, "probe_p99_us": g["p99"] if g else None, "probe_max_us": g["max"] if g else None}


# Targets from the scale issue: printed with PASS or MISS against the curve.
FLAT_NS = 100.0  # BPF ns per non-vCPU switch, at every N
RSS_MIB = 40.0  # VMM plus policy process, per VM
LOCKED_MIB = 64.0


def targets(points: list[dict], floor_ns: float | None = None) -> list[str]:
    """The scale targets as lines "PASS|MISS: what (measured)"; `floor_ns`: programs that do nothing, if measured."""
    def line(ok: bool, text: str) -> str:
        return f"{'PASS' if ok else 'MISS'}: {text}"
    worst_sw = max(p["switch_ns_non_vcpu"] for p in points)
    floor = f"; programs that do nothing on the same tracepoints: {floor_ns:g} ns" if floor_ns else ""
    worst_rss = max(p["rss_mib"] for p in points)
    worst_lck = max(p["locked_mib"] for p in points)
    return [line(worst_sw <= FLAT_NS, f"BPF per non-vCPU host switch at most {FLAT_NS:g} ns at every N "
                                      f"(worst {worst_sw:g} ns{floor})"),
            line(worst_rss <= RSS_MIB, f"VMM plus policy process at most {RSS_MIB:g} MiB resident per VM "
                                       f"(worst {worst_rss:g} MiB; proportional, shared pages divided among "
                                       f"the processes mapping them: {max(p.get('pss_mib') or 0 for p in points):g} MiB)"),
            line(worst_lck <= LOCKED_MIB, f"at most {LOCKED_MIB:g} MiB locked per VM (worst {worst_lck:g} MiB)")]


COLUMNS = [("vms", "VMs"), ("switch_programs", "pvs_switch programs"), ("switch_ns_non_vcpu", "BPF ns / non-vCPU switch"),
           ("switch_ns_vcpu", "BPF ns / vCPU switch"),
           ("policy_cpus", "policy CPUs"), ("vmm_cpus", "VMM CPUs (not vCPU)"), ("vmm_rss_mib", "VMM RSS MiB"),
           ("policy_rss_mib", "policy RSS MiB"), ("pss_mib", "PSS MiB / VM"), ("locked_mib", "locked MiB / VM"),
           ("probe_p99_us", "probe p99 us")]


def table(points: list[dict]) -> str:
    """The curve as a Markdown table."""
    def cell(v: object) -> str:
        return "-" if v is None else f"{v:g}" if isinstance(v, float) else str(v)
    head = "| " + " | ".join(title for _, title in COLUMNS) + " |"
    rule = "|" + "|".join(" --- " for _ in COLUMNS) + "|"
    return "\n".join([head, rule, *("| " + " | ".join(cell(p.get(k)) for k, _ in COLUMNS) + " |" for p in points)])


def plot(points: list[dict], path: Path) -> Path:
    """Three panels against N: BPF ns per switch, CPU, memory per VM (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = [p["vms"] for p in points]
    fig, ax = plt.subplots(1, 3, figsize=(13, 3.8))
    ax[0].plot(n, [p["switch_ns_non_vcpu"] for p in points], "o-", label="non-vCPU switch")
    ax[0].plot(n, [p["switch_ns_vcpu"] for p in points], "s-", label="vCPU switch")
    ax[0].axhline(FLAT_NS, color="grey", ls=":", label=f"target {FLAT_NS:g} ns")
    ax[0].set_ylabel("BPF ns per host switch")
    ax[1].plot(n, [p["policy_cpus"] for p in points], "o-", label="policy processes")
    ax[1].plot(n, [p["vmm_cpus"] for p in points], "s-", label="VMMs (not vCPU threads)")
    ax[1].set_ylabel("CPUs")
    ax[2].plot(n, [p["rss_mib"] for p in points], "o-", label="resident")
    ax[2].plot(n, [p.get("pss_mib") or 0 for p in points], "^-", label="proportional (PSS)")
    ax[2].plot(n, [p["locked_mib"] for p in points], "s-", label="locked")
    ax[2].axhline(RSS_MIB, color="grey", ls=":", label=f"target {RSS_MIB:g} MiB resident")
    ax[2].set_ylabel("MiB per VM (VMM + policy)")
    for a in ax:
        a.set_xscale("log", base=2)
        a.set_xticks(n, [str(x) for x in n])
        a.set_xlabel("VMs")
        a.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=100)
    plt.close(fig)
    return path


def curve(vms: list[int], duration_s: float, workdir: Path, progress) -> list[dict]:
    """measure_n for each N in order; the logs of the VMs go to `workdir`."""
    points = []
    for n in vms:
        t = time.monotonic()
        p = measure_n(n, duration_s, workdir, progress)
        points.append(p)
        progress(f"scale: {n} VM(s): non-vCPU switch {p['switch_ns_non_vcpu']:g} ns, vCPU switch "
                 f"{p['switch_ns_vcpu']} ns, policy {p['policy_cpus']:g} CPUs, {p['rss_mib']:g} MiB resident and "
                 f"{p['locked_mib']:g} MiB locked per VM, probe p99 {p['probe_p99_us']} us "
                 f"({time.monotonic() - t:.0f} s)")
    return points
