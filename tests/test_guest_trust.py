"""The guest obeys its tenant, not its host: real protected guests, with the host as an active adversary.

A canary reaches the guest through the tenant session.  The test then plays
the host with everything it holds: the shared channel (every agent command,
raw), the console, opening its own session, replaying and splicing the
tenant's frames (into a second domain too), and intercepting the attestation.
Each is refused, the canary is never found in anything the host received, and
the tenant's session keeps working.  With DEBUG the console shell opens, and
the session still stays the tenant's.
"""

from __future__ import annotations

import base64
import hashlib
import os
import socket
import time

import pytest

from guest_agent import session as wire
from qemu_kd.common.errors import GuestError
from qemu_kd.formats.report import ReportDataMismatch
from qemu_kd.tenant.session import SessionRefused, TenantSession, attest

from protected import count_hits, protected_domain

pytestmark = pytest.mark.qemu
CANARY_PATH = "/run/secrets/canary"


@pytest.fixture(scope="module")
def canary():
    return os.urandom(32)


@pytest.fixture(scope="module")
def nodebug(guest_artifacts, tmp_path_factory, canary):
    with protected_domain(tmp_path_factory.mktemp("trust-nodebug"), guest_artifacts) as dom:
        dom.plant_secret(canary, CANARY_PATH)
        yield dom


@pytest.fixture(scope="module")
def debug(guest_artifacts, tmp_path_factory):
    with protected_domain(tmp_path_factory.mktemp("trust-debug"), guest_artifacts, debug=True) as dom:
        yield dom


def console_exchange(dom, text: bytes, linger: float = 3.0) -> bytes:
    """Type on the guest console as the host can, and collect what comes back."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(dom.endpoints["console"])
    sock.settimeout(0.2)
    out = bytearray()
    try:
        sock.sendall(text)
        deadline = time.monotonic() + linger
        while time.monotonic() < deadline:
            try:
                chunk = sock.recv(65536)
            except socket.timeout:
                continue
            if not chunk:
                break
            out += chunk
    finally:
        sock.close()
    return bytes(out)


def test_the_tenant_reaches_its_secret_through_the_session(nodebug, canary):
    s = nodebug.session()
    res = s.exec(["sha256sum", CANARY_PATH])
    assert res["rc"] == 0 and res["stdout"].split()[0].decode() == hashlib.sha256(canary).hexdigest()
    assert s.ping()["protected"] is True and s.ping()["debug"] is False
    key = s.derive_key("disk")
    assert len(key) == 32 and s.derive_key("disk") == key and s.derive_key("other") != key


def test_every_agent_command_on_the_shared_channel_is_refused(nodebug):
    before = nodebug.agent("ping")["refused"]
    attempts = [("exec", {"argv": ["cat", CANARY_PATH]}),
                ("exec", {"argv": ["/bin/sh", "-c", f"cat {CANARY_PATH}"], "timeout": 5}),
                ("put_secret", {"path": CANARY_PATH, "ciphertext": "AAAA"}),
                ("derive_key", {"label": "disk"}), ("derive-key", {"label": "disk"}),
                ("report", {"report_data": "00" * 64}), ("get_file", {"path": CANARY_PATH}),
                ("put_file", {"path": "/init", "data": "AAAA"}), ("tenant_exec", {"argv": ["id"]}),
                ("platform_call", {"command": "tenant-key"}), ("learn_identity", {}), ("shell", {})]
    for cmd, args in attempts:
        with pytest.raises(GuestError, match="serves the host only"):
            nodebug.agent(cmd, **args)
    assert nodebug.agent("ping")["refused"] == before + len(attempts)
    ready = nodebug.vmm.agent.ready
    assert ready["protected"] is True and ready["debug"] is False


def test_console_input_reaches_no_shell(nodebug, canary):
    out = console_exchange(nodebug, b"\r\nid\r\necho kd-$((6*7))\r\ncat /run/secrets/canary\r\n\x03\r\n")
    assert b"kd-42" not in out and b"uid=0" not in out
    assert count_hits([out], canary) == {}


def test_the_host_cannot_open_a_session_of_its_own(nodebug):
    def host_relay(cmd, wait=60.0, **args):
        return nodebug.agent(cmd, wait=wait, **args)

    # A genuine attestation, obtained by the host itself.
    att = attest(host_relay, root_pem=nodebug.root_pem, chain_pem=nodebug.vmm.layout.platform_chain_pem,
                 measurement=nodebug.expected, policy=nodebug.policy, host_data=nodebug.vmm.layout.host_data)
    with pytest.raises(SessionRefused, match="not authorised by this domain's tenant"):
        TenantSession(host_relay, att, os.urandom(64))
    with pytest.raises(GuestError, match="another attestation"):
        nodebug.agent("session", frame=base64.b64encode(
            wire.Frame(wire.OPEN, bytes(16), 0, bytes(145)).pack()).decode())


def test_report_interception_fails_at_the_tenant(nodebug):
    """The host asks for a report itself and hands the tenant its own key: the binding fails."""
    host_public = wire.PycaCrypto().generate().public

    def intercepting(cmd, wait=60.0, **args):
        answer = nodebug.agent(cmd, wait=wait, **args)
        return {**answer, "public_key": host_public.hex()} if cmd == "attest" else answer

    with pytest.raises(ReportDataMismatch):
        attest(intercepting, root_pem=nodebug.root_pem, chain_pem=nodebug.vmm.layout.platform_chain_pem,
               measurement=nodebug.expected, policy=nodebug.policy, host_data=nodebug.vmm.layout.host_data)


def test_replayed_and_spliced_frames_are_refused(nodebug, debug):
    frames = []

    def recording(cmd, wait=60.0, **args):
        if cmd == "session":
            frames.append(base64.b64decode(args["frame"]))
        return nodebug.agent(cmd, wait=wait, **args)

    s = TenantSession(recording, nodebug.attest(), nodebug.secret.key)
    assert s.exec(["true"])["rc"] == 0
    open_frame, data_frame = frames
    for frame, why in [(data_frame, "not the expected"), (open_frame, "no attestation is waiting"),
                       (data_frame[:-3], "truncated")]:
        with pytest.raises(GuestError, match=why):
            nodebug.agent("session", frame=base64.b64encode(frame).decode())
    # Into a second domain (a fresh attestation waiting there, and a tenant session open there).
    debug.agent("attest", nonce=os.urandom(32).hex())
    with pytest.raises(GuestError, match="another attestation"):
        debug.agent("session", frame=base64.b64encode(open_frame).decode())
    assert debug.session().exec(["true"])["rc"] == 0
    with pytest.raises(GuestError, match="another session"):
        debug.agent("session", frame=base64.b64encode(data_frame).decode())
    # The tenant's own session goes on.
    assert s.exec(["echo", "ok"])["stdout"] == b"ok\n"


def test_nothing_the_host_received_holds_the_canary(nodebug, canary):
    received = [*nodebug.received, nodebug.host_memory_view()]
    assert sum(len(chunk) for chunk in received) > nodebug.vmm.layout.memory_size
    assert count_hits(received, canary) == {}
    # The scan finds what is there: this attestation's report_data crossed the shared channel in hex.
    assert count_hits(received, nodebug.session().attestation.report.report_data).get("hex")


def test_debug_opens_the_console_but_not_the_session(debug):
    out = console_exchange(debug, b"\r\necho kd-$((6*7))\r\n")
    assert b"kd-42" in out
    assert debug.vmm.agent.ready["debug"] is True
    with pytest.raises(GuestError, match="serves the host only"):
        debug.agent("exec", argv=["id"])

    def host_relay(cmd, wait=60.0, **args):
        return debug.agent(cmd, wait=wait, **args)

    with pytest.raises(SessionRefused, match="not authorised"):
        TenantSession(host_relay, debug.attest(), os.urandom(64))
