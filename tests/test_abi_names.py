"""Every name table comes from the headers' enums (pyvmm.abi.enum_names): a new row there is named here."""

from __future__ import annotations

import os

from pyvmm import abi
from pyvmm.abi import C
from pyvmm.abi.slots import decode_flags, policy_name
from pyvmm.common import sched_attr
from pyvmm.device.registers import STATUS_NAMES
from pyvmm.policy import tunables
from pyvmm.policy.policy_types import ffi as policy_ffi


def test_slot_flags_are_named_in_bit_order_and_unknown_bits_shown():
    assert decode_flags(C.PVSCHED_FLAGS_ALL) == ["nmi", "hardirq", "softirq", "preempt_disabled", "idle", "rt_waiting"]
    assert decode_flags(C.PVSCHED_FLAG_IN_HARDIRQ | 1 << 30) == ["hardirq", "unknown:0x40000000"]
    assert decode_flags(0) == []


def test_status_policy_and_halt_boost_names_follow_the_headers():
    assert STATUS_NAMES[C.PVSCHED_STATUS_BAD_GPA] == "BAD_GPA" and STATUS_NAMES[C.PVSCHED_STATUS_AGAIN] == "AGAIN"
    assert len(STATUS_NAMES) == len(abi.ffi().typeof("enum pvsched_status").elements)
    assert policy_name(C.PVSCHED_POLICY_FIFO) == "fifo" and policy_name(42) == "42"
    assert (sched_attr.SCHED_OTHER, sched_attr.SCHED_FIFO, sched_attr.SCHED_RR, sched_attr.SCHED_BATCH,
            sched_attr.SCHED_IDLE) == (os.SCHED_OTHER, os.SCHED_FIFO, os.SCHED_RR, os.SCHED_BATCH, os.SCHED_IDLE)
    assert tunables.parse({"boost_policy": "fifo", "allow_fifo": "true"}).boost_policy == os.SCHED_FIFO
    pc = policy_ffi().dlopen(None)
    assert tunables.HALT_BOOST == {"never": pc.PVSCHED_HALT_BOOST_NEVER, "always": pc.PVSCHED_HALT_BOOST_ALWAYS,
                                   "auto": pc.PVSCHED_HALT_BOOST_AUTO}
