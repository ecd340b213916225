"""Guest commands as background jobs: output streamed while they run, the agent serving meanwhile.

The first part runs the agent in-process (jobs, the shared-channel commands of a
plain guest, the tenant session's operations, the CLI's printing).  The tests
marked ``qemu`` go through real guests: a 90 s command under ``--cmd-timeout
120``, 3 MB of output whole, more than the cap marked truncated, and a line
that arrives before its command ends.
"""

from __future__ import annotations

import base64
import json
import os
import time

import pytest

from guest_agent import jobs
from guest_agent.jobs import CommandSpec, Job, JobTable
from guest_agent.protocol import MAX_OUTPUT
from qemu_kd.common.errors import GuestError
from qemu_kd.tenant.session import GuestCommandError

from test_agent import pair  # noqa: F401 - the plain agent on a socket pair
from test_session import guest, identity  # noqa: F401 - a protected agent and its tenant session
from tests import api_domains

# One protected and one plain domain for the module (tests/api_domains.py).
platform, protected, plain, domain = (api_domains.platform, api_domains.protected, api_domains.plain,
                                      api_domains.domain)

#: Only a guard against a hang: no assertion depends on how long anything takes.
HANG_GUARD = 60.0


def spec(shell: str, timeout: float | None = None) -> CommandSpec:
    return CommandSpec(["/bin/sh", "-c", shell], b"", timeout, None)


def poll_until(job: Job, predicate, events: list) -> dict:
    """Poll ``job``, appending ("stdout"/"stderr", bytes) and ("end", answer) to ``events``,
    until ``predicate(events)``; the last answer."""
    deadline = time.monotonic() + HANG_GUARD
    while True:
        answer = job.poll(0.2)
        for name in ("stdout", "stderr"):
            data = base64.b64decode(answer[name])
            if data:
                events.append((name, data))
        if answer["done"]:
            events.append(("end", answer))
        if predicate(events) or answer["done"]:
            return answer
        assert time.monotonic() < deadline, f"job did not get there: {events}"


def text(events, stream="stdout") -> bytes:
    return b"".join(data for name, data in events if name == stream)


def released_by(flag) -> str:
    """A shell command that waits until ``flag`` exists (the test decides when, not a clock)."""
    return f'while [ ! -e "{flag}" ]; do sleep 0.05; done'


# -- guest_agent.jobs -----------------------------------------------------------------------------

def test_output_arrives_while_the_command_runs(tmp_path):
    flag = tmp_path / "go"
    job = Job(spec(f"echo first; {released_by(flag)}; echo second; echo err >&2; exit 5"))
    events: list = []
    answer = poll_until(job, lambda ev: b"first\n" in text(ev), events)
    assert not answer["done"] and answer["rc"] is None
    flag.touch()
    answer = poll_until(job, lambda ev: False, events)
    assert (answer["done"], answer["rc"], answer["timed_out"], answer["truncated"]) == (True, 5, False, False)
    assert text(events) == b"first\nsecond\n" and text(events, "stderr") == b"err\n"
    assert [name for name, _ in events].index("end") == len(events) - 1


def test_a_timeout_kills_the_whole_process_group(tmp_path):
    # The background child holds stdout open: only a kill of the group ends the command.
    job = Job(spec("(sleep 600; echo late) & echo started; wait", timeout=0.5))
    events: list = []
    answer = poll_until(job, lambda ev: False, events)
    # Nothing was cut: the pipes closed with the kill (a survivor would hold them open).
    assert (answer["rc"], answer["timed_out"], answer["truncated"]) == (-9, True, False)
    assert text(events) == b"started\n"


def test_a_background_child_holding_the_pipes_counts_against_the_timeout():
    job = Job(spec("sleep 600 & echo parent done", timeout=0.5))
    answer = poll_until(job, lambda ev: False, [])
    assert answer["timed_out"] and answer["rc"] == -9 and not answer["truncated"]


def test_output_beyond_the_cap_is_read_dropped_and_marked():
    job = Job(spec(f"head -c {MAX_OUTPUT + 5000} /dev/zero; echo tail >&2"))
    events: list = []
    answer = poll_until(job, lambda ev: False, events)
    assert answer["truncated"] and answer["rc"] == 0
    assert len(text(events)) == MAX_OUTPUT and text(events, "stderr") == b"tail\n"
    assert max(len(data) for name, data in events if name == "stdout") <= jobs.POLL_CHUNK


def test_stdin_env_and_a_missing_program():
    job = Job(CommandSpec(["/bin/sh", "-c", 'cat; echo "$KD_X"'], b"in:", None, {"KD_X": "x"}))
    events: list = []
    poll_until(job, lambda ev: False, events)
    assert text(events) == b"in:x\n"
    missing = Job(CommandSpec(["/no/such/program"], b"", None, None))
    events = []
    assert poll_until(missing, lambda ev: False, events)["rc"] == 127
    assert text(events, "stderr") == b"/no/such/program: not found"


def test_the_table_is_bounded_and_forgets_a_job_after_its_end(tmp_path):
    now = [0.0]
    table = JobTable(max_jobs=2, idle_limit=100.0, clock=lambda: now[0])
    flag = tmp_path / "go"
    first = table.start(spec(released_by(flag)))
    second = table.start(spec(released_by(flag)))
    with pytest.raises(RuntimeError, match="2 commands are running already"):
        table.start(spec("true"))
    table.kill(first)
    third = table.start(spec("echo three"))
    deadline = time.monotonic() + HANG_GUARD
    out = b""
    while True:
        answer = table.poll(third, 0.2)
        out += base64.b64decode(answer["stdout"])
        if answer["done"]:
            break
        assert time.monotonic() < deadline
    assert out == b"three\n"
    with pytest.raises(ValueError, match="its end was already reported"):
        table.poll(third, 0)
    with pytest.raises(ValueError, match="no job"):
        table.poll(first, 0)            # killed: forgotten
    # A job nobody polls for the idle limit makes room for a new one.
    table.start(spec("true"))
    with pytest.raises(RuntimeError):
        table.start(spec("true"))
    now[0] = 1000.0
    table.poll(second, 0)
    table.start(spec("true"))           # the idle one (not `second`, just polled) was dropped
    assert len(table) == 2
    flag.touch()


# -- the agent: host commands (plain guests) and session operations (protected guests) ------------

def test_a_plain_guests_host_runs_jobs_and_the_agent_answers_meanwhile(pair, tmp_path):  # noqa: F811
    from qemu_kd.channel.exec_job import job_output, run_job, start_args

    client, _, _ = pair
    client.wait_ready(timeout=5)
    flag = tmp_path / "go"
    pieces = job_output(client.call, start_args(["/bin/sh", "-c", f"echo first; {released_by(flag)}; "
                                                                   "echo second"]))
    assert next(pieces) == ("stdout", b"first\n")
    assert client.ping()                # the job runs; the agent serves
    flag.touch()
    rest = list(pieces)
    assert b"".join(data for _, data in rest) == b"second\n"
    seen: list = []
    result = run_job(client.call, start_args(None, shell="cat; exit 3", stdin=b"\x00\xffbinary"),
                     lambda name, data: seen.append((name, data)))
    assert (result["rc"], result["stdout"], result["stderr"]) == (3, b"\x00\xffbinary", b"")
    assert seen == [("stdout", b"\x00\xffbinary")]


def test_a_protected_guest_serves_no_jobs_to_the_host(guest):  # noqa: F811
    for cmd in ("exec_start", "exec_poll", "exec_kill"):
        with pytest.raises(GuestError, match=f"command '{cmd}' is not served to the host"):
            guest.client.call(cmd, argv=["id"], job=1)


def test_the_tenant_streams_a_commands_output_inside_the_session(guest, tmp_path):  # noqa: F811
    session = guest.open()
    flag = tmp_path / "go"
    events: list = []

    def on_output(name, data):
        events.append((name, data))
        if b"first" in data:
            flag.touch()                # the command goes on only once the first line is here

    result = session.exec_stream(shell=f"echo first; {released_by(flag)}; echo second; echo e >&2",
                                 timeout=HANG_GUARD, on_output=on_output)
    assert events[0] == ("stdout", b"first\n")
    assert result == session.exec(shell="echo first; echo second; echo e >&2")   # as without streaming
    with pytest.raises(GuestCommandError, match="exec 'timeout' must be a positive number"):
        session.exec_stream(["true"], timeout=-1)


def test_leaving_a_stream_early_kills_the_job(guest, tmp_path):  # noqa: F811
    session = guest.open()
    pieces = session.exec_output(shell="echo first; exec sleep 600")
    assert next(pieces) == ("stdout", b"first\n")
    assert len(guest.agent._tenant_jobs) == 1
    pieces.close()
    assert len(guest.agent._tenant_jobs) == 0
    assert session.ping()["pong"]


def test_cli_exec_prints_output_as_it_arrives(monkeypatch, capfd):
    from qemu_kd.cli import exec as cli_exec
    from qemu_kd.cli.main import build_parser

    seen_before_end = []

    def fake_exec(name, argv, timeout, on_output=None):
        on_output("stdout", b"first\n")
        seen_before_end.append(capfd.readouterr().out)
        on_output("stderr", b"err\n")
        return {"exec": {"rc": 0, "stdout": "first\n", "stderr": "err\n", "timed_out": False,
                         "truncated": False}}

    monkeypatch.setattr(cli_exec, "exec_in_domain", fake_exec)
    args = build_parser().parse_args(["exec", "kd1", "--", "true"])
    assert args.func(args) == 0
    assert seen_before_end == ["first\n"]
    assert capfd.readouterr() == ("", "err\n")      # printed once, not again at the end


# -- through real guests --------------------------------------------------------------------------

def pattern(size: int) -> bytes:
    """``size`` bytes of numbered lines, the same as :data:`PATTERN_CMD` prints."""
    lines = b"".join(b"%09d\n" % i for i in range(size // 10 + 1))
    return lines[:size]


PATTERN_CMD = "python3 -c 'import sys; sys.stdout.buffer.write(b\"\".join(b\"%09d\\n\" % i for i in " \
              "range({n} // 10 + 1))[:{n}])'"



@pytest.mark.qemu
def test_three_megabytes_come_back_whole(domain):
    size = 3_000_000
    result = domain.exec(PATTERN_CMD.format(n=size))
    assert result.ok and not result.truncated, result.stderr
    assert result.stdout == pattern(size)


@pytest.mark.qemu
def test_output_over_the_cap_is_marked_truncated(protected):
    result = protected.exec("head -c 5000000 /dev/zero")
    assert result.ok and result.truncated
    assert result.stdout == bytes(MAX_OUTPUT)


@pytest.mark.qemu
def test_output_arrives_before_the_command_ends(domain):
    """The command goes on only once the caller has its first line (and has said so with another
    command: the agent serves it while the first one runs).  Without streaming it would time out."""
    flag = f"/tmp/go-{os.getpid()}"
    events: list = []

    def on_output(stream, data):
        events.append((stream, data))
        if data.startswith(b"first"):
            events.append(("touch", domain.exec(["touch", flag]).rc))

    result = domain.exec(f"echo first; {released_by(flag)}; sleep 1; echo second", timeout=300,
                         on_output=on_output)
    events.append(("end", result))
    assert result.ok and result.stdout == b"first\nsecond\n", result
    assert events == [("stdout", b"first\n"), ("touch", 0), ("stdout", b"second\n"), ("end", result)]


@pytest.mark.qemu
def test_a_90_second_command_completes_under_a_120_second_timeout(guest_artifacts):
    from test_cli import qemu_kd

    res = qemu_kd("run", "-q", "--json", "--cmd-timeout", "120", "--cmd", "sleep 90; echo done",
                  timeout=900)
    assert res.returncode == 0, res.stderr
    ran = json.loads(res.stdout)["exec"]
    assert ran["rc"] == 0 and ran["stdout"] == "done\n" and not ran["timed_out"]


def test_pattern_matches_its_command():
    import subprocess

    cmd = PATTERN_CMD.format(n=12345)
    assert subprocess.run(["/bin/sh", "-c", cmd], capture_output=True, check=True).stdout == pattern(12345)
