"""Reading the shared area's slots as hostile input: seqcount snapshots, decoded and clamped for display.

Both the device (for `pyvmm status`) and the policy process (its own mapping of the memfd)
read slots with these helpers; the layout comes from pvsched_abi.h through abi.py.
"""

from __future__ import annotations

import functools
from typing import Any

from pyvmm import abi

SEQ_RETRIES = 16  # a slot whose seq keeps moving is reported as unreadable, never waited for



@functools.cache
def _flag_names() -> tuple[tuple[int, str], ...]:
    """The header's single-bit slot flags in bit order, (bit, name): PVSCHED_FLAG_IN_NMI -> "nmi"
    (the masks PVSCHED_FLAGS_* are not flags)."""
    return tuple((v, n.removeprefix("in_")) for v, n in sorted(abi.enum_names("pvsched_slot_flag",
                                                                              "PVSCHED_FLAG_").items()))


@functools.cache
def _state_names() -> dict[int, str]:
    return abi.enum_names("pvsched_host_state", "PVSCHED_STATE_")


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
    names = [name for bit, name in _flag_names() if flags & bit]
    unknown = flags & ~abi.C.PVSCHED_FLAGS_ALL
    if unknown:
        names.append(f"unknown:{unknown:#x}")
    return names


@functools.cache
def _policy_names() -> dict[int, str]:
    """The header's enum pvsched_policy as {number: short name}: the one list of policy names."""
    return abi.enum_names("pvsched_policy", "PVSCHED_POLICY_")


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
        "state_name": _state_names().get(h.state, str(h.state)),
        "policy": h.policy,
        "policy_name": policy_name(h.policy),
        "rt_priority": h.rt_priority,
        "nice": h.nice,
        "boosts": h.boosts,
        "throttles": h.throttles,
        "boosted_ns": h.boosted_ns,
    }
