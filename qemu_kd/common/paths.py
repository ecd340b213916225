"""Where qemu-kd keeps its cache, persistent state and runtime files.

Overridable through environment variables so tests and CI can isolate
themselves: ``QEMU_KD_CACHE``, ``QEMU_KD_STATE``, ``QEMU_KD_RUNTIME``.
"""

from __future__ import annotations

import os
from pathlib import Path


def _base(env: str, xdg: str, default: str) -> Path:
    if os.environ.get(env):
        return Path(os.environ[env])
    root = os.environ.get(xdg)
    return Path(root) / "qemu-kd" if root else Path.home() / default / "qemu-kd"


def cache_dir() -> Path:
    """Per-user cache: downloaded packages, the built guest kernel and image."""
    return _base("QEMU_KD_CACHE", "XDG_CACHE_HOME", ".cache")


def state_dir() -> Path:
    """Per-installation state: the emulated manufacturer root CA, platform keys."""
    return _base("QEMU_KD_STATE", "XDG_STATE_HOME", ".local/state")


def runtime_dir() -> Path:
    """Sockets and guest RAM files of running machines (private, mode 0700)."""
    if os.environ.get("QEMU_KD_RUNTIME"):
        path = Path(os.environ["QEMU_KD_RUNTIME"])
    elif os.environ.get("XDG_RUNTIME_DIR"):
        path = Path(os.environ["XDG_RUNTIME_DIR"]) / "qemu-kd"
    else:
        path = Path("/tmp") / f"qemu-kd-{os.getuid()}"
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    return path
