"""A tenant written only from docs/agent-protocol.md talks to the real agent.

The agent runs in-process with a fake platform on its guest port, as in
test_session.py (real signed reports, the tenant authority key derived from the
domain key).  The client in independent_tenant.py shares no code with the agent
or with qemu-kd's tenant, so this checks the document as much as the code.
"""

from __future__ import annotations

import base64
import os
import socket
import struct
import threading

import independent_tenant as doc
import pytest

from guest_agent.agent import Agent, LineChannel
from qemu_kd.crypto.authority import tenant_authority_key as platform_authority_key
from qemu_kd.formats.policy import Policy
from qemu_kd.platform.attestation import sign_report
from qemu_kd.platform.identity import PlatformIdentity, RootCA
from qemu_kd.qemu.guestport import GuestPortServer

MEASUREMENT = os.urandom(48)
POLICY_BYTES = struct.pack("<HHI", 1, 0, 0)        # docs/formats.md §2: version 1, no DEBUG


@pytest.fixture(scope="module")
def identity():
    root = RootCA.create_throwaway()
    return root, PlatformIdentity.create_throwaway(root)


@pytest.fixture
def agent(identity):
    """The real agent on one end of a socket pair; the test holds the other end (the host's)."""
    root, ident = identity
    domain_key = os.urandom(64)
    policy = Policy.unpack(POLICY_BYTES)

    def report(req):
        rep = sign_report(ident, policy=policy, measurement=MEASUREMENT,
                          report_data=bytes.fromhex(req["report_data"]), host_data=b"", keyid=3)
        return {"report": base64.b64encode(rep.pack()).decode()}

    handlers = {"info": lambda req: {"protected": True, "keyid": 3, "policy_flags": policy.flags,
                                     "measurement": MEASUREMENT.hex()},
                "tenant-key": lambda req: {"key": platform_authority_key(domain_key).hex()},
                "report": report,
                "derive-key": lambda req: {"key": "cd" * 32}}
    host, guest = socket.socketpair()
    plat, gport = socket.socketpair()
    server = GuestPortServer(plat, handlers)
    server.start()
    a = Agent(LineChannel(guest.fileno()), LineChannel(gport.fileno()))
    a.learn_identity()
    thread = threading.Thread(target=a.serve, daemon=True)
    thread.start()
    yield doc.SharedChannel(host), domain_key, ident.chain_pem(), root.certificate_pem
    host.close()
    thread.join(timeout=5)
    server.stop()
    for s in (guest, plat, gport):
        s.close()


def test_a_tenant_written_from_the_document_does_its_work(agent, tmp_path):
    channel, domain_key, chain_pem, root_pem = agent
    ready = channel.wait_ready()
    assert ready["protected"] is True and ready["debug"] is False

    # The host-facing surface is as documented, and refusals are counted.
    with pytest.raises(doc.ProtocolFailure, match="serves the host only attest, control, ping, poweroff, session"):
        channel.call("exec", argv=["id"])
    assert channel.call("ping") == {"pong": True, "refused": 1}

    # The documented K_auth is the platform's.
    assert doc.tenant_authority_key(domain_key) == platform_authority_key(domain_key)

    s = doc.attest_and_open(channel, domain_key=domain_key, chain_pem=chain_pem, root_pem=root_pem,
                            measurement=MEASUREMENT, policy=POLICY_BYTES)
    rc, out, err = s.exec(["echo", "hello"])
    assert (rc, out, err) == (0, b"hello\n", b"")

    path = str(tmp_path / "small")
    s.put_file(path, b"tenant bytes\x00\xff")
    assert s.get_file(path) == b"tenant bytes\x00\xff"
    assert s.call("ping")["keyid"] == 3
    assert (s.send_seq, s.recv_seq) == (4, 4)


def test_the_documented_binding_rejects_a_substituted_key(agent):
    channel, _domain_key, chain_pem, root_pem = agent
    channel.wait_ready()
    nonce = os.urandom(16)
    answer = channel.call("attest", nonce=nonce.hex())
    report = base64.b64decode(answer["report"])
    agent_public = bytes.fromhex(answer["public_key"])
    assert report[0xB0:0xF0] == doc.report_data_for(nonce, agent_public) == bytes.fromhex(answer["report_data"])
    other = os.urandom(97)
    with pytest.raises(doc.ProtocolFailure, match="does not bind"):
        doc.verify_report(report, chain_pem, root_pem, measurement=MEASUREMENT, policy=POLICY_BYTES,
                          nonce=nonce, agent_public=other)


def test_the_document_s_sequence_rules_hold(agent):
    """A frame replayed by the host is refused; the tenant's next frame still goes through."""
    channel, domain_key, chain_pem, root_pem = agent
    channel.wait_ready()
    s = doc.attest_and_open(channel, domain_key=domain_key, chain_pem=chain_pem, root_pem=root_pem,
                            measurement=MEASUREMENT, policy=POLICY_BYTES)
    plain = b'{"op":"ping"}'
    head = doc.header(doc.DATA_T2G, s.session_id, 0, len(plain) + 16)
    frame = head + s._t2g.encrypt(doc.gcm_nonce(doc.DATA_T2G, 0), plain, head)
    s._relay(frame)
    s.send_seq = s.recv_seq = 1
    with pytest.raises(doc.ProtocolFailure, match="not the expected 1"):
        s._relay(frame)
    assert s.exec(["true"])[0] == 0
