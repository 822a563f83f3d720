"""Load: three VMs of two vCPUs each on this 2-core host, each with its own policy process and pin directory.

No ring-buffer drops, every vCPU's real attributes equal what its policy
applied, each policy's map holds only its own VM's threads, and ending one VM
leaves the others' pins, links and boosts untouched.
"""

from __future__ import annotations

import json
import os
import signal
import time

from hostile_util import RT, Sampler, alive, link_prog_ids, map_tids, wait_active, wait_for

from pyvmm.common.sched_attr import SchedAttr, sched_getattr

WORKLOADS = ("probe,idle", "probe,probe", "probe,busy")


def _attr(d: dict) -> SchedAttr:
    names = {"other": 0, "fifo": 1, "rr": 2, "batch": 3, "idle": 5}
    return SchedAttr(names[d["policy"]], d["priority"], d["nice"])


def _applied_matches_observed(vm) -> bool:
    return all(v["observed"] is not None and _attr(v["observed"]) == _attr(v["applied"]) for v in vm.show()["vcpus"])


def test_three_vms_on_two_cores(vms) -> None:
    started = [vms(f"duration=6 workload={w}", seconds=6) for w in WORKLOADS]
    a, b, c = (wait_active(vm) for vm in started)
    assert len({vm.policy_pid for vm in (a, b, c)}) == 3 and len({vm.pin_dir for vm in (a, b, c)}) == 3
    for vm in (a, b, c):
        assert vm.pin_dir.is_dir() and map_tids(vm.pin_dir) == set(vm.tids.values()), "a map holds foreign TIDs"
    time.sleep(1.0)
    for vm in (a, b, c):
        assert wait_for(lambda vm=vm: _applied_matches_observed(vm), 2), f"VM {vm.pid}: {vm.show()['vcpus']}"
    attached = {vm.pid: {p["id"] for p in vm.show()["programs"] if p.get("status") == "attached"} for vm in (b, c)}
    assert all(attached.values()) and attached[b.pid] <= link_prog_ids()
    # end A; B and C must not notice
    b_probe = b.tids[0]  # the RT probe: boosted at its halts (an RT task waits) and RR 8 while it runs
    assert wait_for(lambda: sched_getattr(b_probe).policy in RT, 2), "B's probe vCPU never boosted"
    os.kill(a.pid, signal.SIGTERM)
    _, err = a.finish(timeout=20)
    assert a.watchdog.returncode == 128 + signal.SIGTERM, err[-2000:]
    assert wait_for(lambda: not a.pin_dir.exists() and not alive(a.policy_pid), 5)
    with Sampler(b.pid, [b_probe]) as s:
        time.sleep(0.3)
    boosted = sum(1 for _, _, at, _ in s.samples if at is not None and at.policy in RT)
    assert boosted >= 0.9 * len(s.samples), f"B's probe vCPU lost its boost when A ended ({boosted}/{len(s.samples)})"
    linked = link_prog_ids()
    for vm in (b, c):
        assert vm.pin_dir.is_dir() and alive(vm.policy_pid), f"VM {vm.pid} lost its pins or policy when A ended"
        assert attached[vm.pid] <= linked, f"VM {vm.pid}'s programs were detached when A ended"
        assert wait_for(lambda vm=vm: _applied_matches_observed(vm), 2), f"VM {vm.pid}: {vm.show()['vcpus']}"
    stats = {vm.pid: vm.stats() for vm in (b, c)}
    for vm in (b, c):
        out, err = vm.finish(timeout=30)
        assert vm.watchdog.returncode == 0, err[-2000:]
        hosts = [json.loads(line) for line in out.splitlines() if line.startswith('{"type":"host"')]
        assert len(hosts) == 2 and all(h["consistent"] for h in hosts), hosts
        assert not vm.pin_dir.exists()
    print({pid: {k: v for k, v in st.items() if k in ("posted", "boost", "rb_drop", "lock_busy", "slot_torn")}
           for pid, st in stats.items()})
    for pid, st in stats.items():
        assert st["rb_drop"] == 0, f"VM {pid} dropped ring-buffer events: {st}"
