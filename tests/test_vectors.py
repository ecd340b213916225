"""The golden vectors of tests/vectors/ (written by scripts/make-vectors) still hold.

Each vector is recomputed here with qemu_kd itself: a change to the boot image,
the measurement, the page cipher or the key wrap fails this test, and the
vectors (and docs/formats.md, which an independent implementation follows)
must then change with it, on purpose.
"""

from __future__ import annotations

import hashlib
import importlib.machinery
import importlib.util
import json
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from qemu_kd.crypto.mee import MemoryEncryptionEngine, data_physical_address
from qemu_kd.formats import bootlayout
from qemu_kd.formats.keywrap import WrappedKey, recipient_digest, unwrap_key
from qemu_kd.formats.policy import Policy
from qemu_kd.tenant.measure import measure, tenant_vmcs

ROOT = Path(__file__).resolve().parent.parent
VECTORS = Path(__file__).parent / "vectors"


def load(name: str) -> dict:
    return json.loads((VECTORS / name).read_text())


MEASUREMENT_CASES = load("measurement.json")["cases"]


@pytest.mark.parametrize("case", MEASUREMENT_CASES, ids=[c["name"] for c in MEASUREMENT_CASES])
def test_measurement_vector(case):
    inputs, boot = case["inputs"], case["boot"]
    kernel, initrd = bytes.fromhex(inputs["kernel_hex"]), bytes.fromhex(inputs["initrd_hex"])
    cmdline, mem = inputs["cmdline"], inputs["memory_size"]
    policy = Policy.unpack(bytes.fromhex(inputs["policy_hex"]))
    assert policy.debug == inputs["debug"]

    lay = bootlayout.build_boot_layout(kernel, initrd, cmdline, mem)
    pages = lay.pages()
    assert pages[boot["zero_page_gpa"]].hex() == boot["zero_page_hex"]
    assert [{"gpa": gpa, "sha384": hashlib.sha384(p).hexdigest()} for gpa, p in sorted(pages.items())] \
        == case["image_pages"]
    assert [{"addr": e.addr, "size": e.size, "type": e.type} for e in lay.e820] == boot["e820"]
    assert lay.vcpu.as_dict() == boot["vcpu"]
    assert (lay.initrd_gpa, lay.initrd_size) == (boot["initrd_gpa"], boot["initrd_size"])
    assert [{"name": r.name, "gpa": r.gpa, "length": len(r.data),
             "sha384": hashlib.sha384(r.data).hexdigest()} for r in lay.regions] == boot["regions"]
    assert tenant_vmcs(lay.vcpu, policy).guest_state_bytes().hex() == case["vmcs_guest_state_hex"]
    assert measure(kernel, initrd, cmdline, mem, policy).hex() == case["measurement"]

    ram = bytearray(mem)
    for gpa, page in pages.items():
        ram[gpa:gpa + len(page)] = page
    done = bootlayout.complete_cmdline(ram, mem, lay.vcpu.rsi, case["platform_completion"]["tsc_khz"])
    expected = case["platform_completion"]["append"]
    assert (None if done is None else {"gpa": done.gpa, "data_hex": done.data.hex(),
                                       "cmdline": done.cmdline.decode()}) == expected


def test_mee_vectors():
    doc = load("mee.json")
    key = bytes.fromhex(doc["key_hex"])
    assert key[:32].hex() == doc["data_key_hex"] and key[32:].hex() == doc["tweak_key_hex"]
    with MemoryEncryptionEngine(key, mask_cache_bytes=0) as mee:
        for case in doc["cases"]:
            dpa = data_physical_address(case["keyid"], case["hpa"])
            assert dpa == case["dpa"] and dpa.to_bytes(16, "little").hex() == case["tweak_hex"]
            plain, cipher = bytes.fromhex(case["plaintext_hex"]), bytes.fromhex(case["ciphertext_hex"])
            assert hashlib.sha384(plain).hexdigest() == case["plaintext_sha384"]
            assert hashlib.sha384(cipher).hexdigest() == case["ciphertext_sha384"]
            assert mee.encrypt_pages(plain, [dpa]) == cipher, case["name"]
            assert mee.decrypt_pages(cipher, [dpa]) == plain, case["name"]


def test_keywrap_vector():
    doc = load("keywrap.json")
    kak = ec.derive_private_key(int(doc["kak_private_scalar_hex"], 16), ec.SECP384R1())
    wrapped_bytes = bytes.fromhex(doc["wrapped_key_hex"])
    wrapped = WrappedKey.unpack(wrapped_bytes)
    assert wrapped.pack() == wrapped_bytes
    assert recipient_digest(kak.public_key()).hex() == doc["recipient_hex"] == wrapped.recipient.hex()
    assert wrapped.ephemeral_public.hex() == doc["ephemeral_public_hex"]
    assert bytes.fromhex(doc["aad_hex"])[:0xA8] == wrapped.header()
    policy = Policy.unpack(bytes.fromhex(doc["policy_hex"]))
    key = unwrap_key(wrapped, kak, policy, bytes.fromhex(doc["host_data_hex"]))
    assert key.hex() == doc["domain_key_hex"]


def test_the_vector_files_are_what_the_generator_writes():
    loader = importlib.machinery.SourceFileLoader("make_vectors", str(ROOT / "scripts" / "make-vectors"))
    spec = importlib.util.spec_from_loader("make_vectors", loader)
    generator = importlib.util.module_from_spec(spec)
    loader.exec_module(generator)
    for name, build in generator.VECTORS.items():
        assert (VECTORS / name).read_text() == generator.render(build()), \
            f"tests/vectors/{name} is stale: run scripts/make-vectors (and check docs/formats.md)"
