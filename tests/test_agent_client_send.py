"""AgentClient sends a large request (a file chunk) however slowly the guest drains it."""

from __future__ import annotations

import json
import socket
import threading
import time

from qemu_kd.channel.agent_client import AgentClient


def slow_agent(sock: socket.socket, pause: float) -> None:
    """Answers each request line; before reading the second one it stalls for ``pause``."""
    buf = bytearray()
    answered = 0
    while True:
        if answered == 1:
            time.sleep(pause)
            answered += 1
        try:
            chunk = sock.recv(1 << 16)
        except OSError:
            return
        if not chunk:
            return
        buf += chunk
        while b"\n" in buf:
            line, _, rest = bytes(buf).partition(b"\n")
            buf = bytearray(rest)
            req = json.loads(line)
            sock.sendall(json.dumps({"id": req["id"], "ok": True, "result": {"n": len(line)}}).encode() + b"\n")
            answered += 1


def test_a_large_request_waits_for_a_slow_reader():
    host, guest = socket.socketpair()
    worker = threading.Thread(target=slow_agent, args=(guest, 2.5), daemon=True)
    worker.start()
    try:
        client = AgentClient(host)
        assert client.call("ping", wait=10)["n"] > 0     # leaves a short read timeout behind
        big = "x" * (4 << 20)                             # far more than the socket buffers hold
        assert client.call("put_file", wait=60, data=big)["n"] > len(big)
    finally:
        host.close()
        worker.join(timeout=10)
        guest.close()
