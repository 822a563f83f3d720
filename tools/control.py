"""A tiny client of a running VM's control socket (/run/pyvmm/<vmm-pid>.sock): one JSON line each way."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

SOCKET_DIR = Path(os.environ.get("PYVMM_RUN_DIR", "/run/pyvmm"))  # same override as vmm.control


class ControlError(RuntimeError):
    """The control socket is missing, did not answer in time, or replied with an error."""


def socket_path(vmm_pid: int) -> Path:
    """Where the VMM with this pid serves its control socket."""
    return SOCKET_DIR / f"{vmm_pid}.sock"


def request(vmm_pid: int, msg: dict, timeout: float = 2.0) -> dict:
    """Send one request ({"cmd": ...}) and return the reply; raise ControlError on any failure."""
    path = socket_path(vmm_pid)
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(str(path))
            s.sendall(json.dumps(msg).encode() + b"\n")
            buf = b""
            while not buf.endswith(b"\n"):
                chunk = s.recv(65536)
                if not chunk:
                    break
                buf += chunk
    except OSError as e:
        raise ControlError(f"{path}: {e.strerror or e}") from e
    try:
        reply = json.loads(buf.decode() or "null")
    except ValueError as e:
        raise ControlError(f"{path}: reply is not JSON: {buf[:80]!r}") from e
    if not isinstance(reply, dict):
        raise ControlError(f"{path}: reply is not an object")
    if "error" in reply:
        raise ControlError(f"{path}: {msg.get('cmd')}: {reply['error']}")
    return reply
