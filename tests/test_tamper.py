"""Tampered or foreign input is refused before launch, each with its own reason.

The test plays the tenant (sealing a small synthetic guest) and drives the
untrusted host VMM against an in-process platform served on a Unix socket.
No QEMU is needed: every case is refused before the domain would start.
"""

import dataclasses
import os

import numpy as np
import pytest

from host_vmm.vmm import BundleLayoutError, HostVerificationError, HostVmm
from qemu_kd.formats.report import SignatureError
from qemu_kd.platform.attestation import sign_report
from qemu_kd.formats.bundle import PageRecord
from qemu_kd.formats.ept import EPT_PERMS, EptEntry, build_ept_arrays, mapping_digest_arrays
from qemu_kd.hostport.protocol import HostPortUnwrapError
from qemu_kd.platform.identity import PlatformIdentity
from qemu_kd.formats.layout import plan
from qemu_kd.formats.measurement import PageType, host_verifiable_digest
from qemu_kd.crypto.mee import MemoryEncryptionEngine, data_physical_address
from qemu_kd.platform.hardware import Platform
from qemu_kd.formats.policy import Policy
from qemu_kd.tenant.verify import check_report
from qemu_kd.tenant.measure import measure
from qemu_kd.tenant.seal import seal

from synthetic import fake_bzimage
from serving import serving

MiB = 1 << 20
MEM = 64 * MiB
KERNEL = fake_bzimage(payload=os.urandom(300_000))
INITRD = os.urandom(200_000)
CMDLINE = "console=ttyS0"
POLICY = Policy.make()


@pytest.fixture(scope="module")
def served(root, tmp_path_factory):
    identity = PlatformIdentity.create_throwaway(root)
    platform = Platform(identity, 512 * MiB, tmp_path_factory.mktemp("platform"))
    with serving(platform, frame_timeout=5) as (path, _server):
        yield platform, str(path), identity


@pytest.fixture
def host(served):
    vmm = HostVmm(served[1], timeout=30)
    yield vmm
    vmm.destroy()


def sealed(host, root):
    layout = host.allocate(MEM)
    bundle, secret = seal(KERNEL, INITRD, CMDLINE, MEM, POLICY, layout, root.certificate_pem)
    return layout, bundle, secret


def flip(record: PageRecord, offset: int = 100) -> PageRecord:
    ct = bytearray(record.ciphertext)
    ct[offset] ^= 0x01
    return dataclasses.replace(record, ciphertext=bytes(ct))


def replace_first(bundle, page_type, fn):
    for i, r in enumerate(bundle.pages):
        if r.page_type == page_type:
            bundle.pages[i] = fn(r)
            return bundle
    raise AssertionError(f"no {page_type} page")


def failed(checks):
    return {c.name: c.detail for c in checks if not c.ok}


def reseal_ept(bundle, secret, layout, mutate, large_page=None):
    """Rebuild the EPT with a changed gpa→hpa map, as a malicious tenant could,
    and fix up the bundle's digests so only verify-ept can notice.

    ``mutate`` changes the hpas of the guest's gpas in place; ``large_page``
    (gpa, hpa), both 2 MiB-aligned, adds a 2 MiB page to the page directory."""
    p = plan(layout)
    n = MEM // 4096
    gpas = np.arange(n, dtype=np.uint64) * np.uint64(4096)
    hpas = np.array(p.guest, dtype=np.uint64)
    perms = np.full(n, EPT_PERMS, dtype=np.uint64)
    mutate(hpas)
    eptp, tables = build_ept_arrays(gpas, hpas, perms, p.ept)
    if large_page is not None:
        # The page directory is the third table (PML4, PDPT, PD, then the page tables).
        gpa, hpa = large_page
        pd = bytearray(tables[p.ept[2]])
        index = gpa // (2 * MiB)
        pd[index * 8:index * 8 + 8] = EptEntry(address=hpa, perms=EPT_PERMS, memory_type=6,
                                               large=True).pack()
        tables[p.ept[2]] = bytes(pd)
        extra = np.arange(512, dtype=np.uint64) * np.uint64(4096)
        gpas = np.concatenate([gpas, np.uint64(gpa) + extra])
        hpas = np.concatenate([hpas, np.uint64(hpa) + extra])
        perms = np.full(gpas.size, EPT_PERMS, dtype=np.uint64)
    mee = MemoryEncryptionEngine(secret.key)
    vmcs_rec = next(r for r in bundle.pages if r.page_type == PageType.VMCS)
    vmcs_plain = mee.decrypt_pages(vmcs_rec.ciphertext,
                                   [data_physical_address(layout.keyid, vmcs_rec.hpa)])
    for i, r in enumerate(bundle.pages):
        if r.page_type == PageType.EPT:
            ct = mee.encrypt_pages(tables.get(r.hpa, bytes(4096)),
                                   [data_physical_address(layout.keyid, r.hpa)])
            bundle.pages[i] = dataclasses.replace(r, ciphertext=ct)
    hv = host_verifiable_digest([(vmcs_rec.hpa, vmcs_plain), *sorted(tables.items())])
    bundle.manifest = dataclasses.replace(
        bundle.manifest, host_verifiable_digest=hv,
        ept_mapping_digest=mapping_digest_arrays(gpas, hpas, perms))
    return bundle


def test_untampered_bundle_passes_every_check(host, root):
    layout, bundle, _ = sealed(host, root)
    host.load(bundle)
    checks = host.verify()
    assert all(c.ok for c in checks), failed(checks)
    assert {c.name for c in checks} == {"hash-kd", "host-forced-exit", "ept-pointer",
                                        "verify-ept", "measurement"}
    assert host.client.measure_kd(layout.keyid) == measure(KERNEL, INITRD, CMDLINE, MEM, POLICY)


def test_flipped_bit_in_image_page_fails_the_measurement(host, root):
    _, bundle, _ = sealed(host, root)
    host.load(replace_first(bundle, PageType.IMAGE, flip))
    assert set(failed(host.verify())) == {"measurement"}
    with pytest.raises(HostVerificationError, match="measurement"):
        host.launch()


def test_flipped_bit_in_vmcs_page_fails_hash_and_vmread(host, root):
    _, bundle, _ = sealed(host, root)
    host.load(replace_first(bundle, PageType.VMCS, flip))
    bad = failed(host.verify())
    assert "hash-kd" in bad and "host-forced-exit" in bad and "ept-pointer" in bad
    assert "measurement" not in bad  # not even attempted once control checks fail


def test_flipped_bit_in_ept_page_fails_hash_and_verify_ept(host, root):
    _, bundle, _ = sealed(host, root)
    host.load(replace_first(bundle, PageType.EPT, lambda r: flip(r, 8)))
    bad = failed(host.verify())
    assert set(bad) == {"hash-kd", "verify-ept"}


def test_ept_alias_is_refused(host, root):
    layout, bundle, secret = sealed(host, root)

    def alias(hpas):
        hpas[1000] = hpas[1001]
    host.load(reseal_ept(bundle, secret, layout, alias))
    bad = failed(host.verify())
    assert set(bad) == {"verify-ept"}
    assert "alias" in bad["verify-ept"]


def test_extra_gpas_aliasing_mapped_pages_are_refused_by_the_alias_check_alone(host, root):
    # Every page of the guest stays mapped where it was measured, every table and page is
    # the domain's own and allocated; on top, a 2 MiB page at gpa MEM (the PD's free entry,
    # so no extra table page) maps 512 guest pages a second time.  Only the alias check
    # can tell.
    layout, bundle, secret = sealed(host, root)
    guest = plan(layout).guest
    first = next(i for i, hpa in enumerate(guest) if hpa % (2 * MiB) == 0
                 and guest[i + 511] == hpa + 511 * 4096)
    base = guest[first]
    host.load(reseal_ept(bundle, secret, layout, lambda hpas: None, large_page=(MEM, base)))
    bad = failed(host.verify())
    assert set(bad) == {"verify-ept"}
    reasons = bad["verify-ept"].split("; ")
    assert all(r.startswith("alias: ") for r in reasons), reasons
    assert reasons[0] == (f"alias: hpa 0x{base:x} is mapped at gpa 0x{first * 4096:x} "
                          f"and at gpa 0x{MEM:x}")
    assert reasons[-1] == f"alias: ... and {512 - (len(reasons) - 1)} more"
    with pytest.raises(HostVerificationError, match="verify-ept"):
        host.launch()


def test_ept_mapping_another_domains_page_is_refused(host, root, served):
    other = HostVmm(served[1], timeout=30)
    other_layout = other.allocate(MEM)
    try:
        layout, bundle, secret = sealed(host, root)

        def foreign(hpas):
            hpas[1000] = other_layout.hpas[500]
        host.load(reseal_ept(bundle, secret, layout, foreign))
        bad = failed(host.verify())
        assert set(bad) == {"verify-ept"}
        assert "foreign" in bad["verify-ept"] or "another" in bad["verify-ept"]
    finally:
        other.destroy()


def test_key_wrapped_for_another_platform_is_refused(host, root):
    layout = host.allocate(MEM)
    elsewhere = PlatformIdentity.create_throwaway(root)
    foreign_layout = dataclasses.replace(layout, platform_chain_pem=elsewhere.chain_pem())
    bundle, _ = seal(KERNEL, INITRD, CMDLINE, MEM, POLICY, foreign_layout, root.certificate_pem)
    with pytest.raises(HostPortUnwrapError, match="another platform|does not open"):
        host.load(bundle)


def test_bundle_sealed_for_another_layout_is_refused(host, root, served):
    other = HostVmm(served[1], timeout=30)
    try:
        _, bundle, _ = sealed(other, root)
        host.allocate(MEM)
        with pytest.raises(BundleLayoutError, match="KeyID|allocation"):
            host.load(bundle)
    finally:
        other.destroy()


def test_report_with_one_changed_byte_is_refused(served, root):
    identity = served[2]
    report = sign_report(identity, policy=POLICY, measurement=b"\x11" * 48,
                         report_data=b"\x22" * 64, host_data=bytes(32), keyid=3).pack()
    check_report(report, root.certificate_pem, identity.chain_pem(), measurement=b"\x11" * 48,
                 policy=POLICY, report_data=b"\x22" * 64, allow_emulated=True)
    for offset in (0x20, 0x60, len(report) - 1):
        bad = bytearray(report)
        bad[offset] ^= 0x40
        with pytest.raises(SignatureError):
            check_report(bytes(bad), root.certificate_pem, identity.chain_pem(),
                         measurement=b"\x11" * 48, policy=POLICY, report_data=b"\x22" * 64,
                         allow_emulated=True)
