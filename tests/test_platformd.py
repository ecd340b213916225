"""The platform daemon as a process: ready line, registry, one platform per socket, clean stop."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest

from qemu_kd.common.errors import ConfigError
from qemu_kd.hostport.client import HostPortClient
from qemu_kd.formats.certs import verify_chain
from qemu_kd.hostport.registry import registry_dir, running_platforms
from qemu_kd.hostport.spawn import start_platform_process, stop_platform_process


@pytest.fixture
def runtime(tmp_path, monkeypatch):
    path = tmp_path / "rt"
    monkeypatch.setenv("QEMU_KD_RUNTIME", str(path))
    return path


def test_daemon_serves_registers_and_cleans_up(runtime, tmp_path):
    from cryptography import x509

    pstate = tmp_path / "pstate"
    proc, sock = start_platform_process(tmp_path / "p.sock", pstate, accel="tcg", memory_size=64 << 20)
    try:
        assert sock == tmp_path / "p.sock" and oct(sock.stat().st_mode & 0o777) == "0o600"
        (entry,) = running_platforms()
        assert entry["pid"] == proc.pid and entry["socket"] == str(sock) and entry["accel"] == "tcg"
        assert oct((runtime / "platforms" / f"{proc.pid}.json").stat().st_mode & 0o777) == "0o600"
        with HostPortClient(sock) as client:
            info = client.platform_info()
            assert info.memory_size == 64 << 20 and info.accelerator == "none"
            assert client.list_domains() == []
        # The root CA was created in the state directory and anchors the platform's chain.
        root = x509.load_pem_x509_certificate((pstate / "root-ca.crt").read_bytes())
        assert verify_chain(info.chain_pem, root)
        # A second platform on the same socket is a clear error, not a takeover.
        with pytest.raises(ConfigError, match="another platform is already listening"):
            start_platform_process(sock, pstate, accel="tcg", memory_size=64 << 20,
                                   log_path=tmp_path / "second.log")
        assert proc.poll() is None
    finally:
        stop_platform_process(proc)
    assert proc.returncode == 0
    assert not sock.exists() and running_platforms() == []
    assert not any(registry_dir().iterdir())
    # Restarting keeps the same root CA (generated once per installation).
    proc2, _ = start_platform_process(tmp_path / "p.sock", pstate, accel="tcg", memory_size=64 << 20)
    try:
        with HostPortClient(tmp_path / "p.sock") as client:
            assert verify_chain(client.platform_info().chain_pem, root)
    finally:
        stop_platform_process(proc2)


def test_stale_registry_entries_are_ignored(runtime):
    (registry_dir() / "999999.json").write_text(json.dumps({"pid": 999999, "socket": "/nonexistent"}))
    (registry_dir() / "bad.json").write_text("{")
    assert running_platforms() == []
    assert not any(registry_dir().iterdir())


def test_bad_arguments_are_one_line_errors(runtime, tmp_path):
    run = subprocess.run([sys.executable, "-m", "qemu_kd.platform.daemon", "--socket", str(tmp_path / "s.sock"),
                          "--state", str(tmp_path / "st"), "--memory", "lots", "--accel", "tcg"],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert run.stderr.strip().count("\n") == 0 and "cannot read memory size" in run.stderr


def test_sigint_stops_the_daemon_cleanly(runtime, tmp_path):
    proc, sock = start_platform_process(tmp_path / "p.sock", tmp_path / "pstate", accel="tcg",
                                        memory_size=64 << 20)
    os.kill(proc.pid, signal.SIGINT)
    assert proc.wait(timeout=20) == 0 and not sock.exists()


def test_daemon_cleans_up_then_skips_the_interpreter_teardown(runtime, tmp_path):
    """Run as ``python -m``, the daemon ends with os._exit once it has cleaned up: an atexit
    handler (part of the teardown) never runs, yet its socket, registry entry and work
    directory are gone, the exit status is 0 and its log is complete."""
    marker = tmp_path / "teardown-ran"
    code = ("import atexit, runpy, sys\n"
            f"atexit.register(lambda: open({str(marker)!r}, 'w').close())\n"
            "sys.argv[0] = 'qemu_kd.platform.daemon'\n"
            "runpy.run_module('qemu_kd.platform.daemon', run_name='__main__', alter_sys=True)\n")
    sock, log = tmp_path / "p.sock", tmp_path / "platform.log"
    with open(log, "wb") as err:
        proc = subprocess.Popen([sys.executable, "-c", code, "--socket", str(sock), "--state",
                                 str(tmp_path / "pstate"), "--memory", "64M", "--accel", "tcg"],
                                stdout=subprocess.PIPE, stderr=err, stdin=subprocess.DEVNULL)
    try:
        assert proc.stdout.readline().decode().strip() == f"ready {sock}"
        assert running_platforms()
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
        proc.stdout.close()
    assert not marker.exists()
    assert not sock.exists() and running_platforms() == [] and not any(registry_dir().iterdir())
    assert not any(p.name.startswith("platform-") for p in runtime.iterdir())
    assert log.read_text().strip().splitlines()[-1].endswith("platform stopped")


def test_exit_when_idle_waits_for_the_reply_that_left_it_idle(runtime, monkeypatch, tmp_path):
    """With --exit-when-idle, a platform whose last domain is gone still waits until no request
    is being answered (the destroy-kd that ended it): stopping earlier would cut that reply."""
    import threading

    from qemu_kd.platform import daemon as platformd

    class Server:
        def __init__(self):
            self.pending = iter([4096, 4096, 0])
            self.reads = 0

        @property
        def pending_bytes(self):
            self.reads += 1
            return next(self.pending)

    class IdlePlatform:
        lock = threading.Lock()
        domains: dict = {}
        runtimes = {1: object()}    # it launched a domain, which has been destroyed

    monkeypatch.setattr(platformd, "IDLE_POLL", 0.0)
    d = platformd.PlatformDaemon(tmp_path / "p.sock", tmp_path / "pstate", 64 << 20, "tcg",
                                 exit_when_idle=True)
    d.platform, d.server = IdlePlatform(), Server()
    d.wait()
    assert d.server.reads == 3


@pytest.mark.parametrize("modules", [
    "qemu_kd.platform.daemon, qemu_kd.platform.hostport_server",       # the platform daemon
    "host_vmm.service",                                                 # the host VMM process
    "qemu_kd.cli.run, qemu_kd.cli.clean, qemu_kd.tenant.seal, qemu_kd.tenant.session, "
    "qemu_kd.qemu.launch, host_vmm.process",                            # qemu-kd run
])
def test_the_processes_of_a_run_do_not_load_pexpect(modules):
    """pexpect is for opening a guest console, which none of a run's processes does: it loads
    with the first Console, not with the console module's log helpers."""
    code = f"import sys, {modules}; print('pexpect' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def test_the_daemon_keeps_blas_to_one_thread_before_numpy_loads(tmp_path):
    """numpy's BLAS would start a spinning worker thread per CPU, stealing CPU from the host VMM
    and the CLI starting beside the daemon; the daemon sets the thread count before numpy loads."""
    code = ("import os, sys\n"
            "import qemu_kd.platform.daemon as d\n"
            "def start(self):\n"
            "    print(os.environ.get('OPENBLAS_NUM_THREADS'), 'numpy' in sys.modules, flush=True)\n"
            "    raise SystemExit(0)\n"
            "d.PlatformDaemon.start = start\n"
            "d.main(sys.argv[1:])\n")
    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_NUM_THREADS"}
    env["QEMU_KD_RUNTIME"] = str(tmp_path / "rt")
    out = subprocess.run([sys.executable, "-c", code, "--socket", str(tmp_path / "p.sock"), "--state",
                          str(tmp_path / "pstate"), "--accel", "tcg", "--memory", "64M"],
                         capture_output=True, text=True, timeout=60, env=env)
    assert out.stdout.splitlines() == ["1 False"], out.stderr


def test_single_threaded_blas_leaves_a_users_choice():
    from qemu_kd.common.blas import single_threaded_blas

    env: dict[str, str] = {}
    single_threaded_blas(env)
    assert env == {"OPENBLAS_NUM_THREADS": "1"}
    env = {"OPENBLAS_NUM_THREADS": "4"}
    single_threaded_blas(env)
    assert env == {"OPENBLAS_NUM_THREADS": "4"}
