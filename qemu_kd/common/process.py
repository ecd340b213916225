"""Child processes that die with their parent, and liveness checks for sweeping.

``die_with_parent()`` is a ``preexec_fn`` for :class:`subprocess.Popen`: the
child gets ``PR_SET_PDEATHSIG`` = SIGKILL, so it is killed when the thread that
forked it ends, however that happens (``kill -9`` included).  Files such
children leave behind are named after their owner's pid and swept once
:func:`pid_alive` says the owner is gone (see :mod:`qemu_kd.common.rundirs`).
"""

from __future__ import annotations

import ctypes
import os
import signal
from typing import Callable

PR_SET_PDEATHSIG = 1


def die_with_parent() -> Callable[[], None]:
    """A ``preexec_fn`` that makes the child receive SIGKILL when its parent dies.

    If the parent is already gone by the time the child has set this up (it
    died between fork and prctl), the child kills itself at once.
    """
    parent = os.getpid()
    # Loaded here, not in the child: after fork only async-signal-safe calls are safe.
    prctl = ctypes.CDLL(None, use_errno=True).prctl

    def preexec() -> None:  # runs in the child between fork and exec
        prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent:
            os.kill(os.getpid(), signal.SIGKILL)

    return preexec


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists and has not ended (it may belong to another user).

    A zombie (ended, not yet reaped: say a killed daemon whose parent is gone and
    whose new parent does not reap) counts as dead.
    """
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return True
    # pid (comm) state ...: comm may contain anything, so the state follows the last ')'.
    return stat[stat.rfind(b")") + 2:stat.rfind(b")") + 3] != b"Z"


def exit_without_teardown(code: int) -> None:
    """End this process with ``code`` now, skipping the interpreter's teardown.

    For a process that has already stopped everything it started and removed what it made
    (the platform daemon, the host VMM process, ``qemu-kd run``): unloading numpy,
    ``cryptography`` and the rest would only keep whoever waits for this process waiting.
    Log handlers and the standard streams are flushed first.
    """
    import logging
    import sys

    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)
