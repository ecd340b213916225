"""Starting and stopping a platform daemon as a child process.

The daemon (``qemu-kd platform serve``) prints ``ready <socket>`` on stdout once
its host port serves; everything else goes to its log.  This module knows
only that contract, not the platform's internals.
"""

from __future__ import annotations

import select
import signal
import subprocess
import sys
import time
from pathlib import Path

from qemu_kd.common.errors import ConfigError

READY_PREFIX = "ready "
DAEMON_MODULE = "qemu_kd.platform.daemon"


def start_platform_process(socket_path: Path, pstate: Path, *, accel: str = "tcg",
                           memory_size: int = 1 << 30, exit_when_idle: bool = False,
                           detach: bool = False, timeout: float = 60.0,
                           log_path: Path | None = None, remove_dir: Path | None = None) -> tuple[subprocess.Popen, Path]:
    """Start ``qemu-kd platform serve`` as a child process; returns (process, socket) once it serves.

    ``detach`` puts it in its own session (it outlives the caller's terminal).
    Its stderr goes to ``log_path`` (default: ``platform.log`` beside the socket).
    """
    socket_path = Path(socket_path)
    log_path = Path(log_path) if log_path else socket_path.with_name("platform.log")
    argv = [sys.executable, "-m", DAEMON_MODULE, "--socket", str(socket_path), "--state", str(pstate),
            "--memory", f"{memory_size}B", "--accel", accel]
    if exit_when_idle:
        argv.append("--exit-when-idle")
    if remove_dir is not None:
        argv += ["--remove-dir", str(remove_dir)]
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=log,
                                start_new_session=detach)
    deadline = time.monotonic() + timeout
    line = b""
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([proc.stdout], [], [], 0.2)
            if ready:
                line = proc.stdout.readline()
                break
            if proc.poll() is not None:
                break
    finally:
        proc.stdout.close()
    text = line.decode(errors="replace").strip()
    if not text.startswith(READY_PREFIX):
        stop_platform_process(proc)
        try:
            lines = log_path.read_text(errors="replace").strip().splitlines()
        except OSError:
            lines = []
        why = lines[-1] if lines else "no message"
        raise ConfigError(f"the platform daemon did not start: {why}", f"see {log_path}")
    return proc, Path(text[len(READY_PREFIX):])


def stop_platform_process(proc: subprocess.Popen, timeout: float = 20.0) -> None:
    """SIGTERM (the daemon destroys its domains and cleans up), then SIGKILL if it hangs."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


