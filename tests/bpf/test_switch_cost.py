"""What the policy's BPF costs a host context switch that involves no VM (pyvmm.bench.switchcost), for real."""

from __future__ import annotations

import os

import pytest

from pyvmm.bench import switchcost

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="loads BPF programs: needs root")


def test_host_switches_without_a_vm_thread_run_the_programs_and_stop_at_the_tgid_check():
    n = 2000
    cost = switchcost.measure(round_trips=n, rounds=1)
    sw, wk = cost["programs"]["pvs_switch"], cost["programs"]["pvs_wakeup"]
    # on one CPU each side must stop running once per round trip (two switches), and the reader sleeps in its
    # read before every write but the first (a wake-up; the writer, preempted while runnable, may need none);
    # other host tasks only add runs
    assert sw["runs"] >= 2 * n and wk["runs"] >= n - 1, cost
    assert sw["ns_per_run"] > 0 and wk["ns_per_run"] > 0
    assert cost["ns_per_host_switch"] == pytest.approx(sw["ns_per_run"] + wk["ns_per_run"], abs=0.2)
    # the fast path: no switch of a task outside the VMM goes past the tgid check (stat switch_vmm)
    assert cost["vmm_runs"] == 0
    assert all(cost["round_trip_ns"][k] > 0 for k in ("off", "on", "floor"))
    # the empty programs ran on the same tracepoints, as often
    assert cost["floor"]["pvs_switch"]["runs"] >= 2 * n and cost["floor"]["pvs_switch"]["ns_per_run"] > 0
