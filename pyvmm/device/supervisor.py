"""VMM side of the policy process: spawn it, talk to it, notice its death, end it.

One request path: post() queues a request from any thread (vCPU threads on ENABLE/DISABLE, the
control socket for status/policy commands), and the trio tasks of _serve_socket() send the queue
in order over the socketpair and hand each reply to its request's callback.  `run()`, a trio task
in the VMM's nursery, serves the socket and watches the child through a pidfd, so that its death
is seen at once (the device then restores the vCPU threads, as the second line after its
guardian, guardian.c, which does not need this thread's GIL).  Every wait is a
trio await (spawn for `ready`, request for a reply), so the VMM's trio thread never blocks on the
policy process; a caller without the VMM's loop (a test, a stand-in) runs these in trio.run, whose
loop then serves the socket while no other loop does.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import trio

from pyvmm.common import protocol
from pyvmm.common.lone_error import lone_error
from pyvmm.common.pins import PIN_ROOT, remove_pin_dir
from pyvmm.policy import host_programs

log = logging.getLogger("pyvmm.pvsched.supervisor")

READY_TIMEOUT_S = 60.0  # Python start-up, the cffi views and the BPF load: tens of seconds under emulation and load
STOP_TIMEOUT_S = 3.0
REQUEST_TIMEOUT_S = 5.0
HEARTBEAT_S = 2.0  # ping period
HEARTBEAT_TIMEOUT_S = 5.0  # a policy process silent this long is hung: killed, threads restored
CHILD_ENV = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C.UTF-8"}

Reply = dict[str, Any]
OnReply = Callable[[Reply | Exception], None]  # gets the reply, or why there is none; called from any thread


class PolicyUnavailable(RuntimeError):
    """The policy process is not running (never started, died, or stopped), or did not answer."""


@dataclass
class _Queued:
    """A request waiting for the sender: encoded once, at post()."""

    id: int
    op: str
    wire: bytes
    fds: tuple[int, ...]
    on_reply: OnReply
    coalesce: str | None


def _ignore(_: Reply | Exception) -> None:
    pass


def _wake_all(claimers: list[tuple[trio.lowlevel.TrioToken, trio.Event]]) -> None:
    for token, free in claimers:
        try:
            token.run_sync_soon(free.set)  # thread-safe: each Event belongs to its own loop
        except trio.RunFinishedError:
            pass


async def _first_readable(*fds: Any) -> None:
    """Return once any of these file descriptors (or sockets) is readable."""
    async def wait(fd: Any, scope: trio.CancelScope) -> None:
        await trio.lowlevel.wait_readable(fd)
        scope.cancel()

    async with trio.open_nursery() as nursery:
        for fd in fds:
            nursery.start_soon(wait, fd, nursery.cancel_scope)


class PolicySupervisor:
    """Owns one policy process: its socket, its request queue and its lifetime."""

    def __init__(self, vmm_pid: int, tunables: dict[str, str] | None, on_death: Callable[[int], None],
                 pin_root: str = PIN_ROOT, verbose: bool = False, extra_args: tuple[str, ...] = (),
                 heartbeat_fd: int | None = None, time_scale: int = 1) -> None:
        """time_scale: how much longer the start-up and heartbeat limits are (the device's slowdown() inside
        `pyvmm lab`, where everything runs emulated)."""
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
        self._lock = threading.Lock()  # the queue, the pending callbacks, and which loop serves the socket
        self._queue: deque[_Queued] = deque()
        self._pending: dict[int, OnReply] = {}
        self._ids = itertools.count(1)
        self._token: trio.lowlevel.TrioToken | None = None  # the loop serving the socket now, if any
        self._wake: trio.Event | None = None  # set when the queue has something for that loop's sender
        self._claimers: list[tuple[trio.lowlevel.TrioToken, trio.Event]] = []  # loops waiting to serve it
        self._servable = False  # `ready` has come: from then on a loop may serve the socket
        self._stopping = False
        self._running = False  # run() is in progress: it owns the pidfd's wait and closes the fds at its end
        self.heartbeat_s = HEARTBEAT_S
        self.heartbeat_timeout_s = HEARTBEAT_TIMEOUT_S * time_scale
        self.ready_timeout_s = READY_TIMEOUT_S * time_scale

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

    async def spawn(self) -> dict[str, Any]:
        """Start the policy process (from the VMM's main thread: PDEATHSIG follows that thread) and await ready.

        PolicyUnavailable, one line, if it ends or says something else first, or says nothing within
        ready_timeout_s (READY_TIMEOUT_S, scaled); it is killed then (also when this is cancelled), before any boost.
        """
        self._launch()
        try:
            self.ready = await self._await_ready(self.ready_timeout_s)
        except BaseException:
            self._kill()
            raise
        assert self._sock is not None
        self._sock.setblocking(False)
        with self._lock:
            self._servable = True
            claimers, self._claimers = self._claimers, []
        _wake_all(claimers)
        return self.ready

    def _command(self, sock_fd: int) -> list[str]:
        """The policy process's command line, talking on `sock_fd`."""
        # -I: no PYTHON* variables, no user site, and neither the caller's working directory nor the
        # script's folder on sys.path (a json.py there would otherwise run as root); the package is found
        # through its install.  A fixed environment and cwd "/" for the same reason.
        cmd = [sys.executable, "-I", "-m", "pyvmm.policy.process", "--fd", str(sock_fd),
               "--vmm-pid", str(self.vmm_pid), "--tunables", json.dumps(self.tunables),
               "--pin-root", self.pin_root, *self.extra_args]
        if self.heartbeat_fd is not None:
            cmd += ["--heartbeat-fd", str(self.heartbeat_fd)]
        if self.verbose:
            cmd.append("-v")
        return cmd

    def _launch(self) -> None:
        parent, child = protocol.socketpair()
        cmd = self._command(child.fileno())
        pass_fds = [child.fileno()] + ([self.heartbeat_fd] if self.heartbeat_fd is not None else [])
        try:
            # Own session: a terminal's Ctrl-C reaches the VMM, which then ends the child in order.
            self.proc = subprocess.Popen(cmd, pass_fds=pass_fds, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                         env=CHILD_ENV, cwd="/", start_new_session=True)
        finally:
            child.close()
        self._sock = parent
        self._pidfd = os.pidfd_open(self.proc.pid)

    async def _await_ready(self, timeout: float) -> dict[str, Any]:
        # The first message is "ready" (or nothing, if it fails to start): awaited before any request is
        # served, so that boosting is in place before the vCPUs run and the guest enables the device.
        assert self.proc is not None and self._sock is not None
        with trio.move_on_after(timeout):
            await _first_readable(self._sock, self._pidfd)
            msg = self._read_first()
            if msg.get("op") == "ready":
                return msg
            self._kill()
            raise PolicyUnavailable(f"policy process {self.proc.pid} did not start (exit code {self.proc.returncode})")
        raise PolicyUnavailable(f"policy process {self.proc.pid} did not start: no ready message within {timeout:g} s")

    def _read_first(self) -> dict[str, Any]:
        assert self._sock is not None
        try:
            data = self._sock.recv(protocol.MAX_MSG, socket.MSG_DONTWAIT)
            return protocol.decode(data) if data else {}
        except (OSError, ValueError, TypeError):  # OSError: only the pidfd woke, the child ended without a word
            return {}

    # --- requests ----------------------------------------------------------------------------------------

    def post(self, msg: dict[str, Any], fds: tuple[int, ...] = (), coalesce: str | None = None,
             on_reply: OnReply = _ignore) -> int | None:
        """Queue a request from any thread (fds are dup'ed now, closed once sent); returns its id.

        `on_reply` gets the reply, or the exception saying why none will come (then the id is None when
        it was refused at once).  With `coalesce`, a queued, not yet sent request of the same key is
        replaced (its callback gets {"superseded": True}): only the latest state matters
        (register/unregister), so a guest toggling ENABLE/DISABLE cannot grow the queue.
        """
        if not self.alive:
            on_reply(PolicyUnavailable("policy process is not running"))
            return None
        msg = dict(msg, id=next(self._ids))
        try:  # encoded once, here: a message that cannot be sent is refused whole, never reaching the sender
            wire = protocol.encode(msg)
        except (ValueError, TypeError) as e:
            on_reply(ValueError(f"{msg.get('op')}: request refused: {e}"))
            return None
        item = _Queued(msg["id"], str(msg.get("op")), wire, tuple(os.dup(fd) for fd in fds), on_reply, coalesce)
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
            old.on_reply({"ok": True, "superseded": True, "id": old.id})
        if token is not None:
            try:
                token.run_sync_soon(self._kick)
            except trio.RunFinishedError:
                pass  # that loop has ended: the next one to serve the socket sends the queue
        return item.id

    async def request(self, msg: dict[str, Any], timeout: float = REQUEST_TIMEOUT_S) -> Reply:
        """Send a request and await its reply; PolicyUnavailable if none comes within `timeout`.

        The one way to wait for a reply.  A loop that is not already serving the socket (a test's
        trio.run, or any loop before run() starts) serves it meanwhile, once no other loop does.
        """
        if not self.alive:
            raise PolicyUnavailable("policy process is not running")
        if self._token is trio.lowlevel.current_trio_token():
            return await self._reply(msg, timeout)
        with lone_error():  # PolicyUnavailable reaches the caller as itself
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._serve_socket)
                try:
                    return await self._reply(msg, timeout)
                finally:
                    nursery.cancel_scope.cancel()

    async def _reply(self, msg: dict[str, Any], timeout: float) -> Reply:
        token = trio.lowlevel.current_trio_token()
        got: list[Reply | Exception] = []
        done = trio.Event()

        def on_reply(reply: Reply | Exception) -> None:
            got.append(reply)
            try:
                token.run_sync_soon(done.set)  # thread-safe: the reply may come from another loop's receiver
            except trio.RunFinishedError:
                pass

        rid = self.post(msg, on_reply=on_reply)
        with trio.move_on_after(timeout):
            await done.wait()
        if not got:
            with self._lock:
                self._pending.pop(rid, None)  # type: ignore[arg-type]  # a late reply is then logged as unmatched
            raise PolicyUnavailable(f"policy process did not answer {msg.get('op')} within {timeout} s")
        if isinstance(got[0], Exception):
            raise got[0]
        return got[0]

    async def ask(self, msg: dict[str, Any], timeout: float = REQUEST_TIMEOUT_S) -> Reply:
        """The reply, or {"error": why} when none comes (for control commands, which answer either way)."""
        try:
            return await self.request(msg, timeout)
        except (PolicyUnavailable, ValueError) as e:
            return {"error": str(e)}

    def _kick(self) -> None:
        if self._wake is not None:
            self._wake.set()

    # --- serving the socket: the one path of every request ---------------------------------------------

    def _claim(self) -> trio.Event | None:
        """Make this loop the socket's server (None), or queue it: the Event is set once it may try again."""
        token = trio.lowlevel.current_trio_token()
        with self._lock:
            if self._token is None and self._servable:
                self._token, self._wake = token, trio.Event()
                return None
            free = trio.Event()
            self._claimers.append((token, free))
            return free

    async def _claimed(self) -> None:
        # No polling: the loop that releases the socket (or spawn, at `ready`) wakes every waiting loop,
        # each through its own token, under the lock that a waiter queues itself under.
        while (free := self._claim()) is not None:
            try:
                await free.wait()
            finally:
                with self._lock:
                    self._claimers = [c for c in self._claimers if c[1] is not free]

    async def _serve_socket(self) -> None:
        """Once no other loop serves the socket, send queued requests and deliver replies (until cancelled)."""
        if self._sock is None:
            return
        await self._claimed()
        if self._sock.fileno() < 0:  # closed while this loop waited (the process ended): nothing to serve
            self._release()
            return
        try:
            tsock = trio.socket.from_stdlib_socket(self._sock)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._sender, tsock)
                nursery.start_soon(self._receiver, tsock)
        finally:
            self._release()

    def _release(self) -> None:
        with self._lock:
            self._token = self._wake = None
            claimers, self._claimers = self._claimers, []
        self._close_if_done()  # before the waiters look, so that they see a socket closed for good as closed
        _wake_all(claimers)

    async def _sender(self, tsock: trio.socket.SocketType) -> None:
        while True:
            wake = self._send_queued()
            if wake is None:
                await tsock.wait_writable()
            else:
                await wake.wait()

    def _send_queued(self) -> trio.Event | None:
        """Send what is queued, without blocking; the Event to await once it is empty, None if the socket is full.

        A request leaves the queue only in the step that sends it, with no checkpoint between: a sender
        cancelled after its wake-up (a request()'s own server ending) used to pop a request and lose it
        at sendmsg's first checkpoint, before the send.
        """
        assert self._sock is not None
        while True:
            failed: OSError | None = None
            with self._lock:  # post() supersedes only what is still queued, under this lock
                if not self._queue:
                    self._wake = trio.Event()
                    return self._wake
                q = self._queue[0]
                try:
                    self._sock.sendmsg([q.wire], protocol.ancillary(q.fds))  # non-blocking since spawn()
                except BlockingIOError:
                    return None
                except OSError as e:  # this request fails; the sender goes on
                    failed = e
                self._queue.popleft()
                if failed is None:
                    self._pending[q.id] = q.on_reply
            for fd in q.fds:
                os.close(fd)
            if failed is not None:
                q.on_reply(PolicyUnavailable(f"sending {q.op}: {failed}"))

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
            with self._lock:
                on_reply = self._pending.pop(msg.get("id"), None)  # type: ignore[arg-type]
            if on_reply is not None:
                on_reply(msg)
            elif msg.get("op") != "ready":
                log.debug("unmatched message from the policy process: %s", msg)

    # --- the trio side ---------------------------------------------------------------------------------

    async def run(self, on_cancel: Callable[[], Awaitable[None]] | None = None) -> None:
        """Serve requests and report the child's death (once) via on_death; the VMM cancels it at shutdown.

        Cancelled while the child lives, it first awaits `on_cancel` (shielded; bound it yourself) with
        requests still served: the device's last exchange with the policy process.
        """
        if self.proc is None or self._sock is None:
            return
        self._running = True
        try:
            io = trio.CancelScope(shield=True)  # requests outlive a cancel of run() until on_cancel is done
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._shielded, io, self._serve_socket)
                nursery.start_soon(self._heartbeat)
                died = False
                try:
                    await trio.lowlevel.wait_readable(self._pidfd)
                    died = True
                finally:
                    if not died and on_cancel is not None and self.alive:
                        with trio.CancelScope(shield=True):
                            await on_cancel()
                    io.cancel()
                    nursery.cancel_scope.cancel()
            self._reap()
        finally:
            with self._lock:
                self._running = False
            self._close_if_done()

    @staticmethod
    async def _shielded(scope: trio.CancelScope, fn: Callable[[], Awaitable[None]]) -> None:
        with scope:
            await fn()

    async def _heartbeat(self) -> None:
        # A hung policy process (deadlock, SIGSTOP) would leave boosted threads boosted: ping it, and
        # kill it when it stops answering, so that the death path restores the threads.
        while True:
            await trio.sleep(self.heartbeat_s)
            if not self.alive:
                return
            try:
                await self.request({"op": "ping"}, self.heartbeat_timeout_s)
            except PolicyUnavailable:
                if not self.alive:
                    return
                log.error("pvsched: policy process %d did not answer for %.1f s: killing it", self.pid,
                          self.heartbeat_timeout_s)
                assert self.proc is not None
                self.proc.kill()  # the pidfd wakes run(), which reaps it and calls on_death
                return

    def _reap(self) -> None:
        if self.proc is None or self.dead:
            return
        self.returncode = self.proc.wait()
        self.dead = True
        with self._lock:
            pending, self._pending = self._pending, {}
            queued = list(self._queue)
            self._queue.clear()
        for on_reply in pending.values():
            on_reply(PolicyUnavailable("policy process died"))
        for q in queued:
            for fd in q.fds:
                os.close(fd)
            q.on_reply(PolicyUnavailable("policy process died"))
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
        self._close_if_idle()  # else run() wakes on the pidfd, and the last loop using the fds closes them
        return self.returncode

    def _kill(self) -> None:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self._close_if_idle()

    def _close_if_idle(self) -> None:
        # Trio must not lose an fd it waits on: while run() waits on the pidfd or a loop serves the
        # socket, that one closes them at its end (_close_if_done).
        with self._lock:
            if self._running or self._token is not None:
                return
            if self._pidfd >= 0:
                os.close(self._pidfd)
                self._pidfd = -1
            if self._sock is not None:
                self._sock.close()

    def _close_if_done(self) -> None:
        if self.dead:
            self._close_if_idle()

    def remove_pins(self) -> None:
        """After the policy process has ended: remove this VMM's pin folder, which its sandbox could not, and
        this VM's entries in the host's maps, which it could not reach (the last VM out removes the host's pins)."""
        path = os.path.join(self.pin_root, str(self.vmm_pid))
        try:
            remove_pin_dir(path)
        except OSError as e:
            log.warning("could not remove %s: %s", path, e)
        try:
            host_programs.leave(self.vmm_pid, self.proc.pid if self.proc is not None else None, self.pin_root)
        except OSError as e:
            log.warning("could not remove VMM %d's entries from the host's policy maps: %s", self.vmm_pid, e)
