"""The QEMU controller against real QEMU (no guest kernel needed)."""

import os
import signal
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from leftovers import files_containing
from qemu_kd.common.errors import ConfigError, QemuError
from qemu_kd.common.paths import runtime_dir
from qemu_kd.common.rundirs import sweep_dead_dirs
from qemu_kd.qemu.machine import DIR_KIND, MachineSpec, QemuMachine

pytestmark = pytest.mark.qemu
MiB = 1 << 20


def qemu_processes_of(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid), "-f", "qemu-system"], capture_output=True,
                         text=True).stdout
    return [int(x) for x in out.split()]


def test_start_paused_gives_private_sockets_and_ram_then_cleans_up(tmp_path):
    m = QemuMachine(MachineSpec(mem_size=64 * MiB), console_log=tmp_path / "c.log")
    m.start()
    try:
        assert stat.S_IMODE(os.stat(m.sockdir).st_mode) == 0o700
        assert m.sockdir.name.startswith(f"{DIR_KIND}-{os.getpid()}-")
        for name in ("qmp", "qmp-host", "gdb", "console", "shared", "guestport"):
            st = os.stat(m.socket_path(name))
            assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600, name
        for log in (m.console_log, m.stderr_path):
            assert stat.S_IMODE(os.stat(log).st_mode) == 0o600, log
        assert m.qmp.cmd("query-status")["status"] == "prelaunch"
        # RAM written through the platform's mapping is what the vCPU sees (via the gdbstub).
        m.write_ram(0x5000, b"qemu-kd!")
        assert m.rsp.read_memory(0x5000, 8) == b"qemu-kd!"
        # Guest RAM is a memfd, not a file anybody could find (or find left over).
        with open(f"/proc/{m.proc.pid}/maps") as maps:
            ram = [line for line in maps if "kd-ram" in line]
        assert ram and all("/memfd:kd-ram (deleted)" in line for line in ram)
        assert not list(Path("/dev/shm").glob(f"{DIR_KIND}-{os.getpid()}-*"))
        dirs = (m.sockdir,)
        pid = m.proc.pid
    finally:
        m.stop()
    assert not any(d.exists() for d in dirs)
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_killed_qemu_gives_clear_error_and_leaves_nothing(tmp_path):
    m = QemuMachine(MachineSpec(mem_size=64 * MiB), console_log=tmp_path / "c.log")
    m.start()
    dirs = (m.sockdir,)
    os.kill(m.proc.pid, signal.SIGKILL)
    m.proc.wait()
    with pytest.raises(QemuError, match="QEMU exited with status -9"):
        m.check_alive()
    m.stop()
    assert not any(d.exists() for d in dirs)


def test_missing_qemu_binary_is_a_config_error():
    m = QemuMachine(MachineSpec(mem_size=64 * MiB, qemu="qemu-system-nonexistent"))
    with pytest.raises(ConfigError, match="not installed"):
        m.start()


def test_bad_qemu_arguments_report_qemu_stderr(tmp_path):
    m = QemuMachine(MachineSpec(mem_size=64 * MiB, extra_args=["-no-such-option"]),
                    console_log=tmp_path / "c.log")
    with pytest.raises(QemuError, match="no-such-option"):
        m.start()
    assert m.sockdir is None and m.ram_fd is None


def test_parent_killed_takes_qemu_down_and_ram_and_next_start_sweeps(tmp_path):
    script = textwrap.dedent(f"""
        import sys, time
        from qemu_kd.qemu.machine import QemuMachine, MachineSpec
        m = QemuMachine(MachineSpec(mem_size=64 << 20), console_log={str(tmp_path / 'c.log')!r})
        m.start()
        m.write_ram(0x7000, b"kd-canary-" + b"in-guest-ram")
        print(m.proc.pid, m.sockdir, flush=True)
        time.sleep(60)
    """)
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                             env=os.environ.copy())
    qemu_pid, sock_dir = child.stdout.readline().split()
    child.kill()
    child.wait()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.kill(int(qemu_pid), 0)
        except ProcessLookupError:
            break
        time.sleep(0.05)
    else:
        pytest.fail("QEMU outlived its killed parent")
    # The guest RAM died with the two processes that mapped it: no file holds it.
    canary = b"kd-canary-in-guest-ram"
    assert not files_containing([Path("/dev/shm"), runtime_dir()], [canary])
    assert Path(sock_dir).exists()  # nobody could clean up a SIGKILLed process...
    removed = sweep_dead_dirs()  # ...so the next start does
    assert Path(sock_dir) in removed and not Path(sock_dir).exists()
    assert Path(sock_dir).name.startswith(f"{DIR_KIND}-{child.pid}-")
