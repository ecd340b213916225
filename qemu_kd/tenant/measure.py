"""The expected launch measurement, computed offline from the guest's inputs.

Like sev-snp-measure: from (kernel, initrd, cmdline, memory size, policy) the
tenant builds the guest-physical image and the VMCS guest state and chains
the page records.  Neither the host's hpas nor the domain key enter the
value, so two hosts with different layouts measure the same guest alike.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from qemu_kd.formats.bootlayout import build_boot_layout
from qemu_kd.formats.ept import EPT_PERMS
from qemu_kd.common.errors import KdError
from qemu_kd.formats.measurement import LaunchMeasurement, PageType
from qemu_kd.formats.addresses import PAGE_SIZE
from qemu_kd.formats.policy import Policy
from qemu_kd.formats.vcpu import VcpuState
from qemu_kd.formats.vmcs import Vmcs


class SealError(KdError):
    """The guest cannot be sealed for this layout."""

GUEST_PERMS = EPT_PERMS


def read_input(what: str, value: bytes | bytearray | str | os.PathLike) -> bytes:
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    try:
        return Path(value).read_bytes()
    except OSError as exc:
        raise SealError(f"cannot read the {what} {value}: {exc.strerror}",
                        f"pass the path of the guest {what}") from None


# ------------------------------------------------------------ guest image

def guest_pages(kernel: bytes, initrd: bytes, cmdline: str,
                memory_size: int) -> tuple[dict[int, bytes], VcpuState]:
    """The guest's IMAGE pages (gpa -> 4096 bytes) and the vCPU state it starts from.

    Every other page in [0, memory_size) is a ZERO page.
    """
    layout = build_boot_layout(read_input("kernel", kernel), read_input("initrd", initrd),
                               cmdline, memory_size)
    return layout.pages(), layout.vcpu


def tenant_vmcs(vcpu: VcpuState, policy: Policy, *, ept_pointer: int = 0, save_area_hpa: int = 0,
                exposed_register_mask: int = 0) -> Vmcs:
    """The VMCS the tenant seals: boot vCPU, host-forced exits allowed, and the registers a
    hypercall may show the host (none unless the tenant chooses some; measured)."""
    return Vmcs(guest=vcpu, ept_pointer=ept_pointer, save_area_hpa=save_area_hpa,
                exposed_register_mask=exposed_register_mask, host_forced_exit=True, policy=policy)


def measure_pages(image: dict[int, bytes], memory_size: int, guest_state: bytes, policy: Policy) -> bytes:
    """The launch digest: IMAGE pages with content, ZERO pages without, in gpa order."""
    m = LaunchMeasurement(policy)
    check_image_fits(image, memory_size)
    image_gpas = sorted(image)
    if any(gpa < 0 or gpa % PAGE_SIZE for gpa in image_gpas):
        raise ValueError("measure_pages: image gpas must be page-aligned")
    gpas = np.arange(memory_size // PAGE_SIZE, dtype=np.uint64) * np.uint64(PAGE_SIZE)
    types = np.full(gpas.size, int(PageType.ZERO), dtype=np.uint8)
    types[np.array(image_gpas, dtype=np.int64) // PAGE_SIZE] = PageType.IMAGE
    m.add_pages(gpas, types, np.full(gpas.size, GUEST_PERMS, dtype=np.uint8),
                [image[gpa] for gpa in image_gpas])
    m.add_vmcs(guest_state)
    return m.finalize()


def check_image_fits(image: dict[int, bytes], memory_size: int) -> None:
    outside = [gpa for gpa in image if gpa >= memory_size]
    if outside:
        raise SealError(f"the boot image reaches gpa 0x{max(outside):x}, beyond {memory_size} bytes of RAM",
                        "give the guest more memory")


@dataclass(frozen=True)
class MeasuredGuest:
    """A guest built and measured for no layout in particular: what :func:`measure` computes,
    and everything of a seal that does not depend on the host's layout (so a seal can start
    before the host has allocated; ``seal(..., measured=)``)."""

    kernel: bytes = field(repr=False)
    initrd: bytes = field(repr=False)
    cmdline: str
    memory_size: int
    policy: Policy
    exposed_register_mask: int
    image: dict[int, bytes] = field(repr=False)     # gpa -> IMAGE page
    vcpu: VcpuState = field(repr=False)
    measurement: bytes
    kernel_sha256: str
    initrd_sha256: str

    def matches(self, kernel: bytes, initrd: bytes, cmdline: str, memory_size: int, policy: Policy,
                exposed_register_mask: int) -> bool:
        """Whether this was measured from exactly these inputs."""
        return (cmdline == self.cmdline and memory_size == self.memory_size and policy == self.policy
                and exposed_register_mask == self.exposed_register_mask
                and (kernel is self.kernel or kernel == self.kernel)
                and (initrd is self.initrd or initrd == self.initrd))


def measure_guest(kernel: bytes, initrd: bytes, cmdline: str, memory_size: int, policy: Policy,
                  exposed_register_mask: int = 0) -> MeasuredGuest:
    """Build the guest's boot image and vCPU and compute its expected launch measurement."""
    kernel, initrd = read_input("kernel", kernel), read_input("initrd", initrd)
    image, vcpu = guest_pages(kernel, initrd, cmdline, memory_size)
    check_image_fits(image, memory_size)
    vmcs = tenant_vmcs(vcpu, policy, exposed_register_mask=exposed_register_mask)
    measurement = measure_pages(image, memory_size, vmcs.guest_state_bytes(), policy)
    return MeasuredGuest(kernel, initrd, cmdline, memory_size, policy, exposed_register_mask, image, vcpu,
                         measurement, hashlib.sha256(kernel).hexdigest(), hashlib.sha256(initrd).hexdigest())


def measure(kernel: bytes, initrd: bytes, cmdline: str, memory_size: int, policy: Policy,
            exposed_register_mask: int = 0) -> bytes:
    """The expected 48-byte launch measurement (no platform, layout or key involved)."""
    image, vcpu = guest_pages(kernel, initrd, cmdline, memory_size)
    check_image_fits(image, memory_size)
    vmcs = tenant_vmcs(vcpu, policy, exposed_register_mask=exposed_register_mask)
    return measure_pages(image, memory_size, vmcs.guest_state_bytes(), policy)
