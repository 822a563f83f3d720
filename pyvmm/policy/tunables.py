"""Policy tunables: names, defaults, validation (RT ladder) and conversion to the BPF map value.

Names are what `pyvmm policy set KEY=VALUE` takes; values arrive as strings.
Defaults and their reasons (the decisions they bound: pyvmm/policy/README.md, "Decisions"):
- boost_policy rr, boost_prio 8: RR so two boosted vCPUs on one core share it;
  8 sits above typical guest RT tasks' hosts yet far below the actuator (40).
- max_rt_prio 10, allow_fifo false: a guest can never out-rank host RT work
  above 10, and never get FIFO (no round robin among boosted vCPUs) unless allowed.
- min_nice -10: a guest's nice requests are honoured down to -10 only.
- max_boost_runtime_ms 30 per throttle_window_ms 100, throttle_ms 100: a
  boosted vCPU gets at most ~30% of a CPU at RT before it is throttled, so a
  FIFO spinner in a guest cannot starve the host.
- vm_boost_share_pct 30: all of one VM's boosted vCPUs together get at most
  30% of the host's CPUs' time per window (on 2 CPUs: 60 ms per 100 ms), plus
  up to clock_ms per running vCPU before the clock sees it.  30% is the
  per-vCPU share (30 ms per 100 ms), so it binds only a VM with more vCPUs
  than the host has CPUs: such a VM gets no more RT time than one with a vCPU
  per CPU.  Per-vCPU budgets alone let V vCPUs take V times one vCPU's share
  (what each share leaves a host task: docs/hardening.md, "A per-VM budget").  RT
  time may pile up on one CPU, so a host task keeps about 1 - share x CPUs
  there, less clock_ms per running vCPU: an admin who must leave a host task
  60% of a CPU against 8 spinning vCPUs on 2 CPUs sets 5.
- boost_on_halt auto: the ring-buffer hop costs tens of microseconds, so the
  boost must be in place before the wakeup; boosting at halt hides the hop.
  "auto" boosts a halt only where an RT task waits (a guest with F_RT_WAITER
  shows RT_WAITING; other guests: every halt): boosting every halt of a vCPU
  that wakes often for normal-priority work costs the host as much as static RT.
- section_boost true: a vCPU boosted for a critical section (preempted in
  it) loses the boost at the next re-read that finds the slot written since:
  it ran on and left that section.  Otherwise a vCPU that enters short
  sections all the time (a lock loop) stays boosted until the throttle.
- clock_ms 5: period of the in-kernel throttle clock (a BPF timer), which
  catches a boosted vCPU that never switches out (a guest RT spinner): it may
  overrun its budget by up to clock_ms.
- backstop_ms 20: mean period of the policy process's re-read of every slot (a
  native thread at SCHED_FIFO 40, pyvmm/policy/backstop_loop.c; each gap is
  drawn from 0.75-1.25 of it, so that its rounds cannot phase-lock with a
  guest's periodic timer): bounds, at 1.25x, how long a vCPU
  that never exits keeps a boost its guest no longer asks for, and is the
  throttle's fallback when the clock runs late (its softirq deferred to
  ksoftirqd, a SCHED_OTHER thread: stat clock_late).  Each wake-up preempts a
  boosted vCPU, so the loop is native and wakes no more often than that bound
  needs; a much longer period leaves ending a boost no longer asked for to
  the clock alone, which runs late under load.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from pyvmm.abi import enum_names
from pyvmm.abi.slots import policy_name
from pyvmm.common.sched_attr import SCHED_FIFO, SCHED_RR
from pyvmm.policy.policy_types import consts
from pyvmm.policy.policy_types import ffi as policy_ffi

RT_PRIO_LIMIT = consts().PVSCHED_RT_PRIO_LIMIT  # RT ladder (pvsched_abi.h): every boost and guest cap stays <= it

DEFAULTS: dict[str, str] = {
    "boost_policy": "rr",
    "boost_prio": "8",
    "max_rt_prio": "10",
    "allow_fifo": "false",
    "min_nice": "-10",
    "max_boost_runtime_ms": "30",
    "throttle_window_ms": "100",
    "throttle_ms": "100",
    "boost_on_halt": "auto",
    "section_boost": "true",
    "clock_ms": "5",
    "backstop_ms": "20",
    "vm_boost_share_pct": "30",
    "debug": "0",
}

DESCRIPTIONS: dict[str, str] = {
    "boost_policy": "policy of urgent, halt and interrupt boosts (rr|fifo)",
    "boost_prio": f"RT priority of those boosts (1-{RT_PRIO_LIMIT})",
    "max_rt_prio": f"cap on every RT priority given to a vCPU (1-{RT_PRIO_LIMIT})",
    "allow_fifo": "let FIFO requests stay FIFO (else RR at the same capped priority)",
    "min_nice": "floor for nice values translated from the guest (-20..19)",
    "max_boost_runtime_ms": "boosted run time allowed per window before throttling",
    "throttle_window_ms": "window over which boosted run time is counted",
    "throttle_ms": "how long a throttled vCPU runs with its original attributes",
    "section_boost": "a critical-section boost ends once that section has (true), or holds while any critical "
                     "flag shows (false)",
    "boost_on_halt": "boost a halting vCPU and hold it while idle: auto (where an RT task waits, if the guest "
                     "reports it; else every halt), always (every halt; also true), never (false)",
    "clock_ms": "period of the in-kernel throttle clock (catches a boosted vCPU that never switches out)",
    "backstop_ms": "mean period of the policy process's re-read of every slot, each gap 0.75-1.25x of it (drops "
                   "a boost no longer asked for; the throttle's fallback when the clock runs late)",
    "vm_boost_share_pct": "share of all host CPUs' time per window that this VM's boosted vCPUs may take together "
                          "(1-100; 100: only the per-vCPU budget applies)",
    "debug": "0 off, 1 bpf_printk per decision, 2 per event (trace_pipe)",
}

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}
_POLICIES = {policy_name(p): p for p in (SCHED_RR, SCHED_FIFO)}  # a boost's policy, by the header's name
HALT_BOOST = {n: v for v, n in enum_names("pvsched_halt_boost", "PVSCHED_HALT_BOOST_", policy_ffi()).items()}
_HALT_ALIASES = {**{k: "always" for k in _TRUE}, **{k: "never" for k in _FALSE}}


class TunableError(ValueError):
    """A tunable name or value that is not accepted; the message says which and why."""


def _int(key: str, value: str, lo: int, hi: int) -> int:
    try:
        v = int(str(value).strip(), 0)
    except ValueError:
        raise TunableError(f"{key}={value!r}: not an integer") from None
    if not lo <= v <= hi:
        raise TunableError(f"{key}={v}: must be within {lo}..{hi}")
    return v


def _halt_boost(text: str) -> str:
    v = text.strip().lower()
    v = _HALT_ALIASES.get(v, v)
    if v not in HALT_BOOST:
        raise TunableError(f"boost_on_halt={text!r}: expected auto, always or never (true/false: always/never)")
    return v


def _bool(key: str, value: str) -> bool:
    v = str(value).strip().lower()
    if v in _TRUE:
        return True
    if v in _FALSE:
        return False
    raise TunableError(f"{key}={value!r}: expected true or false")


@dataclass(frozen=True)
class Tunables:
    """A validated set of tunables (typed; ms values as given)."""

    boost_policy: int
    boost_prio: int
    max_rt_prio: int
    allow_fifo: bool
    min_nice: int
    max_boost_runtime_ms: int
    throttle_window_ms: int
    throttle_ms: int
    boost_on_halt: str  # never | always | auto
    section_boost: bool
    clock_ms: int
    backstop_ms: int
    vm_boost_share_pct: int
    debug: int

    def as_strings(self) -> dict[str, str]:
        """The tunables as `policy set` takes them (canonical spelling)."""
        pol = {v: k for k, v in _POLICIES.items()}[self.boost_policy]
        return {
            "boost_policy": pol,
            "boost_prio": str(self.boost_prio),
            "max_rt_prio": str(self.max_rt_prio),
            "allow_fifo": str(self.allow_fifo).lower(),
            "min_nice": str(self.min_nice),
            "max_boost_runtime_ms": str(self.max_boost_runtime_ms),
            "throttle_window_ms": str(self.throttle_window_ms),
            "throttle_ms": str(self.throttle_ms),
            "boost_on_halt": self.boost_on_halt,
            "section_boost": str(self.section_boost).lower(),
            "clock_ms": str(self.clock_ms),
            "backstop_ms": str(self.backstop_ms),
            "vm_boost_share_pct": str(self.vm_boost_share_pct),
            "debug": str(self.debug),
        }

    def vm_boost_budget_ns(self, host_cpus: int | None = None) -> int:
        """Boosted run time per window for all of a VM's vCPUs together: the share of the host's CPUs."""
        cpus = max(1, host_cpus or os.cpu_count() or 1)
        return self.vm_boost_share_pct * cpus * self.throttle_window_ms * 1_000_000 // 100

    def fill(self, value) -> None:
        """Write into a cffi `struct pvsched_tunables *` (ms converted to ns here, once)."""
        ms = 1_000_000
        value.boost_policy = self.boost_policy
        value.boost_prio = self.boost_prio
        value.max_rt_prio = self.max_rt_prio
        value.allow_fifo = int(self.allow_fifo)
        value.min_nice = self.min_nice
        value.boost_on_halt = HALT_BOOST[self.boost_on_halt]
        value.section_boost = int(self.section_boost)
        value.debug = self.debug
        value.max_boost_runtime_ns = self.max_boost_runtime_ms * ms
        value.throttle_window_ns = self.throttle_window_ms * ms
        value.throttle_ns = self.throttle_ms * ms
        value.backstop_ns = self.backstop_ms * ms
        value.clock_ns = self.clock_ms * ms
        value.vm_boost_budget_ns = self.vm_boost_budget_ns()


def parse(values: dict[str, str] | None, base: dict[str, str] | None = None) -> Tunables:
    """Validate `values` over `base` (default: DEFAULTS) as a whole: all accepted or TunableError."""
    merged = dict(base or DEFAULTS)
    for k, v in (values or {}).items():
        if k not in DEFAULTS:
            raise TunableError(f"unknown tunable {k!r} (known: {', '.join(DEFAULTS)})")
        merged[k] = str(v)
    pol = merged["boost_policy"].strip().lower()
    if pol not in _POLICIES:
        raise TunableError(f"boost_policy={merged['boost_policy']!r}: expected rr or fifo")
    t = Tunables(
        boost_policy=_POLICIES[pol],
        boost_prio=_int("boost_prio", merged["boost_prio"], 1, RT_PRIO_LIMIT),
        max_rt_prio=_int("max_rt_prio", merged["max_rt_prio"], 1, RT_PRIO_LIMIT),
        allow_fifo=_bool("allow_fifo", merged["allow_fifo"]),
        min_nice=_int("min_nice", merged["min_nice"], -20, 19),
        max_boost_runtime_ms=_int("max_boost_runtime_ms", merged["max_boost_runtime_ms"], 1, 60_000),
        throttle_window_ms=_int("throttle_window_ms", merged["throttle_window_ms"], 1, 60_000),
        throttle_ms=_int("throttle_ms", merged["throttle_ms"], 0, 60_000),
        boost_on_halt=_halt_boost(merged["boost_on_halt"]),
        section_boost=_bool("section_boost", merged["section_boost"]),
        clock_ms=_int("clock_ms", merged["clock_ms"], 1, 1000),
        backstop_ms=_int("backstop_ms", merged["backstop_ms"], 1, 1000),
        vm_boost_share_pct=_int("vm_boost_share_pct", merged["vm_boost_share_pct"], 1, 100),
        debug=_int("debug", merged["debug"], 0, 2),
    )
    # The clock may notice an over-budget spinner up to clock_ms late; if
    # budget plus that lateness reaches the window, the window rolls over before
    # the throttle fires and a spinner escapes it.
    if t.max_boost_runtime_ms + t.clock_ms >= t.throttle_window_ms:
        raise TunableError(
            f"max_boost_runtime_ms={t.max_boost_runtime_ms} + clock_ms={t.clock_ms} must stay below "
            f"throttle_window_ms={t.throttle_window_ms}, or the throttle cannot catch a spinner"
        )
    return t
