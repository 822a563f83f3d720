"""The VM's control socket, client side (plain sockets, for `pyvmm status|policy` and the bench).

Finds the socket of a running VM (/run/pyvmm/<vmm-pid>.sock) and sends one
request, a JSON object on one line; the reply is one JSON object on one line.
The server half is pyvmm/vmm/control.py.
"""

from __future__ import annotations

import errno
import json
import os
import socket
from pathlib import Path

from pyvmm.common.procfs import pid_alive

SOCKET_DIR = Path(os.environ.get("PYVMM_RUN_DIR", "/run/pyvmm"))
MAX_LINE = 1 << 20  # a reply (policy.show, status) may be long


class ControlError(RuntimeError):
    """No VM to talk to, or the VM did not answer; the message says which."""


def socket_path(pid: int) -> Path:
    """Control socket of the VMM with this pid."""
    return SOCKET_DIR / f"{pid}.sock"


def running_vms() -> list[int]:
    """PIDs of VMMs with a control socket whose process is alive."""
    pids = []
    if SOCKET_DIR.is_dir():
        if not os.access(SOCKET_DIR, os.R_OK | os.X_OK):
            raise ControlError(f"{SOCKET_DIR} is root's (0700): run this as root")
        for p in SOCKET_DIR.glob("*.sock"):
            if p.stem.isdigit() and pid_alive(int(p.stem)):
                pids.append(int(p.stem))
    return sorted(pids)


def resolve_vm(pid: int | None) -> int:
    """The VM to talk to: the given pid, or the only one running."""
    if pid is not None:
        if not socket_path(pid).exists() or not pid_alive(pid):
            raise ControlError(f"no VM with pid {pid} (no {socket_path(pid)})")
        return pid
    pids = running_vms()
    if not pids:
        raise ControlError("no VM is running")
    if len(pids) > 1:
        raise ControlError(f"{len(pids)} VMs are running (pids {', '.join(map(str, pids))}): give one")
    return pids[0]


def request(pid: int | None, req: dict, timeout: float = 10.0) -> dict:
    """Send one request to a VM's control socket and return its reply."""
    pid = resolve_vm(pid)
    path = socket_path(pid)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        try:
            s.connect(str(path))
            try:
                s.sendall(json.dumps(req).encode() + b"\n")
            except BrokenPipeError:
                pass  # refused before our request was read (busy, not allowed): its one line is still to read
            buf = b""
            while b"\n" not in buf:
                data = s.recv(65536)
                if not data:
                    raise ControlError(f"VM {pid} closed the control socket without answering")
                buf += data
                if len(buf) > MAX_LINE:
                    raise ControlError(f"VM {pid} sent an over-long reply")
        except TimeoutError:
            raise ControlError(f"VM {pid} did not answer within {timeout:g} s") from None
        except OSError as e:
            if e.errno in (errno.ECONNREFUSED, errno.ENOENT):
                raise ControlError(f"VM {pid} is not accepting requests ({e.strerror})") from None
            raise ControlError(f"control socket of VM {pid}: {e.strerror or e}") from None
    try:
        reply = json.loads(buf.split(b"\n", 1)[0])
    except ValueError:
        raise ControlError(f"VM {pid} sent a reply that is not JSON") from None
    if not isinstance(reply, dict):
        raise ControlError(f"VM {pid} sent a reply that is not a JSON object")
    return reply
