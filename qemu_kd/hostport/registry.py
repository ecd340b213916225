"""Where running platform daemons announce themselves, and how the host finds them.

Each daemon writes ``<runtime>/platforms/<pid>.json`` with its host-port
socket; entries of dead processes are ignored, and removed by
:func:`sweep_stale_entries` (a daemon killed by SIGKILL cannot remove its own).
This is all a host needs to discover a platform: the socket path, never any of
the platform's state.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from qemu_kd.common.process import pid_alive
from qemu_kd.common.paths import runtime_dir, state_dir


def platform_state_dir() -> Path:
    """Where the platform keeps the emulated root CA and its identity."""
    return state_dir() / "platform"


def default_socket() -> Path:
    return runtime_dir() / "platform.sock"


def registry_dir() -> Path:
    path = runtime_dir() / "platforms"
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    return path


def _entry_pid(entry: Path) -> int | None:
    """The pid an entry (``<pid>.json`` or a half-written ``<pid>.tmp``) is named after."""
    return int(entry.stem) if entry.stem.isdigit() else None


def sweep_stale_entries() -> list[Path]:
    """Remove the entries (finished or half-written) of processes that are gone, and the domain
    names they claimed (:mod:`qemu_kd.hostport.names`); those removed."""
    from qemu_kd.hostport.names import sweep_stale_claims

    removed = sweep_stale_claims(registry_dir())
    for entry in sorted(registry_dir().iterdir()):
        pid = _entry_pid(entry)
        if pid is not None and entry.suffix in (".json", ".tmp") and not pid_alive(pid):
            entry.unlink(missing_ok=True)
            removed.append(entry)
    return removed


def running_platforms() -> list[dict]:
    """Registry entries of live platform daemons (stale entries are removed)."""
    found = []
    sweep_stale_entries()
    for entry in sorted(registry_dir().glob("*.json")):
        try:
            info = json.loads(entry.read_text())
            pid = int(info["pid"])
            socket_path = str(info["socket"])
        except (OSError, ValueError, KeyError, TypeError):
            entry.unlink(missing_ok=True)
            continue
        if not pid_alive(pid) or not os.path.exists(socket_path):
            entry.unlink(missing_ok=True)
            continue
        found.append(info)
    return found
