"""The host-facing QMP proxy: framing, policy, and real clients against a real guest."""

import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time

import pytest
from hypothesis import given, settings, strategies as st
from qemu.qmp.legacy import QEMUMonitorProtocol

from qemu_kd.platform.endpoints.audit import AuditError, AuditLog, AuditRecord
from qemu_kd.platform.endpoints.qmp_proxy import (
    ALWAYS_ALLOWED,
    MAX_MESSAGE,
    InputError,
    QmpInputSplitter,
    QmpPolicy,
    QmpProxy,
    QmpProxyError,
)
from qemu_kd.common.files import ListenPathError, claim_socket_path
from qemu_kd.platform.endpoints.allowlists import HmpAction, judge_hmp

from hmp_cases import HMP_BYPASSES, HMP_DEBUG_ONLY

MiB = 1 << 20
POLICY_TEXT = "key domain kd3 was not sealed with the DEBUG policy"


# -- framing and policy (no QEMU) ------------------------------------------------------------

def test_splitter_cuts_concatenated_and_split_messages():
    sp = QmpInputSplitter()
    out = sp.feed(b'{"execute": "stop"}{"execute":')
    assert out == [{"execute": "stop"}]
    assert sp.feed(b' "cont", "arguments": {"a": "}{\\"["}}\n') == [
        {"execute": "cont", "arguments": {"a": '}{"['}}]


def test_splitter_reports_errors_and_resynchronises():
    sp = QmpInputSplitter()
    out = sp.feed(b'} [1] "x" 5 {bad} \xff\xff\xff {"execute":"query-status"}')
    errors = [o.desc for o in out if isinstance(o, InputError)]
    values = [o for o in out if not isinstance(o, InputError)]
    assert errors[0] == "JSON parse error, expecting value"
    assert any(e.startswith("JSON parse error") and "stray" not in e for e in errors[1:])
    assert sum("stray byte 0xff" in e for e in errors) == 1     # one error per garbage run
    assert values == [[1], "x", 5, {"execute": "query-status"}]
    assert not any(o.fatal for o in out if isinstance(o, InputError))


def test_splitter_refuses_oversized_and_deeply_nested_messages():
    sp = QmpInputSplitter(max_message=1000)
    out = sp.feed(b'{"x": "' + b"a" * 2000)
    assert len(out) == 1 and out[0].fatal and "larger than 1000 bytes" in out[0].desc
    assert sp.broken and sp.feed(b'{"execute":"stop"}') == []
    sp = QmpInputSplitter(max_nesting=10)
    out = sp.feed(b"[" * 11)
    assert out[0].fatal and "nesting" in out[0].desc


@settings(max_examples=200, deadline=None)
@given(st.lists(st.binary(max_size=64), max_size=8))
def test_splitter_never_raises_and_recovers(chunks):
    sp = QmpInputSplitter(max_message=4096)
    for chunk in chunks:
        sp.feed(chunk)
    if not sp.broken:
        # a stray byte resets the parser; then a well-formed command is understood
        out = sp.feed(b'\xff{"execute": "query-status"}')
        assert out[-1] == {"execute": "query-status"}


def test_policy_without_debug_allows_only_the_harmless_list():
    pol = QmpPolicy(False, "kd3")
    for cmd in ALWAYS_ALLOWED:
        assert pol.judge(cmd, {}).allowed
    for cmd in ("pmemsave", "memsave", "dump-guest-memory", "query-memory-devices", "migrate",
                "gdbserver", "no-such-command"):
        v = pol.judge(cmd, {})
        assert not v.allowed and v.audited and POLICY_TEXT in v.reason and f"'{cmd}'" in v.reason
    assert pol.judge("human-monitor-command", {"command-line": " info   status "}).allowed
    v = pol.judge("human-monitor-command", {"command-line": "info registers"})
    assert not v.allowed and "info registers" in v.reason
    cpus = [{"cpu-index": 0, "qom-path": "/m/cpu", "thread-id": 7, "target": "x86_64",
             "props": {}, "regs": {"rip": 1}, "pc": 5}]
    assert pol.filter_result("query-cpus-fast", cpus) == [
        {"cpu-index": 0, "qom-path": "/m/cpu", "thread-id": 7, "target": "x86_64", "props": {}}]
    assert pol.filter_event({"event": "BLOCK_IO_ERROR", "data": {}}) is None
    assert pol.filter_event({"event": "GUEST_PANICKED", "data": {"action": "pause",
                                                                  "info": {"rip": 1}}}) == {
        "event": "GUEST_PANICKED", "data": {"action": "pause"}}


def test_policy_with_debug_unlocks_and_audits_debug_commands():
    pol = QmpPolicy(True, "kd3")
    for cmd in ("pmemsave", "memsave", "dump-guest-memory", "human-monitor-command",
                "query-memory-devices", "x-query-roms"):
        v = pol.judge(cmd, {"command-line": "xp /4x 0"})
        assert v.allowed and v.audited
    assert not pol.judge("query-status", {}).audited
    v = pol.judge("device_add", {})
    assert not v.allowed and "even with the DEBUG policy" in v.reason


def test_hmp_is_an_allow_list_with_and_without_debug():
    nodebug, debug = QmpPolicy(False, "kd3"), QmpPolicy(True, "kd3")

    def hmp(pol, line):
        return pol.judge("human-monitor-command", {"command-line": line})

    for pol in (nodebug, debug):
        for line in HMP_BYPASSES:
            v = hmp(pol, line)
            assert not v.allowed and v.audited and not v.run_control, (pol.debug, line)
        for line in ("info status", " info\tversion ", "info uuid", "help", "help info"):
            v = hmp(pol, line)
            assert v.allowed and not v.audited and not v.run_control, line
        # stop/cont go through the platform's exit/resume, never to QEMU as they are.
        assert hmp(pol, "stop").run_control == "stop" and hmp(pol, " cont ").run_control == "cont"
        assert not hmp(pol, 42).allowed
    for line in HMP_DEBUG_ONLY:
        v = hmp(nodebug, line)
        assert not v.allowed and POLICY_TEXT in v.reason, line
        v = hmp(debug, line)
        assert v.allowed and v.audited and not v.run_control, line
    v = hmp(debug, "o /b 0xcf9 6")
    assert v.reason == ("human-monitor-command 'o' is refused: it is not available on the host "
                        "QMP endpoint of key domain kd3, even with the DEBUG policy")
    assert "'info profile'" in hmp(debug, "info profile").reason
    assert judge_hmp("xp/8xg 0x1000", debug=True).command == "xp"     # split as QEMU splits
    assert judge_hmp("stop", debug=True, run_control=False).action is HmpAction.REFUSED


def test_audit_log_appends_records_and_rejects_garbage(tmp_path):
    log = AuditLog(tmp_path / "audit.log")
    assert log.records() == []
    log.record(domain="kd3", endpoint="qmp", action="pmemsave\n{}", allowed=False, debug=False)
    log.record(domain="kd3", endpoint="gdb", action="m 1000,4", allowed=True, debug=True)
    recs = log.records()
    assert [(r.endpoint, r.allowed, r.policy) for r in recs] == [
        ("qmp", False, "no-debug"), ("gdb", True, "debug")]
    assert recs[0].action == "pmemsave\\n{}"
    assert len((tmp_path / "audit.log").read_text().splitlines()) == 2
    assert oct((tmp_path / "audit.log").stat().st_mode & 0o777) == "0o600"
    assert AuditRecord.unpack(recs[1].pack()) == recs[1]
    with pytest.raises(AuditError):
        AuditRecord.unpack(b'{"time": 1}')
    with pytest.raises(AuditError, match="cannot write"):
        AuditLog(tmp_path / "missing" / "a.log").record(domain="d", endpoint="qmp", action="x",
                                                        allowed=True, debug=False)


def test_listen_path_must_be_free(tmp_path):
    plain = tmp_path / "file"
    plain.write_text("x")
    with pytest.raises(ListenPathError, match="not a socket"):
        claim_socket_path(str(plain))
    live = socket.socket(socket.AF_UNIX)
    live.bind(str(tmp_path / "live.sock"))
    live.listen(1)
    with pytest.raises(ListenPathError, match="already listening"):
        claim_socket_path(str(tmp_path / "live.sock"))
    live.close()
    claim_socket_path(str(tmp_path / "live.sock"))   # dead socket: removed
    assert not (tmp_path / "live.sock").exists()


def test_proxy_start_fails_clearly_when_the_monitor_is_taken(tmp_path):
    srv = socket.socket(socket.AF_UNIX)
    srv.bind(str(tmp_path / "busy.sock"))
    srv.listen(1)                     # accepts, but never greets
    proxy = QmpProxy(str(tmp_path / "p.sock"), str(tmp_path / "busy.sock"), debug=False,
                     domain="kd3", audit=AuditLog(tmp_path / "a.log"))
    proxy.connect_timeout = 0.2
    with pytest.raises(QmpProxyError, match="did not greet"):
        proxy.start()
    srv.close()


def test_proxy_start_fails_clearly_without_qemu(tmp_path, caplog):
    proxy = QmpProxy(str(tmp_path / "p.sock"), str(tmp_path / "none.sock"), debug=False,
                     domain="kd3", audit=AuditLog(tmp_path / "a.log"))
    with pytest.raises(QmpProxyError, match="cannot connect the QMP proxy of key domain kd3"):
        proxy.start()
    proxy.close()
    assert any(r.name == "qemu_kd.platform.endpoints.qmp_proxy" and r.levelno == logging.WARNING
               and "QMP endpoint of kd3 did not start" in r.getMessage() for r in caplog.records)


# -- helpers ----------------------------------------------------------------------------------

def ret(mon, command, args=None):
    reply = mon.cmd_raw(command, args)
    assert "return" in reply, reply
    return reply["return"]


def connect(path) -> QEMUMonitorProtocol:
    mon = QEMUMonitorProtocol(str(path))
    mon.connect()
    mon.settimeout(30)
    return mon


def raw_client(path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX)
    sock.connect(str(path))
    sock.settimeout(30)
    return sock


def read_messages(sock, count) -> list:
    buf, out = b"", []
    while len(out) < count:
        chunk = sock.recv(65536)
        if not chunk:
            break
        buf += chunk
        *lines, buf = buf.split(b"\n")
        out += [json.loads(line) for line in lines if line.strip()]
    return out


def status(path) -> str:
    mon = connect(path)
    try:
        return mon.cmd("query-status")["status"]
    finally:
        mon.close()


def wait_for_status(path, wanted) -> str:
    deadline = time.monotonic() + 30
    while (got := status(path)) != wanted and time.monotonic() < deadline:
        time.sleep(0.05)
    return got


class Proxies:
    """A no-debug and a debug proxy in front of the same guest."""

    def __init__(self, guest, tmp):
        self.guest = guest
        self.tmp = tmp
        self.upstreams = [guest.machine.socket_path("qmp-host"), *guest.test_monitors]
        self.audit = AuditLog(tmp / "audit.log")
        self.calls = []

    def make(self, name, debug, callbacks=False):
        m = self.guest.machine
        kwargs = {}
        if callbacks:
            kwargs = {"on_stop": lambda: (self.calls.append("stop"), m.pause()),
                      "on_cont": lambda: (self.calls.append("cont"), m.resume())}
        proxy = QmpProxy(str(self.tmp / f"{name}.sock"), self.upstreams.pop(0), debug=debug,
                         domain="kd3", audit=self.audit, **kwargs)
        proxy.start()
        return proxy


# -- against a real guest ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def guest(guest_artifacts, tmp_path_factory):
    from qemu_kd.qemu.launch import PhaseTimer, boot_plain, full_cmdline
    from qemu_kd.qemu.machine import MachineSpec

    log = tmp_path_factory.mktemp("console") / "console.log"
    # Each proxy needs a QMP monitor of its own (one client per QMP socket): besides the
    # machine's qmp-host monitor, two more for this test.
    mons = tmp_path_factory.mktemp("mon")
    extra = []
    for n in (1, 2):
        extra += ["-chardev", f"socket,id=testmon{n},path={mons}/m{n}.sock,server=on,wait=off",
                  "-mon", f"chardev=testmon{n},mode=control"]
    spec = MachineSpec(mem_size=256 * MiB, accel="tcg", name="test-qmp-proxy", extra_args=extra)
    g = boot_plain(guest_artifacts.kernel.read_bytes(), guest_artifacts.initrd.read_bytes(),
                   full_cmdline(), spec, PhaseTimer(), console_log=log)
    g.test_monitors = [str(mons / "m1.sock"), str(mons / "m2.sock")]
    yield g
    g.shutdown()


@pytest.fixture(scope="module")
def proxies(guest, tmp_path_factory):
    p = Proxies(guest, tmp_path_factory.mktemp("qmp-proxy"))
    p.plain = p.make("nodebug", False)
    p.debug = p.make("debug", True)
    p.cb = p.make("callbacks", False, callbacks=True)
    yield p
    for proxy in (p.plain, p.debug, p.cb):
        proxy.close()


@pytest.mark.qemu
def test_greeting_negotiation_and_query_status(proxies):
    mon = QEMUMonitorProtocol(proxies.plain.listen_path)
    greeting = mon.connect()
    assert greeting["QMP"]["capabilities"] == []
    assert greeting["QMP"]["version"]["qemu"]["major"] >= 7
    reply = mon.cmd_raw("query-status")
    assert reply["return"]["status"] == "running" and reply["return"]["running"] is True
    mon.close()


@pytest.mark.qemu
def test_memory_and_monitor_commands_refused_without_debug(proxies):
    before = len(proxies.audit.records())
    mon = connect(proxies.plain.listen_path)
    reply = mon.cmd_raw("pmemsave", {"val": 0x1000, "size": 16,
                                     "filename": str(proxies.tmp / "leak.bin")})
    assert reply["error"]["class"] == "GenericError"
    assert reply["error"]["desc"] == f"'pmemsave' is refused: {POLICY_TEXT}"
    reply = mon.cmd_raw("human-monitor-command", {"command-line": "xp /4x 0x1000"})
    assert POLICY_TEXT in reply["error"]["desc"] and "xp /4x 0x1000" in reply["error"]["desc"]
    for cmd in ("memsave", "dump-guest-memory", "query-memory-devices", "migrate",
                "x-does-not-exist"):
        assert POLICY_TEXT in mon.cmd_raw(cmd)["error"]["desc"]
    hmp = ret(mon, "human-monitor-command", {"command-line": "info status"})
    assert hmp.startswith("VM status")
    mon.close()
    assert not (proxies.tmp / "leak.bin").exists()
    new = proxies.audit.records()[before:]
    assert [r.allowed for r in new] == [False] * 7
    assert new[0].action.startswith("pmemsave ") and new[0].policy == "no-debug"
    assert new[1].action == 'human-monitor-command {"command-line":"xp /4x 0x1000"}'


@pytest.mark.qemu
def test_debug_policy_unlocks_memory_reads_and_audits_them(proxies):
    before = len(proxies.audit.records())
    mon = connect(proxies.debug.listen_path)
    dump = proxies.tmp / "page.bin"
    assert ret(mon, "pmemsave", {"val": 0x100000, "size": 4096, "filename": str(dump)}) == {}
    out = ret(mon, "human-monitor-command", {"command-line": "xp /4x 0x100000"})
    mon.close()
    assert dump.stat().st_size == 4096
    assert out.startswith("0000000000100000:")
    words = out.split(":", 1)[1].split()
    assert words == [f"0x{int.from_bytes(dump.read_bytes()[i:i + 4], 'little'):08x}"
                     for i in range(0, 16, 4)]
    new = proxies.audit.records()[before:]
    assert [(r.allowed, r.policy, r.action.split()[0]) for r in new] == [
        (True, "debug", "pmemsave"), (True, "debug", "human-monitor-command")]
    text = proxies.audit.path.read_text()
    assert all(w not in text for w in words if w != "0x00000000")   # never the data read


@pytest.mark.qemu
def test_filtered_query_commands_and_cpus(proxies):
    mon = connect(proxies.plain.listen_path)
    names = {c["name"] for c in mon.cmd("query-commands")}
    cpus = mon.cmd("query-cpus-fast")
    mon.close()
    assert {"query-status", "stop", "cont"} <= names <= ALWAYS_ALLOWED
    assert "pmemsave" not in names
    assert len(cpus) == 1 and set(cpus[0]) <= {"cpu-index", "qom-path", "thread-id", "target",
                                               "props"}
    mon = connect(proxies.debug.listen_path)
    debug_names = {c["name"] for c in mon.cmd("query-commands")}
    mon.close()
    assert {"pmemsave", "human-monitor-command", "query-memdev"} <= debug_names
    assert "device_add" not in debug_names


class LineClient:
    """A tiny synchronous QMP client on a raw socket (no event loop of its own, so the
    callbacks may use the machine's own QMP client meanwhile)."""

    def __init__(self, path):
        self.sock = raw_client(path)
        self.buf = b""
        self.events = []
        self.greeting = self.next()
        assert self.cmd("qmp_capabilities") == {"id": "qmp_capabilities", "return": {}}

    def next(self) -> dict:
        while b"\n" not in self.buf:
            chunk = self.sock.recv(65536)
            assert chunk, "proxy closed the connection"
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return json.loads(line)

    def cmd(self, name, args=None) -> dict:
        msg = {"execute": name, "id": name}
        if args:
            msg["arguments"] = args
        self.sock.sendall(json.dumps(msg).encode())
        while True:
            reply = self.next()
            if "event" in reply:
                self.events.append(reply["event"])
            elif reply.get("id") == name:
                return reply

    def event(self) -> str:
        if self.events:
            return self.events.pop(0)
        while "event" not in (reply := self.next()):
            pass
        return reply["event"]


@pytest.mark.qemu
def test_stop_and_cont_go_through_the_callbacks_and_events_flow(proxies):
    client = LineClient(proxies.cb.listen_path)
    assert client.cmd("stop") == {"id": "stop", "return": {}}
    assert proxies.calls == ["stop"]
    assert client.cmd("query-status")["return"]["status"] == "paused"
    assert client.event() == "STOP"
    assert client.cmd("cont") == {"id": "cont", "return": {}}
    assert proxies.calls == ["stop", "cont"]
    assert client.event() == "RESUME"
    assert client.cmd("query-status")["return"]["status"] == "running"
    client.sock.close()
    assert proxies.guest.agent.ping()


@pytest.mark.qemu
def test_stop_and_cont_forwarded_without_callbacks(proxies):
    mon = connect(proxies.plain.listen_path)
    assert mon.cmd("stop") == {}
    assert mon.cmd("query-status")["status"] == "paused"
    assert mon.cmd("cont") == {}
    assert mon.cmd("query-status")["status"] == "running"
    mon.close()
    assert proxies.guest.agent.ping()


@pytest.mark.qemu
def test_qmp_shell_driven_from_stdin(proxies):
    script = ("query-status\n"
              f"pmemsave val=4096 size=16 filename={proxies.tmp / 'shell.bin'}\n")
    res = subprocess.run([sys.executable, "-m", "qemu.qmp.qmp_shell", proxies.plain.listen_path],
                         input=script, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    replies = [json.loads(line[line.index("{"):]) for line in res.stdout.splitlines()
               if "{" in line]
    assert replies[0]["return"]["status"] == "running"
    assert replies[1]["error"]["desc"] == f"'pmemsave' is refused: {POLICY_TEXT}"
    res = subprocess.run([sys.executable, "-m", "qemu.qmp.qmp_shell", "-H",
                          proxies.debug.listen_path],
                         input="xp /2x 0x100000\n", capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and "0000000000100000:" in res.stdout


@pytest.mark.qemu
def test_concurrent_clients_each_get_their_own_replies(proxies):
    results = {}

    def worker(n):
        mon = connect(proxies.plain.listen_path)
        results[n] = [ret(mon, "query-status")["status"] for _ in range(5)]
        mon.close()

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert results == {n: ["running"] * 5 for n in range(4)}


@pytest.mark.qemu
def test_raw_protocol_errors_match_qemu(proxies):
    sock = raw_client(proxies.plain.listen_path)
    greeting = read_messages(sock, 1)[0]
    assert "QMP" in greeting
    sock.sendall(b'{"execute": "query-status", "id": 1}')
    assert read_messages(sock, 1) == [{"id": 1, "error": {
        "class": "CommandNotFound",
        "desc": "Expecting capabilities negotiation with 'qmp_capabilities'"}}]
    sock.sendall(b'{"execute": "qmp_capabilities", "id": {"k": [1]}}')
    assert read_messages(sock, 1) == [{"id": {"k": [1]}, "return": {}}]
    sock.sendall(b'[1]{"foo": 1}{"execute": 5}{"execute": "query-status", "arguments": []}'
                 b'{"arguments": {}}{"execute": "qmp_capabilities"}'
                 b'{"execute": "query-status", "id": "a"}{"execute": "pmemsave", "id": "b"}')
    replies = read_messages(sock, 8)
    assert [r["error"]["desc"] for r in replies[:6]] == [
        "QMP input must be a JSON object", "QMP input member 'foo' is unexpected",
        "QMP input member 'execute' must be a string",
        "QMP input member 'arguments' must be an object", "QMP input lacks member 'execute'",
        "Capabilities negotiation is already complete, command ignored"]
    assert replies[6] == {"id": "a", "return": {"status": "running", "singlestep": False,
                                                "running": True}}
    assert replies[7]["id"] == "b" and POLICY_TEXT in replies[7]["error"]["desc"]
    sock.close()


@pytest.mark.qemu
def test_fuzzed_input_leaves_proxy_and_guest_working(proxies):
    rnd = __import__("random").Random(5)
    junk = [b"{bad json", b"}}}]]]", b"\x00\x01\x02\xfe\xff", b'{"execute": "nope"}',
            b'{"execute": "query-status", "arguments": {"a": ' + b"[" * 100,
            b'"unterminated', b"\xc3\x28\xa0\xa1", b"{\"execute\": \"\xff\"}",
            bytes(rnd.getrandbits(8) for _ in range(20000))]
    for blob in junk:
        sock = raw_client(proxies.plain.listen_path)
        read_messages(sock, 1)
        sock.sendall(b'{"execute": "qmp_capabilities"}' + blob)
        sock.close()                                       # hang up mid-message
    # a message over the limit closes that client only
    sock = raw_client(proxies.plain.listen_path)
    read_messages(sock, 1)
    sent = 0
    try:
        sock.sendall(b'{"execute": "qmp_capabilities"}{"execute": "x", "arguments": {"s": "')
        while sent < 2 * MAX_MESSAGE:
            sock.sendall(b"a" * 65536)
            sent += 65536
    except OSError:
        pass
    replies = read_messages(sock, 3)
    assert replies[-1]["error"]["desc"].startswith("QMP message larger than")
    assert sock.recv(10) == b""                            # closed by the proxy
    sock.close()
    # a client that leaves while its command is in flight
    sock = raw_client(proxies.debug.listen_path)
    read_messages(sock, 1)
    sock.sendall(b'{"execute": "qmp_capabilities"}{"execute": "query-qmp-schema"}')
    sock.close()
    for proxy in (proxies.plain, proxies.debug):
        assert status(proxy.listen_path) == "running"
    assert proxies.guest.agent.ping()


def bare_qemu(tmp_path):
    """A CPU-less QEMU with one QMP monitor: enough for the proxy's own behaviour."""
    qmp = tmp_path / "qmp.sock"
    proc = subprocess.Popen(["qemu-system-x86_64", "-S", "-nodefaults", "-display", "none",
                             "-machine", "none", "-chardev",
                             f"socket,id=m,path={qmp},server=on,wait=off",
                             "-mon", "chardev=m,mode=control"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while not qmp.exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    return proc, qmp


@pytest.mark.qemu
def test_debug_commands_fail_closed_when_the_audit_log_cannot_be_written(tmp_path):
    proc, qmp = bare_qemu(tmp_path)
    try:
        proxy = QmpProxy(str(tmp_path / "p.sock"), str(qmp), debug=True, domain="kd3",
                         audit=AuditLog(tmp_path / "missing-dir" / "audit.log"))
        proxy.start()
        mon = connect(proxy.listen_path)
        reply = mon.cmd_raw("human-monitor-command", {"command-line": "info registers"})
        assert "is refused: cannot write the audit log" in reply["error"]["desc"]
        assert ret(mon, "query-status")["status"] == "prelaunch"     # not audited: passes
        mon.close()
        proxy.close()
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.qemu
def test_proxy_survives_qemu_going_away(tmp_path):
    """When QEMU quits, clients get a clear error; the proxy itself keeps serving."""
    proc, qmp = bare_qemu(tmp_path)
    try:
        proxy = QmpProxy(str(tmp_path / "p.sock"), str(qmp), debug=False, domain="kd3",
                         audit=AuditLog(tmp_path / "a.log"))
        proxy.start()
        mon = connect(proxy.listen_path)
        assert mon.cmd("query-status")["status"] == "prelaunch"
        assert mon.cmd("quit") == {}
        proc.wait(30)
        reply = mon.cmd_raw("query-status")
        assert reply["error"]["desc"] == "key domain kd3 is not running (its QEMU has stopped)"
        mon.close()
        assert connect(proxy.listen_path).cmd_raw("query-name")["error"]["desc"].startswith(
            "key domain kd3 is not running")
        proxy.close()
        assert not os.path.exists(proxy.listen_path)
    finally:
        proc.kill()
        proc.wait()
