"""Private per-process directories and registry entries: only those of dead processes are swept."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from qemu_kd.cli.clean import sweep_leftovers
from qemu_kd.common.paths import runtime_dir
from qemu_kd.common.process import pid_alive
from qemu_kd.common.rundirs import dead_dirs, make_private_dir, owner_pids, sweep_dead_dirs, take_over
from qemu_kd.hostport.registry import registry_dir, sweep_stale_entries


@pytest.fixture
def runtime(tmp_path, monkeypatch):
    monkeypatch.setenv("QEMU_KD_RUNTIME", str(tmp_path / "rt"))
    return runtime_dir()     # created, mode 0700


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_private_dirs_carry_their_owner_and_only_dead_ones_are_swept(runtime):
    mine = make_private_dir("run")
    assert mine.parent == runtime and mine.name.startswith(f"run-{os.getpid()}-")
    assert oct(mine.stat().st_mode & 0o777) == "0o700"
    gone = dead_pid()
    stale = runtime / f"platform-{gone}-abc"
    stale.mkdir()
    (stale / "audit.log").write_text("x")
    other = runtime / "someone-elses-dir"          # not one of our names: never touched
    other.mkdir()
    assert dead_dirs() == [stale]
    assert sweep_dead_dirs() == [stale]
    assert mine.exists() and other.exists() and not stale.exists()


def test_a_directory_taken_over_lives_while_either_owner_lives(runtime):
    gone = dead_pid()
    handed = runtime / f"run-{gone}-xyz"            # its maker is dead...
    handed.mkdir()
    take_over(handed)                               # ...but this process took it over
    assert owner_pids(handed) == [gone, os.getpid()]
    assert sweep_dead_dirs() == [] and handed.exists()
    take_over(handed, dead_pid())                   # the taker died too
    assert sweep_dead_dirs() == [handed]


def test_registry_entries_of_dead_daemons_are_swept(runtime):
    gone = dead_pid()
    registry = registry_dir()
    (registry / f"{gone}.json").write_text(json.dumps({"pid": gone, "socket": "/nowhere"}))
    (registry / f"{gone}.tmp").write_text("{")      # killed while writing its entry
    live = registry / f"{os.getpid()}.json"
    live.write_text(json.dumps({"pid": os.getpid(), "socket": "/nowhere"}))
    assert sorted(sweep_stale_entries()) == [registry / f"{gone}.json", registry / f"{gone}.tmp"]
    assert live.exists()


def test_clean_sweeps_a_dead_default_socket_but_not_a_live_one(runtime):
    make_private_dir("run")
    dead = socket.socket(socket.AF_UNIX)
    dead.bind(str(runtime / "platform.sock"))       # bound, then its process "died"
    dead.close()
    assert sweep_leftovers() == [runtime / "platform.sock"]
    live = socket.socket(socket.AF_UNIX)
    live.bind(str(runtime / "platform.sock"))
    live.listen()
    try:
        assert sweep_leftovers() == [] and (runtime / "platform.sock").exists()
    finally:
        live.close()


def test_clean_command_reports_what_it_removed(runtime):
    stale = runtime / f"qemu-kd-{dead_pid()}-abc"
    stale.mkdir()
    qemu_kd = str(Path(sys.executable).with_name("qemu-kd"))
    out = subprocess.run([qemu_kd, "clean"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and str(stale) in out.stdout and "removed 1 leftover " in out.stdout
    out = subprocess.run([qemu_kd, "clean", "--json"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and json.loads(out.stdout) == {"removed": []}
    out = subprocess.run([qemu_kd, "clean"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.startswith("nothing to clean")


def test_children_die_with_their_parent(tmp_path):
    """die_with_parent: a grandchild started with it dies when its parent is SIGKILLed."""
    script = ("import subprocess, sys, time\n"
              "from qemu_kd.common.process import die_with_parent\n"
              "child = subprocess.Popen(['sleep', '300'], preexec_fn=die_with_parent())\n"
              "print(child.pid, flush=True)\n"
              "time.sleep(300)\n")
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    child = int(parent.stdout.readline())
    assert pid_alive(child)
    parent.kill()
    parent.wait()
    deadline = time.monotonic() + 30
    while pid_alive(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not pid_alive(child)


def test_platform_daemon_refuses_a_directory_it_cannot_take_over(runtime, tmp_path):
    run = subprocess.run([sys.executable, "-m", "qemu_kd.platform.daemon", "--socket", str(tmp_path / "s.sock"),
                          "--state", str(tmp_path / "st"), "--accel", "tcg",
                          "--remove-dir", str(tmp_path / "missing")],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert "cannot take over the directory" in run.stderr
