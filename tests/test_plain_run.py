"""Firmware-less boot of the real default guest, end to end (QEMU, TCG or KVM)."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
from leftovers import orphaned_machine_dirs

from qemu_kd.channel.console import Console
from qemu_kd.qemu.launch import PhaseTimer, boot_plain, full_cmdline
from qemu_kd.qemu.machine import MachineSpec

pytestmark = pytest.mark.qemu
MiB = 1 << 20


def qemu_kd(*args, timeout=300, env=None):
    return subprocess.run([sys.executable, "-m", "qemu_kd.cli.main", *args], capture_output=True,
                          text=True, timeout=timeout, env=env or os.environ.copy())


def leftovers() -> list[str]:
    return orphaned_machine_dirs()


def our_qemus() -> list[str]:
    out = subprocess.run(["pgrep", "-f", "qemu-system-x86_64 -name plain"], capture_output=True,
                         text=True).stdout
    return out.split()


@pytest.fixture(scope="module")
def guest(guest_artifacts, tmp_path_factory):
    log = tmp_path_factory.mktemp("console") / "console.log"
    spec = MachineSpec(mem_size=256 * MiB, accel="tcg", name="test-plain")
    g = boot_plain(guest_artifacts.kernel.read_bytes(), guest_artifacts.initrd.read_bytes(),
                   full_cmdline(), spec, PhaseTimer(), console_log=log)
    yield g
    g.shutdown()


def test_agent_ready_reports_guest_kernel(guest, guest_artifacts):
    ready = guest.agent.ready
    assert ready["kernel"] == guest_artifacts.kernel_release
    assert guest.agent.ping()


def test_exec_runs_inside_the_guest(guest):
    res = guest.agent.exec(["/bin/sh", "-c", "cat /proc/cmdline; hostname; id -u"])
    assert res["rc"] == 0
    cmdline, hostname, uid = res["stdout"].splitlines()
    assert "tsc_early_khz=" in cmdline and hostname == "qemu-kd-guest" and uid == "0"


def test_guest_python_has_cryptography(guest):
    res = guest.agent.exec(["python3", "-c",
                            "from cryptography.hazmat.primitives.ciphers.aead import AESGCM;"
                            "print(len(AESGCM(bytes(32)).encrypt(bytes(12), b'x', None)))"])
    assert (res["rc"], res["stdout"].strip()) == (0, "17")


def test_guest_sees_the_firmwareless_memory_map(guest):
    res = guest.agent.exec(["/bin/sh", "-c", "cat /proc/iomem | grep -i 'system ram'"])
    assert "00100000-" in res["stdout"]
    meminfo = guest.agent.exec(["/bin/sh", "-c", "head -1 /proc/meminfo"])["stdout"]
    total_kib = int(re.search(r"(\d+)", meminfo).group(1))
    assert 200 * 1024 < total_kib <= 256 * 1024


def test_console_shell_and_log(guest):
    with Console(guest.machine.socket_path("console"), guest.machine.console_log) as con:
        con.sendline("")
        out = con.run("echo console-$((40+2))")
        assert "console-42" in out
    assert "Linux version" in guest.machine.console_log.read_text(errors="replace") or \
        guest.machine.console_log.stat().st_size > 0


def test_malformed_agent_input_does_not_stop_agent(guest):
    guest.agent.sock.sendall(b"{{{ not json\n\xff\xfe\n")
    assert guest.agent.ping()


def test_cli_run_plain_json(guest_artifacts):
    res = qemu_kd("run", "--plain", "--json", "-q", "--cmd", "uname -r")
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert out["mode"] == "plain"
    assert out["accel"] in ("tcg", "kvm")
    assert out["exec"]["rc"] == 0
    assert out["exec"]["stdout"].strip() == guest_artifacts.kernel_release
    for phase in ("qemu start", "layout", "vcpu load", "kernel to agent ready", "command",
                  "shutdown"):
        assert out["timings"][phase] >= 0
    assert out["boot_to_ready_s"] > 0
    # The guest's own clock at ready: the kernel had booted by then, and no later than the host saw it.
    assert 0 < out["guest_uptime_at_ready_s"] <= out["timings"]["kernel to agent ready"] + 1
    assert not leftovers()


def test_killing_qemu_mid_boot_gives_clear_error_and_no_leftovers(guest_artifacts):
    proc = subprocess.Popen([sys.executable, "-m", "qemu_kd.cli.main", "run", "--plain", "-q"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    pids = []
    while not pids and time.monotonic() < deadline:
        pids = our_qemus()
        time.sleep(0.1)
    assert pids, "QEMU never started"
    time.sleep(0.5)
    for pid in pids:
        os.kill(int(pid), signal.SIGKILL)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode not in (0, None)
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("qemu-kd: error:")]
    assert lines and re.search(r"QEMU exited|channel closed", lines[0])
    assert not our_qemus() and not leftovers()


def test_guest_never_ready_times_out_with_console_tail(guest_artifacts):
    res = qemu_kd("run", "--plain", "-q", "--timeout", "1")
    assert res.returncode == 125     # qemu-kd's own failure, not the guest command's
    assert "Traceback" not in res.stderr
    assert res.stderr.startswith("qemu-kd: error: guest agent did not answer with 'ready' in time")
    assert "console" in res.stderr
    assert not our_qemus() and not leftovers()


def test_missing_kernel_is_a_clear_error(tmp_path):
    res = qemu_kd("run", "--plain", "-q", "--kernel", str(tmp_path / "nope"),
                  "--initrd", str(tmp_path / "nope.img"))
    assert res.returncode == 125
    assert res.stderr.strip().splitlines()[0].startswith("qemu-kd: error: kernel")
    assert "does not exist" in res.stderr and "Traceback" not in res.stderr


def test_qemu_not_installed_is_a_clear_error(guest_artifacts):
    env = os.environ.copy()
    env["QEMU_KD_QEMU"] = "qemu-system-x86_64-not-installed"
    env["QEMU_KD_ACCEL"] = "tcg"
    res = qemu_kd("run", "--plain", "-q", env=env)
    assert res.returncode == 125
    assert "not installed" in res.stderr and "apt-get install qemu-system-x86" in res.stderr
    assert "Traceback" not in res.stderr
