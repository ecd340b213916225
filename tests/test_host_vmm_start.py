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
