"""The in-guest attestation API in a real protected guest.

A user program in the guest (the ``kd-report`` command, and a Python script
using ``guest_agent.attest_api``) gets a report over a nonce the test chose,
passed in through the tenant session; the tenant verifies it with
``qemu-kd tenant verify-report --secret``: it passes with that nonce and fails
(exit 7) with another.  The host is never served reports, keys or the chain.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from protected import protected_domain
from qemu_kd.common.errors import GuestError

pytestmark = pytest.mark.qemu

QEMU_KD = [sys.executable, "-m", "qemu_kd.cli.main"]

USER_PROGRAM = b"""\
import sys
from guest_agent.attest_api import derive_key, get_report

got = get_report(bytes.fromhex(sys.argv[1]))
with open("/tmp/prog-report.bin", "wb") as f:
    f.write(got.report)
with open("/tmp/prog-chain.pem", "wb") as f:
    f.write(got.chain_pem)
print(derive_key("disk").hex())
"""


@pytest.fixture(scope="module")
def dom(guest_artifacts, tmp_path_factory):
    with protected_domain(tmp_path_factory.mktemp("attest-api"), guest_artifacts) as d:
        yield d


def verify(tmp_path, dom, report: bytes, chain: bytes, report_data: str) -> subprocess.CompletedProcess:
    paths = {name: tmp_path / name for name in ("report.bin", "chain.pem", "root.crt", "tenant.secret")}
    paths["report.bin"].write_bytes(report)
    paths["chain.pem"].write_bytes(chain)
    paths["root.crt"].write_bytes(dom.root_pem)
    dom.secret.write(paths["tenant.secret"])
    return subprocess.run([*QEMU_KD, "tenant", "verify-report", "--report", str(paths["report.bin"]),
                           "--chain", str(paths["chain.pem"]), "--root", str(paths["root.crt"]),
                           "--secret", str(paths["tenant.secret"]), "--report-data", report_data,
                           "--allow-emulated"], capture_output=True, text=True, timeout=120)


def test_kd_report_over_the_tenants_nonce_verifies(dom, tmp_path):
    session = dom.session()
    nonce = os.urandom(32).hex()
    res = session.exec(["kd-report", "--report-data", nonce, "--out", "/tmp/r.bin", "--chain-out", "/tmp/c.pem"])
    assert res["rc"] == 0, res["stderr"]
    report, chain = session.get_file("/tmp/r.bin"), session.get_file("/tmp/c.pem")
    assert len(report) == 352 and chain.startswith(b"-----BEGIN CERTIFICATE-----")
    ok = verify(tmp_path, dom, report, chain, nonce)
    assert ok.returncode == 0, ok.stderr
    other = verify(tmp_path, dom, report, chain, os.urandom(32).hex())
    assert other.returncode == 7, other.stderr

    listed = json.loads(session.exec(["kd-report", "--report-data", nonce, "--json"])["stdout"])
    assert listed["report_data"] == nonce + "00" * 32 and listed["chain_pem"] == chain.decode()


def test_a_user_program_uses_the_library(dom, tmp_path):
    session = dom.session()
    session.put_file("/tmp/prog.py", USER_PROGRAM)
    nonce = os.urandom(64).hex()
    res = session.exec(["python3", "/tmp/prog.py", nonce])
    assert res["rc"] == 0, res["stderr"]
    assert bytes.fromhex(res["stdout"].decode().strip()) == session.derive_key("disk")
    cli_key = session.exec(["kd-derive-key", "disk"])
    assert cli_key["rc"] == 0 and cli_key["stdout"] == res["stdout"]
    ok = verify(tmp_path, dom, session.get_file("/tmp/prog-report.bin"), session.get_file("/tmp/prog-chain.pem"),
                nonce)
    assert ok.returncode == 0, ok.stderr


def test_the_host_is_not_served(dom):
    for cmd, args in (("report", {"report_data": "00" * 64}), ("derive-key", {"label": "disk"}),
                      ("certificates", {})):
        with pytest.raises(GuestError, match="serves the host only"):
            dom.agent(cmd, **args)
