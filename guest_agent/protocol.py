"""The agent's wire protocol on the shared channel (ttyS1).

Newline-delimited JSON, one object per line, UTF-8:

* request (host → guest): ``{"id": <int>, "cmd": <str>, ...arguments}``
* reply   (guest → host): ``{"id": <int>, "ok": true, "result": {...}}`` or
  ``{"id": <int|null>, "ok": false, "error": <str>}``
* event   (guest → host, unprompted): ``{"event": <str>, ...fields}``;
  ``ready`` is sent once when the agent starts.

A line longer than :data:`MAX_LINE` is rejected.  This module is shared by the
agent and by its host-side client; it depends on the standard library only.
"""

from __future__ import annotations

import json

MAX_LINE = 64 << 20  # 2 x MAX_OUTPUT with worst-case JSON escaping (6 bytes a byte) fits
MAX_OUTPUT = 4 << 20  # bytes of stdout/stderr an exec reply carries; more is cut and marked truncated


class ProtocolError(ValueError):
    """A line that is not a valid protocol message."""


def encode(message: dict) -> bytes:
    return json.dumps(message, separators=(",", ":"), sort_keys=True).encode() + b"\n"


def decode(line: bytes) -> dict:
    if len(line) > MAX_LINE:
        raise ProtocolError(f"line of {len(line)} bytes exceeds the {MAX_LINE}-byte limit")
    try:
        message = json.loads(line.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise ProtocolError(f"not JSON: {exc}") from None
    if not isinstance(message, dict):
        raise ProtocolError("message is not a JSON object")
    return message


def request(req_id: int, cmd: str, **args) -> dict:
    return {"id": req_id, "cmd": cmd, **args}


def reply(req_id, result: dict) -> dict:
    return {"id": req_id, "ok": True, "result": result}


def error(req_id, text: str) -> dict:
    return {"id": req_id, "ok": False, "error": text}


def event(name: str, **fields) -> dict:
    return {"event": name, **fields}
