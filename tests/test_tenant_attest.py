"""The tenant trusts the platform's certificate chain only once it leads to its root.

A host may hand the tenant a layout, and later an attestation, that come with a chain
from another root (a platform of its own making): the launch fails with the chain error
before the host is asked to load anything, and an attestation over such a chain fails
before the tenant sends a single session frame.
"""

from __future__ import annotations

import base64
import os
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from synthetic import SYNTH_CMDLINE, SYNTH_INITRD, SYNTH_KERNEL

from guest_agent.session import report_data_for
from qemu_kd.api import GuestImage, Platform
from qemu_kd.formats.certs import ChainError
from qemu_kd.formats.layout import HostLayout, pages_needed
from qemu_kd.formats.policy import Policy
from qemu_kd.formats.report import MeasurementMismatch
from qemu_kd.platform.attestation import sign_report
from qemu_kd.platform.identity import PlatformIdentity, RootCA
from qemu_kd.tenant.session import attest

MiB = 1 << 20
MEM = 64 * MiB
MEASUREMENT = bytes(range(48))
POLICY = Policy.make()


@pytest.fixture(scope="module")
def root():
    return RootCA.create_throwaway()


@pytest.fixture(scope="module")
def foreign():
    """A platform whose chain leads to another root than the tenant's."""
    return PlatformIdentity.create_throwaway(RootCA.create_throwaway())


def pem(root: RootCA) -> bytes:
    return root.certificate.public_bytes(serialization.Encoding.PEM)


class RecordingHost:
    """The host side of a launch, as the tenant sees it: it records every request it gets.

    With an ``identity``, it loads, verifies and launches (as far as the tenant can tell)
    and its agent answers ``attest`` with a report that identity signs over ``measurement``."""

    def __init__(self, layout: HostLayout, identity: PlatformIdentity | None = None,
                 measurement: bytes = MEASUREMENT):
        self.layout, self.identity, self.measurement = layout, identity, measurement
        self.requests: list[str] = []
        self.sock = object()

    def wait_ready(self) -> None:
        pass

    def call(self, cmd: str, **args) -> dict:
        self.requests.append(cmd)
        answers = {"allocate": {"layout": self.layout.pack().decode()}, "destroy": {}}
        if self.identity is not None:
            answers.update({"load": {}, "verify": {"checks": []}, "launch": {"endpoints": {}}})
        if cmd not in answers:
            raise AssertionError(f"the tenant asked the host for {cmd}")
        return answers[cmd]

    def agent(self, cmd: str, **args) -> dict:
        self.requests.append(f"agent {cmd}")
        if self.identity is None or cmd != "attest":
            raise AssertionError(f"the tenant sent the agent {cmd}")
        agent_public = b"\x04" + os.urandom(96)
        report = sign_report(self.identity, policy=POLICY, measurement=self.measurement,
                             report_data=report_data_for(bytes.fromhex(args["nonce"]), agent_public),
                             host_data=b"", keyid=self.layout.keyid)
        return {"report": base64.b64encode(report.pack()).decode(), "public_key": agent_public.hex()}

    def stop(self) -> None:
        self.requests.append("stop")


class HostedPlatform(Platform):
    """A Platform whose daemon and host VMM are the test's."""

    def __init__(self, host: RecordingHost, state: Path):
        super().__init__()
        self.host, self.state = host, state
        self.workdir, self.socket = state, state / "p.sock"

    @property
    def state_dir(self) -> Path:
        return self.state

    def _await_platform(self) -> None:
        pass

    def _take_host(self) -> RecordingHost:
        return self.host


def test_a_layout_with_a_chain_from_another_root_fails_the_launch_before_anything_is_loaded(
        tmp_path, root, foreign):
    (tmp_path / "root-ca.crt").write_bytes(pem(root))
    hpas = [0x200000 + 4096 * i for i in range(pages_needed(MEM))]
    host = RecordingHost(HostLayout(5, MEM, hpas, b"", foreign.chain_pem()))
    platform = HostedPlatform(host, tmp_path)
    image = GuestImage(SYNTH_KERNEL, SYNTH_INITRD, tmp_path / "kernel")
    with pytest.raises(ChainError) as err:
        platform._launch_protected(None, image, SYNTH_CMDLINE, MEM, False, 30.0)
    assert err.value.exit_code == 4
    assert host.requests == ["allocate", "destroy", "stop"]


def test_a_launched_guest_whose_report_fails_a_check_gets_no_session_frame(tmp_path, root):
    """The launch attests the guest and opens no session with it: the report (well signed, by a
    platform of the tenant's root) is over another measurement than the sealed one."""
    (tmp_path / "root-ca.crt").write_bytes(pem(root))
    own = PlatformIdentity.create_throwaway(root)
    hpas = [0x200000 + 4096 * i for i in range(pages_needed(MEM))]
    host = RecordingHost(HostLayout(5, MEM, hpas, b"", own.chain_pem()), own, measurement=bytes(48))
    platform = HostedPlatform(host, tmp_path)
    image = GuestImage(SYNTH_KERNEL, SYNTH_INITRD, tmp_path / "kernel")
    with pytest.raises(MeasurementMismatch):
        platform._launch_protected(None, image, SYNTH_CMDLINE, MEM, False, 30.0)
    assert host.requests == ["allocate", "load", "verify", "launch", "agent attest", "destroy", "stop"]


def test_an_attestation_over_a_chain_from_another_root_fails_before_any_session_frame(root, foreign):
    """The foreign platform's report is well signed and made for the tenant's nonce and the
    agent's key: only the chain gives it away, and the tenant stops there."""
    nonce = os.urandom(32)
    agent_public = b"\x04" + os.urandom(96)
    report = sign_report(foreign, policy=POLICY, measurement=MEASUREMENT,
                         report_data=report_data_for(nonce, agent_public), host_data=b"", keyid=1)
    sent: list[str] = []

    def relay(cmd: str, wait: float = 60.0, **args) -> dict:
        sent.append(cmd)
        assert cmd == "attest", "the tenant sent a session frame over an unverified report"
        return {"report": base64.b64encode(report.pack()).decode(), "public_key": agent_public.hex()}

    with pytest.raises(ChainError) as err:
        attest(relay, root_pem=pem(root), chain_pem=foreign.chain_pem(), measurement=MEASUREMENT,
               policy=POLICY, host_data=None, nonce=nonce)
    assert "another root" in err.value.message or "not issued by the trusted root" in err.value.message
    assert sent == ["attest"]


def test_the_same_attestation_over_the_tenants_own_chain_passes(root):
    """The check above fails on the chain alone: the same report from a platform of the
    tenant's root passes."""
    own = PlatformIdentity.create_throwaway(root)
    nonce = os.urandom(32)
    agent_public = b"\x04" + os.urandom(96)
    report = sign_report(own, policy=POLICY, measurement=MEASUREMENT,
                         report_data=report_data_for(nonce, agent_public), host_data=b"", keyid=1)

    def relay(cmd: str, wait: float = 60.0, **args) -> dict:
        return {"report": base64.b64encode(report.pack()).decode(), "public_key": agent_public.hex()}

    att = attest(relay, root_pem=pem(root), chain_pem=own.chain_pem(), measurement=MEASUREMENT,
                 policy=POLICY, host_data=None, nonce=nonce)
    assert att.report.measurement == MEASUREMENT
