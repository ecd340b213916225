"""``run`` for CI: the guest command's exit status is qemu-kd's, qemu-kd's own failures exit 125,
``--json`` always prints one object, and ``--cmd-timeout`` limits the guest command alone."""

from __future__ import annotations

import json
import os

import pytest

from guest_agent import protocol
from guest_agent.agent import run_command
from qemu_kd.cli.outcome import HARNESS_EXIT, TIMED_OUT_EXIT, guest_exit_status
from qemu_kd.cli.run import format_run
from test_cli import one_line_error, qemu_kd


def no_qemu_env(tmp_path) -> dict:
    """A QEMU that does not exist: whatever gets past the argument checks fails differently."""
    return {**os.environ, "QEMU_KD_QEMU": str(tmp_path / "no-qemu"), "QEMU_KD_ACCEL": "tcg",
            "QEMU_KD_RUNTIME": str(tmp_path / "rt")}


@pytest.mark.parametrize("result, status", [
    ({"rc": 0}, 0), ({"rc": 3}, 3), ({"rc": 125}, 125), ({"rc": 255}, 255),
    ({"rc": -15}, 128 + 15),                                # killed by SIGTERM, as a shell reports
    ({"rc": -9, "timed_out": True}, TIMED_OUT_EXIT),
])
def test_guest_exit_status(result, status):
    assert guest_exit_status(result) == status


@pytest.mark.parametrize("argv, message", [
    (["run", "--cmd-timeout", "0"], "argument --cmd-timeout: 0 is not a positive number of seconds"),
    (["run", "--no-such-option"], "unrecognized arguments: --no-such-option"),
    (["run", "--mem", "65M"], "argument --mem: guest memory size 65 MiB is not supported"),
    (["run", "--plain", "--keep"], "--debug, --keep and --expose apply to protected domains"),
])
@pytest.mark.parametrize("as_json", [False, True])
def test_run_usage_errors_exit_125_and_json_reports_them(argv, message, as_json, tmp_path):
    res = qemu_kd(*argv, *(["--json"] if as_json else []), env=no_qemu_env(tmp_path))
    assert res.returncode == HARNESS_EXIT, res.stderr
    assert message in one_line_error(res)
    if as_json:
        error = json.loads(res.stdout)["error"]
        assert message in error["message"] and error["code"] in ("CommandLineError", "ConfigError")
    else:
        assert res.stdout == ""


def test_run_parses_as_before_without_loading_the_other_commands():
    """``qemu-kd run`` builds only run's parser (so a protected run starts its platform sooner);
    it parses a run command line exactly as the whole command line does."""
    import subprocess
    import sys

    code = ("import json, sys\n"
            "from qemu_kd.cli.main import build_parser, parse_args\n"
            "argv = ['run', '--mem', '128M', '--json', '--cmd', 'true', '--add', 'a:/b']\n"
            "ns = vars(parse_args(build_parser('run'), argv))\n"
            "loaded = sorted(m for m in sys.modules if m.startswith('qemu_kd.cli.'))\n"
            "full = vars(parse_args(build_parser(), argv))\n"
            "same = {k: str(v) for k, v in ns.items()} == {k: str(v) for k, v in full.items()}\n"
            "print(json.dumps({'loaded': loaded, 'same': same}))\n")
    out = json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                    check=True, timeout=60).stdout)
    assert out["same"]
    assert "qemu_kd.cli.domains" not in out["loaded"] and "qemu_kd.cli.tenant" not in out["loaded"]

def test_a_missing_kernel_exits_125_with_one_json_object(tmp_path):
    res = qemu_kd("run", "-q", "--json", "--kernel", tmp_path / "nope", "--initrd", tmp_path / "i",
                  env=no_qemu_env(tmp_path))
    assert res.returncode == HARNESS_EXIT, res.stderr
    out = json.loads(res.stdout)
    assert list(out) == ["error"]
    assert out["error"]["message"] == f"kernel {tmp_path / 'nope'} does not exist"
    assert out["error"]["hint"] and out["error"]["code"] == "ConfigError"


def test_a_run_ends_its_process_without_the_interpreter_teardown(tmp_path):
    """``qemu-kd run`` ends its own process once it has cleaned up (os._exit: an atexit handler,
    part of the teardown, never runs), with its exit status and its output complete."""
    import subprocess
    import sys

    marker = tmp_path / "teardown-ran"
    code = ("import atexit, sys\n"
            f"atexit.register(lambda: open({str(marker)!r}, 'w').close())\n"
            "from qemu_kd.cli.main import main\n"
            "sys.exit(main())\n")
    res = subprocess.run([sys.executable, "-c", code, "run", "-q", "--json", "--kernel",
                          str(tmp_path / "nope"), "--initrd", str(tmp_path / "i")],
                         capture_output=True, text=True, timeout=60, env=no_qemu_env(tmp_path))
    assert res.returncode == HARNESS_EXIT, res.stderr
    assert json.loads(res.stdout)["error"]["code"] == "ConfigError"
    assert not marker.exists()
    # Called with its arguments (in-process), main returns as before.
    from qemu_kd.cli.main import main

    assert main(["run", "-q", "--kernel", str(tmp_path / "nope"), "--initrd", str(tmp_path / "i")]) \
        == HARNESS_EXIT

def test_other_commands_keep_their_codes(tmp_path):
    res = qemu_kd("destroy", "vm/1", env=no_qemu_env(tmp_path))
    assert res.returncode == 2


def test_text_output_says_timed_out_and_truncated():
    result = {"mode": "plain", "accel": "tcg", "kernel_release": "6", "timings": {"command": 1.0},
              "boot_to_ready_s": 1.0, "console_log": "c.log",
              "exec": {"argv": ["/bin/sh", "-c", "yes"], "rc": -9, "stdout": "y\n", "stderr": "",
                       "timed_out": True, "truncated": True, "timeout": 2.5,
                       "output_cap": protocol.MAX_OUTPUT}}
    text = format_run(result)
    assert "timed out after 2.5 s, killed" in text
    assert f"output truncated to {protocol.MAX_OUTPUT >> 20} MiB per stream" in text


def test_three_megabytes_of_output_come_back_whole():
    """The agent's output cap is above 3 MB, and an answer with both streams full fits a frame."""
    from guest_agent.session import MAX_BODY

    three_mb = 3_000_000
    res = run_command({"shell": f"head -c {three_mb} /dev/zero; head -c {three_mb} /dev/zero >&2"},
                      tenant=True)
    assert not res["truncated"] and not res["timed_out"]
    assert len(res["stdout"]) == len(res["stderr"]) == (three_mb + 2) // 3 * 4
    full = {"rc": 0, "stdout": "A" * ((protocol.MAX_OUTPUT + 2) // 3 * 4), "timed_out": False,
            "stderr": "A" * ((protocol.MAX_OUTPUT + 2) // 3 * 4), "truncated": True}
    body = json.dumps({"ok": True, "result": full}, separators=(",", ":")).encode()
    assert len(body) < MAX_BODY and (len(body) + 2) // 3 * 4 < protocol.MAX_LINE


def test_run_has_no_command_timeout_by_default():
    from qemu_kd.cli.main import build_parser

    args = build_parser().parse_args(["run"])
    assert args.cmd_timeout is None and args.timeout == 120.0
    assert build_parser().parse_args(["run", "--cmd-timeout", "90"]).cmd_timeout == 90.0


# -- with a real guest -------------------------------------------------------------------------

@pytest.mark.qemu
def test_run_exits_with_the_guest_commands_status(guest_artifacts):
    res = qemu_kd("run", "-q", "--cmd", "echo before; echo oops >&2; printf after; exit 3", timeout=600)
    assert res.returncode == 3, res.stderr
    # The output came as it arrived, before the report, once; an open last line is ended.
    assert res.stdout.startswith("before\nafter\nmode: protected")
    assert res.stdout.count("before\n") == 1 and "(exit status 3)" in res.stdout
    assert res.stderr == "oops\n"


def test_output_printer_ends_an_open_line(capfdbinary):
    from qemu_kd.cli.run import OutputPrinter

    show = OutputPrinter()
    show("stdout", b"a\nb")
    show("stderr", b"e\n")
    show.end_lines()
    show.end_lines()
    out, err = capfdbinary.readouterr()
    assert (out, err) == (b"a\nb\n", b"e\n")


@pytest.mark.qemu
def test_plain_run_command_timeout_kills_and_reports(guest_artifacts):
    res = qemu_kd("run", "--plain", "-q", "--json", "--cmd-timeout", "3",
                  "--cmd", "echo started; sleep 600", timeout=600)
    assert res.returncode == TIMED_OUT_EXIT, res.stderr
    ran = json.loads(res.stdout)["exec"]
    assert ran["timed_out"] is True and ran["truncated"] is False and ran["timeout"] == 3.0
    assert ran["stdout"] == "started\n"


@pytest.mark.qemu
def test_exec_in_a_kept_domain_runs_as_the_tenant(guest_artifacts, tmp_path):
    import stat

    from leftovers import stop_registered_platforms
    from qemu_kd.cli.kept import record_path

    env = {**os.environ, "QEMU_KD_RUNTIME": str(tmp_path / "rt")}
    name = None
    try:
        run = qemu_kd("run", "--keep", "--json", "-q", "--cmd", "true", env=env, timeout=600)
        assert run.returncode == 0, run.stderr
        out = json.loads(run.stdout)
        pid, keyid = out["kept"]["platform_pid"], out["keyid"]
        name = f"{pid}:kd{keyid}"
        record = record_path(pid, keyid)
        assert stat.S_IMODE(record.stat().st_mode) == 0o600

        ran = qemu_kd("exec", name, "--", "sh", "-c", "echo out-$((6*7)); echo err >&2; exit 4",
                      env=env, timeout=300)
        assert ran.returncode == 4, ran.stderr
        assert ran.stdout == "out-42\n" and ran.stderr == "err\n"

        slow = qemu_kd("exec", "--json", "--cmd-timeout", "2", name, "--", "sleep", "600",
                       env=env, timeout=300)
        assert slow.returncode == TIMED_OUT_EXIT, slow.stderr
        info = json.loads(slow.stdout)
        assert info["attested"] and info["measurement"] == out["measurement"]
        assert info["exec"]["timed_out"] is True

        assert qemu_kd("destroy", name, env=env).returncode == 0
        name = None
        assert not record.exists()
        gone = qemu_kd("exec", "--json", f"{pid}:kd{keyid}", "--", "true", env=env)
        assert gone.returncode == HARNESS_EXIT
        assert json.loads(gone.stdout)["error"]["code"] == "DomainLookupError"
    finally:
        if name is not None:
            qemu_kd("destroy", name, env=env)
        stop_registered_platforms(tmp_path / "rt")


def test_exec_needs_a_command_and_a_kept_domain(tmp_path):
    env = no_qemu_env(tmp_path)
    res = qemu_kd("exec", "--json", "kd1", "--", env=env)
    assert res.returncode == HARNESS_EXIT and "exec needs a command" in one_line_error(res)
    assert json.loads(res.stdout)["error"]["code"] == "CommandLineError"
    res = qemu_kd("exec", "--cmd-timeout", "-1", "kd1", "--", "true", env=env)
    assert res.returncode == HARNESS_EXIT and "--cmd-timeout" in one_line_error(res)


def test_records_of_dead_platforms_are_swept(tmp_path, monkeypatch):
    from qemu_kd.cli import kept

    monkeypatch.setattr(kept, "tenants_dir", lambda: tmp_path)
    live, dead = tmp_path / f"{os.getpid()}-1.json", tmp_path / "999999999-2.json"
    live.write_text("{}")
    dead.write_text("{}")
    assert kept.sweep_dead_records() == [dead]
    assert live.exists() and not dead.exists()
    with pytest.raises(kept.KeptRecordError, match="only domains kept by"):
        monkeypatch.setattr(kept, "record_path", lambda pid, keyid: tmp_path / "none.json")
        kept.KeptTenant.load(1, 1, "kd1")


def test_an_interrupt_that_comes_out_of_an_import_as_another_error_is_the_interrupt(capsys):
    """Ctrl-C in the middle of a C extension's import (numpy loading while the platform starts)
    can surface as an ImportError: once the handler saw the interrupt, run reports an interrupt
    (one line, exit 130), not a bug with its traceback."""
    import argparse

    from qemu_kd.cli.main import InterruptWatch, _harness_command
    from qemu_kd.cli.outcome import INTERRUPTED_EXIT

    def interrupted_import(args):
        try:
            watch(2, None)
        except KeyboardInterrupt:
            raise ImportError('PyCapsule_Import could not import module "datetime"') from None

    watch = InterruptWatch()
    args = argparse.Namespace(func=interrupted_import, json=False)
    assert _harness_command(args, watch) == INTERRUPTED_EXIT
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("\n") == 1 and "qemu-kd: error:" in err
    # Without an interrupt, the same exception is a bug: its traceback, and qemu-kd's own code.
    args.func = lambda args: (_ for _ in ()).throw(ImportError("no module"))
    assert _harness_command(args, InterruptWatch()) == HARNESS_EXIT
    assert "Traceback" in capsys.readouterr().err
