"""Key domains: KeyID allocation, the domain lifecycle and the build-time commands.

A key domain is one protected guest: a KeyID (1..63), the 64-byte key the
memory-encryption engine uses for it, the tenant's policy and host_data, and
the pages the host assigned to it.  The key never leaves the platform.

Lifecycle (every other transition raises :class:`DomainStateError`)::

    CREATED --add-pages--> BUILDING --verify-ept ok--> VERIFIED --launch--> LAUNCHED <--> EXITED
       \\___________________\\_______________________________\\___________________\\____--> DESTROYED

Host writes to the domain's PRIVATE pages are allowed in CREATED and
BUILDING only; a successful verify-ept locks them (the verdict would go stale
otherwise) and launch keeps them locked.

Launch measurement.  The host may add pages in any order, and may still
rewrite loaded ciphertext while the domain is being built.  So add-pages only
records (gpa, type, perms) per page, and :meth:`KeyDomain.finalize_measurement`
computes the chain at launch from what DRAM then holds: IMAGE and ZERO pages in
ascending gpa order, decrypted in batches, then the VMCS guest state.  The
value depends on neither the host's layout nor its add order, and covers
exactly the bytes that will run.  A ZERO page the host overwrote after
add-zero-pages no longer measures as zero and stops the launch.  The plaintext
it decrypts goes into guest RAM as it is measured (:mod:`.guestram`), so
launch does not decrypt it again.
"""

from __future__ import annotations

import enum
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

import numpy as np

from qemu_kd.common.arrays import in_ascending_order, smallest_repeated, sorted_unique
from qemu_kd.formats.ept import EPT_PERMS, EptWalk, mapping_digest_arrays, walk_ept
from qemu_kd.common.errors import KdError
from qemu_kd.formats.errors import FormatError
from qemu_kd.formats.keywrap import DOMAIN_KEY_SIZE, WrappedKey, normalize_host_data, unwrap_key
from qemu_kd.formats.measurement import LaunchMeasurement, PageType, host_verifiable_digest, page_digests
from qemu_kd.crypto.authority import tenant_authority_key
from qemu_kd.crypto.mee import MemoryEncryptionEngine
from qemu_kd.formats.addresses import KEYID_SHIFT, MAX_KEYID, PAGE_SIZE
from qemu_kd.platform.guestram import StagedRam, guest_memory_size
from qemu_kd.platform.physmem import PageState, PhysicalMemory
from qemu_kd.formats.policy import Policy
from qemu_kd.formats.vmcs import Vmcs, field_class, vmcs_field
from qemu_kd.formats.addresses import u64_array

GPA_LIMIT = 1 << 48
# Pages handled per MEE call when filling, measuring or hashing.
BATCH_PAGES = 2048
# Reasons reported per check in a verify-ept verdict before summarising the rest.
MAX_REASONS_PER_CHECK = 16
CONTROL_TYPES = (PageType.VMCS, PageType.EPT, PageType.SAVE)
GUEST_TYPES = (PageType.IMAGE, PageType.ZERO)


class DomainError(KdError):
    """Base class of key-domain command errors."""


class KeyIdExhaustedError(DomainError):
    """All 63 key-domain KeyIDs are reserved or in use."""


class DomainNotFoundError(DomainError):
    """No key domain (or reservation) with this KeyID."""


class DomainStateError(DomainError):
    """The command is not allowed in the domain's current state."""


class PageRequestError(DomainError):
    """An add-pages / add-zero-pages / hash-kd request is malformed."""


class GuestStateFieldError(DomainError):
    """vmread of a guest-state field: the host may never read those."""


class SecretPageError(DomainError):
    """hash-kd was asked for a page that is not host-verifiable."""


class DomainVerifyError(DomainError):
    """A control structure does not decrypt to something valid, or a page lost its integrity."""


class DomainState(enum.Enum):
    CREATED = "CREATED"
    BUILDING = "BUILDING"
    VERIFIED = "VERIFIED"
    LAUNCHED = "LAUNCHED"
    EXITED = "EXITED"
    DESTROYED = "DESTROYED"


TRANSITIONS: dict[DomainState, frozenset[DomainState]] = {
    DomainState.CREATED: frozenset({DomainState.BUILDING, DomainState.DESTROYED}),
    DomainState.BUILDING: frozenset({DomainState.BUILDING, DomainState.VERIFIED, DomainState.DESTROYED}),
    DomainState.VERIFIED: frozenset({DomainState.VERIFIED, DomainState.LAUNCHED, DomainState.DESTROYED}),
    DomainState.LAUNCHED: frozenset({DomainState.EXITED, DomainState.DESTROYED}),
    DomainState.EXITED: frozenset({DomainState.LAUNCHED, DomainState.DESTROYED}),
    DomainState.DESTROYED: frozenset(),
}
BUILD_STATES = frozenset({DomainState.CREATED, DomainState.BUILDING})


class KeyIdAllocator:
    """Hands out KeyIDs 1..max_keyid, lowest first."""

    def __init__(self, max_keyid: int = MAX_KEYID):
        self.max_keyid = max_keyid
        self._reserved: set[int] = set()

    def reserve(self) -> int:
        for keyid in range(1, self.max_keyid + 1):
            if keyid not in self._reserved:
                self._reserved.add(keyid)
                return keyid
        raise KeyIdExhaustedError(
            f"no free KeyID: all {self.max_keyid} key domains are in use; destroy one with destroy-kd",
            "or free an unused reservation with free")

    def release(self, keyid: int) -> None:
        if keyid not in self._reserved:
            raise DomainNotFoundError(f"KeyID {keyid} is not reserved", "see platform-info for free KeyIDs")
        self._reserved.discard(keyid)

    def is_reserved(self, keyid: int) -> bool:
        return keyid in self._reserved

    def free_keyids(self) -> list[int]:
        return [k for k in range(1, self.max_keyid + 1) if k not in self._reserved]


@dataclass
class PageBatch:
    """Pages of one add-pages or add-zero-pages request, as parallel arrays.

    ``gpas`` is ignored for VMCS, EPT and SAVE pages (they are not mapped into
    the guest).  ``verifiable`` marks IMAGE pages the tenant lets the host
    check with hash-kd.
    """

    hpas: np.ndarray
    gpas: np.ndarray
    types: np.ndarray
    perms: np.ndarray
    verifiable: np.ndarray

    def __post_init__(self) -> None:
        self.hpas = u64_array(self.hpas, "hpa", PageRequestError)
        self.gpas = u64_array(self.gpas, "gpa", PageRequestError)
        self.types = np.asarray(self.types, dtype=np.int64).reshape(-1)
        self.perms = np.asarray(self.perms, dtype=np.int64).reshape(-1)
        self.verifiable = np.asarray(self.verifiable, dtype=bool).reshape(-1)
        n = self.hpas.size
        if not all(a.size == n for a in (self.gpas, self.types, self.perms, self.verifiable)):
            raise PageRequestError("page request arrays have different lengths")

    def __len__(self) -> int:
        return int(self.hpas.size)

    @classmethod
    def from_entries(cls, entries: Iterable[Sequence]) -> "PageBatch":
        """From (hpa, gpa, type, perms[, verifiable]) tuples; gpa may be None for control pages."""
        rows = [tuple(e) for e in entries]
        for row in rows:
            if len(row) not in (4, 5):
                raise PageRequestError(f"page entry {row!r} is not (hpa, gpa, type, perms[, verifiable])")
        return cls(
            hpas=[r[0] for r in rows],
            gpas=[0 if r[1] is None else r[1] for r in rows],
            types=[int(r[2]) for r in rows],
            perms=[r[3] for r in rows],
            verifiable=[bool(r[4]) if len(r) == 5 else False for r in rows],
        )

    @classmethod
    def zero_pages(cls, entries: Iterable[Sequence]) -> "PageBatch":
        """From (hpa, gpa, perms) tuples."""
        rows = [tuple(e) for e in entries]
        for row in rows:
            if len(row) != 3:
                raise PageRequestError(f"zero-page entry {row!r} is not (hpa, gpa, perms)")
        return cls(hpas=[r[0] for r in rows], gpas=[r[1] for r in rows],
                   types=[PageType.ZERO] * len(rows), perms=[r[2] for r in rows],
                   verifiable=[False] * len(rows))


@dataclass
class EptVerdict:
    """Result of verify-ept."""

    ok: bool
    reasons: list[str]
    mapping_digest: bytes
    mapped_pages: int
    table_pages: int = 0


class _GpaSet:
    """A set of gpas kept as a few sorted arrays: adding a batch sorts only the batch, and
    merges it with the last arrays while they are not much larger (so there are never more
    than about log2 of the pages, and every gpa is merged about that often)."""

    def __init__(self, gpas: np.ndarray | None = None):
        self._parts: list[np.ndarray] = []
        if gpas is not None:
            self.add(gpas)

    def add(self, gpas: np.ndarray) -> None:
        """Record ``gpas`` (none of them recorded yet)."""
        part = in_ascending_order(np.asarray(gpas, dtype=np.uint64))
        while self._parts and self._parts[-1].size <= 2 * part.size:
            part = np.sort(np.concatenate((self._parts.pop(), part)), kind="stable")   # two runs: merged
        if part.size:
            self._parts.append(part)

    def smallest_of(self, gpas: np.ndarray) -> int | None:
        """The smallest of ``gpas`` already recorded, or None."""
        gpas = np.asarray(gpas, dtype=np.uint64).reshape(-1)
        found = None
        for part in self._parts:
            at = np.minimum(np.searchsorted(part, gpas), part.size - 1)
            hit = part[at] == gpas
            if hit.any():
                low = int(gpas[hit].min())
                found = low if found is None else min(found, low)
        return found


@dataclass
class _PageTable:
    """The domain's pages (hpa, gpa, type, perms, verifiable), grown batch by batch."""

    chunks: list[PageBatch] = field(default_factory=list)
    guest_gpas: _GpaSet = field(default_factory=_GpaSet)
    vmcs_hpa: int | None = None

    def add(self, batch: PageBatch) -> None:
        self.chunks.append(batch)

    def all(self) -> PageBatch:
        if not self.chunks:
            return PageBatch([], [], [], [], [])
        if len(self.chunks) > 1:
            self.chunks = [PageBatch(*(np.concatenate([getattr(c, name) for c in self.chunks])
                                       for name in ("hpas", "gpas", "types", "perms", "verifiable")))]
        return self.chunks[0]


class KeyDomain:
    """One key domain: KeyID, key (inside the MEE), policy, host_data, pages, state."""

    def __init__(self, keyid: int, key: bytes, policy: Policy, host_data: bytes, memory: PhysicalMemory):
        if len(key) != DOMAIN_KEY_SIZE:
            raise DomainError(f"a key-domain key is {DOMAIN_KEY_SIZE} bytes, not {len(key)}")
        self.keyid = keyid
        self.policy = policy
        self.host_data = normalize_host_data(host_data)
        self.state = DomainState.CREATED
        self.verdict: EptVerdict | None = None
        self.measurement: LaunchMeasurement | None = None
        self._mapping: tuple[np.ndarray, np.ndarray] | None = None
        self._mee: MemoryEncryptionEngine | None = MemoryEncryptionEngine(bytes(key))
        # Kept for snapshot-kd, which seals it into the snapshot (platform/snapshot.py).
        self._key: bytes | None = bytes(key)
        # Given to the guest only, on the guest port: it authenticates the tenant's session.
        self.tenant_authority: bytes | None = tenant_authority_key(bytes(key))
        self._memory = memory
        self._pages = _PageTable()
        # Hooks for the running guest (set by launch): re-encrypt changed guest
        # pages into DRAM before a host read, and stop QEMU before destroy.
        self.shadow_sync: Callable[[], None] | None = None
        self.on_destroy: Callable[[], None] | None = None
        # Guest RAM filled ahead of launch (guestram.py): by measure-kd, or by restore-kd.
        self._staged: StagedRam | None = None
        # restore-kd's pages whose DRAM ciphertext is produced on first access (defer_restored):
        # their hpas, sorted, and where their plaintext comes from.
        self._deferred: tuple[np.ndarray, Callable[[np.ndarray], np.ndarray]] | None = None

    @classmethod
    def create(cls, keyid: int, wrapped_key: WrappedKey | bytes, policy: Policy | bytes,
               host_data: bytes, kak_private, memory: PhysicalMemory) -> "KeyDomain":
        """create-kd: unwrap the tenant's key with the platform's KAK and program ``keyid``."""
        if not isinstance(policy, Policy):
            policy = Policy.unpack(bytes(policy))
        if not isinstance(wrapped_key, WrappedKey):
            wrapped_key = WrappedKey.unpack(bytes(wrapped_key))
        host_data = normalize_host_data(bytes(host_data))
        key = unwrap_key(wrapped_key, kak_private, policy, host_data)
        return cls(keyid, key, policy, host_data, memory)

    # ------------------------------------------------------------------ state

    def _require(self, command: str, allowed: Iterable[DomainState]) -> None:
        wanted = set(allowed)
        allowed = tuple(s for s in DomainState if s in wanted)  # lifecycle order
        if self.state not in allowed:
            names = ", ".join(s.value for s in allowed)
            raise DomainStateError(
                f"key domain {self.keyid} is {self.state.value}: {command} is allowed only in {names}",
                _state_hint(self.state))

    def _transition(self, target: DomainState, command: str) -> None:
        if target not in TRANSITIONS[self.state]:
            raise DomainStateError(
                f"key domain {self.keyid}: cannot go from {self.state.value} to {target.value} ({command})",
                _state_hint(self.state))
        self.state = target

    @property
    def mee(self) -> MemoryEncryptionEngine:
        if self._mee is None:
            raise DomainStateError(f"key domain {self.keyid} is DESTROYED: its key is gone")
        return self._mee

    def snapshot_key(self) -> bytes:
        """The domain key, for the platform to seal into a snapshot (platform-internal)."""
        if self._key is None:
            raise DomainStateError(f"key domain {self.keyid} is DESTROYED: its key is gone")
        return self._key

    def _dpas(self, hpas: np.ndarray) -> np.ndarray:
        return hpas.astype(np.uint64) | np.uint64(self.keyid << KEYID_SHIFT)

    def decrypt_pages(self, hpas: np.ndarray) -> bytes:
        """Plaintext of the domain's pages at ``hpas`` (platform-internal)."""
        return self.decrypt_page_array(hpas).tobytes()

    def decrypt_page_array(self, hpas: np.ndarray) -> np.ndarray:
        """Plaintext of the domain's pages at ``hpas`` as an (n, 4096) array (platform-internal).

        The engine decrypts in place, in the copy DRAM hands out."""
        hpas = np.asarray(hpas, dtype=np.uint64)
        pages = self._memory.read_pages(hpas)
        self.mee.decrypt_into(pages, pages, self._dpas(hpas))
        return pages

    def decrypt_into(self, out: np.ndarray, hpas: np.ndarray) -> None:
        """Plaintext of the domain's pages at ``hpas`` into ``out``, an (n, 4096) array, decrypted
        from DRAM without a copy of the ciphertext first (platform-internal)."""
        hpas = np.asarray(hpas, dtype=np.uint64)
        self.mee.decrypt_into(out, self._memory.view_pages(hpas), self._dpas(hpas))

    def encrypt_into_dram(self, hpas: np.ndarray, plaintext: bytes | np.ndarray) -> None:
        """Encrypt plaintext pages for their hpas and store them in DRAM (platform-internal)."""
        hpas = np.asarray(hpas, dtype=np.uint64)
        sealed = np.empty((hpas.size, PAGE_SIZE), dtype=np.uint8)
        self.mee.encrypt_into(sealed, plaintext, self._dpas(hpas))
        self._memory.write_pages(hpas, sealed)

    def store_shared(self, hpas: np.ndarray, plaintext: bytes | np.ndarray) -> None:
        """Store plaintext into the domain's SHARED pages (what the host sees there)."""
        self._memory.write_pages(np.asarray(hpas, dtype=np.uint64), plaintext)

    def load_shared(self, hpas: np.ndarray) -> np.ndarray:
        """The plaintext DRAM holds for the domain's SHARED pages (the host may have written it)."""
        return self._memory.read_pages(np.asarray(hpas, dtype=np.uint64))

    def _fill_encrypted_zeros(self, hpas: np.ndarray) -> None:
        zeros = bytes(min(hpas.size, BATCH_PAGES) * PAGE_SIZE)
        for start in range(0, hpas.size, BATCH_PAGES):
            chunk = hpas[start:start + BATCH_PAGES]
            self.encrypt_into_dram(chunk, zeros[:chunk.size * PAGE_SIZE])

    def defer_restored(self, hpas: np.ndarray, plaintext: Callable[[np.ndarray], np.ndarray]) -> None:
        """restore-kd: the DRAM ciphertext of the domain's pages at ``hpas`` is produced when anything
        first reads or partly writes one of them (physmem.defer_fill), as for ZERO pages.

        ``plaintext(hpas)`` gives those pages' plaintext as an (n, 4096) array the caller may wipe:
        the snapshot's, which the shadow sync's baseline also starts from.  So DRAM holds, whenever
        anyone looks, exactly what encrypting the pages during the restore would have stored; a page
        the guest changed meanwhile is re-encrypted by the sync, which stores whole pages and so
        leaves nothing of it to fill."""
        hpas = np.sort(np.asarray(hpas, dtype=np.uint64))
        if not hpas.size:
            return
        self._memory.defer_fill(hpas, self.keyid, self._fill_deferred)
        self._deferred = (hpas, plaintext)

    def _fill_deferred(self, hpas: np.ndarray) -> None:
        """Produce the DRAM ciphertext of pending pages: restored ones from their plaintext, the
        others (ZERO pages) as encrypted zeros.  No page becomes pending after the domain is built
        (add-zero-pages and restore-kd are build steps, and every ownership change clears it), so
        a pending restored hpa is still the page the restore deferred."""
        hpas = np.asarray(hpas, dtype=np.uint64)
        if self._deferred is not None and hpas.size:
            known, plaintext = self._deferred
            at = np.minimum(np.searchsorted(known, hpas), known.size - 1)
            mine = known[at] == hpas
            restored = hpas[mine]
            try:
                for start in range(0, restored.size, BATCH_PAGES):
                    chunk = restored[start:start + BATCH_PAGES]
                    plain = plaintext(chunk)
                    try:
                        self.encrypt_into_dram(chunk, plain)
                    finally:
                        plain.fill(0)
            except KdError:
                raise
            except Exception as exc:   # noqa: BLE001 - e.g. out of memory: refused, pages stay pending
                raise DomainError(f"key domain {self.keyid}: its restored pages cannot be written into "
                                  f"DRAM ({type(exc).__name__}: {exc})",
                                  "destroy the domain; nothing was served in their place") from None
            if restored.size and not self._memory.pending_fill(known).any():
                self._deferred = None       # all written: the snapshot's data is no longer held
            hpas = hpas[~mine]
        if hpas.size:
            self._fill_encrypted_zeros(hpas)

    # -------------------------------------------------------------- add pages

    def add_pages(self, batch: PageBatch) -> None:
        """add-pages: assign loaded ciphertext pages to the domain (measured at launch)."""
        self._require("add-pages", BUILD_STATES)
        if not len(batch):
            return
        types = batch.types
        known = np.isin(types, [int(t) for t in PageType])
        if not known.all():
            raise PageRequestError(f"page type {int(types[np.argmax(~known)])} is not one of "
                                   f"{', '.join(f'{t.value} {t.name}' for t in PageType)}")
        if (types == PageType.ZERO).any():
            raise PageRequestError("add-pages cannot add ZERO pages: the platform fills those itself",
                                   "use add-zero-pages")
        control = np.isin(types, [int(t) for t in CONTROL_TYPES])
        if (batch.verifiable & (types == PageType.SAVE)).any():
            raise PageRequestError("a SAVE page can never be host-verifiable: it holds guest registers")
        n_vmcs = int(np.count_nonzero(types == PageType.VMCS))
        if n_vmcs > 1 or (n_vmcs and self._pages.vmcs_hpa is not None):
            raise PageRequestError(f"key domain {self.keyid} gets exactly one VMCS page")
        self._check_guest_pages(batch, ~control)
        idx = self._memory.assign_private(batch.hpas, self.keyid, types.astype(np.uint8))
        del idx
        if n_vmcs:
            self._pages.vmcs_hpa = int(batch.hpas[np.argmax(types == PageType.VMCS)])
        save = batch.hpas[types == PageType.SAVE]
        if save.size:
            self._fill_encrypted_zeros(save)  # content matters only after the first exit
        self._record(batch, ~control)
        self._transition(DomainState.BUILDING, "add-pages")

    def add_zero_pages(self, batch: PageBatch) -> None:
        """add-zero-pages: the platform fills the pages with encrypted zeros itself."""
        self._require("add-zero-pages", BUILD_STATES)
        if not len(batch):
            return
        if (batch.types != PageType.ZERO).any():
            raise PageRequestError("add-zero-pages takes only ZERO pages")
        everything = np.ones(len(batch), dtype=bool)
        self._check_guest_pages(batch, everything)
        self._memory.assign_private(batch.hpas, self.keyid, PageType.ZERO)
        # DRAM gets the encrypted zeros on first access (physmem.defer_fill): a 256 MiB
        # guest's zero pages cost no encryption unless someone looks at them.
        self._memory.defer_fill(batch.hpas, self.keyid, self._fill_deferred)
        self._record(batch, everything)
        self._transition(DomainState.BUILDING, "add-zero-pages")

    def _check_guest_pages(self, batch: PageBatch, guest: np.ndarray) -> None:
        gpas, perms = batch.gpas[guest], batch.perms[guest]
        if not gpas.size:
            return
        bad = (gpas % PAGE_SIZE != 0) | (gpas >= GPA_LIMIT)
        if bad.any():
            raise PageRequestError(f"gpa 0x{int(gpas[np.argmax(bad)]):x} is not a page-aligned "
                                   "48-bit guest-physical address")
        bad = (perms <= 0) | (perms > EPT_PERMS)
        if bad.any():
            raise PageRequestError(f"gpa 0x{int(gpas[np.argmax(bad)]):x}: perms {int(perms[np.argmax(bad)])} "
                                   "is not a non-empty R/W/X combination (1..7)")
        repeated = smallest_repeated(gpas)
        if repeated is not None:
            raise PageRequestError(f"gpa 0x{repeated:x} appears twice in one request")
        clash = self._pages.guest_gpas.smallest_of(gpas)
        if clash is not None:
            raise PageRequestError(f"gpa 0x{clash:x} was already added to key domain {self.keyid}")

    def _record(self, batch: PageBatch, guest: np.ndarray) -> None:
        self._pages.guest_gpas.add(batch.gpas[guest])
        self._pages.add(batch)

    def pages(self) -> PageBatch:
        """All pages added so far (hpa, gpa, type, perms, verifiable)."""
        return self._pages.all()

    # ----------------------------------------------------------------- hash-kd

    def verifiable_hpas(self) -> np.ndarray:
        """hpas hash-kd covers: the VMCS, the EPT pages and IMAGE pages the tenant marked."""
        pages = self.pages()
        mask = np.isin(pages.types, [PageType.VMCS, PageType.EPT]) | (
            (pages.types == PageType.IMAGE) & pages.verifiable)
        return np.sort(pages.hpas[mask])

    def hash_kd(self, hpas: Iterable[int] | None = None) -> bytes:
        """hash-kd: SHA-384 over (hpa || plaintext) of host-verifiable pages in hpa order.

        With ``hpas`` the digest covers just those pages, and every one must be
        host-verifiable; a secret page is refused.
        """
        self._require("hash-kd", [s for s in DomainState if s != DomainState.DESTROYED])
        allowed = self.verifiable_hpas()
        if hpas is None:
            chosen = allowed
        else:
            hpas = hpas if isinstance(hpas, np.ndarray) else list(hpas)
            chosen = np.sort(self._memory.page_indices(hpas).astype(np.uint64) * np.uint64(PAGE_SIZE))
            secret = ~np.isin(chosen, allowed)
            if secret.any():
                hpa = int(chosen[np.argmax(secret)])
                owner = self._memory.owner(hpa)
                raise SecretPageError(
                    f"hash-kd refused for hpa 0x{hpa:x} ({owner}): only the VMCS, EPT pages and pages the "
                    f"tenant marked host-verifiable of key domain {self.keyid} can be hashed",
                    "leave hpas out to hash every host-verifiable page")
        records: list[tuple[int, bytes]] = []
        for start in range(0, chosen.size, BATCH_PAGES):
            chunk = chosen[start:start + BATCH_PAGES]
            plain = self.decrypt_pages(chunk)
            records += [(int(h), plain[i * PAGE_SIZE:(i + 1) * PAGE_SIZE]) for i, h in enumerate(chunk)]
        return host_verifiable_digest(records)

    # ------------------------------------------------------------------ vmread

    def read_vmcs(self) -> Vmcs:
        """The decrypted, decoded VMCS (platform-internal: it holds guest state)."""
        if self._pages.vmcs_hpa is None:
            raise DomainStateError(f"key domain {self.keyid} has no VMCS page yet",
                                   "add the VMCS page with add-pages (type VMCS) first")
        plain = self.decrypt_pages(np.array([self._pages.vmcs_hpa], dtype=np.uint64))
        try:
            return Vmcs.unpack(plain)
        except FormatError:
            # The format error could quote decrypted values: say only what is wrong.
            raise DomainVerifyError(
                f"the VMCS page of key domain {self.keyid} (hpa 0x{self._pages.vmcs_hpa:x}) does not "
                "decrypt to a valid VMCS",
                "it was sealed for another hpa or key, or its ciphertext was changed") from None

    @property
    def vmcs_hpa(self) -> int | None:
        return self._pages.vmcs_hpa

    def vmread(self, encoding: int) -> int:
        """vmread: value of a control, host-state or read-only field; guest state is refused."""
        self._require("vmread", [s for s in DomainState if s != DomainState.DESTROYED])
        f = vmcs_field(encoding)  # UnknownFieldError for an unknown encoding
        if field_class(encoding) == "guest":
            raise GuestStateFieldError(
                f"vmread of guest-state field {f.name} (0x{encoding:04x}) refused: the host may read only "
                "control, host-state and read-only fields of a key domain's VMCS")
        return self.read_vmcs().read_field(encoding)

    # -------------------------------------------------------------- verify-ept

    def verify_ept(self, host_allocation: Iterable[int]) -> EptVerdict:
        """verify-ept: walk the decrypted EPT and check it against the host's allocation."""
        self._require("verify-ept", [DomainState.CREATED, DomainState.BUILDING, DomainState.VERIFIED,
                                     DomainState.LAUNCHED, DomainState.EXITED])
        if self.state == DomainState.CREATED or self._pages.vmcs_hpa is None:
            raise DomainStateError(f"key domain {self.keyid} is {self.state.value} without a VMCS page: "
                                   "verify-ept needs the VMCS and the EPT pages",
                                   "add them with add-pages first")
        if not isinstance(host_allocation, np.ndarray):
            host_allocation = list(host_allocation)
        allocation = sorted_unique(self._memory.page_indices(host_allocation, what="allocated hpa", unique=False))
        eptp = self.read_vmcs().ept_pointer
        walk, stray_tables = self._walk(eptp)
        reasons = self._check_walk(walk, stray_tables, allocation)
        verdict = EptVerdict(ok=not reasons, reasons=reasons,
                             mapping_digest=mapping_digest_arrays(walk.gpas, walk.hpas, walk.perms),
                             mapped_pages=int(walk.gpas.size), table_pages=len(walk.table_hpas))
        self.verdict = verdict
        if verdict.ok:
            self._mapping = self._mapping_arrays(walk)
        if verdict.ok and self.state == DomainState.BUILDING:
            self._transition(DomainState.VERIFIED, "verify-ept")
            self._memory.set_write_locked(self.keyid, True)
        return verdict

    @staticmethod
    def _mapping_arrays(walk: EptWalk) -> tuple[np.ndarray, np.ndarray]:
        return walk.gpas, walk.hpas

    def guest_mapping(self) -> tuple[np.ndarray, np.ndarray]:
        """(gpas, hpas) of every 4 KiB page the EPT maps, as verified by verify-ept.

        The pages are write-locked once verified, so the walk verify-ept did is
        reused; before that the EPT is walked now.
        """
        if self._mapping is not None and self.state in (DomainState.VERIFIED, DomainState.LAUNCHED,
                                                        DomainState.EXITED):
            return self._mapping
        walk, _stray = self._walk(self.read_vmcs().ept_pointer)
        return self._mapping_arrays(walk)

    def replace_guest_mapping(self, gpas: np.ndarray, hpas: np.ndarray) -> None:
        """A control update changed the EPT of the running domain: its mapping is now (gpas, hpas).

        The guest pages it records follow: pages no longer mapped are dropped,
        a moved page keeps its gpa, type, perms and host-verifiable flag at its
        new hpa, and a newly accepted page is a ZERO page with full perms.
        """
        gpas = np.asarray(gpas, dtype=np.uint64)
        hpas = np.asarray(hpas, dtype=np.uint64)
        pages = self.pages()
        guest = np.isin(pages.types, [int(t) for t in GUEST_TYPES])
        control = PageBatch(*(getattr(pages, n)[~guest] for n in ("hpas", "gpas", "types", "perms",
                                                                 "verifiable")))
        old_gpas = pages.gpas[guest]
        order = np.argsort(old_gpas)
        at = np.minimum(np.searchsorted(old_gpas[order], gpas), max(old_gpas.size - 1, 0))
        known = old_gpas[order][at] == gpas if old_gpas.size else np.zeros(gpas.size, dtype=bool)
        src = order[at]
        types = np.where(known, pages.types[guest][src] if old_gpas.size else 0, int(PageType.ZERO))
        perms = np.where(known, pages.perms[guest][src] if old_gpas.size else 0, EPT_PERMS)
        verifiable = known & (pages.verifiable[guest][src] if old_gpas.size else known)
        self._pages.chunks = [control, PageBatch(hpas, gpas, types, perms, verifiable)]
        self._pages.guest_gpas = _GpaSet(gpas)
        self._mapping = (gpas, hpas)

    def _walk(self, eptp: int) -> tuple[EptWalk, list[int]]:
        ept_hpas = self._memory.pages_owned_by(self.keyid, PageState.PRIVATE, PageType.EPT)
        tables: dict[int, bytes] = {}
        for start in range(0, ept_hpas.size, BATCH_PAGES):
            chunk = ept_hpas[start:start + BATCH_PAGES]
            plain = self.decrypt_pages(chunk)
            tables.update({int(h): plain[i * PAGE_SIZE:(i + 1) * PAGE_SIZE] for i, h in enumerate(chunk)})
        stray: list[int] = []
        empty = bytes(PAGE_SIZE)

        def read_page(hpa: int) -> bytes:
            if hpa in tables:
                return tables[hpa]
            stray.append(hpa)  # never decrypt or follow a page that is not this domain's EPT page
            return empty

        return walk_ept(eptp, read_page), stray

    def _check_walk(self, walk: EptWalk, stray_tables: list[int], allocation: np.ndarray) -> list[str]:
        memory, keyid = self._memory, self.keyid
        out = _Reasons()
        for problem in walk.problems:
            if "maps an EPT table page" in problem:
                out.add("control-page", problem)
            elif "reserved" in problem:
                out.add("reserved-bits", problem)
            else:
                out.add("ept-entry", problem)
        for hpa in stray_tables:
            where = "beyond the end of physical memory" if hpa >= memory.size else str(memory.owner(hpa))
            out.add("ept-table", f"EPT table at hpa 0x{hpa:x} is not an EPT page of key domain {keyid} "
                                 f"({where})")
        n = int(walk.gpas.size)
        gpas, hpas, perms = walk.gpas, walk.hpas, walk.perms.astype(np.int64)

        # alias: two gpas -> one hpa
        order = np.argsort(hpas, kind="stable")
        sorted_hpas = hpas[order]
        dup = np.flatnonzero(sorted_hpas[1:] == sorted_hpas[:-1])
        for d in dup.tolist():
            a, b = int(order[d]), int(order[d + 1])
            out.add("alias", f"hpa 0x{int(hpas[a]):x} is mapped at gpa 0x{int(gpas[a]):x} "
                             f"and at gpa 0x{int(gpas[b]):x}")

        inside = hpas < np.uint64(memory.size)
        for i in np.flatnonzero(~inside).tolist():
            out.add("unallocated", f"gpa 0x{int(gpas[i]):x} maps hpa 0x{int(hpas[i]):x}, beyond the end "
                                   f"of physical memory (0x{memory.size:x})")
        pos = np.flatnonzero(inside)
        idx = (hpas[pos] // np.uint64(PAGE_SIZE)).astype(np.int64)
        state, owner_keyid, page_type = memory.owner_arrays(idx)

        not_listed = ~np.isin(idx, allocation)
        for j in np.flatnonzero(not_listed).tolist():
            i = int(pos[j])
            out.add("unallocated", f"gpa 0x{int(gpas[i]):x} maps hpa 0x{int(hpas[i]):x}, which is not in "
                                   "the host's allocation")
        free = (state == PageState.FREE) & ~not_listed
        for j in np.flatnonzero(free).tolist():
            i = int(pos[j])
            out.add("unallocated", f"gpa 0x{int(gpas[i]):x} maps hpa 0x{int(hpas[i]):x}, which is FREE")
        used = state != PageState.FREE
        foreign = used & (owner_keyid != keyid)
        for j in np.flatnonzero(foreign).tolist():
            i = int(pos[j])
            out.add("foreign", f"gpa 0x{int(gpas[i]):x} maps hpa 0x{int(hpas[i]):x}, which belongs to "
                               f"KeyID {int(owner_keyid[j])}: {memory.owner(int(hpas[i]))}")
        own = used & (owner_keyid == keyid)
        private = own & (state == PageState.PRIVATE)
        control = private & np.isin(page_type, [int(t) for t in CONTROL_TYPES])
        for j in np.flatnonzero(control).tolist():
            i = int(pos[j])
            out.add("control-page", f"gpa 0x{int(gpas[i]):x} maps hpa 0x{int(hpas[i]):x}, the domain's "
                                    f"{PageType(int(page_type[j])).name} page, into the guest")
        unassigned = own & (state == PageState.HOST)
        for j in np.flatnonzero(unassigned).tolist():
            i = int(pos[j])
            out.add("unassigned", f"gpa 0x{int(gpas[i]):x} maps hpa 0x{int(hpas[i]):x}, which was allocated "
                                  "but never added to the domain")

        # Measured pages must appear in the guest exactly where and how they were measured.
        pages = self.pages()
        guest = np.isin(pages.types, [int(t) for t in GUEST_TYPES])
        p_hpas, p_gpas, p_perms = pages.hpas[guest], pages.gpas[guest], pages.perms[guest]
        if n:
            at = np.minimum(np.searchsorted(sorted_hpas, p_hpas), n - 1)
            mapped = sorted_hpas[at] == p_hpas
            where = order[at]
        else:
            mapped = np.zeros(p_hpas.size, dtype=bool)
            where = np.zeros(p_hpas.size, dtype=np.int64)
        wrong_gpa = mapped & (gpas[where] != p_gpas) if n else mapped
        wrong_perms = mapped & ~wrong_gpa & (perms[where] != p_perms) if n else mapped
        for j in np.flatnonzero(~mapped).tolist():
            out.add("unmapped", f"page hpa 0x{int(p_hpas[j]):x} was added for gpa 0x{int(p_gpas[j]):x} "
                                "but the EPT does not map it")
        for j in np.flatnonzero(wrong_gpa).tolist():
            out.add("gpa-mismatch", f"page hpa 0x{int(p_hpas[j]):x} was added for gpa 0x{int(p_gpas[j]):x} "
                                    f"but the EPT maps it at gpa 0x{int(gpas[where[j]]):x}")
        for j in np.flatnonzero(wrong_perms).tolist():
            out.add("perms-mismatch", f"gpa 0x{int(p_gpas[j]):x} (hpa 0x{int(p_hpas[j]):x}) was added with "
                                      f"perms {int(p_perms[j])} but the EPT grants {int(perms[where[j]])}")
        return out.finish()

    # ---------------------------------------------------------------- launch

    def finalize_measurement(self, ram_ready: Callable[[StagedRam], None] | None = None) -> bytes:
        """The launch digest of what DRAM holds now (see module docstring).

        ``ram_ready(staged)`` is called with the guest RAM the measurement is about to fill,
        before it fills it (the platform starts the domain's QEMU on it meanwhile)."""
        self._require("launch", [DomainState.VERIFIED])
        pages = self.pages()
        guest = np.isin(pages.types, [int(t) for t in GUEST_TYPES])
        order = np.argsort(pages.gpas[guest], kind="stable")
        hpas = pages.hpas[guest][order]
        gpas = pages.gpas[guest][order]
        types = pages.types[guest][order]
        perms = pages.perms[guest][order]
        is_zero = types == PageType.ZERO
        tampered = is_zero & self._memory.host_written(hpas) if hpas.size else is_zero
        measurement = LaunchMeasurement(self.policy)
        self.discard_staged_ram()
        staged = StagedRam(guest_memory_size(self.guest_mapping()[0]))
        self._staged = staged
        try:
            if ram_ready is not None:
                ram_ready(staged)
            # A batch's image pages are decrypted from DRAM straight into the guest RAM's
            # baseline, written into guest RAM from there, and hashed there on a worker thread
            # (hashlib lets go of the interpreter lock on page-sized buffers) while this one goes
            # on with the next batch; the batch's records are chained after that.
            with ThreadPoolExecutor(1, thread_name_prefix=f"kd{self.keyid}-measure") as hasher:
                hashing = None
                for start in range(0, hpas.size, BATCH_PAGES):
                    sl = slice(start, start + BATCH_PAGES)
                    self._check_zero_pages(hpas[sl][tampered[sl]], gpas[sl][tampered[sl]])
                    image_sl = ~is_zero[sl]
                    image_hpas = hpas[sl][image_sl]
                    pieces: list[Future] = []

                    def produce(rows: np.ndarray, first: int, last: int, image_hpas=image_hpas,
                                pieces=pieces) -> None:
                        self.decrypt_into(rows, image_hpas[first:last])
                        pieces.append(hasher.submit(page_digests, rows))

                    staged.fill_with(gpas[sl][image_sl] // PAGE_SIZE, image_hpas, produce)
                    digests = _Digests(pieces)
                    if hashing is not None:
                        measurement.add_hashed_pages(*hashing[:3], hashing[3].result())
                    hashing = (gpas[sl], np.where(is_zero[sl], int(PageType.ZERO), int(PageType.IMAGE)),
                               perms[sl], digests)
                if hashing is not None:
                    measurement.add_hashed_pages(*hashing[:3], hashing[3].result())
            measurement.add_vmcs(self.read_vmcs().guest_state_bytes())
            measurement.finalize()
        except BaseException:
            # Whoever ram_ready started on the RAM stops that first, then discards the RAM.
            if ram_ready is None:
                self.discard_staged_ram()
            raise
        self.measurement = measurement
        return measurement.digest

    def _check_zero_pages(self, hpas: np.ndarray, gpas: np.ndarray) -> None:
        """ZERO pages the host wrote after add-zero-pages must still decrypt to zeros."""
        if not hpas.size:
            return
        written = np.flatnonzero(self.decrypt_page_array(hpas).any(axis=1))
        if written.size:
            j = int(written[0])
            raise DomainVerifyError(
                f"zero page gpa 0x{int(gpas[j]):x} (hpa 0x{int(hpas[j]):x}) of key "
                f"domain {self.keyid} was overwritten after add-zero-pages",
                "destroy the domain and build it again")

    def launch_measurement(self, ram_ready: Callable[[StagedRam], None] | None = None) -> bytes:
        """measure-kd: the launch digest, computed once the domain is VERIFIED (pages are locked then);
        ``ram_ready`` as for :meth:`finalize_measurement` (not called when the digest is known)."""
        if self.measurement is not None and self.state in (DomainState.VERIFIED, DomainState.LAUNCHED,
                                                           DomainState.EXITED):
            return self.measurement.digest
        self._require("measure-kd", [DomainState.VERIFIED])
        return self.finalize_measurement(ram_ready)

    def stage_ram(self, staged: StagedRam) -> None:
        """Keep ``staged`` (guest RAM restore-kd filled) for launch; any earlier one is discarded."""
        self.discard_staged_ram()
        self._staged = staged

    @property
    def staged_ram(self) -> StagedRam | None:
        """The guest RAM filled ahead of launch, if any (the domain keeps it)."""
        return self._staged

    def take_staged_ram(self) -> StagedRam | None:
        """The guest RAM filled ahead of launch, if any; the caller owns it from here on."""
        staged, self._staged = self._staged, None
        return staged

    def discard_staged_ram(self) -> None:
        if self._staged is not None:
            self._staged.close()
            self._staged = None

    def require_state(self, command: str, allowed: Iterable[DomainState]) -> None:
        """DomainStateError unless the domain is in one of ``allowed``."""
        self._require(command, allowed)

    def mark_launched(self) -> None:
        """VERIFIED -> LAUNCHED (or EXITED -> LAUNCHED on resume); host writes stay locked."""
        if self.state == DomainState.VERIFIED and not (self.verdict and self.verdict.ok):
            raise DomainStateError(f"key domain {self.keyid} has no passing verify-ept verdict")
        self._transition(DomainState.LAUNCHED, "launch" if self.state == DomainState.VERIFIED else "resume")
        self._memory.set_write_locked(self.keyid, True)

    def mark_exited(self) -> None:
        self._transition(DomainState.EXITED, "exit")

    # ---------------------------------------------------------------- destroy

    def destroy(self) -> int:
        """destroy-kd: scrub and free every page of the domain and forget the key."""
        self._transition(DomainState.DESTROYED, "destroy-kd")
        self.discard_staged_ram()
        freed = self._memory.release_keyid(self.keyid)
        self._deferred = None
        if self._mee is not None:
            self._mee.close()
            self._mee = None
            self.tenant_authority = None
        self._key = None
        self._pages = _PageTable()
        return freed


class _Reasons:
    """Verdict reasons, "<check>: <detail>", at most MAX_REASONS_PER_CHECK per check."""

    def __init__(self) -> None:
        self._items: list[str] = []
        self._counts: dict[str, int] = {}

    def add(self, check: str, detail: str) -> None:
        count = self._counts.get(check, 0) + 1
        self._counts[check] = count
        if count <= MAX_REASONS_PER_CHECK:
            self._items.append(f"{check}: {detail}")

    def finish(self) -> list[str]:
        extra = [f"{check}: ... and {count - MAX_REASONS_PER_CHECK} more"
                 for check, count in self._counts.items() if count > MAX_REASONS_PER_CHECK]
        return self._items + extra


@dataclass
class _Digests:
    """The page digests of a batch's image pages, hashed piece by piece on a worker thread."""

    pieces: list[Future]

    def result(self) -> np.ndarray:
        """The (n, 48) digests of every piece, in order."""
        if not self.pieces:
            return page_digests(np.empty((0, PAGE_SIZE), dtype=np.uint8))
        return np.concatenate([piece.result() for piece in self.pieces])


def _state_hint(state: DomainState) -> str:
    return {
        DomainState.CREATED: "add its pages with add-pages and add-zero-pages",
        DomainState.BUILDING: "finish adding pages, then run verify-ept",
        DomainState.VERIFIED: "the domain is verified and locked; launch it or destroy it",
        DomainState.LAUNCHED: "the domain is running; exit it or destroy it",
        DomainState.EXITED: "the domain is exited; resume it or destroy it",
        DomainState.DESTROYED: "the domain is gone; create a new one",
    }[state]


