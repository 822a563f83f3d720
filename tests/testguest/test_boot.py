"""The test guest on real KVM through `pyvmm boot`: pvsched negotiation, refusals, workloads, results, exit codes."""

from __future__ import annotations

import json

import pytest

from pyvmm import abi

C = abi.C


def records(stdout: str) -> list[dict]:
    """The JSON lines of the guest console (contract 3)."""
    out = []
    for line in stdout.splitlines():
        if line.startswith("{"):
            out.append(json.loads(line))
    return out


def of_type(recs: list[dict], t: str) -> list[dict]:
    return [r for r in recs if r["type"] == t]


def boot(pyvmm, *args: str, timeout: float = 90) -> tuple[int, list[dict], str]:
    p = pyvmm("boot", "--json", "--timeout", str(timeout - 10), *args, timeout=timeout)
    return p.returncode, records(p.stdout), p.stdout + p.stderr


def check_latency(rec: dict, ms: int, interval_us: int) -> None:
    """A probe phase's summary is complete and self-consistent."""
    expected = ms * 1000 // interval_us
    assert rec["samples"] + rec["missed"] in range(expected - 2, expected + 1), rec
    assert rec["samples"] > expected // 4, rec  # a loaded host loses ticks, a broken probe loses them all
    assert 0 < rec["min"] <= rec["p50"] <= rec["p99"] <= rec["max"]
    assert rec["min"] <= rec["avg"] <= rec["max"]
    h = rec["hist"]
    assert sum(h["counts"]) + h["overflow"] == rec["samples"]
    assert 0 <= rec["irq"]["min"] <= rec["min"], "the interrupt cannot come after the task ran"


def test_default_boot_runs_probe_on_two_vcpus_with_pvsched_active(pyvmm):
    """Acceptance: `pyvmm boot` with no arguments: 2 vCPUs, device active, 5 s probe, summary, exit 0."""
    rc, recs, out = boot(pyvmm)
    assert rc == 0, out
    (pv,) = of_type(recs, "pvsched")
    assert pv["status"] == "active" and pv["version"] == C.PVSCHED_VERSION
    assert pv["features"] == C.PVSCHED_F_ALL and pv["nr_vcpus"] == 2
    (cfg,) = of_type(recs, "config")
    assert (cfg["vcpus"], cfg["duration_ms"], cfg["interval_us"]) == (2, 5000, 1000)
    lat = sorted(of_type(recs, "latency"), key=lambda r: r["vcpu"])
    assert [r["vcpu"] for r in lat] == [0, 1]
    for r in lat:
        assert (r["workload"], r["policy"], r["prio"]) == ("probe", "rr", 8)
        check_latency(r, 5000, 1000)
    assert of_type(recs, "done") == [{"type": "done", "status": "ok"}]


def test_phases_and_every_workload(pyvmm):
    rc, recs, out = boot(pyvmm, "--cmdline", "duration=1 interval=500 workload=probe+busy,hog+idle "
                                             "probe_policy=fifo probe_prio=5 hog_prio=20 busy_nice=-3")
    assert rc == 0, out
    (lat,) = of_type(recs, "latency")
    assert (lat["vcpu"], lat["phase"], lat["policy"], lat["prio"], lat["interval_us"]) == (0, 0, "fifo", 5, 500)
    check_latency(lat, 500, 500)
    work = {(r["vcpu"], r["phase"]): r for r in of_type(recs, "workload")}
    assert work[(0, 1)]["workload"] == "busy" and work[(0, 1)]["loops"] > 0 and work[(0, 1)]["nice"] == -3
    assert work[(1, 0)]["workload"] == "hog" and work[(1, 0)]["loops"] > 0 and work[(1, 0)]["prio"] == 20
    assert work[(1, 1)]["workload"] == "idle"
    assert all(r["ms"] == 500 for r in work.values())
    # HOST_FEEDBACK: each vCPU reports what the host applied, read consistently.
    hosts = of_type(recs, "host")
    assert sorted(r["vcpu"] for r in hosts) == [0, 1] and all(r["consistent"] for r in hosts)


def test_lapic_oneshot_timer_fallback(pyvmm):
    """timer=oneshot: the LAPIC one-shot path (hosts without TSC-deadline) keeps the same deadlines."""
    rc, recs, out = boot(pyvmm, "--cmdline", "duration=0.5 timer=oneshot")
    assert rc == 0, out
    assert of_type(recs, "config")[0]["timer"] == "lapic-oneshot"
    for r in of_type(recs, "latency"):
        check_latency(r, 500, 1000)


def test_remote_wakeups_waker_and_wakee(pyvmm):
    """A waker probe on vCPU 0 wakes an RT wakee on vCPU 1 (wake_hint + IPI); both report latencies."""
    rc, recs, out = boot(pyvmm, "--cmdline", "duration=1 workload=waker,wakee")
    assert rc == 0, out
    lat = {r["workload"]: r for r in of_type(recs, "latency")}
    assert (lat["waker"]["vcpu"], lat["wakee"]["vcpu"]) == (0, 1)
    check_latency(lat["waker"], 1000, 1000)
    # Every wake is a sample or was coalesced with the next one (counted missed).
    assert lat["wakee"]["samples"] + lat["wakee"]["missed"] in range(lat["waker"]["wakes"] - 2,
                                                                     lat["waker"]["wakes"] + 1)
    assert lat["wakee"]["samples"] > lat["waker"]["wakes"] // 3
    # The wakee's deadline is the waker's: it cannot run before the waker did.
    assert lat["wakee"]["min"] > lat["waker"]["min"]


def check_lock(rec: dict, ms: int, hold_us: int, gap_us: int, tick_us: int) -> None:
    """A lock phase's record: every acquisition is a wait sample, the rate fits the hold and the gap, the
    checks held (mutual exclusion, the flag kept), and some of the kernel's ticks found the flag set."""
    assert (rec["workload"], rec["policy"], rec["ms"]) == ("lock", "other", ms), rec
    assert (rec["lock_hold_us"], rec["lock_gap_us"], rec["lock_tick_us"]) == (hold_us, gap_us, tick_us)
    assert rec["violations"] == 0 and rec["flag_lost"] == 0, rec
    assert rec["samples"] == rec["acquisitions"] > ms * 5, rec  # at least 5000/s; no sample dropped
    assert rec["acq_per_s"] == rec["acquisitions"] * 1000 // ms
    assert rec["acq_per_s"] <= 1_000_000 // max(hold_us + gap_us, 1), rec  # each one holds and then waits out the gap
    assert 0 <= rec["min"] <= rec["p50"] <= rec["p99"] <= rec["max"] and rec["min"] <= rec["avg"] <= rec["max"]
    h = rec["hist"]
    assert sum(h["counts"]) + h["overflow"] == rec["samples"]
    expected_ticks = ms * 1000 // tick_us  # fewer when the host does not run the vCPU: the tick re-arms when it lands
    assert expected_ticks // 4 <= rec["irqs"] <= expected_ticks + 5, rec
    assert 0 < rec["irqs_in_hold"] <= rec["irqs"], rec  # the holder's slot showed PREEMPT_DISABLED to the kernel


def test_lock_workload_contends_one_spinlock_on_both_vcpus(pyvmm):
    """workload=lock on two vCPUs: acquisition waits, acquisitions per second, a marked holder, exit 0."""
    rc, recs, out = boot(pyvmm, "--cmdline", "duration=1 workload=lock,lock")
    assert rc == 0, out
    (cfg,) = of_type(recs, "config")
    assert (cfg["lock_hold_us"], cfg["lock_gap_us"], cfg["lock_tick_us"]) == (5, 5, 4000)
    lat = sorted(of_type(recs, "latency"), key=lambda r: r["vcpu"])
    assert [r["vcpu"] for r in lat] == [0, 1]
    for r in lat:
        check_lock(r, 1000, 5, 5, 4000)
    acq = [r["acquisitions"] for r in lat]
    assert min(acq) > max(acq) // 4, acq  # the lock passes between them: neither starves
    assert of_type(recs, "done") == [{"type": "done", "status": "ok"}]


def test_lock_workload_on_three_vcpus_with_its_knobs_and_without_the_device(pyvmm):
    """Three contenders on two host CPUs, a 1 us hold back to back, a 1 ms tick; pvsched=0 (the kernel's
    dummy slot takes the marks)."""
    rc, recs, out = boot(pyvmm, "--cpus", "3", "--cmdline",
                         "duration=0.5 workload=lock lock_hold_us=1 lock_gap_us=0 lock_tick_us=1000 pvsched=0")
    assert rc == 0, out
    lat = sorted(of_type(recs, "latency"), key=lambda r: r["vcpu"])
    assert [r["vcpu"] for r in lat] == [0, 1, 2]
    for r in lat:
        check_lock(r, 500, 1, 0, 1000)


def test_lock_workload_in_bursts_halts_between_them(pyvmm):
    """lock_busy_us: contend 200 us of every 1 ms interval and halt the rest; no tick, so no interrupt lands
    while the task runs (the halts' timer ends them), and the lock still passes between the vCPUs."""
    rc, recs, out = boot(pyvmm, "--cmdline", "duration=1 workload=lock,lock lock_busy_us=200 interval=1000 pvsched=0")
    assert rc == 0, out
    lat = sorted(of_type(recs, "latency"), key=lambda r: r["vcpu"])
    assert [r["vcpu"] for r in lat] == [0, 1]
    for r in lat:
        assert r["lock_busy_us"] == 200 and r["violations"] == 0 and r["flag_lost"] == 0, r
        assert r["irqs"] == 0, r  # the tick is off in bursts
        assert 0 < r["acquisitions"] < 1000 * 200 // 10, r  # at most one per hold + gap of each burst
    assert of_type(recs, "done") == [{"type": "done", "status": "ok"}]


@pytest.mark.parametrize("args,code,reason", [
    (["--cmdline", "duration=0.5 pvsched_features=40"], C.PVSCHED_STATUS_BAD_FEATURE, "BAD_FEATURE"),
    (["--cmdline", "duration=0.5 pvsched_version=20000"], C.PVSCHED_STATUS_BAD_VERSION, "BAD_VERSION"),
    (["--pvsched-host-version", "20000", "--cmdline", "duration=0.5"], C.PVSCHED_STATUS_BAD_VERSION, "BAD_VERSION"),
    (["--pvsched-host-features", "1", "--cmdline", "duration=0.5 pvsched_features=3"],
     C.PVSCHED_STATUS_BAD_FEATURE, "BAD_FEATURE"),
], ids=["guest-feature", "guest-version", "host-version", "host-features"])
def test_refusal_is_reported_and_the_workload_still_runs(pyvmm, args, code, reason):
    rc, recs, out = boot(pyvmm, *args)
    assert rc == 0, out
    (pv,) = of_type(recs, "pvsched")
    assert (pv["status"], pv["code"], pv["reason"]) == ("refused", code, reason), pv
    lat = of_type(recs, "latency")
    assert sorted(r["vcpu"] for r in lat) == [0, 1]
    for r in lat:
        check_latency(r, 500, 1000)
    assert of_type(recs, "host") == []  # no shared area: no host feedback
    assert of_type(recs, "done")[0]["status"] == "ok"


def test_guest_accepts_the_subset_the_host_offers(pyvmm):
    rc, recs, out = boot(pyvmm, "--pvsched-host-features", "3", "--cmdline", "duration=0.3 workload=idle")
    assert rc == 0, out
    (pv,) = of_type(recs, "pvsched")
    assert (pv["status"], pv["host_features"], pv["features"]) == ("active", 3, 3)


@pytest.mark.parametrize("args,status", [(["--no-pvsched"], "absent"), (["--cmdline", "pvsched=0"], "disabled")])
def test_without_the_device_the_guest_says_so_and_runs(pyvmm, args, status):
    if "--cmdline" in args:
        args = ["--cmdline", args[1] + " duration=0.5 workload=probe,idle"]
    else:
        args = [*args, "--cmdline", "duration=0.5 workload=probe,idle"]
    rc, recs, out = boot(pyvmm, *args)
    assert rc == 0, out
    assert of_type(recs, "pvsched") == [{"type": "pvsched", "status": status}]
    (lat,) = of_type(recs, "latency")
    check_latency(lat, 500, 1000)


def test_bad_command_line_is_one_error_and_exit_2(pyvmm):
    rc, recs, out = boot(pyvmm, "--cmdline", "duration=1 workload=probe,busy,hog")
    assert rc == 2, out
    (err,) = of_type(recs, "error")
    assert "workload" in err["message"] and err["exit"] == 2
    assert of_type(recs, "latency") == []


def test_one_vcpu_and_four_vcpus(pyvmm):
    for cpus in (1, 4):
        rc, recs, out = boot(pyvmm, "--cpus", str(cpus), "--cmdline", "duration=0.3 workload=idle")
        assert rc == 0, out
        assert of_type(recs, "pvsched")[0]["nr_vcpus"] == cpus
        assert sorted(r["vcpu"] for r in of_type(recs, "workload")) == list(range(cpus))


def test_stats_out_keeps_the_policys_final_counters_and_the_devices_state(pyvmm, tmp_path):
    """`--stats-out`: what the policy did over the whole run, written at the end (no polling needed)."""
    out_file = tmp_path / "stats.json"
    rc, _, out = boot(pyvmm, "--cmdline", "duration=1 interval=1000 workload=probe,probe", "--stats-out", str(out_file))
    assert rc == 0, out
    st = json.loads(out_file.read_text())
    assert st["exit_code"] == 0 and st["elapsed_s"] > 1
    dev = st["devices"]["pvsched"]
    assert dev["device"]["state"] == "active" and len(dev["device"]["vcpus"]) == 2
    stats = dev["policy"]["stats"]
    # 1 s of a 1000 us probe on two vCPUs: about 2000 halts and wake-ups, each seen by the BPF programs
    assert stats["halt"]["value"] > 500 and stats["wakeup"]["value"] > 500
    assert {v["vcpu"] for v in dev["policy"]["vcpus"]} == {0, 1}

    rc, _, out = boot(pyvmm, "--no-policy", "--cmdline", "duration=0.5", "--stats-out", str(out_file))
    assert rc == 0, out
    dev = json.loads(out_file.read_text())["devices"]["pvsched"]
    assert "policy" not in dev and dev["device"]["policy"] == {"enabled": False}

    rc, _, out = boot(pyvmm, "--stats-out", str(tmp_path / "missing" / "s.json"))
    assert rc == 2 and out.strip().splitlines()[-1].startswith("pyvmm: --stats-out")
