"""The control client reads a refusal that comes before its request is read (a race the server may win)."""

from __future__ import annotations

import os
import socket
import threading

from pyvmm.common import control_client


def test_a_server_that_refuses_and_closes_before_reading_is_heard(tmp_path, monkeypatch) -> None:
    path = tmp_path / f"{os.getpid()}.sock"
    monkeypatch.setattr(control_client, "SOCKET_DIR", tmp_path)
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(1)
    accepted = threading.Event()

    def refuse() -> None:
        conn, _ = server.accept()
        conn.sendall(b'{"error": "busy: 8 clients are connected"}\n')
        conn.close()  # without reading: the client's send then meets a closed peer (EPIPE)
        accepted.set()

    t = threading.Thread(target=refuse)
    t.start()
    try:
        # a request far larger than the socket buffers, so that its send cannot complete before the close
        reply = control_client.request(os.getpid(), {"cmd": "status", "pad": "x" * (4 << 20)}, timeout=10)
    finally:
        t.join(10)
        server.close()
    assert accepted.is_set()
    assert reply == {"error": "busy: 8 clients are connected"}
