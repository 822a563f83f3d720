"""Pure-logic checks of the BPF policy's userspace: tunable validation, struct layouts, stat descriptions."""

from __future__ import annotations

import subprocess

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pyvmm.common import libbpf
from pyvmm.common.sched_attr import SchedAttr
from pyvmm.policy.policy_types import consts, ffi, stat_descriptions
from pyvmm.policy.tunables import DEFAULTS, TunableError, parse


def test_defaults_are_the_design_values():
    t = parse(None)
    assert t.as_strings() == DEFAULTS
    assert (t.boost_prio, t.max_rt_prio, t.allow_fifo, t.min_nice) == (8, 10, False, -10)
    assert (t.max_boost_runtime_ms, t.throttle_window_ms, t.throttle_ms) == (30, 100, 100)
    # the throttle's period stays 5 ms (now the in-kernel clock); the slot re-read is 20 ms
    assert (t.clock_ms, t.backstop_ms) == (5, 20)


@pytest.mark.parametrize("values", [
    {"boost_prio": "31"}, {"max_rt_prio": "40"}, {"max_rt_prio": "0"}, {"boost_policy": "deadline"},
    {"allow_fifo": "maybe"}, {"min_nice": "-21"}, {"backstop_ms": "0"}, {"clock_ms": "0"}, {"debug": "3"}, {"nosuch": "1"},
    {"max_boost_runtime_ms": "200"}, {"boost_prio": "eight"},
    {"max_boost_runtime_ms": "95"},  # 95 + clock 5 reaches the 100 ms window: a spinner would escape
    {"boost_on_halt": "sometimes"},
])
def test_bad_tunables_are_refused_with_a_reason(values):
    with pytest.raises(TunableError) as e:
        parse(values)
    assert next(iter(values)) in str(e.value)


def test_set_is_relative_to_current_and_canonical():
    cur = parse({"boost_prio": "5"}).as_strings()
    t = parse({"allow_fifo": "YES", "boost_policy": "FIFO"}, base=cur)
    assert (t.boost_prio, t.allow_fifo, t.as_strings()["boost_policy"]) == (5, True, "fifo")


def test_boost_on_halt_modes_match_the_header_and_booleans_stay_accepted():
    from pyvmm.policy.tunables import HALT_BOOST

    c = consts()
    assert HALT_BOOST == {"never": c.PVSCHED_HALT_BOOST_NEVER, "always": c.PVSCHED_HALT_BOOST_ALWAYS,
                          "auto": c.PVSCHED_HALT_BOOST_AUTO}
    assert parse(None).boost_on_halt == "auto"
    assert parse({"boost_on_halt": "true"}).boost_on_halt == "always"  # the seed's behaviour, as before
    assert parse({"boost_on_halt": "False"}).as_strings()["boost_on_halt"] == "never"
    v = ffi().new("struct pvsched_tunables *")
    parse({"boost_on_halt": "always"}).fill(v)
    assert v.boost_on_halt == c.PVSCHED_HALT_BOOST_ALWAYS


def test_ms_become_ns_in_the_map_value():
    v = ffi().new("struct pvsched_tunables *")
    parse({"throttle_ms": "7"}).fill(v)
    assert (v.throttle_ns, v.max_boost_runtime_ns, v.boost_policy) == (7_000_000, 30_000_000, 2)
    # a VM is its VMM's tgid, the key of the host's outer maps: nothing in a map the policy process writes names it
    assert "vmm_pid" not in dict(ffi().typeof("struct pvsched_tunables").fields)


def test_the_vm_budget_is_a_share_of_all_host_cpus_per_window():
    t = parse({"vm_boost_share_pct": "25", "throttle_window_ms": "200"})
    assert t.vm_boost_budget_ns(host_cpus=2) == 100_000_000        # 25% of 2 CPUs x 200 ms
    assert t.vm_boost_budget_ns(host_cpus=64) == 3_200_000_000
    assert parse(None).vm_boost_share_pct == 30
    v = ffi().new("struct pvsched_tunables *")
    t.fill(v)
    assert v.vm_boost_budget_ns == t.vm_boost_budget_ns()          # the host's own CPU count
    for bad in ("0", "101", "-5"):
        with pytest.raises(TunableError, match="vm_boost_share_pct"):
            parse({"vm_boost_share_pct": bad})


def test_rt_ladder_constants_agree_with_the_header():
    from pyvmm.policy.tunables import RT_PRIO_LIMIT

    c = consts()
    assert RT_PRIO_LIMIT == c.PVSCHED_RT_PRIO_LIMIT
    assert (RT_PRIO_LIMIT < c.PVSCHED_CALLER_PRIO < c.PVSCHED_ACTUATOR_PRIO < c.PVSCHED_BENCH_POLLER_PRIO
            < c.PVSCHED_GUARDIAN_PRIO < c.PVSCHED_WATCHDOG_PRIO)


def test_every_stat_has_a_description():
    d = stat_descriptions()
    assert len(d) == consts().PVSCHED_STAT_NR
    assert all(len(text) > 10 for text in d.values())


def test_prog_info_layout_matches_the_kernel_header(tmp_path):
    # libbpf.py declares struct bpf_prog_info by hand (cffi cannot read linux/bpf.h): check it against C
    src = tmp_path / "off.c"
    src.write_text('#include <stddef.h>\n#include <stdio.h>\n#include <linux/bpf.h>\nint main(void){'
                   'printf("%zu %zu %zu\\n", offsetof(struct bpf_prog_info, run_time_ns),'
                   ' offsetof(struct bpf_prog_info, run_cnt), offsetof(struct bpf_prog_info, name));}\n')
    subprocess.run(["cc", str(src), "-o", str(tmp_path / "off")], check=True)
    want = tuple(int(x) for x in subprocess.run([str(tmp_path / "off")], capture_output=True, text=True,
                                                 check=True).stdout.split())
    f = libbpf.ffi()
    assert (f.offsetof("struct bpf_prog_info", "run_time_ns"), f.offsetof("struct bpf_prog_info", "run_cnt"),
            f.offsetof("struct bpf_prog_info", "name")) == want


def test_test_run_opts_size_matches_libbpf_header(tmp_path):
    src = tmp_path / "sz.c"
    src.write_text('#include <stdio.h>\n#include <bpf/bpf.h>\nint main(void){printf("%zu\\n",'
                   ' sizeof(struct bpf_test_run_opts));}\n')
    subprocess.run(["cc", str(src), "-o", str(tmp_path / "sz")], check=True)
    out = subprocess.run([str(tmp_path / "sz")], capture_output=True, text=True, check=True).stdout
    assert int(out) == libbpf.ffi().sizeof("struct bpf_test_run_opts")


def test_one_vcpu_limit_from_the_abi_header_everywhere(bpf_object):
    """The BPF maps, the backstop, the guardian and the policy process hold the same number of vCPUs."""
    import os

    from pyvmm import abi
    from pyvmm.device.guardian import constants
    from pyvmm.policy import process as policy_process

    n = abi.C.PVSCHED_MAX_VCPUS
    assert consts().PVSCHED_MAX_VCPUS == policy_process.MAX_VCPUS == constants().PVSCHED_GUARDIAN_MAX_THREADS == n
    lib, f = libbpf.lib(), libbpf.ffi()
    obj = libbpf.check_ptr(lib.bpf_object__open_file(str(bpf_object).encode(), f.NULL), "open")
    try:
        for name in (b"vcpus", b"apic_tid"):
            assert lib.bpf_map__max_entries(lib.bpf_object__find_map_by_name(obj, name)) == n, name
    finally:
        lib.bpf_object__close(obj)
    service = policy_process.PolicyService(os.getpid(), None, "no engine")
    reply = service.handle({"op": "register", "nr_vcpus": n + 1}, [os.memfd_create("guest-ram")])
    assert reply["error"] == f"nr_vcpus: expected an integer in [1, {n}], got {n + 1}"


@settings(max_examples=300, deadline=None)
@given(policy=st.integers(-1, 10), prio=st.integers(-5, 200), nice=st.integers(-100, 100),
       original=st.sampled_from([SchedAttr(), SchedAttr(3, 0, 5), SchedAttr(1, 50, 0)]))
def test_the_actuator_applies_only_known_classes_within_the_caps(policy, prio, nice, original):
    """Whatever an event says (a map can be written by anything with CAP_BPF): the thread's own attributes,
    OTHER/BATCH/IDLE at nice -20..19, or RR/FIFO at 1..PVSCHED_RT_PRIO_LIMIT."""
    from pyvmm.policy.actuator import clamp_attr

    got = clamp_attr(SchedAttr(policy, prio, nice), original)
    if got != original:
        assert got.policy in (0, 1, 2, 3, 5)
        if got.policy in (1, 2):
            assert 1 <= got.priority <= consts().PVSCHED_RT_PRIO_LIMIT and got.nice == original.nice
        else:
            assert got.priority == 0 and -20 <= got.nice <= 19
    if policy not in (0, 1, 2, 3, 5):
        assert got == original
