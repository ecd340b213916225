"""A second, independent implementation of qemu-kd's launch measurement,
page encryption and key wrap, written only from docs/formats.md (§5, §6,
§11, §12).

It deliberately shares no code with the qemu_kd package: it stands for a
verifier in another code base that recomputes what the platform reports
from a kernel, an initrd, a command line, a memory size and a policy.
Only the Python standard library and the `cryptography` package are used.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass, field

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

PAGE = 0x1000
KIB, MIB, GIB = 1 << 10, 1 << 20, 1 << 30


class SpecError(ValueError):
    """An input the spec refuses (the guest does not fit, a bad kernel, ...)."""


def sha384(data: bytes) -> bytes:
    return hashlib.sha384(data).digest()


# --------------------------------------------------------------------------
# §2 policy
# --------------------------------------------------------------------------

POLICY_DEBUG = 1 << 0


def pack_policy(debug: bool) -> bytes:
    """version 1, reserved 0, flags (bit 0 DEBUG)."""
    return struct.pack("<HHI", 1, 0, POLICY_DEBUG if debug else 0)


# --------------------------------------------------------------------------
# §11.1 setup header
# --------------------------------------------------------------------------

CMDLINE_GPA = 0x20000
CMDLINE_SPACE_MAX = 0x5C000
PLATFORM_RESERVE = 32
KERNEL_GPA = 0x100000
ZERO_PAGE_GPA = 0x7000
BOOT_RSP = 0x8FF0
TSC_WORD = b"tsc_early_khz="


@dataclass(frozen=True)
class SetupHeader:
    setup_sects: int
    header_end: int
    version: int
    initrd_addr_max: int
    cmdline_size: int
    init_size: int

    @property
    def kernel_offset(self) -> int:
        return (self.setup_sects + 1) * 512

    @classmethod
    def parse(cls, kernel: bytes) -> "SetupHeader":
        if len(kernel) < 0x268:
            raise SpecError("kernel shorter than a setup header")
        if kernel[0x1FE:0x200] != b"\x55\xaa" or kernel[0x202:0x206] != b"HdrS":
            raise SpecError("not a bzImage")
        setup_sects = kernel[0x1F1] or 4
        header_end = 0x202 + kernel[0x201]
        (version,) = struct.unpack_from("<H", kernel, 0x206)
        (initrd_addr_max,) = struct.unpack_from("<I", kernel, 0x22C)
        relocatable = kernel[0x234]
        (xloadflags,) = struct.unpack_from("<H", kernel, 0x236)
        (cmdline_size,) = struct.unpack_from("<I", kernel, 0x238)
        (init_size,) = struct.unpack_from("<I", kernel, 0x260)
        if version < 0x020C:
            raise SpecError("boot protocol older than 2.12")
        if relocatable == 0:
            raise SpecError("kernel is not relocatable")
        if not xloadflags & 1:
            raise SpecError("kernel has no 64-bit entry point")
        return cls(setup_sects, header_end, version, initrd_addr_max, cmdline_size, init_size)


def cmdline_space(cmdline_size: int) -> int:
    """Bytes at CMDLINE_GPA that belong to the command line (§11.1)."""
    if cmdline_size == 0:
        return CMDLINE_SPACE_MAX
    return min(CMDLINE_SPACE_MAX, cmdline_size + 1)


SPACES = b"\t\n\x0b\x0c\r \xa0"


def words_of(line: bytes) -> list[bytes]:
    """§11.1: split at the space bytes outside double quotes; a quote stays in its word."""
    words, current, in_quotes = [], b"", False
    for i in range(len(line)):
        byte = line[i:i + 1]
        if byte in SPACES and not in_quotes:
            if current:
                words.append(current)
            current = b""
            continue
        if byte == b'"':
            in_quotes = not in_quotes
        current += byte
    return words + [current] if current else words


def sets_tsc_early_khz(line: bytes) -> bool:
    """A word of the line, less one leading quote, starts with tsc_early_khz=."""
    return any((w[1:] if w.startswith(b'"') else w).startswith(TSC_WORD) for w in words_of(line))


# --------------------------------------------------------------------------
# §11.2 - §11.6 boot image
# --------------------------------------------------------------------------

GDT = struct.pack("<4Q", 0, 0, 0x00AF9B000000FFFF, 0x00CF93000000FFFF)

E820_RAM, E820_RESERVED = 1, 2


@dataclass(frozen=True)
class Region:
    name: str
    gpa: int
    data: bytes


@dataclass(frozen=True)
class BootImage:
    header: SetupHeader
    memory_size: int
    policy: bytes
    regions: list[Region]
    initrd_gpa: int
    initrd_size: int
    e820: list[tuple[int, int, int]]
    zero_page: bytes
    vcpu: dict[str, int]

    def region(self, name: str) -> Region:
        return next(r for r in self.regions if r.name == name)


def page_directory_count(memory_size: int) -> int:
    return max(1, min(4, -(-memory_size // GIB)))


def build_page_tables(memory_size: int) -> tuple[bytes, bytes, bytes]:
    g = page_directory_count(memory_size)
    pml4 = struct.pack("<Q", 0x2000 | 0x3).ljust(PAGE, b"\0")
    pdpt = b"".join(struct.pack("<Q", (0x3000 + i * PAGE) | 0x3) for i in range(g)).ljust(PAGE, b"\0")
    pds = b"".join(struct.pack("<Q", k * 0x200000 | 0x83) for k in range(512 * g))
    return pml4, pdpt, pds


def e820_map(memory_size: int) -> list[tuple[int, int, int]]:
    return [
        (0x0, 0x9FC00, E820_RAM),
        (0x9FC00, 0x60400, E820_RESERVED),
        (0x100000, memory_size - 0x100000, E820_RAM),
    ]


def build_zero_page(kernel: bytes, header: SetupHeader, initrd_gpa: int, initrd_size: int,
                    e820: list[tuple[int, int, int]]) -> bytes:
    zp = bytearray(PAGE)
    zp[0x1F1:header.header_end] = kernel[0x1F1:header.header_end]
    zp[0x210] = 0xFF
    struct.pack_into("<II", zp, 0x218, initrd_gpa, initrd_size)
    struct.pack_into("<I", zp, 0x228, CMDLINE_GPA)
    struct.pack_into("<III", zp, 0x0C0, 0, 0, 0)
    zp[0x1E8] = len(e820)
    for i, (addr, size, kind) in enumerate(e820):
        struct.pack_into("<QQI", zp, 0x2D0 + 20 * i, addr, size, kind)
    return bytes(zp)


def initial_vcpu() -> dict[str, int]:
    regs = {name: 0 for name in (
        "rax", "rbx", "rcx", "rdx", "rdi", "rbp", "r8", "r9", "r10", "r11", "r12", "r13",
        "r14", "r15", "fs_base", "gs_base")}
    regs.update(
        rip=KERNEL_GPA + 0x200, rsi=ZERO_PAGE_GPA, rsp=BOOT_RSP, rflags=0x2,
        cs=0x10, ss=0x18, ds=0x18, es=0x18, fs=0x18, gs=0x18,
        cr0=0x80000011, cr3=0x1000, cr4=0x20, efer=0x500, gdtr_base=0, gdtr_limit=0xFFFF,
    )
    return regs


def build_boot_image(kernel: bytes, initrd: bytes, cmdline: str, memory_size: int,
                     policy: bytes) -> BootImage:
    if memory_size % (2 * MIB) or not 64 * MIB <= memory_size <= 3 * GIB:
        raise SpecError("memory size must be a multiple of 2 MiB from 64 MiB to 3 GiB")
    header = SetupHeader.parse(kernel)
    line = cmdline.encode("utf-8") + b"\0"
    space = cmdline_space(header.cmdline_size)
    limit = space if sets_tsc_early_khz(line[:-1]) else space - PLATFORM_RESERVE
    if len(line) > limit:
        raise SpecError(f"command line needs {len(line)} bytes, {limit} available")
    pm_kernel = kernel[header.kernel_offset:]
    if not pm_kernel:
        raise SpecError("no protected-mode kernel after the setup sectors")
    kernel_end = KERNEL_GPA + max(len(pm_kernel), header.init_size)
    if initrd:
        top = min(memory_size, header.initrd_addr_max + 1)
        initrd_gpa = (top - len(initrd)) // PAGE * PAGE
        if initrd_gpa < kernel_end:
            raise SpecError("the initrd does not fit above the kernel")
    else:
        initrd_gpa = 0
    e820 = e820_map(memory_size)
    zero_page = build_zero_page(kernel, header, initrd_gpa, len(initrd), e820)
    pml4, pdpt, pds = build_page_tables(memory_size)
    regions = [
        Region("gdt", 0x0, GDT),
        Region("pml4", 0x1000, pml4),
        Region("pdpt", 0x2000, pdpt),
        Region("page directories", 0x3000, pds),
        Region("zero page", ZERO_PAGE_GPA, zero_page),
        Region("cmdline", CMDLINE_GPA, line),
        Region("kernel", KERNEL_GPA, pm_kernel),
    ]
    if initrd:
        regions.append(Region("initrd", initrd_gpa, initrd))
    return BootImage(header, memory_size, policy, regions, initrd_gpa, len(initrd), e820,
                     zero_page, initial_vcpu())


# --------------------------------------------------------------------------
# §3.4 / §11.6 measured VMCS guest state
# --------------------------------------------------------------------------

GUEST_FIELD_ENCODINGS = {
    "es": 0x0800, "cs": 0x0802, "ss": 0x0804, "ds": 0x0806, "fs": 0x0808, "gs": 0x080A,
    "efer": 0x2806, "gdtr_limit": 0x4810, "cr0": 0x6800, "cr3": 0x6802, "cr4": 0x6804,
    "fs_base": 0x680E, "gs_base": 0x6810, "gdtr_base": 0x6816, "rsp": 0x681C,
    "rip": 0x681E, "rflags": 0x6820,
}
# General-purpose registers in x86 order; RSP (n = 4) is Intel's guest RSP.
GPR_ORDER = ("rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi",
             "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15")
for _n, _name in enumerate(GPR_ORDER):
    if _name != "rsp":
        GUEST_FIELD_ENCODINGS[_name] = 0x6B00 + 2 * _n

ENC_EXPOSED_MASK, ENC_POLICY, ENC_HOST_FORCED_EXIT, ENC_LINK_POINTER = 0x2202, 0x2204, 0x4200, 0x2800


def guest_state_bytes(vcpu: dict[str, int], policy: bytes, exposed_mask: int = 0,
                      host_forced_exit: int = 1) -> bytes:
    fields = {GUEST_FIELD_ENCODINGS[name]: value for name, value in vcpu.items()}
    fields[ENC_LINK_POINTER] = (1 << 64) - 1
    fields[ENC_EXPOSED_MASK] = exposed_mask
    fields[ENC_POLICY] = struct.unpack("<Q", policy)[0]
    fields[ENC_HOST_FORCED_EXIT] = host_forced_exit
    body = b"".join(struct.pack("<QQ", enc, fields[enc]) for enc in sorted(fields))
    return b"KDGS" + struct.pack("<HH", 1, len(fields)) + body


# --------------------------------------------------------------------------
# §5 / §11.8 launch measurement
# --------------------------------------------------------------------------

TYPE_IMAGE, TYPE_VMCS, TYPE_POLICY, TYPE_ZERO_RUN = 1, 3, 0x10, 0x11
RECORD_LENGTH = 0x70
GUEST_PERMS = 7


def page_info(prev: bytes, contents: bytes, page_type: int, perms: int, gpa: int) -> bytes:
    assert len(prev) == 48 and len(contents) == 48
    return prev + contents + struct.pack("<HBBIQ", RECORD_LENGTH, page_type, perms, 0, gpa)


def image_pages(image: BootImage) -> dict[int, bytes]:
    """gpa -> 4096 plaintext bytes of every IMAGE page (§11.8 step 1)."""
    pages: dict[int, bytearray] = {}
    for region in image.regions:
        end = region.gpa + len(region.data)
        for gpa in range(region.gpa // PAGE * PAGE, end, PAGE):
            page = pages.setdefault(gpa, bytearray(PAGE))
            lo, hi = max(gpa, region.gpa), min(gpa + PAGE, end)
            page[lo - gpa:hi - gpa] = region.data[lo - region.gpa:hi - region.gpa]
    return {gpa: bytes(pages[gpa]) for gpa in sorted(pages)}


@dataclass
class Measurement:
    measurement: bytes
    after_policy: bytes
    before_vmcs: bytes
    record_count: int
    image_page_digests: dict[int, bytes]
    after_image: dict[int, bytes] = field(default_factory=dict)
    guest_state: bytes = b""
    # (first gpa, page count, chain value after its ZERO_RUN record), in chain order
    zero_runs: list[tuple[int, int, bytes]] = field(default_factory=list)


def zero_runs_of(memory_size: int, image_gpas: set[int]) -> list[tuple[int, int]]:
    """§5.3: the maximal runs of consecutive ZERO pages (all guest pages have one perms
    here), as (first gpa, page count), by walking the pages from gpa 0."""
    runs: list[tuple[int, int]] = []
    first, count = 0, 0
    for gpa in range(0, memory_size, PAGE):
        if gpa in image_gpas:
            if count:
                runs.append((first, count))
            count = 0
        else:
            if not count:
                first = gpa
            count += 1
    if count:
        runs.append((first, count))
    return runs


def measure(image: BootImage) -> Measurement:
    pages = image_pages(image)
    digest = bytes(48)
    digest = sha384(page_info(digest, image.policy + bytes(40), TYPE_POLICY, 0, 0))
    after_policy, count = digest, 1
    # Records in gpa order: IMAGE pages one each, ZERO pages one per run (keyed by first gpa).
    records: dict[int, tuple[str, int]] = {gpa: ("image", 0) for gpa in pages}
    for first, n in zero_runs_of(image.memory_size, set(pages)):
        records[first] = ("run", n)
    page_digests: dict[int, bytes] = {}
    after_image: dict[int, bytes] = {}
    runs: list[tuple[int, int, bytes]] = []
    for gpa in sorted(records):
        kind, n = records[gpa]
        if kind == "image":
            page_digests[gpa] = sha384(pages[gpa])
            digest = sha384(page_info(digest, page_digests[gpa], TYPE_IMAGE, GUEST_PERMS, gpa))
            after_image[gpa] = digest
        else:
            digest = sha384(page_info(digest, n.to_bytes(8, "little") + bytes(40), TYPE_ZERO_RUN,
                                      GUEST_PERMS, gpa))
            runs.append((gpa, n, digest))
        count += 1
    before_vmcs = digest
    state = guest_state_bytes(image.vcpu, image.policy)
    digest = sha384(page_info(digest, sha384(state), TYPE_VMCS, 0, 0))
    return Measurement(digest, after_policy, before_vmcs, count + 1, page_digests, after_image, state, runs)


def measure_guest(kernel: bytes, initrd: bytes, cmdline: str, memory_size: int,
                  debug: bool) -> Measurement:
    return measure(build_boot_image(kernel, initrd, cmdline, memory_size, pack_policy(debug)))


# --------------------------------------------------------------------------
# §11.7 the platform's tsc_early_khz completion
# --------------------------------------------------------------------------

@dataclass(frozen=True)
class Completion:
    gpa: int
    data: bytes
    cmdline: str


def platform_completion(memory: dict[int, bytes], memory_size: int, rsi: int,
                        tsc_khz: int) -> Completion | None:
    """What the platform writes before the first vCPU run; `memory` maps gpa -> page."""

    def read(gpa: int, length: int) -> bytes:
        out = bytearray()
        while length > 0:
            page = memory.get(gpa // PAGE * PAGE, bytes(PAGE))
            chunk = page[gpa % PAGE:gpa % PAGE + length]
            out += chunk
            gpa += len(chunk)
            length -= len(chunk)
        return bytes(out)

    if not 1 <= tsc_khz <= 999_999_999:
        raise SpecError("TSC frequency out of range")
    params = read(rsi, PAGE)
    if params[0x202:0x206] != b"HdrS":
        return None
    ptr = struct.unpack_from("<I", params, 0x228)[0] | struct.unpack_from("<I", params, 0x0C8)[0] << 32
    if ptr == 0:
        return None
    version = struct.unpack_from("<H", params, 0x206)[0]
    size = struct.unpack_from("<I", params, 0x238)[0] if version >= 0x0206 else 255
    space = min(cmdline_space(size), max(0, memory_size - ptr))
    area = read(ptr, space)
    nul = area.find(b"\0")
    if nul < 0:
        raise SpecError("command line has no NUL in its space")
    if sets_tsc_early_khz(area[:nul]):
        return None
    data = f" tsc_early_khz={tsc_khz}".encode() + b"\0"
    if nul + len(data) > space or any(area[nul:nul + len(data)]):
        raise SpecError("no room for tsc_early_khz: launch refused")
    return Completion(ptr + nul, data, (area[:nul] + data[:-1]).decode("utf-8"))


# --------------------------------------------------------------------------
# §12 page encryption
# --------------------------------------------------------------------------

GF_POLY = (1 << 128) | 0x87


def xts_tweak(keyid: int, hpa: int) -> bytes:
    if not 1 <= keyid <= 63 or hpa >= 1 << 40 or hpa % PAGE:
        raise SpecError("bad KeyID or hpa")
    return (keyid << 40 | hpa).to_bytes(16, "little")


def _check_key(key: bytes) -> None:
    if len(key) != 64 or key[:32] == key[32:]:
        raise SpecError("domain key must be 64 bytes with two different halves")


def encrypt_page(key: bytes, keyid: int, hpa: int, plaintext: bytes) -> bytes:
    """AES-256-XTS by the library, with the 64-byte key and the 16-byte tweak."""
    _check_key(key)
    if len(plaintext) != PAGE:
        raise SpecError("a page is 4096 bytes")
    enc = Cipher(algorithms.AES(key), modes.XTS(xts_tweak(keyid, hpa))).encryptor()
    return enc.update(plaintext) + enc.finalize()


def decrypt_page(key: bytes, keyid: int, hpa: int, ciphertext: bytes) -> bytes:
    _check_key(key)
    dec = Cipher(algorithms.AES(key), modes.XTS(xts_tweak(keyid, hpa))).decryptor()
    return dec.update(ciphertext) + dec.finalize()


def encrypt_page_by_formula(key: bytes, keyid: int, hpa: int, plaintext: bytes) -> bytes:
    """The same page from §12's block formula, with AES-ECB only."""
    _check_key(key)
    k1, k2 = key[:32], key[32:]
    ecb2 = Cipher(algorithms.AES(k2), modes.ECB()).encryptor()
    t = int.from_bytes(ecb2.update(xts_tweak(keyid, hpa)), "little")
    masks = []
    for _ in range(PAGE // 16):
        masks.append(t.to_bytes(16, "little"))
        t <<= 1
        if t >> 128:
            t ^= GF_POLY
    xored = b"".join(
        (int.from_bytes(plaintext[16 * j:16 * j + 16], "little") ^ int.from_bytes(m, "little"))
        .to_bytes(16, "little") for j, m in enumerate(masks))
    ecb1 = Cipher(algorithms.AES(k1), modes.ECB()).encryptor()
    mid = ecb1.update(xored) + ecb1.finalize()
    return b"".join(
        (int.from_bytes(mid[16 * j:16 * j + 16], "little") ^ int.from_bytes(m, "little"))
        .to_bytes(16, "little") for j, m in enumerate(masks))


# --------------------------------------------------------------------------
# §6 wrapped key
# --------------------------------------------------------------------------

WRAP_MAGIC = b"KDWK"
WRAP_LENGTH = 248
WRAP_INFO = b"qemu-kd key wrap v1"


@dataclass(frozen=True)
class WrapSteps:
    recipient: bytes
    ephemeral_public: bytes
    shared_secret: bytes
    kek: bytes
    aad: bytes
    record: bytes


def sec1(public: ec.EllipticCurvePublicKey) -> bytes:
    n = public.public_numbers()
    return b"\x04" + n.x.to_bytes(48, "big") + n.y.to_bytes(48, "big")


def p384_private(scalar: bytes) -> ec.EllipticCurvePrivateKey:
    return ec.derive_private_key(int.from_bytes(scalar, "big"), ec.SECP384R1())


def p384_public(point: bytes) -> ec.EllipticCurvePublicKey:
    return ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP384R1(), point)


def _kek(shared: bytes, eph_pub: bytes, kak_pub: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA384(), length=32, salt=eph_pub + kak_pub,
                info=WRAP_INFO).derive(shared)


def _aad(header: bytes, policy: bytes, host_data: bytes) -> bytes:
    if len(policy) != 8 or len(host_data) > 32:
        raise SpecError("policy is 8 bytes, host_data at most 32")
    return header + policy + host_data.ljust(32, b"\0")


def _header(recipient: bytes, eph_pub: bytes, nonce: bytes) -> bytes:
    return WRAP_MAGIC + struct.pack("<HH", 1, 0) + recipient + eph_pub + bytes(3) + nonce


def wrap_key(domain_key: bytes, kak_public: bytes, policy: bytes, host_data: bytes,
             ephemeral_scalar: bytes, nonce: bytes) -> WrapSteps:
    _check_key(domain_key)
    eph = p384_private(ephemeral_scalar)
    eph_pub = sec1(eph.public_key())
    shared = eph.exchange(ec.ECDH(), p384_public(kak_public))
    kek = _kek(shared, eph_pub, kak_public)
    header = _header(sha384(kak_public), eph_pub, nonce)
    assert len(header) == 0xA8
    aad = _aad(header, policy, host_data)
    record = header + AESGCM(kek).encrypt(nonce, domain_key, aad)
    assert len(record) == WRAP_LENGTH
    return WrapSteps(sha384(kak_public), eph_pub, shared, kek, aad, record)


def unwrap_key(record: bytes, kak_scalar: bytes, policy: bytes, host_data: bytes) -> bytes:
    if len(record) != WRAP_LENGTH:
        raise SpecError("a wrapped key is 248 bytes")
    if record[:4] != WRAP_MAGIC or struct.unpack_from("<HH", record, 4) != (1, 0):
        raise SpecError("not a version-1 wrapped key")
    if any(record[0x99:0x9C]):
        raise SpecError("reserved bytes set")
    kak = p384_private(kak_scalar)
    kak_pub = sec1(kak.public_key())
    if record[0x08:0x38] != sha384(kak_pub):
        raise SpecError("wrapped for another platform")
    eph_pub = record[0x38:0x99]
    shared = kak.exchange(ec.ECDH(), p384_public(eph_pub))
    kek = _kek(shared, eph_pub, kak_pub)
    aad = _aad(record[:0xA8], policy, host_data)
    return AESGCM(kek).decrypt(record[0x9C:0xA8], record[0xA8:], aad)
