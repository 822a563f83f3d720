"""pyvmm.common.sched_attr: a torn read of a thread's class is read again."""

from __future__ import annotations

from pyvmm.common import sched_attr
from pyvmm.common.sched_attr import SCHED_OTHER, SCHED_RR, SchedAttr


def test_a_torn_read_rt_with_priority_0_is_read_again(monkeypatch):
    reads = iter([SchedAttr(SCHED_RR, 0, 0), SchedAttr(SCHED_RR, 0, 0), SchedAttr(SCHED_RR, 8, 0)])
    monkeypatch.setattr(sched_attr, "_read_attr", lambda tid: next(reads))
    assert sched_attr.sched_getattr(123) == SchedAttr(SCHED_RR, 8, 0)


def test_a_read_that_stays_torn_is_returned_after_a_bounded_number_of_tries(monkeypatch):
    calls = []
    monkeypatch.setattr(sched_attr, "_read_attr", lambda tid: calls.append(tid) or SchedAttr(SCHED_RR, 0, 0))
    assert sched_attr.sched_getattr(5) == SchedAttr(SCHED_RR, 0, 0)
    assert len(calls) == sched_attr.TORN_READ_RETRIES


def test_a_real_thread_reads_once_and_whole():
    a = sched_attr.sched_getattr(0)
    assert a.policy == SCHED_OTHER and a.priority == 0
