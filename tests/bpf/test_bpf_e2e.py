"""End to end: `pyvmm boot` with the test guest, its pvsched device and the sandboxed policy process.

The vCPU threads' classes are read from outside (os.sched_getscheduler) while
the guest runs; the VMM runs under an RT watchdog (`chrt -f 50 timeout`)
because the hog workload spins at a guest FIFO 99 request.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from sched_observe import observed, observer_rt, runs, sample, wait_for

from pyvmm import abi
from pyvmm.policy import host_programs, programs

ROOT = Path(__file__).resolve().parents[2]
RR, OTHER = os.SCHED_RR, os.SCHED_OTHER


def _vmm_pid(watchdog_pid: int, timeout: float = 10) -> int:
    """The pyvmm process under `timeout` (its only child)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            kids = Path(f"/proc/{watchdog_pid}/task/{watchdog_pid}/children").read_text().split()
        except OSError:
            kids = []
        if kids:
            return int(kids[0])
        time.sleep(0.02)
    raise AssertionError("pyvmm did not start")


def _status(pid: int) -> dict | None:
    r = subprocess.run([sys.executable, "-m", "pyvmm.cli", "status", str(pid), "--json"], cwd=ROOT,
                       capture_output=True, text=True, timeout=10, check=False)
    return json.loads(r.stdout) if r.returncode == 0 and r.stdout.startswith("{") else None


@pytest.fixture
def vm(bpf_object):
    """Boot the test guest with pvsched under a watchdog; vm(cmdline) -> (popen, vmm_pid, {vcpu: tid})."""
    procs: list[subprocess.Popen] = []

    def boot(cmdline: str, seconds: int = 4, *extra: str) -> tuple[subprocess.Popen, int, dict[int, int]]:
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        p = subprocess.Popen(["chrt", "-f", str(abi.C.PVSCHED_WATCHDOG_PRIO), "timeout", "-s", "KILL", str(seconds + 30), "chrt", "-o", "0",
                              sys.executable, "-m", "pyvmm.cli", "boot", "--json", "--cpus", "2", "--cmdline", cmdline,
                              "--timeout", str(seconds + 20), *extra], cwd=ROOT, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        procs.append(p)
        pid = _vmm_pid(p.pid)
        st: dict = {}

        def active() -> bool:
            nonlocal st
            st = _status(pid) or {}
            pv = st.get("pvsched", {})
            return pv.get("state") == "active" and pv.get("policy", {}).get("process", {}).get("registered")

        assert wait_for(active, 15, 0.1), f"pvsched never active: {st}"
        return p, pid, {int(k): v for k, v in st["vcpu_tids"].items()}

    yield boot
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.communicate()


def test_e2e_probe_vcpu_is_boosted_idle_one_only_with_boost_on_halt_always_and_pins_go_with_the_vm(vm):
    # boost_on_halt=auto (default): the test guest reports RT_WAITING while its RT probe sleeps, so the
    # probe's vCPU holds its boost through its halts while the idle vCPU (no RT task) stays as it was.
    p, pid, tids = vm("duration=3 workload=probe,tick tick_us=100")
    s0, s1 = sample(tids[0], 1.0, 0.002), sample(tids[1], 0.5, 0.002)
    boosted = sum(1 for _, pol, prio in s0 if pol == RR and prio == 8)
    assert boosted >= 0.9 * len(s0), f"probe vCPU at RR 8 in only {boosted}/{len(s0)} samples"
    # (a hardirq section seen at a preemption is urgent by itself: rare, and dropped at the next look)
    rt = sum(1 for _, pol, _ in s1 if pol != OTHER)
    assert rt <= 0.02 * len(s1), f"a vCPU halting without an RT waiter was boosted in {rt}/{len(s1)} samples"
    out, err = p.communicate(timeout=40)
    assert p.returncode == 0, err[-2000:]
    hosts = sorted((json.loads(line) for line in out.splitlines() if line.startswith('{"type":"host"')),
                   key=lambda h: h["vcpu"])
    assert len(hosts) == 2 and hosts[1]["boosted_us"] < 0.1 * hosts[0]["boosted_us"], hosts
    # everything of ours is gone with the VM: pins and programs
    assert not Path(f"/sys/fs/bpf/pvsched/{pid}").exists()

    # boost_on_halt=always, the seed's policy: every halt is boosted, the idle vCPU's too
    p, pid, tids = vm("duration=3 workload=probe,idle", 4, "--policy-set", "boost_on_halt=always")
    s1 = sample(tids[1], 0.5, 0.002)
    boosted = sum(1 for _, pol, prio in s1 if pol == RR and prio == 8)
    assert boosted >= 0.9 * len(s1), f"idle vCPU at RR 8 in only {boosted}/{len(s1)} samples"
    out, err = p.communicate(timeout=40)
    assert p.returncode == 0, err[-2000:]
    hosts = [json.loads(line) for line in out.splitlines() if line.startswith('{"type":"host"')]
    assert hosts and all(h["boosts"] >= 1 for h in hosts), hosts
    # everything of ours is gone with the VM: pins and programs
    assert not Path(f"/sys/fs/bpf/pvsched/{pid}").exists()


def test_e2e_guest_fifo99_hog_is_capped_and_throttled(vm):
    p, _, tids = vm("duration=3 workload=hog,idle")
    s = sample(tids[0], 1.5, 0.001)
    assert all(pol == OTHER or (pol == RR and prio == 10) for _, pol, prio in s), "not capped at RR 10"
    boosted = runs(s, lambda pol, prio: pol == RR)
    # defaults: 30 ms boosted per 100 ms window, then 100 ms throttled -> a cycle of ~135 ms
    assert 6 <= len(boosted) <= 20, f"{len(boosted)} boosted stretches in 1.5 s"
    assert max(boosted[1:-1]) < 0.080, f"boost held {max(boosted):.3f} s"
    out, err = p.communicate(timeout=40)
    assert p.returncode == 0, err[-2000:]
    host0 = next(json.loads(line) for line in out.splitlines() if line.startswith('{"type":"host","vcpu":0'))
    assert host0["throttles"] >= 10, host0


def test_e2e_sigkill_of_the_policy_process_restores_and_detaches(vm):
    p, pid, tids = vm("duration=3 workload=probe,probe")
    assert wait_for(lambda: all(os.sched_getscheduler(t) == RR for t in tids.values()), 2.0)
    st = _status(pid)
    policy_pid = st["pvsched"]["policy"]["pid"]
    # the host's programs: those using its outer map of vCPUs, in which this VM is registered
    host = host_programs.host_dir("/sys/fs/bpf/pvsched", programs.object_path("pvsched"))
    m = subprocess.run(["bpftool", "-j", "map", "show", "pinned", str(host / "vm_vcpus")],
                       capture_output=True, text=True, check=True).stdout
    map_id = json.loads(m)["id"]
    progs = subprocess.run(["bpftool", "-j", "prog", "show"], capture_output=True, text=True, check=True).stdout
    ids = {prog["id"] for prog in json.loads(progs) if map_id in prog.get("map_ids", [])}
    assert len(ids) >= 3, "bpftool names no program of the host's policy"
    # sandboxed, the policy process sees its own VM's pins and not the host's maps (nor holds an fd of them)
    assert os.path.isdir(f"/proc/{policy_pid}/root/sys/fs/bpf/pvsched/{pid}")
    assert not os.path.exists(f"/proc/{policy_pid}/root/sys/fs/bpf/pvsched/host"), "the host's maps are in reach"
    held = {int(line.split(":")[1]) for fd in os.listdir(f"/proc/{policy_pid}/fdinfo")
            for line in Path(f"/proc/{policy_pid}/fdinfo/{fd}").read_text().splitlines() if line.startswith("map_id:")}
    assert map_id not in held, "the sandboxed policy process holds the host's outer map"
    os.kill(policy_pid, 9)
    # the VMM's supervisor restores the threads (within 100 ms)
    assert wait_for(lambda: all(os.sched_getscheduler(t) == OTHER for t in tids.values()), 0.5)

    def gone() -> bool:
        out = subprocess.run(["bpftool", "-j", "prog", "show"], capture_output=True, text=True, check=True).stdout
        return not ids & {prog["id"] for prog in json.loads(out)}

    # the only VM's policy process held the programs: they go with it (no pin holds a link)
    assert wait_for(gone, 2.0, 0.05), "programs outlived the policy process"
    _, err = p.communicate(timeout=40)
    assert p.returncode == 0, err[-2000:]
    # and the VMM, at its end, took its entries out of the host's maps: the last VM removed the host's pins
    assert not host.exists()


def test_e2e_probe_under_host_load_is_boosted_then_returns_to_normal_with_the_guest(vm):
    """Host busy with CPU hogs; vCPU 0 runs the RT probe for 3 s, then normal work: boosted, capped, then OTHER/0."""
    # each in its own process group (killpg: killing `timeout` alone would orphan its spinning child), in this
    # session: a session of its own is a task group of its own under autogroup, weighing as one task
    hogs = [subprocess.Popen(["timeout", "-s", "KILL", "30", sys.executable, "-c", "while True: pass"],
                             process_group=0) for _ in range(os.cpu_count() or 2)]
    try:
        p, _, tids = vm("duration=6 workload=probe+busy,idle", seconds=6)
        t0 = time.monotonic()  # the guest is at most ~1 s into its 3 s probe phase here
        samples = []
        with observer_rt():
            while (now := time.monotonic()) < t0 + 4.6:
                samples.append((now - t0, *observed(tids[0])))
                time.sleep(0.002)
        probe = [s for s in samples if s[0] < 1.0]
        normal = [s for s in samples if s[0] > 3.6]
        assert all(pol == OTHER or (pol == RR and prio <= 10) for _, pol, prio, _ in samples), "above the cap"
        boosted = sum(1 for _, pol, prio, _ in probe if pol == RR and prio == 8)
        assert boosted >= 0.8 * len(probe), f"probe vCPU at RR 8 in only {boosted}/{len(probe)} samples under load"
        plain = sum(1 for _, pol, _, nice in normal if pol == OTHER and nice == 0)
        assert plain >= 0.95 * len(normal), f"back to OTHER nice 0 in only {plain}/{len(normal)} samples"
        _, err = p.communicate(timeout=40)
        assert p.returncode == 0, err[-2000:]
    finally:
        for h in hogs:
            os.killpg(h.pid, signal.SIGKILL)  # timeout and the spinner: the group we started
            h.wait()


def test_e2e_pyvmm_policy_set_changes_the_next_decision(vm):
    """`pyvmm policy set boost_prio=5` on a running VM: the halted vCPUs' held boosts follow (RR 8 -> RR 5)."""
    p, pid, tids = vm("duration=4 workload=idle,idle", 4, "--policy-set", "boost_on_halt=always")
    assert wait_for(lambda: all(observed(t)[:2] == (RR, 8) for t in tids.values()), 2.0), "idle vCPUs not at RR 8"
    r = subprocess.run([sys.executable, "-m", "pyvmm.cli", "policy", "set", "boost_prio=5", "--vm", str(pid)], cwd=ROOT,
                       capture_output=True, text=True, timeout=10, check=False)
    assert r.returncode == 0, r.stderr
    assert wait_for(lambda: all(observed(t)[:2] == (RR, 5) for t in tids.values()), 1.0), \
        f"still {[observed(t) for t in tids.values()]} after policy set"
    bad = subprocess.run([sys.executable, "-m", "pyvmm.cli", "policy", "set", "boost_prio=99", "--vm", str(pid)],
                         cwd=ROOT, capture_output=True, text=True, timeout=10, check=False)
    assert bad.returncode != 0 and "boost_prio" in bad.stderr and "Traceback" not in bad.stderr, bad.stderr
    assert all(observed(t)[:2] == (RR, 5) for t in tids.values()), "a refused set changed something"
    _, err = p.communicate(timeout=40)
    assert p.returncode == 0, err[-2000:]
