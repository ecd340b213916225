"""The pytest plugin (qemu_kd.pytest_plugin, entry point pytest11), run as users run it: pytest in a
subprocess, on a project of its own."""

from __future__ import annotations

import json
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
    # The protected guest was restored: its console section starts with its template's boot.
    protected_console = out.split("kd console (kd")[1].split("kd audit (kd")[0]
    assert "qemu-kd-guest: starting agent" in protected_console
    assert "snapshot taken here; kd" in protected_console


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


# Each test notes what its kd_guest was (RECORD, one JSON a line); the last one notes what the
# platform object launched and restored over the session.
RESET_TESTS = """
import json
import os
import pytest

RECORD = os.path.join(os.path.dirname(__file__), "record.jsonl")

def note(**facts):
    with open(RECORD, "a") as out:
        out.write(json.dumps(facts) + "\\n")

def check(guest, test):
    nonce = os.urandom(32)
    attested = guest.attest(nonce).verified.report_data[:32] == nonce
    seen = guest.exec(f"cat /tmp/state 2>/dev/null; echo {test} > /tmp/state").stdout_text
    restored = str(guest.restored_from) if guest.restored_from else None
    note(test=test, restored=restored, snapshot_exists=bool(restored) and os.path.exists(restored),
         attested=attested, seen=seen, name=guest.name, restorable=guest.policy.restorable)

def test_first(kd_guest):
    check(kd_guest, "first")

def test_second(kd_guest):
    check(kd_guest, "second")

@pytest.mark.kd(cold=True)
def test_cold(kd_guest):
    check(kd_guest, "cold")

def test_zz_platform(kd_platform):
    booted = [d for d in kd_platform.domains if d.restored_from is None]
    note(test="platform", booted=[d.policy.restorable for d in booted],
         restored=sum(d.restored_from is not None for d in kd_platform.domains))
"""


def records(proj: Path) -> dict[str, dict]:
    lines = (proj / "record.jsonl").read_text().splitlines()
    return {fact["test"]: fact for fact in map(json.loads, lines)}


@pytest.mark.qemu
def test_protected_kd_guests_are_restores_of_one_snapshot(tmp_path):
    """Two tests boot one template and restore it twice; each restore works on its own and starts
    from the template (test 1's file is not there for test 2); cold=True boots fresh."""
    proj = project(tmp_path, RESET_TESTS)
    done = run_pytest(proj)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    facts = records(proj)
    first, second, cold = facts["first"], facts["second"], facts["cold"]
    assert first["restored"] and first["restored"] == second["restored"]
    assert first["snapshot_exists"] and second["snapshot_exists"]
    assert not Path(first["restored"]).exists()          # the snapshots go at the end of the session
    assert first["attested"] and second["attested"] and cold["attested"]
    assert first["seen"] == "" and second["seen"] == ""  # each starts from the template
    assert first["restorable"] and second["restorable"]
    assert cold["restored"] is None and not cold["restorable"]
    # The template (restorable) and the cold test's guest were booted; the two others restored.
    assert facts["platform"] == {"test": "platform", "booted": [True, False], "restored": 2}
    assert "qemu-kd: kd_guest set-ups: 2 restored from 1 snapshot" in done.stdout
    assert "1 booted protected" in done.stdout


@pytest.mark.qemu
def test_kd_reset_boot_boots_every_guest(tmp_path):
    proj = project(tmp_path, RESET_TESTS)
    done = run_pytest(proj, "--kd-reset", "boot")
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    facts = records(proj)
    for test in ("first", "second", "cold"):
        assert facts[test]["restored"] is None and not facts[test]["restorable"]
        assert facts[test]["attested"] and facts[test]["seen"] == ""
    assert facts["platform"] == {"test": "platform", "booted": [False, False, False], "restored": 0}
    assert "qemu-kd: kd_guest set-ups: 3 booted protected" in done.stdout


@pytest.mark.qemu
def test_a_failed_restore_fails_the_test_with_one_line(tmp_path):
    """No hang and no silent cold boot: the snapshot gone, the next tests fail and say why."""
    proj = project(tmp_path, """
def test_removes_the_snapshot(kd_guest):
    kd_guest.restored_from.unlink()

def test_next(kd_guest):
    pass

def test_after(kd_guest):
    pass
""")
    done = run_pytest(proj)
    assert done.returncode == 1
    assert "1 passed, 2 errors" in done.stdout, done.stdout[-4000:]
    lines = [line for line in done.stdout.splitlines()
             if line.startswith("qemu-kd: restoring kd_guest from its snapshot failed: ")]
    assert len(lines) == 2, done.stdout[-4000:]
    assert "--kd-reset=boot" in lines[0]
    assert "Traceback" not in done.stdout
    assert "1 restored from 1 snapshot" in done.stdout


@pytest.mark.qemu
def test_a_template_that_cannot_boot_fails_each_test_of_its_configuration(tmp_path):
    """The template's failure is remembered: the next test of the same configuration fails at
    once with the same message, and a cold test is not affected."""
    proj = project(tmp_path, """
import pytest

@pytest.mark.kd(image=("/nonexistent/vmlinuz", "/nonexistent/initrd"))
def test_one(kd_guest):
    pass

@pytest.mark.kd(image=("/nonexistent/vmlinuz", "/nonexistent/initrd"))
def test_two(kd_guest):
    pass
""")
    done = run_pytest(proj, timeout=300)
    assert done.returncode == 1
    assert "2 errors" in done.stdout, done.stdout[-4000:]
    failed = [line for line in done.stdout.splitlines()
              if line.startswith("qemu-kd: the template guest for snapshot reset failed to launch: ")]
    assert len(failed) == 2, done.stdout[-4000:]
    assert "/nonexistent/vmlinuz" in failed[0] and failed[1].endswith("for one test)")
    assert "(in an earlier test)" in failed[1] and "(in an earlier test)" not in failed[0]
    assert "Traceback" not in done.stdout


@pytest.mark.qemu
def test_a_template_that_cannot_be_snapshotted_fails_clearly_and_is_destroyed(tmp_path):
    proj = project(tmp_path, """
from qemu_kd.hostport.client import HostPortClient

def test_one(kd_guest):
    pass

def test_two(kd_guest):
    pass

def test_zz_nothing_left(kd_platform):
    with HostPortClient(kd_platform.socket) as client:
        assert client.list_domains() == []
""")
    (proj / "conftest.py").write_text("""
import qemu_kd.api
from qemu_kd.common.errors import KdError

def refuse(domain, path):
    raise KdError("snapshot-kd refused for this test", "nothing to do")

qemu_kd.api.ProtectedDomain.snapshot = refuse
""")
    done = run_pytest(proj)
    assert done.returncode == 1
    assert "1 passed, 2 errors" in done.stdout, done.stdout[-4000:]
    failed = [line for line in done.stdout.splitlines() if line.startswith(
        "qemu-kd: the template guest for snapshot reset failed to snapshot: snapshot-kd refused for this test")]
    assert len(failed) == 2 and "(in an earlier test)" in failed[1], done.stdout[-4000:]
    assert "Traceback" not in done.stdout


class FakeRequest:
    """What launch_options reads of a pytest FixtureRequest."""

    def __init__(self, options: dict, marker=None, param=None):
        self.config = type("Config", (), {"getoption": staticmethod(lambda name: options[name])})()
        self.node = type("Node", (), {"get_closest_marker": staticmethod(lambda name: marker)})()
        if param is not None:
            self.param = param


OPTIONS = {"kd_mode": "protected", "kd_memory": "256M", "kd_debug": False, "kd_ready_timeout": 120.0,
           "kd_reset": "snapshot"}


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
    assert "cold" not in launch_options(FakeRequest(OPTIONS, pytest.mark.kd(cold=True).mark))


def test_which_guests_boot_cold():
    from qemu_kd.pytest_plugin import cold_boot, launch_options

    def cold(options=OPTIONS, marker=None, param=None):
        request = FakeRequest(options, marker, param)
        return cold_boot(request, launch_options(request))

    assert not cold()
    assert cold({**OPTIONS, "kd_reset": "boot"})
    assert cold(marker=pytest.mark.kd(cold=True).mark)
    assert not cold(marker=pytest.mark.kd(cold=False, memory="512M").mark)
    assert cold({**OPTIONS, "kd_mode": "both"}, param="plain")      # plain guests always boot
    assert not cold({**OPTIONS, "kd_mode": "both"}, param="protected")


def test_one_template_per_launch_configuration():
    from qemu_kd.pytest_plugin import launch_options, template_key

    def key(options=OPTIONS, marker=None):
        return template_key(launch_options(FakeRequest(options, marker)))

    assert key() == key({**OPTIONS, "kd_ready_timeout": 5.0})
    assert key() == key(marker=pytest.mark.kd(cold=False).mark)
    distinct = {key(), key({**OPTIONS, "kd_debug": True}), key(marker=pytest.mark.kd(memory="512M").mark),
                key(marker=pytest.mark.kd(cmdline="nokaslr").mark),
                key(marker=pytest.mark.kd(image=("k", "i")).mark)}
    assert len(distinct) == 5


def test_the_summary_line_counts_restores_snapshots_and_boots():
    from qemu_kd.pytest_plugin import SetupTally

    tally = SetupTally()
    assert tally.line() is None

    def setup(**value):
        report = type("Report", (), {"when": "setup", "user_properties": [("qemu-kd", value)]})()
        tally.pytest_runtest_logreport(report)

    setup(guest="snapshot+restored", mode="protected", setup_s=20.0)
    setup(guest="restored", mode="protected", setup_s=3.0)
    setup(guest="restored", mode="protected", setup_s=4.0)
    setup(guest="snapshot+restored", mode="protected", setup_s=22.0)   # a second configuration
    setup(guest="booted", mode="protected", setup_s=9.0)
    setup(guest="booted", mode="plain", setup_s=5.0)
    assert tally.line() == ("qemu-kd: kd_guest set-ups: 4 restored from 2 snapshots (restore median 3.5 s; "
                            "boot, snapshot and restore median 21.0 s), 1 booted protected (median 9.0 s), "
                            "1 booted plain (median 5.0 s)")
