"""Guest-verified changes to a running key domain's VMCS and EPT (docs/protocol.md).

The host asks the guest (on the shared channel); the guest checks the request
against its measured control policy and, if it agrees, asks the platform on
the guest port to **seal** the change: :meth:`ControlPlane.seal` builds the new
EPT/VMCS pages from the installed ones and the operations the guest named,
encrypts them under the domain key for their hpas, numbers the result and
tags it with a MAC key only the platform holds.  The guest hands that update
to the host, which can only verify it (staged ``hash-kd``, ``vmread`` and
``verify-ept``) and install it.  :meth:`ControlPlane.install` applies it only
if the tag verifies, the pages decrypt to valid structures under the domain
key, the operations match what the new EPT does, and the update is built on
the installed version and newer than it.  Then it takes effect in the running
guest:

- UNMAP (balloon out): the gpa is unmapped in guest RAM, its page scrubbed and
  FREE for the host;
- ACCEPT (balloon in): the host's page becomes the gpa's PRIVATE page, zeroed;
- MOVE (relocate): the gpa's contents are re-encrypted into the new hpa, the old
  page scrubbed and FREE;
- SHARE / UNSHARE: the gpa's page becomes SHARED (its plaintext in DRAM, synced
  with guest RAM both ways) or PRIVATE again (zeroed);
- VMCS: ``exit_interval_ms`` starts, changes or stops the platform's periodic
  host-forced exit (reason ``interval``); ``exposed_register_mask`` may shrink.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import os
import struct
import threading
from dataclasses import dataclass, field

import numpy as np

from qemu_kd.common.arrays import count_distinct
from qemu_kd.common.errors import KdError
from qemu_kd.formats.addresses import KEYID_SHIFT, PAGE_SIZE, UNMAPPED
from qemu_kd.formats.ctlupdate import (
    MAX_OP_PAGES,
    NO_HPA,
    PAGE_TYPE_EPT,
    PAGE_TYPE_VMCS,
    ControlPage,
    ControlUpdate,
    Op,
    PageOp,
    compress,
    expand,
)
from qemu_kd.formats.ept import (
    ADDRESS_MASK,
    EPT_MEMTYPE_SHIFT,
    EPT_PERMS,
    MEMTYPE_WB,
    Eptp,
    mapping_digest_arrays,
    walk_ept,
)
from qemu_kd.formats.errors import FormatError
from qemu_kd.formats.measurement import PageType, host_verifiable_digest
from qemu_kd.formats.vmcs import GUEST_APPROVED_CONTROLS, Vmcs, field_class, vmcs_field
from qemu_kd.platform.domain import (
    DomainError,
    DomainState,
    DomainStateError,
    DomainVerifyError,
    GuestStateFieldError,
)
from qemu_kd.platform.physmem import PageState

log = logging.getLogger(__name__)

#: Leaf bits a gpa gets back when accepted, unless it had others before it was unmapped.
DEFAULT_LEAF_BITS = EPT_PERMS | MEMTYPE_WB << EPT_MEMTYPE_SHIFT
LIVE = (DomainState.LAUNCHED, DomainState.EXITED)
#: How many installed versions the guest can look back on (controls-info).
HISTORY = 256
#: Operations a guest may ask the platform to seal.
OP_NAMES = {"unmap": Op.UNMAP, "accept": Op.ACCEPT, "move": Op.MOVE, "share": Op.SHARE,
            "unshare": Op.UNSHARE}


class UpdateRefused(DomainError):
    """The platform will not apply or seal this update (replayed, stale, other KeyID, bad request)."""


class UpdateIntegrityError(DomainVerifyError):
    """An update's tag, ciphertext or structures do not verify."""


@dataclass
class _Checked:
    """An update that passed every check, ready to apply."""

    update: ControlUpdate
    vmcs: Vmcs | None
    plain: dict[int, bytes]            # hpa -> new plaintext of every control page it carries
    new_gpas: np.ndarray
    new_hpas: np.ndarray
    new_perms: np.ndarray
    changes: list[dict]


@dataclass
class _State:
    """What the platform keeps per key domain for its control updates."""

    mac_key: bytes = field(default_factory=lambda: os.urandom(48))
    installed: int = 0
    staged: _Checked | None = None
    leaf_bits: dict[int, int] = field(default_factory=dict)     # unmapped gpa -> leaf bits it had
    shared: set[int] = field(default_factory=set)               # SHARED gpas
    interval: "_IntervalTimer | None" = None
    interval_exits: int = 0
    installs: int = 0
    history: list[int] = field(default_factory=list)           # the last installed versions


class _IntervalTimer:
    """Forces an exit (reason ``interval``) every ``ms`` milliseconds, then resumes."""

    def __init__(self, plane: "ControlPlane", keyid: int, ms: int):
        self.plane, self.keyid, self.ms = plane, keyid, ms
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"kd{keyid}-interval", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.ms / 1000):
            if not self.plane.interval_exit(self.keyid, self):
                return

    @property
    def stopped(self) -> bool:
        return self._stop.is_set()

    def stop(self) -> None:
        """Ends the timer; its thread notices within one period (never joined: it may be
        waiting for the platform lock the caller holds)."""
        self._stop.set()


class ControlPlane:
    """Seal, stage, verify and install control updates for every domain of one platform."""

    def __init__(self, platform):
        self.platform = platform
        self._states: dict[int, _State] = {}
        self._owners: dict[int, object] = {}     # KeyID -> the domain its state belongs to

    # ------------------------------------------------------------------ helpers

    def _live(self, keyid: int, command: str):
        domain = self.platform.domain(keyid)
        domain.require_state(command, LIVE)
        runtime = self.platform.runtimes.get(keyid)
        if runtime is None or getattr(runtime, "gpa_to_hpa", None) is None:
            raise DomainStateError(f"key domain {keyid} has no running guest", "launch it first")
        state = self._states.get(keyid)
        if state is None or self._owners.get(keyid) is not domain:
            state = self._states[keyid] = _State()
            self._owners[keyid] = domain     # a new domain with this KeyID starts afresh
        return domain, runtime, state

    def forget(self, keyid: int) -> None:
        """The domain is being destroyed: stop its timer, drop its state."""
        state = self._states.pop(keyid, None)
        self._owners.pop(keyid, None)
        if state is not None and state.interval is not None:
            state.interval.stop()

    def _tag(self, state: _State, body: bytes) -> bytes:
        return hmac.new(state.mac_key, body, hashlib.sha384).digest()

    @staticmethod
    def _ept_tables(domain) -> dict[int, bytes]:
        hpas = domain_ept_hpas(domain)
        plain = domain.decrypt_pages(hpas) if hpas.size else b""
        return {int(h): plain[i * PAGE_SIZE:(i + 1) * PAGE_SIZE] for i, h in enumerate(hpas)}

    # --------------------------------------------------------- guest port: seal

    def guest_port_handlers(self, keyid: int) -> dict:
        """Guest-port commands the agent uses for control updates (docs/agent-protocol.md §3)."""
        return {"controls-info": lambda req: self.guest_info(keyid),
                "controls-seal": lambda req: self.seal(keyid, req)}

    def guest_info(self, keyid: int) -> dict:
        with self.platform.lock:
            domain, runtime, state = self._live(keyid, "controls-info")
            vmcs = domain.read_vmcs()
            mapped = int(np.count_nonzero(runtime.gpa_to_hpa != UNMAPPED))
            return {"keyid": keyid, "installed_version": state.installed,
                    "installed_versions": list(state.history), "memory_size": runtime.mem_size,
                    "mapped_pages": mapped, "shared_gpas": sorted(state.shared),
                    "exit_interval_ms": vmcs.exit_interval_ms, "host_forced_exit": vmcs.host_forced_exit,
                    "exposed_register_mask": vmcs.exposed_register_mask}

    def seal(self, keyid: int, req: dict) -> dict:
        """controls-seal: the guest agreed to these operations; build, encrypt and tag the update."""
        with self.platform.lock:
            domain, runtime, state = self._live(keyid, "controls-seal")
            version = req.get("version")
            if not isinstance(version, int) or isinstance(version, bool) or version <= state.installed:
                raise UpdateRefused(f"version {version!r} is not newer than the installed version "
                                    f"{state.installed}")
            ops = self._seal_ops(domain, runtime, state, req.get("ops") or [])
            pages: list[ControlPage] = []
            vmcs_changes = req.get("vmcs") or {}
            if not isinstance(vmcs_changes, dict):
                raise UpdateRefused("'vmcs' must map field encodings to values")
            if vmcs_changes:
                vmcs = self._new_vmcs(domain, vmcs_changes)
                pages.append(self._encrypt(domain, domain.vmcs_hpa, PAGE_TYPE_VMCS, vmcs.pack()))
            if ops:
                tables = self._ept_tables(domain)
                changed = self._edit_ept(domain, tables, state, ops)
                for hpa in sorted(changed):
                    pages.append(self._encrypt(domain, hpa, PAGE_TYPE_EPT, changed[hpa]))
            if not pages and not ops:
                raise UpdateRefused("the update changes nothing")
            update = ControlUpdate(keyid, version, state.installed,
                                   compress([(o.op, o.gpa, o.old_hpa, o.new_hpa) for o in ops]), pages)
            update.tag = self._tag(state, update.body())
            log.info("key domain %d: sealed control update %d (%s)", keyid, version, update.summary()["ops"])
            return {"update": base64.b64encode(update.pack()).decode(), "version": version,
                    "base_version": state.installed, "summary": update.summary()}

    @staticmethod
    def _encrypt(domain, hpa: int, page_type: int, plain: bytes) -> ControlPage:
        dpa = np.array([hpa], dtype=np.uint64) | np.uint64(domain.keyid << KEYID_SHIFT)
        return ControlPage(hpa, page_type, domain.mee.encrypt_pages(plain, dpa))

    def _seal_ops(self, domain, runtime, state: _State, raw_ops) -> list[PageOp]:
        if not isinstance(raw_ops, list):
            raise UpdateRefused("'ops' must be a list of [op, gpa, count] / [op, gpa, count, hpa] entries")
        memory, keyid = self.platform.memory, domain.keyid
        g2h = runtime.gpa_to_hpa
        seen_gpas: set[int] = set()
        seen_hpas: set[int] = set()
        ops: list[PageOp] = []
        for op, gpa, hpa in _run_pages(raw_ops):
            if gpa < 0 or gpa % PAGE_SIZE or gpa >= runtime.mem_size:
                raise UpdateRefused(f"gpa {gpa:#x} is not a page of this domain's guest memory")
            if gpa in seen_gpas:
                raise UpdateRefused(f"gpa {gpa:#x} is named twice")
            seen_gpas.add(gpa)
            current = g2h[gpa // PAGE_SIZE]
            mapped = current != UNMAPPED
            needs_new = op in (Op.ACCEPT, Op.MOVE)
            if needs_new != (hpa is not None):
                raise UpdateRefused(f"{op.name} of gpa {gpa:#x} " + ("needs" if needs_new else "takes no")
                                    + " new hpa")
            if op == Op.ACCEPT and mapped:
                raise UpdateRefused(f"gpa {gpa:#x} is mapped: only an unmapped gpa can be accepted")
            if op != Op.ACCEPT and not mapped:
                raise UpdateRefused(f"gpa {gpa:#x} is not mapped")
            if op in (Op.UNMAP, Op.MOVE, Op.SHARE) and gpa in state.shared:
                raise UpdateRefused(f"gpa {gpa:#x} is shared: unshare it first")
            if op == Op.UNSHARE and gpa not in state.shared:
                raise UpdateRefused(f"gpa {gpa:#x} is not shared")
            if hpa is not None:
                if hpa in seen_hpas:
                    raise UpdateRefused(f"hpa {hpa:#x} is named twice")
                seen_hpas.add(hpa)
                self._require_offered(hpa, keyid, memory)
            old = int(current) if mapped else NO_HPA
            ops.append(PageOp(op, gpa, old, hpa if hpa is not None else NO_HPA))
        return ops

    @staticmethod
    def _require_offered(hpa: int, keyid: int, memory) -> None:
        """A page the host offers for this domain: allocated to its KeyID and not yet used."""
        if hpa < 0 or hpa % PAGE_SIZE or hpa >= memory.size:
            raise UpdateRefused(f"hpa {hpa:#x} is not a page of physical memory")
        owner = memory.owner(hpa)
        if owner.state != PageState.HOST or owner.keyid != keyid:
            raise UpdateRefused(f"hpa {hpa:#x} is {owner}, not a page the host allocated to KeyID {keyid}",
                                "the host offers pages with alloc for this KeyID first")

    def _new_vmcs(self, domain, changes: dict) -> Vmcs:
        vmcs = domain.read_vmcs()
        for key, value in changes.items():
            try:
                encoding = int(key, 0) if isinstance(key, str) else int(key)
            except ValueError:
                raise UpdateRefused(f"VMCS field {key!r} is not an encoding") from None
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise UpdateRefused(f"VMCS field {key!r}: value must be a non-negative integer")
            f = vmcs_field(encoding)
            if field_class(encoding) == "guest":
                raise UpdateRefused(f"VMCS field {f.name} ({encoding:#06x}) is guest state: never changed "
                                    "for the host")
            if f.name == "exposed_register_mask":
                if value & ~vmcs.exposed_register_mask:
                    raise UpdateRefused(f"exposed-register mask {value:#x} widens {vmcs.exposed_register_mask:#x}")
            elif f.name not in GUEST_APPROVED_CONTROLS:
                raise UpdateRefused(f"VMCS field {f.name} ({encoding:#06x}) cannot change while the guest runs")
            if f.name == "exit_interval_ms" and value and not vmcs.host_forced_exit:
                raise UpdateRefused("the VMCS forbids host-forced exits, so no exit interval can be set")
            try:
                vmcs = vmcs.with_field(encoding, value)
            except FormatError as exc:
                raise UpdateRefused(f"VMCS field {f.name}: {exc.message}") from None
        return vmcs

    @staticmethod
    def _leaf(tables: dict[int, bytes | bytearray], eptp: int, gpa: int) -> tuple[int, int]:
        """(table hpa, byte offset) of the 4 KiB leaf entry that maps ``gpa``."""
        table = Eptp.from_raw(eptp).pml4_hpa
        for level in (4, 3, 2):
            index = (gpa >> (12 + 9 * (level - 1))) & 511
            if table not in tables:
                raise UpdateIntegrityError(f"EPT table at hpa {table:#x} is not an EPT page of this domain")
            (raw,) = struct.unpack_from("<Q", tables[table], index * 8)
            if not raw & EPT_PERMS or raw & (1 << 7):
                raise UpdateRefused(f"gpa {gpa:#x} has no 4 KiB page-table entry (only gpas mapped at "
                                    "launch, with 4 KiB pages, can change)")
            table = raw & ADDRESS_MASK
        if table not in tables:
            raise UpdateIntegrityError(f"EPT table at hpa {table:#x} is not an EPT page of this domain")
        return table, ((gpa >> 12) & 511) * 8

    def _edit_ept(self, domain, tables: dict[int, bytes], state: _State,
                  ops: list[PageOp]) -> dict[int, bytes]:
        eptp = domain.read_vmcs().ept_pointer
        edited: dict[int, bytearray] = {}
        for op in ops:
            table, offset = self._leaf(tables, eptp, op.gpa)
            page = edited.setdefault(table, bytearray(tables[table]))
            (raw,) = struct.unpack_from("<Q", page, offset)
            if op.op == Op.UNMAP:
                raw = 0
            elif op.op == Op.ACCEPT:
                raw = op.new_hpa | state.leaf_bits.get(op.gpa, DEFAULT_LEAF_BITS)
            elif op.op == Op.MOVE:
                raw = (raw & ~ADDRESS_MASK) | op.new_hpa
            # SHARE / UNSHARE keep the mapping: the page's state changes, not the EPT.
            struct.pack_into("<Q", page, offset, raw)
        return {hpa: bytes(page) for hpa, page in edited.items() if bytes(page) != tables[hpa]}

    # ------------------------------------------------------------- host: stage

    def _check(self, keyid: int, blob: bytes) -> tuple[_Checked, object, object, _State]:
        domain, runtime, state = self._live(keyid, "controls-stage")
        try:
            update = ControlUpdate.unpack(blob)
        except FormatError as exc:
            raise UpdateIntegrityError(f"control update is malformed: {exc.message}") from None
        if update.keyid != keyid:
            raise UpdateRefused(f"control update was sealed for KeyID {update.keyid}, not {keyid}",
                                "install an update only into the domain whose guest made it")
        if not hmac.compare_digest(update.tag, self._tag(state, update.body())):
            raise UpdateIntegrityError(f"control update for key domain {keyid} does not verify: its tag "
                                       "does not match (forged, or modified on the way)")
        if update.version <= state.installed:
            raise UpdateRefused(f"control update version {update.version} is not newer than the installed "
                                f"version {state.installed} (replayed)")
        if update.base_version != state.installed:
            raise UpdateRefused(f"control update {update.version} was built on version {update.base_version}, "
                                f"the installed version is {state.installed}", "ask the guest again")
        plain: dict[int, bytes] = {}
        vmcs = None
        ept_hpas = set(domain_ept_hpas(domain).tolist())
        for page in update.pages:
            if page.hpa in plain:
                raise UpdateIntegrityError(f"control update carries hpa {page.hpa:#x} twice")
            if page.page_type == PAGE_TYPE_VMCS and page.hpa != domain.vmcs_hpa or \
                    page.page_type == PAGE_TYPE_EPT and page.hpa not in ept_hpas:
                raise UpdateIntegrityError(f"control update page hpa {page.hpa:#x} is not this domain's "
                                           f"{'VMCS' if page.page_type == PAGE_TYPE_VMCS else 'EPT'} page")
            dpa = np.array([page.hpa], dtype=np.uint64) | np.uint64(keyid << KEYID_SHIFT)
            plain[page.hpa] = domain.mee.decrypt_pages(page.ciphertext, dpa)
            if page.page_type == PAGE_TYPE_VMCS:
                try:
                    vmcs = Vmcs.unpack(plain[page.hpa])
                except FormatError:
                    raise UpdateIntegrityError("the update's VMCS page does not decrypt to a valid VMCS") from None
                self._check_vmcs(domain.read_vmcs(), vmcs)
        new_gpas, new_hpas, new_perms, changes = self._check_ept(domain, runtime, state, update, plain)
        return _Checked(update, vmcs, plain, new_gpas, new_hpas, new_perms, changes), domain, runtime, state

    @staticmethod
    def _check_vmcs(old: Vmcs, new: Vmcs) -> None:
        """Only guest-approved controls may differ, and the exposed-register mask only shrink."""
        if new.guest != old.guest:
            raise UpdateIntegrityError("the update's VMCS changes guest state")
        if new.exposed_register_mask & ~old.exposed_register_mask:
            raise UpdateIntegrityError("the update's VMCS widens the exposed-register mask")
        for name in ("ept_pointer", "save_area_hpa", "vmcs_link_pointer", "policy", "host_forced_exit",
                     "host_cr0", "host_cr3", "host_cr4", "host_rsp", "host_rip"):
            if getattr(new, name) != getattr(old, name):
                raise UpdateIntegrityError(f"the update's VMCS changes {name}")

    def _check_ept(self, domain, runtime, state: _State, update: ControlUpdate, plain: dict[int, bytes]):
        memory, keyid = self.platform.memory, domain.keyid
        per_page = _per_page(update)
        tables = self._ept_tables(domain)
        ept_updates = {h: p for h, p in plain.items() if h != domain.vmcs_hpa}
        tables.update(ept_updates)
        old_gpas, old_hpas = domain.guest_mapping()
        if not ept_updates:
            if any(op.op not in (Op.SHARE, Op.UNSHARE) for op in per_page):
                raise UpdateIntegrityError("the update's operations change the EPT, but it carries no EPT page")
            perms = np.full(old_gpas.size, EPT_PERMS, dtype=np.uint64)
            changes = []
        else:
            walk = walk_ept(domain.read_vmcs().ept_pointer, lambda h: tables.get(h, b""))
            if walk.problems:
                raise UpdateIntegrityError(f"the update's EPT is malformed: {walk.problems[0]}")
            gpas, hpas, perms = walk.gpas, walk.hpas, walk.perms
            changes = _diff(old_gpas, old_hpas, gpas, hpas)
            expected = sorted((op.gpa, op.old_hpa, op.new_hpa) for op in per_page
                              if op.op in (Op.UNMAP, Op.ACCEPT, Op.MOVE))
            got = sorted((c["gpa"], c.get("old_hpa", NO_HPA), c.get("new_hpa", NO_HPA)) for c in changes)
            if got != expected:
                raise UpdateIntegrityError("the update's EPT does not do what its operations say "
                                           f"({len(got)} mapping changes, {len(expected)} operations)")
            if count_distinct(hpas) != hpas.size:
                raise UpdateIntegrityError("the update's EPT maps one hpa at two gpas (alias)")
            old_gpas, old_hpas = gpas, hpas
        for op in per_page:
            if op.op in (Op.ACCEPT, Op.MOVE):
                self._require_offered(op.new_hpa, keyid, memory)
            if op.op in (Op.UNMAP, Op.MOVE, Op.SHARE, Op.UNSHARE):
                current = runtime.gpa_to_hpa[op.gpa // PAGE_SIZE]
                if current == UNMAPPED or int(current) != op.old_hpa:
                    raise UpdateIntegrityError(f"the update's {op.op.name} of gpa {op.gpa:#x} names hpa "
                                               f"{op.old_hpa:#x}, which is not the page mapped there")
            if op.op == Op.SHARE and op.gpa in state.shared or op.op == Op.UNSHARE and op.gpa not in state.shared:
                raise UpdateRefused(f"gpa {op.gpa:#x} is already {'shared' if op.op == Op.SHARE else 'private'}")
        return old_gpas, old_hpas, perms, changes

    def stage(self, keyid: int, blob: bytes) -> dict:
        """controls-stage: check an update the guest made; keep it for verification and install."""
        with self.platform.lock:
            checked, domain, _runtime, state = self._check(keyid, blob)
            state.staged = checked
            return {**checked.update.summary(), "installed_version": state.installed,
                    "digest": self._staged_digest(domain, checked).hex()}

    def _staged(self, keyid: int, command: str) -> tuple[_Checked, object]:
        domain, _runtime, state = self._live(keyid, command)
        if state.staged is None:
            raise DomainStateError(f"key domain {keyid} has no staged control update",
                                   "stage one with controls-stage first")
        return state.staged, domain

    @staticmethod
    def _staged_digest(domain, checked: _Checked) -> bytes:
        """hash-kd of the domain's host-verifiable pages as they will be once the update is installed."""
        hpas = domain.verifiable_hpas()
        plain = domain.decrypt_pages(hpas)
        records = []
        for i, h in enumerate(hpas.tolist()):
            records.append((h, checked.plain.get(h, plain[i * PAGE_SIZE:(i + 1) * PAGE_SIZE])))
        return host_verifiable_digest(records)

    def staged_hash(self, keyid: int) -> bytes:
        with self.platform.lock:
            checked, domain = self._staged(keyid, "hash-kd")
            return self._staged_digest(domain, checked)

    def staged_vmread(self, keyid: int, encoding: int) -> int:
        with self.platform.lock:
            checked, domain = self._staged(keyid, "vmread")
            f = vmcs_field(encoding)
            if field_class(encoding) == "guest":
                raise GuestStateFieldError(f"vmread of guest-state field {f.name} ({encoding:#06x}) refused")
            return (checked.vmcs or domain.read_vmcs()).read_field(encoding)

    def staged_verify_ept(self, keyid: int) -> dict:
        """verify-ept of the staged EPT: ownership of every mapped page, and its changes."""
        with self.platform.lock:
            checked, domain = self._staged(keyid, "verify-ept")
            memory = self.platform.memory
            reasons = []
            idx = (checked.new_hpas // np.uint64(PAGE_SIZE)).astype(np.int64)
            states, owners, types = memory.owner_arrays(idx)
            offered = {op.new_hpa for op in _per_page(checked.update) if op.op in (Op.ACCEPT, Op.MOVE)}
            for j in np.flatnonzero(owners != domain.keyid).tolist()[:16]:
                reasons.append(f"foreign: gpa {int(checked.new_gpas[j]):#x} maps hpa "
                               f"{int(checked.new_hpas[j]):#x} of KeyID {int(owners[j])}")
            ok_state = (states == PageState.PRIVATE) & np.isin(types, [int(PageType.IMAGE), int(PageType.ZERO)])
            ok_state |= (states == PageState.SHARED)
            ok_state |= np.isin(checked.new_hpas, np.array(sorted(offered), dtype=np.uint64)) \
                & (states == PageState.HOST)
            for j in np.flatnonzero(~ok_state & (owners == domain.keyid)).tolist()[:16]:
                reasons.append(f"control-page: gpa {int(checked.new_gpas[j]):#x} maps hpa "
                               f"{int(checked.new_hpas[j]):#x}, not a guest page of this domain")
            if count_distinct(checked.new_hpas) != checked.new_hpas.size:
                reasons.append("alias: one hpa is mapped at two gpas")
            return {"verdict_ok": not reasons, "reasons": reasons,
                    "mapping_digest": mapping_digest_arrays(checked.new_gpas, checked.new_hpas,
                                                            checked.new_perms).hex(),
                    "mapped_pages": int(checked.new_gpas.size), "changes": checked.changes,
                    "ops": [op.as_json() for op in checked.update.ops]}

    # ----------------------------------------------------------- host: install

    def install(self, keyid: int, version: int) -> dict:
        """controls-install: check the staged update again and apply it to the running guest."""
        with self.platform.lock:
            domain, runtime, state = self._live(keyid, "controls-install")
            if state.staged is None or state.staged.update.version != version:
                raise DomainStateError(f"key domain {keyid} has no staged control update version {version}",
                                       "stage the update the guest returned with controls-stage first")
            checked, _d, _r, _s = self._check(keyid, state.staged.update.pack())
            state.staged = None
            result = self._apply(domain, runtime, state, checked)
            state.installed = checked.update.version
            state.installs += 1
            state.history = [*state.history[-(HISTORY - 1):], state.installed]
            log.info("key domain %d: installed control update %d", keyid, state.installed)
            return {"version": state.installed, **result}

    def _apply(self, domain, runtime, state: _State, checked: _Checked) -> dict:
        memory, keyid = self.platform.memory, domain.keyid
        update = checked.update
        runtime.sync_shadow()       # DRAM current before pages move or go
        if update.pages:
            memory.write_pages(np.array([p.hpa for p in update.pages], dtype=np.uint64),
                               b"".join(p.ciphertext for p in update.pages))
        by_op: dict[Op, list[PageOp]] = {op: [] for op in Op}
        for op in _per_page(update):
            by_op[op.op].append(op)
        if by_op[Op.UNMAP]:
            gpas = np.array([o.gpa for o in by_op[Op.UNMAP]], dtype=np.uint64)
            olds = np.array([o.old_hpa for o in by_op[Op.UNMAP]], dtype=np.uint64)
            runtime.unmap_guest_pages(gpas)
            memory.release_pages(olds, keyid)
            state.leaf_bits.update({int(g): DEFAULT_LEAF_BITS for g in gpas.tolist()})
        if by_op[Op.ACCEPT]:
            gpas = np.array([o.gpa for o in by_op[Op.ACCEPT]], dtype=np.uint64)
            news = np.array([o.new_hpa for o in by_op[Op.ACCEPT]], dtype=np.uint64)
            memory.assign_private(news, keyid, PageType.ZERO)
            domain.encrypt_into_dram(news, bytes(PAGE_SIZE * news.size))
            runtime.map_guest_pages(gpas, news, None)
            for g in gpas.tolist():
                state.leaf_bits.pop(int(g), None)
        if by_op[Op.MOVE]:
            gpas = np.array([o.gpa for o in by_op[Op.MOVE]], dtype=np.uint64)
            news = np.array([o.new_hpa for o in by_op[Op.MOVE]], dtype=np.uint64)
            olds = np.array([o.old_hpa for o in by_op[Op.MOVE]], dtype=np.uint64)
            types = memory.owner_arrays((olds // np.uint64(PAGE_SIZE)).astype(np.int64))[2].copy()
            memory.assign_private(news, keyid, types)
            plain = runtime.guest_pages(gpas)
            domain.encrypt_into_dram(news, plain)
            runtime.map_guest_pages(gpas, news, plain)
            memory.release_pages(olds, keyid)
        for op, shared in ((Op.SHARE, True), (Op.UNSHARE, False)):
            if by_op[op]:
                gpas = np.array([o.gpa for o in by_op[op]], dtype=np.uint64)
                hpas = np.array([o.old_hpa for o in by_op[op]], dtype=np.uint64)
                memory.convert_pages(hpas, keyid, shared)
                if shared:
                    domain.store_shared(hpas, runtime.guest_pages(gpas))
                    state.shared.update(gpas.tolist())
                else:
                    domain.encrypt_into_dram(hpas, bytes(PAGE_SIZE * hpas.size))
                    state.shared.difference_update(gpas.tolist())
                runtime.share_guest_pages(gpas, shared)
        domain.replace_guest_mapping(checked.new_gpas, checked.new_hpas)
        if checked.vmcs is not None:
            self._apply_interval(keyid, state, checked.vmcs.exit_interval_ms)
        return {"unmapped": len(by_op[Op.UNMAP]), "accepted": len(by_op[Op.ACCEPT]),
                "moved": len(by_op[Op.MOVE]), "shared": len(by_op[Op.SHARE]),
                "unshared": len(by_op[Op.UNSHARE]), "free_pages": memory.count_free()}

    def release(self, keyid: int, hpas) -> int:
        """controls-release: give back pages the host offered but no update took (still HOST)."""
        with self.platform.lock:
            domain, _runtime, _state = self._live(keyid, "controls-release")
            memory = self.platform.memory
            for hpa in hpas:
                self._require_offered(int(hpa), keyid, memory)
            return memory.release_pages(np.asarray(hpas, dtype=np.uint64), keyid)

    # -------------------------------------------------------- exit interval

    def _apply_interval(self, keyid: int, state: _State, ms: int) -> None:
        if state.interval is not None and state.interval.ms == ms:
            return
        if state.interval is not None:
            state.interval.stop()
            state.interval = None
        if ms:
            state.interval = _IntervalTimer(self, keyid, ms)

    def interval_exit(self, keyid: int, timer: _IntervalTimer) -> bool:
        """One periodic exit and resume; False once ``timer`` is no longer the domain's (the
        domain is gone, or its interval changed), and the timer then ends."""
        with self.platform.lock:
            state = self._states.get(keyid)
            if state is None or state.interval is not timer or timer.stopped:
                return False
            try:
                domain = self.platform.domain(keyid)
            except DomainError:
                return False
            if domain.state != DomainState.LAUNCHED:
                return True        # the host holds it exited; try again next period
            try:
                # A platform-made exit: sealed, scrubbed and recorded (reason "interval") like any
                # other; the host sees it with next-exit.  Bounded by the guest, so it needs no
                # host-forced-exit control beyond the one the seal required.
                record = self.platform.guest_exit(keyid, "interval")
                if record is not None:
                    self.platform.guest_resume(keyid, record.seq)
            except KdError as exc:
                log.warning("key domain %d: interval exit failed: %s", keyid, exc.message)
                return False
            state.interval_exits += 1
            return True

    # --------------------------------------------------------------- status

    def status(self, keyid: int) -> dict:
        """controls-status: what the host may know of a domain's control updates."""
        with self.platform.lock:
            domain, runtime, state = self._live(keyid, "controls-status")
            mapped = int(np.count_nonzero(runtime.gpa_to_hpa != UNMAPPED))
            return {"keyid": keyid, "installed_version": state.installed,
                    "staged_version": state.staged.update.version if state.staged else None,
                    "memory_size": runtime.mem_size, "mapped_pages": mapped,
                    "current_memory": mapped * PAGE_SIZE, "shared_pages": len(state.shared),
                    "exit_interval_ms": domain.read_vmcs().exit_interval_ms,
                    "interval_exits": state.interval_exits, "installs": state.installs,
                    "free_pages": self.platform.memory.count_free()}


def domain_ept_hpas(domain) -> np.ndarray:
    """The domain's EPT pages (hpas, ascending)."""
    pages = domain.pages()
    return np.sort(pages.hpas[pages.types == int(PageType.EPT)])


def _diff(old_gpas, old_hpas, new_gpas, new_hpas) -> list[dict]:
    """Mapping changes from (old) to (new): unmapped, newly mapped and moved gpas."""
    old = dict(zip(old_gpas.tolist(), old_hpas.tolist()))
    new = dict(zip(new_gpas.tolist(), new_hpas.tolist()))
    out = []
    for gpa in sorted(set(old) | set(new)):
        a, b = old.get(gpa), new.get(gpa)
        if a == b:
            continue
        change = {"gpa": gpa}
        if a is not None:
            change["old_hpa"] = a
        if b is not None:
            change["new_hpa"] = b
        out.append(change)
    return out


def _per_page(update: ControlUpdate) -> list[PageOp]:
    """The update's operations, one page each."""
    return [PageOp(op, gpa, old, new) for op, gpa, old, new in expand(update.ops)]


def _run_pages(raw_ops):
    """(op, gpa, new hpa or None) per page of the guest's [op, gpa, count(, hpa)] runs."""
    total = 0
    for entry in raw_ops:
        if not (isinstance(entry, list) and len(entry) in (3, 4) and entry[0] in OP_NAMES
                and all(isinstance(x, int) and not isinstance(x, bool) for x in entry[1:])):
            raise UpdateRefused(f"operation {entry!r} is not [op, gpa, count] or [op, gpa, count, hpa]")
        op, gpa, count = OP_NAMES[entry[0]], entry[1], entry[2]
        total += count
        if count < 1 or total > MAX_OP_PAGES:
            raise UpdateRefused(f"operation {entry!r}: the update may cover 1..{MAX_OP_PAGES} pages")
        hpa = entry[3] if len(entry) == 4 else None
        for i in range(count):
            yield op, gpa + i * PAGE_SIZE, None if hpa is None else hpa + i * PAGE_SIZE
