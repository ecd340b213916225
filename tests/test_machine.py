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

from qemu_kd.common.errors import ConfigError, QemuError
from qemu_kd.qemu.machine import DIR_PREFIX, MachineSpec, QemuMachine, sweep_stale_dirs

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
        assert stat.S_IMODE(os.stat(m.dir).st_mode) == 0o700
        assert stat.S_IMODE(os.stat(m.sockdir).st_mode) == 0o700
        assert m.ram_path.stat().st_size == 64 * MiB
        for name in ("qmp", "gdb", "console", "shared", "guestport"):
            assert stat.S_ISSOCK(os.stat(m.socket_path(name)).st_mode)
        assert m.qmp.cmd("query-status")["status"] == "prelaunch"
        # RAM written through the file is what the vCPU sees (via the gdbstub).
        m.write_ram(0x5000, b"qemu-kd!")
        assert m.rsp.read_memory(0x5000, 8) == b"qemu-kd!"
        dirs = (m.dir, m.sockdir)
        pid = m.proc.pid
    finally:
        m.stop()
    assert not any(d.exists() for d in dirs)
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_killed_qemu_gives_clear_error_and_leaves_nothing(tmp_path):
    m = QemuMachine(MachineSpec(mem_size=64 * MiB), console_log=tmp_path / "c.log")
    m.start()
    dirs = (m.dir, m.sockdir)
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
    assert m.dir is None


def test_parent_killed_takes_qemu_down_and_next_start_sweeps(tmp_path):
    script = textwrap.dedent(f"""
        import sys, time
        from qemu_kd.qemu.machine import QemuMachine, MachineSpec
        m = QemuMachine(MachineSpec(mem_size=64 << 20), console_log={str(tmp_path / 'c.log')!r})
        m.start()
        print(m.proc.pid, m.dir, m.sockdir, flush=True)
        time.sleep(60)
    """)
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                             env=os.environ.copy())
    qemu_pid, ram_dir, sock_dir = child.stdout.readline().split()
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
    assert Path(ram_dir).exists()  # nobody could clean up a SIGKILLed process...
    removed = sweep_stale_dirs()  # ...so the next start does
    assert Path(ram_dir) in removed and not Path(ram_dir).exists()
    assert not Path(sock_dir).exists()
    assert Path(ram_dir).name.startswith(DIR_PREFIX)
