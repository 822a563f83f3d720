"""Host protection: a guest that asks for FIFO 99 and spins forever gets no more RT time than the throttle allows.

The bound, from the policy code (pyvmm/policy/pvsched.bpf.c, account() and pvsched_eval()):
a spinner never switches out, so it is checked by the in-kernel throttle
clock every S = clock_ms (and its slot re-read by the backstop every
backstop_ms, or when the actuator preempts it).  After an unthrottle the
window restarts and the next slot read boosts it again (the slot still asks
FIFO 99); it is throttled at the first check that finds more than
B = max_boost_runtime_ms boosted in the window (so after at most B + S, if
B + S < W = throttle_window_ms), then runs with its original attributes for
at least T = throttle_ms.  So per cycle RT time <= B + S + a (a: the
actuator's hop, well under 1 ms here), non-RT time >= T, and

    RT share <= (B + S + a) / (B + S + a + T)      (defaults: 37/137 = 27%)

not B / (W + T) (the window restarts at each unthrottle).  Measured: the vCPU
thread's run time from /proc/<pid>/task/<tid>/schedstat, counted as RT when the
thread was RT at either end of a ~1 ms sampling interval (an upper bound),
while a host CPU hog is pinned to the same CPU.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from hostile_util import (
    RT,
    Sampler,
    alive,
    children,
    kill_pid,
    link_prog_ids,
    map_tids,
    observer_rt,
    shm_map,
    wait_active,
    wait_for,
)
from tiny_guest import build_guest  # tests/: tiny guests by the boot contract

from pyvmm import abi
from pyvmm.bench.cpuacct import tree_cpu_s
from pyvmm.common import libbpf
from pyvmm.common.sched_attr import sched_getattr
from pyvmm.policy import host_budget

C = abi.C

HOG_CPU, SAMPLER_CPU = 1, 0
WINDOW_S = 2.0
ACTUATOR_HOP_MS = 2.0  # allowance for the ring-buffer hop + sched_setattr (p99 well under 1 ms measured)


def rt_share_bound(b_ms: float, s_ms: float, t_ms: float) -> float:
    """Upper bound of the RT share of a FIFO spinner under the throttle (see the module docstring)."""
    on = b_ms + s_ms + ACTUATOR_HOP_MS
    return on / (on + t_ms)


def measure_beside_a_hog(vm, tids: list[int], window_s: float, nice: int = 0) -> tuple[Sampler, Sampler, int]:
    """measure_vms_beside_a_hog for one VM."""
    (vcpu,), host, hog_pid = measure_vms_beside_a_hog([(vm, tids)], window_s, nice)
    return vcpu, host, hog_pid


def measure_vms_beside_a_hog(vm_tids: list[tuple], window_s: float, nice: int = 0,
                             interval: float = 0.001) -> tuple[list[Sampler], Sampler, int]:
    """Sample the vCPU threads of each (vm, tids) and a host CPU hog (at `nice`) pinned to HOG_CPU for `window_s`:
    (a vCPU sampler per VM, the hog's sampler, hog pid).  The hog is killed by PID (its process group) afterwards, whatever happens.

    The hog gets a process group, never a session of its own: with autogroup scheduling a new session is a new
    task group of weight nice 0, and `nice` then only ranks the hog inside it.  Where the test runs in the
    root group (CI does), the hog's group then weighed as much as one vCPU thread, nice -20 or not (CI,
    2026-12-03: it kept 10.9% and 16.6%, about 1/9 and 1/5 of its CPU; here, in a session's group, 40-70%)."""
    hog = subprocess.Popen(["timeout", "-s", "KILL", str(int(window_s) + 20), "nice", "-n", str(nice), "taskset",
                            "-c", str(HOG_CPU), sys.executable, "-c", "while True: pass"], process_group=0)
    try:
        time.sleep(0.3)  # the hog is on its CPU, a cycle or two have passed
        hog_pid = children(hog.pid)[0]  # timeout -> taskset exec'd into the hog
        # this thread too at the observer's RT priority: a starved SCHED_OTHER thread holding the GIL would stall
        # the samplers
        vcpus = [Sampler(vm.pid, tids, interval=interval, cpu=SAMPLER_CPU) for vm, tids in vm_tids]
        with observer_rt(), contextlib.ExitStack() as stack, Sampler(hog_pid, [hog_pid], cpu=SAMPLER_CPU) as host:
            for sampler in vcpus:
                stack.enter_context(sampler)
            time.sleep(window_s)
        assert all(vm.watchdog.poll() is None for vm, _ in vm_tids), "a VM ended during the measurement"
    finally:
        kill_pid(hog.pid)  # timeout's child dies with its group's SIGKILL below
        try:
            os.killpg(hog.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        hog.wait()
    return vcpus, host, hog_pid


@pytest.mark.skipif(os.cpu_count() < 2, reason="pins the vCPU and a host hog to CPU 1, the sampler to CPU 0")
@pytest.mark.parametrize(("tunables", "window_s"), [
    pytest.param({}, WINDOW_S, id="defaults"),  # the shipped defaults: B 30, W 100, T 100, S 5
    pytest.param({"max_boost_runtime_ms": "10", "throttle_window_ms": "50", "throttle_ms": "40", "clock_ms": "2"},
                 WINDOW_S, id="tight"),
    pytest.param({}, 20.0, id="defaults-20s", marks=pytest.mark.slow),
])
def test_rt_spinner_gets_no_more_than_the_throttle_allows(vms, tunables: dict[str, str], window_s: float) -> None:
    args = sum((("--policy-set", f"{k}={v}") for k, v in tunables.items()), ())
    vm = wait_active(vms(f"duration={int(window_s) + 6} workload=hog", cpus=1, seconds=window_s + 6, args=args))
    tun = {k: int(v["value"]) for k, v in vm.show()["tunables"].items() if v["value"].isdigit()}
    b, s, t = tun["max_boost_runtime_ms"], tun["clock_ms"], tun["throttle_ms"]
    assert b + s < tun["throttle_window_ms"], "the bound below assumes B + S < W"
    bound = rt_share_bound(b, s, t)
    tid = vm.tids[0]
    os.sched_setaffinity(tid, {HOG_CPU})
    vcpu, host, hog_pid = measure_beside_a_hog(vm, [tid], window_s)
    span = vcpu.span_s()
    rt_s, run_s, host_s = vcpu.rt_run_s(tid), vcpu.run_s(tid), host.run_s(hog_pid)
    rt_samples = sum(1 for _, a, _ in vcpu.of(tid) if a.policy in RT)
    print(f"{tunables or 'defaults'}: over {span:.2f} s the vCPU ran {run_s:.3f} s, {rt_s:.3f} s of it at RT "
          f"({rt_s / span:.1%}; bound {bound:.1%}), the host hog on the same CPU ran {host_s:.3f} s "
          f"({host_s / span:.1%}); {rt_samples}/{len(vcpu.of(tid))} samples RT")
    assert span > 0.9 * window_s and len(vcpu.of(tid)) > 250 * window_s, \
        f"the sampler did not keep up: span {span:.3f} s, longest gap {vcpu.max_gap_s():.3f} s, {len(vcpu.of(tid))}"
    assert rt_s <= (bound + 0.04) * span, f"RT run time {rt_s:.3f} s above the throttle's bound {bound:.1%}"
    # meaningful: the spinner really was boosted (else the bound holds trivially), and the host kept its CPU
    assert rt_s >= 0.5 * b / (b + s + t) * span, f"only {rt_s:.3f} s at RT: the hog was never boosted?"
    assert host_s >= 0.5 * (1 - bound) * span * 0.6, f"the host hog got only {host_s:.3f} s of its CPU"
    assert vm.show()["vcpus"][0]["throttles"] >= 5


# A guest that asks FIFO 99 in its slot and spins in guest code, writing CONTROL = ENABLE, spinning about
# 20 ms (TSC), then DISABLE, for ever: the re-registration attack.  Before budgets were carried per
# TID each registration started a fresh window (estimated 70% RT); the device's rate limit then refuses
# most ENABLEs (AGAIN).
TOGGLE_GUEST = r"""
.macro SPIN ticks
    rdtsc
    shl $32, %rdx
    or %rdx, %rax
    mov %rax, %rsi
    mov $\ticks, %rcx
    add %rcx, %rsi
1:  rdtsc
    shl $32, %rdx
    or %rdx, %rax
    cmp %rsi, %rax
    jb 1b
.endm
_start:
    PCI_FIND 0x70731234
    CFG_R 0x10
    and $0xfffffff0, %eax
    mov %eax, %edi
    movl $2, 0x200040             # slot 0: seq 2 (complete), flags 0, FIFO 99, nice 0
    movl $0, 0x200044
    movl $1, 0x200048
    movl $99, 0x20004c
    movl $0, 0x200050
    movl $0x10000, 0x10(%rdi)     # version 1.0, every feature, the area at 2 MiB
    movl $0xf, 0x0c(%rdi)
    movl $0x200000, 0x18(%rdi)
    movl $0, 0x1c(%rdi)
    movl $0x1000, 0x20(%rdi)
toggle:
    movl $1, 0x24(%rdi)           # ENABLE: ACTIVE, or AGAIN when registrations come too often
    SPIN TICKS
    movl $2, 0x24(%rdi)           # DISABLE
    jmp toggle
"""


def _tsc_hz() -> int:
    """The host's TSC rate, near enough (the guest's TSC runs at it): cpu MHz of /proc/cpuinfo."""
    with open("/proc/cpuinfo") as f:
        mhz = next(float(line.split(":")[1]) for line in f if line.startswith("cpu MHz"))
    return int(mhz * 1e6)


def _toggle_guest(tmp_path: Path) -> Path:
    """TOGGLE_GUEST built, spinning about 20 ms (a 50th of the TSC's rate) between ENABLE and DISABLE."""
    return build_guest(tmp_path, TOGGLE_GUEST.replace("TICKS", str(_tsc_hz() // 50)), "toggle")


def _has_registered(st: dict) -> bool:
    """A toggling guest is seldom caught registered: enough that it registered once and the policy runs."""
    pv = st.get("pvsched", {})
    return bool(st.get("vcpu_tids") and pv.get("policy", {}).get("pid") and pv.get("enables", {}).get("accepted"))


@pytest.mark.skipif(os.cpu_count() < 2, reason="pins the vCPU and a host hog to CPU 1, the sampler to CPU 0")
def test_a_spinner_that_toggles_its_registration_gets_no_more_than_a_plain_one(vms, tmp_path) -> None:
    vm = wait_active(vms("", cpus=1, seconds=WINDOW_S + 6, args=("--kernel", str(_toggle_guest(tmp_path)))),
                     ready=_has_registered)
    tid = vm.tids[0]
    os.sched_setaffinity(tid, {HOG_CPU})
    tun = {k: int(v["value"]) for k, v in vm.show()["tunables"].items() if v["value"].isdigit()}
    bound = rt_share_bound(tun["max_boost_runtime_ms"], tun["clock_ms"], tun["throttle_ms"])
    before = vm.status()["pvsched"]["enables"]
    vcpu, host, hog_pid = measure_beside_a_hog(vm, [tid], WINDOW_S)
    after = vm.status()["pvsched"]["enables"]
    span, rt_s, host_s = vcpu.span_s(), vcpu.rt_run_s(tid), host.run_s(hog_pid)
    accepted, again = after["accepted"] - before["accepted"], after["again"] - before["again"]
    print(f"toggling spinner: RT {rt_s:.3f} s of {span:.2f} s ({rt_s / span:.1%}; a plain spinner's bound "
          f"{bound:.1%}), host hog {host_s / span:.1%}; ENABLEs in the window: {accepted} registered, {again} AGAIN")
    assert accepted + again >= 20 * span * 0.5, "the guest did not toggle about every 20 ms"
    assert accepted >= 2, "no registration happened in the window: nothing was tested"
    assert rt_s <= (bound + 0.04) * span, f"RT {rt_s:.3f} s: re-registering beat the throttle's bound {bound:.1%}"
    assert rt_s > 0, "never boosted: nothing was tested"


@pytest.mark.skipif(os.cpu_count() < 2, reason="the policy process and a host hog on CPU 1, the vCPU on CPU 0")
def test_a_registration_storm_costs_the_policy_process_little(vms, tmp_path) -> None:
    """ENABLE/DISABLE every 20 ms for 5 s: each registration is work at RT in the policy process, so the
    device's rate limit must keep it under 5% of a CPU, and a SCHED_OTHER hog beside it keeps 90% of its CPU."""
    storm_s = 5.0
    vm = wait_active(vms("", cpus=1, seconds=storm_s + 8, args=("--kernel", str(_toggle_guest(tmp_path)))),
                     ready=_has_registered)
    os.sched_setaffinity(vm.tids[0], {SAMPLER_CPU})
    for t in os.listdir(f"/proc/{vm.policy_pid}/task"):
        os.sched_setaffinity(int(t), {HOG_CPU})
    before, cpu0 = vm.status()["pvsched"]["enables"], tree_cpu_s(vm.policy_pid)
    _vcpu, host, hog_pid = measure_beside_a_hog(vm, [vm.tids[0]], storm_s)
    after, cpu1 = vm.status()["pvsched"]["enables"], tree_cpu_s(vm.policy_pid)
    span, host_s = host.span_s(), host.run_s(hog_pid)
    enables = after["accepted"] + after["again"] - before["accepted"] - before["again"]
    print(f"registration storm: {enables} ENABLEs in {span:.2f} s ({after['accepted'] - before['accepted']} "
          f"registered); the policy process used {cpu1 - cpu0:.3f} s of CPU ({(cpu1 - cpu0) / span:.1%}), the "
          f"hog beside it ran {host_s / span:.1%} of the time")
    assert enables >= 20 * span * 0.5, "the guest did not toggle about every 20 ms"
    assert (cpu1 - cpu0) < 0.05 * span, f"the policy process used {(cpu1 - cpu0) / span:.1%} of a CPU"
    assert host_s >= 0.9 * span, f"the hog on the policy process's CPU kept only {host_s / span:.1%}"


@pytest.mark.skipif(os.cpu_count() != 2, reason="8 vCPUs on exactly 2 CPUs, a host hog on CPU 1")
@pytest.mark.parametrize(("share", "hog_keeps"), [("30", 0.35), ("5", 0.6)], ids=["default", "share-5"])
def test_eight_spinning_vcpus_on_two_cpus_leave_a_host_hog_its_cpu(vms, share: str, hog_keeps: float) -> None:
    """Per-vCPU budgets are not a host budget: 8 vCPUs that each ask FIFO 99 and spin would get about
    0.27 x 8 CPUs at RT, every CPU of this host (measured: 83% of both, the hog kept 3%).  The VM's budget
    (vm_boost_share_pct of the host's CPUs) bounds them together.  RT time may pile up on the hog's CPU,
    so the hog keeps about 1 - share x 2 of it: 40% at the default 30 (which binds only VMs with more vCPUs
    than CPUs), 80% at 5 (2026-12-03, hog and VM in one task group: 56% and 86%; the issue asks 60%).  The
    hog runs at nice -20 so that what it loses is mostly RT time: at nice 0 the vCPU threads' fair share (4
    per CPU when not boosted) would take most of its CPU with or without a policy; at nice -20 they still
    take a few %.  That needs the hog in the VM's task group: see measure_beside_a_hog."""
    vm = wait_active(vms(f"duration={int(WINDOW_S) + 8} workload=" + ",".join(["hog"] * 8), cpus=8,
                         seconds=WINDOW_S + 8, args=("--policy-set", f"vm_boost_share_pct={share}")))
    tids = list(vm.tids.values())
    assert len(tids) == 8
    show = vm.show()
    budget_ms, window_ms = show["vm_budget"]["budget_ms"], int(show["tunables"]["throttle_window_ms"]["value"])
    share = budget_ms / window_ms / 2                          # of each of the 2 CPUs
    vcpus, host, hog_pid = measure_beside_a_hog(vm, tids, WINDOW_S, nice=-20)
    span = vcpus.span_s()
    rt_s = sum(vcpus.rt_run_s(t) for t in tids)
    host_s = host.run_s(hog_pid)
    stats = vm.stats()
    print(f"8 spinning vCPUs on 2 CPUs over {span:.2f} s: {rt_s:.3f} s at RT in all ({rt_s / span / 2:.1%} of the "
          f"2 CPUs; VM budget {share:.0%}), the host hog on CPU {HOG_CPU} ran {host_s:.3f} s ({host_s / span:.1%}); "
          f"vm_budget {stats['vm_budget']}, throttle {stats['throttle']}")
    assert host_s >= hog_keeps * span, f"the host hog got only {host_s / span:.1%} of its CPU"
    assert rt_s <= (2 * share + 0.1) * span, f"the VM's vCPUs took {rt_s:.3f} s at RT: over the VM's budget"
    assert stats["vm_budget"] > 0 and rt_s > 0.05 * span, "the VM's budget never bit: the test tested nothing"


@pytest.mark.parametrize("poison", ["guest_seq_odd", "host_seq_max"])
def test_boosted_spinner_that_scribbles_on_its_slot_is_still_throttled(vms, poison: str) -> None:
    """Once boosted, a guest scribbles on its slot without end while it spins at RT; the throttle must still bite.

    guest_seq_odd: its guest seqcount stays odd (no evaluation can read the slot).  Before the fix in
    pvs_backstop (throttle checked only after a good read) the spinner ran at RT ~97% of the time.
    host_seq_max: it writes 0xFFFFFFFF into the host area's seq (guest memory, though the host's to write).
    Before the fix in the actuator's write_host_area (now in actuator_loop.c), that overflowed the next seq,
    killed the actuator thread (no more backstop, then the only throttle) while the policy process stayed
    alive: RT ~93%, nothing restored.
    """
    vm = wait_active(vms("duration=6 workload=hog", cpus=1, seconds=6))
    tid = vm.tids[0]
    actuator = f"/proc/{vm.policy_pid}/task/{vm.show()['actuator']['tid']}"
    area = shm_map(vm)
    off = C.PVSCHED_SHM_HEADER_SIZE + (0 if poison == "guest_seq_odd" else C.PVSCHED_SLOT_SIZE // 2)
    stop = threading.Event()

    def scribble() -> None:
        while not stop.is_set():
            seq = struct.unpack_from("<I", area, off)[0]
            if poison == "host_seq_max":
                struct.pack_into("<I", area, off, 0xFFFFFFFF)
            elif not seq & 1:
                struct.pack_into("<I", area, off, seq | 1)
            time.sleep(0.0003)

    writer = threading.Thread(target=scribble, daemon=True)
    try:
        assert wait_for(lambda: sched_getattr(tid).policy in RT, 3), "the hog was never boosted"
        writer.start()
        with observer_rt(), Sampler(vm.pid, [tid]) as s:
            time.sleep(WINDOW_S)
    finally:
        stop.set()
        if writer.is_alive():
            writer.join(2)
        area.close()
    assert os.path.exists(actuator), "the policy's actuator thread died"
    tun = {k: int(v["value"]) for k, v in vm.show()["tunables"].items() if v["value"].isdigit()}
    bound = rt_share_bound(tun["max_boost_runtime_ms"], tun["clock_ms"], tun["throttle_ms"])
    rt_s, span = s.rt_run_s(tid), s.span_s()
    stats = vm.stats()
    print(f"{poison}: RT {rt_s:.3f} s of {span:.2f} s ({rt_s / span:.1%}, bound {bound:.1%}), "
          f"slot_torn {stats['slot_torn']}, throttles {stats['throttle']}")
    if poison == "guest_seq_odd":
        assert stats["slot_torn"] > 100, "the slot was not unreadable: the test did not test anything"
    assert rt_s <= (bound + 0.04) * span, f"RT {rt_s:.3f} s of {span:.2f} s: the throttle was evaded"


@pytest.mark.skipif(os.cpu_count() != 2, reason="16 vCPUs on exactly 2 CPUs, a host hog on CPU 1")
def test_four_vms_of_four_spinning_vcpus_stay_within_the_host_budget(vms, host_share) -> None:
    """A VM's budget bounds that VM only: 4 VMs at vm_boost_share_pct=100, each with 4 vCPUs that ask FIFO 99
    and spin, could keep every CPU at RT between them.  The host budget (10% of all CPUs, set the way an admin
    does) bounds them together, across four policy processes and four copies of the programs: RT time stays
    near 10% of the two CPUs, and a host hog at nice -20 keeps most of its CPU (see measure_beside_a_hog)."""
    share = host_share(10)["share_pct"] / 100
    started = [vms("duration=14 workload=hog,hog,hog,hog", cpus=4, seconds=14,
                   args=("--policy-set", "vm_boost_share_pct=100")) for _ in range(4)]
    running = [wait_active(vm) for vm in started]
    vm_tids = [(vm, list(vm.tids.values())) for vm in running]
    assert sum(len(t) for _, t in vm_tids) == 16
    vcpus, host, hog_pid = measure_vms_beside_a_hog(vm_tids, WINDOW_S, nice=-20)
    span = min(s.span_s() for s in vcpus)
    rt_s = sum(s.rt_run_s(t) for s, (_, tids) in zip(vcpus, vm_tids) for t in tids)
    host_s = host.run_s(hog_pid)
    bit = [vm.stats()["host_budget"] for vm in running]
    print(f"4 VMs x 4 spinning vCPUs on 2 CPUs over {span:.2f} s: {rt_s:.3f} s at RT in all ({rt_s / span / 2:.1%} "
          f"of the 2 CPUs; host budget {share:.0%}), the hog ran {host_s / span:.1%}; host_budget stat {bit}")
    assert sum(bit) > 0 and rt_s > 0.02 * span, "the host budget never bit: the test tested nothing"
    assert rt_s <= (2 * share + 0.1) * span, f"the VMs' vCPUs took {rt_s:.3f} s at RT together: over the host budget"
    assert host_s >= 0.6 * span, f"the host hog got only {host_s / span:.1%} of its CPU"


def test_the_host_budget_is_the_admins_alone(tmp_path) -> None:
    """The shared map's boundary: its pin is root's and read-only, a policy's fd cannot update it, and a process
    with the policy process's capabilities (no CAP_DAC_OVERRIDE) cannot open it for writing."""
    path = host_budget.pin_path()
    host_budget.read()  # created if absent
    st = os.lstat(path)
    assert st.st_uid == 0 and (st.st_mode & 0o777) == 0o400, oct(st.st_mode)
    fd = host_budget.shared_fd()
    try:
        value = host_budget.pffi().new("struct pvsched_host_budget *")
        rc = libbpf.lib().bpf_map_update_elem(fd, host_budget.pffi().new("__u32 *", 0), value, libbpf.BPF_ANY)
        assert rc != 0 and libbpf.ffi().errno == errno.EPERM, "a read-only fd updated the host budget"
    finally:
        os.close(fd)
    before = host_budget.read()
    child = subprocess.run([sys.executable, "-I", "-c", (
        "from pyvmm.policy import host_budget, sandbox\n"
        "sandbox.drop_capabilities()\n"
        "try:\n"
        "    host_budget.set_share(100)\n"
        "except OSError as e:\n"
        "    print('refused', e.errno)\n")], capture_output=True, text=True, cwd="/", timeout=60, check=False)
    assert child.returncode == 0, child.stderr[-2000:]
    assert child.stdout.split()[:2] == ["refused", str(errno.EACCES)], child.stdout
    assert host_budget.read()["share_pct"] == before["share_pct"]


@pytest.mark.skipif(os.cpu_count() != 2, reason="64 vCPU threads on exactly 2 CPUs, a host hog on CPU 1")
def test_sixty_four_vcpu_threads_of_eight_vms_on_two_cpus(vms, host_share) -> None:
    """8 VMs of 8 vCPUs (probe, busy, hog and idle vCPUs mixed; every hog asks FIFO 99 and spins), each with its
    policy process and its own copy of the programs, on 2 CPUs: no ring-buffer drops, each map holds its own
    VM's threads only, the host budget holds and a host hog keeps most of its CPU, ending one VM leaves the
    others' pins, programs and boosts as they were, and when every policy process dies at once the guardians
    restore all the vCPU threads."""
    share = host_share(10)["share_pct"] / 100
    kinds = ("probe", "busy", "hog", "idle")
    started = [vms("duration=40 workload=" + ",".join(kinds[(i + j) % 4] for j in range(8)), cpus=8, seconds=40)
               for i in range(8)]
    running = [wait_active(vm, timeout=60) for vm in started]
    assert sum(len(vm.tids) for vm in running) == 64
    for vm in running:
        assert map_tids(vm.pin_dir) == set(vm.tids.values()), f"VM {vm.pid}'s map holds foreign TIDs"
    # samplers every 5 ms: eight of them at 1 ms would take CPU 0 from the VMs
    vcpus, host, hog_pid = measure_vms_beside_a_hog([(vm, list(vm.tids.values())) for vm in running], WINDOW_S,
                                                    nice=-20, interval=0.005)
    span = min(s.span_s() for s in vcpus)
    rt_s = sum(s.rt_run_s(t) for s, vm in zip(vcpus, running) for t in vm.tids.values())
    host_s = host.run_s(hog_pid)
    stats = [vm.stats() for vm in running]
    print(f"64 vCPU threads on 2 CPUs over {span:.2f} s: {rt_s:.3f} s at RT ({rt_s / span / 2:.1%} of the CPUs, host "
          f"budget {share:.0%}), the hog ran {host_s / span:.1%}; host_budget {[st['host_budget'] for st in stats]}, "
          f"rb_drop {[st['rb_drop'] for st in stats]}")
    assert all(st["rb_drop"] == 0 for st in stats), "a policy dropped ring-buffer events"
    assert sum(st["host_budget"] for st in stats) > 0, "the host budget never bit: the test tested nothing"
    # a sampled interval counts as RT if either end was: an upper bound, looser with 5 ms samples
    assert rt_s <= (2 * share + 0.15) * span, f"the VMs' vCPUs took {rt_s:.3f} s at RT together: over the host budget"
    assert host_s >= 0.5 * span, f"the host hog got only {host_s / span:.1%} of its CPU"

    # end one VM: the other seven keep their pins, policy processes and attached programs
    gone, rest = running[0], running[1:]
    attached = {vm.pid: {p["id"] for p in vm.show()["programs"] if p.get("status") == "attached"} for vm in rest}
    os.kill(gone.pid, signal.SIGTERM)
    gone.finish(timeout=30)
    assert gone.watchdog.returncode == 128 + signal.SIGTERM
    assert wait_for(lambda: not gone.pin_dir.exists() and not alive(gone.policy_pid), 10)
    linked = link_prog_ids()
    for vm in rest:
        assert vm.pin_dir.is_dir() and alive(vm.policy_pid), f"VM {vm.pid} lost its pins or policy when one ended"
        assert attached[vm.pid] and attached[vm.pid] <= linked, f"VM {vm.pid}'s programs were detached"
        assert map_tids(vm.pin_dir) == set(vm.tids.values())

    # every policy process dies at once (SIGKILL: no cleanup of its own): every vCPU thread is restored
    for vm in rest:
        kill_pid(vm.policy_pid)
    for vm in rest:
        original = {v["tid"]: v["original"] for v in vm.status()["pvsched"]["vcpus"]}
        assert wait_for(lambda vm=vm, original=original: all(str(sched_getattr(t)) == o for t, o in original.items()),
                        5), f"VM {vm.pid}: vCPU threads not restored: {vm.status()['pvsched']['vcpus']}"
