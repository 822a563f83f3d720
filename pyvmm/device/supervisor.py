"""VMM side of the policy process: spawn it, talk to it, notice its death, end it.

The device posts messages from any thread (vCPU threads on ENABLE/DISABLE, the control
socket for status/policy commands); `run()`, a trio task in the VMM's nursery, sends them
in order over the socketpair, matches replies to requests, and watches the child through a
pidfd so that its death is seen at once (the device then restores the vCPU threads, as the
second line after its guardian, guardian.c, which does not need this thread's GIL).
"""

from __future__ import annotations

import concurrent.futures
import itertools
import json
import logging
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import trio

from pyvmm.common import protocol
from pyvmm.common.pins import PIN_ROOT, remove_pin_dir

log = logging.getLogger("pyvmm.pvsched.supervisor")

READY_TIMEOUT_S = 60.0  # Python start-up, ABI preprocessing and BPF load: over 20 s in the lab (QEMU TCG) under stress-ng
STOP_TIMEOUT_S = 3.0
HEARTBEAT_S = 2.0  # ping period
HEARTBEAT_TIMEOUT_S = 5.0  # a policy process silent this long is hung: killed, threads restored
CHILD_ENV = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C.UTF-8"}


class PolicyUnavailable(RuntimeError):
    """The policy process is not running (never started, died, or stopped)."""


@dataclass
class _Queued:
    """A request waiting for the sender: encoded once, at post()."""

    id: int
    op: str
    wire: bytes
    fds: tuple[int, ...]
    fut: concurrent.futures.Future[dict[str, Any]]
    coalesce: str | None


class PolicySupervisor:
    """Owns one policy process: its socket, its request queue and its lifetime."""

    def __init__(self, vmm_pid: int, tunables: dict[str, str] | None, on_death: Callable[[int], None],
                 pin_root: str = PIN_ROOT, verbose: bool = False, extra_args: tuple[str, ...] = (),
                 heartbeat_fd: int | None = None) -> None:
        self.vmm_pid = vmm_pid
        self.heartbeat_fd = heartbeat_fd  # the guardian's memfd, handed to the child (it beats there)
        self.tunables = dict(tunables or {})
        self.on_death = on_death
        self.pin_root = pin_root
        self.verbose = verbose
        self.extra_args = extra_args
        self.proc: subprocess.Popen[bytes] | None = None
        self.ready: dict[str, Any] = {}
        self.dead = False
        self.returncode: int | None = None
        self._sock: socket.socket | None = None
        self._pidfd = -1
        self._lock = threading.Lock()
        self._io_lock = threading.Lock()  # a synchronous exchange (no run() yet) vs run() taking the socket
        self._queue: deque[_Queued] = deque()
        self._pending: dict[int, concurrent.futures.Future[dict[str, Any]]] = {}
        self._ids = itertools.count(1)
        self._token: trio.lowlevel.TrioToken | None = None
        self._wake: trio.Event | None = None
        self._stopping = False
        self._running = False
        self.heartbeat_s = HEARTBEAT_S
        self.heartbeat_timeout_s = HEARTBEAT_TIMEOUT_S

    @property
    def pid(self) -> int | None:
        """PID of the policy process (None before spawn)."""
        return self.proc.pid if self.proc else None

    @property
    def pidfd(self) -> int:
        """A pidfd of the policy process (-1 before spawn and once closed); dup it to keep it."""
        return self._pidfd

    @property
    def alive(self) -> bool:
        """True while the policy process runs and has not been stopped."""
        return self.proc is not None and not self.dead and not self._stopping

    def spawn(self) -> dict[str, Any]:
        """Start the policy process (from the VMM's main thread: PDEATHSIG follows that thread) and await ready."""
        parent, child = protocol.socketpair()
        # -I: no PYTHON* variables, no user site, and neither the caller's working directory nor the
        # script's folder on sys.path (a json.py there would otherwise run as root); the package is found
        # through its install.  A fixed environment and cwd "/" for the same reason.
        cmd = [sys.executable, "-I", "-m", "pyvmm.policy.process", "--fd", str(child.fileno()),
               "--vmm-pid", str(self.vmm_pid), "--tunables", json.dumps(self.tunables),
               "--pin-root", self.pin_root, *self.extra_args]
        pass_fds = [child.fileno()]
        if self.heartbeat_fd is not None:
            cmd += ["--heartbeat-fd", str(self.heartbeat_fd)]
            pass_fds.append(self.heartbeat_fd)
        if self.verbose:
            cmd.append("-v")
        try:
            # Own session: a terminal's Ctrl-C reaches the VMM, which then ends the child in order.
            self.proc = subprocess.Popen(cmd, pass_fds=pass_fds, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                         env=CHILD_ENV, cwd="/", start_new_session=True)
        finally:
            child.close()
        self._sock = parent
        self._pidfd = os.pidfd_open(self.proc.pid)
        # The first message is "ready" (or nothing, if it fails to start): wait for it here,
        # so boosting is in place before the guest enables the device.
        r, _, _ = select.select([parent, self._pidfd], [], [], READY_TIMEOUT_S)
        if parent in r:
            data = parent.recv(protocol.MAX_MSG)
            try:
                self.ready = protocol.decode(data) if data else {}
            except (ValueError, TypeError):
                self.ready = {}
        if self.ready.get("op") != "ready":
            self._kill()
            raise PolicyUnavailable(f"policy process {self.proc.pid} did not start (exit code {self.proc.returncode})")
        parent.setblocking(False)
        return self.ready

    # --- requests, from any thread -------------------------------------------------------------------

    def post(self, msg: dict[str, Any], fds: tuple[int, ...] = (),
             coalesce: str | None = None) -> concurrent.futures.Future[dict[str, Any]]:
        """Queue a request (fds are dup'ed now, closed once sent); returns a future of the reply.

        With `coalesce`, a queued, not yet sent request of the same key is replaced: only the latest
        state matters (register/unregister), so a guest toggling ENABLE/DISABLE cannot grow the queue.
        """
        fut: concurrent.futures.Future[dict[str, Any]] = concurrent.futures.Future()
        if not self.alive:
            fut.set_exception(PolicyUnavailable("policy process is not running"))
            return fut
        msg = dict(msg, id=next(self._ids))
        try:  # encoded once, here: a message that cannot be sent is refused whole, never reaching the sender
            wire = protocol.encode(msg)
        except (ValueError, TypeError) as e:
            fut.set_exception(ValueError(f"{msg.get('op')}: request refused: {e}"))
            return fut
        item = _Queued(msg["id"], str(msg.get("op")), wire, tuple(os.dup(fd) for fd in fds), fut, coalesce)
        superseded = []
        with self._lock:
            if coalesce is not None:
                superseded = [q for q in self._queue if q.coalesce == coalesce]
                for q in superseded:
                    self._queue.remove(q)
            self._queue.append(item)
            token = self._token
        for old in superseded:
            for fd in old.fds:
                os.close(fd)
            old.fut.set_result({"ok": True, "superseded": True, "id": old.id})
        if token is not None:
            try:
                token.run_sync_soon(self._kick)
            except trio.RunFinishedError:
                pass
        return fut

    def request(self, msg: dict[str, Any], timeout: float = 5.0) -> dict[str, Any]:
        """Send a request and wait for its reply; works from a worker thread and from the trio thread."""
        if not self.alive:
            raise PolicyUnavailable("policy process is not running")
        with self._io_lock:
            # On the trio thread the loop cannot run our tasks; before run() nobody reads the socket:
            # either way, do the exchange here. (run() takes _io_lock once at start, so they never overlap.)
            if self._token is None or self._in_trio_thread():
                return self._request_blocking(msg, timeout)
        try:
            return self.post(msg).result(timeout)
        except concurrent.futures.TimeoutError as e:
            raise PolicyUnavailable(f"policy process did not answer {msg.get('op')} within {timeout} s") from e

    async def arequest(self, msg: dict[str, Any], timeout: float = 5.0) -> dict[str, Any]:
        """Send a request and await its reply from trio code (the VMM's control socket handlers)."""
        fut = self.post(msg)
        done = trio.Event()
        token = trio.lowlevel.current_trio_token()

        def wake(_: Any) -> None:
            try:
                token.run_sync_soon(done.set)
            except trio.RunFinishedError:
                pass

        fut.add_done_callback(wake)
        with trio.move_on_after(timeout):
            await done.wait()
        if not fut.done():
            raise PolicyUnavailable(f"policy process did not answer {msg.get('op')} within {timeout} s")
        return fut.result()

    def in_trio_thread(self) -> bool:
        """True when called on the thread running this supervisor's trio loop."""
        return self._in_trio_thread()

    def _in_trio_thread(self) -> bool:
        if self._token is None:
            return False
        try:
            return trio.lowlevel.current_trio_token() is self._token
        except RuntimeError:
            return False

    def _request_blocking(self, msg: dict[str, Any], timeout: float) -> dict[str, Any]:
        # Synchronous exchange (see request()), delivering any other replies as they come.
        assert self._sock is not None
        self._flush_queue_blocking()
        with self._lock:
            msg = dict(msg, id=next(self._ids))
        self._sock.sendmsg([protocol.encode(msg)])
        end = time.monotonic() + timeout
        while (left := end - time.monotonic()) > 0:
            r, _, _ = select.select([self._sock], [], [], left)
            if not r:
                break
            reply = self._recv_nowait()
            if reply is None:
                raise PolicyUnavailable("policy process closed the socket")
            if reply.get("id") == msg["id"]:
                return reply
            self._deliver(reply)
        raise PolicyUnavailable(f"policy process did not answer {msg.get('op')} within {timeout} s")

    def _flush_queue_blocking(self) -> None:
        assert self._sock is not None
        while True:
            with self._lock:
                if not self._queue:
                    return
                q = self._queue.popleft()
                self._pending[q.id] = q.fut
            try:
                select.select([], [self._sock], [], 1.0)
                self._sock.sendmsg([q.wire], protocol.ancillary(q.fds))
            finally:
                for fd in q.fds:
                    os.close(fd)

    def _recv_nowait(self) -> dict[str, Any] | None:
        assert self._sock is not None
        data, ancdata, _, _ = self._sock.recvmsg(protocol.MAX_MSG, socket.CMSG_SPACE(protocol.MAX_FDS * 4))
        for fd in protocol.fds_from(ancdata):
            os.close(fd)
        return protocol.decode(data) if data else None

    def _deliver(self, reply: dict[str, Any]) -> None:
        with self._lock:
            fut = self._pending.pop(reply.get("id"), None)  # type: ignore[arg-type]
        if fut is not None and not fut.done():
            fut.set_result(reply)
        elif reply.get("op") != "ready":
            log.debug("unmatched message from the policy process: %s", reply)

    def _kick(self) -> None:
        if self._wake is not None:
            self._wake.set()

    # --- the trio side ---------------------------------------------------------------------------------

    async def run(self) -> None:
        """Send queued requests, deliver replies, and report the child's death (once) via on_death."""
        if self.proc is None or self._sock is None:
            return
        with self._io_lock:
            self._token = trio.lowlevel.current_trio_token()
        self._wake = trio.Event()
        tsock = trio.socket.from_stdlib_socket(self._sock)
        self._running = True
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._sender, tsock)
                nursery.start_soon(self._receiver, tsock)
                nursery.start_soon(self._heartbeat)
                await trio.lowlevel.wait_readable(self._pidfd)
                nursery.cancel_scope.cancel()
            self._reap()
        finally:
            self._running = False
            self._token = None
            if self.dead:
                self._close()

    async def _heartbeat(self) -> None:
        # A hung policy process (deadlock, SIGSTOP) would leave boosted threads boosted: ping it, and
        # kill it when it stops answering, so that the death path restores the threads.
        while True:
            await trio.sleep(self.heartbeat_s)
            if not self.alive:
                return
            try:
                await self.arequest({"op": "ping"}, self.heartbeat_timeout_s)
            except PolicyUnavailable:
                if not self.alive:
                    return
                log.error("pvsched: policy process %d did not answer for %.1f s: killing it", self.pid,
                          self.heartbeat_timeout_s)
                assert self.proc is not None
                self.proc.kill()  # the pidfd wakes run(), which reaps it and calls on_death
                return

    async def _sender(self, tsock: trio.socket.SocketType) -> None:
        while True:
            while True:
                with self._lock:
                    if not self._queue:
                        self._wake = trio.Event()
                        break
                    q = self._queue.popleft()
                    self._pending[q.id] = q.fut
                try:
                    await tsock.sendmsg([q.wire], protocol.ancillary(q.fds))
                except OSError as e:  # this request fails; the sender goes on
                    with self._lock:
                        self._pending.pop(q.id, None)
                    q.fut.set_exception(PolicyUnavailable(f"sending {q.op}: {e}"))
                finally:
                    for fd in q.fds:
                        os.close(fd)
            await self._wake.wait()

    async def _receiver(self, tsock: trio.socket.SocketType) -> None:
        while True:
            try:
                msg, fds = await protocol.recv(tsock)
            except (OSError, ValueError, TypeError) as e:
                log.warning("policy process socket: %s", e)
                return
            for fd in fds:
                os.close(fd)
            if msg is None:
                return
            self._deliver(msg)

    def _reap(self) -> None:
        if self.proc is None or self.dead:
            return
        self.returncode = self.proc.wait()
        self.dead = True
        with self._lock:
            pending, self._pending = self._pending, {}
            queued = list(self._queue)
            self._queue.clear()
        for fut in pending.values():
            if not fut.done():
                fut.set_exception(PolicyUnavailable("policy process died"))
        for q in queued:
            for fd in q.fds:
                os.close(fd)
            if not q.fut.done():
                q.fut.set_exception(PolicyUnavailable("policy process died"))
        if not self._stopping:
            self.on_death(self.returncode)

    # --- ending ------------------------------------------------------------------------------------------

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> int | None:
        """End the policy process cleanly (SIGTERM: it restores threads and unpins); kill it after `timeout`."""
        if self.proc is None:
            return None
        self._stopping = True
        if self.proc.poll() is None:
            try:
                self.proc.send_signal(signal.SIGTERM)
                self.returncode = self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                log.warning("policy process %d did not stop within %.1f s: killing it", self.proc.pid, timeout)
                self._kill()
        self.remove_pins()  # after a clean exit only the empty folder is left (the sandbox cannot remove its mount point)
        self.returncode = self.proc.returncode
        self.dead = True
        if not self._running:  # else run() wakes on the pidfd and closes (trio must not lose an fd it waits on)
            self._close()
        return self.returncode

    def _kill(self) -> None:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        if not self._running:
            self._close()

    def _close(self) -> None:
        if self._pidfd >= 0:
            os.close(self._pidfd)
            self._pidfd = -1
        if self._sock is not None:
            self._sock.close()

    def remove_pins(self) -> None:
        """Remove this VMM's pin directory (detaches pinned links) after the policy process could not."""
        path = os.path.join(self.pin_root, str(self.vmm_pid))
        try:
            remove_pin_dir(path)
        except OSError as e:
            log.warning("could not remove %s: %s", path, e)
