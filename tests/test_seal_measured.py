"""A seal that starts before the layout: ``measure_guest`` first, ``seal(..., measured=)`` once
the host has allocated, gives byte for byte the bundle a seal from scratch gives (no QEMU)."""

import importlib

import pytest

from synthetic import SYNTH_CMDLINE, SYNTH_INITRD, SYNTH_KERNEL, fake_bzimage

from qemu_kd import tenant
from qemu_kd.formats.layout import HostLayout, pages_needed
from qemu_kd.formats.policy import Policy
from qemu_kd.platform.identity import PlatformIdentity, RootCA
from qemu_kd.tenant.measure import measure_guest

MiB = 1 << 20
MEM = 64 * MiB
PAGE = 4096
KERNEL, INITRD, CMDLINE = SYNTH_KERNEL, SYNTH_INITRD, SYNTH_CMDLINE
KEY = bytes(range(64))
seal_module = importlib.import_module("qemu_kd.tenant.seal")


@pytest.fixture(scope="module")
def platform():
    root = RootCA.create_throwaway()
    identity = PlatformIdentity.create_throwaway(root)
    layout = HostLayout(7, MEM, [0x400000 + PAGE * i for i in range(pages_needed(MEM))], b"hd",
                        identity.chain_pem())
    return root, layout


def sealed_bytes(monkeypatch, platform, **kwargs) -> bytes:
    root, layout = platform
    # A fixed domain key, so that two seals compare (the wrapped key, random, is left out).
    monkeypatch.setattr(seal_module.os, "urandom", lambda n: KEY[:n])
    bundle, secret = tenant.seal(KERNEL, INITRD, CMDLINE, MEM, Policy.make(), layout, root.certificate,
                                 exposed_register_mask=0x3, **kwargs)
    return bundle.manifest.pack() + b"".join(p.pack() for p in bundle.pages) + \
        b"".join(z.pack() for z in bundle.zero_pages) + secret.pack()


def test_a_seal_from_a_measured_guest_is_the_seal_from_scratch(monkeypatch, platform):
    measured = measure_guest(KERNEL, INITRD, CMDLINE, MEM, Policy.make(), 0x3)
    assert measured.measurement == tenant.measure(KERNEL, INITRD, CMDLINE, MEM, Policy.make(), 0x3)
    assert sealed_bytes(monkeypatch, platform, measured=measured) == sealed_bytes(monkeypatch, platform)


@pytest.mark.parametrize("change", ["kernel", "initrd", "cmdline", "memory", "policy", "mask"])
def test_a_measured_guest_of_other_inputs_is_refused(platform, change):
    root, layout = platform
    args = {"kernel": KERNEL, "initrd": INITRD, "cmdline": CMDLINE, "memory": MEM,
            "policy": Policy.make(), "mask": 0x3}
    args[change] = {"kernel": fake_bzimage(payload=b"\x90" * 4000), "initrd": INITRD + b"\0",
                    "cmdline": CMDLINE + " x", "memory": MEM + 2 * MiB,
                    "policy": Policy.make(debug=True), "mask": 0x1}[change]
    measured = measure_guest(args["kernel"], args["initrd"], args["cmdline"], args["memory"], args["policy"],
                             args["mask"])
    with pytest.raises(ValueError, match="other inputs"):
        tenant.seal(KERNEL, INITRD, CMDLINE, MEM, Policy.make(), layout, root.certificate,
                    exposed_register_mask=0x3, measured=measured)
