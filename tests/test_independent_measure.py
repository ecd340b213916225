"""docs/formats.md is enough to recompute qemu-kd's launch measurement, page
encryption and key wrap: tests/independent_measure.py, written from the doc
alone, reproduces every golden vector in tests/vectors/ and the measurement
the `qemu-kd tenant measure` CLI prints.

The CLI probes at the end cover rules of §11 that the vectors do not
exercise (setup_sects 0, cmdline_size 0, the end of the copied setup header,
which bytes separate command-line words, the initrd's upper bound): each
probe builds a variant of a vector's synthetic kernel and checks that the
CLI and the independent implementation agree, including on refusals.
"""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.exceptions import InvalidTag

import independent_measure as im

VECTORS = Path(__file__).parent / "vectors"
CLI = Path(sys.executable).parent / "qemu-kd"


def load(name: str) -> dict:
    return json.loads((VECTORS / name).read_text())


MEASUREMENT = load("measurement.json")
MEE = load("mee.json")
KEYWRAP = load("keywrap.json")


def unhex(text: str) -> bytes:
    return bytes.fromhex(text)


# --------------------------------------------------------------------------
# measurement.json (§5, §11)
# --------------------------------------------------------------------------

@pytest.fixture(scope="module", params=MEASUREMENT["cases"], ids=lambda c: c["name"])
def case(request):
    c = request.param
    inputs = c["inputs"]
    kernel, initrd = unhex(inputs["kernel_hex"]), unhex(inputs["initrd_hex"])
    assert im.sha384(kernel).hex() == inputs["kernel_sha384"]
    assert im.sha384(initrd).hex() == inputs["initrd_sha384"]
    policy = im.pack_policy(inputs["debug"])
    assert policy.hex() == inputs["policy_hex"]
    image = im.build_boot_image(kernel, initrd, inputs["cmdline"], inputs["memory_size"], policy)
    return c, image, im.measure(image)


def test_setup_header(case):
    c, image, _ = case
    expected = c["boot"]["setup_header"]
    h = image.header
    got = {"cmdline_size": h.cmdline_size, "header_end": h.header_end, "init_size": h.init_size,
           "initrd_addr_max": h.initrd_addr_max, "kernel_offset": h.kernel_offset,
           "setup_sects": h.setup_sects, "version": h.version}
    assert got == expected


def test_boot_image_layout(case):
    c, image, _ = case
    boot = c["boot"]
    assert image.region("cmdline").gpa == boot["cmdline_gpa"]
    assert image.region("kernel").gpa == boot["kernel_gpa"]
    assert image.region("zero page").gpa == boot["zero_page_gpa"]
    assert image.initrd_gpa == boot["initrd_gpa"]
    assert image.initrd_size == boot["initrd_size"]
    assert [{"addr": a, "size": s, "type": t} for a, s, t in image.e820] == boot["e820"]
    assert image.vcpu == boot["vcpu"]
    assert image.zero_page.hex() == boot["zero_page_hex"]
    got = [{"gpa": r.gpa, "length": len(r.data), "name": r.name, "sha384": im.sha384(r.data).hex()}
           for r in image.regions]
    assert got == boot["regions"]


def test_image_pages(case):
    c, _, m = case
    assert {gpa: d.hex() for gpa, d in m.image_page_digests.items()} == {
        p["gpa"]: p["sha384"] for p in c["image_pages"]}
    assert c["image_page_perms"] == im.GUEST_PERMS
    assert c["zero_page_perms"] == im.GUEST_PERMS


def test_vmcs_guest_state(case):
    c, _, m = case
    assert m.guest_state.hex() == c["vmcs_guest_state_hex"]
    assert len(m.guest_state) == 584
    assert im.sha384(m.guest_state).hex() == c["vmcs_guest_state_sha384"]


def test_chain(case):
    c, _, m = case
    assert m.after_policy.hex() == c["digest_after_policy_record"]
    assert {gpa: d.hex() for gpa, d in m.after_image.items()} == {
        p["after_image_gpa"]: p["digest"] for p in c["checkpoints"]}
    assert [(gpa, n, d.hex()) for gpa, n, d in m.zero_runs] == [
        (r["gpa"], r["pages"], r["digest"]) for r in c["zero_runs"]]
    assert m.before_vmcs.hex() == c["digest_before_vmcs_record"]
    assert m.record_count == c["record_count"]
    assert m.measurement.hex() == c["measurement"]


def test_platform_completion(case):
    c, image, _ = case
    expected = c["platform_completion"]
    got = im.platform_completion(im.image_pages(image), image.memory_size, image.vcpu["rsi"],
                                 expected["tsc_khz"])
    if expected["append"] is None:
        assert got is None
    else:
        assert got is not None
        assert {"cmdline": got.cmdline, "data_hex": got.data.hex(), "gpa": got.gpa} == expected["append"]


# --------------------------------------------------------------------------
# mee.json (§12)
# --------------------------------------------------------------------------

def test_mee_key_halves():
    key = unhex(MEE["key_hex"])
    assert key[:32].hex() == MEE["data_key_hex"]
    assert key[32:].hex() == MEE["tweak_key_hex"]


def test_tweak_example_in_the_doc():
    assert im.xts_tweak(1, 0x100000) == bytes.fromhex("0000100000010000") + bytes(8)


@pytest.mark.parametrize("page", MEE["cases"], ids=lambda c: c["name"])
def test_mee_page(page):
    key = unhex(MEE["key_hex"])
    plaintext, ciphertext = unhex(page["plaintext_hex"]), unhex(page["ciphertext_hex"])
    keyid, hpa = page["keyid"], page["hpa"]
    assert keyid << 40 | hpa == page["dpa"]
    assert im.xts_tweak(keyid, hpa).hex() == page["tweak_hex"]
    assert im.sha384(plaintext).hex() == page["plaintext_sha384"]
    assert im.sha384(ciphertext).hex() == page["ciphertext_sha384"]
    assert im.encrypt_page(key, keyid, hpa, plaintext) == ciphertext
    assert im.encrypt_page_by_formula(key, keyid, hpa, plaintext) == ciphertext
    assert im.decrypt_page(key, keyid, hpa, ciphertext) == plaintext


# --------------------------------------------------------------------------
# keywrap.json (§6)
# --------------------------------------------------------------------------

def kw(name: str) -> bytes:
    return unhex(KEYWRAP[name + "_hex"])


def test_keywrap_key_agreement_key():
    kak = im.p384_private(kw("kak_private_scalar"))
    assert im.sec1(kak.public_key()) == kw("kak_public")


def test_keywrap_every_step():
    steps = im.wrap_key(kw("domain_key"), kw("kak_public"), kw("policy"), kw("host_data"),
                        kw("ephemeral_private_scalar"), kw("nonce"))
    assert steps.recipient == kw("recipient")
    assert steps.ephemeral_public == kw("ephemeral_public")
    assert steps.shared_secret == kw("shared_secret")
    assert steps.kek == kw("kek")
    assert steps.aad == kw("aad")
    assert steps.record == kw("wrapped_key")


def test_keywrap_unwrap():
    record = kw("wrapped_key")
    assert im.unwrap_key(record, kw("kak_private_scalar"), kw("policy"), kw("host_data")) == kw("domain_key")
    other_policy = struct.pack("<HHI", 1, 0, 1)
    with pytest.raises(InvalidTag):
        im.unwrap_key(record, kw("kak_private_scalar"), other_policy, kw("host_data"))
    with pytest.raises(InvalidTag):
        im.unwrap_key(record, kw("kak_private_scalar"), kw("policy"), kw("host_data") + b"!")
    with pytest.raises(im.SpecError):
        im.unwrap_key(record, kw("ephemeral_private_scalar"), kw("policy"), kw("host_data"))


# --------------------------------------------------------------------------
# the documented CLI
# --------------------------------------------------------------------------

def cli_measure(*args: str) -> dict:
    out = subprocess.run([str(CLI), "tenant", "measure", "--json", *args],
                         capture_output=True, text=True, timeout=300)
    return {"rc": out.returncode, "json": json.loads(out.stdout) if out.returncode == 0 else None,
            "stderr": out.stderr}


@pytest.mark.parametrize("extra", [(), ("--debug", "--mem", "1026M")], ids=["default", "debug-1026M"])
def test_real_default_guest(guest_artifacts, extra):
    out = cli_measure("--kernel", str(guest_artifacts.kernel), "--initrd", str(guest_artifacts.initrd),
                      *extra)
    assert out["rc"] == 0, out["stderr"]
    result = out["json"]
    mine = im.measure_guest(Path(guest_artifacts.kernel).read_bytes(),
                            Path(guest_artifacts.initrd).read_bytes(), result["cmdline"],
                            result["memory_size"], result["debug"])
    assert mine.measurement.hex() == result["measurement"]
    assert im.pack_policy(result["debug"]).hex() == result["policy"]


BASE = MEASUREMENT["cases"][0]["inputs"]


def patched(offset: int, fmt: str, value: int, tail: bytes = b"") -> bytes:
    kernel = bytearray(unhex(BASE["kernel_hex"]))
    struct.pack_into(fmt, kernel, offset, value)
    return bytes(kernel) + tail


SPACE_255 = 0x238, "<I", 255
PROBES = {
    # §11.5 step 2 copies 0x1F1 .. header_end - 1: a byte at header_end stays 0
    "byte at header_end": (patched(0x268, "<B", 0x5A), "console=ttyS0"),
    "short setup header": (patched(0x201, "<B", 0x30), "console=ttyS0"),
    # setup_sects 0 means 4 for the kernel offset; the zero page keeps the 0
    "setup_sects 0": (patched(0x1F1, "<B", 0, bytes(3000)), "console=ttyS0"),
    # cmdline_size 0: the space is 0x5C000
    "cmdline_size 0": (patched(0x238, "<I", 0), "a" * 100_000),
    "cmdline_size 255, longest line": (patched(*SPACE_255), "a" * 223),
    "cmdline_size 255, one byte over": (patched(*SPACE_255), "a" * 224),
    "tsc_early_khz after VT": (patched(*SPACE_255), "a" * 230 + "\x0btsc_early_khz=1"),
    "tsc_early_khz after CR": (patched(*SPACE_255), "a" * 230 + "\rtsc_early_khz=1"),
    "tsc_early_khz after 0x1C": (patched(*SPACE_255), "a" * 230 + "\x1ctsc_early_khz=1"),
    "tsc_early_khz after NBSP": (patched(*SPACE_255), "a" * 230 + "\xa0tsc_early_khz=1"),
    "tsc_early_khz inside a quoted value": (patched(*SPACE_255), "a" * 210 + ' x="b tsc_early_khz=1"'),
    "tsc_early_khz quoted as a whole": (patched(*SPACE_255), "a" * 220 + ' "tsc_early_khz=1"'),
    "no protected-mode kernel": (unhex(BASE["kernel_hex"])[:5 * 512], "console=ttyS0"),
    "initrd_addr_max not page aligned": (patched(0x22C, "<I", 0x37FFFFE), "console=ttyS0"),
    # kernel_end = 0x100000 + init_size meets initrd_gpa 0x3FFD000 exactly, then passes it
    "init_size up to the initrd": (patched(0x260, "<I", 0x3EFD000), "console=ttyS0"),
    "init_size over the initrd": (patched(0x260, "<I", 0x3EFD001), "console=ttyS0"),
}


@pytest.mark.parametrize("name", list(PROBES))
def test_cli_agrees_on_rules_the_vectors_leave_out(name, tmp_path):
    kernel, cmdline = PROBES[name]
    initrd = unhex(BASE["initrd_hex"])
    (tmp_path / "k").write_bytes(kernel)
    (tmp_path / "i").write_bytes(initrd)
    out = cli_measure("--kernel", str(tmp_path / "k"), "--initrd", str(tmp_path / "i"),
                      "--cmdline", cmdline, "--mem", "64M")
    try:
        mine = im.measure_guest(kernel, initrd, cmdline, 64 * im.MIB, False).measurement.hex()
    except im.SpecError:
        mine = None
    if mine is None:
        assert out["rc"] != 0, "the CLI accepts what the doc refuses"
        assert "Traceback" not in out["stderr"]
    else:
        assert out["rc"] == 0, out["stderr"]
        assert out["json"]["measurement"] == mine
