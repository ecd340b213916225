"""A launched key domain: the platform's side of a protected guest in QEMU.

Launch (see docs/hostport.md):

1. VM-entry checks on the decrypted VMCS (long-mode guest state, policy equal
   to the policy bound at create-kd, host-forced exits as the VMCS says).
2. Start QEMU paused with file-backed guest RAM that only the platform opens.
3. Walk the domain's EPT (gpa → hpa) and decrypt every IMAGE page from DRAM
   into guest RAM at its gpa; ZERO pages are already zero in a fresh RAM file.
   When measure-kd or restore-kd already filled guest RAM with that plaintext
   (:mod:`.guestram`), it is used instead, once it holds exactly the image pages
   the EPT maps at their gpas.  Then complete the kernel command line with the platform's own
   ``tsc_early_khz`` (unmeasured; docs/formats.md §11.7).
4. Load the vCPU from the VMCS guest-state area through the gdbstub.
5. Attach the guest port (ttyS2) and serve attestation reports and sealing keys.

The vCPU stays at its entry point until :meth:`DomainRuntime.run` so the host
can attach the shared channel first (like TDX, where entering the TD is a
separate step after finalising it).  After launch the runtime keeps DRAM's
encrypted shadow current: :meth:`sync_shadow` re-encrypts only the pages
changed since the last sync, and the platform calls it before any host read
of the domain's private pages.

Exit / resume: exit pauses the vCPU, seals its whole state (every register
QEMU's gdbstub describes) into the protected save area (MEE-encrypted at the
save-area hpa, with an HMAC under a key only the platform holds), scrubs it in
QEMU and publishes an exit record for the host; resume checks the HMAC and
restores the state in launch order.  A tampered save area is refused.  A
hypercall (guest-port op ``hypercall``) is such an exit: the host sees only the
exposed registers and answers with ``hypercall-reply`` (:mod:`.exits`).
"""

from __future__ import annotations

import base64
import errno
import logging
import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from qemu_kd.platform.attestation import sign_report
from qemu_kd.platform.endpoints.audit import AuditLog
from qemu_kd.platform.guestram import StagedRam, guest_memory_size
from qemu_kd.common.errors import GuestImageError, KdError
from qemu_kd.common.scrub import scrub
from qemu_kd.formats.bootlayout import complete_cmdline
from qemu_kd.qemu.guestport import GuestPortServer
from qemu_kd.qemu.launch import host_tsc_khz
from qemu_kd.qemu.machine import MachineSpec, QemuMachine
from qemu_kd.formats.measurement import PageType
from qemu_kd.formats.addresses import PAGE_SIZE, UNMAPPED
from qemu_kd.formats.errors import FieldValueError
from qemu_kd.formats.hypercall import MAX_LEAF, ExitRecord, check_registers, narrow_mask
from qemu_kd.formats.savearea import HypercallFrame, SaveArea
from qemu_kd.formats.vmcs import X86_GPR_ORDER, exposed_registers
from qemu_kd.platform.exits import (
    ExitHooks,
    ExitLog,
    ExitStateError,
    SaveAreaError,
    VcpuSealer,
    open_save_area,
    seal_save_area,
)

MiB = 1 << 20
#: Pages compared per step when the shadow sync looks for changed pages (8 MiB).
SYNC_STEP_PAGES = 2048
#: How long a hypercall waits for the host by default, and at most (seconds).
HYPERCALL_TIMEOUT = 10.0
MAX_HYPERCALL_TIMEOUT = 600.0

__all__ = ["DomainRuntime", "Endpoints", "GuestState", "LaunchError", "ResumeState", "SaveAreaError",
           "vm_entry_checks"]

log = logging.getLogger(__name__)


class LaunchError(KdError):
    """A VM-entry check failed or the domain could not be started."""


class HypercallError(KdError):
    """A hypercall the platform refuses, or one the host did not answer."""


@dataclass
class Endpoints:
    """Host-visible endpoints of a running domain.

    Console and shared channel are host-visible by design; ``qmp`` and ``gdb``
    are the filtering proxies (never QEMU's own sockets), ``audit_log`` is where
    they record what they let through or refused.
    """

    shared: str
    console: str
    console_log: str
    qmp: str
    gdb: str
    audit_log: str


def vm_entry_checks(vmcs, domain_policy, mem_size: int) -> list[str]:
    """Reasons the VMCS guest state cannot be entered (empty when it can)."""
    g = vmcs.guest
    reasons = []
    if not g.in_long_mode():
        reasons.append("guest state is not 64-bit long mode (CR0.PG, CR4.PAE, EFER.LMA)")
    if not g.rip or g.rip >= mem_size:
        reasons.append(f"guest RIP {g.rip:#x} is outside guest memory")
    if g.rsp >= mem_size:
        reasons.append(f"guest RSP {g.rsp:#x} is outside guest memory")
    if g.cr3 % PAGE_SIZE or g.cr3 >= mem_size:
        reasons.append(f"guest CR3 {g.cr3:#x} is not a page inside guest memory")
    if g.rflags & 0x2 != 0x2:
        reasons.append("guest RFLAGS bit 1 must be set")
    if vmcs.policy != domain_policy:
        reasons.append("VMCS policy differs from the policy bound at create-kd")
    return reasons


@dataclass
class ResumeState:
    """Where a restored domain resumes (platform/snapshot.py): instead of the VMCS's entry
    state, the registers of the snapshot's exit, QEMU's device state and the TSC rate the
    guest was started with."""

    registers: dict[str, int]
    devices: bytes
    tsc_khz: int | None


class DomainRuntime:
    """QEMU, guest RAM, shadow sync, guest port and exit/resume for one domain."""

    def __init__(self, domain, identity, accel: str = "tcg", name: str | None = None,
                 console_log: Path | None = None):
        self.domain = domain
        self.identity = identity
        self.accel = accel
        self.name = name or f"kd{domain.keyid}"
        self.console_log = console_log
        self.machine: QemuMachine | None = None
        self.guest_port: GuestPortServer | None = None
        self.gpa_to_hpa: np.ndarray | None = None
        self.mem_size = 0
        self.tsc_khz: int | None = None   # what the platform added to the command line
        self.pages_synced = 0
        self.exited = False
        self._snapshot: np.ndarray | None = None
        self._save_mac_key = os.urandom(48)
        self._save_hpa: int | None = None
        # Exit records and the hypercall waiting for the host (next-exit, hypercall-reply).
        self.exits = ExitLog(domain.keyid)
        # Set by the platform so guest-initiated exits move the domain's state too.
        self.exit_hooks: ExitHooks | None = None
        self._exit_seq = 0
        self._exit_reason: str | None = None
        self._entered = threading.Event()   # set while the vCPU is not exited
        self._entered.set()
        # Held by anyone who talks to QEMU's gdbstub: this runtime and the gdb proxy.
        self.rsp_lock = threading.RLock()
        # Held while ``exited`` is set or cleared, and by the gdb proxy from its check of
        # _may_run until the continue it then sends (taken inside rsp_lock there, so
        # never take rsp_lock while holding it).
        self.run_lock = threading.RLock()
        # Held around every use of the machine's own QMP monitor: the platform (under its
        # lock) and the gdb proxy's session threads both ask it.  Taken inside run_lock.
        self.qmp_lock = threading.Lock()
        self.qmp_proxy = None
        self.gdb_proxy = None
        self.audit: AuditLog | None = None

    # -- launch ---------------------------------------------------------------------
    def launch(self, resume_from: ResumeState | None = None) -> Endpoints:
        """VM-entry checks, start QEMU, decrypt the image, load the vCPU; leaves it paused.

        ``resume_from`` (a restore): QEMU waits for its device state, the command line
        stays as it is in memory, and the vCPU gets the snapshot's registers.
        """
        # Guest RAM measure-kd or restore-kd filled (guestram.py): used only if it holds exactly
        # the image pages checked below, each at its gpa; else discarded and decrypted here.
        staged = self.domain.take_staged_ram()
        try:
            vmcs = self.domain.read_vmcs()
            gpas, hpas = self.domain.guest_mapping()
            if not gpas.size:
                raise LaunchError(f"key domain {self.domain.keyid} maps no guest memory")
            self.mem_size = guest_memory_size(gpas)
            reasons = vm_entry_checks(vmcs, self.domain.policy, self.mem_size)
            if reasons:
                log.warning("key domain %d: VM entry refused: %s", self.domain.keyid, "; ".join(reasons))
                raise LaunchError(f"VM entry refused for key domain {self.domain.keyid}: "
                                  + "; ".join(reasons))
            self.gpa_to_hpa = np.zeros(self.mem_size // PAGE_SIZE, dtype=np.uint64)
            self.gpa_to_hpa[(gpas // PAGE_SIZE).astype(np.int64)] = hpas
            self._save_hpa = vmcs.save_area_hpa

            pages = self.domain.pages()
            image = pages.types == int(PageType.IMAGE)
            img_hpas = pages.hpas[image]
            # hpa -> gpa page number for the image pages, by sorted lookup (every one is mapped:
            # verify-ept checked that each page added for the guest is where it was measured).
            by_hpa = np.argsort(hpas)
            at = by_hpa[np.minimum(np.searchsorted(hpas[by_hpa], img_hpas), hpas.size - 1)]
            if not (hpas[at] == img_hpas).all():
                raise LaunchError(f"key domain {self.domain.keyid}: an image page is not mapped into the guest")
            img_gpns = (gpas[at] // PAGE_SIZE).astype(np.int64)
            if staged is not None and not staged.matches(self.mem_size, img_gpns, img_hpas):
                log.warning("key domain %d: the guest RAM filled before launch does not hold the image "
                            "pages the EPT maps; decrypting them again", self.domain.keyid)
                staged.close()
                staged = None
        except BaseException:
            if staged is not None:
                staged.close()
            self.stop()     # a QEMU started ahead (prestart) goes too
            raise

        spec = MachineSpec(mem_size=self.mem_size, accel=self.accel, name=self.name,
                           incoming=resume_from is not None)
        ram = None
        if staged is not None:
            ram, self._snapshot = staged.take()
        if self.machine is not None and (ram is None or self.machine.guest_ram is not ram
                                         or self.machine.spec != spec):
            # Started ahead for other RAM, or as another machine: not this launch's.  It goes,
            # and so does its RAM: a fresh QEMU gets fresh RAM, decrypted from DRAM.
            log.warning("key domain %d: the QEMU started ahead does not fit the launch; starting "
                        "another", self.domain.keyid)
            self.machine.stop()
            self.machine = None
            if ram is not None:
                ram.close()
                ram = None
                scrub(self._snapshot)
                self._snapshot = None
        try:
            if self.machine is None:
                self.machine = QemuMachine(spec, console_log=self.console_log, ram=ram)
                self.machine.start()
            else:
                self.machine.check_alive("before launch")
            if ram is None:
                self._fill_ram(img_hpas, img_gpns)
            if resume_from is None:
                self._complete_cmdline(vmcs.guest.rsi)
            else:
                self.tsc_khz = resume_from.tsc_khz
            unsealable = VcpuSealer(self.machine.rsp).check_target()
            if unsealable:
                raise LaunchError(f"key domain {self.domain.keyid}: QEMU's vCPU registers cannot all be "
                                  "sealed on exit: " + "; ".join(unsealable),
                                  "use the QEMU version the platform supports")
            if resume_from is None:
                self.machine.rsp.load_vcpu(vmcs.guest)
            else:
                self.machine.load_device_state(resume_from.devices)
                VcpuSealer(self.machine.rsp).restore(resume_from.registers)
            port = self.machine.connect_serial("guestport")
            self.guest_port = GuestPortServer(port, {"info": self._info, "report": self._report,
                                                     "derive-key": self._derive_key,
                                                     "tenant-key": self._tenant_key,
                                                     "certificates": self._certificates,
                                                     "hypercall": self._hypercall})
            self.guest_port.start()
        except BaseException as exc:
            # A platform error's message goes to the host anyway; of anything else, only the type.
            log.warning("key domain %d: launch failed: %s", self.domain.keyid,
                        exc.message if isinstance(exc, KdError) else type(exc).__name__)
            self.stop()
            raise
        log.info("key domain %d launched as %s: %d MiB, %d image pages, accel %s",
                 self.domain.keyid, self.name, self.mem_size >> 20, int(img_hpas.size), self.accel)
        self.domain.shadow_sync = self.sync_shadow
        self.domain.on_destroy = self.stop
        return self.endpoints()

    def prestart(self, staged: StagedRam, incoming: bool) -> None:
        """Start this domain's QEMU ahead of launch, paused (``-S``; ``incoming``: waiting for a
        device state), on the guest RAM ``staged`` while that is still being filled (restore-kd
        starts it before it builds the domain).  Nothing runs in it: the vCPU is loaded and the
        device state fed only by :meth:`launch`, after its checks, which use this QEMU only if
        the RAM it maps is the one launch takes; :meth:`stop` ends it whatever happens."""
        if self.machine is not None:
            raise LaunchError(f"key domain {self.domain.keyid} already has a QEMU")
        spec = MachineSpec(mem_size=staged.size, accel=self.accel, name=self.name, incoming=incoming)
        self.machine = QemuMachine(spec, console_log=self.console_log, ram=staged.ram)
        try:
            self.machine.start()
        except BaseException:
            self.stop()
            raise

    def _fill_ram(self, img_hpas: np.ndarray, img_gpns: np.ndarray) -> None:
        """Decrypt the image pages from DRAM into guest RAM at their gpas, and into the baseline."""
        ram = np.frombuffer(self.machine.map_ram(), dtype=np.uint8).reshape(-1, PAGE_SIZE)
        # The RAM file starts as zeros, so the baseline does too (np.zeros maps
        # zero pages lazily); only the image pages are written into both.
        self._snapshot = np.zeros(ram.shape, dtype=ram.dtype)
        step = 4096
        for start in range(0, img_hpas.size, step):
            plain = self.domain.decrypt_page_array(img_hpas[start:start + step])
            idx = img_gpns[start:start + step]
            ram[idx] = plain
            self._snapshot[idx] = plain

    def start_proxies(self, audit_path: Path, on_stop=None, on_cont=None) -> None:
        """Start the host-facing QMP and gdb proxies (docs/debugging.md) under the domain's policy.

        ``on_stop``/``on_cont`` carry QMP ``stop``/``cont`` through the platform's
        exit and resume.  gdb under DEBUG pauses through the gdbstub itself, so the
        debugger sees the registers (exit would scrub them).
        """
        from qemu_kd.platform.endpoints.gdb_proxy import GdbProxy
        from qemu_kd.platform.endpoints.qmp_proxy import QmpProxy

        m = self._require_machine()
        debug = self.domain.policy.debug
        self.audit = AuditLog(audit_path)
        try:
            self.qmp_proxy = QmpProxy(m.socket_path("kd-qmp"), m.socket_path("qmp-host"), debug=debug,
                                      domain=self.name, audit=self.audit, on_stop=on_stop,
                                      on_cont=on_cont)
            self.qmp_proxy.start()
            self.gdb_proxy = GdbProxy(m.socket_path("kd-gdb"), m.rsp, debug=debug, domain=self.name,
                                      audit=self.audit, rsp_lock=self.rsp_lock, may_run=self._may_run,
                                      run_lock=self.run_lock, vcpu_paused=self._vcpu_paused)
            self.gdb_proxy.start()
        except BaseException:
            self._stop_proxies()
            raise

    def _may_run(self) -> str | None:
        """Why the vCPU may not run now (the gdb proxy asks before every continue), or None."""
        with self.run_lock:
            exited = self.exited
        if exited:
            return (f"key domain {self.domain.keyid} is exited (its registers are sealed in the "
                    "save area); resume it with QMP cont first")
        return None

    def _vcpu_paused(self) -> bool:
        """Whether QEMU has the vCPU stopped (False when that cannot be told)."""
        m = self.machine
        if m is None or not m.running:
            return False
        try:
            with self.qmp_lock:
                return not m.qmp.cmd("query-status").get("running")
        except Exception as exc:  # noqa: BLE001 - QEMU is going away; nothing to resume
            log.info("key domain %d: query-status failed: %s", self.domain.keyid, type(exc).__name__)
            return False

    def _stop_proxies(self) -> None:
        for attr in ("gdb_proxy", "qmp_proxy"):
            proxy = getattr(self, attr)
            if proxy is not None:
                setattr(self, attr, None)
                try:
                    proxy.close()
                except Exception as exc:  # noqa: BLE001 - teardown goes on regardless
                    log.warning("key domain %d: closing its %s failed: %s", self.domain.keyid,
                                attr.replace("_", " "), type(exc).__name__)

    def endpoints(self) -> Endpoints:
        m = self.machine
        return Endpoints(shared=m.socket_path("shared"), console=m.socket_path("console"),
                         console_log=str(m.console_log), qmp=m.socket_path("kd-qmp"),
                         gdb=m.socket_path("kd-gdb"),
                         audit_log=str(self.audit.path) if self.audit else "")

    def debug_read(self, gpa: int, length: int) -> bytes:
        """Plaintext guest memory at ``gpa`` (the caller has checked the DEBUG policy)."""
        m = self._require_machine()
        if gpa < 0 or length < 0 or gpa + length > self.mem_size:
            raise LaunchError(f"debug read of {length} bytes at gpa {gpa:#x} is outside the "
                              f"domain's {self.mem_size >> 20} MiB of guest memory")
        return bytes(m.map_ram()[gpa:gpa + length])

    @property
    def running(self) -> bool:
        """Whether the domain's QEMU process is up (whatever its guest is doing)."""
        return self.machine is not None and self.machine.running

    def guest_state(self) -> str:
        """The guest's state as the host may know it, in virsh's terms (docs/hostport.md).

        ``running``, ``paused`` (stopped, e.g. by a debugger), ``exited`` (the
        platform's exit), ``halted`` (QEMU is up but the vCPU halted with
        interrupts off: the guest powered itself off without firmware to do it,
        or stopped for good), ``shutoff`` (QEMU ended cleanly, or reports
        ``shutdown``) or ``crashed`` (QEMU was killed or failed, or reports
        ``guest-panicked``/``internal-error``).  The caller holds the platform lock,
        as for every other use of the machine's own monitor.
        """
        m = self.machine
        if m is None or m.proc is None:
            return GuestState.SHUTOFF
        if not m.running:
            return self._ended_state(m)
        try:
            with self.qmp_lock:
                status = str(m.qmp.cmd("query-status").get("status"))
                registers = str(m.qmp.cmd("human-monitor-command", **{"command-line": "info registers"})) \
                    if status == "running" else ""
            if status == "running":
                return GuestState.HALTED if vcpu_halted_for_good(registers) else GuestState.RUNNING
        except Exception as exc:  # noqa: BLE001 - QEMU is going away or does not answer
            log.info("key domain %d: QEMU does not answer query-status: %s", self.domain.keyid,
                     type(exc).__name__)
            if m.running:
                return GuestState.CRASHED
            return self._ended_state(m)
        if status in QEMU_SHUTOFF:
            return GuestState.SHUTOFF
        if status in QEMU_CRASHED:
            return GuestState.CRASHED
        with self.run_lock:
            return GuestState.EXITED if self.exited else GuestState.PAUSED

    @staticmethod
    def _ended_state(m: QemuMachine) -> str:
        """``shutoff`` or ``crashed`` for a QEMU that has ended.

        QEMU runs with ``-no-reboot`` and the guest with ``panic=-1``: a kernel
        panic resets the guest at once and QEMU exits with status 0, as it does
        for a plain reboot.  The panic's last words on the (host-visible)
        console tell the two apart.
        """
        if m.proc.returncode != 0:
            return GuestState.CRASHED
        return GuestState.CRASHED if console_shows_panic(m.console_log) else GuestState.SHUTOFF

    def run(self) -> None:
        """Let the vCPU run (first entry, or after resume)."""
        m = self._require_machine()
        with self.run_lock, self.qmp_lock:
            m.resume()

    def _complete_cmdline(self, zero_page_gpa: int) -> None:
        """Append `` tsc_early_khz=<this processor's kHz>`` to the guest's command line in RAM.

        Like firmware filling in a launch parameter: unmeasured, and the host has
        no say in it.  Skipped when the measured line sets tsc_early_khz itself.
        """
        khz = host_tsc_khz()
        if khz is None:
            log.warning("key domain %d: this processor's TSC frequency is unknown; the guest's "
                        "command line stays as measured", self.domain.keyid)
            return
        try:
            done = complete_cmdline(self.machine.map_ram(), self.mem_size, zero_page_gpa, khz)
        except GuestImageError as exc:
            raise LaunchError(f"key domain {self.domain.keyid}: the kernel command line cannot take "
                              f"the platform's tsc_early_khz: {exc.message}", exc.hint) from None
        if done is not None:
            self.machine.write_ram(done.gpa, done.data)
            self.tsc_khz = done.tsc_khz

    # -- guest port -----------------------------------------------------------------
    def _info(self, req: dict) -> dict:
        """What the guest is, from the platform: the only source the guest trusts for its policy."""
        return {"protected": True, "keyid": self.domain.keyid,
                "policy_flags": self.domain.policy.flags,
                "measurement": self.domain.measurement.digest.hex() if self.domain.measurement else None,
                "tsc_khz": self.tsc_khz}

    def _tenant_key(self, req: dict) -> dict:
        if self.domain.tenant_authority is None:
            raise ValueError("the domain has no tenant authority key")
        return {"key": self.domain.tenant_authority.hex()}

    def _report(self, req: dict) -> dict:
        data = bytes.fromhex(req.get("report_data", ""))
        if len(data) != 64:
            raise ValueError("report_data must be 64 bytes")
        if self.domain.measurement is None:
            raise ValueError("the domain has no finalized measurement")
        report = sign_report(self.identity, policy=self.domain.policy,
                             measurement=self.domain.measurement.digest, report_data=data,
                             host_data=self.domain.host_data, keyid=self.domain.keyid)
        return {"report": base64.b64encode(report.pack()).decode()}

    def _certificates(self, req: dict) -> dict:
        """The platform's certificate chain (public), so a guest can hand it out with its reports."""
        return {"chain_pem": self.identity.chain_pem().decode()}

    def _derive_key(self, req: dict) -> dict:
        """A sealing key from the platform's sealing root (never from its key-agreement key)."""
        if self.domain.measurement is None:
            raise ValueError("the domain has no finalized measurement")
        label = str(req.get("label", "")).encode()
        key = self.identity.sealing_key(self.domain.measurement.digest, self.domain.policy.pack(), label)
        return {"key": key.hex()}

    # -- control updates (platform.controls) ----------------------------------------
    def _ram_pages(self) -> np.ndarray:
        return np.frombuffer(self._require_machine().map_ram(), dtype=np.uint8).reshape(-1, PAGE_SIZE)

    def guest_pages(self, gpas: np.ndarray) -> np.ndarray:
        """Plaintext copy of guest pages, shape (n, 4096)."""
        return self._ram_pages()[(np.asarray(gpas, dtype=np.uint64) // PAGE_SIZE).astype(np.int64)].copy()

    def unmap_guest_pages(self, gpas: np.ndarray) -> None:
        """Balloon out: the gpas map no page any more; their contents in guest RAM are scrubbed."""
        idx = (np.asarray(gpas, dtype=np.uint64) // PAGE_SIZE).astype(np.int64)
        self._ram_pages()[idx] = 0
        self._snapshot[idx] = 0
        self.gpa_to_hpa[idx] = UNMAPPED

    #: Page numbers (gpa / 4096) of guest pages shared with the host (replaced, never changed in place).
    shared_pages: np.ndarray = np.zeros(0, dtype=np.int64)

    def share_guest_pages(self, gpas: np.ndarray, shared: bool) -> None:
        """The gpas are now shared with the host (their DRAM pages hold plaintext), or private again
        (their contents dropped: zeros, as a page converted back is accepted)."""
        idx = (np.asarray(gpas, dtype=np.uint64) // PAGE_SIZE).astype(np.int64)
        if shared:
            self.shared_pages = np.union1d(self.shared_pages, idx)
        else:
            self.shared_pages = np.setdiff1d(self.shared_pages, idx)
            self._ram_pages()[idx] = 0
            self._snapshot[idx] = 0

    def _pull_shared(self, ram: np.ndarray) -> None:
        """What the host wrote into shared pages since the last sync reaches guest RAM (if both
        wrote a page, the host's bytes win)."""
        idx = self.shared_pages
        if not idx.size:
            return
        dram = self.domain.load_shared(self.gpa_to_hpa[idx])
        wrote = (dram.view(np.uint64) != self._snapshot[idx].view(np.uint64)).any(axis=1)
        if wrote.any():
            ram[idx[wrote]] = dram[wrote]
            self._snapshot[idx[wrote]] = dram[wrote]

    def map_guest_pages(self, gpas: np.ndarray, hpas: np.ndarray, plain: np.ndarray | None) -> None:
        """The gpas now live at ``hpas``: with ``plain`` (relocation, already encrypted there by the
        caller) their contents stay; without it they are accepted as zeros."""
        idx = (np.asarray(gpas, dtype=np.uint64) // PAGE_SIZE).astype(np.int64)
        if plain is None:
            self._ram_pages()[idx] = 0
            self._snapshot[idx] = 0
        else:
            self._snapshot[idx] = plain
        self.gpa_to_hpa[idx] = np.asarray(hpas, dtype=np.uint64)

    # -- shadow ---------------------------------------------------------------------
    def sync_shadow(self) -> int:
        """Re-encrypt into DRAM the guest pages changed since the last sync; returns how many."""
        if self.machine is None or self._snapshot is None or not self.machine.running:
            return 0
        ram = np.frombuffer(self.machine.map_ram(), dtype=np.uint8).reshape(-1, PAGE_SIZE)
        self._pull_shared(ram)
        changed = self._changed_pages(ram)
        # A gpa a control update unmapped has no page any more: nothing to encrypt into.
        changed = changed[self.gpa_to_hpa[changed] != UNMAPPED]
        if changed.size:
            plain = ram[changed]     # a copy: the guest may go on writing
            shared = np.isin(changed, self.shared_pages)
            if shared.any():     # shared with the host: stored as plaintext
                self.domain.store_shared(self.gpa_to_hpa[changed[shared]], plain[shared])
                if not shared.all():
                    self.domain.encrypt_into_dram(self.gpa_to_hpa[changed[~shared]], plain[~shared])
            else:
                self.domain.encrypt_into_dram(self.gpa_to_hpa[changed], plain)
            self._snapshot[changed] = plain
        self.pages_synced += int(changed.size)
        return int(changed.size)

    def _changed_pages(self, ram: np.ndarray) -> np.ndarray:
        """Page numbers (gpa / 4096) whose guest RAM differs from the snapshot, ascending.

        Compared in steps of ``SYNC_STEP_PAGES``, so the comparison's scratch stays small.
        Pages of the RAM file that nobody ever wrote (holes) read as zeros, so they have
        changed only where the snapshot is not zero; they are not read, since reading a hole
        through the shared mapping would make the kernel allocate it (and every guest's
        whole RAM would be allocated, whatever the guest uses).
        """
        pages = len(ram)
        found = []
        position = 0
        for first, last in _data_ranges(getattr(self.machine, "ram_fd", None), pages):
            for start, end, holds_data in ((position, first, False), (first, last, True)):
                for lo in range(start, end, SYNC_STEP_PAGES):
                    hi = min(lo + SYNC_STEP_PAGES, end)
                    old = self._snapshot[lo:hi].view(np.uint64)
                    differs = (ram[lo:hi].view(np.uint64) != old) if holds_data else (old != 0)
                    found.append(np.flatnonzero(differs.any(axis=1)) + lo)
            position = last
        for lo in range(position, pages, SYNC_STEP_PAGES):   # the hole at the end
            old = self._snapshot[lo:min(lo + SYNC_STEP_PAGES, pages)].view(np.uint64)
            found.append(np.flatnonzero((old != 0).any(axis=1)) + lo)
        return np.concatenate(found) if found else np.zeros(0, dtype=np.int64)

    # -- exit / resume --------------------------------------------------------------
    def exit(self, reason: str = "host", hypercall: HypercallFrame | None = None,
             timeout: float | None = None) -> ExitRecord | None:
        """Pause the vCPU, seal its whole state into the save area, scrub it in QEMU.

        ``reason`` is ``host``, ``hypercall`` (with the call's register file) or
        ``interval``.  Publishes and returns the host's exit record (None when
        the vCPU was already exited).
        """
        m = self._require_machine()
        with self.run_lock:
            if self.exited:
                return None
            # Marked before the pause: from here on the gdb proxy sends no continue, so
            # nothing runs the vCPU between the pause and the scrub, or after it.
            self.exited = True
            self._entered.clear()
        try:
            with self.qmp_lock:
                m.pause()
            with self.rsp_lock:
                regs = VcpuSealer(m.rsp).capture()
        except BaseException:
            with self.run_lock:
                self.exited = False     # nothing was sealed or scrubbed
                self._entered.set()
            raise
        seq = self.exits.next_seq()
        area = SaveArea(seq=seq, reason=reason, keyid=self.domain.keyid, registers=regs, hypercall=hypercall)
        page = seal_save_area(area, self._save_mac_key, self._save_hpa)
        self.domain.encrypt_into_dram(np.array([self._save_hpa], dtype=np.uint64), page)
        self._exit_seq, self._exit_reason = seq, reason
        with self.rsp_lock:
            VcpuSealer(m.rsp).scrub()
        self.sync_shadow()
        record = ExitRecord(seq=seq, keyid=self.domain.keyid, reason=reason)
        if hypercall is not None:
            exposed = exposed_registers(hypercall.mask)
            record = ExitRecord(seq=seq, keyid=self.domain.keyid, reason=reason, leaf=hypercall.leaf,
                                exposed=exposed, inputs={n: hypercall.regs.get(n, 0) for n in exposed},
                                timeout=timeout)
        self.exits.publish(record)
        log.info("key domain %d exited (%s, exit %d): vCPU state sealed in the save area",
                 self.domain.keyid, reason, seq)
        return record

    def resume(self, seq: int | None = None) -> SaveArea | None:
        """Verify the save area and restore the whole vCPU state, then run.

        A hypercall exit is resumed only by its own hypercall (``seq``); the host
        answers it with hypercall-reply.  Returns the verified save-area record.
        """
        m = self._require_machine()
        if not self.exited:
            return None
        if self._exit_reason == "hypercall" and seq != self._exit_seq:
            raise ExitStateError(f"key domain {self.domain.keyid} is in hypercall exit {self._exit_seq}: "
                                 "it resumes when the host answers or the guest's timeout ends",
                                 "answer it with hypercall-reply")
        page = self.domain.decrypt_pages(np.array([self._save_hpa], dtype=np.uint64))
        try:
            area = open_save_area(page, self._save_mac_key, self.domain.keyid, self._save_hpa,
                                  self._exit_seq)
        except SaveAreaError:
            log.warning("key domain %d: the protected save area does not verify; resume refused",
                        self.domain.keyid)
            raise
        with self.rsp_lock:
            VcpuSealer(m.rsp).restore(area.registers)
        with self.run_lock:
            self.exited = False
            self._exit_reason = None
            self._entered.set()
            with self.qmp_lock:
                m.resume()
        log.info("key domain %d resumed (exit %d)", self.domain.keyid, area.seq)
        return area

    # -- snapshot (platform/snapshot.py) --------------------------------------------
    def sealed_vcpu(self) -> SaveArea:
        """The verified save-area record of the current exit (the vCPU must be exited)."""
        if not self.exited:
            raise ExitStateError(f"key domain {self.domain.keyid} is not exited")
        page = self.domain.decrypt_pages(np.array([self._save_hpa], dtype=np.uint64))
        return open_save_area(page, self._save_mac_key, self.domain.keyid, self._save_hpa,
                              self._exit_seq)

    def device_state(self) -> bytes:
        """QEMU's device state without guest RAM (the vCPU must be exited)."""
        m = self._require_machine()
        if not self.exited:
            raise ExitStateError(f"key domain {self.domain.keyid} is not exited")
        with self.qmp_lock:
            return m.save_device_state()

    # -- hypercalls (guest port) ----------------------------------------------------
    def _hypercall(self, req: dict) -> dict:
        """A guest's hypercall: a real exit, the host's reply, resume, the outputs."""
        leaf = req.get("leaf")
        if isinstance(leaf, bool) or not isinstance(leaf, int) or not 0 <= leaf <= MAX_LEAF:
            raise FieldValueError(f"hypercall leaf must be 0..{MAX_LEAF:#x}")
        regs = check_registers(req.get("regs", {}), "hypercall regs")
        timeout = req.get("timeout", HYPERCALL_TIMEOUT)
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) \
                or not 0 < timeout <= MAX_HYPERCALL_TIMEOUT:
            raise FieldValueError(f"hypercall timeout must be 0..{MAX_HYPERCALL_TIMEOUT:g} seconds")
        mask = narrow_mask(self.domain.read_vmcs().exposed_register_mask, req.get("expose"))
        frame = HypercallFrame(leaf, mask, {name: regs.get(name, 0) for name in X86_GPR_ORDER})
        # Bytes sent just before a host-forced exit arrive while the vCPU is exited:
        # the call waits for the resume (within its timeout).
        if not self._entered.wait(timeout):
            raise HypercallError("the domain stayed exited by the host; the hypercall was not made")
        hooks = self.exit_hooks or ExitHooks(exit=self.exit, resume=lambda seq: self.resume(seq))
        record = hooks.exit("hypercall", hypercall=frame, timeout=float(timeout))
        if record is None:
            raise HypercallError("the domain was exited by the host; the hypercall was not made")
        reply = self.exits.await_reply(record.seq, float(timeout))
        if self.exits.closed:
            raise HypercallError("the domain is being destroyed")
        area = hooks.resume(record.seq)
        if reply is None:
            raise HypercallError(f"host did not answer hypercall {record.seq} (leaf {leaf:#x}) within "
                                 f"{timeout:g} s; the guest resumed without outputs")
        restored = dict(area.hypercall.regs) if area is not None and area.hypercall else dict(frame.regs)
        restored.update(reply.outputs)
        return {"seq": record.seq, "leaf": leaf, "status": reply.status, "exposed": record.exposed,
                "outputs": dict(reply.outputs), "regs": restored}

    # -- teardown -------------------------------------------------------------------
    def _require_machine(self) -> QemuMachine:
        if self.machine is None or not self.machine.running:
            raise LaunchError(f"key domain {self.domain.keyid} is not running",
                              "its QEMU has stopped; destroy the domain")
        return self.machine

    def stop(self) -> None:
        """Stop QEMU, scrub the platform's plaintext copy and remove every file."""
        if self.machine is not None:
            log.info("key domain %d: stopping its QEMU and scrubbing its memory", self.domain.keyid)
        self._stop_proxies()
        self.exits.close()
        if self.guest_port is not None:
            self.guest_port.stop()
            self.guest_port = None
        if self._snapshot is not None:
            scrub(self._snapshot)   # only its pages in memory: the rest was never written
            self._snapshot = None
        if self.machine is not None:
            # QEMU exits first; removing its tmpfs RAM file then frees (scrubs) the pages.
            self.machine.stop()


def _data_ranges(fd: int | None, pages: int) -> list[tuple[int, int]]:
    """Page ranges ``[first, last)`` of the file ``fd`` that hold data (SEEK_DATA/SEEK_HOLE),
    ascending; everything when there is no file or the file system cannot tell."""
    if fd is None:
        return [(0, pages)]
    size = pages * PAGE_SIZE
    ranges = []
    offset = 0
    try:
        while offset < size:
            try:
                start = os.lseek(fd, offset, os.SEEK_DATA)
            except OSError as exc:
                if exc.errno == errno.ENXIO:    # only a hole after offset
                    break
                raise
            end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
            if start >= size:
                break
            ranges.append((start // PAGE_SIZE, -(-end // PAGE_SIZE)))
            offset = end
    except OSError:
        return [(0, pages)]
    return ranges


class GuestState:
    """The values of :meth:`DomainRuntime.guest_state`."""

    RUNNING = "running"
    PAUSED = "paused"
    EXITED = "exited"
    HALTED = "halted"
    SHUTOFF = "shutoff"
    CRASHED = "crashed"


# QEMU run states (query-status) that end the guest.
#: How much of the console log's end is searched for a kernel panic.
PANIC_TAIL = 64 * 1024
PANIC_MARK = b"Kernel panic - not syncing"


def console_shows_panic(console_log: Path | None) -> bool:
    """Whether the last lines of a console log are a kernel panic's."""
    if console_log is None:
        return False
    try:
        with open(console_log, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - PANIC_TAIL))
            return PANIC_MARK in f.read()
    except OSError:
        return False


QEMU_SHUTOFF = frozenset({"shutdown"})
QEMU_CRASHED = frozenset({"guest-panicked", "internal-error", "io-error"})
_RFLAGS_IF = 1 << 9


def vcpu_halted_for_good(info_registers: str) -> bool:
    """Whether HMP ``info registers`` shows a vCPU halted with interrupts disabled.

    A guest idles with ``sti; hlt``, so a halted vCPU with interrupts enabled
    wakes on the next interrupt; with them disabled it never does (Linux's
    power-off without ACPI, or its halt, ends that way).
    """
    fields = dict(re.findall(r"\b(RFL|HLT)=([0-9a-fA-F]+)", info_registers))
    try:
        return fields.get("HLT") == "1" and not int(fields.get("RFL", "200"), 16) & _RFLAGS_IF
    except ValueError:
        return False

