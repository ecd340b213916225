"""Per-process private directories in the runtime directory, and sweeping dead ones.

Every directory a qemu-kd process makes in the runtime directory is named
``<kind>-<pid>-<random>`` (mode 0700), where ``pid`` is the process that owns
it:

============  ==================================================================
``run``       ``qemu-kd run``: the host-port and host-VMM sockets, the sealed
              image, ``platform.log``
``platform``  a platform daemon's work directory (DRAM, audit logs)
``qemu-kd``   one QEMU machine's sockets and stderr log (owned by the process
              that started QEMU, the platform daemon)
============  ==================================================================

A process can take over another's directory by writing its pid into the
``owner`` file inside (the detached platform daemon of ``qemu-kd run --keep``
takes the run directory).  A directory is swept only once every pid it names
is dead: a killed process cannot remove its own files, so the next start of a
platform or a run, and ``qemu-kd clean``, remove them.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import tempfile
from pathlib import Path

from qemu_kd.common.files import write_file_atomic
from qemu_kd.common.paths import runtime_dir
from qemu_kd.common.process import pid_alive

KINDS = ("run", "platform", "qemu-kd")
OWNER_FILE = "owner"
# Guest RAM files of older versions lived in /dev/shm/qemu-kd-<pid>-*; swept as well.
LEGACY_SHM_ROOT = Path("/dev/shm")
_NAME = re.compile(r"^(?P<kind>run|platform|qemu-kd)-(?P<pid>\d+)-[^/]+$")


def make_private_dir(kind: str) -> Path:
    """A fresh ``<runtime>/<kind>-<pid>-<random>`` of this process (mode 0700)."""
    if kind not in KINDS:
        raise ValueError(f"unknown private directory kind {kind!r}")
    return Path(tempfile.mkdtemp(prefix=f"{kind}-{os.getpid()}-", dir=runtime_dir()))


def take_over(path: Path | str, pid: int | None = None) -> None:
    """Record ``pid`` (default: this process) as the directory's owner too."""
    pid = os.getpid() if pid is None else pid
    write_file_atomic(Path(path) / OWNER_FILE, f"{pid}\n".encode(), mode=0o600)


def owner_pids(path: Path) -> list[int]:
    """The pids a private directory belongs to (empty if its name is not one of ours)."""
    match = _NAME.match(path.name)
    if not match:
        return []
    pids = [int(match["pid"])]
    try:
        pids.append(int((path / OWNER_FILE).read_text().strip()))
    except (OSError, ValueError):
        pass
    return pids


def dead_dirs() -> list[Path]:
    """Private directories whose owners are all dead."""
    found = []
    for root in (runtime_dir(), LEGACY_SHM_ROOT):
        try:
            entries = sorted(root.iterdir())
        except OSError:
            continue
        for entry in entries:
            if root == LEGACY_SHM_ROOT and not entry.name.startswith("qemu-kd-"):
                continue
            pids = owner_pids(entry)
            if not pids:
                continue
            try:
                st = entry.lstat()
            except OSError:
                continue
            if stat.S_ISDIR(st.st_mode) and st.st_uid == os.getuid() \
                    and not any(pid_alive(pid) for pid in pids):
                found.append(entry)
    return found


def sweep_dead_dirs() -> list[Path]:
    """Remove the private directories of dead processes; the ones removed."""
    removed = []
    for path in dead_dirs():
        shutil.rmtree(path, ignore_errors=True)
        if not path.exists():
            removed.append(path)
    return removed
