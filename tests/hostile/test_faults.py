"""Faults, end to end through `pyvmm boot`: processes die, nothing stays boosted, nothing stays attached.

Already covered elsewhere (not repeated here): kill -9 of the policy process of
a live VM with halt-boosted vCPUs (tests/device/test_guest.py::
test_policy_death_in_a_live_vm), of a stand-in VMM (tests/device/
test_policy_process.py::test_killing_the_vmm_ends_the_policy_process), links
after SIGKILL of the policy child and stale pins at the next start with a
stand-in VMM (tests/bpf/test_bpf_cleanup.py), SIGINT/SIGTERM without pvsched
(tests/vmm/test_cli.py).  Here: the same faults with the real VMM, the real
test guest and its RT spinner.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time

import pytest
from hostile_util import RT, Sampler, alive, link_prog_ids, loaded_prog_ids, observer_rt, wait_active, wait_for

from pyvmm.common.sched_attr import SchedAttr, sched_getattr


def _gone(vm, timeout: float = 10) -> None:
    """The policy process ended, its pins are removed and none of its programs is linked or loaded.

    With its VMM killed, the emptied folder may stay: it is the policy process's own mount point in its
    confined root, which it cannot remove; the next start's sweep does (test_stale_pins_...)."""
    assert wait_for(lambda: not alive(vm.policy_pid), timeout, 0.01), "the policy process outlived its VMM"
    assert wait_for(lambda: not vm.pin_dir.exists() or not any(vm.pin_dir.iterdir()), timeout, 0.01), \
        f"pins left in {vm.pin_dir}: {sorted(p.name for p in vm.pin_dir.iterdir())}"
    assert vm.prog_ids, "no program ids recorded while the VM ran"
    assert wait_for(lambda: not vm.prog_ids & link_prog_ids(), timeout, 0.05), "a BPF link of ours is still there"
    assert wait_for(lambda: not vm.prog_ids & loaded_prog_ids(), timeout, 0.05), "a BPF program of ours is loaded"


def test_policy_killed_while_an_rt_spinner_is_boosted(vms) -> None:
    """kill -9 of the policy process while the hog vCPU is boosted: restored within 100 ms, and it stays so."""
    vm = wait_active(vms("duration=6 workload=hog,probe", seconds=6))
    tids = list(vm.tids.values())
    assert wait_for(lambda: all(sched_getattr(t).policy in RT for t in tids), 5), "never both boosted"
    os.kill(vm.policy_pid, signal.SIGKILL)
    t0 = time.monotonic()
    assert wait_for(lambda: all(sched_getattr(t) == SchedAttr() for t in tids), 1.0, 0.0005), \
        f"still boosted 1 s after the policy process died: {[str(sched_getattr(t)) for t in tids]}"
    ms = (time.monotonic() - t0) * 1000
    with Sampler(vm.pid, tids) as s:  # the spinner keeps asking FIFO 99: nobody may boost it again
        time.sleep(0.5)
    print(f"hog + probe vCPUs restored {ms:.1f} ms after SIGKILL of the policy process")
    assert ms < 100, f"restored after {ms:.1f} ms"
    assert all(a == SchedAttr() for _, _, a, _ in s.samples if a is not None), "boosted again after the death"
    assert vm.watchdog.poll() is None, "the VM died with its policy process"
    assert wait_for(lambda: not vm.pin_dir.exists(), 5, 0.01), "the VMM did not remove the dead policy's pins"
    out, err = vm.finish()
    assert vm.watchdog.returncode == 0, err[-2000:]
    assert '{"type":"done","status":"ok"}' in out
    assert err.count("died (killed by signal 9)") == 1, err
    assert not vm.prog_ids & link_prog_ids()


def test_policy_killed_while_every_cpu_runs_a_boosted_spinner(vms) -> None:
    """Two FIFO-99 spinners boosted on this 2-core host, then kill -9 of the policy: restored within 100 ms.

    Nothing at SCHED_OTHER can run meanwhile (the boosted vCPUs hold both CPUs), so Python in the VMM cannot
    restore (it waited ~1 s for a starved GIL holder): the VMM's native guardian thread does.
    """
    vm = wait_active(vms("duration=3 workload=hog,hog", seconds=3))
    tids = list(vm.tids.values())
    with observer_rt():
        assert wait_for(lambda: all(sched_getattr(t).policy in RT for t in tids), 3, 0.0005), "never both boosted"
        os.kill(vm.policy_pid, signal.SIGKILL)
        t0 = time.monotonic()
        assert wait_for(lambda: all(sched_getattr(t) == SchedAttr() for t in tids), 3, 0.0005), "never restored"
        ms = (time.monotonic() - t0) * 1000
    print(f"two boosted spinners restored {ms:.1f} ms after SIGKILL of the policy process")
    assert ms < 100, f"restored only after {ms:.1f} ms"
    _, err = vm.finish()
    assert vm.watchdog.returncode == 0, err[-2000:]


def test_policy_hung_while_an_rt_spinner_is_boosted(vms) -> None:
    """The policy process stops answering (SIGSTOP) while the hog vCPU is boosted: the boost must not outlive it.

    (Without the guardian's heartbeat check the spinner stayed at RT 97% of the time.)
    """
    vm = wait_active(vms("duration=4 workload=hog", cpus=1, seconds=4))
    tid = vm.tids[0]
    assert wait_for(lambda: sched_getattr(tid).policy in RT, 3), "never boosted"
    os.kill(vm.policy_pid, signal.SIGSTOP)
    try:
        with Sampler(vm.pid, [tid]) as s:
            time.sleep(1.0)
    finally:
        with contextlib.suppress(ProcessLookupError):  # the guardian killed it (and the VMM reaped it)
            os.kill(vm.policy_pid, signal.SIGCONT)
    share = s.rt_run_s(tid) / s.span_s()
    print(f"policy process stopped: the spinner ran at RT {share:.1%} of 1 s")
    assert share < 0.5, f"a hung policy process left the spinner at RT {share:.1%} of the time"
    _, err = vm.finish()  # the VM carries on without boosting
    assert vm.watchdog.returncode == 0, err[-2000:]
    assert "stopped beating: the guardian killed it" in err and err.count("died (killed by signal 9)") == 1, err


def test_vmm_killed_policy_exits_links_detach_pins_go(vms) -> None:
    vm = wait_active(vms("duration=10 workload=probe,idle", seconds=10))
    assert vm.pin_dir.is_dir() and vm.prog_ids <= loaded_prog_ids()
    assert vm.prog_ids & link_prog_ids(), "expected our programs to be linked while the VM runs"
    os.kill(vm.pid, signal.SIGKILL)
    _gone(vm)


def test_stale_pins_of_a_crashed_run_are_removed_at_the_next_start(vms) -> None:
    """VMM and policy process both SIGKILLed (no cleanup ran anywhere): the next `pyvmm boot` removes the pins."""
    crashed = wait_active(vms("duration=10 workload=idle,idle", seconds=10))
    os.kill(crashed.policy_pid, signal.SIGSTOP)  # cannot act on its parent-death SIGTERM
    os.kill(crashed.pid, signal.SIGKILL)
    assert wait_for(lambda: not alive(crashed.pid), 5, 0.01)
    os.kill(crashed.policy_pid, signal.SIGKILL)
    assert wait_for(lambda: not alive(crashed.policy_pid), 5, 0.01)
    pins = sorted(os.listdir(crashed.pin_dir))
    assert pins, "expected the crashed run's pins to be left behind"
    assert wait_for(lambda: not crashed.prog_ids & link_prog_ids(), 5, 0.05), "links must go with the process"
    nxt = wait_active(vms("duration=2 workload=idle,idle", seconds=2))
    assert not crashed.pin_dir.exists(), f"stale pins {pins} of dead VMM {crashed.pid} survived the next start"
    assert nxt.pin_dir.is_dir()
    _, err = nxt.finish()
    assert nxt.watchdog.returncode == 0, err[-2000:]
    assert not nxt.pin_dir.exists()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_to_pyvmm_boot_shuts_down_cleanly(vms, sig: signal.Signals) -> None:
    vm = wait_active(vms("duration=20 workload=probe,idle", seconds=20))
    assert wait_for(lambda: any(sched_getattr(t).policy in RT for t in vm.tids.values()), 5), "nothing boosted"
    os.kill(vm.pid, sig)
    out, err = vm.finish(timeout=20)
    assert vm.watchdog.returncode == 128 + sig, err[-2000:]
    assert "Traceback" not in err, err[-3000:]
    ours = [line for line in err.splitlines() if line.startswith("pyvmm:")]
    assert ours == [f"pyvmm: stopped by {sig.name}"], err[-2000:]
    # the guest's output so far is all there, in whole lines
    records = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert [r["type"] for r in records[:2]] == ["config", "pvsched"] and records[1]["status"] == "active", out
    assert out.endswith("\n"), out[-200:]
    assert "unregistered VM" in err and "died" not in err, err[-2000:]  # the policy process's clean path ran
    _gone(vm)
