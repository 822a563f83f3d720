"""The policy process for real: its sandbox seen from /proc, what it receives, and its supervision."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import trio
from device_harness import SHM_GPA, C, Running
from standin import StandinVm

from pyvmm.abi import slots
from pyvmm.cli.status_text import render
from pyvmm.common.pins import remove_stale_pins
from pyvmm.common.sched_attr import SCHED_FIFO, SCHED_OTHER, SCHED_RR, SchedAttr, sched_getattr, sched_setattr
from pyvmm.device.device import PvschedDevice
from pyvmm.device.rate_limit import TokenBucket
from pyvmm.policy import process as policy_process
from pyvmm.policy import sandbox

KEPT_CAPS = (1 << 39) | (1 << 38) | (1 << 23) | (1 << 14)  # CAP_BPF, CAP_PERFMON, CAP_SYS_NICE, CAP_IPC_LOCK
HERE = Path(__file__).parent


def _proc_status(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/status") as f:
        return {k: v.strip() for k, _, v in (line.partition(":") for line in f)}


def _write_guest_slot(r: Running, vcpu: int, seq: int, flags: int, policy: int, prio: int, nice: int,
                      wake_hint: int) -> None:
    """Write a guest area the way the guest driver does (even seq = complete)."""
    r.vm.memory.write(SHM_GPA + slots.slot_offset(vcpu),
                      struct.pack("<IIiIiIQ", seq, flags, policy, prio, nice, wake_hint, 123456789))


def _wait_for(pred, timeout: float = 5.0, what: str = "condition"):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        v = pred()
        if v:
            return v
        time.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


def _registered(r: Running) -> dict | None:
    st = trio.run(r.dev.policy_status)
    return st if st.get("registered") else None


def test_sandbox_from_proc(running: Running) -> None:
    pid = running.policy_pid
    st = _proc_status(pid)
    assert int(st["CapEff"], 16) == KEPT_CAPS
    assert int(st["CapPrm"], 16) == KEPT_CAPS
    assert int(st["CapBnd"], 16) == KEPT_CAPS
    assert int(st["CapInh"], 16) == 0 and int(st["CapAmb"], 16) == 0
    assert st["NoNewPrivs"] == "1"
    assert st["Seccomp"] == "2"  # filter mode (the allowlist)
    assert int(st["PPid"]) == os.getpid()  # a child of the VMM
    # the native RT threads lock what they touch (their state, stacks, code, the slots), not the process
    assert 0 < int(st["VmLck"].split()[0]) < int(st["VmRSS"].split()[0]) // 2
    assert os.readlink(f"/proc/{pid}/ns/net") != os.readlink("/proc/self/ns/net")
    with open(f"/proc/{pid}/net/dev") as f:
        ifaces = [line.split(":")[0].strip() for line in f.readlines()[2:]]
    assert ifaces == ["lo"]
    assert os.readlink(f"/proc/{pid}/ns/ipc") != os.readlink("/proc/self/ns/ipc")
    # Its own mount namespace, with a root that holds only the code it runs (read-only), a /proc of
    # processes and its own VM's pin folder (the only writable mount): no /etc, /run, /sys or other VMs' pins.
    assert os.readlink(f"/proc/{pid}/ns/mnt") != os.readlink("/proc/self/ns/mnt")
    with open(f"/proc/{pid}/mountinfo") as f:
        mounts = {fields[4]: (fields[5].split(","), line.split(" - ")[1].split()[0])
                  for line in f for fields in [line.split()]}
    sup = running.dev.supervisor
    pin_dir = os.path.join(sup.pin_root, str(sup.vmm_pid))
    assert mounts["/"][1] == "tmpfs" and "ro" in mounts["/"][0]
    assert mounts["/proc"][1] == "proc"
    assert mounts[pin_dir][1] == "bpf"
    assert [m for m, (opts, _) in mounts.items() if "rw" in opts and m != "/proc"] == [pin_dir], mounts
    code = set(sandbox.outermost_paths([p for p in policy_process.code_paths() if os.path.exists(p)]))
    # every other mount is a kept code folder, or a submount of one
    assert all(any(m == c or m.startswith(c + "/") for c in code) for m in set(mounts) - {"/", "/proc", pin_dir}), \
        mounts
    assert not any(m.startswith(("/etc", "/run", "/dev", "/sys")) for m in set(mounts) - {pin_dir}), mounts


def test_registration_tids_and_slots(running: Running) -> None:
    r = running
    _write_guest_slot(r, 0, seq=4, flags=C.PVSCHED_FLAG_IN_HARDIRQ | C.PVSCHED_FLAG_IDLE, policy=2, prio=8,
                      nice=0, wake_hint=1)
    _write_guest_slot(r, 1, seq=10, flags=0, policy=0, prio=0, nice=-5, wake_hint=0)
    assert r.bar.negotiate() == C.PVSCHED_STATUS_ACTIVE
    st = _wait_for(lambda: _registered(r), what="registration")
    assert {v["id"]: v["tid"] for v in st["vcpus"]} == r.vm.vcpu_tids
    assert st["shm_hva"] == r.vm.memory.hva(SHM_GPA, 4096) and st["shm_size"] == 4096
    g0, g1 = st["vcpus"][0]["guest"], st["vcpus"][1]["guest"]
    assert (g0["seq"], g0["flag_names"], g0["policy_name"], g0["rt_priority"], g0["wake_hint"]) == \
        (4, ["hardirq", "idle"], "rr", 8, 1)
    assert (g1["seq"], g1["nice"], g1["guest_ns"]) == (10, -5, 123456789)
    # It reads live memory through its own mapping of the memfd, not a copy taken at registration.
    _write_guest_slot(r, 1, seq=12, flags=C.PVSCHED_FLAG_PREEMPT_DISABLED, policy=1, prio=50, nice=0, wake_hint=0)
    g1 = trio.run(r.dev.policy_status)["vcpus"][1]["guest"]
    assert (g1["seq"], g1["flag_names"], g1["policy_name"], g1["rt_priority"]) == (12, ["preempt_disabled"], "fifo", 50)
    # A slot caught mid-write (odd seq) is not reported as data.
    _write_guest_slot(r, 1, seq=13, flags=0, policy=0, prio=0, nice=0, wake_hint=0)
    assert trio.run(r.dev.policy_status)["vcpus"][1]["guest"] is None
    # The device's own status command shows the same slots, as data and as `pyvmm status` prints them.
    reply = r.control("status")
    text = render("status", reply)
    assert "pvsched: active" in text and f"TID {r.vm.vcpu_tids[0]}" in text
    assert "flags hardirq,idle policy rr prio 8" in text
    assert reply["pvsched"]["policy"]["pid"] == r.policy_pid


def test_disable_then_enable_reregisters(running: Running) -> None:
    r = running
    assert r.bar.negotiate() == C.PVSCHED_STATUS_ACTIVE
    _wait_for(lambda: trio.run(r.dev.policy_status)["registered"], what="registration")
    r.bar.write("CONTROL", C.PVSCHED_CTRL_DISABLE)
    _wait_for(lambda: not trio.run(r.dev.policy_status)["registered"], what="unregistration")
    assert r.bar.negotiate(gpa=SHM_GPA + 0x10000, size=8192) == C.PVSCHED_STATUS_ACTIVE
    st = _wait_for(lambda: _registered(r), what="re-registration")
    assert st["shm_gpa"] == SHM_GPA + 0x10000 and st["shm_size"] == 8192
    assert {v["id"]: v["tid"] for v in st["vcpus"]} == r.vm.vcpu_tids


def _open_fds() -> dict[str, str]:
    out = {}
    for fd in os.listdir("/proc/self/fd"):
        try:
            out[fd] = os.readlink(f"/proc/self/fd/{fd}")
        except FileNotFoundError:
            pass  # listdir's own fd
    return out


def test_enable_disable_storm_is_coalesced(running: Running) -> None:
    """A guest toggling ENABLE/DISABLE cannot grow the VMM's queue or leak fds; the last state wins."""
    r = running
    r.dev._registrations = TokenBucket(1e9, 10**9)  # the second line of defence alone (the rate limit: test_bar)
    sup = r.dev.supervisor
    _wait_for(lambda: sup._token is not None, what="run() to start")  # trio's own epoll and wakeup fds exist
    fds_before = _open_fds()
    longest = 0
    for i in range(2000):
        assert r.bar.negotiate(gpa=SHM_GPA + (i % 4) * 0x1000) == C.PVSCHED_STATUS_ACTIVE
        r.bar.write("CONTROL", C.PVSCHED_CTRL_DISABLE)
        longest = max(longest, len(sup._queue))
    assert r.bar.negotiate(gpa=SHM_GPA + 0x8000) == C.PVSCHED_STATUS_ACTIVE
    assert longest <= 2
    st = _wait_for(lambda: (s := _registered(r)) and s["shm_gpa"] == SHM_GPA + 0x8000 and s, what="last registration")
    assert {v["id"]: v["tid"] for v in st["vcpus"]} == r.vm.vcpu_tids
    fds_after = _open_fds()
    new = {k: v for k, v in fds_after.items() if fds_before.get(k) != v}
    # the guardian's PIDFD_THREAD pidfds, one per thread of the policy process (its actuator and backstop loop
    # start at the first registration), and one fd besides
    threads = len(os.listdir(f"/proc/{sup.pid}/task"))
    pidfds = sum(v == "anon_inode:[pidfd]" for v in new.values())
    assert pidfds <= threads and len(new) - pidfds <= 1, new


def test_engine_runs_in_the_sandbox_and_tunables_forward(running: Running) -> None:
    r = running
    assert r.dev.supervisor.ready["engine"], r.dev.supervisor.ready.get("engine_error")
    assert os.path.isdir(f"/sys/fs/bpf/pvsched/{os.getpid()}")  # the engine's pins
    reply = r.control("policy.set", values={"boost_prio": "9"})
    assert reply["tunables"]["boost_prio"] == "9" and "boost_prio = 9" in render("policy.set", reply)
    bad = r.control("policy.set", values={"boost_prio": "99"})
    assert "error" in bad
    assert "error" in r.control("policy.set")
    show = r.control("policy.show")
    assert "error" not in show and show["text"]


def _boosted_by_policy(r: Running, vcpu: int) -> int:
    """Have the guest slot ask for RR 8 and wait until the policy process applied it; returns the TID."""
    assert r.bar.negotiate() == C.PVSCHED_STATUS_ACTIVE
    _write_guest_slot(r, vcpu, seq=2, flags=0, policy=2, prio=8, nice=0, wake_hint=0)
    tid = r.vm.vcpu_tids[vcpu]
    _wait_for(lambda: os.sched_getscheduler(tid) == SCHED_RR, what="the policy to boost the vCPU thread")
    return tid


def test_policy_boosts_from_the_slot_and_writes_the_host_area(running: Running) -> None:
    r = running
    tid = _boosted_by_policy(r, 0)
    assert os.sched_getparam(tid).sched_priority == 8
    host = _wait_for(lambda: (h := r.dev.snapshot()["vcpus"][0]["host"])["state_name"] == "boosted" and h,
                     what="the host area to show the boost")
    assert (host["policy_name"], host["rt_priority"]) == ("rr", 8) and host["boosts"] >= 1
    assert os.sched_getscheduler(r.vm.vcpu_tids[1]) == SCHED_OTHER  # its slot asks for nothing
    # A clean stop: the policy process restores the thread itself.
    r.dev.stop()
    assert r.dev.supervisor.returncode == 0
    assert sched_getattr(tid) == r.vm.original_sched[tid]


def test_policy_death_restores_threads_within_100ms(running: Running) -> None:
    r = running
    tid = _boosted_by_policy(r, 1)  # a real boost by the sandboxed policy (the thread blocks: safe at RT)
    os.kill(r.policy_pid, signal.SIGKILL)
    t0 = time.monotonic()
    while os.sched_getscheduler(tid) != SCHED_OTHER:
        assert time.monotonic() - t0 < 1.0, "vCPU thread still boosted 1 s after the policy process died"
        time.sleep(0.0005)
    elapsed_ms = (time.monotonic() - t0) * 1000
    print(f"restored in {elapsed_ms:.1f} ms")
    assert elapsed_ms < 100
    assert sched_getattr(tid) == r.vm.original_sched[tid]
    _wait_for(lambda: not os.path.exists(f"/sys/fs/bpf/pvsched/{os.getpid()}"), what="the VMM to remove the pins")
    # The VM carries on without boosting: the device still negotiates, nothing boosts any more.
    r.bar.write("CONTROL", C.PVSCHED_CTRL_DISABLE)
    assert r.bar.negotiate() == C.PVSCHED_STATUS_ACTIVE
    time.sleep(0.05)
    assert os.sched_getscheduler(tid) == SCHED_OTHER
    reply = r.control("status")
    assert "policy: not running (policy process died (killed by signal 9))" in render("status", reply)
    assert "error" in r.control("policy.show")


def test_hung_policy_process_is_killed_and_threads_restored() -> None:
    """A policy process that stops (SIGSTOP) is killed by the guardian when its heartbeat goes stale; boosts undone."""
    vm = StandinVm(2)
    dev = PvschedDevice()
    vm.add_pci_device(dev)
    trio.run(dev.start, vm)
    r = Running(vm, dev)
    r.thread.start()
    try:
        tid = _boosted_by_policy(r, 0)
        os.kill(r.policy_pid, signal.SIGSTOP)
        t0 = time.monotonic()
        _wait_for(lambda: os.sched_getscheduler(tid) == SCHED_OTHER, timeout=5, what="the guardian to restore")
        ms = (time.monotonic() - t0) * 1000
        print(f"stopped policy process: restored after {ms:.1f} ms")
        assert ms < dev.guardian_stale_ms + 100  # the Python ping (2 s / 5 s) would take seconds
        _wait_for(lambda: dev.supervisor.returncode is not None, what="the supervisor to reap it")
        assert dev.supervisor.returncode == -signal.SIGKILL
        g = dev.guardian.info()
        assert g["cause"] == "stale" and g["restored"] >= 1 and g["silent_ms"] >= dev.guardian_stale_ms, g
        assert sched_getattr(tid) == vm.original_sched[tid]
    finally:
        dev.stop()
        r.thread.join(10)
        dev.restore_threads()
        vm.close()


def test_stop_is_clean(running: Running) -> None:
    r = running
    assert r.bar.negotiate() == C.PVSCHED_STATUS_ACTIVE
    _wait_for(lambda: trio.run(r.dev.policy_status)["registered"], what="registration")
    pid = r.policy_pid
    r.dev.stop()
    assert r.dev.supervisor.returncode == 0
    assert not os.path.exists(f"/proc/{pid}")
    assert not os.path.exists(f"/sys/fs/bpf/pvsched/{os.getpid()}")


def test_stop_kills_a_stuck_policy_process_and_restores(running: Running) -> None:
    r = running
    tid = r.vm.vcpu_tids[0]
    sched_setattr(tid, SchedAttr(SCHED_FIFO, 5))  # as if boosted (the thread blocks: safe at RT)
    os.kill(r.policy_pid, signal.SIGSTOP)  # a stopped process cannot act on SIGTERM
    r.dev.stop_timeout_s = 0.5
    t0 = time.monotonic()
    r.dev.stop()
    assert time.monotonic() - t0 < 3
    assert r.dev.supervisor.returncode == -signal.SIGKILL
    assert sched_getattr(tid) == r.vm.original_sched[tid]
    assert not os.path.exists(f"/sys/fs/bpf/pvsched/{os.getpid()}")


def test_initial_tunables_reach_the_engine(vm: StandinVm) -> None:
    dev = PvschedDevice(tunables={"boost_prio": "9", "backstop_ms": "7"})
    vm.add_pci_device(dev)
    trio.run(dev.start, vm)
    try:
        show = trio.run(dev.handle_policy_show, {"cmd": "policy.show"})
        assert "error" not in show, show
        assert "boost_prio = 9" in show["text"] and "backstop_ms = 7" in show["text"]
    finally:
        dev.stop()


def test_stale_pins_of_dead_vmms_are_removed_at_start(vm) -> None:
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = Path(f"/sys/fs/bpf/pvsched/{dead.pid}")
    stale.mkdir(parents=True, exist_ok=True)
    dev = PvschedDevice()
    vm.add_pci_device(dev)
    trio.run(dev.start, vm)
    try:
        assert dev.supervisor is not None and dev.supervisor.alive
        assert not stale.exists()
    finally:
        dev.stop()
        if stale.exists():
            stale.rmdir()


PR_SET_CHILD_SUBREAPER = 36


@contextlib.contextmanager
def _subreaper():
    """Orphans of our children become ours while inside: their exit status can be read with waitpid."""
    sandbox.prctl(PR_SET_CHILD_SUBREAPER, 1)
    try:
        yield
    finally:
        sandbox.prctl(PR_SET_CHILD_SUBREAPER, 0)


def _reap(pid: int, storm: bool, timeout: float = 10.0) -> int:
    """Wait for our orphaned child `pid`; with `storm`, send it SIGTERM every millisecond meanwhile."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        if storm:
            os.kill(pid, signal.SIGTERM)  # safe: an unreaped child's pid cannot be reused
        time.sleep(0.001)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    raise AssertionError(f"policy process {pid} did not end within {timeout} s")


@pytest.mark.parametrize("storm", [False, True], ids=["vmm_killed", "vmm_killed_then_sigterm_storm"])
def test_killing_the_vmm_ends_the_policy_process_cleanly(storm: bool) -> None:
    """A dying VMM sends several SIGTERMs (one per reparenting among its threads), and a storm adds more:
    the first starts the one cleanup path, the rest interrupt nothing.  Exit 0, and every pin is gone."""
    for _ in range(2):
        with _subreaper():
            vmm = subprocess.Popen([sys.executable, str(HERE / "standin_vmm.py")], stdout=subprocess.PIPE,
                                   text=True, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
            pid = None
            try:
                info = json.loads(vmm.stdout.readline())
                pid = info["policy_pid"]
                assert _proc_status(pid)["PPid"] == str(vmm.pid)
                vmm.kill()
                vmm.wait(5)
                code = _reap(pid, storm)
            finally:
                if vmm.poll() is None:
                    vmm.kill()
                    vmm.wait()
                if pid is not None and os.path.exists(f"/proc/{pid}"):
                    with contextlib.suppress(ChildProcessError):
                        os.kill(pid, signal.SIGKILL)
                        os.waitpid(pid, 0)
        assert code == 0, f"the policy process ended with {code}, not through its clean exit"
        # The one cleanup path ran to its end before the exit: the VMM's pins (maps and links) are gone.  The
        # folder itself is a mount point in the confined root, which it cannot remove: the next start's sweep does.
        folder = f"/sys/fs/bpf/pvsched/{vmm.pid}"
        assert not os.path.exists(folder) or not os.listdir(folder), os.listdir(folder)
        remove_stale_pins("/sys/fs/bpf/pvsched")
        assert not os.path.exists(folder)


def test_policy_asked_for_but_not_loaded_is_a_hard_error(monkeypatch) -> None:
    """A run without BPF must not pass for a pvsched run: `pyvmm boot` refuses it (VmmError: exit 2)."""
    from pyvmm.boot import BootConfig, run_vm
    from pyvmm.device import device as devmod
    from pyvmm.vmm.machine import VmmError

    async def spawn(self) -> dict:  # the VMM awaits the device's start, which awaits this
        self.ready = {"op": "ready", "engine": False, "engine_error": "PolicyEngine failed: LibbpfError: no BTF"}
        return self.ready

    monkeypatch.setattr(devmod.PolicySupervisor, "spawn", spawn)
    with pytest.raises(VmmError, match=r"the BPF policy did not load: PolicyEngine failed: LibbpfError: no BTF "
                                       r"\(--no-policy runs without it\)"):
        run_vm(BootConfig(cmdline="duration=1", control_socket=False))
