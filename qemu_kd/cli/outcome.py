"""Exit statuses and failure reports of the commands that run guest commands (``run``, ``exec``).

As with ``docker run``: the guest command's exit status is the command's, and
qemu-kd's own failures (bad arguments, a missing kernel, a guest that does not
come up, an attestation that does not verify) exit :data:`HARNESS_EXIT`, so a
CI script can tell the two apart.  With ``--json`` a failure still prints one
object, ``{"error": {"message", "hint", "code"}}``.
"""

from __future__ import annotations

import json
import sys

from qemu_kd.common.errors import ConfigError, KdError

#: qemu-kd itself failed (as ``docker run`` uses 125).
HARNESS_EXIT = 125
#: The guest command ran past ``--cmd-timeout`` and was killed (as ``timeout(1)`` uses 124).
TIMED_OUT_EXIT = 124
#: Ctrl-C or SIGTERM stopped qemu-kd.
INTERRUPTED_EXIT = 130


class CommandLineError(ConfigError):
    """A command line that ``run`` or ``exec`` cannot parse."""


def guest_exit_status(result: dict) -> int:
    """The exit status for a guest command's result: its own status; 128+N when signal N
    killed it; :data:`TIMED_OUT_EXIT` when it ran past its timeout."""
    if result.get("timed_out"):
        return TIMED_OUT_EXIT
    rc = int(result["rc"])
    return 128 - rc if rc < 0 else rc & 0xFF


def error_object(exc: BaseException) -> dict:
    """The ``error`` field of a failed run: message, hint and a stable code (the error's kind)."""
    if isinstance(exc, KdError):
        return {"message": exc.message, "hint": exc.hint, "code": type(exc).__name__}
    if isinstance(exc, KeyboardInterrupt):
        return {"message": "interrupted; QEMU stopped and its files removed", "hint": None,
                "code": "Interrupted"}
    return {"message": f"internal error: {type(exc).__name__}: {exc}",
            "hint": "this is a bug in qemu-kd; the traceback is on stderr", "code": "InternalError"}


def report_failure(exc: BaseException, as_json: bool) -> int:
    """Print a failure of ``run``/``exec`` (one JSON object on stdout with ``as_json``, the
    one-line error on stderr always) and return the exit status."""
    error = error_object(exc)
    if as_json:
        print(json.dumps({"error": error}, indent=2), flush=True)
    line = error["message"] + (f" ({error['hint']})" if error["hint"] else "")
    print(f"qemu-kd: error: {line}", file=sys.stderr, flush=True)
    return INTERRUPTED_EXIT if isinstance(exc, KeyboardInterrupt) else HARNESS_EXIT
