"""Tests of hello.py in a qemu-kd guest: run `pytest --kd-mode both` here."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from qemu_kd.guest.additions import GuestAdditions, GuestFile

HERE = Path(__file__).parent
PROGRAM = HERE / "hello.py"
IN_GUEST = "/usr/local/bin/hello.py"


@pytest.fixture
def hello(kd_guest):
    """The guest, with hello.py copied in (through the tenant session when protected)."""
    kd_guest.put_file(IN_GUEST, PROGRAM, mode=0o755)
    return kd_guest


def test_greets(hello):
    result = hello.exec([IN_GUEST, "tenant"])
    assert result.rc == 0, result.stderr_text
    assert result.stdout_text.splitlines()[0] == "hello, tenant"
    assert not result.timed_out and not result.truncated


def test_exit_status_and_stderr(hello):
    result = hello.exec([IN_GUEST, "--fail", "3"])
    assert result.rc == 3
    assert result.stderr == b"hello: failing on request\n"


def test_stdin_and_environment(hello):
    assert hello.exec([IN_GUEST, "--sum"], stdin="1 2 3\n39\n").stdout == b"45\n"
    assert hello.exec(IN_GUEST, env={"HELLO_NAME": "env"}).stdout.startswith(b"hello, env\n")


def test_files_come_back(hello):
    hello.exec(f"{IN_GUEST} file > /tmp/out.txt")
    assert hello.get_file("/tmp/out.txt").startswith(b"hello, file\n")


@pytest.mark.kd(additions=GuestAdditions([GuestFile(PROGRAM, "/opt/hello/hello.py")]), memory="320M")
def test_program_built_into_the_image(kd_guest):
    result = kd_guest.exec(["/opt/hello/hello.py", "image"])
    assert result.ok and result.stdout.startswith(b"hello, image\n")
    mem_kib = int(kd_guest.exec("awk '/MemTotal/ {print $2}' /proc/meminfo").stdout)
    assert 256 * 1024 < mem_kib <= 320 * 1024


def test_attestation_over_my_nonce(hello):
    if not hello.protected:
        pytest.skip("a plain guest runs on no platform that could attest it")
    nonce = os.urandom(32)
    att = hello.attest(nonce)
    assert att.verified.report_data[:32] == nonce
    assert att.verified.measurement == hello.measurement
    assert b"BEGIN CERTIFICATE" in att.chain_pem and len(att.report) > 0


def test_attestation_checks_out_with_the_cli(hello, tmp_path):
    if not hello.protected:
        pytest.skip("a plain guest runs on no platform that could attest it")
    att = hello.attest(b"my own nonce")
    files = [tmp_path / "report.bin", tmp_path / "root.pem", tmp_path / "chain.pem"]
    for path, data in zip(files, (att.report, att.root_pem, att.chain_pem)):
        path.write_bytes(data)
    qemu_kd_cli = shutil.which("qemu-kd") or str(Path(sys.executable).with_name("qemu-kd"))
    done = subprocess.run([qemu_kd_cli, *att.verify_report_argv(*files)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
