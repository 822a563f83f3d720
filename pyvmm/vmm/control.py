"""The VM's control socket, server side: /run/pyvmm/<vmm-pid>.sock, one JSON object per line each way.

Served with trio in the VMM's main loop: a request {"cmd": NAME, ...} goes to
machine.control_handlers[NAME] (a plain function, or one returning an
awaitable); its dict is the reply, {"error": "..."} on failure.  The client
half is pyvmm/common/control_client.py.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import logging
import os
import socket
import stat
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import trio

from pyvmm.common.control_client import SOCKET_DIR
from pyvmm.common.procfs import pid_alive
from pyvmm.common.safe_fs import ensure_private_dir

MAX_REQUEST = 64 << 10  # a request is a command and a few values: anything longer is refused
MAX_CLIENTS = 8  # connections served at once; more are answered with an error and closed

log = logging.getLogger("pyvmm.control")


# --- server ------------------------------------------------------------------------
async def dispatch(handlers: dict[str, Callable[[dict], Any]], line: bytes) -> dict:
    """Run one request line through the handlers; never raises."""
    try:
        req = json.loads(line)
    except ValueError:
        return {"error": "request is not JSON"}
    if not isinstance(req, dict) or not isinstance(req.get("cmd"), str):
        return {"error": 'request must be a JSON object with a "cmd" string'}
    cmd = req["cmd"]
    h = handlers.get(cmd)
    if h is None:
        return {"error": f"unknown command {cmd!r} (known: {', '.join(sorted(handlers))})"}
    try:
        reply = h(req)
        if inspect.isawaitable(reply):
            reply = await reply
    except Exception as e:  # a handler bug answers with an error, it does not stop the VM
        log.debug("control handler %s failed", cmd, exc_info=True)
        return {"error": f"{cmd}: {e}"}
    return reply if isinstance(reply, dict) else {"result": reply}


def peer_uid(sock: socket.socket | trio.socket.SocketType) -> int:
    """The uid of the process at the other end of a Unix socket (SO_PEERCRED)."""
    _pid, uid, _gid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))
    return uid


async def _refuse(stream: trio.SocketStream, why: str) -> None:
    with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
        await stream.send_all(json.dumps({"error": why}).encode() + b"\n")
    await stream.aclose()


class _Server:
    """Connections of one control socket: only root or the VMM's own uid, at most MAX_CLIENTS at once."""

    def __init__(self, handlers: dict) -> None:
        self.handlers = handlers
        self.clients = 0

    async def __call__(self, stream: trio.SocketStream) -> None:
        uid = peer_uid(stream.socket)
        if uid not in (0, os.geteuid()):
            log.warning("control socket: refused a client with uid %d", uid)
            await _refuse(stream, f"uid {uid} may not control this VM")
            return
        if self.clients >= MAX_CLIENTS:
            await _refuse(stream, f"busy: {MAX_CLIENTS} clients are connected")
            return
        self.clients += 1
        try:
            await _serve_client(self.handlers, stream)
        finally:
            self.clients -= 1


async def _serve_client(handlers: dict, stream: trio.SocketStream) -> None:
    buf = b""
    async with stream:
        while True:
            try:
                data = await stream.receive_some(65536)
            except trio.BrokenResourceError:
                return
            if not data:
                return
            buf += data
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                if not line.strip():
                    continue
                reply = await dispatch(handlers, line)
                try:
                    await stream.send_all(json.dumps(reply, default=str).encode() + b"\n")
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    return
            if len(buf) > MAX_REQUEST:  # one line past the bound: say so, and drop the connection
                await _refuse(stream, f"request longer than {MAX_REQUEST} bytes")
                return


def sweep_stale_sockets(folder: Path = SOCKET_DIR) -> list[int]:
    """Remove <pid>.sock files of VMMs that are gone (a SIGKILL'd run); returns those pids.

    Only our own sockets, checked with lstat: a symlink, a file or another uid's socket stays.
    """
    removed = []
    try:
        names = os.listdir(folder)
    except FileNotFoundError:
        return removed
    for name in names:
        stem = name.removesuffix(".new").removesuffix(".sock")
        if not name.endswith((".sock", ".sock.new")) or not stem.isdigit():
            continue
        try:
            st = os.lstat(folder / name)
            if stat.S_ISSOCK(st.st_mode) and st.st_uid == os.geteuid() and not pid_alive(int(stem)):
                os.unlink(folder / name)
                removed.append(int(stem))
        except FileNotFoundError:
            continue
    return removed


async def serve(handlers: dict, path: Path, task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Serve the control socket at path until cancelled; removes the socket file on the way out."""
    ensure_private_dir(path.parent)  # 0700, ours, not a symlink: or UnsafePathError (an OSError)
    sweep_stale_sockets(path.parent)
    try:
        path.unlink()
    except FileNotFoundError:
        pass
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    staging = path.with_name(path.name + ".new")
    try:
        # Bound and listening under another name, then renamed: a client that sees the path can connect
        # (between bind and listen a connect is refused), and the mode is 0600 from the first moment.
        await sock.bind(str(staging))
        os.chmod(staging, 0o600)
        sock.listen(16)
        os.rename(staging, path)
        listener = trio.SocketListener(sock)
        task_status.started()
        await trio.serve_listeners(_Server(handlers), [listener])
    finally:
        sock.close()
        for p in (staging, path):
            try:
                p.unlink()
            except FileNotFoundError:
                pass
