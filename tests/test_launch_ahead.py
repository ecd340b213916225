"""The QEMU a measured domain's launch will use starts ahead, at measure-kd (docs/hostport.md):
paused on the guest RAM the measurement filled, running nothing until launch has made its
checks; launch under another name replaces it, and destroying the domain before launch stops it
and leaves nothing behind.  In process, so the platform can be watched."""

from __future__ import annotations

import os
from contextlib import contextmanager

import pytest

from host_vmm.vmm import HostVmm
from leftovers import in_process_leftovers, qemu_children
from protected import in_process_platform
from qemu_kd.formats.policy import Policy
from qemu_kd.qemu.launch import full_cmdline
from qemu_kd.tenant.seal import seal

pytestmark = pytest.mark.qemu
MiB = 1 << 20
GUEST = 128 * MiB


@pytest.fixture(scope="module")
def platform(tmp_path_factory):
    work = tmp_path_factory.mktemp("launch-ahead")
    with in_process_platform(work / "p.sock", work / "pstate", 2 * GUEST + 64 * MiB) as p:
        p.test_socket, p.test_root = work / "p.sock", (work / "pstate" / "root-ca.crt").read_bytes()
        yield p


@contextmanager
def loaded(platform, guest_artifacts):
    """A host VMM with the default guest sealed for its layout and loaded; destroyed at the end."""
    vmm = HostVmm(str(platform.test_socket))
    try:
        layout = vmm.allocate(GUEST)
        bundle, _secret = seal(guest_artifacts.kernel.read_bytes(), guest_artifacts.initrd.read_bytes(),
                               full_cmdline(), GUEST, Policy.make(), layout, platform.test_root)
        vmm.load(bundle)
        yield vmm
    finally:
        vmm.destroy()


@contextmanager
def verified(platform, guest_artifacts):
    """A host VMM with a loaded, verified (so measured) domain; destroyed at the end."""
    with loaded(platform, guest_artifacts) as vmm:
        assert all(check.ok for check in vmm.verify())
        yield vmm


def _ahead(platform, keyid):
    name, runtime, start = platform._ahead[keyid]
    start.result()
    return name, runtime


def test_a_measured_domain_has_its_qemu_started_ahead_and_launch_uses_it(platform, guest_artifacts):
    with verified(platform, guest_artifacts) as vmm:
        name, runtime = _ahead(platform, vmm.keyid)
        machine = runtime.machine
        assert name == f"kd{vmm.keyid}" and machine.proc.pid in qemu_children()
        # Paused before anything ran: the vCPU has not left its reset state, no device state.
        with runtime.qmp_lock:
            assert machine.qmp.cmd("query-status")["status"] == "prelaunch"
        with runtime.rsp_lock:
            assert machine.rsp.read_register(16) == 0xFFF0     # RIP at reset
        vmm.launch(ready_timeout=120)
        assert platform.runtimes[vmm.keyid] is runtime and runtime.machine is machine
        assert vmm.agent.ping(timeout=60)


def test_launch_under_another_name_replaces_the_qemu_started_ahead(platform, guest_artifacts):
    with verified(platform, guest_artifacts) as vmm:
        _name, runtime = _ahead(platform, vmm.keyid)
        pid, console_log = runtime.machine.proc.pid, runtime.machine.console_log
        vmm.launch(ready_timeout=120, name="ahead-other")
        assert platform.runtimes[vmm.keyid] is not runtime and pid not in qemu_children()
        assert not console_log.exists()     # it never ran: no empty log is left
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
        assert vmm.agent.ping(timeout=60)


def test_destroying_a_measured_domain_stops_the_qemu_started_ahead(platform, guest_artifacts):
    before = in_process_leftovers()
    with verified(platform, guest_artifacts) as vmm:
        _name, runtime = _ahead(platform, vmm.keyid)
        pid, console_log = runtime.machine.proc.pid, runtime.machine.console_log
        assert pid in qemu_children() and console_log.exists()
    assert vmm.keyid not in platform._ahead and in_process_leftovers() == before
    assert not console_log.exists()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_a_measurement_that_fails_stops_the_qemu_it_started(platform, guest_artifacts):
    """A zero page the host overwrote stops the measurement after its QEMU started: that QEMU,
    its guest RAM and its directory are gone, and launch is refused."""
    from qemu_kd.common.errors import KdError
    from qemu_kd.formats.measurement import PageType

    before = in_process_leftovers()
    with loaded(platform, guest_artifacts) as vmm:
        layout = vmm.layout
        pages = platform.domain(vmm.keyid).pages()
        zero_hpa = int(pages.hpas[pages.types == int(PageType.ZERO)][-1])
        platform.write_phys(zero_hpa, b"junk")
        assert platform.verify_ept(vmm.keyid, layout.hpas).ok
        started = []
        real_start = platform._start_ahead

        def start_ahead(keyid, domain, staged):
            real_start(keyid, domain, staged)
            started.append(platform._ahead[keyid][2])

        platform._start_ahead = start_ahead
        try:
            with pytest.raises(KdError, match="overwritten after add-zero-pages"):
                platform.measure_kd(vmm.keyid)
        finally:
            del platform._start_ahead
        assert started and vmm.keyid not in platform._ahead
        assert platform.domain(vmm.keyid).staged_ram is None
        assert in_process_leftovers() == before
