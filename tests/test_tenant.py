"""The tenant: measure, seal, the tenant secret, report checking and the tenant CLI.

Small synthetic guests (fake bzImage, tiny initrd, 64 MiB), no QEMU.  The
end-to-end test loads a sealed bundle into an in-process Platform exactly as
a host would and checks every value the tenant predicted.
"""

import json
import os
import stat

import numpy as np
import pytest

from synthetic import SYNTH_CMDLINE, SYNTH_INITRD, SYNTH_KERNEL, fake_bzimage

from qemu_kd import tenant
from qemu_kd.cli import tenant as tenant_cli
from qemu_kd.formats.report import (
    EmulatedPlatformError,
    HostDataMismatch,
    MeasurementMismatch,
    PolicyMismatch,
    ReportDataMismatch,
    SignatureError,
)
from qemu_kd.platform.attestation import sign_report
from qemu_kd.formats.bundle import Bundle
from qemu_kd.formats.ept import EPT_PERMS, mapping_digest, walk_ept
from qemu_kd.formats.certs import ChainError
from qemu_kd.platform.identity import PlatformIdentity, RootCA
from qemu_kd.formats.keywrap import unwrap_key
from qemu_kd.formats.layout import HostLayout, LayoutSizeError, expected_eptp, pages_needed, plan
from qemu_kd.formats.measurement import PageType, host_verifiable_digest, measure_offline
from qemu_kd.crypto.mee import MemoryEncryptionEngine
from qemu_kd.formats.policy import Policy
from qemu_kd.formats.vmcs import Vmcs

MiB = 1 << 20
MEM = 64 * MiB
PAGE = 4096
KERNEL, INITRD, CMDLINE = SYNTH_KERNEL, SYNTH_INITRD, SYNTH_CMDLINE
ENC_EPT_POINTER = 0x201A
ENC_SAVE_AREA = 0x2200


def host_layout(identity, keyid=5, hpas=None, host_data=b"host-data", memory_size=MEM):
    if hpas is None:
        hpas = [0x200000 + PAGE * i for i in range(pages_needed(memory_size))]
    return HostLayout(keyid, memory_size, hpas, host_data, identity.chain_pem())


def scattered_hpas(seed, count):
    rng = np.random.default_rng(seed)
    return [int(h) * PAGE for h in rng.permutation(1 << 16)[:count]]


@pytest.fixture(scope="module")
def sealed(identity, root):
    layout = host_layout(identity)
    bundle, secret = tenant.seal(KERNEL, INITRD, CMDLINE, MEM, Policy.make(), layout, root.certificate)
    return layout, bundle, secret


def decrypt(secret, record):
    with MemoryEncryptionEngine(secret.key) as mee:
        return bytes(mee.decrypt_pages(record.ciphertext, [secret.keyid << 40 | record.hpa]))


# ------------------------------------------------------------- measure

def test_measure_is_the_documented_chain():
    image, vcpu = tenant.guest_pages(KERNEL, INITRD, CMDLINE, MEM)
    assert 0x7000 in image and 0x100000 in image and all(len(p) == PAGE for p in image.values())
    assert vcpu.rip == 0x100200 and vcpu.rsi == 0x7000
    pages = [(g, PageType.IMAGE if g in image else PageType.ZERO, EPT_PERMS, image.get(g))
             for g in range(0, MEM, PAGE)]
    guest_state = Vmcs(guest=vcpu, host_forced_exit=True, policy=Policy.make()).guest_state_bytes()
    expected = measure_offline(pages, guest_state, Policy.make())
    assert tenant.measure(KERNEL, INITRD, CMDLINE, MEM, Policy.make()) == expected


def test_measurement_depends_on_every_input():
    base = tenant.measure(KERNEL, INITRD, CMDLINE, MEM, Policy.make())
    variants = [
        tenant.measure(KERNEL, INITRD, CMDLINE, MEM, Policy.make(debug=True)),
        tenant.measure(KERNEL, INITRD[:-1] + b"\x00", CMDLINE, MEM, Policy.make()),
        tenant.measure(KERNEL, INITRD, CMDLINE + " x", MEM, Policy.make()),
        tenant.measure(KERNEL, INITRD, CMDLINE, MEM + 2 * MiB, Policy.make()),
        tenant.measure(fake_bzimage(payload=b"\x91" * 5000), INITRD, CMDLINE, MEM, Policy.make()),
    ]
    assert len({base, *variants}) == 6


def test_seal_matches_measure_on_any_layout(identity, root, sealed):
    layout, bundle, secret = sealed
    expected = tenant.measure(KERNEL, INITRD, CMDLINE, MEM, Policy.make())
    assert bundle.manifest.measurement == secret.measurement == expected

    other = host_layout(identity, keyid=17, hpas=scattered_hpas(1, pages_needed(MEM)))
    bundle2, secret2 = tenant.seal(KERNEL, INITRD, CMDLINE, MEM, Policy.make(), other, root.certificate)
    assert bundle2.manifest.measurement == expected
    assert secret2.key != secret.key
    # Same plaintext, different hpas, KeyID and key: no ciphertext page in common.
    assert not {p.ciphertext for p in bundle.pages} & {p.ciphertext for p in bundle2.pages}
    assert bundle2.manifest.host_verifiable_digest != bundle.manifest.host_verifiable_digest
    assert bundle2.manifest.ept_mapping_digest != bundle.manifest.ept_mapping_digest

    debug, _ = tenant.seal(KERNEL, INITRD, CMDLINE, MEM, Policy.make(debug=True), layout, root.certificate)
    assert debug.manifest.measurement == tenant.measure(KERNEL, INITRD, CMDLINE, MEM, Policy.make(debug=True))
    assert debug.manifest.measurement != expected and debug.manifest.policy.debug


# ---------------------------------------------------------------- seal

def test_bundle_contents(identity, sealed):
    layout, bundle, secret = sealed
    where = plan(layout)
    image, vcpu = tenant.guest_pages(KERNEL, INITRD, CMDLINE, MEM)
    m = bundle.manifest
    assert (m.keyid, m.memory_size, m.platform_id) == (5, MEM, identity.platform_id)
    assert m.host_data == b"host-data".ljust(32, b"\0") == secret.host_data
    assert m.info["cmdline"] == CMDLINE and m.info["platform"] == "EMULATED" and secret.platform_emulated
    assert len(m.info["kernel_sha256"]) == 64
    assert Bundle.unpack(bundle.pack()) == bundle

    by_type = {t: [p for p in bundle.pages if p.page_type == t] for t in PageType}
    assert [p.hpa for p in by_type[PageType.VMCS]] == [where.vmcs]
    assert [p.hpa for p in by_type[PageType.SAVE]] == [where.save]
    assert [p.hpa for p in by_type[PageType.EPT]] == where.ept
    assert all(p.host_verifiable for p in by_type[PageType.VMCS] + by_type[PageType.EPT])
    assert not any(p.host_verifiable for p in by_type[PageType.SAVE] + by_type[PageType.IMAGE])

    # Every guest page is either an IMAGE record or a zero record, at the planned hpa, RWX.
    images = {p.gpa: p for p in by_type[PageType.IMAGE]}
    zeros = {z.gpa: z for z in bundle.zero_pages}
    assert set(images) == set(image)
    assert set(images) | set(zeros) == set(range(0, MEM, PAGE)) and not set(images) & set(zeros)
    assert all(r.hpa == where.guest_hpa(g) and r.perms == EPT_PERMS for g, r in {**images, **zeros}.items())

    # The ciphertext decrypts, at its own data physical address, to the boot image.
    for gpa in (0x0, 0x7000, 0x100000, max(image)):
        assert decrypt(secret, images[gpa]) == image[gpa]
        assert images[gpa].ciphertext != image[gpa]
    vmcs = Vmcs.unpack(decrypt(secret, by_type[PageType.VMCS][0]))
    assert vmcs.guest == vcpu and vmcs.policy == Policy.make()
    assert vmcs.ept_pointer == expected_eptp(layout) and vmcs.save_area_hpa == where.save
    assert vmcs.host_forced_exit and vmcs.exposed_register_mask == 0
    assert decrypt(secret, by_type[PageType.SAVE][0]) == bytes(PAGE)

    # The digests in the manifest are what hash-kd and verify-ept will compute.
    tables = {p.hpa: decrypt(secret, p) for p in by_type[PageType.EPT]}
    walk = walk_ept(vmcs.ept_pointer, tables.__getitem__)
    assert walk.problems == [] and len(walk.mappings) == MEM // PAGE
    assert mapping_digest(walk.mappings) == m.ept_mapping_digest
    verifiable = [(p.hpa, decrypt(secret, p)) for p in bundle.pages if p.host_verifiable]
    assert host_verifiable_digest(verifiable) == m.host_verifiable_digest

    # The key is wrapped for this platform, bound to policy and host_data.
    assert unwrap_key(bundle.wrapped_key, identity.kak_private, m.policy, m.host_data) == secret.key


def test_seal_refuses_a_chain_from_another_root(identity, root):
    foreign = PlatformIdentity.create_throwaway(RootCA.create_throwaway())
    layout = HostLayout(5, MEM, host_layout(identity).hpas, b"", foreign.chain_pem())
    with pytest.raises(ChainError):
        tenant.seal(KERNEL, INITRD, CMDLINE, MEM, Policy.make(), layout, root.certificate)


def test_seal_checks_the_layout(identity, root):
    hpas = host_layout(identity).hpas
    with pytest.raises(LayoutSizeError, match="layout has 16420 pages, a 64 MiB guest needs 16421"):
        tenant.seal(KERNEL, INITRD, CMDLINE, MEM, Policy.make(),
                    HostLayout(5, MEM, hpas[:-1], b"", identity.chain_pem()), root.certificate)
    with pytest.raises(tenant.SealError, match="layout is for a 67108864-byte guest"):
        tenant.seal(KERNEL, INITRD, CMDLINE, MEM + 2 * MiB, Policy.make(),
                    host_layout(identity), root.certificate)
    with pytest.raises(tenant.SealError, match="not a PEM X.509"):
        tenant.seal(KERNEL, INITRD, CMDLINE, MEM, Policy.make(), host_layout(identity), b"junk")


# -------------------------------------------------------- tenant secret

def test_tenant_secret_file(tmp_path, sealed):
    _, _, secret = sealed
    path = tmp_path / "secret.json"
    secret.write(path)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert tenant.TenantSecret.read(path) == secret
    assert secret.key.hex() not in repr(secret)
    doc = json.loads(path.read_bytes())
    assert doc["key"] == secret.key.hex() and doc["keyid"] == 5
    path.write_text(json.dumps({**doc, "key": "00"}))
    with pytest.raises(tenant.TenantSecretError, match="key must be 64 bytes"):
        tenant.TenantSecret.read(path)
    with pytest.raises(tenant.TenantSecretError, match="cannot read"):
        tenant.TenantSecret.read(tmp_path / "missing.json")


# ------------------------------------------------------- check_report

REPORT_DATA = bytes(range(64))


def report_for(identity, secret, **changes):
    values = dict(policy=secret.policy, measurement=secret.measurement, report_data=REPORT_DATA,
                  host_data=secret.host_data, keyid=secret.keyid)
    values.update(changes)
    return sign_report(identity, **values).pack()


def test_check_report(identity, root, sealed):
    _, _, secret = sealed
    expect = dict(measurement=secret.measurement, policy=secret.policy, report_data=REPORT_DATA,
                  host_data=secret.host_data)
    chain = identity.chain_pem()
    good = report_for(identity, secret)
    report = tenant.check_report(good, root.certificate, chain,
                                 allow_emulated=True, **expect)
    assert report.measurement == secret.measurement and report.emulated
    cases = [
        (EmulatedPlatformError, report_for(identity, secret), {"allow_emulated": False}),
        (MeasurementMismatch, report_for(identity, secret, measurement=bytes(48)), {}),
        (PolicyMismatch, report_for(identity, secret, policy=Policy.make(debug=True)), {}),
        (ReportDataMismatch, report_for(identity, secret, report_data=b"other"), {}),
        (HostDataMismatch, report_for(identity, secret, host_data=b"other"), {}),
        (tenant.ReportFormatError, report_for(identity, secret)[:-1], {}),
        (SignatureError, good[:0x60] + bytes(48) + good[0x90:], {}),   # measurement rewritten
    ]
    for error, raw, extra in cases:
        with pytest.raises(error):
            tenant.check_report(raw, root.certificate, chain, **{"allow_emulated": True, **expect, **extra})


# ------------------------------------------------- end to end (platform)

def test_platform_builds_what_the_tenant_sealed(identity, root, tmp_path):
    """The host's steps on an in-process platform; every value the tenant predicted must hold."""
    from qemu_kd.platform.hardware import Platform

    with Platform(identity, 80 * MiB, tmp_path / "platform") as platform:
        platform.alloc(npages=7)                          # someone else's pages first
        alloc = platform.alloc(npages=pages_needed(MEM))
        layout = HostLayout(alloc.keyid, MEM, alloc.hpas, b"e2e", platform.platform_info().chain_pem)
        # Host -> tenant: the layout as JSON; tenant -> host: the bundle as bytes.
        received = HostLayout.unpack(layout.pack())
        sealed_bundle, _ = tenant.seal(KERNEL, INITRD, CMDLINE, MEM, Policy.make(), received, root.certificate)
        bundle = Bundle.unpack(sealed_bundle.pack())
        m = bundle.manifest
        assert m.keyid == alloc.keyid == 2

        platform.write_phys_pages([p.hpa for p in bundle.pages], b"".join(p.ciphertext for p in bundle.pages))
        platform.create_kd(m.keyid, bundle.wrapped_key, m.policy, m.host_data)
        platform.add_pages(m.keyid, [(p.hpa, p.gpa, p.page_type, p.perms, p.host_verifiable)
                                     for p in bundle.pages])
        platform.add_zero_pages(m.keyid, [(z.hpa, z.gpa, z.perms) for z in bundle.zero_pages])

        assert platform.hash_kd(m.keyid) == m.host_verifiable_digest
        assert platform.vmread(m.keyid, ENC_EPT_POINTER) == expected_eptp(layout)
        assert platform.vmread(m.keyid, ENC_SAVE_AREA) == plan(layout).save
        verdict = platform.verify_ept(m.keyid, layout.hpas)
        assert verdict.ok, verdict.reasons
        assert verdict.mapping_digest == m.ept_mapping_digest
        assert verdict.mapped_pages == MEM // PAGE
        measured = platform.domain(m.keyid).finalize_measurement()
        assert measured == m.measurement == tenant.measure(KERNEL, INITRD, CMDLINE, MEM, Policy.make())


# ------------------------------------------------------------------ CLI

@pytest.fixture
def files(tmp_path, identity, root):
    paths = {name: tmp_path / name for name in
             ("kernel", "initrd", "layout.json", "root.crt", "chain.pem", "bundle.kd", "secret.json")}
    paths["kernel"].write_bytes(KERNEL)
    paths["initrd"].write_bytes(INITRD)
    host_layout(identity, keyid=9).write(paths["layout.json"])
    paths["root.crt"].write_bytes(root.certificate_pem)
    paths["chain.pem"].write_bytes(identity.chain_pem())
    return paths


def guest_args(files, *extra):
    return ["--kernel", str(files["kernel"]), "--initrd", str(files["initrd"]), "--cmdline", CMDLINE,
            "--mem", "64M", *extra]


def run_cli(capsys, *argv):
    code = tenant_cli.main(["tenant", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_measure(capsys, files):
    code, out, err = run_cli(capsys, "measure", *guest_args(files))
    assert code == 0
    assert out.strip() == tenant.measure(KERNEL, INITRD, CMDLINE, MEM, Policy.make()).hex()
    assert f"cmdline: {CMDLINE}" in err
    code, out, _ = run_cli(capsys, "measure", *guest_args(files, "--debug", "--json"))
    doc = json.loads(out)
    assert code == 0 and doc["policy"] == Policy.make(debug=True).pack().hex()
    assert doc["measurement"] == tenant.measure(KERNEL, INITRD, CMDLINE, MEM, Policy.make(debug=True)).hex()


def test_cli_defaults_to_the_built_guest_and_its_cmdline(capsys, files, monkeypatch):
    import types

    import qemu_kd.guest.cache
    import qemu_kd.qemu.launch

    monkeypatch.setattr(qemu_kd.guest.cache, "ensure_guest",
                        lambda: types.SimpleNamespace(kernel=files["kernel"], initrd=files["initrd"]))
    monkeypatch.setattr(qemu_kd.qemu.launch, "full_cmdline", lambda: "console=ttyS0 tsc_early_khz=1234")
    code, out, err = run_cli(capsys, "measure", "--mem", "64M")
    assert code == 0
    assert "cmdline: console=ttyS0 tsc_early_khz=1234" in err and str(files["kernel"]) in err
    assert out.strip() == tenant.measure(KERNEL, INITRD, "console=ttyS0 tsc_early_khz=1234", MEM,
                                         Policy.make()).hex()


def test_cli_seal(capsys, files, identity):
    code, out, err = run_cli(capsys, "seal", *guest_args(files), "--layout", files["layout.json"],
                             "--root", files["root.crt"], "--out", files["bundle.kd"],
                             "--secret", files["secret.json"])
    assert code == 0, err
    bundle = Bundle.read(files["bundle.kd"])
    secret = tenant.TenantSecret.read(files["secret.json"])
    assert stat.S_IMODE(os.stat(files["secret.json"]).st_mode) == 0o600
    assert bundle.manifest.keyid == secret.keyid == 9
    assert bundle.manifest.measurement == secret.measurement == tenant.measure(
        KERNEL, INITRD, CMDLINE, MEM, Policy.make())
    assert secret.measurement.hex() in out and "EMULATED" in out
    assert unwrap_key(bundle.wrapped_key, identity.kak_private, Policy.make(), secret.host_data) == secret.key


def test_cli_seal_errors_are_one_line(capsys, files):
    files["layout.json"].write_bytes(files["layout.json"].read_bytes()[:100])
    base = ["seal", *guest_args(files), "--root", files["root.crt"], "--out", files["bundle.kd"],
            "--secret", files["secret.json"]]
    code, _, err = run_cli(capsys, *base, "--layout", files["layout.json"])
    assert code == 1 and "layout.json: host layout is not UTF-8 JSON" in err and len(err.splitlines()) == 1
    code, _, err = run_cli(capsys, *base, "--layout", files["layout.json"].with_name("nope.json"))
    assert code == 2 and "nope.json does not exist" in err and "Traceback" not in err
    foreign = PlatformIdentity.create_throwaway(RootCA.create_throwaway())
    HostLayout(9, MEM, host_layout(foreign).hpas, b"", foreign.chain_pem()).write(files["layout.json"])
    code, _, err = run_cli(capsys, *base, "--layout", files["layout.json"])
    assert code == 4 and "another root CA" in err and len(err.splitlines()) == 1
    assert not files["bundle.kd"].exists() and not files["secret.json"].exists()


def test_cli_verify_report_exit_codes(capsys, files, identity, sealed, tmp_path):
    _, _, secret = sealed
    other_root_chain = PlatformIdentity.create_throwaway(RootCA.create_throwaway()).chain_pem()

    def verify(report=None, chain=None, *extra, measurement=secret.measurement.hex(), policy="nodebug"):
        path = tmp_path / "report.bin"
        path.write_bytes(report if report is not None else report_for(identity, secret))
        chain_path = tmp_path / "chain-used.pem"
        chain_path.write_bytes(chain if chain is not None else identity.chain_pem())
        argv = ["verify-report", "--report", path, "--root", files["root.crt"], "--chain", chain_path,
                "--measurement", measurement, "--policy", policy, "--report-data", REPORT_DATA.hex(),
                *extra]
        code, out, err = run_cli(capsys, *argv)
        assert "Traceback" not in err
        if code:
            assert out == "" and len(err.splitlines()) == 1, err
        return code, out, err

    code, out, _ = verify(None, None, "--allow-emulated", "--host-data", secret.host_data.hex())
    assert code == 0 and out.startswith("OK:") and len(out.splitlines()) == 1
    assert verify()[0] == 9                                                     # emulated not allowed
    # A file that is not a report at all (empty, truncated, too long) is a usage error, not a
    # signature failure: there is no signature to check.
    for not_a_report in (b"", report_for(identity, secret)[:-1], report_for(identity, secret) + b"\0"):
        code, _, err = verify(not_a_report, None, "--allow-emulated")
        assert code == 2 and "not an attestation report (352 bytes)" in err
    tampered = bytearray(report_for(identity, secret))
    tampered[0x60] ^= 1
    assert verify(bytes(tampered), None, "--allow-emulated")[0] == 3            # signature
    assert verify(None, other_root_chain, "--allow-emulated")[0] == 4           # chain
    assert verify(None, None, "--allow-emulated", measurement="00" * 48)[0] == 5
    assert verify(None, None, "--allow-emulated", policy="debug")[0] == 6
    assert verify(report_for(identity, secret, report_data=b"x"), None, "--allow-emulated")[0] == 7
    assert verify(None, None, "--allow-emulated", "--host-data", "ff")[0] == 8
    # Usage errors: bad hex, wrong measurement length, missing file, missing option.
    assert verify(None, None, measurement="xyz")[0] == 2
    assert verify(None, None, measurement="00" * 47)[0] == 2
    assert verify(None, None, policy="sometimes")[0] == 2
    code, _, err = run_cli(capsys, "verify-report", "--report", tmp_path / "missing.bin", "--root",
                           files["root.crt"], "--chain", files["chain.pem"], "--measurement", "00" * 48,
                           "--policy", "nodebug", "--report-data", "00")
    assert code == 2 and "missing.bin does not exist" in err
    assert run_cli(capsys, "verify-report", "--report", "r.bin")[0] == 2


def test_cli_verify_report_with_the_tenant_secret(capsys, files, identity, sealed, tmp_path):
    _, _, secret = sealed
    secret.write(files["secret.json"])
    (tmp_path / "r.bin").write_bytes(report_for(identity, secret))
    base = ["verify-report", "--report", tmp_path / "r.bin", "--root", files["root.crt"],
            "--chain", files["chain.pem"], "--report-data", REPORT_DATA.hex(), "--allow-emulated"]
    assert run_cli(capsys, *base, "--secret", files["secret.json"])[0] == 0
    (tmp_path / "r.bin").write_bytes(report_for(identity, secret, host_data=b"moved"))
    assert run_cli(capsys, *base, "--secret", files["secret.json"])[0] == 8
    assert run_cli(capsys, *base)[0] == 2                     # neither --secret nor expectations


def test_policy_argument():
    assert tenant_cli.parse_policy("debug").debug
    assert not tenant_cli.parse_policy("no-debug").debug
    assert tenant_cli.parse_policy(Policy.make(debug=True).pack().hex()) == Policy.make(debug=True)
    with pytest.raises(tenant_cli.ConfigError):
        tenant_cli.parse_policy("0100000004000000")       # undefined flag bit
