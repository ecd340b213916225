"""The platform: identity, host-physical memory and key domains behind one lock.

:class:`Platform` stands for the processor and its memory-encryption engine.
It has one method per host-port command (docs/hostport.md); the host-port server
calls them from several connection threads, so every method takes the
platform lock.  Nothing a method returns to the host contains plaintext of a
key domain, a key or guest register values.

KeyID reservation.  The tweak of every encrypted page includes its KeyID, so
the tenant must know the KeyID before it encrypts.  ``alloc`` therefore
reserves a KeyID together with the pages (the layout the host hands the
tenant); ``create_kd`` later programs exactly that KeyID; ``free`` gives back
a reservation that never became a domain; ``destroy_kd`` ends a domain.
"""

from __future__ import annotations

import logging
import shutil
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np

from qemu_kd.platform.domain import (
    DomainNotFoundError,
    DomainState,
    DomainStateError,
    EptVerdict,
    KeyDomain,
    KeyIdAllocator,
    PageBatch,
    SecretPageError,
)
from qemu_kd.common.arrays import in_ascending_order
from qemu_kd.common.errors import KdError
from qemu_kd.hostport.names import NameClaims, check_name
from qemu_kd.hostport.protocol import PlatformInfo
from qemu_kd.formats.addresses import KEYID_BITS, MAX_KEYID, PAGE_SIZE
from qemu_kd.common.rundirs import make_private_dir
from qemu_kd.platform.physmem import DEFAULT_MEMORY_SIZE, AddressError, PhysicalMemory
from qemu_kd.platform.controls import ControlPlane

log = logging.getLogger(__name__)

ACCELERATOR_NONE = "none"
DEFAULT_QEMU_ACCEL = "tcg"
# Endpoints of a running domain the host may have: console and shared channel are
# host-visible by design.  QEMU's own QMP and gdb sockets are never handed out
# (they would reveal guest memory and registers); the host gets filtered proxies.
HOST_ENDPOINTS = ("shared", "console", "console_log", "qmp", "gdb", "audit_log")
# Largest debug-read in one request.
MAX_DEBUG_READ = 1 << 20
# Guest states (domain-status's guest_state) in which the guest can still run.
GUEST_LIVE_STATES = ("running", "paused", "exited")


def _default_runtime(domain: KeyDomain, identity, accel: str, name: str):
    from qemu_kd.platform.runtime import DomainRuntime

    return DomainRuntime(domain, identity, accel=accel, name=name)


class HostExitRefused(DomainStateError):
    """exit of a domain whose VMCS does not allow host-forced exits."""


class DebugRefused(SecretPageError):
    """debug-read of a domain whose measured policy does not have DEBUG."""


@dataclass(frozen=True, eq=False)
class Allocation:
    """alloc's answer: the reserved KeyID and the hpas the host now holds for it
    (``hpa_array``, ascending uint64; :attr:`hpas` as a list)."""

    keyid: int
    hpa_array: np.ndarray = field(repr=False)

    @property
    def hpas(self) -> list[int]:
        """The hpas, ascending, as a new list of ints."""
        return self.hpa_array.tolist()


class Platform:
    """The emulated key-domain platform (see module docstring)."""

    def __init__(self, identity, memory_size: int = DEFAULT_MEMORY_SIZE, workdir: Path | str | None = None,
                 *, qemu_accel: str = DEFAULT_QEMU_ACCEL,
                 runtime_factory: Callable[..., object] | None = None,
                 names_dir: Path | str | None = None):
        """``workdir``: a private directory for the DRAM file (created 0700 if missing;
        the file is unlinked once mapped) and audit logs; by default a fresh one under
        the runtime directory, removed on close.

        ``qemu_accel`` is the accelerator launched domains run with (the caller
        probes it); ``runtime_factory(domain, identity, accel, name)`` makes the
        object that runs a launched domain (default: ``kd_runtime.DomainRuntime``).

        ``names_dir`` is where launched domains' names are claimed, shared by every
        platform of the machine (default: the platform registry's directory).
        """
        self._own_workdir = workdir is None
        if workdir is None:
            workdir = make_private_dir("platform")   # <runtime>/platform-<pid>-*, swept once we are dead
        workdir = Path(workdir)
        workdir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.identity = identity
        self.workdir = workdir
        self.accelerator = ACCELERATOR_NONE
        self.lock = threading.RLock()
        self.memory = PhysicalMemory(memory_size, workdir / "dram")
        self.keyids = KeyIdAllocator(MAX_KEYID)
        self.domains: dict[int, KeyDomain] = {}
        self.runtimes: dict[int, object] = {}
        # Launched domains' names (unique across platforms) and launch times (for uptime).
        self.domain_names: dict[int, str] = {}
        self.launched_at: dict[int, float] = {}
        if names_dir is None:
            from qemu_kd.hostport.registry import registry_dir

            names_dir = registry_dir()
        self.name_claims = NameClaims(Path(names_dir), owner=str(workdir))
        self.qemu_accel = qemu_accel
        self._runtime_factory = runtime_factory or _default_runtime
        # QEMU processes are started from this one long-lived thread: QEMU dies with the
        # thread that forked it (PR_SET_PDEATHSIG), and connection threads come and go.
        self._launcher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kd-launcher")
        # QEMU started ahead for measured domains, by KeyID: (name it was started as, runtime, start).
        self._ahead: dict[int, tuple[str, object, Future]] = {}
        self._closed = False
        # Guest-verified VMCS/EPT changes of running domains (docs/protocol.md).
        self.controls = ControlPlane(self)

    # ------------------------------------------------------------- lifecycle

    def close(self) -> None:
        """Destroy every domain (scrubbing its pages) and remove the DRAM file."""
        with self.lock:
            if self._closed:
                return
            for keyid in list(self.domains):
                self.destroy_kd(keyid)
            self._launcher.shutdown(wait=True)
            self.memory.close()
            if self._own_workdir:
                shutil.rmtree(self.workdir, ignore_errors=True)
            self._closed = True

    def __enter__(self) -> "Platform":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _check_open(self) -> None:
        if self._closed:
            raise KdError("the platform is closed")

    def domain(self, keyid: int) -> KeyDomain:
        """The live key domain with this KeyID (DomainNotFoundError otherwise)."""
        with self.lock:
            self._check_open()
            domain = self.domains.get(keyid) if isinstance(keyid, int) else None
            if domain is None:
                if isinstance(keyid, int) and self.keyids.is_reserved(keyid):
                    raise DomainNotFoundError(f"KeyID {keyid} is reserved but no key domain was created with it",
                                              "run create-kd with this KeyID first")
                raise DomainNotFoundError(f"no key domain with KeyID {keyid!r}",
                                          "see platform-info for the KeyIDs in use")
            return domain

    # -------------------------------------------------------------- commands

    def platform_info(self) -> PlatformInfo:
        with self.lock:
            self._check_open()
            return PlatformInfo(
                chain_pem=self.identity.chain_pem(), keyid_bits=KEYID_BITS,
                free_keyids=self.keyids.free_keyids(), accelerator=self.accelerator,
                memory_size=self.memory.size, page_size=PAGE_SIZE,
                integrity_events=self.memory.integrity_events, free_pages=self.memory.count_free())

    def alloc(self, npages: int | None = None, hpas: Iterable[int] | None = None,
              keyid: int | None = None) -> Allocation:
        """Reserve a KeyID (or extend the reservation ``keyid``) and claim pages for it.

        Give either ``npages`` (the platform picks the lowest FREE pages) or
        ``hpas`` (the host picks).  Claimed pages become HOST(keyid).
        """
        with self.lock:
            self._check_open()
            if (npages is None) == (hpas is None):
                raise AddressError("alloc needs exactly one of npages or hpas")
            if keyid is not None:
                self._require_extendable(keyid)
            chosen = self.memory.find_free(npages) if npages is not None else hpas
            new_keyid = keyid if keyid is not None else self.keyids.reserve()
            try:
                claimed = self.memory.claim_for_host(chosen, new_keyid)
            except BaseException:
                if keyid is None:
                    self.keyids.release(new_keyid)
                raise
            # find_free's pages come ascending already; a host-picked list is sorted.
            return Allocation(new_keyid, in_ascending_order(claimed))

    def _require_extendable(self, keyid: int) -> None:
        if not isinstance(keyid, int) or not self.keyids.is_reserved(keyid):
            raise DomainNotFoundError(f"KeyID {keyid!r} is not reserved", "alloc without a KeyID first")
        domain = self.domains.get(keyid)
        # A running domain's pages stay HOST until the guest accepts them through a control
        # update (balloon in, relocation); a verified one is locked as verified.
        if domain is not None and domain.state not in (DomainState.CREATED, DomainState.BUILDING,
                                                       DomainState.LAUNCHED, DomainState.EXITED):
            raise DomainStateError(f"key domain {keyid} is {domain.state.value}: alloc can add pages only "
                                   "while it is CREATED, BUILDING, LAUNCHED or EXITED")

    def free(self, keyid: int) -> int:
        """Give back an unused reservation: scrub and free its pages, release the KeyID."""
        with self.lock:
            self._check_open()
            if not isinstance(keyid, int) or not self.keyids.is_reserved(keyid):
                raise DomainNotFoundError(f"KeyID {keyid!r} is not reserved")
            if keyid in self.domains:
                raise DomainStateError(f"KeyID {keyid} is programmed for a key domain "
                                       f"({self.domains[keyid].state.value}); free releases only "
                                       "reservations without one", "use destroy-kd")
            freed = self.memory.release_keyid(keyid)
            self.keyids.release(keyid)
            return freed

    def read_phys(self, dpa: int, length: int) -> bytes:
        """DRAM through KeyID 0: plaintext of HOST/SHARED pages, ciphertext of PRIVATE ones."""
        with self.lock:
            self._check_open()
            self._sync_shadows(self.memory.private_keyids(dpa, length))
            return self.memory.host_read(dpa, length)

    def write_phys(self, dpa: int, data: bytes) -> None:
        with self.lock:
            self._check_open()
            self.memory.host_write(dpa, data)
            self._sync_shadows(self.memory.private_keyids(dpa, len(data)))   # shared pages reach the guest

    def read_phys_pages(self, dpas: Sequence[int] | np.ndarray) -> bytes:
        """Whole pages at KeyID-0 addresses, concatenated in the order given."""
        with self.lock:
            self._check_open()
            self._sync_shadows(self.memory.private_keyids(dpas=dpas))
            return self.memory.host_read_pages(dpas)

    def write_phys_pages(self, dpas: Sequence[int] | np.ndarray, data: bytes) -> None:
        with self.lock:
            self._check_open()
            self.memory.host_write_pages(dpas, data)
            self._sync_shadows(self.memory.private_keyids(dpas=dpas))        # shared pages reach the guest

    def _sync_shadows(self, keyids: set[int]) -> None:
        """Bring the encrypted shadow of the running domains a host read touches up to date."""
        for keyid in sorted(keyids):
            domain = self.domains.get(keyid)
            if domain is not None and domain.shadow_sync is not None \
                    and domain.state in (DomainState.LAUNCHED, DomainState.EXITED):
                domain.shadow_sync()

    def create_kd(self, keyid: int, wrapped_key, policy, host_data: bytes = b"") -> KeyDomain:
        """create-kd: unwrap the key with the platform's KAK and program the reserved ``keyid``."""
        with self.lock:
            self._check_open()
            if not isinstance(keyid, int) or not 1 <= keyid <= MAX_KEYID:
                raise AddressError(f"KeyID {keyid!r} is not a key-domain KeyID (1..{MAX_KEYID})")
            if not self.keyids.is_reserved(keyid):
                raise DomainNotFoundError(f"KeyID {keyid} is not reserved",
                                          "alloc pages first: alloc reserves the KeyID the tenant seals for")
            if keyid in self.domains:
                raise DomainStateError(f"KeyID {keyid} is already programmed "
                                       f"(key domain {keyid} is {self.domains[keyid].state.value})",
                                       "destroy it with destroy-kd first")
            domain = KeyDomain.create(keyid, wrapped_key, policy, host_data, self.identity.kak_private,
                                      self.memory)
            self.domains[keyid] = domain
            return domain

    def add_pages(self, keyid: int, entries: PageBatch | Iterable[Sequence]) -> None:
        """add-pages: entries are (hpa, gpa, type, perms[, host_verifiable]) or a PageBatch."""
        with self.lock:
            batch = entries if isinstance(entries, PageBatch) else PageBatch.from_entries(entries)
            self.domain(keyid).add_pages(batch)

    def add_zero_pages(self, keyid: int, entries: PageBatch | Iterable[Sequence]) -> None:
        """add-zero-pages: entries are (hpa, gpa, perms) or a PageBatch of ZERO pages."""
        with self.lock:
            batch = entries if isinstance(entries, PageBatch) else PageBatch.zero_pages(entries)
            self.domain(keyid).add_zero_pages(batch)

    def hash_kd(self, keyid: int, hpas: Iterable[int] | None = None) -> bytes:
        with self.lock:
            return self.domain(keyid).hash_kd(hpas)

    def vmread(self, keyid: int, encoding: int) -> int:
        with self.lock:
            return self.domain(keyid).vmread(encoding)

    def verify_ept(self, keyid: int, host_allocation: Iterable[int]) -> EptVerdict:
        with self.lock:
            return self.domain(keyid).verify_ept(host_allocation)

    def destroy_kd(self, keyid: int) -> int:
        """destroy-kd: stop the guest, scrub and free the domain's pages, forget its key, free the KeyID."""
        with self.lock:
            domain = self.domain(keyid)
            self.controls.forget(keyid)
            try:
                self._take_ahead(keyid, None, None)     # a QEMU started ahead goes too
                if domain.on_destroy is not None:
                    domain.on_destroy()
            finally:
                self.runtimes.pop(keyid, None)
                self.launched_at.pop(keyid, None)
                name = self.domain_names.pop(keyid, None)
                if name is not None:
                    self.name_claims.release(name)
                freed = domain.destroy()
                del self.domains[keyid]
                self.keyids.release(keyid)
                if not self.runtimes:
                    self.accelerator = ACCELERATOR_NONE
            return freed

    # --------------------------------------------------------- running guests

    def measure_kd(self, keyid: int) -> bytes:
        """measure-kd: the launch measurement of a VERIFIED (or launched) domain.

        The measurement fills the domain's guest RAM as it decrypts (guestram.py); meanwhile the
        domain's QEMU starts on that RAM in the background, paused, as the machine launch would
        start under the default name (:meth:`_start_ahead`), so launch need not wait for it."""
        with self.lock:
            domain = self.domain(keyid)
            try:
                return domain.launch_measurement(lambda staged: self._start_ahead(keyid, domain, staged))
            except BaseException:
                self._take_ahead(keyid, None, None)     # stopped before its RAM goes
                domain.discard_staged_ram()
                raise

    def _start_ahead(self, keyid: int, domain: KeyDomain, staged) -> None:
        """Start the QEMU of a domain being measured, paused, on the guest RAM the measurement fills,
        named as launch would name it by default.  Nothing runs in it: launch loads the vCPU only
        after its checks, uses it only if the domain is launched under that name, and stops it
        otherwise (as destroy-kd and a failed measurement do)."""
        self._take_ahead(keyid, None, None)
        name = self.name_claims.free_default(keyid)
        if name is None:
            return
        runtime = self._runtime_factory(domain, self.identity, self.qemu_accel, name)
        if not hasattr(runtime, "prestart"):
            return
        self._ahead[keyid] = (runtime.name, runtime, self._launcher.submit(runtime.prestart, staged, False))

    def _take_ahead(self, keyid: int, name: str | None, resume_from) -> object | None:
        """The runtime started ahead for ``keyid``, if it was started as ``name`` for a first
        launch; any other is stopped (caller holds the lock)."""
        ahead = self._ahead.pop(keyid, None)
        if ahead is None:
            return None
        started_as, runtime, start = ahead
        try:
            start.result()
        except Exception as exc:  # noqa: BLE001 - launch starts its own QEMU instead
            log.info("key domain %d: the QEMU started ahead failed: %s", keyid, type(exc).__name__)
        else:
            if started_as == name and resume_from is None:
                return runtime
        console_log = getattr(getattr(runtime, "machine", None), "console_log", None)
        runtime.stop()
        # It never ran: its console log is empty, and nobody will look for it.
        if console_log is not None and console_log.exists() and not console_log.stat().st_size:
            console_log.unlink(missing_ok=True)
        return None

    def launch(self, keyid: int, name: str | None = None, resume_from=None, *,
               runtime=None) -> dict[str, str]:
        """launch: measure, start QEMU, decrypt into guest RAM, load the vCPU (left paused).

        ``name`` is the host's label for the domain (hostport/names.py): unique among
        the live domains of every platform; by default the next free ``kdN``.
        Returns the host-visible endpoints (shared channel, console).  ``resume_from``
        (``runtime.ResumeState``) is a restore's: the platform's snapshot module builds the
        domain and launches it here to resume where its snapshot was taken, with the
        ``runtime`` it made (and started QEMU for) under ``name``, which it claimed.
        """
        with self.lock:
            domain = self.domain(keyid)
            domain.require_state("launch", [DomainState.VERIFIED])
            domain.launch_measurement()
            if runtime is None:
                name = (self.name_claims.claim_default(keyid) if name is None
                        else self.name_claims.claim(check_name(name), keyid))
                runtime = self._take_ahead(keyid, name, resume_from)
            try:
                if runtime is None:
                    runtime = self._runtime_factory(domain, self.identity, self.qemu_accel, name)
                resume = () if resume_from is None else (resume_from,)
                self._launcher.submit(runtime.launch, *resume).result()
            except BaseException:
                self.name_claims.release(name)
                raise
            self.domain_names[keyid] = name
            self.launched_at[keyid] = time.monotonic()
            try:
                start_proxies = getattr(runtime, "start_proxies", None)
                if start_proxies is not None:
                    start_proxies(self.workdir / f"audit-kd{keyid}.log",
                                  on_stop=lambda: self.exit(keyid), on_cont=lambda: self.resume(keyid))
            except BaseException:
                runtime.stop()
                raise
            self.runtimes[keyid] = runtime
            if hasattr(runtime, "exit_hooks"):
                from qemu_kd.platform.exits import ExitHooks

                runtime.exit_hooks = ExitHooks(
                    exit=lambda reason, **kw: self.guest_exit(keyid, reason, **kw),
                    resume=lambda seq: self.guest_resume(keyid, seq))
            guest_port = getattr(runtime, "guest_port", None)
            if guest_port is not None:
                guest_port.handlers.update(self.controls.guest_port_handlers(keyid))
            domain.mark_launched()
            self.accelerator = self.qemu_accel
            return self._host_endpoints(runtime)

    @staticmethod
    def _host_endpoints(runtime) -> dict[str, str]:
        endpoints = runtime.endpoints()
        return {name: str(getattr(endpoints, name, "")) for name in HOST_ENDPOINTS}

    def _runtime(self, keyid: int, command: str, allowed: Sequence[DomainState]):
        domain = self.domain(keyid)
        domain.require_state(command, allowed)
        runtime = self.runtimes.get(keyid)
        if runtime is None:
            raise DomainStateError(f"key domain {keyid} has no running guest", "launch it first")
        return domain, runtime

    def run(self, keyid: int) -> None:
        """run: let a launched domain's vCPU execute (first entry after launch)."""
        with self.lock:
            _, runtime = self._runtime(keyid, "run", [DomainState.LAUNCHED])
            runtime.run()

    def exit(self, keyid: int) -> None:
        """exit: stop the vCPU, seal its registers into the protected save area, scrub them in QEMU."""
        with self.lock:
            domain, runtime = self._runtime(keyid, "exit", [DomainState.LAUNCHED])
            if not domain.read_vmcs().host_forced_exit:
                raise HostExitRefused(f"key domain {keyid}: its VMCS forbids host-forced exits",
                                      "the tenant sealed it without the host-forced-exit control")
            runtime.exit()
            domain.mark_exited()

    def resume(self, keyid: int) -> None:
        """resume: restore the vCPU from the save area after checking its integrity, and run."""
        with self.lock:
            domain, runtime = self._runtime(keyid, "resume", [DomainState.EXITED])
            runtime.resume()
            domain.mark_launched()

    # ------------------------------------------- guest-initiated exits, hypercalls

    def guest_exit(self, keyid: int, reason: str, **details):
        """An exit the guest (a hypercall) or the platform itself (an exit interval) makes.

        Unlike the host's ``exit`` it needs no host-forced-exit control.
        Returns the exit record the host will see.
        """
        with self.lock:
            domain, runtime = self._runtime(keyid, "exit", [DomainState.LAUNCHED])
            record = runtime.exit(reason=reason, **details)
            domain.mark_exited()
            return record

    def guest_resume(self, keyid: int, seq: int):
        """Resume exit ``seq`` (a hypercall's own resume); returns the verified save-area record."""
        with self.lock:
            domain, runtime = self._runtime(keyid, "resume", [DomainState.EXITED])
            area = runtime.resume(seq=seq)
            domain.mark_launched()
            return area

    def next_exit(self, keyid: int, after: int = 0, wait: float = 0.0) -> tuple[dict | None, int]:
        """next-exit: the first exit record after ``after`` (waiting up to ``wait`` s), and the last seq."""
        with self.lock:
            _, runtime = self._runtime(keyid, "next-exit", [DomainState.LAUNCHED, DomainState.EXITED])
            exits = runtime.exits
        # Waited for outside the platform lock: the exit being waited for needs it.
        return exits.next_after(after, wait), exits.last_seq

    def hypercall_reply(self, keyid: int, reply) -> None:
        """hypercall-reply: the host's outputs for the waiting hypercall (exposed registers only)."""
        with self.lock:
            _, runtime = self._runtime(keyid, "hypercall-reply", [DomainState.EXITED])
            runtime.exits.answer(reply)

    def debug_read(self, keyid: int, gpa: int, length: int) -> bytes:
        """debug-read: plaintext guest memory, only for a domain whose measured policy has DEBUG.

        Every attempt, allowed or refused, goes to the domain's audit log.
        """
        with self.lock:
            domain, runtime = self._runtime(keyid, "debug-read",
                                            [DomainState.LAUNCHED, DomainState.EXITED])
            if not isinstance(length, int) or not 0 <= length <= MAX_DEBUG_READ:
                raise AddressError(f"debug-read length must be 0..{MAX_DEBUG_READ} bytes")
            allowed = domain.policy.debug
            audit = getattr(runtime, "audit", None)
            if audit is not None:
                audit.record(domain=self.domain_names.get(keyid, f"kd{keyid}"), endpoint="hostport",
                             action=f"debug-read gpa {gpa:#x} length {length}", allowed=allowed,
                             debug=allowed)
            if not allowed:
                raise DebugRefused(f"debug-read refused: key domain {keyid}'s measured policy "
                                   "does not allow DEBUG",
                                   "the tenant must seal the guest with --debug")
            return runtime.debug_read(gpa, length)

    def domain_status(self, keyid: int) -> dict:
        """domain-status: what the host may know of one domain (no guest data)."""
        with self.lock:
            domain = self.domain(keyid)
            runtime = self.runtimes.get(keyid)
            qemu_up = bool(getattr(runtime, "running", runtime is not None))
            guest = self._guest_state(runtime, qemu_up)
            measurement = getattr(domain, "measurement", None)
            return {
                "keyid": keyid,
                "name": self.domain_names.get(keyid, f"kd{keyid}"),
                "state": domain.state.value,
                "guest_state": guest,
                "running": guest in GUEST_LIVE_STATES,
                "memory": self._guest_memory(runtime),
                "vcpus": 1,
                "uptime": (round(time.monotonic() - self.launched_at[keyid], 3)
                           if keyid in self.launched_at else None),
                "policy": {"debug": domain.policy.debug, "hex": domain.policy.pack().hex()},
                "measurement": measurement.digest.hex() if measurement is not None else None,
                "host_data": domain.host_data.hex(),
                "pages_synced": int(getattr(runtime, "pages_synced", 0)),
                "integrity_events": self.memory.integrity_events,
                "endpoints": self._host_endpoints(runtime) if runtime is not None and qemu_up else {},
            }

    @staticmethod
    def _guest_memory(runtime) -> int | None:
        """The launched guest's memory size in bytes, None before launch."""
        size = getattr(runtime, "mem_size", None)
        return size if isinstance(size, int) and size > 0 else None

    @staticmethod
    def _guest_state(runtime, qemu_up: bool) -> str | None:
        """The launched guest's state (runtime.GuestState), None before launch."""
        if runtime is None:
            return None
        guest_state = getattr(runtime, "guest_state", None)
        if guest_state is None:
            return "running" if qemu_up else "shutoff"
        return guest_state()

    def list_domains(self) -> list[dict]:
        """list-domains: the status of every key domain, by KeyID."""
        with self.lock:
            self._check_open()
            return [self.domain_status(keyid) for keyid in sorted(self.domains)]

    # ------------------------------------------------------------ inspection
