"""Eight protected domains at once on one platform, each answering and attesting with its own KeyID."""

from __future__ import annotations

import os

import pytest

import qemu_kd

DOMAINS = 8
GUEST_MEMORY = "128M"     # the test's guests are small; scripts/bench-scale runs 256 MiB ones


@pytest.mark.qemu
def test_eight_protected_domains_on_one_platform():
    with qemu_kd.Platform(accel="tcg", memory="2G") as platform:
        domains = []
        try:
            for _ in range(DOMAINS):
                domains.append(platform.launch(memory=GUEST_MEMORY))
            keyids = [d.keyid for d in domains]
            assert len(set(keyids)) == DOMAINS
            # All of them up at the same time: each answers and attests now, after the last launch.
            for index, dom in enumerate(domains):
                result = dom.exec(["sh", "-c", f"echo domain-{index}"], timeout=60)
                assert result.ok and result.stdout == f"domain-{index}\n".encode()
                att = dom.attest(os.urandom(32))
                assert att.verified.keyid == dom.keyid
                assert att.verified.measurement == dom.measurement
        finally:
            for dom in domains:
                dom.destroy()
