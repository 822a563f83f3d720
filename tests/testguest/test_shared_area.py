"""The host's view of the guest's slots while the test guest runs: seqcount protocol and published parameters.

The VM runs in-process (pyvmm.boot.run_vm on the main thread); a sampler thread reads the shared area
straight from guest RAM (machine.memory) at the GPA the guest reports, the way the host policy reads it.
"""

from __future__ import annotations

import itertools
import json
import struct
import threading

import pytest

from pyvmm import abi
from pyvmm.boot import BootConfig, run_vm

C = abi.C
GA = "struct pvsched_guest_area"
HDR = "struct pvsched_shm_header"


def off(field: str) -> int:
    return abi.offsetof(GA, field)


class LineTap:
    """A console stream that hands each complete guest line to a callback."""

    def __init__(self, on_line) -> None:
        self.buf = b""
        self.on_line = on_line

    def write(self, data: bytes) -> int:
        self.buf += data
        while b"\n" in self.buf:
            line, self.buf = self.buf.split(b"\n", 1)
            self.on_line(line.decode(errors="replace"))
        return len(data)

    def flush(self) -> None:
        pass


class SlotSampler:
    """Reads every vCPU's guest area under its seqcount until told to stop."""

    def __init__(self, nr_vcpus: int) -> None:
        self.nr = nr_vcpus
        self.machine = None
        self.shm_gpa: int | None = None
        self.ready = threading.Event()
        self.stop = threading.Event()
        self.header: bytes = b""
        self.states: list[dict[tuple, int]] = [{} for _ in range(nr_vcpus)]
        self.seqs: list[list[int]] = [[] for _ in range(nr_vcpus)]
        self.odd = [0] * nr_vcpus
        self.torn = [0] * nr_vcpus
        self.hints = [0] * nr_vcpus
        self.thread = threading.Thread(target=self.run, daemon=True)

    def on_line(self, line: str) -> None:
        if not line.startswith("{"):
            return
        rec = json.loads(line)
        if rec["type"] == "pvsched" and rec["status"] == "active":
            self.shm_gpa = rec["shm_gpa"]
            self.ready.set()
        elif rec["type"] in ("latency", "workload", "error", "done"):
            self.stop.set()  # the (first) phase is over, or the guest failed

    def snapshot(self, mem, v: int) -> None:
        base = self.shm_gpa + C.PVSCHED_SLOT_OFFSET + v * C.PVSCHED_SLOT_SIZE
        s1 = struct.unpack("<I", mem.read(base + off("seq"), 4))[0]
        area = mem.read(base, abi.sizeof(GA))
        s2 = struct.unpack("<I", mem.read(base + off("seq"), 4))[0]
        if s1 & 1:
            self.odd[v] += 1
            return
        if s1 != s2:
            self.torn[v] += 1
            return
        flags, policy, prio, nice = struct.unpack_from("<IiIi", area, off("flags"))
        self.hints[v] += struct.unpack_from("<I", area, off("wake_hint"))[0] != 0
        assert struct.unpack_from("<I", area, off("seq"))[0] == s1
        key = (flags, policy, prio, nice)
        self.states[v][key] = self.states[v].get(key, 0) + 1
        self.seqs[v].append(s1)

    def run(self) -> None:
        if not self.ready.wait(30):
            return
        mem = self.machine.memory
        self.header = mem.read(self.shm_gpa, abi.sizeof(HDR))
        while not self.stop.is_set():
            for v in range(self.nr):
                self.snapshot(mem, v)


def run_sampled(cmdline: str) -> SlotSampler:
    """Boot the test guest in-process on 2 vCPUs while a SlotSampler reads the shared area."""
    sampler = SlotSampler(2)

    def attach(machine) -> None:
        sampler.machine = machine
        sampler.thread.start()

    cfg = BootConfig(cmdline=cmdline, cpus=2, timeout=60, console_stream=LineTap(sampler.on_line),
                     setup=[attach], control_socket=False)
    try:
        result = run_vm(cfg)
    finally:
        sampler.stop.set()
        sampler.thread.join(10)
    assert result.exit_code == 0, result.console[-2000:]
    assert sampler.shm_gpa is not None, "the guest did not report an active shared area"
    return sampler


@pytest.mark.parametrize("prober", [0, 1])
def test_host_sees_slots_switch_between_rt_probe_and_idle(prober: int) -> None:
    """Acceptance: each vCPU's slot alternates RT probe params / IDLE, with consistent, growing seqcounts.

    One vCPU probes per run (each in turn) while the other halts: on this 2-CPU host two probing
    vCPUs wake on the same deadlines and take both CPUs exactly while their probe runs, so the
    (SCHED_OTHER) sampler would only ever look in while they are idle.
    """
    workload = ",".join("probe" if v == prober else "idle" for v in range(2))
    sampler = run_sampled(f"duration=2 interval=500 probe_policy=fifo probe_prio=9 workload={workload}")

    magic, version, features, nr, slot_size, slot_offset = struct.unpack_from("<6I", sampler.header)
    assert (magic, version, features, nr) == (C.PVSCHED_MAGIC, C.PVSCHED_VERSION, C.PVSCHED_F_ALL, 2)
    assert (slot_size, slot_offset) == (C.PVSCHED_SLOT_SIZE, C.PVSCHED_SLOT_OFFSET)

    probe = (0, C.PVSCHED_POLICY_FIFO, 9, 0)
    idle = (C.PVSCHED_FLAG_IDLE, C.PVSCHED_POLICY_OTHER, 0, 0)
    in_irq = (C.PVSCHED_FLAG_IDLE | C.PVSCHED_FLAG_IN_HARDIRQ, C.PVSCHED_POLICY_OTHER, 0, 0)
    # the probe (RT) sleeping: idle with RT_WAITING (F_RT_WAITER), also while its timer interrupt runs
    rt_idle = (C.PVSCHED_FLAG_IDLE | C.PVSCHED_FLAG_RT_WAITING, C.PVSCHED_POLICY_OTHER, 0, 0)
    rt_in_irq = (rt_idle[0] | C.PVSCHED_FLAG_IN_HARDIRQ, C.PVSCHED_POLICY_OTHER, 0, 0)
    other = (0, C.PVSCHED_POLICY_OTHER, 0, 0)  # boot and reporting code around the probe phase
    for v in range(2):
        seen = sampler.states[v]
        assert seen.get(idle, 0) + seen.get(rt_idle, 0) > 0, (v, seen)
        # Nothing else is ever seen (a torn read would mix two states, e.g. IDLE with FIFO 9).
        assert set(seen) <= {probe, idle, in_irq, rt_idle, rt_in_irq, other}, (v, seen)
        seqs = sampler.seqs[v]
        assert all(s % 2 == 0 for s in seqs)
        assert all(a <= b for a, b in itertools.pairwise(seqs)), "seqcount went backwards"
    seen = sampler.states[prober]
    assert seen.get(probe, 0) > 0 and seen.get(rt_idle, 0) > 0, (prober, seen)
    assert rt_idle not in sampler.states[1 - prober], "the vCPU without an RT task reported an RT waiter"
    seqs = sampler.seqs[prober]
    # 2 s at 500 us: ~4000 wakeups, each three slot writes (idle, irq, task) = two seq steps each.
    assert seqs[-1] - seqs[0] > 2 * 2000, (prober, seqs[0], seqs[-1])
    assert probe not in sampler.states[1 - prober], "the halted vCPU's slot showed the probe"


def test_waker_sets_the_wakees_wake_hint_and_the_wakee_clears_it():
    """A remote wakeup raises wake_hint on the target's slot only, and the woken vCPU clears it."""
    sampler = run_sampled("duration=2 workload=waker,wakee probe_prio=7")
    assert sampler.hints[1] > 0, "vCPU 1's wake_hint was never seen set"
    assert sampler.hints[0] == 0, "nobody wakes vCPU 0: its hint must stay clear"
    wakee_running = (0, C.PVSCHED_POLICY_RR, 7, 0)
    assert sampler.states[1].get(wakee_running, 0) > 0
    # Cleared on wakeup: most of the time (halted, waiting) the hint is down.
    assert sampler.hints[1] < sum(sampler.states[1].values()) // 2


def test_busy_and_hog_publish_their_nice_and_rt_request():
    """TASK_PARAMS: a busy task's nice and a hog's FIFO request are what the host reads while they run."""
    sampler = run_sampled("duration=1 workload=busy,hog busy_nice=-5 hog_prio=20")
    busy = (0, C.PVSCHED_POLICY_OTHER, 0, -5)
    hog = (0, C.PVSCHED_POLICY_FIFO, 20, 0)
    assert max(sampler.states[0], key=sampler.states[0].get) == busy, sampler.states[0]
    assert max(sampler.states[1], key=sampler.states[1].get) == hog, sampler.states[1]


def test_host_sees_the_lock_holders_slot_marked_preempt_disabled():
    """CRITICAL_SECTIONS from CPL3: the lock holder's slot shows PREEMPT_DISABLED to the host, the kernel's ticks
    keep it (PREEMPT_DISABLED | IN_HARDIRQ while one lands in a hold), and the seqcount stays whole."""
    sampler = run_sampled("duration=1 workload=lock,lock lock_tick_us=1000")
    pd, irq, idle = C.PVSCHED_FLAG_PREEMPT_DISABLED, C.PVSCHED_FLAG_IN_HARDIRQ, C.PVSCHED_FLAG_IDLE
    other = C.PVSCHED_POLICY_OTHER
    held = (pd, other, 0, 0)
    allowed = {(f, other, 0, 0) for f in (0, pd, irq, pd | irq, idle, idle | irq)}  # idle: boot and reporting
    for v in range(2):
        seen = sampler.states[v]
        assert seen.get(held, 0) > 0, (v, seen)
        assert set(seen) <= allowed, (v, seen)
        seqs = sampler.seqs[v]
        assert all(s % 2 == 0 for s in seqs)
        assert all(a <= b for a, b in itertools.pairwise(seqs)), "seqcount went backwards"
