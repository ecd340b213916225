"""The tenant session against an agent run in-process, with the host as an active adversary.

The agent's guest port is answered the way the platform answers it (real signed
reports, the tenant authority key derived from the domain key).  The "host" is
the test: it holds the shared channel and tries everything on it.  The same
agent and session run inside real guests in test_guest_trust.py.
"""

from __future__ import annotations

import base64
import os
import socket
import threading
from dataclasses import dataclass

import pytest

from guest_agent import session as wire
from guest_agent.agent import Agent, LineChannel
from qemu_kd.channel.agent_client import AgentClient
from qemu_kd.common.errors import GuestError
from qemu_kd.crypto.authority import tenant_authority_key
from qemu_kd.formats.policy import Policy
from qemu_kd.formats.report import ReportDataMismatch
from qemu_kd.platform.attestation import sign_report
from qemu_kd.platform.identity import PlatformIdentity, RootCA
from qemu_kd.qemu.guestport import GuestPortServer
from qemu_kd.tenant.session import GuestCommandError, SessionRefused, TenantSession, attest

MEASUREMENT = bytes(range(48))
POLICY = Policy.make()


@pytest.fixture(scope="module")
def identity():
    root = RootCA.create_throwaway()
    return root, PlatformIdentity.create_throwaway(root)


@dataclass
class Guest:
    client: AgentClient
    agent: Agent
    domain_key: bytes
    root_pem: bytes
    chain_pem: bytes
    platform_calls: list

    def relay(self, cmd, wait=30.0, **args):
        return self.client.call(cmd, wait=wait, **args)

    def attest(self, **kw):
        return attest(self.relay, root_pem=self.root_pem, chain_pem=self.chain_pem,
                      measurement=MEASUREMENT, policy=POLICY, host_data=None, **kw)

    def open(self, domain_key=None):
        return TenantSession(self.relay, self.attest(), domain_key or self.domain_key)

    def frame(self, data: bytes) -> bytes:
        return base64.b64decode(self.relay("session", frame=base64.b64encode(data).decode())["frame"])


def start_guest(identity, tmp_path, keyid=1):
    root, ident = identity
    domain_key = os.urandom(64)
    calls = []

    def report(req):
        calls.append("report")
        rep = sign_report(ident, policy=POLICY, measurement=MEASUREMENT,
                          report_data=bytes.fromhex(req["report_data"]), host_data=b"", keyid=keyid)
        return {"report": base64.b64encode(rep.pack()).decode()}

    handlers = {
        "info": lambda req: {"protected": True, "keyid": keyid, "policy_flags": POLICY.flags,
                             "measurement": MEASUREMENT.hex()},
        "tenant-key": lambda req: {"key": tenant_authority_key(domain_key).hex()},
        "report": report,
        "derive-key": lambda req: {"key": ("ab" * 32)},
    }
    host, guest = socket.socketpair()
    plat, gport = socket.socketpair()
    server = GuestPortServer(plat, handlers)
    server.start()
    agent = Agent(LineChannel(guest.fileno()), LineChannel(gport.fileno()))
    agent.learn_identity()
    thread = threading.Thread(target=agent.serve, daemon=True)
    thread.start()
    client = AgentClient(host)
    client.wait_ready(timeout=5)
    sockets = (host, guest, plat, gport)
    return Guest(client, agent, domain_key, root.certificate_pem, ident.chain_pem(), calls), \
        (sockets, thread, server)


def running_guest(identity, tmp_path, keyid):
    g, (sockets, thread, server) = start_guest(identity, tmp_path, keyid=keyid)
    yield g
    sockets[0].close()
    thread.join(timeout=5)
    server.stop()
    for s in sockets[1:]:
        s.close()


@pytest.fixture
def guest(identity, tmp_path):
    yield from running_guest(identity, tmp_path, keyid=1)


@pytest.fixture
def second_guest(identity, tmp_path):
    yield from running_guest(identity, tmp_path, keyid=2)


def test_tenant_session_does_everything_the_tenant_needs(guest, tmp_path):
    s = guest.open()
    res = s.exec(shell="echo out; echo err >&2; cat; exit 3", stdin=b"in\n")
    assert (res["rc"], res["stdout"], res["stderr"]) == (3, b"out\nin\n", b"err\n")
    assert s.exec(["env"], env={"KD_TEST": "yes"})["stdout"].count(b"KD_TEST=yes") == 1
    assert s.exec(["sleep", "5"], timeout=0.3)["timed_out"] is True
    blob = os.urandom(3 * (1 << 20) // 2)            # crosses the 1 MiB chunking
    path = str(tmp_path / "blob")
    assert s.put_file(path, blob) == len(blob)
    assert s.get_file(path) == blob
    secret_path = tmp_path / "secret"
    assert s.put_secret(str(secret_path), b"s3cret") == 6
    assert secret_path.read_bytes() == b"s3cret" and secret_path.stat().st_mode & 0o777 == 0o600
    with pytest.raises(GuestCommandError, match="only be written under"):
        s.put_secret("/etc/kd-secret", b"x")         # secrets land only under /run or /tmp
    assert s.derive_key("disk") == bytes.fromhex("ab" * 32)
    raw = s.report(b"\x42" * 64)
    assert raw[0xB0:0xF0] == b"\x42" * 64           # report_data chosen by the tenant, in-session only
    assert s.ping()["protected"] is True


def test_host_facing_surface_is_minimal_and_counts_refusals(guest):
    for cmd, args in [("exec", {"argv": ["id"]}), ("put_secret", {"path": "/run/x"}),
                      ("derive_key", {"label": "disk"}), ("report", {"report_data": "00" * 64}),
                      ("get_file", {"path": "/etc/passwd"}), ("shell", {}), ("__init__", {}),
                      ("tenant_exec", {"argv": ["id"]}), ("session_request", {})]:
        with pytest.raises(GuestError, match="serves the host only"):
            guest.client.call(cmd, **args)
    assert guest.client.call("ping")["refused"] == 9
    ready = guest.client.ready
    assert ready["protected"] is True and ready["debug"] is False


def test_attest_never_signs_caller_chosen_report_data(guest):
    nonce = os.urandom(32)
    answer = guest.client.call("attest", nonce=nonce.hex(), report_data="41" * 64)
    report = base64.b64decode(answer["report"])
    agent_public = bytes.fromhex(answer["public_key"])
    assert report[0xB0:0xF0] == wire.report_data_for(nonce, agent_public)
    assert report[0xB0:0xF0] != b"\x41" * 64


def test_report_interception_fails_at_the_tenant(guest):
    """The host swaps in its own key: the genuine report does not bind it."""
    host_public = wire.PycaCrypto().generate().public

    def intercepting_relay(cmd, wait=30.0, **args):
        answer = guest.client.call(cmd, wait=wait, **args)
        if cmd == "attest":
            answer = {**answer, "public_key": host_public.hex()}
        return answer

    with pytest.raises(ReportDataMismatch):
        attest(intercepting_relay, root_pem=guest.root_pem, chain_pem=guest.chain_pem,
               measurement=MEASUREMENT, policy=POLICY, host_data=None)


def test_a_host_opened_session_is_refused(guest):
    with pytest.raises(SessionRefused, match="not authorised by this domain's tenant"):
        guest.open(domain_key=os.urandom(64))
    with pytest.raises(GuestError, match="another attestation"):
        guest.frame(wire.Frame(wire.OPEN, bytes(16), 0, bytes(145)).pack())
    with pytest.raises(GuestError, match="no session is open"):
        guest.frame(wire.Frame(wire.DATA_T2G, bytes(16), 0, bytes(32)).pack())
    assert guest.open().exec(["true"])["rc"] == 0     # the real tenant still gets in


def test_replayed_reordered_truncated_and_reflected_frames_are_refused(guest):
    s = guest.open()
    sent = []
    real = s._relay

    def recording(cmd, wait=30.0, **args):
        answer = real(cmd, wait=wait, **args)
        if cmd == "session":
            sent.append((base64.b64decode(args["frame"]), base64.b64decode(answer["frame"])))
        return answer

    s._relay = recording
    s.exec(["true"])
    s.exec(["true"])
    (first_req, first_reply), (second_req, _) = sent
    for frame, why in [(first_req, "not the expected"),                  # replay
                       (second_req, "not the expected"),                 # replay of the latest
                       (first_req[:-1], "truncated"),                    # cut short
                       (first_reply, "wrong way"),                       # reflected back
                       (first_req[:40] + bytes([first_req[40] ^ 1]) + first_req[41:], "not the expected"),
                       ]:
        with pytest.raises(GuestError, match=why):
            guest.frame(frame)
    # A frame with the right number but forged contents does not authenticate.
    forged = wire.Frame(wire.DATA_T2G, s._channel.session_id, s._channel.send_seq, bytes(64)).pack()
    with pytest.raises(GuestError, match="does not authenticate"):
        guest.frame(forged)
    # A later frame sent early (reordered) is refused, then the session goes on.
    s._channel.send_seq += 1
    with pytest.raises(SessionRefused, match="not the expected"):
        s.exec(["true"])
    s._channel.send_seq -= 2                           # the refused frame and the skipped number
    assert s.exec(["echo", "still here"])["stdout"] == b"still here\n"


def test_the_open_frame_cannot_be_replayed_or_moved_to_another_domain(guest, second_guest):
    frames = []

    def recording(cmd, wait=30.0, **args):
        if cmd == "session":
            frames.append(base64.b64decode(args["frame"]))
        return guest.client.call(cmd, wait=wait, **args)

    s = TenantSession(recording, guest.attest(), guest.domain_key)
    open_frame, data_frame = frames[0], None
    s.exec(["true"])
    data_frame = frames[1]
    with pytest.raises(GuestError, match="no attestation is waiting"):
        guest.frame(open_frame)                        # one OPEN per attestation
    guest.client.call("attest", nonce=os.urandom(32).hex())
    with pytest.raises(GuestError, match="another attestation"):
        guest.frame(open_frame)                        # stale OPEN for a fresh attestation
    second_guest.client.call("attest", nonce=os.urandom(32).hex())
    with pytest.raises(GuestError, match="another attestation"):
        second_guest.frame(open_frame)                 # spliced into another domain
    second_guest.open().exec(["true"])
    with pytest.raises(GuestError, match="another session"):
        second_guest.frame(data_frame)
    # The first domain's session was never disturbed.
    assert s.exec(["echo", "ok"])["stdout"] == b"ok\n"


def test_malformed_session_input_is_refused_cleanly(guest):
    for junk in ["", "!!!", base64.b64encode(b"KDSF").decode(), base64.b64encode(b"x" * 100).decode(), 7]:
        with pytest.raises(GuestError):
            guest.client.call("session", frame=junk)
    assert guest.client.call("ping")["pong"] is True
