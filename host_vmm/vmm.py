"""The untrusted host VMM: allocate, load, verify, launch (or restore), relay, destroy.

It holds no key and no decryption code.  It speaks to the platform only
through :class:`qemu_kd.hostport.client.HostPortClient`; the other modules it
uses are public wire formats (layout, bundle) and the shared-channel client.
It can *verify* what the tenant sealed (hash-kd of the control pages, vmread
of control fields, verify-ept against its own allocation, the platform's
launch measurement against the bundle's) and refuses to launch on any
mismatch, but it can never *read* the guest.  A domain restored from a snapshot
(``restore-kd``, docs/snapshots.md) is served from then on exactly as a launched one.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from qemu_kd.channel.agent_client import AgentClient, connect_shared_channel
from qemu_kd.channel.console import check_initramfs_unpacked, console_summary
from qemu_kd.common.arrays import page_span, page_table
from qemu_kd.common.errors import KdError
from qemu_kd.formats.addresses import PAGE_SIZE
from qemu_kd.hostport.client import HostPortClient
from qemu_kd.hostport.protocol import FLAG_HOST_VERIFIABLE, PAGE_ENTRY_DTYPE, PAGE_TYPE_ZERO, HostPortError
from qemu_kd.formats.layout import HostLayout, expected_eptp, pages_needed
from host_vmm.controls import ControlHost
from host_vmm.window import SessionRelay

if TYPE_CHECKING:
    from qemu_kd.formats.bundle import Bundle
    from host_vmm.hypercalls import HypercallResponder

#: What only load, launch and restore use: the host VMM process imports these once it has
#: answered its first request (an allocate), while the tenant seals (qemu_kd.common.lateimports).
LATER_MODULES = ("qemu_kd.formats.bundle", "host_vmm.hypercalls")

# Intel VMCS encodings of the control fields the host checks.
VMCS_EPT_POINTER = 0x201A
VMCS_HOST_FORCED_EXIT = 0x4200


class HostVerificationError(KdError):
    """The host VMM refused to launch: a check of the sealed domain failed."""

    exit_code = 3


class BundleLayoutError(KdError):
    """The bundle was sealed for another layout than the one this host allocated."""

    exit_code = 3


@dataclass
class Check:
    """One pre-launch verification result."""

    name: str
    ok: bool
    detail: str

    def as_dict(self) -> dict:
        return asdict(self)


#: The widest allocation (in pages, lowest to highest) :func:`stray_hpas` looks up in a table of
#: its own (one byte a page); a wider one is searched sorted.  The platform hands out pages
#: from one DRAM, so an allocation spans little more than its own size.
_TABLE_PAGES = 1 << 24


def stray_hpas(hpas: np.ndarray, allocated: np.ndarray) -> np.ndarray:
    """The entries of ``hpas`` (uint64, in their order) that ``allocated`` (page-aligned
    uint64 hpas, as a layout holds them) does not hold."""
    if allocated.size == 0 or hpas.size == 0:
        return hpas
    low, pages = page_span(allocated)
    if pages <= _TABLE_PAGES:
        table = page_table(allocated, low, pages)
        high = low + (pages - 1) * PAGE_SIZE
        within = (hpas >= np.uint64(low)) & (hpas <= np.uint64(high)) & (hpas % PAGE_SIZE == 0)
        found = np.zeros(hpas.size, dtype=bool)
        found[within] = table[(hpas[within] - np.uint64(low)) >> np.uint64(12)]
    else:
        ordered = np.sort(allocated)
        at = np.minimum(np.searchsorted(ordered, hpas), ordered.size - 1)
        found = ordered[at] == hpas
    return hpas[~found]


def zero_entries(bundle: Bundle) -> np.ndarray:
    """The bundle's zero records as add-zero-pages entries (an array: tens of thousands of them)."""
    zeros = bundle.zero_pages.array
    entries = np.zeros(zeros.size, dtype=PAGE_ENTRY_DTYPE)
    entries["hpa"], entries["gpa"], entries["perms"] = zeros["hpa"], zeros["gpa"], zeros["perms"]
    entries["type"] = PAGE_TYPE_ZERO
    return entries


def page_entries(bundle: Bundle) -> np.ndarray:
    """The bundle's page records as add-pages entries (an array)."""
    pages = bundle.pages.array
    entries = np.zeros(pages.size, dtype=PAGE_ENTRY_DTYPE)
    entries["hpa"], entries["gpa"], entries["type"], entries["perms"] = (
        pages["hpa"], pages["gpa"], pages["type"], pages["perms"])
    from qemu_kd.formats.bundle import FLAG_HOST_VERIFIABLE as BUNDLE_HOST_VERIFIABLE

    entries["flags"] = np.where(pages["flags"] & BUNDLE_HOST_VERIFIABLE, FLAG_HOST_VERIFIABLE, 0)
    return entries


class HostVmm:
    """One host VMM driving one key domain on a platform."""

    def __init__(self, platform_socket: str, timeout: float = 120.0, answer_hypercalls: bool = True):
        self.client = HostPortClient(platform_socket, timeout=timeout)
        # The hypercall responder's own connection (next-exit blocks while it waits).
        self.responder_client_factory = lambda: HostPortClient(platform_socket, timeout=timeout)
        self.answer_hypercalls = answer_hypercalls
        self.responder: HypercallResponder | None = None
        self.layout: HostLayout | None = None
        # The KeyID restore-kd chose (a launched domain's is its layout's).
        self._restored_keyid: int | None = None
        self.bundle: Bundle | None = None
        self.endpoints: dict | None = None
        self.agent: AgentClient | None = None
        self.launched = False
        self.destroyed = False
        self.detached = False
        self.checks: list[Check] = []
        self.timings: dict[str, float] = {}
        self.sessions = SessionRelay(lambda: ControlHost(self.client, self.agent, self.keyid))

    @property
    def keyid(self) -> int:
        if self.layout is not None:
            return self.layout.keyid
        if self._restored_keyid is None:
            raise KdError("no domain yet: allocate (or restore) one first")
        return self._restored_keyid

    @property
    def _has_keyid(self) -> bool:
        return self.layout is not None or self._restored_keyid is not None

    @property
    def holds_domain(self) -> bool:
        """A KeyID (a reservation or a domain) is this host's to destroy."""
        return self._has_keyid and not (self.detached or self.destroyed)

    # -- layout ---------------------------------------------------------------------
    def allocate(self, memory_size: int, host_data: bytes = bytes(32)) -> HostLayout:
        """Reserve a KeyID and the pages a guest of ``memory_size`` needs."""
        info = self.client.platform_info()
        alloc = self.client.alloc(npages=pages_needed(memory_size))
        self.layout = HostLayout(keyid=alloc.keyid, memory_size=memory_size, hpas=list(alloc.hpas),
                                 host_data=bytes(host_data), platform_chain_pem=info.chain_pem)
        return self.layout

    # -- load -----------------------------------------------------------------------
    def check_bundle_layout(self, bundle: Bundle) -> None:
        layout = self.layout
        m = bundle.manifest
        if m.keyid != layout.keyid:
            raise BundleLayoutError(
                f"bundle was sealed for KeyID {m.keyid}, this host reserved KeyID {layout.keyid}",
                "seal the guest again for this host's layout")
        if m.memory_size != layout.memory_size:
            raise BundleLayoutError(
                f"bundle is for {m.memory_size >> 20} MiB of guest memory, the layout for "
                f"{layout.memory_size >> 20} MiB", "seal the guest again for this host's layout")
        if m.host_data != layout.host_data:
            raise BundleLayoutError("bundle carries other host_data than this host's layout",
                                    "seal the guest again for this host's layout")
        stray = stray_hpas(np.concatenate([bundle.pages.hpas, bundle.zero_pages.hpas]),
                           np.array(layout.hpas, dtype=np.uint64))
        if stray.size:
            raise BundleLayoutError(
                f"bundle places {stray.size} page(s) outside this host's allocation "
                f"(first at hpa {int(stray[0]):#x})", "seal the guest again for this host's layout")

    def load(self, bundle: Bundle) -> None:
        """Write the ciphertext through KeyID 0, create the domain, add its pages."""
        self.check_bundle_layout(bundle)
        self.bundle = bundle
        self.checks = []
        self.client.write_phys_pages(bundle.pages.hpas, bundle.pages.ciphertext)
        self._build(bundle)

    def load_file(self, path: str | Path) -> None:
        """:meth:`load` of the bundle file at ``path``.  This host reads and checks the file;
        the platform reads the ciphertext from the same open file (its descriptor goes with
        the request) rather than through the socket."""
        from qemu_kd.formats.bundle import Bundle

        bundle, file, size = Bundle.open(Path(path))
        with file:
            self.check_bundle_layout(bundle)
            self.bundle = bundle
            self.checks = []
            offset, stride = bundle.ciphertext_in_file(size)
            self.client.write_phys_pages_from_file(bundle.pages.hpas, file.fileno(), offset, stride)
        self._build(bundle)

    def _build(self, bundle: Bundle) -> None:
        """create-kd, add-pages and add-zero-pages for a bundle whose ciphertext is written."""
        self.client.create_kd(self.keyid, bundle.wrapped_key, bundle.manifest.policy,
                              self.layout.host_data)
        self.client.add_pages(self.keyid, page_entries(bundle))
        self.client.add_zero_pages(self.keyid, zero_entries(bundle))

    # -- verify ---------------------------------------------------------------------
    def verify(self) -> list[Check]:
        """Every pre-launch check; nothing is launched here."""
        m = self.bundle.manifest
        keyid = self.keyid
        checks: list[Check] = []

        def attempt(name: str, fn) -> None:
            try:
                ok, detail = fn()
            except HostPortError as exc:
                ok, detail = False, str(exc)
            checks.append(Check(name, ok, detail))

        def hash_kd():
            digest = self.client.hash_kd(keyid)
            same = digest == m.host_verifiable_digest
            return same, ("control pages match the bundle" if same else
                          "hash of VMCS/EPT pages differs from the bundle's host-verifiable digest")

        def forced_exit():
            value = self.client.vmread(keyid, VMCS_HOST_FORCED_EXIT)
            return bool(value), ("host-forced exits allowed" if value else
                                 "VMCS forbids host-forced exits; this host requires them")

        def eptp():
            value = self.client.vmread(keyid, VMCS_EPT_POINTER)
            want = expected_eptp(self.layout)
            return value == want, (f"EPT pointer {value:#x}" if value == want else
                                   f"EPT pointer {value:#x} is not the allocated PML4 {want:#x}")

        def ept():
            verdict = self.client.verify_ept(keyid, self.layout.hpas)
            if not verdict.ok:
                return False, "; ".join(verdict.reasons)
            same = verdict.mapping_digest == m.ept_mapping_digest
            return same, (f"{verdict.mapped_pages} pages mapped, no alias or foreign page" if same
                          else "EPT mapping digest differs from the bundle's")

        def measurement():
            value = self.client.measure_kd(keyid)
            same = value == m.measurement
            return same, (value.hex() if same else
                          f"platform measured {value.hex()[:16]}…, bundle expects "
                          f"{m.measurement.hex()[:16]}…")

        attempt("hash-kd", hash_kd)
        attempt("host-forced-exit", forced_exit)
        attempt("ept-pointer", eptp)
        attempt("verify-ept", ept)
        if all(c.ok for c in checks):
            attempt("measurement", measurement)
        self.checks = checks
        return checks

    # -- launch ---------------------------------------------------------------------
    def launch(self, ready_timeout: float = 120.0, diagnose=None, name: str | None = None) -> dict:
        """Launch (checks must have passed), attach the shared channel, run, wait for the agent.

        ``name`` labels the domain (unique among the machine's live domains; by default the
        platform picks the next free ``kdN``).

        The checks of an earlier :meth:`verify` stand: once verify-ept passed, the platform
        write-locks the domain's pages, so nothing they looked at can change.
        """
        checks = self.checks or self.verify()
        failed = [c for c in checks if not c.ok]
        if failed:
            raise HostVerificationError(
                "refusing to launch: " + "; ".join(f"{c.name}: {c.detail}" for c in failed),
                "the bundle, the layout or the platform's pages do not match")
        t0 = time.perf_counter()
        self.endpoints = self.client.launch(self.keyid, name)
        self.launched = True
        self._attach(diagnose)
        t1 = time.perf_counter()
        self.client.run(self.keyid)
        self.agent.wait_ready(ready_timeout)
        self.timings = {"launch": t1 - t0, "kernel to agent ready": time.perf_counter() - t1}
        log = self.endpoints.get("console_log")
        check_initramfs_unpacked(Path(log) if log else None)
        return self.endpoints

    def restore(self, path: str, ready_timeout: float = 120.0, name: str | None = None, *,
                domain_id: bytes | None = None, measurement: bytes | None = None,
                diagnose=None) -> dict:
        """Have the platform restore the snapshot at ``path`` (``restore-kd``: the platform reads
        and checks the file; ``domain_id`` / ``measurement``: what the caller expects it to be
        of), then serve the new domain as a launched one: shared channel, hypercall responder,
        ``run``, and the agent answering (it resumes where the snapshot was taken, so it sends
        no ``ready``).  Returns restore-kd's result (``keyid``, ``name``, ``endpoints``,
        ``domain_id``, ``version``)."""
        if self._has_keyid:
            raise KdError("this host VMM already drives a domain",
                          "restore with a host VMM of its own")
        t0 = time.perf_counter()
        restored = self.client.restore_kd(path, name, domain_id=domain_id, measurement=measurement)
        self._restored_keyid = int(restored["keyid"])
        self.endpoints = restored["endpoints"]
        self.launched = True
        self._attach(diagnose)
        t1 = time.perf_counter()
        self.client.run(self.keyid)
        self.agent.ping(timeout=ready_timeout)
        self.timings = {"restore": t1 - t0, "agent ready": time.perf_counter() - t1}
        return restored

    def _attach(self, diagnose) -> None:
        """Before the vCPU runs: connect the shared channel and start the hypercall responder."""
        sock = connect_shared_channel(self.endpoints.get("shared"))
        if self.answer_hypercalls:
            from host_vmm.hypercalls import HypercallResponder

            self.responder = HypercallResponder(self.responder_client_factory, self.keyid)
            self.responder.start()
        log = self.endpoints.get("console_log")
        self.agent = AgentClient(sock, diagnose=diagnose or (
            lambda: console_summary(Path(log)) if log else ""))

    def relay(self, cmd: str, wait: float, args: dict) -> dict:
        """One shared-channel request for the tenant (session frames may use the shared window)."""
        if self.agent is None:
            raise KdError("the domain is not running", "launch it first")
        return self.sessions.relay(self.agent, cmd, wait, args)

    # -- teardown -------------------------------------------------------------------
    def detach(self) -> None:
        """Let go of a running domain without stopping it (close the shared channel and the port)."""
        self._stop_responder()
        if self.agent is not None:
            try:
                self.agent.sock.close()
            except OSError:
                pass
            self.agent = None
        self.detached = True
        self.client.close()

    def _stop_responder(self) -> None:
        if self.responder is not None:
            self.responder.stop()
            self.responder = None

    def destroy(self) -> None:
        """Power the guest off if it runs, then destroy the domain (or free the reservation)."""
        if self.destroyed:
            return
        self.destroyed = True
        # The responder's next-exit returns the moment destroy-kd closes the domain's exits:
        # tell it to stop now and reap it afterwards, rather than wait out its poll.
        responder = self.responder
        if responder is not None:
            responder.stop(wait=False)
        if self.agent is not None:
            try:
                self.agent.poweroff(timeout=5)
            except KdError:
                pass
            try:
                self.agent.sock.close()
            except OSError:
                pass
            self.agent = None
        if self._has_keyid:
            try:
                self.client.destroy_kd(self.keyid)
            except HostPortError:
                try:
                    self.client.free(self.keyid)
                except HostPortError:
                    pass
        self._stop_responder()
        self.client.close()
