"""Messages between the device (VMM) and the policy process: one JSON object per SOCK_SEQPACKET datagram.

File descriptors (the guest-RAM memfd) travel with a message as SCM_RIGHTS.
Requests carry "op" and "id"; replies carry the same "id" and either "ok": true
plus data, or "error". The policy process also sends one unsolicited {"op": "ready"}.

Ops (device -> policy process):
  register    vm_id, nr_vcpus, shm_hva, shm_gpa, shm_size, file_offset, version, features,
              vcpus: [{id, tid, original: {policy, priority, nice}}], one fd (memfd)
  unregister  vm_id
  policy.show / policy.set (values) / status / ping (the VMM's heartbeat) / shutdown
"""

from __future__ import annotations

import array
import json
import socket
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the policy process imports this module and runs without trio
    import trio

MAX_MSG = 1 << 20
MAX_FDS = 4


def socketpair() -> tuple[socket.socket, socket.socket]:
    """A connected SOCK_SEQPACKET pair (message boundaries kept, fds passable)."""
    return socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)


def encode(obj: dict[str, Any]) -> bytes:
    """Serialize one message; refuses what would not fit one datagram."""
    data = json.dumps(obj, separators=(",", ":")).encode()
    if len(data) > MAX_MSG:
        raise ValueError(f"message of {len(data)} bytes exceeds {MAX_MSG}")
    return data


def decode(data: bytes) -> dict[str, Any]:
    """Parse one message; anything but a JSON object is a protocol error (ValueError/TypeError)."""
    obj = json.loads(data)
    if not isinstance(obj, dict):
        raise TypeError("message is not a JSON object")
    return obj


def ancillary(fds: list[int] | tuple[int, ...]) -> list[tuple[int, int, bytes]]:
    """SCM_RIGHTS control message carrying `fds` (none if empty)."""
    return [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())] if fds else []


def fds_from(ancdata: list[tuple[int, int, bytes]]) -> list[int]:
    """File descriptors received in SCM_RIGHTS control messages (the caller owns them)."""
    fds = array.array("i")
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(data[: len(data) - (len(data) % fds.itemsize)])
    return list(fds)


async def send(sock: trio.socket.SocketType, obj: dict[str, Any], fds: tuple[int, ...] = ()) -> None:
    """Send one message (and fds) on a trio socket."""
    await sock.sendmsg([encode(obj)], ancillary(fds))


async def recv(sock: trio.socket.SocketType) -> tuple[dict[str, Any] | None, list[int]]:
    """Receive one message and its fds; (None, []) at end of stream. The caller owns the fds."""
    return _received(*await sock.recvmsg(MAX_MSG, socket.CMSG_SPACE(MAX_FDS * 4)))


def send_blocking(sock: socket.socket, obj: dict[str, Any], fds: tuple[int, ...] = ()) -> None:
    """Send one message (and fds) on a blocking socket (the policy process's)."""
    sock.sendmsg([encode(obj)], ancillary(fds))


def recv_blocking(sock: socket.socket) -> tuple[dict[str, Any] | None, list[int]]:
    """Receive one message and its fds on a blocking socket; as recv()."""
    return _received(*sock.recvmsg(MAX_MSG, socket.CMSG_SPACE(MAX_FDS * 4)))


def _received(data: bytes, ancdata: list[tuple[int, int, bytes]], flags: int, _addr: Any = None
              ) -> tuple[dict[str, Any] | None, list[int]]:
    fds = fds_from(ancdata)
    if not data:
        for fd in fds:
            socket.close(fd)
        return None, []
    if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
        for fd in fds:
            socket.close(fd)
        raise ValueError("truncated message")
    return decode(data), fds
