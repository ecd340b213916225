"""Firmware-less launch of a Linux guest in QEMU, and the running guest's handle.

The launch steps: start QEMU paused with file-backed RAM, write the
boot layout into the RAM file, load the vCPU state through the gdbstub,
attach the shared channel, resume, and wait for the agent's ``ready``.  The
protected flow replaces "write the boot layout" with "decrypt the domain
through its EPT" and takes the vCPU state from the VMCS; the rest is shared.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from qemu_kd.channel.agent_client import AgentClient
from qemu_kd.formats.bootlayout import build_boot_layout, with_tsc_khz
from qemu_kd.channel.console import check_initramfs_unpacked, console_summary
from qemu_kd.common.errors import GuestError, KdError
from qemu_kd.qemu.guestport import GuestPortServer
from qemu_kd.qemu.machine import MachineSpec, QemuMachine
from qemu_kd.formats.vcpu import VcpuState

def host_tsc_khz() -> int | None:
    """This machine's TSC frequency in kHz (TCG guests see this processor's TSC).

    The platform reads it for the ``tsc_early_khz`` it adds at launch, a plain
    run for the one it appends; it never enters a measured command line.
    """
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("cpu MHz"):
                    return int(float(line.split(":")[1]) * 1000)
    except (OSError, ValueError, IndexError):
        pass
    return None


def full_cmdline(extra: str = "") -> str:
    """The default guest command line (plus ``extra``), the same on every host.

    It carries no ``tsc_early_khz``: without firmware the guest needs one to
    trust its TSC, and it is added at boot, not measured - by the platform at
    launch for a protected guest, by :func:`boot_plain` for a plain one.
    """
    from qemu_kd.guest.recipe import kernel_cmdline

    return kernel_cmdline(None, extra.split())


@dataclass
class PhaseTimer:
    """Wall-clock seconds per named phase, in the order they ran."""

    phases: dict[str, float] = field(default_factory=dict)
    progress: Callable[[str], None] | None = None

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        if self.progress:
            self.progress(name)
        start = time.perf_counter()
        try:
            yield
        finally:
            self.phases[name] = self.phases.get(name, 0.0) + time.perf_counter() - start


#: The guest port of a plain run: no platform protects this guest, and it says so.
UNPROTECTED_PORT = {"info": lambda req: {"protected": False}}


class RunningGuest:
    """A booted guest: its QEMU machine and its agent."""

    def __init__(self, machine: QemuMachine, timer: PhaseTimer):
        self.machine = machine
        self.timer = timer
        self.agent: AgentClient | None = None
        self.guest_port: GuestPortServer | None = None

    def diagnose(self) -> str:
        """What went wrong, for an error message: QEMU's state and the console tail."""
        parts = []
        if self.machine.proc is not None and self.machine.proc.poll() is not None:
            parts.append(f"QEMU exited with status {self.machine.proc.returncode}")
            tail = self.machine.stderr_tail(2)
            if tail:
                parts.append(f"QEMU said: {tail}")
        console = console_summary(self.machine.console_log)
        if console:
            parts.append(console)
        return "; ".join(parts)

    def start_paused(self) -> None:
        with self.timer.phase("qemu start"):
            self.machine.start()

    def load_vcpu(self, vcpu: VcpuState) -> None:
        with self.timer.phase("vcpu load"):
            self.machine.rsp.load_vcpu(vcpu)

    def run_until_ready(self, ready_timeout: float) -> dict:
        """Attach the shared channel, resume the vCPU and wait for the agent."""
        with self.timer.phase("kernel to agent ready"):
            self.guest_port = GuestPortServer(self.machine.connect_serial("guestport"), UNPROTECTED_PORT)
            self.guest_port.start()
            sock = self.machine.connect_serial("shared")
            self.agent = AgentClient(sock, diagnose=self.diagnose)
            self.machine.resume()
            ready = self.agent.wait_ready(ready_timeout)
        check_initramfs_unpacked(self.machine.console_log)
        return ready

    def shutdown(self, timeout: float = 15.0) -> None:
        """Ask the agent to power off; QEMU leaves on the guest's reboot (-no-reboot)."""
        with self.timer.phase("shutdown"):
            try:
                if self.agent is not None and self.machine.running:
                    self.agent.poweroff()
                    if self.machine.proc is not None:
                        self.machine.proc.wait(timeout=timeout)
            except (KdError, OSError, TimeoutError, Exception):  # noqa: BLE001
                pass  # stop() below forces it
            finally:
                self.close()

    def close(self) -> None:
        if self.guest_port is not None:
            self.guest_port.stop()
            self.guest_port = None
        if self.agent is not None:
            try:
                self.agent.sock.close()
            except OSError:
                pass
        self.machine.stop()


def boot_plain(kernel: bytes, initrd: bytes, cmdline: str, spec: MachineSpec,
               timer: PhaseTimer, ready_timeout: float = 90.0,
               console_log: Path | None = None) -> RunningGuest:
    """Boot an unprotected guest firmware-less; returns once the agent is ready.

    ``cmdline`` gets this machine's ``tsc_early_khz`` unless it has one.  On
    any failure QEMU is stopped and its files removed before the error propagates.
    """
    guest = RunningGuest(QemuMachine(spec, console_log=console_log), timer)
    try:
        guest.start_paused()
        with timer.phase("layout"):
            layout = build_boot_layout(kernel, initrd, with_tsc_khz(cmdline, host_tsc_khz()),
                                       spec.mem_size)
            for region in layout.regions:
                guest.machine.write_ram(region.gpa, region.data)
        guest.load_vcpu(layout.vcpu)
        guest.run_until_ready(ready_timeout)
    except BaseException:
        guest.close()
        raise
    return guest


def require_ready(guest: RunningGuest) -> dict:
    if guest.agent is None or guest.agent.ready is None:
        raise GuestError("guest agent is not ready")
    return guest.agent.ready
