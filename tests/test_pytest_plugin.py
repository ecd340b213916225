"""The pytest plugin (qemu_kd.pytest_plugin, entry point pytest11), run as users run it: pytest in a
subprocess, on a project of its own."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def run_pytest(project: Path, *args: str, env: dict | None = None, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-rA",
                           "--kd-accel", "tcg", *args, str(project)],
                          capture_output=True, text=True, timeout=timeout, cwd=project,
                          env={**os.environ, **(env or {})})


def project(tmp_path: Path, source: str) -> Path:
    (tmp_path / "pytest.ini").write_text("[pytest]\n")
    (tmp_path / "test_user.py").write_text(source)
    return tmp_path


GUEST_TEST = """
import pytest

def test_uname(kd_guest):
    assert kd_guest.exec("uname -s").stdout == b"Linux\\n"

def test_without_a_guest():
    pass
"""


def test_the_plugin_is_registered_and_idle_without_its_fixtures(tmp_path):
    proj = project(tmp_path, "def test_nothing():\n    assert True\n")
    done = run_pytest(proj, "--kd-mode", "both", env={"QEMU_KD_QEMU": "qemu-system-nonexistent"})
    assert done.returncode == 0, done.stdout + done.stderr
    assert "1 passed" in done.stdout
    assert "kd_guest" in subprocess.run([sys.executable, "-m", "pytest", "--fixtures", str(proj)],
                                        capture_output=True, text=True, cwd=proj).stdout


def test_both_modes_parametrize_kd_guest_only(tmp_path):
    proj = project(tmp_path, GUEST_TEST)
    done = run_pytest(proj, "--kd-mode", "both", "--collect-only")
    assert "test_uname[plain]" in done.stdout and "test_uname[protected]" in done.stdout
    assert "test_without_a_guest>" in done.stdout or "test_without_a_guest\n" in done.stdout
    single = run_pytest(proj, "--kd-mode", "plain", "--collect-only")
    assert "test_uname[" not in single.stdout


def test_missing_qemu_fails_the_test_with_a_clear_message(tmp_path):
    proj = project(tmp_path, GUEST_TEST)
    done = run_pytest(proj, env={"QEMU_KD_QEMU": "qemu-system-nonexistent"}, timeout=120)
    assert done.returncode == 1
    assert "qemu-kd: qemu-system-nonexistent is not installed" in done.stdout
    assert "Traceback" not in done.stdout and "1 passed" in done.stdout


@pytest.mark.qemu
def test_a_guest_that_does_not_come_up_fails_clearly(tmp_path):
    proj = project(tmp_path, GUEST_TEST)
    done = run_pytest(proj, "--kd-mode", "plain", "--kd-ready-timeout", "0.01", "-k", "uname")
    assert done.returncode == 1
    assert "qemu-kd: guest agent did not answer" in done.stdout, done.stdout


@pytest.mark.qemu
def test_a_failed_test_reports_the_console_and_the_audit_log(tmp_path):
    proj = project(tmp_path, """
def test_fails(kd_guest):
    mon = kd_guest.qmp()
    mon.cmd_obj({"execute": "pmemsave", "arguments": {"val": 0, "size": 4096, "filename": "/tmp/m"}})
    mon.close()   # the refusal is a record in a protected domain's audit log
    assert kd_guest.exec("exit 5").rc == 0
""")
    done = run_pytest(proj, "--kd-mode", "both")
    assert done.returncode == 1
    out = done.stdout
    assert "2 failed" in out
    assert "kd console (plain-" in out and "kd console (kd" in out
    assert "kd audit (kd" in out and "kd audit (plain-" not in out
    assert "qemu-kd-guest: starting agent" in out
    assert "pmemsave" in out.split("kd audit (kd")[1]


@pytest.mark.qemu
def test_attesting_a_plain_guest_skips_the_test(tmp_path):
    proj = project(tmp_path, """
import qemu_kd

def test_attest(kd_guest):
    assert kd_guest.attest(b"nonce").verified.report_data[:5] == b"nonce"

def test_attest_outside_the_fixture(kd_platform):
    guest = kd_platform.launch(plain=True)
    guest.attest(b"nonce")
""")
    done = run_pytest(proj, "--kd-mode", "both")
    assert "1 failed, 1 passed, 1 skipped" in done.stdout, done.stdout
    assert "SKIPPED" in done.stdout and "qemu-kd: plain-" in done.stdout and "is a plain domain" in done.stdout
    assert "FAILED test_user.py::test_attest_outside_the_fixture" in done.stdout


@pytest.mark.qemu
def test_the_example_project_passes_in_both_modes_with_two_workers():
    """Under pytest-xdist each worker has its own platform daemon and domain names."""
    pytest.importorskip("xdist")
    done = run_pytest(REPO / "examples" / "hello-guest", "--kd-mode", "both", "-n", "2")
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert "12 passed, 2 skipped" in done.stdout


class FakeRequest:
    """What launch_options reads of a pytest FixtureRequest."""

    def __init__(self, options: dict, marker=None, param=None):
        self.config = type("Config", (), {"getoption": staticmethod(lambda name: options[name])})()
        self.node = type("Node", (), {"get_closest_marker": staticmethod(lambda name: marker)})()
        if param is not None:
            self.param = param


OPTIONS = {"kd_mode": "protected", "kd_memory": "256M", "kd_debug": False, "kd_ready_timeout": 120.0}


def test_launch_options_from_the_command_line_and_the_marker():
    from qemu_kd.pytest_plugin import launch_options

    assert launch_options(FakeRequest(OPTIONS)) == {"plain": False, "memory": "256M", "debug": False,
                                                    "ready_timeout": 120.0}
    assert launch_options(FakeRequest({**OPTIONS, "kd_mode": "both"}, param="plain"))["plain"] is True
    marker = pytest.mark.kd(memory="512M", debug=True, cmdline="nokaslr", image=("k", "i")).mark
    opts = launch_options(FakeRequest(OPTIONS, marker))
    assert (opts["memory"], opts["debug"], opts["cmdline_extra"], opts["kernel"], opts["initrd"]) == \
        ("512M", True, "nokaslr", "k", "i")
    with pytest.raises(pytest.UsageError, match="mark.kd takes"):
        launch_options(FakeRequest(OPTIONS, pytest.mark.kd(mem="1G").mark))
