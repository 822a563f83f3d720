"""The benchmark's host-side probes on the real machine: the BPF runqueue-latency program, cyclictest, stress-ng,
the CPU-time meter."""

from __future__ import annotations

import os
import subprocess
import threading
import time

import pytest

from pyvmm.bench.cpuacct import CpuMeter, threads_cpu_s, tree_cpu_s
from pyvmm.bench.hostload import HostCyclictest, StressLoad
from pyvmm.bench.runqlat import Runqlat, bucket_bounds_us, const, summarize

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (BPF, mlockall)")


def test_runqlat_buckets_and_summary():
    linear = const("RUNQLAT_LINEAR_US")
    assert bucket_bounds_us(5) == (5.0, 6.0)
    assert bucket_bounds_us(linear) == (linear, linear + linear / 64)  # 1/64 of a power of two past it
    assert bucket_bounds_us(linear + 64) == (2 * linear, 2 * linear + 2 * linear / 64)
    counts = [0] * const("RUNQLAT_NR_BUCKETS")
    counts[3], counts[40] = 98, 2
    s = summarize(100, 100 * 4000, 40500, counts)
    assert (s["p50"], s["p99"], s["max"]) == (3.0, 40.0, 40.5)
    assert summarize(0, 0, 0, [0] * 4)["p99"] is None


@needs_root
def test_runqlat_measures_only_tracked_threads():
    tids: list[int] = []
    stop = threading.Event()

    def sleeper() -> None:
        tids.append(threading.get_native_id())
        while not stop.is_set():
            time.sleep(0.001)  # wakes ~1000 times a second: each wake-up is one measured wait

    with Runqlat() as rq:
        rq.reset()
        t = threading.Thread(target=sleeper)
        t.start()
        try:
            time.sleep(0.3)
            assert rq.read()["all"]["count"] == 0  # not tracked yet: nothing counted
            rq.track(tids)
            time.sleep(0.5)
        finally:
            stop.set()
            t.join()
        res = rq.read()
        assert res["wakeup"]["count"] > 100
        assert 0 <= res["wakeup"]["p50"] <= res["wakeup"]["p99"] <= res["wakeup"]["max"] < 1_000_000
        rq.reset()
        assert rq.read()["all"]["count"] == 0


@needs_root
def test_host_cyclictest_runs_at_normal_priority_and_stress_reports_rates():
    stress = StressLoad(30)
    ct = HostCyclictest(30)
    try:
        time.sleep(1.5)
        policies = ct.thread_policies()
    finally:
        summary = ct.stop()
        rates = stress.stop()
    assert len(policies) >= 3 and set(policies) == {0}  # main + one thread per CPU, all SCHED_OTHER
    assert summary is not None and summary["samples"] > 500 and summary["threads"] == os.cpu_count()
    assert summary["min"] <= summary["avg"] <= summary["max"] and summary["min"] <= summary["p99"] <= summary["max"]
    assert {"cpu", "iomix", "vm", "fork"} <= set(rates) and rates["cpu"] > 0, f"rates {rates}; log {stress.output[-1500:]}"


def test_cpu_meter_sums_a_process_tree_and_ends_its_window_with_it():
    # A shell with two bounded spinners below it (SCHED_OTHER, 2 s), next to this test's sleeping thread.
    spin = "timeout 2 sh -c 'while :; do :; done'"
    root = subprocess.Popen(["sh", "-c", f"{spin} & {spin}; wait"])
    t0 = time.monotonic()
    try:
        meter = CpuMeter({"tree": lambda: tree_cpu_s(root.pid), "me": lambda: threads_cpu_s([threading.get_native_id()])},
                         period_s=0.05)
        root.wait(10)
        time.sleep(0.5)  # the meter keeps running; its window must have ended with the tree
        res = meter.stop()
    finally:
        if root.poll() is None:
            root.kill()
    assert res is not None and res["window_s"] < time.monotonic() - t0 - 0.3
    assert 0.5 < res["tree"] <= os.cpu_count() + 0.1  # two spinners: busy CPUs, never more than the host has
    assert res["me"] < 0.1  # a sleeping thread
    assert tree_cpu_s(root.pid) is None  # gone: no figure rather than a wrong one
