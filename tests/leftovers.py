"""Finding files a stopped machine left behind."""

from __future__ import annotations

from pathlib import Path

from qemu_kd.common.process import pid_alive
from qemu_kd.common.paths import runtime_dir


def orphaned_machine_dirs() -> list[str]:
    """Machine directories (guest RAM in /dev/shm, sockets in the runtime directory) whose
    owning process has exited.  Directories of live processes belong to machines that are
    still running, possibly other test runs on the same machine."""
    left = []
    for root in (Path("/dev/shm"), runtime_dir()):
        for path in root.glob("qemu-kd-*"):
            owner = path.name.split("-")[2] if path.name.count("-") >= 3 else ""
            if owner.isdigit() and not pid_alive(int(owner)):
                left.append(path.name)
    return sorted(left)
