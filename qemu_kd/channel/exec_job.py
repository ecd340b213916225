"""The caller's side of a guest command run as a background job.

The guest agent starts the command (``exec_start``) and answers polls
(``exec_poll``) with the output that arrived since the last one, until the
command has ended (docs/agent-protocol.md).  The same three operations travel
inside the tenant session (protected guests) or on the shared channel (plain
guests); ``call`` is whichever carries them: ``call(op, wait=<seconds to wait
for the answer>, **args) -> result``.
"""

from __future__ import annotations

import base64
from typing import Callable, Generator

from qemu_kd.common.errors import KdError

#: Takes one piece of output as it arrives: ``("stdout" or "stderr", bytes)``.
OnOutput = Callable[[str, bytes], None]
Call = Callable[..., dict]
STREAMS = ("stdout", "stderr")
#: Seconds the guest may hold one poll open waiting for output (it answers sooner on news).
POLL_HOLD = 1.0
#: Seconds to wait for one start, poll or kill answer before the guest counts as unreachable.
ANSWER_WAIT = 60.0


def start_args(argv: list[str] | None, *, shell: str | None = None, stdin: bytes = b"",
               timeout: float | None = None, env: dict[str, str] | None = None) -> dict:
    """The ``exec_start`` arguments for a command."""
    args: dict = {"stdin": base64.b64encode(stdin).decode(), "timeout": timeout}
    if argv is not None:
        args["argv"] = list(argv)
    if shell is not None:
        args["shell"] = shell
    if env:
        args["env"] = dict(env)
    return args


def job_output(call: Call, args: dict) -> Generator[tuple[str, bytes], None, dict]:
    """Start the command and yield ``(stream, bytes)`` as its output arrives; the generator's
    return value is the end: ``rc``, ``timed_out`` and ``truncated``.

    If the caller stops early (an exception, or closing the generator), the job is killed.
    """
    job = call("exec_start", wait=ANSWER_WAIT, **args)["job"]
    finished = False
    try:
        while True:
            answer = call("exec_poll", wait=ANSWER_WAIT + POLL_HOLD, job=job, max_wait=POLL_HOLD)
            for name in STREAMS:
                data = base64.b64decode(answer.get(name) or "")
                if data:
                    yield name, data
            if answer.get("done"):
                finished = True
                return {"rc": int(answer["rc"]), "timed_out": bool(answer.get("timed_out")),
                        "truncated": bool(answer.get("truncated"))}
    finally:
        if not finished:
            try:
                call("exec_kill", wait=10.0, job=job)
            except (KdError, OSError):
                pass        # the channel itself failed: nothing more to do from here


def run_job(call: Call, args: dict, on_output: OnOutput | None = None) -> dict:
    """Run the command to its end, passing output to ``on_output`` as it arrives; the result
    as the one-shot ``exec`` gives it, with ``stdout`` and ``stderr`` as bytes."""
    collected = {name: bytearray() for name in STREAMS}
    events = job_output(call, args)
    try:
        while True:
            try:
                name, data = next(events)
            except StopIteration as stop:
                return {**stop.value, **{name: bytes(buf) for name, buf in collected.items()}}
            collected[name] += data
            if on_output is not None:
                on_output(name, data)
    finally:
        events.close()      # kills the job if on_output raised
