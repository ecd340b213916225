"""restore-kd writes a restored page's ciphertext into DRAM when something first looks at it
(docs/snapshots.md): the host never sees anything but what encrypting every page during the
restore would have stored, a page the guest changes after resuming is re-encrypted by the next
shadow sync, destroy-kd leaves nothing, and a page that cannot be written is an error, never
stale data.  In process, so the platform can be watched."""

from __future__ import annotations

import time

import numpy as np
import pytest

import restore_fixtures
from qemu_kd.common.errors import KdError
from qemu_kd.crypto.mee import MemoryEncryptionEngine
from qemu_kd.formats.addresses import KEYID_SHIFT, PAGE_SIZE
from qemu_kd.formats.measurement import PageType
from qemu_kd.formats.snapshot import MAC_SIZE, SECTION_DOMAIN, SECTION_MEMORY, SECTION_PAGES, DomainSection, \
    PageList, Snapshot
from qemu_kd.platform.domain import DomainState
from qemu_kd.platform.physmem import PageState
from qemu_kd.platform.snapshot import _Keys, _SnapshotPages, _unseal

pytestmark = pytest.mark.qemu
dom, service = restore_fixtures.dom, restore_fixtures.service     # the module's fixtures


def _snapshot_plaintext(service, path) -> dict[int, bytes]:
    """gpa -> plaintext of every page the snapshot file carries, decrypted here from the file."""
    data = path.read_bytes()
    snap = Snapshot.unpack_body(memoryview(data)[:-MAC_SIZE])
    keys = _Keys(service.platform.identity, snap.header)
    listing = PageList.unpack(_unseal(keys, snap, SECTION_PAGES))
    key = DomainSection.unpack(_unseal(keys, snap, SECTION_DOMAIN)).key
    memory = bytes(snap.sections[SECTION_MEMORY])
    carried = np.flatnonzero(~listing.zero)
    old_dpas = listing.hpas[carried] | np.uint64(snap.header.keyid << KEYID_SHIFT)
    with MemoryEncryptionEngine(key, mask_cache_bytes=0) as mee:
        plain = mee.decrypt_pages(memory, old_dpas)
    return {int(g): plain[i * PAGE_SIZE:(i + 1) * PAGE_SIZE] for i, g in enumerate(listing.gpas[carried].tolist())}


def _image_pages(platform, keyid) -> tuple[np.ndarray, np.ndarray]:
    """(gpas, hpas) of the domain's IMAGE pages."""
    pages = platform.domains[keyid].pages()
    image = pages.types == int(PageType.IMAGE)
    return pages.gpas[image], pages.hpas[image]


def _decrypt(platform, keyid, hpas, cipher: bytes) -> np.ndarray:
    domain = platform.domains[keyid]
    out = np.frombuffer(bytearray(cipher), dtype=np.uint8).reshape(-1, PAGE_SIZE)
    domain.mee.decrypt_into(out, out, hpas.astype(np.uint64) | np.uint64(keyid << KEYID_SHIFT))
    return out


def _taken(dom, service, tmp_path):
    """A snapshot of ``dom`` taken into ``tmp_path``: its path and the plaintext it carries."""
    snap = tmp_path / "s.kdsnap"
    service.take(dom.keyid, snap)
    return snap, _snapshot_plaintext(service, snap)


def test_right_after_a_restore_the_host_reads_what_a_synchronous_restore_wrote(dom, service, tmp_path):
    """Every restored page is still to be written when restore-kd returns; the host's read-phys
    of it then returns the ciphertext encrypting the snapshot's plaintext at the new address
    (the MEE is deterministic: decrypting it gives that plaintext exactly), and no plaintext."""
    snap, expected = _taken(dom, service, tmp_path)
    platform = dom.platform
    restored = service.restore(snap)
    try:
        gpas, hpas = _image_pages(platform, restored.keyid)
        assert gpas.size and platform.memory.pending_fill(hpas).all()
        cipher = platform.read_phys_pages(hpas.tolist())
        assert not platform.memory.pending_fill(hpas).any()
        pages = np.frombuffer(cipher, dtype=np.uint8).reshape(-1, PAGE_SIZE)
        want = np.frombuffer(b"".join(expected[int(g)] for g in gpas.tolist()), dtype=np.uint8)
        want = want.reshape(-1, PAGE_SIZE)
        assert not (pages == want).all(axis=1).any()        # no page reads as its plaintext
        assert np.array_equal(_decrypt(platform, restored.keyid, hpas, cipher), want)
        # Canary hunt: no 32-byte run of the plaintext (that is not all one byte) is in the host's read.
        for page in want[:: max(1, want.shape[0] // 64)]:
            chunk = page[:32].tobytes()
            if len(set(chunk)) > 1:
                assert chunk not in cipher
    finally:
        platform.destroy_kd(restored.keyid)


def test_a_page_the_guest_changes_after_resuming_is_re_encrypted_at_the_next_sync(dom, service, tmp_path):
    """The guest runs while its restored pages are still to be written; the pages it changes are
    re-encrypted by the exit's shadow sync, the others come from the snapshot: DRAM then decrypts
    to guest RAM exactly, page for page."""
    snap, expected = _taken(dom, service, tmp_path)
    platform = dom.platform
    restored = service.restore(snap)
    keyid = restored.keyid
    try:
        gpas, hpas = _image_pages(platform, keyid)
        assert platform.memory.pending_fill(hpas).all()
        _domain, runtime = platform._runtime(keyid, "test", [DomainState.LAUNCHED])
        platform.run(keyid)
        time.sleep(1.0)             # the guest runs and writes its memory
        platform.exit(keyid)        # the shadow sync re-encrypts what it changed
        ram = np.frombuffer(runtime.machine.map_ram(), dtype=np.uint8).reshape(-1, PAGE_SIZE)
        now = ram[(gpas // PAGE_SIZE).astype(np.int64)]
        then = np.frombuffer(b"".join(expected[int(g)] for g in gpas.tolist()), dtype=np.uint8)
        changed = ~(now == then.reshape(-1, PAGE_SIZE)).all(axis=1)
        assert changed.any() and (~changed).any()
        assert not platform.memory.pending_fill(hpas[changed]).any()
        cipher = platform.read_phys_pages(hpas.tolist())
        assert np.array_equal(_decrypt(platform, keyid, hpas, cipher), now)
    finally:
        platform.destroy_kd(keyid)


def test_destroying_a_restored_domain_before_its_pages_are_written_leaves_nothing(dom, service, tmp_path):
    snap = tmp_path / "s.kdsnap"
    service.take(dom.keyid, snap)
    platform = dom.platform
    pending_before = platform.memory.pending_fill_count()
    restored = service.restore(snap)
    domain = platform.domains[restored.keyid]
    everything = domain.pages().hpas
    _gpas, hpas = _image_pages(platform, restored.keyid)
    assert platform.memory.pending_fill(hpas).all()
    platform.destroy_kd(restored.keyid)
    assert domain._deferred is None
    assert platform.memory.pending_fill_count() <= pending_before
    assert all(platform.memory.owner(int(h)).state == PageState.FREE for h in everything[::97].tolist())
    assert not platform.memory.read_pages(everything).any()      # scrubbed


def test_a_restored_page_that_cannot_be_written_is_an_error_not_stale_data(dom, service, tmp_path, monkeypatch):
    """If producing the ciphertext fails (here: out of memory), the host's read fails with an error
    naming the domain, the pages stay to be written, and a later read gets the right ciphertext."""
    snap, expected = _taken(dom, service, tmp_path)
    platform = dom.platform
    restored = service.restore(snap)
    try:
        gpas, hpas = _image_pages(platform, restored.keyid)
        domain = platform.domains[restored.keyid]
        known, real = domain._deferred
        assert isinstance(real.__self__, _SnapshotPages)

        def fail(hpas):
            raise MemoryError("no memory for the pages")

        monkeypatch.setattr(domain, "_deferred", (known, fail))
        with pytest.raises(KdError, match=f"key domain {restored.keyid}: its restored pages cannot be written"):
            platform.read_phys_pages(hpas[:8].tolist())
        assert platform.memory.pending_fill(hpas).all()
        monkeypatch.setattr(domain, "_deferred", (known, real))
        cipher = platform.read_phys_pages(hpas[:8].tolist())
        want = np.frombuffer(b"".join(expected[int(g)] for g in gpas[:8].tolist()), dtype=np.uint8)
        assert np.array_equal(_decrypt(platform, restored.keyid, hpas[:8], cipher), want.reshape(-1, PAGE_SIZE))
    finally:
        platform.destroy_kd(restored.keyid)
