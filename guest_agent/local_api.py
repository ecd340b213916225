"""The client side of the agent's local socket, for programs in the guest.

The agent owns the guest port; programs in the guest reach the platform
through the agent's Unix socket :data:`AGENT_SOCKET` (root only: the directory
is 0700, the socket 0600).  One JSON request line per connection, one answer
line: ``{"ok": true, "result": {...}}`` or ``{"ok": false, "error": "..."}``.
The host cannot reach this socket: it exists only inside the guest.

The operations (``hypercall``, ``report``, ``derive-key``) are in
docs/agent-protocol.md; the library calls built on :func:`ask` are
:func:`guest_agent.hypercall.call` and :mod:`guest_agent.attest_api`.
"""

from __future__ import annotations

import json
import socket

AGENT_SOCKET = "/run/qemu-kd/agent.sock"
MAX_REPLY = 1 << 20


class LocalApiError(Exception):
    """The agent or the platform refused the request, or the agent could not be reached."""


def ask(msg: dict, timeout: float, socket_path: str = AGENT_SOCKET,
        error: type[LocalApiError] = LocalApiError) -> dict:
    """Send one request to the agent; its ``result``, or ``error`` raised with the reason."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect(socket_path)
            sock.sendall(json.dumps(msg).encode() + b"\n")
            data = bytearray()
            while not data.endswith(b"\n"):
                chunk = sock.recv(65536)
                if not chunk:
                    break
                data += chunk
                if len(data) > MAX_REPLY:
                    raise error("the agent's answer is too long")
        except OSError as exc:
            raise error(f"cannot reach the agent at {socket_path}: {exc}") from None
    try:
        answer = json.loads(bytes(data))
    except ValueError:
        raise error("the agent's answer is not JSON") from None
    if not isinstance(answer, dict) or not answer.get("ok"):
        reason = answer.get("error") if isinstance(answer, dict) else None
        raise error(str(reason or f"the agent refused {msg.get('op')}"))
    result = answer.get("result")
    if not isinstance(result, dict):
        raise error("the agent's answer has no result")
    return result
