"""restore-kd starts the domain's QEMU ahead, while it builds the domain (docs/snapshots.md):
that QEMU runs nothing before launch has checked the snapshot, and a refused restore leaves no
QEMU, no guest RAM and no directory behind.  In process, so the platform can be watched."""

from __future__ import annotations

import os

import numpy as np
import pytest

from leftovers import in_process_leftovers, qemu_children
import restore_fixtures
from qemu_kd.channel.agent_client import AgentClient, connect_shared_channel
from qemu_kd.platform.runtime import DomainRuntime
from qemu_kd.platform.snapshot import SnapshotRefused, SnapshotService

pytestmark = pytest.mark.qemu
dom, service = restore_fixtures.dom, restore_fixtures.service     # the module's fixtures


def _record_prestarts(monkeypatch, incoming=None) -> list[int]:
    """The pids of the QEMUs restore starts ahead, as they start; ``incoming`` (when given)
    replaces the flag they are started with."""
    started: list[int] = []
    real_prestart = DomainRuntime.prestart

    def prestart(self, staged, flag):
        real_prestart(self, staged, flag if incoming is None else incoming)
        started.append(self.machine.proc.pid)

    monkeypatch.setattr(DomainRuntime, "prestart", prestart)
    return started


def test_a_restore_starts_qemu_ahead_and_it_runs_nothing_before_launch(dom, service, tmp_path,
                                                                       monkeypatch):
    """The restored domain's QEMU is up while the domain is still being built; at launch it
    has not run (it waits for its device state), and the restored guest then answers."""
    snap = tmp_path / "s.kdsnap"
    service.take(dom.keyid, snap)
    seen = {}
    real_build, real_launch = SnapshotService._build, DomainRuntime.launch

    def build(self, keyid, domain, staged, *args):
        seen["qemu while building"] = qemu_children()
        return real_build(self, keyid, domain, staged, *args)

    def launch(self, *args):
        with self.qmp_lock:
            seen["status at launch"] = self.machine.qmp.cmd("query-status")["status"]
        seen["prestarted"] = self.machine is not None
        return real_launch(self, *args)

    monkeypatch.setattr(SnapshotService, "_build", build)
    monkeypatch.setattr(DomainRuntime, "launch", launch)
    before = qemu_children()
    restored = service.restore(snap)
    platform = dom.platform
    try:
        assert seen["prestarted"] and seen["status at launch"] == "inmigrate"
        runtime = platform.runtimes[restored.keyid]
        assert runtime.machine.proc.pid in qemu_children() and runtime.machine.proc.pid not in before
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
    started = _record_prestarts(monkeypatch)
    platform = dom.platform
    before = in_process_leftovers(), sorted(platform.domains), sorted(platform.domain_names.values())
    with pytest.raises(SnapshotRefused, match="MAC is wrong"):
        service.restore(snap, "kd-refused")
    assert started, "the restore did not start its QEMU ahead"
    assert (in_process_leftovers(), sorted(platform.domains)) == (before[0], before[1])
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
    started = _record_prestarts(monkeypatch, incoming=False)
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


def _resealed(service, path, change) -> None:
    """Rewrite the snapshot at ``path`` as the platform would have written it, with ``change``
    applied to its opened sections: sealed again and MAC'd, so only restore's own checks of
    the contents stand between it and a launch."""
    from qemu_kd.formats.snapshot import KIND_SEALED, MAC_SIZE, SECTION_KINDS, Snapshot
    from qemu_kd.platform.snapshot import _Keys, _seal, _unseal

    data = path.read_bytes()
    snap = Snapshot.unpack_body(memoryview(data)[:-MAC_SIZE])
    keys = _Keys(service.platform.identity, snap.header)
    opened = {sid: bytes(_unseal(keys, snap, sid) if kind == KIND_SEALED else snap.sections[sid])
              for sid, kind in SECTION_KINDS.items()}
    change(opened)
    body = _seal(keys, snap.header, opened).pack_body()
    path.write_bytes(body + keys.mac(body))


def _page_list(opened):
    from qemu_kd.formats.snapshot import SECTION_PAGES, PageList

    return PageList.unpack(opened[SECTION_PAGES])


def _flip_zero_flag(to_zero: bool):
    from qemu_kd.formats.snapshot import SECTION_PAGES

    def change(opened):
        pages = _page_list(opened)
        row = int(np.flatnonzero(pages.zero != to_zero)[0])
        pages.zero[row] = to_zero
        opened[SECTION_PAGES] = pages.pack()
    return change


def _drop_a_row(opened):
    from qemu_kd.formats.snapshot import SECTION_PAGES, PageList

    pages = _page_list(opened)
    keep = slice(0, pages.gpas.size - 1)
    opened[SECTION_PAGES] = PageList(pages.gpas[keep], pages.hpas[keep], pages.types[keep],
                                     pages.perms[keep], pages.zero[keep]).pack()


def _drop_a_page(opened):
    from qemu_kd.formats.snapshot import SECTION_MEMORY

    opened[SECTION_MEMORY] = opened[SECTION_MEMORY][:-4096]


def test_a_snapshot_names_its_zero_pages_and_a_restore_makes_them_zero_pages_of_the_new_domain(
        dom, service, tmp_path):
    """The snapshot carries only the pages that are not all zeros; the restored domain owns
    every page the snapshot flagged zero as a ZERO page, and each reads as zeros (as a page
    add-zero-pages added)."""
    from qemu_kd.formats.measurement import PageType
    from qemu_kd.platform.physmem import PageState

    snap = tmp_path / "s.kdsnap"
    taken = service.take(dom.keyid, snap)
    seen = {}
    _resealed(service, snap, lambda opened: seen.update(pages=_page_list(opened)))
    pages = seen["pages"]
    flagged = int(pages.zero.sum())
    assert flagged > 0 and taken.size < pages.zero.size * 4096 - flagged * 4096 + (8 << 20)
    restored = service.restore(snap)
    platform = dom.platform
    try:
        domain = platform.domains[restored.keyid]
        mine = domain.pages()
        guest = np.isin(mine.types, [int(PageType.IMAGE), int(PageType.ZERO)])
        by_gpa = dict(zip(mine.gpas[guest].tolist(), zip(mine.hpas[guest].tolist(), mine.types[guest].tolist())))
        zero_gpas = pages.gpas[pages.zero].tolist()
        assert all(by_gpa[g][1] == int(PageType.ZERO) for g in zero_gpas)
        sample = np.array([by_gpa[g][0] for g in zero_gpas[::max(1, len(zero_gpas) // 64)]], dtype=np.uint64)
        for hpa in sample.tolist():
            owner = platform.memory.owner(hpa)
            assert (owner.state, owner.keyid, owner.page_type) == (PageState.PRIVATE, restored.keyid,
                                                                    PageType.ZERO)
        assert not domain.decrypt_page_array(sample).any()
    finally:
        platform.destroy_kd(restored.keyid)


@pytest.mark.parametrize("change, match", [
    (_flip_zero_flag(True), "memory section .* does not match its page list"),
    (_flip_zero_flag(False), "memory section .* does not match its page list"),
    (_drop_a_row, "memory section .* does not match its page list"),
    (_drop_a_page, "memory section .* does not match its page list"),
])
def test_a_page_list_that_does_not_match_the_memory_section_is_refused(dom, service, tmp_path, change,
                                                                       match):
    """Even sealed and MAC'd as the platform would, a page list naming a carried page zero (or a
    zero page carried), or one page short, or a memory section one page short, is refused."""
    snap = tmp_path / "s.kdsnap"
    service.take(dom.keyid, snap)
    _resealed(service, snap, change)
    platform = dom.platform
    before = in_process_leftovers(), sorted(platform.domains)
    with pytest.raises(SnapshotRefused, match=match):
        service.restore(snap)
    assert (in_process_leftovers(), sorted(platform.domains)) == before


@pytest.mark.parametrize("remac", [False, True])
def test_a_flipped_zero_flag_in_the_file_is_refused(dom, service, tmp_path, remac):
    """The page list is sealed: flipping a page's zero flag in the file breaks the MAC, and with
    the MAC made again the section's seal (its GCM tag) still refuses it."""
    from qemu_kd.formats.snapshot import HEADER_SIZE, MAC_SIZE, SECTION_PAGES, Snapshot
    from qemu_kd.platform.snapshot import _Keys

    snap = tmp_path / "s.kdsnap"
    service.take(dom.keyid, snap)
    data = bytearray(snap.read_bytes())
    parsed = Snapshot.unpack_body(memoryview(bytes(data))[:-MAC_SIZE])
    section = parsed.sections[SECTION_PAGES]
    start = data.find(bytes(section), HEADER_SIZE)
    data[start + 12 + 24 * 5 + 18] ^= 0x01       # past the nonce: the 6th row's flags byte
    if remac:
        keys = _Keys(service.platform.identity, parsed.header)
        data[-MAC_SIZE:] = keys.mac(bytes(data[:-MAC_SIZE]))
    snap.write_bytes(bytes(data))
    with pytest.raises(SnapshotRefused, match="a sealed section does not open" if remac else "MAC is wrong"):
        service.restore(snap)


def test_a_snapshot_of_the_older_format_is_refused(dom, service, tmp_path):
    import struct

    snap = tmp_path / "s.kdsnap"
    service.take(dom.keyid, snap)
    data = bytearray(snap.read_bytes())
    struct.pack_into("<H", data, 4, 1)
    snap.write_bytes(bytes(data))
    with pytest.raises(SnapshotRefused, match=r"snapshot format version 1 is not supported \(an older format"):
        service.restore(snap)
