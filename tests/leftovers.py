"""Finding what stopped or killed qemu-kd processes left behind."""

from __future__ import annotations

import os
from pathlib import Path

from qemu_kd.common.process import pid_alive
from qemu_kd.common.paths import runtime_dir
from qemu_kd.common.rundirs import dead_dirs

SHM = Path("/dev/shm")


def orphaned_machine_dirs() -> list[str]:
    """Private directories (machine sockets, platform work directories, run directories, and
    guest RAM directories in /dev/shm of older versions) whose owning processes have all exited.
    Directories of live processes belong to machines that are still running, possibly other
    test runs on the same machine."""
    return sorted(path.name for path in dead_dirs())


def stale_registry_entries() -> list[str]:
    """Platform registry entries of processes that are gone."""
    registry = runtime_dir() / "platforms"
    if not registry.is_dir():
        return []
    return sorted(entry.name for entry in registry.iterdir()
                  if entry.stem.isdigit() and not pid_alive(int(entry.stem)))


def runtime_entries() -> list[str]:
    """Everything in the runtime directory but the (possibly empty) registry directory."""
    root = runtime_dir()
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            rel = os.path.relpath(os.path.join(dirpath, name), root)
            if rel != "platforms":
                found.append(rel)
    return sorted(found)


def files_containing(roots: list[Path], needles: list[bytes]) -> list[str]:
    """Regular files under ``roots`` that contain any of ``needles`` (unreadable ones skipped)."""
    hits = []
    for root in roots:
        for dirpath, _dirnames, filenames in os.walk(root):
            for name in filenames:
                path = os.path.join(dirpath, name)
                try:
                    with open(path, "rb") as f:
                        data = f.read()
                except OSError:
                    continue
                hits += [f"{path}: {needle.decode()}" for needle in needles if needle in data]
    return hits


def stop_registered_platforms(runtime: Path, timeout: float = 20.0) -> list[int]:
    """SIGTERM every live platform daemon registered under ``runtime`` (a test's own runtime
    directory) and wait for it, so a failed test never leaves a kept domain running."""
    import json
    import signal
    import time

    pids = []
    for entry in sorted((Path(runtime) / "platforms").glob("*.json")):
        try:
            pid = int(json.loads(entry.read_text())["pid"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if pid_alive(pid):
            os.kill(pid, signal.SIGTERM)
            pids.append(pid)
    deadline = time.monotonic() + timeout
    for pid in pids:
        while pid_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        if pid_alive(pid):
            os.kill(pid, signal.SIGKILL)
    return pids


def qemu_children() -> list[int]:
    """The pids of QEMU processes this test process started (an in-process platform's)."""
    import subprocess

    out = subprocess.run(["pgrep", "-P", str(os.getpid()), "-f", "qemu-system"], capture_output=True,
                         text=True).stdout
    return sorted(int(pid) for pid in out.split())


def in_process_leftovers() -> tuple:
    """What an in-process platform's domains hold in this process: its QEMU processes, open
    guest-RAM files and QEMU directories (compare before and after)."""
    from qemu_kd.qemu.machine import DIR_KIND

    dirs = sorted(p.name for p in runtime_dir().glob(f"{DIR_KIND}-{os.getpid()}-*"))
    return qemu_children(), kd_ram_files(), dirs


def kd_ram_files() -> int:
    """How many guest-RAM memory files this process holds open."""
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            count += os.readlink(f"/proc/self/fd/{fd}").startswith("/memfd:kd-ram")
        except OSError:
            pass
    return count
