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


def test_a_missing_kernel_exits_125_with_one_json_object(tmp_path):
    res = qemu_kd("run", "-q", "--json", "--kernel", tmp_path / "nope", "--initrd", tmp_path / "i",
                  env=no_qemu_env(tmp_path))
    assert res.returncode == HARNESS_EXIT, res.stderr
    out = json.loads(res.stdout)
    assert list(out) == ["error"]
    assert out["error"]["message"] == f"kernel {tmp_path / 'nope'} does not exist"
    assert out["error"]["hint"] and out["error"]["code"] == "ConfigError"


def test_other_commands_keep_their_codes(tmp_path):
    res = qemu_kd("destroy", "vm1", env=no_qemu_env(tmp_path))
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
    res = qemu_kd("run", "-q", "--cmd", "echo before; exit 3", timeout=600)
    assert res.returncode == 3, res.stderr
    assert "(exit status 3)" in res.stdout and "before" in res.stdout


@pytest.mark.qemu
def test_plain_run_command_timeout_kills_and_reports(guest_artifacts):
    res = qemu_kd("run", "--plain", "-q", "--json", "--cmd-timeout", "3",
                  "--cmd", "echo started; sleep 600", timeout=600)
    assert res.returncode == TIMED_OUT_EXIT, res.stderr
    ran = json.loads(res.stdout)["exec"]
    assert ran["timed_out"] is True and ran["truncated"] is False and ran["timeout"] == 3.0
    assert ran["stdout"] == "started\n"
