"""Hostile shared area: garbage written into a live VM's slots through its memfd never escapes the admin caps.

A real VM (test guest: vCPU 0 busy, so the BPF programs read its slot at
every preemption, vCPU 1 idle; the real BPF policy with tighter-than-default
caps) runs while hypothesis writes its slots, their host areas and the header
the way a hostile guest could: odd seqcounts left forever, torn writes under
an even seq, policies 6/7/99/-1, priority 1000, nice -100, garbage flags,
wake_hint storms, rapidly changing values, host seq 0xFFFFFFFF.  A sampler
independent of the policy reads the vCPU threads' real attributes
(sched_getattr) every ~1 ms over the whole run; every sample must be within
the caps, and the policy process and its actuator thread must live through
it all.
"""

from __future__ import annotations

import os
import random
import struct
import time

import pytest
from hostile_util import Caps, Sampler, alive, shm_map, start_vm, wait_active
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pyvmm import abi
from pyvmm.common.sched_attr import SchedAttr

C = abi.C
CAPS = Caps(max_rt_prio=6, allow_fifo=False, min_nice=-5)
# backstop 5 ms: each example waits for one slot re-read (the default 20 ms would quadruple the test's time)
TUNABLES = ("max_rt_prio=6", "boost_prio=5", "min_nice=-5", "allow_fifo=false", "backstop_ms=5")
HDR = C.PVSCHED_SHM_HEADER_SIZE
SLOT = C.PVSCHED_SLOT_SIZE
GUEST_FMT = "<IIiIiIQ"  # seq, flags, policy, rt_priority, nice, wake_hint, guest_ns (the guest area's head)

u32 = st.integers(0, 2**32 - 1)
s32 = st.integers(-(2**31), 2**31 - 1)
policies = st.one_of(st.sampled_from([0, 1, 2, 3, 5, 6, 7, 99, -1, 4]), s32)
prios = st.one_of(st.sampled_from([0, 1, 6, 7, 30, 99, 100, 1000, 2**32 - 1]), u32)
nices = st.one_of(st.sampled_from([-100, -21, -20, -6, -5, 0, 19, 20, 1000, -(2**31)]), s32)
flags = st.one_of(st.sampled_from([0, 0, 0, 0, 1, 2, 4, 8, 16, 16, 0x1F, 0xFFFFFFFF, 0xFFFFFFE0]), u32)
write = st.fixed_dictionaries({
    "op": st.just("write"),
    "vcpu": st.integers(0, 3),   # slots 2 and 3 exist in the page but belong to no vCPU
    "seq": st.sampled_from(["even", "even", "even", "odd_forever", "random", "torn"]),
    "flags": flags, "policy": policies, "prio": prios, "nice": nices,
    "wake_hint": st.one_of(st.sampled_from([0, 0, 0, 1]), u32),
    "hold_ms": st.integers(0, 6),
})
storm = st.fixed_dictionaries({"op": st.just("storm"), "vcpu": st.integers(0, 1), "seed": u32,
                               "ms": st.integers(5, 25)})
header = st.fixed_dictionaries({"op": st.just("header"), "data": st.binary(min_size=HDR, max_size=HDR)})
# the host area is the host's to write, but it is guest memory: a guest can scribble on it too
host_area = st.fixed_dictionaries({"op": st.just("host_area"), "vcpu": st.integers(0, 1),
                                   "seq": st.one_of(st.sampled_from([0xFFFFFFFF, 0xFFFFFFFE, 1]), u32),
                                   "rest": st.binary(min_size=SLOT // 2 - 4, max_size=SLOT // 2 - 4)})
ops = st.lists(st.one_of(write, write, storm, header, host_area), min_size=1, max_size=5)


class HostileVm:
    """The VM, its shared area mapped here, and the independent sampler."""

    def __init__(self) -> None:
        self.vm = wait_active(start_vm("duration=30 workload=busy,idle interval=20000", cpus=2, seconds=30,
                                       args=sum((("--policy-set", t) for t in TUNABLES), ())))
        self.area = shm_map(self.vm)
        self.original = {tid: SchedAttr() for tid in self.vm.tids.values()}  # `chrt -o 0`: SCHED_OTHER nice 0
        self.sampler = Sampler(self.vm.pid, list(self.vm.tids.values()))
        self.checked = 0
        self.actuator = f"/proc/{self.vm.policy_pid}/task/{self.vm.show()['actuator']['tid']}"
        self.rng = random.Random(0)

    def guest_write(self, vcpu: int, seq: int, fl: int, pol: int, prio: int, nice: int, hint: int) -> None:
        struct.pack_into(GUEST_FMT, self.area, HDR + SLOT * vcpu, seq & 0xFFFFFFFF, fl, pol, prio, nice, hint,
                         time.monotonic_ns())

    def seq(self, vcpu: int) -> int:
        return struct.unpack_from("<I", self.area, HDR + SLOT * vcpu)[0]

    def apply(self, op: dict) -> None:
        if op["op"] == "header":
            self.area[:HDR] = op["data"]
        elif op["op"] == "host_area":
            off = HDR + SLOT * op["vcpu"] + SLOT // 2
            self.area[off:off + SLOT // 2] = struct.pack("<I", op["seq"]) + op["rest"]
            time.sleep(0.006)  # let the actuator write over it at least once
        elif op["op"] == "storm":
            # rapidly changing values and a wake_hint storm, as fast as Python writes
            r = random.Random(op["seed"])
            end = time.monotonic() + op["ms"] / 1000
            v = op["vcpu"]
            while time.monotonic() < end:
                s = self.seq(v)
                self.guest_write(v, s | 1, r.getrandbits(32), r.choice([0, 1, 2, 6, 99, -1]), r.getrandbits(32),
                                 r.randint(-200, 200), r.getrandbits(1))
                self.guest_write(v, (s | 1) + r.choice([1, 1, 2]), r.getrandbits(32), r.choice([1, 2, 7]),
                                 r.choice([99, 1000]), -100, r.getrandbits(32))
        else:
            v, s = op["vcpu"], self.seq(op["vcpu"])
            fields = (op["flags"], op["policy"], op["prio"], op["nice"], op["wake_hint"])
            if op["seq"] == "even":
                self.guest_write(v, s | 1, *fields)
                self.guest_write(v, (s | 1) + 1, *fields)
            elif op["seq"] == "odd_forever":
                self.guest_write(v, s | 1, *fields)
            elif op["seq"] == "random":
                self.guest_write(v, self.rng.getrandbits(32), *fields)
            else:  # torn: values change under an unchanged (even) seq
                self.guest_write(v, s & ~1, *fields)
            time.sleep(op["hold_ms"] / 1000)

    def check(self) -> None:
        """No sample outside the caps so far; the policy process and the VMM still alive."""
        new = self.sampler.samples[self.checked:]
        self.checked += len(new)
        bad = [f"{a} tid {tid}" for _, tid, a, _ in new if a is not None and CAPS.violation(a, self.original[tid])]
        assert not bad, f"outside the caps: {bad[:5]}"
        assert alive(self.vm.policy_pid), "the policy process died"
        assert os.path.exists(self.actuator), "the policy's actuator thread died (no more throttling)"
        assert alive(self.vm.pid), "the VMM died"

    def close(self) -> None:
        try:
            self.area.close()
        finally:
            self.vm.kill()


@pytest.fixture(scope="module")
def hostile():
    h = HostileVm()
    try:
        with h.sampler:
            yield h
    finally:
        h.close()


@settings(derandomize=True, max_examples=200, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(ops)
def test_hostile_slot_writes_never_escape_the_caps(hostile: HostileVm, ops: list[dict]) -> None:
    for op in ops:
        hostile.apply(op)
    time.sleep(0.006)  # at least one backstop round (5 ms) reads what is there now
    hostile.check()


def test_after_the_storm_the_policy_is_intact_and_acted_on_the_hostile_input(hostile: HostileVm) -> None:
    """Runs after the property test (same module VM): the caps were actually exercised, nothing crashed."""
    # leave a last FIFO 99 request on vCPU 1 with a good seqcount: the cap must bite, exactly at max_rt_prio
    s = hostile.seq(1)
    hostile.guest_write(1, s | 1, 0, 1, 99, -100, 0)
    hostile.guest_write(1, (s | 1) + 1, 0, 1, 99, -100, 0)
    time.sleep(0.05)
    hostile.check()
    samples = [a for _, _, a, _ in hostile.sampler.samples if a is not None]
    assert len(samples) > 1000, f"only {len(samples)} samples: the sampler did not keep up"
    capped = [a for a in samples if a.policy == 2 and a.priority == CAPS.max_rt_prio]
    assert capped, "no RT request was ever applied at the cap: the hostile input never reached the policy"
    show = hostile.vm.show()
    rounds = show["actuator"]["backstop_rounds"]
    time.sleep(0.1)
    assert hostile.vm.show()["actuator"]["backstop_rounds"] >= rounds + 5, "the actuator thread stopped"
    stats = hostile.vm.stats()
    assert stats["slot_torn"] > 0, stats   # odd-forever seqcounts were seen and ignored
    assert stats["backstop"] > 0 and stats["posted"] > 0, stats
    assert stats["preempt"] > 100, stats  # the busy vCPU's slot was read in BPF at its preemptions, not only polled
    assert show["actuator"]["errors"] == 0, show["actuator"]
    assert hostile.vm.status()["pvsched"]["policy"]["pid"] == hostile.vm.policy_pid  # the same process all along
    print(f"hostile slots: {len(samples)} samples over {hostile.sampler.span_s():.1f} s, "
          f"{len(capped)} at the cap, stats { {k: v for k, v in stats.items() if v} }")

