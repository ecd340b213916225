"""Starting and stopping a platform daemon as a child process.

The daemon (``qemu-kd platform serve``) prints ``ready <socket>`` on stdout once
its host port serves; everything else goes to its log (``platform.log``, mode
0600).  This module knows only that contract, not the platform's internals.

A daemon started by this module never outlives its starter by accident:

* an attached one gets ``PR_SET_PDEATHSIG`` and is killed with the thread that
  started it;
* a detached one (``detach=True``, its own session, for ``qemu-kd run --keep``)
  watches its stdin, a pipe from the starter: it stops by itself when the pipe
  ends before :func:`hand_over_platform` wrote ``keep`` into it, so only a
  daemon that was handed a domain keeps running.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from qemu_kd.common.errors import ConfigError
from qemu_kd.common.process import die_with_parent

READY_PREFIX = "ready "
KEEP_LINE = "keep"
DAEMON_MODULE = "qemu_kd.platform.daemon"
LOG_MODE = 0o600


def start_platform_process(socket_path: Path, pstate: Path, *, accel: str = "tcg",
                           memory_size: int = 1 << 30, exit_when_idle: bool = False,
                           detach: bool = False, timeout: float = 60.0,
                           log_path: Path | None = None, remove_dir: Path | None = None) -> tuple[subprocess.Popen, Path]:
    """Start ``qemu-kd platform serve`` as a child process; returns (process, socket) once it serves.

    ``detach`` puts it in its own session (it outlives the caller's terminal) and
    ties it to the caller until :func:`hand_over_platform`; otherwise it dies with
    the calling thread.  Its stderr goes to ``log_path`` (default: ``platform.log``
    beside the socket, mode 0600).
    """
    starting = spawn_platform_process(socket_path, pstate, accel=accel, memory_size=memory_size,
                                      exit_when_idle=exit_when_idle, detach=detach,
                                      log_path=log_path, remove_dir=remove_dir)
    return starting.proc, starting.wait_ready(timeout)


def spawn_platform_process(socket_path: Path, pstate: Path, *, accel: str = "tcg",
                           memory_size: int = 1 << 30, exit_when_idle: bool = False,
                           detach: bool = False, log_path: Path | None = None,
                           remove_dir: Path | None = None) -> "StartingPlatform":
    """Start the daemon as :func:`start_platform_process` does, without waiting for it to serve:
    the caller does other work while it starts, then calls :meth:`StartingPlatform.wait_ready`."""
    socket_path = Path(socket_path)
    log_path = Path(log_path) if log_path else socket_path.with_name("platform.log")
    argv = [sys.executable, "-m", DAEMON_MODULE, "--socket", str(socket_path), "--state", str(pstate),
            "--memory", f"{memory_size}B", "--accel", accel]
    if exit_when_idle:
        argv.append("--exit-when-idle")
    if remove_dir is not None:
        argv += ["--remove-dir", str(remove_dir)]
    if detach:
        argv.append("--stdin-lifeline")
    fd = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, LOG_MODE)
    with os.fdopen(fd, "ab") as log:
        os.fchmod(fd, LOG_MODE)
        proc = subprocess.Popen(argv, stdin=subprocess.PIPE if detach else subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=log, start_new_session=detach,
                                preexec_fn=None if detach else die_with_parent())
    return StartingPlatform(proc, log_path)


@dataclass
class StartingPlatform:
    """A daemon process :func:`spawn_platform_process` started, which may not serve yet."""

    proc: subprocess.Popen
    log_path: Path

    def wait_ready(self, timeout: float = 60.0) -> Path:
        """The socket the daemon serves, once it serves.  If it ends, or says nothing for
        ``timeout`` seconds, it is stopped and the last line of its log becomes a one-line
        ConfigError."""
        deadline = time.monotonic() + timeout
        line = b""
        try:
            while time.monotonic() < deadline:
                ready, _, _ = select.select([self.proc.stdout], [], [], 0.2)
                if ready:
                    line = self.proc.stdout.readline()
                    break
                if self.proc.poll() is not None:
                    break
        finally:
            self.proc.stdout.close()
        text = line.decode(errors="replace").strip()
        if not text.startswith(READY_PREFIX):
            stop_platform_process(self.proc)
            try:
                lines = self.log_path.read_text(errors="replace").strip().splitlines()
            except OSError:
                lines = []
            why = lines[-1] if lines else "no message"
            raise ConfigError(f"the platform daemon did not start: {why}", f"see {self.log_path}")
        return Path(text[len(READY_PREFIX):])


def hand_over_platform(proc: subprocess.Popen) -> None:
    """Let a detached daemon outlive this process (it keeps the domains it serves)."""
    if proc.stdin is None:
        raise ValueError("only a detached platform daemon can be handed over")
    stdin, proc.stdin = proc.stdin, None
    try:
        stdin.write(f"{KEEP_LINE}\n".encode())
        stdin.flush()
    except OSError:
        pass   # it has ended already: nothing left to keep
    finally:
        try:
            stdin.close()
        except OSError:
            pass


def stop_platform_process(proc: subprocess.Popen, timeout: float = 20.0) -> None:
    """SIGTERM (the daemon destroys its domains and cleans up), then SIGKILL if it hangs."""
    if proc.stdin is not None:
        proc.stdin.close()
        proc.stdin = None
    if proc.stdout is not None and not proc.stdout.closed:   # stopped before it was waited for
        proc.stdout.close()
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


