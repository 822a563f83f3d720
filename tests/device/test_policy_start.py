"""Starting the policy process inside the VMM's trio loop: a death or silence before `ready` is one line, and
the loop serves the control socket while it waits."""

from __future__ import annotations

import os
import sys
import threading
import time

import pytest
import trio
import trio.testing

from pyvmm.boot import BootConfig, run_vm
from pyvmm.common import control_client
from pyvmm.common.sched_attr import SCHED_OTHER
from pyvmm.device import supervisor as supmod
from pyvmm.device.device import PvschedDevice
from pyvmm.vmm.machine import VmmError


def _child(monkeypatch, code: str) -> None:
    """Run `python -c code` in place of the policy process."""
    monkeypatch.setattr(supmod.PolicySupervisor, "_command", lambda self, fd: [sys.executable, "-c", code])


def _nothing_left() -> None:
    """No child process, no pins, and no thread of this process at an RT policy."""
    with pytest.raises(ChildProcessError):
        os.waitpid(-1, os.WNOHANG)
    assert not os.path.exists(f"/sys/fs/bpf/pvsched/{os.getpid()}")
    for tid in os.listdir("/proc/self/task"):
        assert os.sched_getscheduler(int(tid)) == SCHED_OTHER, tid


def _boot_error(**kw) -> str:
    with pytest.raises(VmmError) as e:
        run_vm(BootConfig(cmdline="duration=1", **kw))
    return str(e.value)


def test_policy_process_dying_at_start_is_one_line(monkeypatch) -> None:
    _child(monkeypatch, "import sys; sys.exit(3)")
    msg = _boot_error(control_socket=False)
    assert "\n" not in msg
    assert msg.startswith("device pvsched failed to start: policy process "), msg
    assert msg.endswith("did not start (exit code 3) (--no-policy runs without it)"), msg
    _nothing_left()


def test_policy_process_never_ready_times_out_in_one_line(monkeypatch) -> None:
    _child(monkeypatch, "import time; time.sleep(60)")
    monkeypatch.setattr(supmod, "READY_TIMEOUT_S", 1.0)
    t0 = time.monotonic()
    msg = _boot_error(control_socket=False)
    assert time.monotonic() - t0 < 10
    assert "\n" not in msg
    assert msg.endswith("did not start: no ready message within 1 s (--no-policy runs without it)"), msg
    _nothing_left()


def test_the_control_socket_is_served_while_the_policy_starts(monkeypatch) -> None:
    """The ready wait is an await in the VMM's loop: `pyvmm status` answers meanwhile."""
    _child(monkeypatch, "import time; time.sleep(60)")
    monkeypatch.setattr(supmod, "READY_TIMEOUT_S", 3.0)
    replies: list[dict] = []

    def ask() -> None:
        path = control_client.socket_path(os.getpid())
        end = time.monotonic() + 2.5
        while not path.exists() and time.monotonic() < end:
            time.sleep(0.02)
        replies.append(control_client.request(os.getpid(), {"cmd": "vm"}, timeout=2))

    t = threading.Thread(target=ask)
    t.start()
    msg = _boot_error(control_socket=True)
    t.join(5)
    assert "no ready message" in msg
    assert replies and replies[0].get("pid") == os.getpid(), replies


def test_a_loop_waiting_to_serve_the_socket_takes_it_when_the_other_lets_go(vm) -> None:
    """Two loops: the second waits (no polling) while the first serves, and is woken when it stops."""
    dev = PvschedDevice()
    vm.add_pci_device(dev)
    trio.run(dev.start, vm)
    sup = dev.supervisor
    assert sup is not None
    first_ended: list[float] = []

    async def serve_a_while() -> None:
        with trio.move_on_after(0.5):
            await sup._serve_socket()
        first_ended.append(time.monotonic())

    async def take_over() -> tuple[float, dict]:
        while sup._token is None:  # the first loop holds the socket
            await trio.sleep(0.01)
        mine = trio.lowlevel.current_trio_token()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(sup._serve_socket)
            await trio.sleep(0.1)
            assert len(sup._claimers) == 1  # queued, waiting to be woken
            while sup._token is not mine:
                await trio.sleep(0.005)
            took = time.monotonic()
            reply = await sup.request({"op": "ping"}, 5)
            nursery.cancel_scope.cancel()
        return took, reply

    first = threading.Thread(target=trio.run, args=(serve_a_while,))
    first.start()
    try:
        took, reply = trio.run(take_over)
        first.join(5)
        assert reply.get("ok"), reply
        assert took - first_ended[0] < 0.1
        assert sup._claimers == [] and sup._token is None
    finally:
        first.join(5)
        dev.stop()


def test_a_request_posted_as_a_loop_stops_serving_the_socket_is_still_sent(vm) -> None:
    """A guest's ENABLE posts `register` from its vCPU thread; if the loop serving the socket then stops (a
    status request's server ends), the request must still go out.  The sender used to pop a request and then
    reach a checkpoint before sending it: cancelled there, the request was gone, and the VM stayed unregistered
    (seen once in CI).  Here the kick and the cancel run back to back, before the sender's next step."""
    dev = PvschedDevice()
    vm.add_pci_device(dev)
    trio.run(dev.start, vm)
    sup = dev.supervisor
    assert sup is not None
    got: list = []

    async def post_then_stop_serving() -> None:
        token = trio.lowlevel.current_trio_token()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(sup._serve_socket)
            while sup._token is not token:
                await trio.sleep(0.005)
            await trio.testing.wait_all_tasks_blocked()  # the sender waits for its wake-up
            sup.post({"op": "ping"}, on_reply=got.append)  # queues the kick (run_sync_soon)...
            token.run_sync_soon(nursery.cancel_scope.cancel)  # ...and the cancel right behind it

    try:
        trio.run(post_then_stop_serving)
        reply = trio.run(sup.request, {"op": "ping"}, 5)  # a new server: the first ping's reply comes too
        assert reply.get("ok"), reply
        assert got and got[0].get("ok"), f"the request posted as its server stopped was lost: {got}"
    finally:
        dev.stop()


def test_inside_the_lab_the_start_up_and_heartbeat_limits_are_scaled(monkeypatch) -> None:
    """Under `pyvmm lab` (PYVMM_IN_LAB) a policy process under host load took over 60 s to say ready."""
    from pyvmm.device.device import LAB_SLOWDOWN, slowdown

    sup = supmod.PolicySupervisor(os.getpid(), None, lambda _: None, time_scale=LAB_SLOWDOWN)
    assert sup.ready_timeout_s == supmod.READY_TIMEOUT_S * LAB_SLOWDOWN
    assert sup.heartbeat_timeout_s == supmod.HEARTBEAT_TIMEOUT_S * LAB_SLOWDOWN
    monkeypatch.setenv("PYVMM_IN_LAB", "1")
    assert slowdown() == LAB_SLOWDOWN
    monkeypatch.delenv("PYVMM_IN_LAB")
    assert slowdown() == 1 and supmod.PolicySupervisor(os.getpid(), None, lambda _: None).ready_timeout_s == \
        supmod.READY_TIMEOUT_S
