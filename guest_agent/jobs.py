"""Guest commands: one command with its limits, run as a background job that callers poll.

A :class:`Job` starts the command in its own process group, feeds its stdin
and collects stdout and stderr in threads, so the agent goes on serving
requests while it runs.  Callers take the output that arrived since their last
:meth:`Job.poll`; a timeout kills the whole process group.  Limits:

* at most :data:`~guest_agent.protocol.MAX_OUTPUT` bytes of each stream are
  kept over the command's life; the rest is read and dropped, and the job says
  ``truncated``.  So no job buffers more than that per stream, however slowly
  it is polled (and the command never waits for its caller);
* a :class:`JobTable` holds at most :data:`MAX_JOBS` jobs; a finished job
  leaves it with the poll that reports its end, and one nobody polled for
  :data:`IDLE_LIMIT` seconds makes room for a new one.

:func:`run` runs a command to its end in the caller (the one-shot ``exec``).
Standard library only: this module runs inside the guest.
"""

from __future__ import annotations

import base64
import itertools
import os
import select
import signal
import subprocess
import threading
import time
from dataclasses import dataclass

from .protocol import MAX_OUTPUT

STREAMS = ("stdout", "stderr")
MAX_JOBS = 4
#: Bytes of one stream a poll answer carries at most; the rest waits for the next poll.
POLL_CHUNK = 256 << 10
#: Seconds one poll may wait for news (output or the end).
MAX_POLL_WAIT = 1.0
#: Once a poll has news, how long it waits for the command's end to answer both in one go.
LINGER = 0.05
#: A job nobody polled for this long is killed and dropped when the table needs room.
IDLE_LIMIT = 600.0
#: After a kill, how long the job waits for the pipes to close (a process that left the
#: group may hold them) before it stops reading them.
PIPE_GRACE = 5.0
READ_SIZE = 64 << 10


@dataclass(frozen=True)
class CommandSpec:
    """A command as ``exec`` and ``exec_start`` take it."""

    argv: list[str]
    stdin: bytes
    timeout: float | None
    env: dict[str, str] | None

    @classmethod
    def from_request(cls, req: dict, *, stdin_base64: bool, default_timeout: float | None) -> "CommandSpec":
        """``argv`` (or ``shell``), ``stdin`` (base64 or text), ``timeout`` and ``env``, checked."""
        argv = req.get("argv")
        shell = req.get("shell")
        if isinstance(shell, str) and argv is None:
            argv = ["/bin/sh", "-c", shell]
        if not isinstance(argv, list) or not argv or not all(isinstance(a, str) for a in argv):
            raise ValueError("exec needs 'argv' (a non-empty list of strings) or 'shell' (a string)")
        timeout = req.get("timeout", default_timeout)
        if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float))
                                    or timeout <= 0):
            raise ValueError("exec 'timeout' must be a positive number of seconds")
        stdin = req.get("stdin", "")
        if not isinstance(stdin, str):
            raise ValueError("exec 'stdin' must be a string")
        data = base64.b64decode(stdin, validate=True) if stdin_base64 else stdin.encode()
        env = req.get("env")
        if env is not None and not (isinstance(env, dict) and all(isinstance(k, str) and isinstance(v, str)
                                                                  for k, v in env.items())):
            raise ValueError("exec 'env' must map strings to strings")
        return cls(list(argv), data, float(timeout) if timeout is not None else None, env or None)


@dataclass(frozen=True)
class Outcome:
    """A finished command: everything it wrote (up to the cap) and how it ended."""

    rc: int
    stdout: bytes
    stderr: bytes
    timed_out: bool
    truncated: bool


class Job:
    """One running command and the output its callers have not taken yet."""

    def __init__(self, spec: CommandSpec, clock=time.monotonic):
        self._clock = clock
        self._cond = threading.Condition()
        self._pending = {name: bytearray() for name in STREAMS}
        self._kept = dict.fromkeys(STREAMS, 0)
        self._open = 0                  # output pipes not at their end yet
        self._status: int | None = None
        self._stop_reading = False      # set when the pipes outlive a kill, or the job is dropped
        self.timed_out = False
        self.truncated = False
        self.killed = False
        self.last_poll = clock()
        env = {**os.environ, **spec.env} if spec.env else None
        try:
            self._proc: subprocess.Popen | None = subprocess.Popen(
                spec.argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                env=env, start_new_session=True)
        except FileNotFoundError:
            self._proc = None
            self._pending["stderr"] += f"{spec.argv[0]}: not found".encode()
            self._status = 127
            return
        self._open = len(STREAMS)
        threads = [threading.Thread(target=self._feed, args=(spec.stdin,), daemon=True),
                   threading.Thread(target=self._wait, args=(spec.timeout,), daemon=True)]
        threads += [threading.Thread(target=self._read, args=(name, getattr(self._proc, name)), daemon=True)
                    for name in STREAMS]
        for thread in threads:
            thread.start()

    # -- the threads -------------------------------------------------------------------
    def _feed(self, data: bytes) -> None:
        assert self._proc is not None and self._proc.stdin is not None
        try:
            if data:
                self._proc.stdin.write(data)
        except OSError:
            pass            # the command stopped reading (or ended): the rest is not wanted
        finally:
            try:
                self._proc.stdin.close()
            except OSError:
                pass

    def _wait(self, timeout: float | None) -> None:
        """The command ends when its process has exited and its output pipes are closed; the
        timeout covers both (a child left in the background may hold the pipes)."""
        assert self._proc is not None
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            status = self._proc.wait(timeout)
            with self._cond:
                left = None if deadline is None else deadline - time.monotonic()
                in_time = self._cond.wait_for(lambda: self._open == 0, left)
        except subprocess.TimeoutExpired:
            in_time = False
        if not in_time:
            with self._cond:
                self.timed_out = True
            self._kill_group()
            status = self._proc.wait()
        with self._cond:
            self._status = status
            self._cond.notify_all()
            if (self.timed_out or self.killed) and not self._cond.wait_for(lambda: self._open == 0,
                                                                            PIPE_GRACE):
                # A process that left the group holds the pipes: stop reading, say output is cut.
                self.truncated = True
                self._stop_reading = True
                self._cond.notify_all()

    def _read(self, name: str, pipe) -> None:
        fd = pipe.fileno()
        try:
            while True:
                ready, _, _ = select.select([fd], [], [], 0.5)
                with self._cond:
                    if self._stop_reading:
                        return
                if not ready:
                    continue
                chunk = os.read(fd, READ_SIZE)
                if not chunk:
                    return
                self._keep(name, chunk)
        finally:
            pipe.close()
            with self._cond:
                self._open -= 1
                self._cond.notify_all()

    def _keep(self, name: str, chunk: bytes) -> None:
        with self._cond:
            room = MAX_OUTPUT - self._kept[name]
            if len(chunk) > room:
                self.truncated = True
                chunk = chunk[:room]
            if not chunk:
                return
            self._kept[name] += len(chunk)
            self._pending[name] += chunk
            self._cond.notify_all()

    def _kill_group(self) -> None:
        assert self._proc is not None
        try:
            os.killpg(self._proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass

    # -- callers -----------------------------------------------------------------------
    def _finished(self) -> bool:
        return self._status is not None and self._open == 0

    def _news(self) -> bool:
        return self._finished() or any(self._pending[name] for name in STREAMS)

    def done(self) -> bool:
        with self._cond:
            return self._finished() and not any(self._pending[name] for name in STREAMS)

    def poll(self, wait: float) -> dict:
        """Output since the last poll (base64, at most :data:`POLL_CHUNK` a stream), waiting up
        to ``wait`` seconds for some; ``done`` with ``rc`` once the command ended and all of its
        output was taken."""
        with self._cond:
            self.last_poll = self._clock()
            self._cond.wait_for(self._news, max(0.0, min(wait, MAX_POLL_WAIT)))
            if not self._finished() and all(len(self._pending[n]) < POLL_CHUNK for n in STREAMS):
                self._cond.wait_for(self._finished, LINGER if self._news() else 0)
            taken = {}
            for name in STREAMS:
                buf = self._pending[name]
                taken[name] = bytes(buf[:POLL_CHUNK])
                del buf[:POLL_CHUNK]
            self._cond.notify_all()
            done = self._finished() and not any(self._pending[name] for name in STREAMS)
            return {"stdout": base64.b64encode(taken["stdout"]).decode(),
                    "stderr": base64.b64encode(taken["stderr"]).decode(),
                    "done": done, "rc": self._rc() if done else None,
                    "timed_out": self.timed_out, "truncated": self.truncated}

    def _rc(self) -> int:
        if self.timed_out:
            return -signal.SIGKILL
        assert self._status is not None
        return self._status

    def kill(self) -> None:
        """Kill the command's process group; its output so far stays for the next poll."""
        with self._cond:
            if self._status is not None or self._proc is None:
                return
            self.killed = True
        self._kill_group()

    def drop(self) -> None:
        """Kill the command and stop reading its output (the job is forgotten)."""
        self.kill()
        with self._cond:
            self._stop_reading = True
            self._cond.notify_all()

    def outcome(self) -> Outcome:
        """Wait for the end, taking the output as it comes."""
        out = {name: bytearray() for name in STREAMS}
        with self._cond:
            while True:
                self._cond.wait_for(self._news)
                for name in STREAMS:
                    out[name] += self._pending[name]
                    self._pending[name].clear()
                self._cond.notify_all()
                if self._finished() and not any(self._pending[name] for name in STREAMS):
                    return Outcome(self._rc(), bytes(out["stdout"]), bytes(out["stderr"]),
                                   self.timed_out, self.truncated)


def run(spec: CommandSpec) -> Outcome:
    """Run a command to its end (the limits as for a job)."""
    return Job(spec).outcome()


class JobTable:
    """The background jobs of one caller (the tenant, or the host of an unprotected guest)."""

    def __init__(self, max_jobs: int = MAX_JOBS, idle_limit: float = IDLE_LIMIT, clock=time.monotonic):
        self._max = max_jobs
        self._idle_limit = idle_limit
        self._clock = clock
        self._jobs: dict[int, Job] = {}
        self._ids = itertools.count(1)
        self._lock = threading.Lock()

    def __len__(self) -> int:
        with self._lock:
            return len(self._jobs)

    def start(self, spec: CommandSpec) -> int:
        with self._lock:
            if len(self._jobs) >= self._max:
                now = self._clock()
                for job_id, job in list(self._jobs.items()):
                    if now - job.last_poll >= self._idle_limit:
                        job.drop()
                        del self._jobs[job_id]
            if len(self._jobs) >= self._max:
                raise RuntimeError(f"{self._max} commands are running already; poll them to their end "
                                   "or kill one first")
            job_id = next(self._ids)
            self._jobs[job_id] = Job(spec, self._clock)
            return job_id

    def _get(self, job_id) -> Job:
        with self._lock:
            job = self._jobs.get(job_id) if isinstance(job_id, int) and not isinstance(job_id, bool) else None
        if job is None:
            raise ValueError(f"no job {job_id!r}: it never started, or its end was already reported")
        return job

    def poll(self, job_id, wait: float) -> dict:
        job = self._get(job_id)
        answer = job.poll(wait)
        if answer["done"]:
            with self._lock:
                self._jobs.pop(job_id, None)
        return answer

    def kill(self, job_id) -> dict:
        """Kill the command's process group and forget the job (its output is not wanted)."""
        job = self._get(job_id)
        with self._lock:
            self._jobs.pop(job_id, None)
        job.drop()
        return {"job": job_id, "killed": True}
