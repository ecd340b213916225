"""The in-guest attestation API against an agent run in-process.

The agent's guest port is answered the way the platform answers it (real
signed reports, the real certificate chain); a "guest program" asks the agent
on its local socket through guest_agent.attest_api and the tenant verifies
what it got.  The same API runs inside a real protected guest in
test_guest_attest_api.py.
"""

from __future__ import annotations

import base64
import json
import os
import socket

import pytest

from guest_agent import attest_api
from guest_agent.agent import HOST_COMMANDS, Agent, LineChannel, serve_local_api
from guest_agent.local_api import LocalApiError, ask
from qemu_kd.formats.report import ReportDataMismatch
from qemu_kd.platform.attestation import sign_report
from qemu_kd.qemu.guestport import GuestPortServer
from qemu_kd.tenant.verify import check_report
from tests import test_session

# The session tests' throwaway platform (root CA, identity), measurement and policy.
MEASUREMENT, POLICY, identity = test_session.MEASUREMENT, test_session.POLICY, test_session.identity


@pytest.fixture
def guest_socket(identity, tmp_path):
    """A protected agent's local socket, its guest port answered as the platform answers it."""
    _root, ident = identity

    def report(req):
        rep = sign_report(ident, policy=POLICY, measurement=MEASUREMENT,
                          report_data=bytes.fromhex(req["report_data"]), host_data=b"", keyid=3)
        return {"report": base64.b64encode(rep.pack()).decode()}

    handlers = {
        "info": lambda req: {"protected": True, "keyid": 3, "policy_flags": POLICY.flags,
                             "measurement": MEASUREMENT.hex()},
        "report": report,
        "certificates": lambda req: {"chain_pem": ident.chain_pem().decode()},
        "derive-key": lambda req: {"key": ident.sealing_key(MEASUREMENT, POLICY.pack(),
                                                            req["label"].encode()).hex()},
    }
    host, guest = socket.socketpair()
    plat, gport = socket.socketpair()
    server = GuestPortServer(plat, handlers)
    server.start()
    agent = Agent(LineChannel(guest.fileno()), LineChannel(gport.fileno()))
    agent.learn_identity()
    assert agent.protected is True
    path = str(tmp_path / "run" / "agent.sock")
    assert serve_local_api(agent, path) is not None
    yield path
    server.stop()
    for s in (host, guest, plat, gport):
        s.close()


def test_a_program_gets_a_report_over_its_own_data_that_the_tenant_verifies(identity, guest_socket):
    root, _ = identity
    nonce = os.urandom(32)
    got = attest_api.get_report(nonce, guest_socket)
    assert got.report_data == nonce + bytes(32) and len(got.report) == 352
    verified = check_report(got.report, root.certificate, got.chain_pem, measurement=MEASUREMENT,
                            policy=POLICY, report_data=nonce, allow_emulated=True)
    assert verified.report_data == got.report_data and verified.keyid == 3
    with pytest.raises(ReportDataMismatch):
        check_report(got.report, root.certificate, got.chain_pem, measurement=MEASUREMENT, policy=POLICY,
                     report_data=os.urandom(32), allow_emulated=True)


def test_sealing_keys_per_label(guest_socket):
    key = attest_api.derive_key("disk", guest_socket)
    assert len(key) == 32 and attest_api.derive_key("disk", guest_socket) == key
    assert attest_api.derive_key("other", guest_socket) != key


def test_the_commands(identity, guest_socket, tmp_path, capsys):
    root, _ = identity
    out, chain = tmp_path / "r.bin", tmp_path / "c.pem"
    assert attest_api.report_main(["--report-data", "ab" * 64, "--out", str(out), "--chain-out", str(chain)],
                                  guest_socket) == 0
    check_report(out.read_bytes(), root.certificate, chain.read_bytes(), measurement=MEASUREMENT,
                 policy=POLICY, report_data=bytes.fromhex("ab" * 64), allow_emulated=True)
    capsys.readouterr()
    assert attest_api.report_main(["--report-data", "0x01", "--json"], guest_socket) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["report_data"] == "01" + "00" * 63 and len(base64.b64decode(printed["report"])) == 352
    assert printed["chain_pem"].startswith("-----BEGIN CERTIFICATE-----")

    assert attest_api.derive_key_main(["disk"], guest_socket) == 0
    assert bytes.fromhex(capsys.readouterr().out.strip()) == attest_api.derive_key("disk", guest_socket)

    for bad in (["--report-data", "zz"], ["--report-data", "00" * 65]):
        assert attest_api.report_main(bad, guest_socket) == 1
        err = capsys.readouterr().err
        assert err.startswith("kd-report: ") and err.count("\n") == 1
    assert attest_api.report_main(["--report-data", "01"], str(tmp_path / "none.sock")) == 1
    assert "cannot reach the agent" in capsys.readouterr().err


def test_the_local_socket_refuses_what_it_does_not_serve(guest_socket):
    with pytest.raises(LocalApiError, match="serves only derive-key, hypercall, report"):
        ask({"op": "tenant-key"}, 10, guest_socket)
    with pytest.raises(LocalApiError, match="64 bytes"):
        ask({"op": "report", "report_data": "00" * 16}, 10, guest_socket)


def test_the_host_is_never_served_reports_or_keys():
    assert not {"report", "derive-key", "derive_key", "certificates"} & HOST_COMMANDS
