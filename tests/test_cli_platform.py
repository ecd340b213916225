"""``qemu-kd ls``'s MEMORY and UPTIME columns, and ``qemu-kd run --platform SOCKET``."""

from __future__ import annotations

import json
import socket
import subprocess
from concurrent.futures import ThreadPoolExecutor

import pytest

import qemu_kd as qemu_kd_api
from leftovers import stop_registered_platforms
from qemu_kd.api import DomainGoneError
from qemu_kd.cli.domains import DomainRef, format_domains, short_duration, short_size
from qemu_kd.cli.outcome import HARNESS_EXIT
from test_cli import qemu_kd

MiB = 1 << 20


def domain(keyid: int, status: dict) -> DomainRef:
    return DomainRef({"pid": 7, "socket": "/run/p7/platform.sock", "accel": "tcg"},
                     {"keyid": keyid, "name": f"kd{keyid}", "state": "LAUNCHED", "running": True,
                      "policy": {"debug": False, "hex": ""}, "endpoints": {}, **status})


def test_ls_table_shows_memory_and_uptime():
    lines = format_domains([domain(1, {"memory": 256 * MiB, "uptime": 65.4}),
                            domain(2, {"memory": 1 << 30, "uptime": 3 * 3600 + 7 * 60 + 9}),
                            domain(3, {})]).splitlines()
    header = lines[0].split()
    memory, uptime = header.index("MEMORY"), header.index("UPTIME")
    assert [line.split()[memory] for line in lines[1:]] == ["256M", "1G", "-"]
    assert [line.split()[uptime] for line in lines[1:]] == ["1m05s", "3h07m", "-"]


def test_short_sizes_and_durations():
    assert [short_size(s) for s in (None, 64 * MiB, 1536 * MiB, 2 << 30, 5000)] == \
        ["-", "64M", "1536M", "2G", "5000B"]
    assert [short_duration(s) for s in (None, 0.4, 59.9, 60, 3599, 3600, 86400 + 7200)] == \
        ["-", "0s", "59s", "1m00s", "59m59s", "1h00m", "1d02h"]


# -- run --platform ------------------------------------------------------------------------------

def one_line_error(res: subprocess.CompletedProcess) -> str:
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("qemu-kd: error: "), res.stderr
    return lines[0]


def test_run_on_no_platform_is_a_one_line_harness_error(tmp_path):
    dead = tmp_path / "dead.sock"        # a socket file nobody listens on
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(dead))
    listener.close()
    for sock, why in ((tmp_path / "none.sock", "no platform serves on"),
                      (dead, "cannot connect to the host port")):
        res = qemu_kd("run", "--platform", str(sock), "--json", "--cmd", "true")
        assert res.returncode == HARNESS_EXIT
        assert why in one_line_error(res) and str(sock) in res.stderr
        assert json.loads(res.stdout)["error"]["message"].startswith(why)
    res = qemu_kd("run", "--plain", "--platform", str(dead), "-q")
    assert res.returncode == HARNESS_EXIT and "--platform" in one_line_error(res)


@pytest.fixture
def daemon(tmp_path, monkeypatch):
    """A platform daemon serving on its own socket, as ``qemu-kd platform serve`` runs it."""
    from qemu_kd.hostport.registry import platform_state_dir
    from qemu_kd.hostport.spawn import start_platform_process, stop_platform_process

    runtime = tmp_path / "rt"
    monkeypatch.setenv("QEMU_KD_RUNTIME", str(runtime))
    runtime.mkdir(mode=0o700)
    proc, sock = start_platform_process(tmp_path / "platform.sock", platform_state_dir(),
                                        accel="tcg", memory_size=1 << 30)
    try:
        yield proc, sock
    finally:
        stop_platform_process(proc)
        stop_registered_platforms(runtime)


def run_on(sock, *argv: str) -> dict:
    res = qemu_kd("run", "--platform", str(sock), "--json", "-q", *argv, timeout=600)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


@pytest.mark.qemu
def test_runs_on_a_running_platform_one_after_another_and_at_once(guest_artifacts, daemon):
    proc, sock = daemon
    for word in ("one", "two"):
        out = run_on(sock, "--cmd", f"echo {word}")
        assert out["exec"]["stdout"] == f"{word}\n" and out["exec"]["rc"] == 0
        assert out["attestation"]["verified"] and out["measurement"] == out["expected_measurement"]
        # No daemon was started: the run's phases begin with the host VMM's layout.
        assert list(out["timings"])[0] == "layout" and "platform start" not in out["timings"]
        assert out["accel"] == "tcg" and str(sock) in out["accel_reason"]
        assert out["endpoints"]["qmp"] is None        # the domain is gone...
        assert proc.poll() is None                     # ...and the platform still serves
    with ThreadPoolExecutor(2) as pool:
        outs = list(pool.map(lambda word: run_on(sock, "--cmd", f"echo {word}"), ("three", "four")))
    assert [o["exec"]["stdout"] for o in outs] == ["three\n", "four\n"]
    assert outs[0]["name"] != outs[1]["name"]
    assert proc.poll() is None
    assert json.loads(qemu_kd("ls", "--json").stdout) == []
    mismatch = qemu_kd("run", "--platform", str(sock), "--accel", "kvm", "-q")
    assert mismatch.returncode == HARNESS_EXIT and "runs tcg, not kvm" in one_line_error(mismatch)


@pytest.mark.qemu
def test_keep_on_a_running_platform_leaves_the_domain_there(guest_artifacts, daemon):
    proc, sock = daemon
    out = run_on(sock, "--keep", "--name", "stays", "--cmd", "true")
    assert out["kept"] == {"platform_pid": proc.pid, "platform_socket": str(sock), "name": "stays"}
    [listed] = json.loads(qemu_kd("ls", "--json").stdout)
    assert (listed["name"], listed["platform"]["pid"]) == ("stays", proc.pid)
    ran = qemu_kd("exec", "stays", "--", "echo", "hello", timeout=300)
    assert (ran.returncode, ran.stdout) == (0, "hello\n"), ran.stderr
    assert qemu_kd("destroy", "stays").returncode == 0
    assert proc.poll() is None                         # the daemon was not ours to end


@pytest.mark.qemu
def test_api_on_a_running_platform_reports_the_launch_and_keeps_the_domain(guest_artifacts, daemon):
    proc, sock = daemon
    heard: list[str] = []
    platform = qemu_kd_api.Platform(socket=sock, progress=heard.append)
    try:
        dom = platform.launch(exposed_register_mask=1)
        assert platform.pid == proc.pid and platform.accel == "tcg" and platform.timings == {}
        assert heard[0] == f"accelerator: tcg (the platform daemon's on {sock})"
        assert heard[1:] == ["layout", "seal", "load", "verify", "launch and boot to agent ready",
                             "attest"]
        assert list(dom.timings) == ["layout", "seal", "load", "verify", "launch",
                                     "kernel to agent ready", "attest"]
        assert dom.host_verification and all(c["ok"] for c in dom.host_verification.values())
        assert len(dom.attestation.nonce) == 32 and dom.attestation.report.measurement == dom.measurement
        assert dom.ready["kernel"] == guest_artifacts.kernel_release
        assert dom.status()["integrity_events"] == 0
        platform.keep(dom)
        with pytest.raises(DomainGoneError, match="handed over"):
            dom.exec("true")
    finally:
        platform.close()
    [listed] = json.loads(qemu_kd("ls", "--json").stdout)
    assert listed["name"] == dom.name and listed["running"] is True
    assert qemu_kd("destroy", dom.name).returncode == 0
    assert proc.poll() is None
