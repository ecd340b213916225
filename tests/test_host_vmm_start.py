"""The host VMM process can start together with its platform daemon (no QEMU).

``Platform.start`` starts the first launch's host VMM next to the daemon, so the
two processes' start-up (interpreter, imports) overlaps: the host VMM waits for
the platform's socket to appear (``--wait-platform``) before it connects.
"""

from __future__ import annotations

import pytest

from host_vmm.process import HostVmmError, HostVmmProcess
from qemu_kd.hostport.spawn import start_platform_process, stop_platform_process
from tests import test_platformd


# A private runtime directory for each test (the platform daemon tests' fixture).
runtime = test_platformd.runtime


def test_a_host_vmm_started_before_its_platform_waits_for_it(runtime, tmp_path):
    sock = tmp_path / "p.sock"
    host = HostVmmProcess(str(sock), str(tmp_path / "vmm.sock"), wait_platform=60, wait_ready=False)
    try:
        assert not sock.exists()
        proc, _ = start_platform_process(sock, tmp_path / "pstate", accel="tcg", memory_size=64 << 20)
        try:
            host.wait_ready()
            layout = host.call("allocate", memory_size=32 << 20)
            assert layout["keyid"] >= 1
        finally:
            host.stop()
            stop_platform_process(proc)
    finally:
        host.stop()


def test_without_a_platform_it_still_fails_in_one_line(runtime, tmp_path):
    host = HostVmmProcess(str(tmp_path / "none.sock"), str(tmp_path / "vmm.sock"), wait_platform=0.2,
                          wait_ready=False)
    with pytest.raises(HostVmmError, match="cannot connect to the host port"):
        host.wait_ready()


def test_platform_start_starts_the_first_host_vmm_and_close_stops_it(runtime, monkeypatch):
    import qemu_kd

    platform = qemu_kd.Platform(accel="tcg", memory="128M")
    try:
        platform.start(probe_kernel=__file__)
        spare = platform._spare_host
        assert spare is not None and spare.proc.poll() is None
        spare.wait_ready()              # it reached the daemon's socket
    finally:
        platform.close()
    assert platform._spare_host is None and spare.proc.poll() is not None


def test_a_launch_replaces_a_host_vmm_that_died_before_it(runtime):
    import qemu_kd

    platform = qemu_kd.Platform(accel="tcg", memory="128M")
    try:
        platform.start(probe_kernel=__file__)
        spare = platform._spare_host
        spare.proc.kill()
        spare.proc.wait()
        host = platform._take_host()
        try:
            assert host is not spare and platform._spare_host is None
            host.wait_ready()
            assert host.call("allocate", memory_size=32 << 20)["keyid"] >= 1
        finally:
            host.stop()
    finally:
        platform.close()


def test_start_without_waiting_returns_before_the_daemon_serves_and_close_stops_it(runtime):
    """``start(wait=False)`` only starts the two processes: closing right away stops both,
    and nothing of either is left (process, run directory, registry entry, socket)."""
    import qemu_kd
    from tests.leftovers import runtime_entries

    platform = qemu_kd.Platform(accel="tcg", memory="128M")
    try:
        platform.start(probe_kernel=__file__, wait=False)
        proc, spare, workdir = platform._proc, platform._spare_host, platform.workdir
        assert proc is not None and spare is not None and workdir.is_dir()
        assert platform.socket is None and "platform start" not in platform.timings
    finally:
        platform.close()
    assert proc.poll() is not None and spare.proc.poll() is not None
    assert not workdir.exists() and runtime_entries() == []


def test_start_after_start_without_waiting_waits_for_the_daemon(runtime):
    import qemu_kd
    from qemu_kd.hostport.client import HostPortClient

    platform = qemu_kd.Platform(accel="tcg", memory="128M")
    try:
        platform.start(probe_kernel=__file__, wait=False)
        proc = platform._proc
        assert platform.start() is platform and platform._proc is proc
        assert platform.timings["platform start"] > 0
        with HostPortClient(platform.socket) as client:
            assert client.platform_info().memory_size == 128 << 20
        platform._spare_host.wait_ready()
    finally:
        platform.close()


def test_a_daemon_that_does_not_start_fails_the_wait_in_one_line(runtime, monkeypatch):
    """Started without waiting, a daemon that cannot start is a one-line error when the platform
    is next needed; the host VMM process started beside it and the run directory go."""
    import qemu_kd
    from qemu_kd.common.errors import ConfigError
    from qemu_kd.hostport import spawn

    monkeypatch.setattr(spawn, "DAEMON_MODULE", "qemu_kd.platform.no_such_daemon")
    platform = qemu_kd.Platform(accel="tcg", memory="128M")
    try:
        platform.start(probe_kernel=__file__, wait=False)
        spare, workdir = platform._spare_host, platform.workdir
        with pytest.raises(ConfigError, match="the platform daemon did not start: .*no_such_daemon") as err:
            platform.start()
        assert "\n" not in str(err.value)
        assert platform._proc is None and platform.workdir is None and not workdir.exists()
        assert spare.proc.poll() is not None
    finally:
        platform.close()


def test_the_host_vmm_process_ends_without_the_interpreter_teardown(tmp_path):
    """``python -m host_vmm`` ends with os._exit once its main has returned (an atexit handler,
    part of the teardown, never runs), with main's exit status and its one-line error."""
    import subprocess
    import sys

    marker = tmp_path / "teardown-ran"
    code = ("import atexit, runpy\n"
            f"atexit.register(lambda: open({str(marker)!r}, 'w').close())\n"
            "runpy.run_module('host_vmm', run_name='__main__', alter_sys=True)\n")
    res = subprocess.run([sys.executable, "-c", code, "--platform", str(tmp_path / "none.sock"),
                          "--api", str(tmp_path / "vmm.sock")], capture_output=True, text=True,
                         timeout=60)
    assert res.returncode != 0 and not marker.exists()
    assert res.stderr.strip().splitlines()[-1].startswith("host-vmm: error:")
