"""SIGKILL of each qemu-kd process, at several phases: nothing is left, no plaintext survives.

Each test runs ``qemu-kd run`` as a process in a runtime directory of its own,
kills one process (the platform daemon, the host VMM, QEMU or ``run`` itself)
at one phase, then checks that:

* every process of the run has ended (children die with their starter;
  a detached daemon that was never handed its domain stops by itself);
* no file anywhere (``/dev/shm``, the runtime and state directories) holds a
  canary the guest wrote into its RAM, and no file outside the console logs
  holds the guest kernel's banner;
* what a killed process could not remove (registry entry, private
  directories) is removed by ``qemu-kd clean`` or by the next platform start,
  and the runtime directory ends empty.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from leftovers import files_containing, runtime_entries
from qemu_kd.common.paths import state_dir
from qemu_kd.common.process import pid_alive
from qemu_kd.hostport.registry import platform_state_dir
from qemu_kd.hostport.spawn import start_platform_process, stop_platform_process

pytestmark = pytest.mark.qemu

QEMU_KD = str(Path(sys.executable).with_name("qemu-kd"))
BANNER = b"Linux version"
WAIT = 60.0          # seconds a process may take to appear or to end (a hang, not a timing check)


@pytest.fixture
def runtime(monkeypatch, guest_artifacts):
    """A fresh, short runtime directory: each test sees only its own processes and files."""
    path = Path(tempfile.mkdtemp(prefix="kdc-"))
    monkeypatch.setenv("QEMU_KD_RUNTIME", str(path))
    monkeypatch.setenv("QEMU_KD_ACCEL", "tcg")
    yield path
    for pid in our_processes(path):
        os.kill(pid, signal.SIGKILL)
    subprocess.run([QEMU_KD, "clean"], capture_output=True, timeout=WAIT)
    subprocess.run(["rm", "-rf", str(path)])


def our_processes(runtime: Path) -> list[int]:
    """Live processes whose command line names the runtime directory (daemon, host VMM, QEMU)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if str(runtime).encode() in cmdline and pid_alive(int(entry.name)):
            found.append(int(entry.name))
    return found


def process_of(runtime: Path, marker: str) -> int:
    """The pid of our process whose command line contains ``marker``, once it exists."""
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        for pid in our_processes(runtime):
            try:
                if marker.encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
                    return pid
            except OSError:
                continue
        time.sleep(0.05)
    pytest.fail(f"no process with {marker!r} appeared")


def wait_gone(runtime: Path) -> None:
    deadline = time.monotonic() + WAIT
    while our_processes(runtime):
        if time.monotonic() > deadline:
            pytest.fail(f"processes outlived the kill: {our_processes(runtime)}")
        time.sleep(0.05)


def canary_command() -> tuple[str, bytes]:
    """A guest command that fills 2 MiB of guest RAM (a tmpfs file) with a canary, and the canary.

    The guest computes the canary, so it appears on no host command line or file."""
    a, b = secrets.randbelow(1 << 20) + 1000, secrets.randbelow(1 << 20) + 1000
    canary = f"kd-canary-{a * b}".encode()
    return f"yes kd-canary-$(({a}*{b})) | head -c 2097152 > /tmp/canary", canary


class Run:
    """``qemu-kd run`` as a process; its progress lines read as they come."""

    def __init__(self, *args: str, cmd: str = "true"):
        self.proc = subprocess.Popen([QEMU_KD, "run", "--json", "--timeout", "60", "--cmd", cmd, *args],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.progress: list[str] = []

    def wait_for(self, phase: str) -> None:
        for line in self.proc.stderr:
            self.progress.append(line.rstrip())
            if line.startswith(f"[qemu-kd] {phase}"):
                return
        pytest.fail(f"run ended before phase {phase!r}: {self.progress}")

    def finish(self) -> tuple[int, dict | None, str]:
        out, err = self.proc.communicate(timeout=300)
        err = "\n".join(self.progress) + "\n" + err
        return self.proc.returncode, json.loads(out) if out.strip() else None, err


def wait_console_output(platform_pid: int) -> None:
    """Until the guest kernel has printed on its console: the guest is booting."""
    deadline = time.monotonic() + WAIT
    logs = state_dir() / "logs"
    while time.monotonic() < deadline:
        if any(log.stat().st_size for log in logs.glob(f"kd*-{platform_pid}-*.log")):
            return
        time.sleep(0.05)
    pytest.fail("the guest printed nothing on its console")


def assert_no_plaintext(canary: bytes | None = None) -> None:
    """No file holds guest RAM: the canary nowhere, the kernel banner only in console logs."""
    state = state_dir()
    roots = [Path("/dev/shm"), Path(os.environ["QEMU_KD_RUNTIME"]), state]
    if canary is not None:
        assert files_containing(roots, [canary]) == []
    not_console = [p for p in files_containing([Path(os.environ["QEMU_KD_RUNTIME"]), state], [BANNER])
                   if not p.startswith(str(state / "logs"))]
    assert not_console == []


def assert_runtime_empty(runtime: Path) -> None:
    assert runtime_entries() == [], runtime


def clean() -> list[str]:
    out = subprocess.run([QEMU_KD, "clean", "--json"], capture_output=True, text=True, timeout=WAIT)
    assert out.returncode == 0 and "Traceback" not in out.stderr, out.stderr
    return json.loads(out.stdout)["removed"]


def test_platform_killed_under_a_kept_domain_leaves_no_plaintext(runtime):
    """The reported case: kill -9 of the platform daemon of `run --keep`."""
    cmd, canary = canary_command()
    rc, out, err = Run("--keep", cmd=cmd).finish()
    assert rc == 0, err
    daemon = out["kept"]["platform_pid"]
    qemu = process_of(runtime, "qemu-system")
    # File modes: QEMU's and the proxies' sockets, the console log and platform.log are the user's only.
    (machine_dir,) = runtime.glob(f"qemu-kd-{daemon}-*")
    for sock in ("qmp", "qmp-host", "gdb", "console", "shared", "guestport", "kd-qmp", "kd-gdb"):
        assert stat.S_IMODE((machine_dir / f"{sock}.sock").stat().st_mode) == 0o600, sock
    assert stat.S_IMODE(Path(out["console_log"]).stat().st_mode) == 0o600
    (run_dir,) = runtime.glob("run-*")
    assert stat.S_IMODE((run_dir / "platform.log").stat().st_mode) == 0o600
    # Guest RAM is no file: QEMU maps a memfd.
    maps = Path(f"/proc/{qemu}/maps").read_text()
    assert "/memfd:kd-ram (deleted)" in maps and "/dev/shm" not in maps

    os.kill(daemon, signal.SIGKILL)
    wait_gone(runtime)                      # QEMU died with the daemon
    assert_no_plaintext(canary)
    assert (runtime / "platforms" / f"{daemon}.json").exists()
    removed = clean()
    assert str(runtime / "platforms" / f"{daemon}.json") in removed
    assert str(run_dir) in removed and str(machine_dir) in removed
    assert any(Path(p).name.startswith(f"platform-{daemon}-") for p in removed)
    assert_runtime_empty(runtime)
    assert clean() == []
    ls = subprocess.run([QEMU_KD, "ls"], capture_output=True, text=True, timeout=WAIT)
    assert ls.returncode == 0 and "Traceback" not in ls.stderr


def test_qemu_killed_under_a_kept_domain_ends_the_platform_cleanly(runtime):
    cmd, canary = canary_command()
    rc, out, err = Run("--keep", cmd=cmd).finish()
    assert rc == 0, err
    os.kill(process_of(runtime, "qemu-system"), signal.SIGKILL)
    wait_gone(runtime)                      # the idle daemon destroyed the dead domain and ended
    assert_no_plaintext(canary)
    assert_runtime_empty(runtime)           # it removed all of its own files


def test_run_killed_during_boot_takes_everything_down_and_next_start_sweeps(runtime):
    run = Run()
    run.wait_for("launch and boot to agent ready")
    daemon = process_of(runtime, "qemu_kd.platform.daemon")
    process_of(runtime, "qemu-system")
    wait_console_output(daemon)
    run.proc.kill()
    run.proc.wait()
    wait_gone(runtime)                      # daemon, host VMM and QEMU died with it
    assert_no_plaintext()
    assert runtime_entries() != []          # a SIGKILLed process cannot clean up...
    proc, _sock = start_platform_process(runtime / "next.sock", platform_state_dir(), accel="tcg",
                                         memory_size=64 << 20, log_path=runtime / "next.log")
    stop_platform_process(proc)             # ...the next platform start sweeps it
    (runtime / "next.log").unlink()
    assert_runtime_empty(runtime)


@pytest.mark.parametrize("phase", ["load", "launch and boot to agent ready"])
def test_run_killed_before_handing_over_a_kept_domain_stops_the_detached_platform(runtime, phase):
    run = Run("--keep")
    run.wait_for(phase)
    daemon = process_of(runtime, "qemu_kd.platform.daemon")
    if phase.startswith("launch"):
        process_of(runtime, "qemu-system")
        wait_console_output(daemon)
    run.proc.kill()
    run.proc.wait()
    wait_gone(runtime)                      # never handed its domain: it stopped by itself
    assert_no_plaintext()
    assert_runtime_empty(runtime)


@pytest.mark.parametrize("victim", ["host_vmm", "qemu-system"])
def test_a_child_killed_during_boot_fails_the_run_cleanly(runtime, victim):
    """The host VMM or QEMU dies while the guest boots: the run fails with one line, and
    everything goes with it."""
    run = Run()
    run.wait_for("launch and boot to agent ready")
    pid = process_of(runtime, victim)
    wait_console_output(process_of(runtime, "qemu_kd.platform.daemon"))
    os.kill(pid, signal.SIGKILL)
    rc, _out, err = run.finish()
    assert rc != 0 and "Traceback" not in err and "qemu-kd: error:" in err
    wait_gone(runtime)
    assert_no_plaintext()
    assert_runtime_empty(runtime)


def test_platform_killed_during_the_command_fails_the_run_and_clean_sweeps(runtime):
    cmd, canary = canary_command()
    run = Run(cmd=cmd + "; sleep 30")
    run.wait_for("command")
    os.kill(process_of(runtime, "qemu_kd.platform.daemon"), signal.SIGKILL)
    rc, _out, err = run.finish()
    assert rc != 0 and "Traceback" not in err and "qemu-kd: error:" in err
    wait_gone(runtime)
    assert_no_plaintext(canary)
    assert clean() != []
    assert_runtime_empty(runtime)


@pytest.mark.parametrize("keep", [False, True])
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_run_interrupted_while_its_platform_starts_stops_it_and_leaves_nothing(runtime, sig, keep):
    """Ctrl-C or SIGTERM while the daemon and the host VMM start (run does not wait for them
    there: it reads and measures the guest meanwhile): one line, exit 130, and neither process,
    nor a run directory, registry entry or socket is left."""
    run = Run(*(["--keep"] if keep else []))
    run.wait_for("platform start")
    process_of(runtime, "qemu_kd.platform.daemon")
    run.proc.send_signal(sig)
    rc, out, err = run.finish()
    assert rc == 130 and "Traceback" not in err, err
    assert out is not None and list(out) == ["error"]
    wait_gone(runtime)
    assert_runtime_empty(runtime)
