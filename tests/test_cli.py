"""The ``qemu-kd`` command line: argument handling, errors and output.

Most tests run the installed ``qemu-kd`` entry point in a subprocess and
check its exit status, its one-line error and that no traceback shows.  Two
tests boot a protected guest: one ``run --json``, and one ``run --keep
--debug`` whose domain the domain commands (``console``, ``destroy``, ``ls``)
then work on.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from leftovers import stop_registered_platforms
from qemu_kd.channel.console import QueryFilter, strip_queries
from qemu_kd.cli.domains import no_domains_line, relay_console
from qemu_kd.cli.outcome import HARNESS_EXIT
from qemu_kd.api import in_order, surviving_files
from qemu_kd.cli.run import format_run
from qemu_kd.common.units import GUEST_MEMORY_MAX, GUEST_MEMORY_MIN, parse_guest_memory

ROOT = Path(__file__).resolve().parent.parent
ENTRY = ROOT / ".venv" / "bin" / "qemu-kd"
QEMU_KD = [str(ENTRY)] if ENTRY.exists() else [sys.executable, "-m", "qemu_kd.cli.main"]


def qemu_kd(*argv, env=None, timeout=120, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([*QEMU_KD, *map(str, argv)], capture_output=True, text=True,
                          timeout=timeout, env=env, stdin=kw.pop("stdin", subprocess.DEVNULL), **kw)


def one_line_error(res: subprocess.CompletedProcess) -> str:
    """The error line of a failed command (argparse prints a usage line before it)."""
    assert "Traceback" not in res.stderr, res.stderr
    lines = res.stderr.strip().splitlines()
    assert lines, "no error message"
    assert "error:" in lines[-1], res.stderr
    return lines[-1]


# -- platform serve: the daemon's own options pass through -------------------------------------

def test_platform_serve_help_lists_the_daemon_options():
    res = qemu_kd("platform", "serve", "--help")
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("usage: qemu-kd platform serve")
    for option in ("--socket", "--state", "--memory", "--accel", "--exit-when-idle"):
        assert option in res.stdout


def test_platform_serve_takes_socket_state_and_memory(tmp_path):
    sock, state = tmp_path / "p.sock", tmp_path / "pstate"
    env = {**os.environ, "QEMU_KD_RUNTIME": str(tmp_path / "rt")}
    proc = subprocess.Popen([*QEMU_KD, "platform", "serve", "--socket", str(sock), "--state", str(state),
                             "--memory", "128M", "--accel", "tcg"],
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)
    try:
        ready = proc.stdout.readline()
        assert ready == f"ready {sock}\n", proc.stderr.read() if proc.poll() is not None else ready
        assert stat.S_ISSOCK(sock.stat().st_mode) and (state / "root-ca.crt").exists()
        [entry] = (tmp_path / "rt" / "platforms").glob("*.json")
        assert json.loads(entry.read_text())["memory_size"] == 128 << 20
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert not sock.exists()


def test_platform_serve_bad_option_is_a_usage_error():
    res = qemu_kd("platform", "serve", "--no-such-option")
    assert res.returncode == 2
    assert "unrecognized arguments: --no-such-option" in one_line_error(res)


# -- usage errors: checked before anything starts, exit status 2 --------------------------------

@pytest.mark.parametrize("argv, message", [
    (["run", "--timeout", "-1"], "argument --timeout: -1 is not a positive number of seconds"),
    (["run", "--timeout", "0"], "argument --timeout: 0 is not a positive number of seconds"),
    (["run", "--timeout", "nan"], "argument --timeout: 'nan' is not a number of seconds"),
    (["run", "--timeout", "soon"], "argument --timeout: 'soon' is not a number of seconds"),
    (["run", "--mem", "100G"], "argument --mem: guest memory size 100 GiB is not supported"),
    (["run", "--mem", "65M"], "argument --mem: guest memory size 65 MiB is not supported"),
    (["run", "--mem", "lots"], "argument --mem: cannot read memory size 'lots'"),
    (["run", "--plain", "--mem", "32M"], "argument --mem: guest memory size 32 MiB is not supported"),
    (["run", "--no-such-option"], "unrecognized arguments: --no-such-option"),
    (["run", "--accel", "hvf"], "argument --accel: invalid choice: 'hvf'"),
    (["run", "--plain", "--keep"], "--debug, --keep and --expose apply to protected domains"),
    (["run", "--plain", "--expose", "rax"], "--debug, --keep and --expose apply to protected domains"),
    (["run", "--expose", "rax,xmm0"], "'xmm0' is not a general-purpose register"),
    (["tenant", "measure", "--expose", "eax"], "'eax' is not a general-purpose register"),
    (["host", "layout", "--platform", "p.sock", "--out", "l.json", "--mem", "4G"],
     "argument --mem: guest memory size 4 GiB is not supported"),
    (["tenant", "measure", "--mem", "100G"], "argument --mem: guest memory size 100 GiB is not supported"),
    (["tenant", "seal", "--mem", "1M", "--layout", "l", "--root", "r", "--out", "o", "--secret", "s"],
     "argument --mem: guest memory size 1 MiB is not supported"),
    (["console", "kd1", "--linger", "-1"], "argument --linger: -1 is not 0 or more seconds"),
    (["destroy", "vm/1"], "'vm/1' is not a domain name"),
    (["ls", "--bogus"], "unrecognized arguments: --bogus"),
])
def test_usage_errors_exit_2(argv, message, tmp_path):
    # A QEMU that does not exist: whatever gets past the argument checks fails differently.
    env = {**os.environ, "QEMU_KD_QEMU": str(tmp_path / "no-qemu"), "QEMU_KD_ACCEL": "tcg",
           "QEMU_KD_RUNTIME": str(tmp_path / "rt")}
    res = qemu_kd(*argv, env=env)
    line = one_line_error(res)
    # run is the exception: its own failures exit 125, its guest command's status being its own.
    assert res.returncode == (HARNESS_EXIT if argv[0] == "run" else 2), res.stderr
    assert message in line
    assert res.stdout == ""


def test_missing_guest_file_is_a_usage_error(tmp_path):
    res = qemu_kd("run", "-q", "--kernel", tmp_path / "nope", "--initrd", tmp_path / "nope.img")
    assert res.returncode == HARNESS_EXIT
    assert f"kernel {tmp_path / 'nope'} does not exist" in one_line_error(res)


def test_a_failed_protected_run_keeps_the_platform_log(tmp_path):
    """The run directory goes, but the platform's log that an error points to stays."""
    (tmp_path / "k").write_bytes(b"not a kernel")
    (tmp_path / "i").write_bytes(b"")
    res = qemu_kd("run", "-q", "--accel", "tcg", "--kernel", tmp_path / "k", "--initrd", tmp_path / "i")
    line = one_line_error(res)
    assert res.returncode == HARNESS_EXIT and "to be a bzImage" in line
    saved = Path(re.search(r"the platform's log is kept in (\S+?)\)?$", line).group(1))
    assert saved.is_file() and stat.S_IMODE(saved.stat().st_mode) == 0o600
    assert "platform serving its host port" in saved.read_text()


def test_guest_memory_limits_are_the_boot_layouts():
    assert parse_guest_memory("64M") == GUEST_MEMORY_MIN and parse_guest_memory("3G") == GUEST_MEMORY_MAX
    assert parse_guest_memory("258M") == 258 << 20


# -- run --accel kvm where KVM cannot run ------------------------------------------------------

def test_explicit_kvm_that_cannot_run_says_why(tmp_path):
    """A QEMU that aborts under KVM (as QEMU does on a host whose KVM cannot set up the CPU):
    ``run --accel kvm`` says KVM is not usable and why, before starting anything."""
    fake = tmp_path / "qemu-system-x86_64"
    fake.write_text("#!/bin/sh\n"
                    "echo 'qemu-system-x86_64: error: failed to set MSR 0x10a to 0x69' >&2\n"
                    "kill -ABRT $$\n")
    fake.chmod(0o755)
    kernel, initrd = tmp_path / "bzImage", tmp_path / "initrd"
    kernel.write_bytes(b"\0" * 4096)
    initrd.write_bytes(b"\0" * 4096)
    env = {**os.environ, "QEMU_KD_QEMU": str(fake), "QEMU_KD_STATE": str(tmp_path / "state"),
           "QEMU_KD_RUNTIME": str(tmp_path / "rt")}
    env.pop("QEMU_KD_ACCEL", None)
    res = qemu_kd("run", "-q", "--accel", "kvm", "--kernel", kernel, "--initrd", initrd, env=env)
    line = one_line_error(res)
    assert res.returncode == HARNESS_EXIT, res.stderr
    assert line.startswith("qemu-kd: error: KVM was requested but is not usable: ")
    assert "--accel tcg" in line
    if os.access("/dev/kvm", os.R_OK | os.W_OK):
        assert "QEMU with KVM was killed by SIGABRT: failed to set MSR 0x10a to 0x69" in line
    assert "platform" not in line
    # Nothing was started: no run directory, no platform.
    assert not list((tmp_path / "rt").glob("run-*"))


# -- output helpers ----------------------------------------------------------------------------

def test_query_filter_takes_terminal_queries_out():
    text = (b"login\x1b[6n# \x1b[1mbold\x1b[0m \x1b[c\x1b[>0c\x1b[?6n\x1b[5n\x1b[18t"
            b"\x1b]11;?\x07\x1b[0;32mgreen\x1b[K")
    kept = b"login# \x1b[1mbold\x1b[0m \x1b[0;32mgreen\x1b[K"
    assert strip_queries(text) == kept
    # Fed one byte at a time, a query cut anywhere is still recognised.
    filt = QueryFilter()
    assert b"".join(filt.feed(text[i:i + 1]) for i in range(len(text))) + filt.flush() == kept
    # An escape at the end that never becomes a query comes out on flush.
    filt = QueryFilter()
    assert filt.feed(b"end\x1b[") == b"end" and filt.flush() == b"\x1b["


def test_console_relay_strips_queries_only_when_asked():
    for strip, expected in ((True, b"# ls\r\n"), (False, b"\x1b[6n# ls\r\n")):
        ours, theirs = socket.socketpair()
        in_r, in_w = os.pipe()
        out_r, out_w = os.pipe()
        try:
            os.close(in_w)                      # stdin at its end
            theirs.sendall(b"\x1b[6")           # a query cut in two
            theirs.sendall(b"n# ls\r\n")
            theirs.close()
            why = relay_console(ours, in_r, out_w, interactive=False, linger=5.0, strip_queries=strip)
            os.close(out_w)
            assert why == "console closed"
            assert os.read(out_r, 1000) == expected
        finally:
            ours.close()
            os.close(in_r)
            os.close(out_r)


def test_ls_says_the_same_with_and_without_all(tmp_path):
    env = {**os.environ, "QEMU_KD_RUNTIME": str(tmp_path / "rt")}
    plain, every = qemu_kd("ls", env=env), qemu_kd("ls", "-a", env=env)
    assert plain.returncode == every.returncode == 0
    assert plain.stdout == every.stdout == "no key domains\n"
    assert no_domains_line(2).startswith("no key domains with a guest (2 still being built")


def test_phases_in_the_order_they_ran():
    host = {"kernel to agent ready": 3.5, "launch": 0.3}       # as a JSON reply may order them
    assert list(in_order(host, ("launch", "kernel to agent ready"))) == ["launch", "kernel to agent ready"]
    assert list(in_order({"x": 1.0, "launch": 2.0}, ("launch",))) == ["launch", "x"]


def test_endpoints_of_a_finished_run_name_only_files_that_exist(tmp_path):
    log = tmp_path / "console.log"
    log.write_text("boot\n")
    gone = {"console": str(tmp_path / "console.sock"), "audit_log": str(tmp_path / "audit.log"),
            "console_log": str(log), "gdb": None}
    assert surviving_files(gone) == {"console": None, "audit_log": None, "console_log": str(log),
                                     "gdb": None}


def test_host_check_table_keeps_the_whole_measurement():
    measurement = "ab" * 48
    result = {"mode": "protected", "accel": "tcg", "kernel_release": "6.1", "timings": {"seal": 0.5},
              "boot_to_ready_s": 4.0, "keyid": 1, "policy": {"debug": False},
              "measurement": measurement, "expected_measurement": measurement,
              "attestation": {"verified": True, "emulated": True},
              "host_verification": {"measurement": {"ok": True, "detail": measurement}},
              "exec": {"argv": ["/bin/sh", "-c", "true"], "rc": 0, "stdout": "", "stderr": "oops"},
              "console_log": "/x.log"}
    text = format_run(result)
    [row] = [line for line in text.splitlines() if line.startswith("measurement ") and "ok" in line]
    assert row.split()[-1] == measurement
    assert "oops" not in text           # the command's stderr goes to stderr, not into the report


# -- bench-mee runs under the virtualenv by itself ---------------------------------------------

def test_bench_mee_runs_under_the_system_python():
    venv_bin = str(ROOT / ".venv" / "bin")
    path = os.pathsep.join(p for p in os.environ.get("PATH", "").split(os.pathsep)
                           if p and Path(p).resolve() != Path(venv_bin).resolve())
    python = shutil.which("python3", path=path)
    if python is None:
        pytest.skip("no python3 outside the virtualenv")
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME")}
    env["PATH"] = path
    with tempfile.TemporaryDirectory() as elsewhere:     # not the repository, so nothing imports by accident
        res = subprocess.run([python, str(ROOT / "scripts" / "bench-mee"), "--help"], capture_output=True,
                             text=True, env=env, cwd=elsewhere, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("usage: bench-mee") and "--size" in res.stdout


# -- with a real guest -------------------------------------------------------------------------

RUN_PHASES = ["platform start", "layout", "seal", "load", "verify", "launch", "kernel to agent ready",
              "attest", "command", "shutdown"]


@pytest.mark.qemu
def test_run_json_phases_stderr_and_endpoints(guest_artifacts):
    res = qemu_kd("run", "--json", "-q", "--cmd", "echo to-out; echo to-err >&2", timeout=600)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert list(out["timings"]) == RUN_PHASES
    assert out["exec"]["stdout"] == "to-out\n" and out["exec"]["stderr"] == "to-err\n"
    endpoints = out["endpoints"]
    # The domain is gone: its sockets and its audit log went with it, and the JSON says so.
    for name in ("qmp", "gdb", "console", "shared", "audit_log"):
        assert endpoints.get(name) is None, (name, endpoints)
    assert Path(endpoints["console_log"]).is_file() and endpoints["console_log"] == out["console_log"]


def test_expose_is_measured(guest_artifacts):
    """The exposed-register mask is part of the measured VMCS: measure sees it."""
    def measured(*extra):
        res = qemu_kd("tenant", "measure", "--json", *extra)
        assert res.returncode == 0, res.stderr
        return json.loads(res.stdout)["measurement"]

    default = measured()
    assert measured("--expose", "none") == default
    assert measured("--expose", "rax,rbx") == measured("--expose", "rbx, RAX") != default


@pytest.mark.qemu
def test_run_with_exposed_registers_answers_host_time(guest_artifacts):
    """A guest sealed with rax exposed gets the host's time through HOST_TIME, and the
    measurement the tenant checked (with the mask) is the one attested."""
    cmd = "kd-hypercall HOST_TIME --json"
    res = qemu_kd("run", "--json", "-q", "--expose", "rax,rbx", "--cmd", cmd, timeout=600)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert out["measurement"] == out["expected_measurement"]
    call = json.loads(out["exec"]["stdout"])
    host_ns = int(call["outputs"]["rax"], 0) if isinstance(call["outputs"]["rax"], str) \
        else call["outputs"]["rax"]
    assert abs(host_ns / 1e9 - time.time()) < 600, call


@pytest.mark.qemu
def test_run_keep_report_console_destroy_json(guest_artifacts):
    runtime = tempfile.mkdtemp(prefix="kdcli-")
    env = {**os.environ, "QEMU_KD_RUNTIME": runtime}
    name = None
    try:
        run = qemu_kd("run", "--keep", "--debug", "-q", "--cmd", "echo to-out; echo to-err >&2",
                      env=env, timeout=600)
        assert run.returncode == 0, run.stderr
        # The guest command's stderr is on stderr, its stdout in the report on stdout.
        assert run.stderr == "to-err\n"
        assert "to-out" in run.stdout.splitlines() and "to-err" not in run.stdout.splitlines()
        # Phases in the order they ran; the measurement whole in the host-check table.
        rows = run.stdout.split("\n\n")[1].splitlines()[2:-1]
        assert [row.rsplit(None, 2)[0] for row in rows] == RUN_PHASES[:-1]
        measurement = re.search(r"^measurement:\s+([0-9a-f]{96})$", run.stdout, re.M).group(1)
        assert re.search(rf"^measurement\s+ok\s+{measurement}$", run.stdout, re.M), run.stdout
        name = re.search(r"^domain (kd\d+) kept running", run.stdout, re.M).group(1)

        # The console log holds the shell's cursor query; piped output does not.
        listed = json.loads(qemu_kd("ls", "--json", env=env).stdout)
        [dom] = [d for d in listed if d["name"] == name]
        log = Path(dom["endpoints"]["console_log"]).read_bytes()
        assert b"\x1b[6n" in log
        # --log replays the log; the new line typed on stdin brings a new prompt live.
        console = subprocess.run([*QEMU_KD, "console", name, "--log", "--linger", "3"],
                                 capture_output=True, env=env, input=b"\n", timeout=60)
        assert console.returncode == 0, console.stderr
        assert b"Linux version" in console.stdout and console.stdout.count(b"/ # ") >= 2
        assert b"\x1b[6n" not in console.stdout

        destroy = qemu_kd("destroy", name, "--json", env=env)
        assert destroy.returncode == 0, destroy.stderr
        info = json.loads(destroy.stdout)
        assert info["name"] == name and info["destroyed"] is True and info["pages_freed"] > 0
        name = None
        assert qemu_kd("ls", "-a", env=env).stdout == "no key domains\n"
    finally:
        if name is not None:
            qemu_kd("destroy", name, env=env)
        stop_registered_platforms(Path(runtime))
        shutil.rmtree(runtime, ignore_errors=True)
