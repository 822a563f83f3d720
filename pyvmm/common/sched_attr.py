"""sched_getattr/sched_setattr on any thread by TID (Python's os module lacks them).

The VMM records every vCPU thread's original attributes with these, the
actuator applies boosts with them, and both restore with them.
"""

from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass

from pyvmm.abi import C
from pyvmm.abi.slots import policy_name

SYS_sched_setattr = 314  # x86_64
SYS_sched_getattr = 315

# Linux's SCHED_* numbers, as the ABI header's enum pvsched_policy names them
SCHED_OTHER = C.PVSCHED_POLICY_OTHER
SCHED_FIFO = C.PVSCHED_POLICY_FIFO
SCHED_RR = C.PVSCHED_POLICY_RR
SCHED_BATCH = C.PVSCHED_POLICY_BATCH
SCHED_IDLE = C.PVSCHED_POLICY_IDLE
RT_POLICIES = (SCHED_FIFO, SCHED_RR)


class _SchedAttr(ctypes.Structure):
    _fields_ = [
        ("size", ctypes.c_uint32),
        ("sched_policy", ctypes.c_uint32),
        ("sched_flags", ctypes.c_uint64),
        ("sched_nice", ctypes.c_int32),
        ("sched_priority", ctypes.c_uint32),
        ("sched_runtime", ctypes.c_uint64),
        ("sched_deadline", ctypes.c_uint64),
        ("sched_period", ctypes.c_uint64),
    ]


_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


@dataclass(frozen=True)
class SchedAttr:
    """A thread's scheduling class: policy, RT priority (FIFO/RR) and nice (others)."""

    policy: int = SCHED_OTHER
    priority: int = 0
    nice: int = 0

    def __str__(self) -> str:
        name = policy_name(self.policy)
        return f"{name}:{self.priority}" if self.policy in RT_POLICIES else f"{name} nice {self.nice}"


def _read_attr(tid: int) -> SchedAttr:
    a = _SchedAttr()
    if _libc.syscall(SYS_sched_getattr, tid, ctypes.byref(a), ctypes.sizeof(a), 0) < 0:
        e = ctypes.get_errno()
        raise OSError(e, f"sched_getattr({tid}): {os.strerror(e)}")
    return SchedAttr(a.sched_policy, a.sched_priority, a.sched_nice)


TORN_READ_RETRIES = 8


def sched_getattr(tid: int) -> SchedAttr:
    """Current scheduling attributes of thread `tid` (0 = the caller).

    The kernel reads a task's policy and RT priority without a lock, so a read that races a change from
    SCHED_OTHER to RT can return the new policy with the old priority, 0: a state no thread can be in
    (sched_setattr refuses it).  Such a read is taken again, a few times at most (docs/hardening.md,
    "Torn reads of a thread's class")."""
    for _ in range(TORN_READ_RETRIES):
        attr = _read_attr(tid)
        if (attr.policy in RT_POLICIES) == (attr.priority > 0):
            return attr
    return attr


def sched_setattr(tid: int, attr: SchedAttr) -> None:
    """Apply `attr` to thread `tid`; nice is kept for RT policies so restoring is exact."""
    a = _SchedAttr(size=ctypes.sizeof(_SchedAttr), sched_policy=attr.policy,
                   sched_nice=attr.nice, sched_priority=attr.priority)
    if _libc.syscall(SYS_sched_setattr, tid, ctypes.byref(a), 0) < 0:
        e = ctypes.get_errno()
        raise OSError(e, f"sched_setattr({tid}, {attr}): {os.strerror(e)}")
