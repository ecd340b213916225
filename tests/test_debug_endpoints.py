"""QMP and gdb on protected domains, and the ``qemu-kd`` domain commands.

* The CLI's own logic (names, lookup, table, console relay, tool command
  lines) without QEMU.
* A protected domain without DEBUG: real qemu.qmp, qmp-shell and gdb clients
  through the platform's proxies get the harmless part only, ``stop``/``cont``
  go through exit/resume, a canary planted in the guest shows up in nothing any
  allowed or refused command returns, and fuzzed QMP and RSP input breaks
  nothing.
* A protected domain with DEBUG: a gdb breakpoint on a kernel function is hit
  and the registers and memory read; ``pmemsave`` and HMP ``xp`` work, are
  audited, and find the canary (so the negative test can fail).
* ``qemu-kd run --keep`` in a subprocess, then ``ls``, ``qmp-shell``, ``gdb``,
  ``console`` and ``destroy`` on it, and the detached daemon goes away.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from qemu.qmp.legacy import QEMUMonitorProtocol

from protected import count_hits, protected_domain
from qemu_kd.cli import domains as domains_cli
from qemu_kd.platform.endpoints.audit import AuditLog
from qemu_kd.cli.main import main as cli_main
from qemu_kd.cli.domains import (
    DomainLookupError,
    DomainRef,
    Survey,
    format_domains,
    parse_domain_name,
    relay_console,
    resolve,
)
from qemu_kd.common.errors import ConfigError
from qemu_kd.qemu.gdbstub import checksum, frame
from qemu_kd.hostport.client import HostPortClient
from qemu_kd.platform.endpoints.qmp_proxy import ALWAYS_ALLOWED, MAX_MESSAGE
from qemu_kd.platform.endpoints.allowlists import HARMLESS_HMP

from hmp_cases import HMP_BYPASSES, HMP_DEBUG_ONLY

QEMU_KD = [sys.executable, "-m", "qemu_kd.cli.main"]
NOT_DEBUG = "was not sealed with the DEBUG policy"
# Ends a domain (or asks the guest to): kept out of the sweep over the allow-list.
ENDS_THE_DOMAIN = {"quit", "system_powerdown"}
DEBUG_ONLY_TRIES = [
    ("pmemsave", {"val": 0x100000, "size": 4096, "filename": "/dev/null"}),
    ("memsave", {"val": 0xffffffff81000000, "size": 4096, "filename": "/dev/null"}),
    ("dump-guest-memory", {"paging": False, "protocol": "file:/dev/null"}),
    ("human-monitor-command", {"command-line": "xp /64xb 0x100000"}),
    ("human-monitor-command", {"command-line": "x /8gx $rsp"}),
    ("human-monitor-command", {"command-line": "info registers"}),
    ("human-monitor-command", {"command-line": "info tlb"}),
    ("query-memory-devices", {}),
    ("query-chardev", {}),
    ("x-query-roms", {}),
    ("gdbserver", {"device": "tcp::1234"}),
    ("migrate", {"uri": "exec:cat > /dev/null"}),
    ("no-such-command", {}),
]


# -- the CLI without QEMU ----------------------------------------------------------------------

def ref(pid: int, keyid: int, *, state="LAUNCHED", debug=False, running=True, endpoints=None):
    eps = endpoints if endpoints is not None else {
        "qmp": f"/run/p{pid}/kd{keyid}-qmp.sock", "gdb": f"/run/p{pid}/kd{keyid}-gdb.sock",
        "console": f"/run/p{pid}/kd{keyid}-console.sock"}
    return DomainRef({"pid": pid, "socket": f"/run/p{pid}/platform.sock", "accel": "tcg"},
                     {"keyid": keyid, "name": f"kd{keyid}", "state": state, "running": running,
                      "policy": {"debug": debug, "hex": ""}, "endpoints": eps if running else {}})


def test_domain_names():
    assert parse_domain_name("kd3") == (None, "kd3", 3)
    assert parse_domain_name("3") == (None, "3", 3)
    assert parse_domain_name(" 4242:kd12 ") == (4242, "kd12", 12)
    assert parse_domain_name("4242:7") == (4242, "7", 7)
    assert parse_domain_name("web") == (None, "web", None)
    assert parse_domain_name("4242:kd-1") == (4242, "kd-1", None)
    for bad in ("", "1:2:3", ":kd1", "-x", "a b", "x" * 33, "web/1"):
        with pytest.raises(ConfigError, match="is not a domain name"):
            parse_domain_name(bad)


def test_lookup_unique_ambiguous_and_unknown(monkeypatch):
    monkeypatch.setattr(domains_cli, "_platforms", lambda: [{"pid": 100}, {"pid": 200}])
    found = Survey([ref(100, 1), ref(200, 1), ref(200, 2, debug=True)], [])
    assert resolve("kd2", found).platform_pid == 200
    assert resolve("200:kd1", found).platform_pid == 200
    assert resolve("100:1", found).qualified == "100:kd1"
    with pytest.raises(DomainLookupError) as err:
        resolve("kd1", found)
    assert str(err.value) == ("kd1 is on several platforms: 100:kd1, 200:kd1 "
                              "(name one of them as PID:kdN)")
    with pytest.raises(DomainLookupError, match=r"no key domain kd9 \(run `qemu-kd ls`"):
        resolve("kd9", found)
    with pytest.raises(DomainLookupError, match="no key domain kd2 on platform 100"):
        resolve("100:kd2", found)
    with pytest.raises(DomainLookupError, match="no platform daemon with pid 300"):
        resolve("300:kd1", found)
    quiet = Survey([], [({"pid": 100, "socket": "/x"}, "refused")])
    with pytest.raises(DomainLookupError, match="platform 100 did not answer"):
        resolve("kd1", quiet)


def test_endpoints_of_domains_without_a_guest_are_one_line_errors(tmp_path):
    with pytest.raises(DomainLookupError, match="kd1 is VERIFIED: it has no guest running yet"):
        domains_cli.require_endpoint(ref(1, 1, state="VERIFIED", running=False), "qmp")
    with pytest.raises(DomainLookupError, match="its QEMU has stopped"):
        domains_cli.require_endpoint(ref(1, 1, running=False), "qmp")
    with pytest.raises(DomainLookupError, match="the gdb endpoint of kd1 is gone"):
        domains_cli.require_endpoint(ref(1, 1), "gdb")
    sock = tmp_path / "q.sock"
    sock.touch()
    assert domains_cli.require_endpoint(ref(1, 1, endpoints={"qmp": str(sock)}), "qmp") == str(sock)


def test_table_names_duplicates_by_platform():
    text = format_domains([ref(100, 1), ref(200, 1, debug=True), ref(200, 2, running=False)])
    lines = text.splitlines()
    assert lines[0].split() == ["NAME", "KEYID", "STATE", "POLICY", "PLATFORM", "MEMORY", "UPTIME",
                                "QMP", "GDB", "CONSOLE"]
    assert lines[1].split()[:5] == ["100:kd1", "1", "LAUNCHED", "no-debug", "100"]
    assert lines[2].split()[:5] == ["200:kd1", "1", "LAUNCHED", "debug", "200"]
    assert lines[3].startswith("kd2 ") and "(QEMU gone)" in lines[3] and lines[3].endswith("-")
    assert "/run/p200/kd1-gdb.sock" in lines[2]


def run_cli(argv, capsys) -> tuple[int, str, str]:
    rc = cli_main(argv)
    out, err = capsys.readouterr()
    return rc, out, err


def test_ls_and_lookup_with_no_or_a_silent_platform(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("QEMU_KD_RUNTIME", str(tmp_path / "rt"))
    rc, out, err = run_cli(["ls"], capsys)
    assert (rc, out, err) == (0, "no key domains\n", "")
    rc, out, _ = run_cli(["ls", "--json"], capsys)
    assert rc == 0 and json.loads(out) == []
    rc, _, err = run_cli(["qmp-shell", "kd1"], capsys)
    assert rc == 1 and err.count("\n") == 1 and "no key domain kd1" in err and "qemu-kd ls" in err
    rc, _, err = run_cli(["destroy", "no/such"], capsys)
    assert rc == 2 and "is not a domain name" in err
    # A registered daemon that is alive but does not serve: a warning, not a crash.
    silent = socket.socket(socket.AF_UNIX)
    silent.bind(str(tmp_path / "silent.sock"))       # bound, never listening
    registry = tmp_path / "rt" / "platforms"
    (registry / f"{os.getpid()}.json").write_text(json.dumps(
        {"pid": os.getpid(), "socket": str(tmp_path / "silent.sock"), "accel": "tcg"}))
    try:
        rc, out, err = run_cli(["ls"], capsys)
        assert rc == 0 and out == "no key domains\n"
        assert err.startswith(f"qemu-kd: warning: platform {os.getpid()} ") and "did not answer" in err
        rc, _, err = run_cli(["console", "kd1"], capsys)
        assert rc == 1 and err.count("\n") == 1 and f"platform {os.getpid()} did not answer" in err
        assert "Traceback" not in err
    finally:
        silent.close()


def test_tool_command_lines(tmp_path, monkeypatch, capsys):
    qmp, gdb = tmp_path / "qmp.sock", tmp_path / "gdb.sock"
    qmp.touch()
    gdb.touch()
    monkeypatch.setattr(domains_cli, "survey", lambda: Survey(
        [ref(7, 3, endpoints={"qmp": str(qmp), "gdb": str(gdb), "console": ""})], []))
    real_exec = domains_cli.exec_program
    ran = []
    monkeypatch.setattr(domains_cli, "exec_program", ran.append)
    assert run_cli(["qmp-shell", "kd3", "-H"], capsys)[0] == 0
    assert ran[-1] == [sys.executable, "-m", "qemu.qmp.qmp_shell", "-H", str(qmp)]
    assert run_cli(["gdb", "3", "-batch", "-ex", "info registers rip"], capsys)[0] == 0
    argv = ran[-1]
    assert Path(argv[0]).name == "gdb"
    assert argv[1:] == ["-q", "-ex", "set architecture i386:x86-64", "-ex", f"target remote {gdb}",
                        "-batch", "-ex", "info registers rip"]
    rc, _, err = run_cli(["gdb", "--gdb", "no-such-gdb-here", "kd3"], capsys)
    assert rc == 2 and err.count("\n") == 1 and "no-such-gdb-here is not installed" in err
    rc, _, err = run_cli(["console", "kd3"], capsys)
    assert rc == 1 and "no console endpoint" in err
    with pytest.raises(ConfigError, match="cannot run"):
        real_exec([str(tmp_path / "missing-tool")])


@pytest.fixture
def relay_ends():
    """A console socket pair and stdin/stdout pipes; whatever a test leaves open is closed."""
    ours, theirs = socket.socketpair()
    in_r, in_w = os.pipe()
    out_r, out_w = os.pipe()
    fds = {"in_r": in_r, "in_w": in_w, "out_r": out_r, "out_w": out_w}
    yield ours, theirs, fds
    for fd in fds.values():
        try:
            os.close(fd)
        except OSError:
            pass
    ours.close()
    theirs.close()


def test_console_relay_without_a_terminal(relay_ends):
    ours, theirs, fds = relay_ends
    os.write(fds["in_w"], b"uname\n")
    os.close(fds["in_w"])
    theirs.sendall(b"login banner\n")
    start = time.monotonic()
    assert relay_console(ours, fds["in_r"], fds["out_w"], interactive=False, linger=0.3) == "stdin closed"
    assert 0.25 < time.monotonic() - start < 5
    assert theirs.recv(100) == b"uname\n"
    assert os.read(fds["out_r"], 100) == b"login banner\n"
    theirs.close()
    assert relay_console(ours, fds["in_r"], fds["out_w"], interactive=False, linger=float("inf")) \
        == "console closed"


def test_console_relay_escape_detaches(relay_ends):
    ours, theirs, fds = relay_ends
    os.write(fds["in_w"], b"ls\x1dnot sent")
    assert relay_console(ours, fds["in_r"], fds["out_w"], interactive=True) == "escape"
    theirs.setblocking(False)
    assert theirs.recv(100) == b"ls"


# -- clients used against real domains ---------------------------------------------------------

class RawQmp:
    """A QMP client on a plain socket that keeps every byte it receives."""

    def __init__(self, path: str, sink: list):
        self.sink = sink
        self.buf = b""
        self.next_id = 0
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.settimeout(60)
        self.sock.connect(path)
        self.greeting = self.read()
        assert self.cmd("qmp_capabilities") == {"return": {}}

    def read(self) -> dict:
        while b"\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError("the QMP endpoint hung up")
            self.sink.append(chunk)
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return json.loads(line)

    def cmd(self, name: str, args: dict | None = None) -> dict:
        self.next_id += 1
        msg = {"execute": name, "id": self.next_id}
        if args:
            msg["arguments"] = args
        self.sock.sendall(json.dumps(msg).encode())
        while True:
            reply = self.read()
            if reply.get("id") == self.next_id:
                del reply["id"]
                return reply

    def close(self) -> None:
        self.sock.close()


class RawRsp:
    """A GDB remote-protocol client on a plain socket that keeps every byte it receives."""

    def __init__(self, path: str, sink: list):
        self.sink = sink
        self.buf = b""
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.settimeout(30)
        self.sock.connect(path)

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def packet(self) -> bytes:
        while True:
            self.buf = self.buf.lstrip(b"+-")
            end = self.buf.find(b"#")
            if self.buf.startswith(b"$") and end >= 0 and len(self.buf) >= end + 3:
                body, self.buf = self.buf[1:end], self.buf[end + 3:]
                return body
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError("the gdb endpoint hung up")
            self.sink.append(chunk)
            self.buf += chunk

    def ask(self, payload: bytes) -> bytes:
        self.send(frame(payload))
        return self.packet()

    def close(self) -> None:
        self.sock.close()


class Gdb:
    """gdb 13 driven through gdb/MI (pygdbmi); collects every record it printed."""

    def __init__(self):
        from pygdbmi.gdbcontroller import GdbController

        self.ctl = GdbController(command=["gdb", "--nx", "--quiet", "--interpreter=mi3"],
                                 time_to_check_for_additional_output_sec=0.05)
        self.records: list = []
        self.unread: list = []
        self.token = 0
        self.mi("-gdb-set mi-async on")

    def _take(self, records) -> None:
        self.records += records
        self.unread += records

    def mi(self, command: str, timeout: float = 30.0) -> dict:
        """Run one MI command; its result record (matched by token, late records skipped)."""
        self.token += 1
        token = self.token
        self._take(self.ctl.write(f"{token}{command}", timeout_sec=timeout,
                                  raise_error_on_timeout=False))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for i, rec in enumerate(self.unread):
                if rec["type"] == "result" and rec.get("token") == token:
                    del self.unread[i]
                    return rec
            self._take(self.ctl.get_gdb_response(timeout_sec=0.5, raise_error_on_timeout=False))
        raise AssertionError(f"gdb did not answer {command!r}")

    def stopped(self, timeout: float = 60.0) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for i, rec in enumerate(self.unread):
                if rec["type"] == "notify" and rec["message"] == "stopped":
                    del self.unread[:i + 1]
                    return rec["payload"] or {}
            self._take(self.ctl.get_gdb_response(timeout_sec=0.5, raise_error_on_timeout=False))
        raise AssertionError("gdb never reported a stop")

    def output(self) -> str:
        return "\n".join(str(rec.get("payload")) for rec in self.records)

    def close(self) -> None:
        self.ctl.exit()


def kernel_symbol(dom, name: str) -> int:
    """A kernel function's address, from the guest's /proc/kallsyms (KASLR applied)."""
    res = dom.session().exec(shell=f"grep ' [Tt] {name}$' /proc/kallsyms")
    assert res["rc"] == 0, res
    return int(res["stdout"].split()[0], 16)


def ping(dom) -> bool:
    return bool(dom.agent("ping", wait=30)["pong"])


def domain_state(dom) -> str:
    return domain_status(dom)["state"]


def domain_status(dom) -> dict:
    with HostPortClient(dom.platform_socket) as client:
        return client.domain_status(dom.keyid)


def monitor_through_gdb(rsp: "RawRsp", line: str) -> tuple[str, bytes]:
    """gdb's ``monitor LINE``: the console output it printed and the final reply."""
    out = b""
    reply = rsp.ask(b"qRcmd," + line.encode().hex().encode())
    while reply[:1] == b"O" and reply != b"OK":
        out += bytes.fromhex(reply[1:].decode())
        reply = rsp.packet()
    return out.decode(errors="replace"), reply


def session_works(dom) -> bool:
    res = dom.session().exec(["echo", "alive"])
    return res["rc"] == 0 and res["stdout"] == b"alive\n"


def ok(mon: QEMUMonitorProtocol, command: str, args: dict | None = None):
    """The return value of a command that must succeed."""
    reply = mon.cmd_raw(command, args)
    assert "return" in reply, reply
    return reply["return"]


def qmp_status(path: str) -> str:
    mon = QEMUMonitorProtocol(path)
    mon.connect()
    try:
        return mon.cmd("query-status")["status"]
    finally:
        mon.close()


# -- a protected domain without DEBUG ----------------------------------------------------------

@pytest.fixture(scope="class")
def nodebug(guest_artifacts, tmp_path_factory):
    with protected_domain(tmp_path_factory.mktemp("nodebug"), guest_artifacts) as dom:
        dom.canary = os.urandom(32)
        dom.plant_secret(dom.canary)
        dom.replies = []          # every byte the proxies sent back, for the leak test
        yield dom


@pytest.mark.qemu
class TestWithoutDebug:
    def test_qmp_client_gets_status_and_refusals(self, nodebug):
        ep = nodebug.endpoints
        mon = QEMUMonitorProtocol(ep["qmp"])
        mon.connect()
        try:
            assert mon.cmd("query-status")["status"] == "running"
            who = f"key domain kd{nodebug.keyid} {NOT_DEBUG}"
            reply = mon.cmd_raw("pmemsave", {"val": 0, "size": 4096, "filename": "/dev/null"})
            assert reply["error"] == {"class": "GenericError", "desc": f"'pmemsave' is refused: {who}"}
            reply = mon.cmd_raw("human-monitor-command", {"command-line": "xp /8xg 0x100000"})
            assert reply["error"]["class"] == "GenericError"
            assert reply["error"]["desc"] == f"human-monitor-command 'xp /8xg 0x100000' is refused: {who}"
            version = ok(mon, "human-monitor-command", {"command-line": "info version"})
            assert isinstance(version, str) and version.strip()
        finally:
            mon.close()
        refused = [r for r in AuditLog(ep["audit_log"]).records() if r.endpoint == "qmp"]
        assert [r.action.split()[0] for r in refused][-2:] == ["pmemsave", "human-monitor-command"]
        assert all(not r.allowed and r.policy == "no-debug" for r in refused)

    def test_stop_and_cont_go_through_exit_and_resume(self, nodebug):
        mon = QEMUMonitorProtocol(nodebug.endpoints["qmp"])
        mon.connect()
        try:
            assert domain_status(nodebug)["guest_state"] == "running"
            assert mon.cmd("stop") == {}
            status = domain_status(nodebug)
            assert (status["state"], status["guest_state"], status["running"]) == ("EXITED", "exited",
                                                                                   True)
            assert mon.cmd("query-status")["status"] == "paused"
            assert mon.cmd("cont") == {}
            assert domain_state(nodebug) == "LAUNCHED"
            assert domain_status(nodebug)["guest_state"] == "running"
            assert mon.cmd("query-status")["status"] == "running"
        finally:
            mon.close()
        assert ping(nodebug)

    def test_hmp_is_an_allow_list_on_both_endpoints(self, nodebug):
        qmp = RawQmp(nodebug.endpoints["qmp"], nodebug.replies)
        try:
            for line in (*HMP_BYPASSES, *HMP_DEBUG_ONLY):
                reply = qmp.cmd("human-monitor-command", {"command-line": line})
                assert NOT_DEBUG in reply["error"]["desc"], (line, reply)
            assert qmp.cmd("query-status")["return"]["status"] == "running"   # s paused nothing
            assert "VM status: running" in qmp.cmd("human-monitor-command",
                                                   {"command-line": "info status"})["return"]
            # HMP stop/cont are the platform's exit and resume, as QMP stop/cont are.
            assert qmp.cmd("human-monitor-command", {"command-line": "stop"}) == {"return": ""}
            assert domain_state(nodebug) == "EXITED"
            assert qmp.cmd("human-monitor-command", {"command-line": "cont"}) == {"return": ""}
            assert domain_state(nodebug) == "LAUNCHED"
        finally:
            qmp.close()
        rsp = RawRsp(nodebug.endpoints["gdb"], nodebug.replies)
        try:
            for line in (*HMP_BYPASSES, *HMP_DEBUG_ONLY, "info status", "stop", "cont"):
                out, reply = monitor_through_gdb(rsp, line)
                assert NOT_DEBUG in out and reply == b"E01", (line, out, reply)
            assert rsp.ask(b"D") == b"OK"
        finally:
            rsp.close()
        assert ping(nodebug) and session_works(nodebug)
        assert qmp_status(nodebug.endpoints["qmp"]) == "running"
        refused = [r for r in AuditLog(nodebug.endpoints["audit_log"]).records() if not r.allowed]
        assert any(r.action == 'human-monitor-command {"command-line":"s"}' for r in refused)
        assert any(r.action == "monitor o /b 0x80 0" for r in refused)

    def test_qmp_shell_on_stdin(self, nodebug):
        script = ("query-status\n"
                  "pmemsave val=4096 size=16 filename=/dev/null\n"
                  "human-monitor-command command-line='info registers'\n")
        res = subprocess.run([sys.executable, "-m", "qemu.qmp.qmp_shell", nodebug.endpoints["qmp"]],
                             input=script, capture_output=True, text=True, timeout=60)
        assert res.returncode == 0, res.stderr
        nodebug.replies.append(res.stdout.encode())
        replies = [json.loads(line[line.index("{"):]) for line in res.stdout.splitlines()
                   if "{" in line]
        assert replies[0]["return"]["status"] == "running"
        assert NOT_DEBUG in replies[1]["error"]["desc"]
        assert NOT_DEBUG in replies[2]["error"]["desc"]

    def test_gdb_is_refused_and_the_guest_runs_on(self, nodebug):
        addr = kernel_symbol(nodebug, "schedule")
        gdb = Gdb()
        try:
            res = gdb.mi(f"-target-select remote {nodebug.endpoints['gdb']}")
            assert res["message"] == "connected"
            assert ping(nodebug)                           # attaching stopped nothing
            regs = gdb.mi("-data-list-register-values x 0 4 7")["payload"]["register-values"]
            assert [r["value"] for r in regs] == ["<unavailable>"] * 3
            res = gdb.mi("-data-list-register-values x 17")  # eflags: asked for on its own
            assert res["message"] == "error" and NOT_DEBUG in res["payload"]["msg"]
            assert gdb.mi(f"-data-read-memory-bytes {addr:#x} 16")["message"] == "error"
            assert gdb.mi("-data-read-memory-bytes 0x100000 16")["message"] == "error"
            assert gdb.mi(f"-break-insert *{addr:#x}")["message"] == "done"
            gdb.mi("-exec-continue")                       # the breakpoint cannot be inserted
            assert "Cannot insert breakpoint 1" in gdb.output()
            assert ping(nodebug)
            assert gdb.mi("-break-delete")["message"] == "done"
            assert gdb.mi("-target-detach")["message"] == "done"
        finally:
            gdb.close()
        nodebug.replies.append(gdb.output().encode())
        assert ping(nodebug)
        assert qmp_status(nodebug.endpoints["qmp"]) == "running"
        refused = {r.action.split()[0] for r in AuditLog(nodebug.endpoints["audit_log"]).records()
                   if r.endpoint == "gdb" and not r.allowed}
        assert {"p", "m", "Z"} <= refused

    def test_nothing_allowed_or_refused_reveals_the_canary(self, nodebug):
        canary = nodebug.canary
        res = nodebug.session().exec(shell="wc -c < /run/secrets/canary")
        assert res["stdout"].strip() == str(len(canary)).encode()   # it is in the guest
        sink = nodebug.replies
        qmp = RawQmp(nodebug.endpoints["qmp"], sink)
        try:
            harmless = sorted(c for c in ALWAYS_ALLOWED if c.startswith("query-"))
            # Every command of the allow-list is exercised here, save those that end the domain.
            assert set(harmless) | {"stop", "cont"} == ALWAYS_ALLOWED - ENDS_THE_DOMAIN
            for command in harmless:
                assert "return" in qmp.cmd(command), command
            for line in sorted(HARMLESS_HMP):
                assert "return" in qmp.cmd("human-monitor-command", {"command-line": line})
            assert qmp.cmd("stop") == {"return": {}}
            for command in harmless:                       # the same while exited
                assert "return" in qmp.cmd(command), command
            for command, args in DEBUG_ONLY_TRIES:
                reply = qmp.cmd(command, args)
                assert reply["error"]["class"] == "GenericError", (command, reply)
                assert NOT_DEBUG in reply["error"]["desc"], (command, reply)
            assert qmp.cmd("cont") == {"return": {}}
            listed = {c["name"] for c in qmp.cmd("query-commands")["return"]}
            assert listed <= ALWAYS_ALLOWED and "query-status" in listed
        finally:
            qmp.close()
        rsp = RawRsp(nodebug.endpoints["gdb"], sink)
        try:
            rsp.ask(b"qSupported:multiprocess+;swbreak+")
            assert rsp.ask(b"QStartNoAckMode") == b"OK"
            addr = kernel_symbol(nodebug, "schedule")
            for packet in (b"?", b"g", b"p10", b"p1b", b"p20", f"m{addr:x},40".encode(),
                           b"m100000,1000", b"x100000,100", b"qCRC:100000,1000",
                           b"qXfer:features:read:target.xml:0,ffb",
                           b"qRcmd," + b"info registers".hex().encode(),
                           f"Z0,{addr:x},1".encode(), b"s"):
                rsp.ask(packet)
                if packet.startswith(b"qRcmd"):
                    rsp.packet()                           # the refusal text, then E01
            assert rsp.ask(b"D") == b"OK"
        finally:
            rsp.close()
        assert ping(nodebug)
        nodebug.host_memory_view()                         # every page, recorded with the rest
        logs = [Path(nodebug.endpoints[k]) for k in ("console_log", "audit_log")]
        haystacks = [*sink, *nodebug.received, *(p.read_bytes() for p in logs if p.exists())]
        assert sum(map(len, sink)) > 4000 and sum(map(len, nodebug.received)) > 256 << 20
        assert count_hits(haystacks, canary) == {}

    def test_fuzzed_qmp_and_rsp_break_nothing(self, nodebug):
        ep = nodebug.endpoints

        def raw(path):
            sock = socket.socket(socket.AF_UNIX)
            sock.settimeout(30)
            sock.connect(path)
            return sock

        def drain(sock, until: bytes = b"", limit: float = 5.0) -> bytes:
            got, deadline = b"", time.monotonic() + limit
            while time.monotonic() < deadline and (not until or until not in got):
                sock.settimeout(max(0.05, deadline - time.monotonic()))
                try:
                    chunk = sock.recv(65536)
                except socket.timeout:
                    break
                if not chunk:
                    break
                got += chunk
            return got

        # QMP: one client per kind of junk; the proxy answers like QEMU and stays up.
        junk = [b'{"execute": "query-status"}',                       # before negotiation
                b'{"execute":', b"}}}", b"[1, 2]", b'"text"', b"\x00\x01\xfe\xff",
                b'{"execute": 7}', b'{"execute": "query-status", "arguments": []}',
                b'{"execute": "query-status", "exec-oob": true}', b'{"arguments": {}}',
                b'{"execute": "no-such-command"}', b'{"execute": "x-' + b"y" * 5000 + b'"}',
                b"[" * 300, b"\xc3\x28\xa0\xa1" * 50]
        for blob in junk:
            sock = raw(ep["qmp"])
            drain(sock, b"\n")                                            # greeting
            sock.sendall(blob + b"\n" + b'{"execute": "qmp_capabilities"}' + blob + b"\n")
            drain(sock, limit=0.15)
            sock.close()
        sock = raw(ep["qmp"])                                            # oversized message
        drain(sock, b"\n")
        sock.sendall(b'{"execute": "qmp_capabilities"}')
        try:
            sock.sendall(b'{"execute": "query-status", "arguments": {"a": "' + b"A" * (MAX_MESSAGE + 64))
        except OSError:
            pass                                                         # hung up on us: fine
        assert b"larger than" in drain(sock, b"larger than")
        sock.close()
        for cut in (b'{"execute": "query-sta', b'{"execute": "query-status"}'):   # hang up mid-way
            sock = raw(ep["qmp"])
            drain(sock, b"\n")
            sock.sendall(b'{"execute": "qmp_capabilities"}' + cut)
            sock.close()
        # RSP: bad checksums, garbage, an oversized packet, a hang-up mid-packet.
        rsp_junk = [b"$qC#00", b"\x00garbage\xff+-+-", b"$" + b"m" * 20000 + b"#00",
                    b"$g#6", b"}}}}$$$###", b"$m100000,4", b"\x03\x03", b"$vCont;s:1#" +
                    f"{checksum(b'vCont;s:1'):02x}".encode()]
        for blob in rsp_junk:
            sock = raw(ep["gdb"])
            sock.sendall(blob)
            drain(sock, limit=0.15)
            sock.close()
        sink = nodebug.replies
        rsp = RawRsp(ep["gdb"], sink)
        try:
            assert rsp.ask(b"qC") == b"QC01"
            assert rsp.ask(b"m100000,4") == b"E01"
            assert rsp.ask(b"D") == b"OK"
        finally:
            rsp.close()
        assert ping(nodebug)
        assert qmp_status(ep["qmp"]) == "running"
        assert domain_state(nodebug) == "LAUNCHED"


# -- a protected domain with DEBUG -------------------------------------------------------------

@pytest.fixture(scope="class")
def debugdom(guest_artifacts, tmp_path_factory):
    with protected_domain(tmp_path_factory.mktemp("debug"), guest_artifacts, debug=True) as dom:
        dom.canary = os.urandom(32)
        dom.plant_secret(dom.canary)
        yield dom


@pytest.mark.qemu
class TestWithDebug:
    def test_gdb_breakpoint_registers_and_memory(self, debugdom):
        addr = kernel_symbol(debugdom, "schedule")
        gdb = Gdb()
        try:
            res = gdb.mi(f"-target-select remote {debugdom.endpoints['gdb']}")
            assert res["message"] == "connected"
            gdb.stopped()                                  # attach stops the vCPU
            assert gdb.mi(f"-break-insert *{addr:#x}")["message"] == "done"
            assert gdb.mi("-exec-continue")["message"] == "running"
            stop = gdb.stopped()
            assert stop.get("reason") == "breakpoint-hit", stop
            assert int(stop["frame"]["addr"], 16) == addr
            regs = gdb.mi("-data-list-register-values x 0 7 16")["payload"]["register-values"]
            values = {int(r["number"]): int(r["value"], 16) for r in regs}
            assert values[16] == addr                      # rip
            assert values[7] >> 56 == 0xff                 # rsp: a kernel stack (upper half)
            mem = gdb.mi(f"-data-read-memory-bytes {addr:#x} 32")["payload"]["memory"]
            code = bytes.fromhex(mem[0]["contents"])
            assert len(code) == 32 and code != bytes(32)
            stack = gdb.mi(f"-data-read-memory-bytes {values[7]:#x} 64")["payload"]["memory"]
            assert len(bytes.fromhex(stack[0]["contents"])) == 64
            assert gdb.mi("-break-delete")["message"] == "done"
            assert gdb.mi("-target-detach")["message"] == "done"
        finally:
            gdb.close()
        assert ping(debugdom)                              # detach resumed the guest
        assert qmp_status(debugdom.endpoints["qmp"]) == "running"
        actions = [r.action for r in AuditLog(debugdom.endpoints["audit_log"]).records()
                   if r.endpoint == "gdb" and r.allowed and r.policy == "debug"]
        assert f"Z 0,{addr:x},1" in actions and "g" in actions
        assert any(a.startswith(f"m {addr:x},") for a in actions)

    def test_real_gdb_detach_after_a_qmp_stop_keeps_the_guest(self, debugdom):
        """gdb attaches, the host stops the domain through QMP (an exit: registers sealed and
        scrubbed), gdb's monitor aliases are refused, gdb detaches: the scrubbed vCPU is not
        run, and after cont the guest answers."""
        gdb = Gdb()
        mon = QEMUMonitorProtocol(debugdom.endpoints["qmp"])
        mon.connect()
        try:
            assert gdb.mi(f"-target-select remote {debugdom.endpoints['gdb']}")["message"] == "connected"
            gdb.stopped()
            assert ok(mon, "stop") == {}
            assert domain_status(debugdom)["guest_state"] == "exited"
            for line in ("s", "o 0x80 0", "system_reset"):
                res = gdb.mi(f'-interpreter-exec console "monitor {line}"')
                assert res["message"] == "error", (line, res)
            assert domain_status(debugdom)["guest_state"] == "exited"
            assert gdb.mi("-target-detach")["message"] == "done"
            gdb.close()
            gdb = None
            status = domain_status(debugdom)
            assert (status["state"], status["guest_state"]) == ("EXITED", "exited")
            assert ok(mon, "cont") == {}
        finally:
            if gdb is not None:
                gdb.close()
            mon.close()
        assert ping(debugdom) and session_works(debugdom)
        assert b"Kernel panic" not in Path(debugdom.endpoints["console_log"]).read_bytes()

    def test_debug_commands_work_are_audited_and_find_the_canary(self, debugdom, tmp_path):
        canary = debugdom.canary
        memory = debugdom.debug_memory()
        assert count_hits([memory], canary)                # the DEBUG path sees it
        gpa = memory.find(canary)
        mon = QEMUMonitorProtocol(debugdom.endpoints["qmp"])
        mon.connect()
        try:
            dump = tmp_path / "page.bin"
            assert ok(mon, "pmemsave", {"val": gpa, "size": len(canary), "filename": str(dump)}) == {}
            assert dump.read_bytes() == canary
            text = ok(mon, "human-monitor-command", {"command-line": f"xp /{len(canary)}xb {gpa:#x}"})
            shown = bytes(int(b, 16) for b in re.findall(r"0x([0-9a-f]{2})\b", text))
            assert shown == canary
            assert count_hits([dump.read_bytes(), shown], canary)
            info = ok(mon, "human-monitor-command", {"command-line": "info registers"})
            assert "RIP=" in info
            assert mon.cmd("query-status")["status"] == "running"
        finally:
            mon.close()
        assert ping(debugdom)
        records = [r for r in AuditLog(debugdom.endpoints["audit_log"]).records()
                   if r.endpoint == "qmp"]
        actions = [r.action for r in records]
        assert any(a.startswith("pmemsave ") and str(gpa) in a for a in actions)
        assert any(a.startswith("human-monitor-command ") and "xp" in a for a in actions)
        assert all(r.allowed and r.policy == "debug" for r in records)
        assert count_hits([Path(debugdom.endpoints["audit_log"]).read_bytes()], canary) == {}

    def test_cli_gdb_batch_breaks_on_a_kernel_function(self, debugdom):
        addr = kernel_symbol(debugdom, "schedule")
        name = f"{debugdom.platform_proc.pid}:kd{debugdom.keyid}"
        res = subprocess.run([*QEMU_KD, "gdb", name, "-batch", "-nx", "-ex", f"break *{addr:#x}",
                              "-ex", "continue", "-ex", "printf \"rip=%lx\\n\", $rip",
                              "-ex", "delete", "-ex", "detach"],
                             capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
        assert res.returncode == 0, res.stderr
        assert f"rip={addr:x}" in res.stdout, res.stdout + res.stderr
        assert ping(debugdom)

    def test_hmp_is_an_allow_list_on_both_endpoints(self, debugdom):
        even = "even with the DEBUG policy"
        qmp = RawQmp(debugdom.endpoints["qmp"], [])
        try:
            for line in HMP_BYPASSES:
                reply = qmp.cmd("human-monitor-command", {"command-line": line})
                assert even in reply["error"]["desc"], (line, reply)
            assert qmp.cmd("query-status")["return"]["status"] == "running"   # s paused nothing
            for line in HMP_DEBUG_ONLY:
                assert isinstance(qmp.cmd("human-monitor-command", {"command-line": line})["return"],
                                  str), line
            assert "RIP=" in qmp.cmd("human-monitor-command",
                                     {"command-line": "info registers"})["return"]
        finally:
            qmp.close()
        rsp = RawRsp(debugdom.endpoints["gdb"], [])
        try:
            assert rsp.ask(b"?").startswith(b"T")                # attached: the vCPU stopped
            for line in (*HMP_BYPASSES, "stop", "cont"):
                out, reply = monitor_through_gdb(rsp, line)
                assert "not available through the gdb endpoint" in out and even in out, (line, out)
                assert reply == b"E01"
            out, reply = monitor_through_gdb(rsp, "info status")
            assert "VM status: paused" in out and reply == b"OK"
            out, reply = monitor_through_gdb(rsp, "xp /2xg 0x100000")
            assert out.startswith("0000000000100000:") and reply == b"OK"
            assert rsp.ask(b"D") == b"OK"
        finally:
            rsp.close()
        assert ping(debugdom) and session_works(debugdom)
        assert domain_status(debugdom)["guest_state"] == "running"

    def test_gdb_detach_after_a_qmp_stop_leaves_the_vcpu_exited(self, debugdom):
        mon = QEMUMonitorProtocol(debugdom.endpoints["qmp"])
        mon.connect()
        try:
            rsp = RawRsp(debugdom.endpoints["gdb"], [])
            try:
                assert rsp.ask(b"?").startswith(b"T")            # attach: the vCPU stops
                assert domain_status(debugdom)["guest_state"] == "paused"
                assert ok(mon, "stop") == {}                     # exit: registers sealed, scrubbed
                assert rsp.ask(b"D") == b"OK"                    # the vCPU ran when gdb attached
            finally:
                rsp.close()
            # A second session begins only after the first one has cleaned up.
            rsp = RawRsp(debugdom.endpoints["gdb"], [])
            try:
                assert rsp.ask(b"?").startswith(b"T")
                assert rsp.ask(b"D") == b"OK"
            finally:
                rsp.close()
            # Detaching did not run the scrubbed vCPU: the domain stays exited until cont.
            status = domain_status(debugdom)
            assert (status["state"], status["guest_state"]) == ("EXITED", "exited")
            assert mon.cmd("query-status")["running"] is False
            assert ok(mon, "cont") == {}
            assert domain_status(debugdom)["guest_state"] == "running"
        finally:
            mon.close()
        assert ping(debugdom) and session_works(debugdom)
        assert b"Kernel panic" not in Path(debugdom.endpoints["console_log"]).read_bytes()

    def test_qmp_stop_and_cont_under_gdb_then_detach_keep_the_guest(self, debugdom):
        mon = QEMUMonitorProtocol(debugdom.endpoints["qmp"])
        mon.connect()
        try:
            rsp = RawRsp(debugdom.endpoints["gdb"], [])
            try:
                assert rsp.ask(b"?").startswith(b"T")
                assert ok(mon, "stop") == {}
                assert domain_status(debugdom)["guest_state"] == "exited"
                assert ok(mon, "cont") == {}                     # resume: registers restored
                assert rsp.ask(b"D") == b"OK"
            finally:
                rsp.close()
        finally:
            mon.close()
        assert ping(debugdom) and session_works(debugdom)
        assert domain_status(debugdom)["guest_state"] == "running"
        assert b"Kernel panic" not in Path(debugdom.endpoints["console_log"]).read_bytes()

    # Last in this class: it exits and resumes the domain.
    def test_gdb_continue_after_a_qmp_stop_keeps_the_guest(self, debugdom):
        mon = QEMUMonitorProtocol(debugdom.endpoints["qmp"])
        mon.connect()
        try:
            assert ok(mon, "stop") == {}                   # exit: registers sealed and scrubbed
            rsp = RawRsp(debugdom.endpoints["gdb"], [])
            try:
                assert rsp.ask(b"?").startswith(b"T")
                # The vCPU's registers are sealed in the save area: gdb may not run it.
                out = rsp.ask(b"c")
                assert out.startswith(b"O") and b"is exited" in bytes.fromhex(out[1:].decode())
                assert rsp.packet() == b"E01"
                # Nor may gdb's monitor bypass the platform's resume.
                out = rsp.ask(b"qRcmd," + b"cont".hex().encode())
                assert b"not available through the gdb endpoint" in bytes.fromhex(out[1:].decode())
                assert rsp.packet() == b"E01"
                assert rsp.ask(b"D") == b"OK"
            finally:
                rsp.close()
            # HMP cont goes through the platform's resume, like QMP cont.
            assert debugdom.vmm.client.domain_status(debugdom.keyid)["state"] == "EXITED"
            assert ok(mon, "human-monitor-command", {"command-line": "cont"}) == ""
            assert debugdom.vmm.client.domain_status(debugdom.keyid)["state"] == "LAUNCHED"
            # Commands that change the machine stay refused under DEBUG.
            err = mon.cmd_raw("human-monitor-command", {"command-line": "system_reset"})["error"]
            assert "even with the DEBUG policy" in err["desc"]
        finally:
            mon.close()
        assert ping(debugdom)


# -- qemu-kd run --keep, then the domain commands on it ----------------------------------------

def pid_alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    return not pid_alive(pid)


@pytest.mark.qemu
def test_run_keep_then_ls_qmp_shell_gdb_console_destroy(guest_artifacts):
    # A runtime directory of its own, so other platforms on this machine do not show up.
    runtime = tempfile.mkdtemp(prefix="kdrt-")
    env = {**os.environ, "QEMU_KD_RUNTIME": runtime}
    pid = None

    def cli(*argv, **kw):
        return subprocess.run([*QEMU_KD, *argv], capture_output=True, env=env,
                              timeout=kw.pop("timeout", 60), **kw)

    try:
        run = cli("run", "--keep", "--json", "-q", "--cmd", "true", timeout=600,
                  stdin=subprocess.DEVNULL)
        assert run.returncode == 0, run.stderr
        out = json.loads(run.stdout)
        kept = out["kept"]
        pid, name = int(kept["platform_pid"]), kept["name"]
        assert pid_alive(pid) and name == f"kd{out['keyid']}"

        ls = cli("ls", "--json")
        assert ls.returncode == 0, ls.stderr
        [listed] = json.loads(ls.stdout)
        assert listed["name"] == name and listed["platform"]["pid"] == pid
        assert listed["state"] == "LAUNCHED" and listed["running"] is True
        assert listed["policy"]["debug"] is False
        assert listed["endpoints"]["qmp"] == out["endpoints"]["qmp"]
        table = cli("ls").stdout.decode().splitlines()
        assert table[0].split()[0] == "NAME"
        assert table[1].split()[:5] == [name, str(out["keyid"]), "LAUNCHED", "no-debug", str(pid)]

        shell = cli("qmp-shell", name, input=b"query-status\npmemsave val=0 size=8 filename=/dev/null\n")
        assert shell.returncode == 0, shell.stderr
        replies = [json.loads(line[line.index("{"):]) for line in shell.stdout.decode().splitlines()
                   if "{" in line]
        assert replies[0]["return"]["status"] == "running"
        assert NOT_DEBUG in replies[1]["error"]["desc"]

        gdb = cli("gdb", f"{pid}:{name}", "-batch", "-nx", "-ex", "info registers eflags",
                  "-ex", "detach", stdin=subprocess.DEVNULL)
        assert gdb.returncode == 0, gdb.stderr
        assert NOT_DEBUG in gdb.stdout.decode() + gdb.stderr.decode()

        # Without DEBUG the console carries output only: input reaches no shell.
        console = cli("console", str(out["keyid"]), "--linger", "2",
                      input=b"\necho kd-console-$((6*7))\n")
        assert console.returncode == 0, console.stderr
        assert b"kd-console-42" not in console.stdout, console.stdout

        # On a terminal: raw mode, Ctrl-] detaches.
        import pexpect

        term = pexpect.spawn(QEMU_KD[0], [*QEMU_KD[1:], "console", name], env=env, timeout=30)
        try:
            term.expect("escape character is")
            term.send("\x1d")
            term.expect(f"detached from the console of {name}")
            term.expect(pexpect.EOF)
        finally:
            term.close(force=True)
        assert term.exitstatus == 0

        bad = cli("console", "kd63")
        assert bad.returncode == 1 and bad.stderr.count(b"\n") == 1 and b"qemu-kd ls" in bad.stderr

        destroy = cli("destroy", name, timeout=120)
        assert destroy.returncode == 0, destroy.stderr
        assert f"{name} destroyed".encode() in destroy.stdout
        assert wait_gone(pid, 30), "the detached platform daemon did not exit"
        assert not list(Path("/dev/shm").glob(f"qemu-kd-{pid}-*"))
        assert not list(Path(runtime).glob(f"qemu-kd-{pid}-*"))
        assert not list(Path(runtime, "platforms").glob("*.json"))
        # The run's work directory, the platform's DRAM directory, the machine's sockets: all gone.
        assert sorted(p.name for p in Path(runtime).iterdir()) == ["platforms"]
        ls = cli("ls")
        assert ls.returncode == 0 and ls.stdout == b"no key domains\n"
        assert cli("destroy", name).returncode == 1
    finally:
        if pid is not None and pid_alive(pid):
            os.kill(pid, signal.SIGTERM)
            if not wait_gone(pid, 20):
                os.kill(pid, signal.SIGKILL)
                wait_gone(pid, 5)
        shutil.rmtree(runtime, ignore_errors=True)
