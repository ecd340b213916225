"""The Python API (qemu_kd.api, docs/api.md): one protected and one plain domain for the module."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

import qemu_kd
from qemu_kd.api import ExecResult, _as_argv, report_data_for_nonce, resolve_image
from qemu_kd.common.errors import ConfigError, KdError
from qemu_kd.tenant.verify import check_report
from tests import api_domains

# One protected and one plain domain for the module (tests/api_domains.py).
platform, protected, plain, domain = (api_domains.platform, api_domains.protected, api_domains.plain,
                                      api_domains.domain)

MiB = 1 << 20


# -- without QEMU ------------------------------------------------------------------------------

def test_import_qemu_kd_is_cheap_and_the_api_loads_on_use():
    code = ("import sys, qemu_kd; before = sorted(m for m in sys.modules if m.startswith('qemu_kd'));"
            "qemu_kd.Platform; print(before, 'qemu_kd.api' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "['qemu_kd'] True"


def test_report_data_is_the_padded_nonce_or_its_hash():
    assert report_data_for_nonce(b"abc") == b"abc" + b"\0" * 61
    assert len(report_data_for_nonce(b"x" * 100)) == 64
    assert report_data_for_nonce(b"x" * 100) != report_data_for_nonce(b"x" * 101)


def test_exec_result_ok_and_text():
    assert ExecResult(0, b"hi\n", b"").ok
    assert not ExecResult(0, b"", b"", timed_out=True).ok
    assert ExecResult(1, b"\xff", b"e").stdout_text == "\ufffd"


def test_commands_as_shell_string_or_argv():
    assert _as_argv("echo hi") == ["/bin/sh", "-c", "echo hi"]
    assert _as_argv(("ls", 1)) == ["ls", "1"]
    with pytest.raises(ConfigError):
        _as_argv([])


def test_kernel_without_initrd_is_a_clear_error(tmp_path):
    (tmp_path / "k").write_bytes(b"k")
    with pytest.raises(ConfigError, match="go together"):
        resolve_image(tmp_path / "k", None, None)
    with pytest.raises(ConfigError, match="cannot read the initrd"):
        resolve_image(tmp_path / "k", tmp_path / "missing", None)


def test_missing_qemu_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("QEMU_KD_QEMU", "qemu-system-nonexistent")
    platform = qemu_kd.Platform()
    with pytest.raises(ConfigError, match="qemu-system-nonexistent is not installed"):
        platform.start()
    platform.close()


def test_attaching_to_no_platform_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="no platform serves"):
        with qemu_kd.Platform(socket=tmp_path / "none.sock"):
            pass


# -- with QEMU -----------------------------------------------------------------------------------


@pytest.mark.qemu
def test_exec_status_streams_stdin_env(domain):
    r = domain.exec("echo out; echo err >&2; exit 3")
    assert (r.rc, r.stdout, r.stderr, r.timed_out, r.truncated) == (3, b"out\n", b"err\n", False, False)
    r = domain.exec(["sh", "-c", 'cat; echo "$GREETING"'], stdin=b"in:", env={"GREETING": "hello"})
    assert r.ok and r.stdout == b"in:hello\n"


@pytest.mark.qemu
def test_exec_timeout_is_reported(domain):
    r = domain.exec("sleep 30", timeout=1)
    assert r.timed_out and not r.ok


@pytest.mark.qemu
def test_files_round_trip(domain):
    data = os.urandom(900 * 1024 + 17)   # more than one output cap in base64: pieces when plain
    assert domain.put_file("/tmp/new/dir/blob", data, mode=0o700) == len(data)
    assert domain.get_file("/tmp/new/dir/blob") == data
    assert domain.exec("stat -c %a /tmp/new/dir/blob").stdout == b"700\n"


@pytest.mark.qemu
def test_qmp_client_on_the_domain(domain):
    mon = domain.qmp()
    try:
        assert mon.cmd_obj({"execute": "query-status"})["return"]["status"] == "running"
    finally:
        mon.close()


@pytest.mark.qemu
def test_protected_attestation_over_the_callers_nonce(protected, platform):
    nonce = os.urandom(32)
    att = protected.attest(nonce)
    assert att.verified.report_data == report_data_for_nonce(nonce)
    assert att.verified.measurement == protected.measurement
    root = (platform.state_dir / "root-ca.crt").read_bytes()
    # The raw report and chain verify again offline, and only for this nonce.
    check_report(att.report, root, att.chain_pem, measurement=protected.measurement,
                 policy=protected.policy, report_data=report_data_for_nonce(nonce), allow_emulated=True)
    with pytest.raises(KdError):
        check_report(att.report, root, att.chain_pem, measurement=protected.measurement,
                     policy=protected.policy, report_data=report_data_for_nonce(b"other"),
                     allow_emulated=True)


@pytest.mark.qemu
def test_attestation_verifies_with_the_cli(protected, tmp_path):
    nonce = os.urandom(32)
    att = protected.attest(nonce)
    paths = [tmp_path / "report.bin", tmp_path / "root.pem", tmp_path / "chain.pem"]
    for path, data in zip(paths, (att.report, att.root_pem, att.chain_pem)):
        path.write_bytes(data)
    argv = [sys.executable, "-m", "qemu_kd.cli.main", *att.verify_report_argv(*paths)]
    done = subprocess.run(argv, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    other = [a if a != att.report_data.hex() else report_data_for_nonce(b"x").hex() for a in argv]
    assert subprocess.run(other, capture_output=True).returncode == 7   # report_data mismatch


@pytest.mark.qemu
def test_protected_endpoints_are_the_platforms(protected):
    ep = protected.endpoints
    assert {"console", "console_log", "qmp", "gdb", "audit_log"} <= set(ep)
    assert "Linux version" in protected.console_text() or protected.console_text() != ""


@pytest.mark.qemu
def test_plain_domain_has_no_attestation_and_a_console_shell(plain):
    with pytest.raises(qemu_kd.NotProtectedError):
        plain.attest(b"nonce")
    con = plain.console()
    try:
        con.sendline("")
        con.expect("#")
        con.sendline("echo CONSOLE$((40+2))")
        con.expect("CONSOLE42")
    finally:
        con.close()


@pytest.mark.qemu
def test_protected_domains_have_the_platforms_names(protected, platform):
    assert re.fullmatch(r"kd\d+", protected.name)
    named = platform.launch(name=f"api-{os.getpid()}")
    try:
        assert named.name == f"api-{os.getpid()}"
        assert named.exec("true").ok
    finally:
        named.destroy()


@pytest.mark.qemu
def test_destroyed_domain_refuses_operations(platform):
    dom = platform.launch(plain=True)
    dom.destroy()
    dom.destroy()   # idempotent
    with pytest.raises(qemu_kd.DomainGoneError):
        dom.exec("true")
