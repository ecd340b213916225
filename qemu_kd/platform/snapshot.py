"""Encrypted snapshots of running key domains, and restoring them as new domains.

``snapshot-kd`` (:meth:`SnapshotService.take`):

1. The platform exits the domain: the vCPU's whole register file is sealed into
   the protected save area and scrubbed in QEMU, and the encrypted shadow in
   DRAM is brought up to date (``runtime.exit``).
2. It reads what it needs: the verified save-area record, QEMU's device state
   (its migration stream with guest RAM left out, through a pipe to the
   platform only), the VMCS page, the guest page list, and the guest pages'
   ciphertext exactly as DRAM holds it (encrypted by the MEE under the domain
   key, tweaked by each page's data physical address).  It decrypts each page
   to see whether it is all zeros: those are only flagged in the (sealed) page
   list, and the file carries the ciphertext of the others alone.
3. It resumes the domain, and writes the file (``formats/snapshot.py``):
   everything but the ciphertext is sealed with AES-256-GCM under a key derived
   from the platform's sealing root, and an HMAC-SHA-384 under a second such key
   covers the whole file.

``restore-kd`` (:meth:`SnapshotService.restore`) checks the file (platform,
MAC, the domain the caller expects, rollback), then builds a new key domain
with the same key, policy, host_data and measurement at a fresh KeyID and
fresh pages: the guest pages the file carries are decrypted at their old
addresses inside the platform (their ciphertext at the new ones is written when
anything first looks at DRAM there: :class:`_SnapshotPages`), the pages flagged
zero come back as ZERO pages (as add-zero-pages adds them), a new EPT maps them, and the
VMCS points at it.  The platform verifies that EPT as verify-ept does and
launches the domain with the snapshot's device state and registers
(``runtime.ResumeState``).  Like launch, the vCPU waits for ``run``.

The decrypted pages also go straight into the new guest RAM (``guestram``), so
launch does not decrypt them again, and the domain's QEMU starts while the
domain is built (``DomainRuntime.prestart``): paused, waiting for its device
state, on that RAM.  It runs nothing before the MAC's verdict and launch's
checks, and a refused restore stops it (:meth:`SnapshotService._abandon`).
The file is read into memory, never mapped: the MAC covers the bytes read.

Rollback (docs/snapshots.md): the platform keeps each domain's latest snapshot
version in ``<state>/snapshots/<domain id>``.  A snapshot older than that is
refused unless the domain's measured policy is RESTORABLE; restoring a
non-restorable domain's snapshot makes the domain's version newer than it,
so the same file restores once.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import stat
import secrets
import threading
import weakref
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from qemu_kd.common.errors import KdError
from qemu_kd.common.files import write_file_atomic
from qemu_kd.crypto.mee import MemoryEncryptionEngine
from qemu_kd.formats.addresses import KEYID_SHIFT, PAGE_SIZE
from qemu_kd.formats.ept import build_ept_arrays, ept_table_pages_needed
from qemu_kd.formats.errors import FormatError
from qemu_kd.formats.measurement import PageType
from qemu_kd.formats.savearea import SaveArea
from qemu_kd.formats.snapshot import (
    HEADER_SIZE,
    MAC_SIZE,
    SECTION_DEVICES,
    SECTION_DOMAIN,
    SECTION_KINDS,
    SECTION_MEMORY,
    SECTION_PAGES,
    SECTION_VCPU,
    KIND_SEALED,
    DomainSection,
    PageList,
    Snapshot,
    SnapshotHeader,
    sealed_aad,
)
from qemu_kd.formats.vmcs import Vmcs
from qemu_kd.platform.domain import GUEST_TYPES, DomainState, KeyDomain, PageBatch
from qemu_kd.platform.guestram import StagedRam, guest_memory_size

log = logging.getLogger(__name__)

#: Largest snapshot file restore-kd reads.
MAX_SNAPSHOT_BYTES = 16 << 30
#: Pages decrypted and encrypted again per step on restore.
RESTORE_BATCH = 4096
NONCE_SIZE = 12
VERSIONS_DIR = "snapshots"


class SnapshotError(KdError):
    """A snapshot cannot be taken or written."""


class SnapshotRefused(KdError):
    """A snapshot file the platform will not restore (tampered, foreign or old)."""


@dataclass(frozen=True)
class RestoredMeasurement:
    """The launch measurement a restored domain carries: the original's digest."""

    digest: bytes


@dataclass(frozen=True)
class SnapshotTaken:
    """snapshot-kd's answer."""

    path: str
    domain_id: bytes
    version: int
    size: int


@dataclass(frozen=True)
class Restored:
    """restore-kd's answer."""

    keyid: int
    name: str
    endpoints: dict[str, str]
    domain_id: bytes
    version: int


class VersionStore:
    """Each domain's latest snapshot version, one small file per domain id (mode 0600)."""

    def __init__(self, state_dir: Path):
        self.directory = Path(state_dir) / VERSIONS_DIR

    def _path(self, domain_id: bytes) -> Path:
        return self.directory / domain_id.hex()

    def latest(self, domain_id: bytes) -> int:
        try:
            return int(self._path(domain_id).read_text().strip())
        except FileNotFoundError:
            return 0
        except (OSError, ValueError) as exc:
            raise SnapshotError(f"the platform's snapshot version record {self._path(domain_id)} is "
                                f"unreadable: {exc}", "the platform refuses to guess it") from None

    def advance(self, domain_id: bytes, version: int) -> None:
        """Record ``version`` as the domain's latest (never goes back)."""
        if version <= self.latest(domain_id):
            return
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        write_file_atomic(self._path(domain_id), f"{version}\n".encode(), mode=0o600)


class _Keys:
    """The two keys of one domain's snapshots on this platform."""

    def __init__(self, identity, header: SnapshotHeader):
        args = (header.measurement, header.policy.pack(), header.domain_id)
        self.seal = AESGCM(identity.snapshot_key(*args, b"sections"))
        self._mac = identity.snapshot_key(*args, b"file-mac")

    def mac(self, body: bytes) -> bytes:
        return hmac.new(self._mac, body, hashlib.sha384).digest()


class _MacCheck:
    """The snapshot file's MAC, computed in a thread of its own from the moment it is made."""

    def __init__(self, keys: _Keys, data: bytes):
        self._ok: bool | None = None
        self._thread = threading.Thread(target=self._compute, args=(keys, data), name="kd-snapshot-mac",
                                        daemon=True)
        self._thread.start()

    def _compute(self, keys: _Keys, data: bytes) -> None:
        try:
            self._ok = hmac.compare_digest(keys.mac(memoryview(data)[:-MAC_SIZE]), data[-MAC_SIZE:])
        except BaseException:   # noqa: BLE001 - no verdict is a refusal
            self._ok = False

    def check(self) -> None:
        """Wait for the MAC; SnapshotRefused unless it verifies."""
        self._thread.join()
        if not self._ok:
            raise SnapshotRefused("snapshot does not verify: its MAC is wrong (tampered or truncated)",
                                  "take a new snapshot")


class SnapshotService:
    """snapshot-kd and restore-kd for one platform (``state_dir``: where versions are kept)."""

    def __init__(self, platform, state_dir: Path | str):
        self.platform = platform
        self.versions = VersionStore(Path(state_dir))
        # The domain id of each live domain that has one (taken or restored), by domain object.
        self._domain_ids: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    # ------------------------------------------------------------------ take

    def take(self, keyid: int, path: str | Path) -> SnapshotTaken:
        """Exit the running domain, capture it, resume it, write the snapshot to ``path``."""
        path = _check_path(path)
        p = self.platform
        with p.lock:
            domain, runtime = p._runtime(keyid, "snapshot-kd", [DomainState.LAUNCHED])
            controls = p.controls.status(keyid)
            if controls["installed_version"] or controls["shared_pages"]:
                # The control plane's state (versions, shared pages, unmapped gpas) is not in
                # the snapshot format: a restore could not keep the guest's view of it.
                raise SnapshotError(f"key domain {keyid} has installed control updates (version "
                                    f"{controls['installed_version']}): snapshots of such a domain "
                                    "are not supported", "snapshot it before changing its memory, and before "
                                    "put_file/get_file, which share a buffer with the host")
            runtime.exit(reason="host")
            domain.mark_exited()
            try:
                area = runtime.sealed_vcpu()
                devices = runtime.device_state()
                captured = self._capture(domain, runtime)
            finally:
                runtime.resume()
                domain.mark_launched()
            domain_id = self._domain_ids.get(domain) or secrets.token_bytes(16)
            version = self.versions.latest(domain_id) + 1
            header = SnapshotHeader(p.identity.platform_id, domain_id, version, keyid,
                                    domain.measurement.digest, domain.policy, domain.host_data)
            keys = _Keys(p.identity, header)
            sections = dict(captured)
            sections[SECTION_VCPU] = area.pack_body()
            sections[SECTION_DEVICES] = devices
            snap = _seal(keys, header, sections)
            body = snap.pack_body()
            data = body + keys.mac(body)
            self.versions.advance(domain_id, version)
            self._domain_ids[domain] = domain_id
        try:
            write_file_atomic(path, data, mode=0o600)
        except OSError as exc:
            raise SnapshotError(f"cannot write the snapshot to {path}: {exc.strerror or exc}") from None
        log.info("key domain %d: snapshot version %d written (%d MiB)", keyid, version, len(data) >> 20)
        return SnapshotTaken(str(path), domain_id, version, len(data))

    def _capture(self, domain: KeyDomain, runtime) -> dict[int, bytes]:
        pages = domain.pages()
        guest = np.isin(pages.types, [int(t) for t in GUEST_TYPES])
        order = np.argsort(pages.gpas[guest], kind="stable")
        gpas, hpas = pages.gpas[guest][order], pages.hpas[guest][order]
        types, perms = pages.types[guest][order], pages.perms[guest][order]
        # DRAM through the platform: the MEE's ciphertext of every guest page (the shadow
        # is current: the exit synced it).  Pages that decrypt to all zeros are flagged in
        # the sealed page list and left out of the memory section.
        cipher = self.platform.memory.read_pages(hpas)
        zero = _zero_pages(domain, hpas, cipher)
        listing = PageList(gpas, hpas, types, perms, zero)
        memory = cipher[~zero].tobytes()
        del cipher
        vmcs = domain.decrypt_pages(np.array([domain.vmcs_hpa], dtype=np.uint64))
        section = DomainSection(domain.snapshot_key(), getattr(runtime, "tsc_khz", None), runtime.mem_size,
                                int(runtime._save_hpa or 0), vmcs)
        return {SECTION_DOMAIN: section.pack(), SECTION_PAGES: listing.pack(), SECTION_MEMORY: memory}

    # --------------------------------------------------------------- restore

    def restore(self, path: str | Path, name: str | None = None, *, domain_id: bytes | None = None,
                measurement: bytes | None = None) -> Restored:
        """Check the snapshot at ``path`` and launch it as a new domain named ``name``.

        ``domain_id`` / ``measurement``: what the caller expects the snapshot to be of
        (a snapshot of another domain is refused).
        """
        path = _check_path(path)
        data = _read(path)
        p = self.platform
        header = self._header(data)
        keys = _Keys(p.identity, header)
        # The MAC over the whole file is checked in a thread while the rest goes on (hashing
        # releases the GIL): its verdict is taken before the domain launches, and before any
        # later check's refusal is reported, so a wrong MAC stays the reason it was.
        mac = _MacCheck(keys, data)
        try:
            snap = self._open(data, header, domain_id, measurement)
            opened = {sid: _unseal(keys, snap, sid) if kind == KIND_SEALED else snap.sections[sid]
                      for sid, kind in SECTION_KINDS.items()}
            del data, snap
            return self._restore(path, header, opened, mac, name)
        except BaseException:
            mac.check()
            raise

    def _restore(self, path: Path, header: SnapshotHeader, opened: dict[int, bytes], mac: "_MacCheck",
                 name: str | None) -> Restored:
        p = self.platform
        try:
            dom = DomainSection.unpack(opened[SECTION_DOMAIN])
            listing = PageList.unpack(opened[SECTION_PAGES])
            area, _end = SaveArea.unpack_body(opened[SECTION_VCPU])
            vmcs = Vmcs.unpack(dom.vmcs)
        except FormatError as exc:
            raise SnapshotRefused(f"snapshot {path} is malformed inside its sealed sections: "
                                  f"{exc.message}") from None
        if len(opened[SECTION_MEMORY]) != listing.memory_size():
            raise SnapshotRefused(f"snapshot {path}: its memory section ({len(opened[SECTION_MEMORY])} bytes) "
                                  f"does not match its page list ({listing.data_pages} pages that are not "
                                  "all zeros)")
        with p.lock:
            p._check_open()
            if not header.policy.restorable and header.version < self.versions.latest(header.domain_id):
                raise SnapshotRefused(_older(path, header, self.versions.latest(header.domain_id)))
            from qemu_kd.platform.runtime import ResumeState

            keyid = p.keyids.reserve()
            domain = runtime = started = None
            name_claimed = None
            try:
                domain = KeyDomain(keyid, dom.key, header.policy, header.host_data, p.memory)
                # The guest's plaintext goes into guest RAM as the domain is built (guestram.py),
                # and the domain's QEMU starts meanwhile, paused, on that RAM: nothing runs in it
                # before launch has taken the MAC's verdict and made its own checks.
                staged = StagedRam(guest_memory_size(listing.gpas))
                domain.stage_ram(staged)
                name_claimed = (p.name_claims.claim_default(keyid) if name is None
                                else p.name_claims.claim(name, keyid))
                runtime = p._runtime_factory(domain, p.identity, p.qemu_accel, name_claimed)
                if hasattr(runtime, "prestart"):
                    started = p._launcher.submit(runtime.prestart, staged, True)
                self._build(keyid, domain, staged, header, dom, listing, vmcs, opened[SECTION_MEMORY])
                mac.check()
                if started is not None:
                    started.result()
                endpoints = p.launch(keyid, name_claimed, resume_from=ResumeState(
                    area.registers, opened[SECTION_DEVICES], dom.tsc_khz), runtime=runtime)
            except BaseException:
                self._abandon(keyid, domain, runtime, started, name_claimed)
                raise
            if not header.policy.restorable:
                # This file is now older than the domain: it restores once.
                self.versions.advance(header.domain_id, header.version + 1)
            self._domain_ids[domain] = header.domain_id
            log.info("snapshot version %d of domain %s restored as key domain %d", header.version,
                     header.domain_id.hex(), keyid)
            return Restored(keyid, p.domain_names.get(keyid, f"kd{keyid}"), endpoints, header.domain_id,
                            header.version)

    def _header(self, data: bytes) -> SnapshotHeader:
        """The header of the snapshot in ``data``, if it is this platform's; else SnapshotRefused."""
        p = self.platform
        try:
            header, _count = SnapshotHeader.unpack(data[:HEADER_SIZE])
        except FormatError as exc:
            raise SnapshotRefused(f"not a usable snapshot: {exc.message}", exc.hint) from None
        if header.platform_id != p.identity.platform_id:
            raise SnapshotRefused(f"snapshot was taken on another platform ({header.platform_id.hex()}; "
                                  f"this is {p.identity.platform_id.hex()})",
                                  "a snapshot restores only on the platform that took it")
        if len(data) < HEADER_SIZE + MAC_SIZE:
            raise SnapshotRefused("snapshot is truncated")
        return header

    def _open(self, data: bytes, header: SnapshotHeader, domain_id: bytes | None,
              measurement: bytes | None) -> Snapshot:
        """The sections of the snapshot in ``data`` (its MAC is checked apart: :class:`_MacCheck`),
        if it is of the domain the caller expects; else SnapshotRefused with the reason."""
        body = memoryview(data)[:-MAC_SIZE]
        try:
            snap = Snapshot.unpack_body(body)
        except FormatError as exc:
            raise SnapshotRefused(f"snapshot is malformed: {exc.message}") from None
        if domain_id is not None and domain_id != header.domain_id:
            raise SnapshotRefused(f"snapshot is of another domain (domain id {header.domain_id.hex()}, "
                                  f"expected {domain_id.hex()})")
        if measurement is not None and measurement != header.measurement:
            raise SnapshotRefused(f"snapshot is of another domain (measurement "
                                  f"{header.measurement.hex()[:16]}..., expected {measurement.hex()[:16]}...)")
        return snap

    def _abandon(self, keyid: int, domain: KeyDomain | None, runtime, started, name: str | None) -> None:
        """Undo a restore that did not launch: its QEMU, name, domain, pages and KeyID (caller
        holds the lock)."""
        p = self.platform
        if started is not None:
            try:
                started.result()    # the QEMU started ahead is stopped below, not while it starts
            except BaseException:  # noqa: BLE001 - it stopped itself; the restore's error is reported
                pass
        if runtime is not None and hasattr(runtime, "stop"):
            runtime.stop()
        if name is not None and keyid not in p.domain_names:
            p.name_claims.release(name)
        if keyid in p.domains:
            p.destroy_kd(keyid)
            return
        if domain is not None:
            domain.discard_staged_ram()
        p.memory.release_keyid(keyid)
        p.keyids.release(keyid)

    def _build(self, keyid: int, domain: KeyDomain, staged: StagedRam, header: SnapshotHeader,
               dom: DomainSection, listing: PageList, vmcs: Vmcs, memory: bytes) -> None:
        """Make ``domain`` a VERIFIED key domain holding the snapshot's pages at fresh hpas, their
        plaintext in ``staged`` (caller holds the lock, and undoes all of it on failure)."""
        p = self.platform
        gpas, old_hpas = listing.gpas, listing.hpas
        perms = listing.perms.astype(np.int64)
        n_tables = ept_table_pages_needed(gpas)
        hpas = p.memory.find_free(gpas.size + n_tables + 2)
        p.memory.claim_for_host(hpas, keyid)
        guest_hpas, table_hpas = hpas[:gpas.size], hpas[gpas.size:gpas.size + n_tables]
        vmcs_hpa, save_hpa = int(hpas[-2]), int(hpas[-1])
        old_dpas = old_hpas | np.uint64(header.keyid << KEYID_SHIFT)
        # The old addresses are read once: no mask cache for them (its no-cache path is
        # also the fast one), so the domain's own cache holds only its new addresses.
        # Pages that are zero (flagged so in the page list, or a carried page that decrypts
        # to zeros) come back as ZERO pages: DRAM gets their encrypted zeros on first use and
        # guest RAM keeps its holes, as at a fresh launch.
        zero = listing.zero.copy()
        # The pages the file carries, in page-list order: the memory section's pages.
        carried = np.flatnonzero(~listing.zero)
        # The plaintext goes into guest RAM as well (guestram.py): launch takes it instead
        # of decrypting every page out of DRAM again.
        gpns = (gpas // PAGE_SIZE).astype(np.int64)
        # Views of the file's pages and one plaintext buffer: no copies of the memory section.
        pages = memoryview(memory)
        buffer = np.empty((min(RESTORE_BATCH, carried.size), PAGE_SIZE), dtype=np.uint8)
        with MemoryEncryptionEngine(dom.key, mask_cache_bytes=0) as old_mee:
            for start in range(0, carried.size, RESTORE_BATCH):
                rows = carried[start:start + RESTORE_BATCH]
                count = rows.size
                plain = buffer[:count]
                old_mee.decrypt_into(plain, pages[start * PAGE_SIZE:(start + count) * PAGE_SIZE],
                                     old_dpas[rows])
                empty = ~plain.view(np.uint64).any(axis=1)
                zero[rows] = empty
                keep = ~empty
                if keep.all():
                    staged.fill(gpns[rows], guest_hpas[rows], plain)
                elif keep.any():
                    kept = plain[keep]
                    staged.fill(gpns[rows][keep], guest_hpas[rows][keep], kept)
                    kept.fill(0)
            buffer.fill(0)      # guest plaintext does not linger in the platform's heap
        # Their ciphertext at the new addresses is produced when something first looks at DRAM
        # there (KeyDomain.defer_restored): from the file's ciphertext, decrypted again at the old
        # addresses, so it is exactly what encrypting the plaintext above would have stored.
        stored = ~zero[carried]
        deferred = _SnapshotPages(dom.key, memory, guest_hpas[carried[stored]], old_dpas[carried[stored]],
                                  np.flatnonzero(stored))
        eptp, tables = build_ept_arrays(gpas, guest_hpas, perms, table_hpas.tolist())
        order = np.array(sorted(tables), dtype=np.uint64)
        domain.encrypt_into_dram(order, b"".join(tables[int(h)] for h in order))
        new_vmcs = replace(vmcs, ept_pointer=eptp, save_area_hpa=save_hpa)
        domain.encrypt_into_dram(np.array([vmcs_hpa], dtype=np.uint64), new_vmcs.pack())
        control = np.concatenate([[vmcs_hpa], order, [save_hpa]]).astype(np.uint64)
        control_types = [int(PageType.VMCS)] + [int(PageType.EPT)] * order.size + [int(PageType.SAVE)]
        # Every guest page with contents comes back as an IMAGE page.
        data = ~zero
        batch = PageBatch(np.concatenate([control, guest_hpas[data]]),
                          np.concatenate([np.zeros(control.size, dtype=np.uint64), gpas[data]]),
                          np.concatenate([control_types, np.full(int(data.sum()), int(PageType.IMAGE))]),
                          np.concatenate([np.zeros(control.size, dtype=np.int64), perms[data]]),
                          np.zeros(control.size + int(data.sum()), dtype=bool))
        p.domains[keyid] = domain
        domain.add_pages(batch)
        domain.defer_restored(deferred.hpas, deferred.plaintext)
        if zero.any():
            domain.add_zero_pages(PageBatch(guest_hpas[zero], gpas[zero],
                                            np.full(int(zero.sum()), int(PageType.ZERO)), perms[zero],
                                            np.zeros(int(zero.sum()), dtype=bool)))
        verdict = domain.verify_ept(hpas)
        if not verdict.ok:
            raise SnapshotError(f"the restored domain's EPT does not verify: {verdict.reasons[0]}")
        domain.measurement = RestoredMeasurement(header.measurement)


class _SnapshotPages:
    """A restored domain's pages whose DRAM ciphertext is still to be written: the snapshot file's
    ciphertext of each (its memory section, held until every page is written or the domain is
    destroyed), and the old data physical address it was encrypted at."""

    def __init__(self, key: bytes, memory: bytes | memoryview, hpas: np.ndarray, old_dpas: np.ndarray,
                 positions: np.ndarray):
        order = np.argsort(hpas, kind="stable")
        self.hpas = hpas[order]
        self._old_dpas = old_dpas[order]
        self._positions = positions[order]
        self._key = key
        self._pages = np.frombuffer(memory, dtype=np.uint8).reshape(-1, PAGE_SIZE)

    def plaintext(self, hpas: np.ndarray) -> np.ndarray:
        """The snapshot's plaintext of the pages now at ``hpas`` (each one of :attr:`hpas`)."""
        at = np.searchsorted(self.hpas, hpas)
        pages = self._pages[self._positions[at]]    # a copy, decrypted in place
        with MemoryEncryptionEngine(self._key, mask_cache_bytes=0) as old_mee:
            old_mee.decrypt_into(pages, pages, self._old_dpas[at])
        return pages


def _zero_pages(domain: KeyDomain, hpas: np.ndarray, cipher: np.ndarray) -> np.ndarray:
    """Which of the domain's pages at ``hpas`` (ciphertext ``cipher``, as DRAM holds it) are all
    zeros: each page is decrypted inside the platform, and the plaintext is wiped after."""
    zero = np.zeros(hpas.size, dtype=bool)
    if not hpas.size:
        return zero
    dpas = hpas.astype(np.uint64) | np.uint64(domain.keyid << KEYID_SHIFT)
    buffer = np.empty((min(RESTORE_BATCH, hpas.size), PAGE_SIZE), dtype=np.uint8)
    for start in range(0, hpas.size, RESTORE_BATCH):
        sl = slice(start, start + RESTORE_BATCH)
        plain = buffer[:min(RESTORE_BATCH, hpas.size - start)]
        domain.mee.decrypt_into(plain, cipher[sl], dpas[sl])
        zero[sl] = ~plain.view(np.uint64).any(axis=1)
    buffer.fill(0)
    return zero


def _seal(keys: _Keys, header: SnapshotHeader, sections: dict[int, bytes]) -> Snapshot:
    head = header.pack(len(SECTION_KINDS))
    out = {}
    for sid, data in sections.items():
        if SECTION_KINDS[sid] == KIND_SEALED:
            nonce = os.urandom(NONCE_SIZE)
            out[sid] = nonce + keys.seal.encrypt(nonce, bytes(data), sealed_aad(head, sid))
        else:
            out[sid] = bytes(data)
    return Snapshot(header, out)


def _unseal(keys: _Keys, snap: Snapshot, sid: int) -> bytes:
    data = snap.sections[sid]
    head = snap.header.pack(len(SECTION_KINDS))
    try:
        return keys.seal.decrypt(data[:NONCE_SIZE], data[NONCE_SIZE:], sealed_aad(head, sid))
    except (InvalidTag, ValueError):
        raise SnapshotRefused("snapshot does not verify: a sealed section does not open (tampered)") from None


def _older(path: Path, header: SnapshotHeader, latest: int) -> str:
    return (f"snapshot {path} is older than the domain's latest (version {header.version}, latest "
            f"{latest}); the domain's policy is not restorable")


def _check_path(path: str | Path) -> Path:
    path = Path(path)
    if not path.is_absolute():
        raise SnapshotError(f"snapshot path {str(path)!r} is not absolute",
                            "the platform resolves no relative paths; pass an absolute one")
    return path


def _read(path: Path) -> memoryview:
    try:
        # Non-blocking open: a FIFO named here must not hang the platform before the check below.
        with os.fdopen(os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC), "rb") as f:
            info = os.fstat(f.fileno())
            if not stat.S_ISREG(info.st_mode):
                raise SnapshotRefused(f"snapshot {path} is not a regular file",
                                      "give the file qemu-kd snapshot wrote")
            if info.st_size > MAX_SNAPSHOT_BYTES:
                raise SnapshotRefused(f"snapshot {path} is larger than {MAX_SNAPSHOT_BYTES >> 30} GiB")
            # Read into a buffer of the file's size and one byte more (bounded even if the file
            # grows meanwhile; the MAC is checked over exactly these bytes).
            buffer = np.empty(info.st_size + 1, dtype=np.uint8)
            view = memoryview(buffer)
            got = 0
            while got < len(view):
                count = f.readinto(view[got:])
                if not count:
                    break
                got += count
            if got > info.st_size:
                raise SnapshotRefused(f"snapshot {path} grew while it was read",
                                      "restore a snapshot nothing is writing to")
            return view[:got]
    except OSError as exc:
        raise SnapshotError(f"cannot read the snapshot {path}: {exc.strerror or exc}") from None
