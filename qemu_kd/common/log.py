"""One logging set-up for every qemu-kd process.

Modules log through ``logging.getLogger(__name__)``; a process's entry point
calls :func:`configure` once.  Records go to stderr (the platform daemon's
stderr is its log file; stdout stays free for machine-readable lines such as
``ready <socket>``).  The level comes from ``QEMU_KD_LOG_LEVEL`` (a level name
such as ``DEBUG`` or ``info``, or a number), else the caller's default:
WARNING for CLI commands, INFO for the platform daemon.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import TextIO

ENV_VAR = "QEMU_KD_LOG_LEVEL"
FORMAT = "%(asctime)s %(name)s %(levelname)s: %(message)s"
# qemu.qmp reports every connection hiccup itself; the proxies report what matters.
QUIET_LIBRARIES = ("qemu.qmp",)

_handler: logging.Handler | None = None


def _level_from(text: str | None, default: int) -> int:
    if not text or not text.strip():
        return default
    text = text.strip()
    if text.isdigit():
        return int(text)
    level = logging.getLevelName(text.upper())
    return level if isinstance(level, int) else default


def configure(default_level: int | str = logging.WARNING, *,
              stream: TextIO | None = None) -> int:
    """Configure logging for this process; returns the level in effect.

    Calling it again replaces the handler it installed before (nothing is logged
    twice).  An unknown ``QEMU_KD_LOG_LEVEL`` falls back to ``default_level``.
    """
    global _handler
    default = default_level if isinstance(default_level, int) \
        else _level_from(default_level, logging.WARNING)
    level = _level_from(os.environ.get(ENV_VAR), default)
    root = logging.getLogger()
    if _handler is not None:
        root.removeHandler(_handler)
    _handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    _handler.setFormatter(logging.Formatter(FORMAT))
    root.addHandler(_handler)
    root.setLevel(level)
    for name in QUIET_LIBRARIES:
        logging.getLogger(name).setLevel(max(level, logging.WARNING))
    return level
