"""Reading the shared area's slots as hostile input: seqcount snapshots, decoded and clamped for display.

Both the device (for `pyvmm status`) and the policy process (its own mapping of the memfd)
read slots with these helpers; the layout comes from pvsched_abi.h through abi.py.
"""

from __future__ import annotations

import functools
from typing import Any

from pyvmm import abi

SEQ_RETRIES = 16  # a slot whose seq keeps moving is reported as unreadable, never waited for

_FLAG_NAMES = (
    ("PVSCHED_FLAG_IN_NMI", "nmi"),
    ("PVSCHED_FLAG_IN_HARDIRQ", "hardirq"),
    ("PVSCHED_FLAG_IN_SOFTIRQ", "softirq"),
    ("PVSCHED_FLAG_PREEMPT_DISABLED", "preempt_disabled"),
    ("PVSCHED_FLAG_IDLE", "idle"),
    ("PVSCHED_FLAG_RT_WAITING", "rt_waiting"),
)
_STATE_NAMES = {0: "normal", 1: "boosted", 2: "throttled"}


def slot_size() -> int:
    """Bytes per slot (128), from the ABI header."""
    return abi.C.PVSCHED_SLOT_SIZE


def slot_offset(vcpu: int) -> int:
    """Byte offset of vCPU `vcpu`'s slot from the start of the shared area."""
    return abi.C.PVSCHED_SLOT_OFFSET + vcpu * abi.C.PVSCHED_SLOT_SIZE


def min_shm_size(nr_vcpus: int) -> int:
    """Smallest SHM_SIZE the device accepts for `nr_vcpus` (before rounding to pages)."""
    return abi.C.PVSCHED_SHM_HEADER_SIZE + abi.C.PVSCHED_SLOT_SIZE * nr_vcpus


def decode_flags(flags: int) -> list[str]:
    """Names of the flag bits set in a guest area's flags word (unknown bits as hex)."""
    names = [name for const, name in _FLAG_NAMES if flags & getattr(abi.C, const)]
    unknown = flags & ~abi.C.PVSCHED_FLAGS_ALL
    if unknown:
        names.append(f"unknown:{unknown:#x}")
    return names


@functools.cache
def _policy_names() -> dict[int, str]:
    """The header's enum pvsched_policy as {number: short name}: the one list of policy names."""
    return {v: n.removeprefix("PVSCHED_POLICY_").lower()
            for v, n in abi.ffi().typeof("enum pvsched_policy").elements.items()}


def policy_name(policy: int) -> str:
    """Linux SCHED_* number as a short name (hostile values shown as numbers)."""
    return _policy_names().get(policy, str(policy))


def read_guest_area(buf: Any) -> dict[str, Any] | None:
    """Consistent snapshot of a slot's guest area (128-byte buffer), or None if the seq never settled."""
    ffi = abi.ffi()
    slot = ffi.from_buffer("struct pvsched_slot *", buf)
    g = slot.guest
    for _ in range(SEQ_RETRIES):
        seq = g.seq
        if seq & 1:
            continue
        snap = bytes(ffi.buffer(ffi.addressof(g), ffi.sizeof(g)))
        if g.seq == seq:
            s = ffi.from_buffer("struct pvsched_guest_area *", snap)
            return {
                "seq": s.seq,
                "flags": s.flags,
                "flag_names": decode_flags(s.flags),
                "policy": s.policy,
                "policy_name": policy_name(s.policy),
                "rt_priority": s.rt_priority,
                "nice": s.nice,
                "wake_hint": g.wake_hint,  # outside the seqcount by design
                "guest_ns": s.guest_ns,
            }
    return None


def read_host_area(buf: Any) -> dict[str, Any]:
    """Snapshot of a slot's host area (written by the policy process; seq read for display only)."""
    ffi = abi.ffi()
    h = ffi.from_buffer("struct pvsched_slot *", buf).host
    return {
        "seq": h.seq,
        "state": h.state,
        "state_name": _STATE_NAMES.get(h.state, str(h.state)),
        "policy": h.policy,
        "policy_name": policy_name(h.policy),
        "rt_priority": h.rt_priority,
        "nice": h.nice,
        "boosts": h.boosts,
        "throttles": h.throttles,
        "boosted_ns": h.boosted_ns,
    }
