"""restore-kd starts the domain's QEMU ahead, while it builds the domain (docs/snapshots.md):
that QEMU runs nothing before launch has checked the snapshot, and a refused restore leaves no
QEMU, no guest RAM and no directory behind.  In process, so the platform can be watched."""

from __future__ import annotations

import os
import subprocess
from contextlib import contextmanager

import pytest

from protected import _launched, in_process_platform
from qemu_kd.channel.agent_client import AgentClient, connect_shared_channel
from qemu_kd.common.paths import runtime_dir
from qemu_kd.platform.runtime import DomainRuntime
from qemu_kd.platform.snapshot import SnapshotRefused, SnapshotService
from qemu_kd.qemu.machine import DIR_KIND

pytestmark = pytest.mark.qemu
MiB = 1 << 20
GUEST = 128 * MiB


@pytest.fixture(scope="module")
def dom(guest_artifacts, tmp_path_factory):
    """A protected domain of 128 MiB on an in-process platform with room for a restored copy."""
    work = tmp_path_factory.mktemp("restore-launch")
    with in_process_platform(work / "p.sock", work / "pstate", 2 * GUEST + 64 * MiB) as platform, \
            contextmanager(_launched)(work, guest_artifacts, work / "p.sock", None, platform, work / "pstate",
                                      False, GUEST, 120.0) as d:
        yield d


@pytest.fixture
def service(dom, tmp_path):
    return SnapshotService(dom.platform, tmp_path / "pstate")


def _qemu_children() -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(os.getpid()), "-f", "qemu-system"], capture_output=True,
                         text=True).stdout
    return sorted(int(pid) for pid in out.split())


def _leftovers() -> tuple:
    """This process's QEMU processes, guest-RAM files and QEMU directories."""
    ram = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            ram += os.readlink(f"/proc/self/fd/{fd}").startswith("/memfd:kd-ram")
        except OSError:
            pass
    dirs = sorted(p.name for p in runtime_dir().glob(f"{DIR_KIND}-{os.getpid()}-*"))
    return _qemu_children(), ram, dirs


def test_a_restore_starts_qemu_ahead_and_it_runs_nothing_before_launch(dom, service, tmp_path,
                                                                       monkeypatch):
    """The restored domain's QEMU is up while the domain is still being built; at launch it
    has not run (it waits for its device state), and the restored guest then answers."""
    snap = tmp_path / "s.kdsnap"
    service.take(dom.keyid, snap)
    seen = {}
    real_build, real_launch = SnapshotService._build, DomainRuntime.launch

    def build(self, keyid, domain, staged, *args):
        seen["qemu while building"] = _qemu_children()
        return real_build(self, keyid, domain, staged, *args)

    def launch(self, *args):
        with self.qmp_lock:
            seen["status at launch"] = self.machine.qmp.cmd("query-status")["status"]
        seen["prestarted"] = self.machine is not None
        return real_launch(self, *args)

    monkeypatch.setattr(SnapshotService, "_build", build)
    monkeypatch.setattr(DomainRuntime, "launch", launch)
    before = _qemu_children()
    restored = service.restore(snap)
    platform = dom.platform
    try:
        assert seen["prestarted"] and seen["status at launch"] == "inmigrate"
        runtime = platform.runtimes[restored.keyid]
        assert runtime.machine.proc.pid in _qemu_children() and runtime.machine.proc.pid not in before
        agent = AgentClient(connect_shared_channel(restored.endpoints["shared"]))
        platform.run(restored.keyid)
        assert agent.ping(timeout=120)
        agent.sock.close()
    finally:
        platform.destroy_kd(restored.keyid)


def test_a_restore_refused_after_its_qemu_started_leaves_nothing(dom, service, tmp_path, monkeypatch):
    """A snapshot whose MAC fails is refused once the domain is built, its QEMU already up:
    the QEMU, its guest RAM and its directory are gone, as are the domain and its name."""
    snap = tmp_path / "s.kdsnap"
    service.take(dom.keyid, snap)
    data = bytearray(snap.read_bytes())
    data[len(data) // 2] ^= 1      # inside the memory section: only the MAC can tell
    snap.write_bytes(bytes(data))
    started = []
    real_prestart = DomainRuntime.prestart

    def prestart(self, staged, incoming):
        real_prestart(self, staged, incoming)
        started.append(self.machine.proc.pid)

    monkeypatch.setattr(DomainRuntime, "prestart", prestart)
    platform = dom.platform
    before = _leftovers(), sorted(platform.domains), sorted(platform.domain_names.values())
    with pytest.raises(SnapshotRefused, match="MAC is wrong"):
        service.restore(snap, "kd-refused")
    assert started, "the restore did not start its QEMU ahead"
    assert (_leftovers(), sorted(platform.domains)) == (before[0], before[1])
    assert sorted(platform.domain_names.values()) == before[2]
    assert platform.name_claims.holder("kd-refused") is None
    with pytest.raises(ProcessLookupError):
        os.kill(started[0], 0)


def test_a_qemu_started_ahead_that_does_not_fit_the_launch_is_replaced(dom, service, tmp_path, monkeypatch):
    """Launch uses a QEMU started ahead only as the machine it would start itself: one started
    as another machine (here: not waiting for a device state) is stopped with its RAM, and the
    launch starts a fresh one and decrypts guest RAM from DRAM; the guest still resumes."""
    snap = tmp_path / "s.kdsnap"
    service.take(dom.keyid, snap)
    started = []
    real_prestart = DomainRuntime.prestart

    def prestart(self, staged, incoming):
        real_prestart(self, staged, False)
        started.append(self.machine.proc.pid)

    monkeypatch.setattr(DomainRuntime, "prestart", prestart)
    platform = dom.platform
    restored = service.restore(snap)
    try:
        with pytest.raises(ProcessLookupError):
            os.kill(started[0], 0)
        assert platform.runtimes[restored.keyid].machine.proc.pid != started[0]
        agent = AgentClient(connect_shared_channel(restored.endpoints["shared"]))
        platform.run(restored.keyid)
        assert agent.ping(timeout=120)
        agent.sock.close()
    finally:
        platform.destroy_kd(restored.keyid)
