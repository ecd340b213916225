"""The tenant: measure, seal and check attestation reports for a Linux guest.

The tenant trusts only the emulated manufacturer's root certificate.  It

1. computes the expected launch measurement offline from (kernel, initrd,
   cmdline, memory size, policy) -- :func:`measure`;
2. seals the guest for the layout a host allocated -- :func:`seal`: it checks
   the platform's certificate chain, picks a fresh 64-byte key, builds the
   boot image, the VMCS and the EPT for the layout's hpas, encrypts every page
   for its data physical address (``keyid << 40 | hpa``), wraps the key for
   the platform's key-agreement key and writes a :class:`~qemu_kd.formats.bundle.Bundle`;
   the key stays in a :class:`TenantSecret` that never leaves the tenant;
3. checks a report the guest obtained -- :func:`check_report`.

Every gpa in [0, memory_size) is a guest page with permissions RWX: IMAGE if
the boot layout puts data there, ZERO otherwise.  Zero pages travel as
(hpa, gpa, perms) records; the platform fills them itself.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from cryptography import x509

from qemu_kd.formats.bundle import (
    FLAG_HOST_VERIFIABLE, NO_GPA, PAGE_RECORD_DTYPE, ZERO_RECORD_DTYPE, Bundle, BundleManifest,
    PageRecords, ZeroRecords,
)
from qemu_kd.formats.ept import build_ept_arrays, mapping_digest_arrays
from qemu_kd.formats.errors import FormatError
from qemu_kd.common.files import write_file_atomic
from qemu_kd.formats.certs import PlatformCertInfo, verify_chain
from qemu_kd.formats.keywrap import DOMAIN_KEY_SIZE, wrap_key
from qemu_kd.formats.layout import HostLayout, LayoutPlan, plan
from qemu_kd.formats.measurement import PageType, host_verifiable_digest
from qemu_kd.formats.addresses import HPA_LIMIT, KEYID_SHIFT, MAX_KEYID, PAGE_SIZE
from qemu_kd.crypto.mee import MemoryEncryptionEngine
from qemu_kd.formats.policy import Policy
from qemu_kd.tenant.measure import GUEST_PERMS, MeasuredGuest, SealError, measure_guest, tenant_vmcs
from qemu_kd.tenant.verify import load_root
SECRET_FORMAT = "qemu-kd tenant secret"
SECRET_VERSION = 1


class TenantSecretError(FormatError):
    """The tenant secret file is missing or malformed."""


# ---------------------------------------------------------- tenant secret

@dataclass(frozen=True)
class TenantSecret:
    """What the tenant keeps after sealing (JSON, mode 0600): the key and what to expect."""

    key: bytes = field(repr=False)
    measurement: bytes
    policy: Policy
    keyid: int
    platform_id: bytes
    host_data: bytes = bytes(32)
    platform_emulated: bool = True

    def pack(self) -> bytes:
        if len(self.key) != DOMAIN_KEY_SIZE:
            raise TenantSecretError(f"tenant secret key must be {DOMAIN_KEY_SIZE} bytes")
        doc = {
            "format": SECRET_FORMAT, "version": SECRET_VERSION,
            "key": self.key.hex(), "measurement": self.measurement.hex(),
            "policy": self.policy.pack().hex(), "keyid": self.keyid,
            "platform_id": self.platform_id.hex(), "host_data": self.host_data.hex(),
            "platform_emulated": self.platform_emulated,
        }
        return json.dumps(doc, sort_keys=True, indent=1).encode() + b"\n"

    @classmethod
    def unpack(cls, data: bytes) -> "TenantSecret":
        try:
            doc = json.loads(bytes(data).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise TenantSecretError(f"tenant secret is not UTF-8 JSON: {exc}") from None
        if not isinstance(doc, dict) or doc.get("format") != SECRET_FORMAT or doc.get("version") != SECRET_VERSION:
            raise TenantSecretError(f"this is not a version-{SECRET_VERSION} qemu-kd tenant secret",
                                    "pass the secret file written by qemu-kd tenant seal")
        expected = {"format", "version", "key", "measurement", "policy", "keyid", "platform_id",
                    "host_data", "platform_emulated"}
        if set(doc) != expected:
            raise TenantSecretError(f"tenant secret keys differ: unknown {sorted(set(doc) - expected)}, "
                                    f"missing {sorted(expected - set(doc))}")
        sizes = {"key": DOMAIN_KEY_SIZE, "measurement": 48, "policy": 8, "platform_id": 16, "host_data": 32}
        values: dict[str, bytes] = {}
        for name, size in sizes.items():
            try:
                values[name] = bytes.fromhex(doc[name]) if isinstance(doc[name], str) else b""
            except ValueError:
                values[name] = b""
            if len(values[name]) != size:
                raise TenantSecretError(f"tenant secret {name} must be {size} bytes as hex")
        keyid, emulated = doc["keyid"], doc["platform_emulated"]
        if not isinstance(keyid, int) or isinstance(keyid, bool) or not 1 <= keyid <= 63:
            raise TenantSecretError(f"tenant secret keyid {keyid!r} is not 1..63")
        if not isinstance(emulated, bool):
            raise TenantSecretError("tenant secret platform_emulated must be true or false")
        return cls(key=values["key"], measurement=values["measurement"],
                   policy=Policy.unpack(values["policy"]), keyid=keyid,
                   platform_id=values["platform_id"], host_data=values["host_data"],
                   platform_emulated=emulated)

    def write(self, path: Path | str) -> None:
        """Write atomically, readable only by the owner (0600)."""
        write_file_atomic(path, self.pack(), 0o600)

    @classmethod
    def read(cls, path: Path | str) -> "TenantSecret":
        path = Path(path)
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise TenantSecretError(f"cannot read the tenant secret {path}: {exc.strerror}",
                                    "pass the secret file written by qemu-kd tenant seal") from None
        try:
            return cls.unpack(data)
        except FormatError as exc:
            raise type(exc)(f"{path}: {exc.message}", exc.hint) from None


# ------------------------------------------------------------------ seal

def _encrypt(mee: MemoryEncryptionEngine, keyid: int, hpas: np.ndarray, plaintext: bytes | np.ndarray,
             out: np.ndarray) -> None:
    """Encrypt concatenated plaintext pages for their data physical addresses into ``out``'s
    ciphertext (PAGE_RECORD_DTYPE records)."""
    if not 1 <= keyid <= MAX_KEYID or (hpas >= np.uint64(HPA_LIMIT)).any():
        raise SealError(f"KeyID {keyid} or an hpa of the layout is out of range")
    sealed = np.empty((hpas.size, PAGE_SIZE), dtype=np.uint8)
    mee.encrypt_into(sealed, plaintext, hpas | np.uint64(keyid << KEYID_SHIFT))
    out["ciphertext"] = sealed


def seal(kernel: bytes, initrd: bytes, cmdline: str, memory_size: int, policy: Policy,
         layout: HostLayout, root_cert: x509.Certificate | bytes, *,
         exposed_register_mask: int = 0, measured: MeasuredGuest | None = None) -> tuple[Bundle, TenantSecret]:
    """Seal the guest for ``layout`` on the platform certified by ``root_cert``.

    ``exposed_register_mask``: the general registers a hypercall may show the
    host (VMCS control 0x2202, measured; the guest can only narrow it).
    ``measured``: :func:`~qemu_kd.tenant.measure.measure_guest` of these same inputs,
    computed beforehand (the part of a seal no layout enters; a mismatch is a ValueError).

    Raises ChainError if the layout's chain does not lead to ``root_cert``,
    LayoutError/LayoutSizeError if the layout does not fit the guest.
    """
    info: PlatformCertInfo = verify_chain(layout.platform_chain_pem, load_root(root_cert))
    if layout.memory_size != memory_size:
        raise SealError(f"the layout is for a {layout.memory_size}-byte guest, but the guest to seal has "
                        f"{memory_size} bytes", "seal with the memory size the host allocated for")
    where: LayoutPlan = plan(layout)
    if measured is None:
        measured = measure_guest(kernel, initrd, cmdline, memory_size, policy, exposed_register_mask)
    elif not measured.matches(kernel, initrd, cmdline, memory_size, policy, exposed_register_mask):
        raise ValueError("seal: the measured guest was built from other inputs")
    image, vcpu = measured.image, measured.vcpu
    keyid = layout.keyid

    n_guest = memory_size // PAGE_SIZE
    gpas = np.arange(n_guest, dtype=np.uint64) * np.uint64(PAGE_SIZE)
    guest_hpas = np.array(where.guest, dtype=np.uint64)
    perms = np.full(n_guest, GUEST_PERMS, dtype=np.uint64)
    eptp, tables = build_ept_arrays(gpas, guest_hpas, perms, where.ept)
    vmcs = tenant_vmcs(vcpu, policy, ept_pointer=eptp, save_area_hpa=where.save,
                       exposed_register_mask=exposed_register_mask)
    vmcs_page = vmcs.pack()

    measurement = measured.measurement     # guest state only: no host-chosen field enters it
    verifiable = [(where.vmcs, vmcs_page), *tables.items()]
    hv_digest = host_verifiable_digest(verifiable)
    ept_digest = mapping_digest_arrays(gpas, guest_hpas, perms)

    key = os.urandom(DOMAIN_KEY_SIZE)
    image_gpas = np.array(sorted(image), dtype=np.uint64)
    image_index = (image_gpas // np.uint64(PAGE_SIZE)).astype(np.int64)
    control_hpas = np.array([where.vmcs, where.save, *tables], dtype=np.uint64)
    control_plain = vmcs_page + bytes(PAGE_SIZE) + b"".join(tables.values())
    n_control = control_hpas.size
    # The page records as the bundle holds them: VMCS, SAVE, the EPT tables, then IMAGE pages.
    records = np.zeros(n_control + image_gpas.size, dtype=PAGE_RECORD_DTYPE)
    control, encrypted = records[:n_control], records[n_control:]
    control["hpa"], control["gpa"] = control_hpas, NO_GPA
    control["type"] = [PageType.VMCS, PageType.SAVE] + [PageType.EPT] * len(tables)
    control["flags"] = [FLAG_HOST_VERIFIABLE, 0] + [FLAG_HOST_VERIFIABLE] * len(tables)
    encrypted["hpa"], encrypted["gpa"] = guest_hpas[image_index], image_gpas
    encrypted["type"], encrypted["perms"] = PageType.IMAGE, GUEST_PERMS
    with MemoryEncryptionEngine(key, mask_cache_bytes=0) as mee:   # one pass: no mask cache
        _encrypt(mee, keyid, control_hpas, control_plain, control)
        _encrypt(mee, keyid, encrypted["hpa"], b"".join(image[g] for g in image_gpas.tolist()), encrypted)
    zero_index = np.ones(n_guest, dtype=bool)
    zero_index[image_index] = False
    zero = np.zeros(int(np.count_nonzero(zero_index)), dtype=ZERO_RECORD_DTYPE)
    zero["hpa"], zero["gpa"], zero["perms"] = guest_hpas[zero_index], gpas[zero_index], GUEST_PERMS

    manifest = BundleManifest(
        platform_id=info.platform_id, policy=policy, measurement=measurement, host_data=layout.host_data,
        memory_size=memory_size, keyid=keyid, host_verifiable_digest=hv_digest,
        ept_mapping_digest=ept_digest,
        info={"kernel_sha256": measured.kernel_sha256,
              "initrd_sha256": measured.initrd_sha256,
              "cmdline": cmdline,
              "platform": "EMULATED" if info.emulated else "hardware"})
    bundle = Bundle(manifest, wrap_key(key, info.kak_public_key, policy, layout.host_data),
                    PageRecords(records), ZeroRecords(zero))
    secret = TenantSecret(key=key, measurement=measurement, policy=policy, keyid=keyid,
                          platform_id=info.platform_id, host_data=layout.host_data,
                          platform_emulated=info.emulated)
    return bundle, secret
