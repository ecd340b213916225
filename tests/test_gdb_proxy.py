"""The host-facing gdb proxy: RSP framing, the policy, gdb itself against a real guest."""

import logging
import socket
import threading
import time

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from qemu_kd.platform.endpoints.audit import AuditLog
from qemu_kd.platform.endpoints.gdb_proxy import (
    GdbProxy,
    MAX_PACKET,
    is_continue,
    is_step,
    monitor_refusal,
    summarize,
)
from qemu_kd.qemu.gdbstub import checksum, frame

from hmp_cases import HMP_BYPASSES, HMP_DEBUG_ONLY

MiB = 1 << 20
POLICY_TEXT = "key domain kd3 was not sealed with the DEBUG policy"


class Rsp:
    """A raw RSP client for tests: sends packets, reads acks and replies."""

    def __init__(self, path):
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.connect(str(path))
        self.sock.settimeout(30)
        self.buf = b""
        self.acks = b""

    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _fill(self):
        chunk = self.sock.recv(65536)
        if not chunk:
            raise EOFError("proxy closed the connection")
        self.buf += chunk

    def reply(self) -> bytes:
        while True:
            while self.buf[:1] in (b"+", b"-"):
                self.acks += self.buf[:1]
                self.buf = self.buf[1:]
            end = self.buf.find(b"#")
            if self.buf[:1] == b"$" and end >= 0 and len(self.buf) >= end + 3:
                body, cs = self.buf[1:end], self.buf[end + 1:end + 3]
                self.buf = self.buf[end + 3:]
                assert cs == f"{checksum(body):02x}".encode()
                return body
            self._fill()

    def ack(self) -> bytes:
        while not self.buf:
            self._fill()
        byte, self.buf = self.buf[:1], self.buf[1:]
        return byte

    def ask(self, payload: bytes) -> bytes:
        self.sock.sendall(frame(payload))
        return self.reply()

    def close(self):
        self.sock.close()


# -- packet classification -------------------------------------------------------------------

def test_summaries_never_carry_data():
    assert summarize(b"M1000,4:deadbeef") == "M 1000,4"
    assert summarize(b"X1000,2:\x01\x02") == "X 1000,2"
    assert summarize(b"P10=0010000000000000") == "P 10"
    assert summarize(b"G" + b"00" * 100) == "G (100 bytes)"
    assert summarize(b"qRcmd," + b"info registers".hex().encode()) == "monitor info registers"
    assert summarize(b"mffffffff81000000,40") == "m ffffffff81000000,40"


def test_step_and_continue_classification():
    assert is_step(b"s") and is_step(b"vCont;s:1;c") and is_step(b"vCont;r1,2:1")
    assert not is_step(b"vCont;c") and not is_step(b"c")
    assert is_continue(b"c") and is_continue(b"C05") and is_continue(b"vCont;c:01")
    assert not is_continue(b"vCont;s:1") and not is_continue(b"vCont?")


# -- without DEBUG: the proxy never talks to QEMU, so no guest is needed ------------------

@pytest.fixture
def nodebug(tmp_path):
    audit = AuditLog(tmp_path / "audit.log")
    proxy = GdbProxy(str(tmp_path / "gdb.sock"), None, debug=False, domain="kd3", audit=audit)
    proxy.start()
    yield proxy
    proxy.close()


def test_handshake_acks_and_no_ack_mode(nodebug):
    c = Rsp(nodebug.listen_path)
    c.send_raw(b"+")
    features = c.ask(b"qSupported:multiprocess+;swbreak+")
    assert c.acks == b"+"
    assert b"PacketSize=1000" in features and b"QStartNoAckMode+" in features
    assert c.ask(b"QStartNoAckMode") == b"OK"
    assert c.ask(b"qC") == b"QC01" and c.acks == b"++"     # no more acks now
    assert c.ask(b"qfThreadInfo") == b"m01" and c.ask(b"qsThreadInfo") == b"l"
    assert c.ask(b"qAttached") == b"1" and c.ask(b"Hg0") == b"OK"
    assert c.ask(b"vCont?") == b"vCont;c;C"
    assert c.ask(b"?").startswith(b"T05")
    xml = c.ask(b"qXfer:features:read:target.xml:0,ffb")
    assert xml.startswith(b"l") and b"<architecture>i386:x86-64</architecture>" in xml
    assert c.ask(b"qXfer:features:read:target.xml:10,4") == b"m" + xml[1 + 0x10:1 + 0x14]
    assert c.ask(b"qSomethingNew") == b""
    assert c.ask(b"D") == b"OK"
    with pytest.raises(EOFError):
        c.reply()


def test_everything_that_reveals_the_guest_is_refused_and_audited(nodebug):
    c = Rsp(nodebug.listen_path)
    c.ask(b"QStartNoAckMode")
    regs = c.ask(b"g")
    assert regs == b"x" * 256 + b"0" * 16         # rax..r15 unavailable, placeholder rip
    assert c.ask(b"p10") == b"E." + POLICY_TEXT.encode()
    refused = [b"G" + b"00" * 64, b"P0=0100000000000000", b"m1000,4", b"M1000,1:00",
               b"X1000,1:\x00", b"Z0,ffffffff81000000,1", b"z0,ffffffff81000000,1", b"s",
               b"vCont;s:1", b"qCRC:1000,4"]
    for packet in refused:
        assert c.ask(packet) == b"E01", packet
    c.send_raw(frame(b"qRcmd," + b"info registers".hex().encode()))
    out = c.reply()
    assert out[:1] == b"O" and POLICY_TEXT in bytes.fromhex(out[1:].decode()).decode()
    assert c.reply() == b"E01"
    c.close()
    records = nodebug.audit.records()
    assert all(not r.allowed and r.policy == "no-debug" and r.endpoint == "gdb" for r in records)
    assert [r.action for r in records][:4] == ["p 10", "G (64 bytes)", "P 0", "m 1000,4"]
    assert "monitor info registers" in [r.action for r in records]


def test_continue_without_debug_waits_for_ctrl_c(nodebug):
    c = Rsp(nodebug.listen_path)
    c.ask(b"QStartNoAckMode")
    c.send_raw(frame(b"vCont;c"))
    c.sock.settimeout(0.2)
    with pytest.raises(socket.timeout):        # no stop reply: the guest "runs"
        c.reply()
    c.sock.settimeout(30)
    c.send_raw(b"\x03")
    assert c.reply().startswith(b"T02")
    assert c.ask(b"qC") == b"QC01"


def test_bad_checksums_garbage_and_oversized_packets(nodebug):
    c = Rsp(nodebug.listen_path)
    c.send_raw(b"$qC#00")
    assert c.ack() == b"-"                              # NAK while acks are on
    c.send_raw(b"\x00garbage\xff+++" + frame(b"qC"))
    assert c.ack() == b"+" and c.reply() == b"QC01"
    c.send_raw(b"-")                                    # NAK from us: the reply is resent
    assert c.reply() == b"QC01"
    c.send_raw(b"$" + b"m" * (MAX_PACKET + 10) + b"#00")
    assert c.ack() == b"+" and c.reply() == b"E01"
    c.send_raw(b"$" + b"a" * (3 * MAX_PACKET))          # no end in sight
    c.send_raw(b"#00")
    assert c.ack() == b"+" and c.reply() == b"E01"
    assert c.ask(b"qC") == b"QC01"
    c.send_raw(b"$qfThreadIn")                          # truncated, then hang up
    c.close()
    c = Rsp(nodebug.listen_path)
    assert c.ask(b"qC") == b"QC01"


def test_sessions_are_logged(nodebug, caplog):
    caplog.set_level(logging.INFO, logger="qemu_kd.platform.endpoints.gdb_proxy")
    c = Rsp(nodebug.listen_path)
    assert c.ask(b"qC") == b"QC01"
    assert c.ask(b"D") == b"OK"
    c.close()
    deadline = time.monotonic() + 10
    while not any("session ended" in r.getMessage() for r in caplog.records) \
            and time.monotonic() < deadline:
        time.sleep(0.02)
    messages = [r.getMessage() for r in caplog.records
                if r.name == "qemu_kd.platform.endpoints.gdb_proxy"]
    assert "gdb endpoint of kd3: session started (no DEBUG policy)" in messages
    assert "gdb endpoint of kd3: session ended" in messages


def test_a_second_debugger_is_turned_away(nodebug):
    nodebug.handover_wait = 0.1
    first = Rsp(nodebug.listen_path)
    assert first.ask(b"qC") == b"QC01"
    second = Rsp(nodebug.listen_path)
    assert second.ask(b"qSupported") == b"E.another debugger is attached to key domain kd3"
    with pytest.raises(EOFError):
        second.reply()
    assert first.ask(b"qC") == b"QC01"
    first.close()


def test_close_ends_the_session_and_removes_the_socket(tmp_path):
    proxy = GdbProxy(str(tmp_path / "g.sock"), None, debug=False, domain="kd3",
                     audit=AuditLog(tmp_path / "a.log"))
    proxy.start()
    c = Rsp(proxy.listen_path)
    assert c.ask(b"qC") == b"QC01"
    proxy.close()
    with pytest.raises((EOFError, ConnectionResetError)):
        c.reply()
    assert not (tmp_path / "g.sock").exists()


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.binary(max_size=300))
def test_random_bytes_never_break_the_proxy(nodebug, junk):
    c = Rsp(nodebug.listen_path)
    c.send_raw(junk)
    c.close()
    c = Rsp(nodebug.listen_path)
    assert c.ask(b"qC") == b"QC01"
    c.close()


# -- against a real guest ---------------------------------------------------------------------

# -- with DEBUG, against a stand-in gdbstub: run control ---------------------------------------

class FakeStub:
    """A stopped-on-attach gdbstub that records every packet the proxy sends it."""

    def __init__(self):
        self.sent: list[bytes] = []

    def discard_pending(self):
        pass

    def send_packet(self, payload: bytes):
        self.sent.append(payload)

    def read_stop_reply(self) -> bytes:
        return b"T02thread:01;"       # the vCPU was running when gdb attached

    def request(self, payload: bytes) -> bytes:
        self.sent.append(payload)
        return b"OK"


@pytest.fixture
def exitable(tmp_path):
    """A DEBUG proxy whose platform reports the domain exited once ``state['exited']`` is set."""
    stub, state, checked = FakeStub(), {"exited": False, "paused": True}, threading.Event()

    def may_run():
        checked.set()
        return "key domain kd3 is exited" if state["exited"] else None

    proxy = GdbProxy(str(tmp_path / "gdb.sock"), stub, debug=True, domain="kd3",
                     audit=AuditLog(tmp_path / "audit.log"), may_run=may_run,
                     vcpu_paused=lambda: state["paused"])
    proxy.start()
    yield proxy, stub, state, checked
    proxy.close()


def test_detach_never_continues_an_exited_vcpu(exitable):
    proxy, stub, state, _ = exitable
    c = Rsp(proxy.listen_path)
    assert c.ask(b"qC") == b"QC01"            # attach: the vCPU is stopped, it was running
    assert stub.sent == [b"?"]
    state["exited"] = True                    # QMP stop: the platform exits the domain
    assert c.ask(b"D") == b"OK"
    c.close()
    proxy.close()                             # waits for the session's clean-up
    assert b"c" not in stub.sent, stub.sent   # it stays paused until the platform resumes it


def test_detach_resumes_a_vcpu_that_may_run(exitable):
    proxy, stub, _, _ = exitable
    c = Rsp(proxy.listen_path)
    assert c.ask(b"qC") == b"QC01"
    assert c.ask(b"D") == b"OK"
    c.close()
    proxy.close()
    assert stub.sent == [b"?", b"c"]


def test_detach_leaves_a_vcpu_alone_that_the_platform_resumed(exitable):
    proxy, stub, state, _ = exitable
    c = Rsp(proxy.listen_path)
    assert c.ask(b"qC") == b"QC01"
    state["paused"] = False                   # QMP stop, then cont: exit and resume
    assert c.ask(b"D") == b"OK"
    c.close()
    proxy.close()
    assert stub.sent == [b"?"]                # a packet would stop the running vCPU


def test_an_exit_between_the_run_check_and_the_continue_wins(exitable):
    proxy, stub, state, checked = exitable
    c = Rsp(proxy.listen_path)
    assert c.ask(b"qC") == b"QC01"
    checked.clear()
    with proxy.run_lock:                      # the platform, marking the domain exited
        c.send_raw(frame(b"c"))
        assert checked.wait(30)               # the proxy checked (not exited yet) ...
        state["exited"] = True                # ... and the exit comes before its continue
    out = c.reply()
    assert out[:1] == b"O" and b"is exited" in bytes.fromhex(out[1:].decode())
    assert c.reply() == b"E01"
    assert b"c" not in stub.sent, stub.sent
    assert c.ask(b"D") == b"OK"
    c.close()


def test_monitor_commands_follow_the_hmp_allow_list():
    def refusal(line: str):
        return monitor_refusal(b"qRcmd," + line.encode().hex().encode(), "kd3")

    for line in (*HMP_BYPASSES, "stop", "cont"):
        assert "not available through the gdb endpoint of key domain kd3" in refusal(line), line
    for line in ("info status", *HMP_DEBUG_ONLY):
        assert refusal(line) is None, line
    assert "not hex-encoded" in monitor_refusal(b"qRcmd,zz", "kd3")


@pytest.fixture(scope="module")
def guest(guest_artifacts, tmp_path_factory):
    from qemu_kd.qemu.launch import PhaseTimer, boot_plain, full_cmdline
    from qemu_kd.qemu.machine import MachineSpec

    log = tmp_path_factory.mktemp("console") / "console.log"
    spec = MachineSpec(mem_size=256 * MiB, accel="tcg", name="test-gdb-proxy")
    g = boot_plain(guest_artifacts.kernel.read_bytes(), guest_artifacts.initrd.read_bytes(),
                   full_cmdline(), spec, PhaseTimer(), console_log=log)
    yield g
    g.shutdown()


@pytest.fixture(scope="module")
def schedule_addr(guest) -> int:
    res = guest.agent.exec(["/bin/sh", "-c", "grep ' T schedule$' /proc/kallsyms"])
    assert res["rc"] == 0, res
    return int(res["stdout"].split()[0], 16)


@pytest.fixture
def proxy_for(guest, tmp_path):
    made = []

    def make(debug):
        p = GdbProxy(str(tmp_path / f"gdb-{len(made)}.sock"), guest.machine.rsp, debug=debug,
                     domain="kd3", audit=AuditLog(tmp_path / "audit.log"))
        p.start()
        made.append(p)
        return p

    yield make
    for p in made:
        p.close()


class Gdb:
    """gdb/MI through pygdbmi, with a wait for asynchronous records."""

    def __init__(self):
        from pygdbmi.gdbcontroller import GdbController

        self.ctl = GdbController(command=["gdb", "--nx", "--quiet", "--interpreter=mi3"],
                                 time_to_check_for_additional_output_sec=0.05)
        self.pending = []
        self.run("-gdb-set mi-async on")

    def run(self, command: str) -> dict:
        """Send a command; its result record (``done``/``error``/...) and the rest."""
        records = self.ctl.write(command, timeout_sec=30, raise_error_on_timeout=False)
        deadline = time.monotonic() + 30
        while not any(r["type"] == "result" for r in records) and time.monotonic() < deadline:
            records += self.ctl.get_gdb_response(timeout_sec=1, raise_error_on_timeout=False)
        self.pending += records
        result = next(r for r in records if r["type"] == "result")
        return result

    def wait_stopped(self) -> dict:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            for i, r in enumerate(self.pending):
                if r["type"] == "notify" and r["message"] == "stopped":
                    del self.pending[:i + 1]
                    return r["payload"]
            self.pending += self.ctl.get_gdb_response(timeout_sec=1,
                                                      raise_error_on_timeout=False)
        raise AssertionError("gdb never reported a stop")

    def text(self) -> str:
        return "".join(str(r.get("payload")) for r in self.pending)

    def close(self):
        self.ctl.exit()


@pytest.mark.qemu
def test_gdb_with_debug_breaks_reads_and_detaches(guest, proxy_for, schedule_addr):
    proxy = proxy_for(True)
    gdb = Gdb()
    try:
        assert gdb.run(f"-target-select remote {proxy.listen_path}")["message"] == "connected"
        gdb.wait_stopped()
        assert gdb.run(f"-break-insert *{schedule_addr:#x}")["message"] == "done"
        assert gdb.run("-exec-continue")["message"] == "running"
        stop = gdb.wait_stopped()
        assert stop["reason"] == "breakpoint-hit"
        assert int(stop["frame"]["addr"], 16) == schedule_addr
        regs = gdb.run("-data-list-register-values x 16 7")["payload"]["register-values"]
        values = {r["number"]: int(r["value"], 16) for r in regs}
        assert values["16"] == schedule_addr                      # rip
        assert values["7"] >> 56 == 0xff                          # a kernel stack pointer
        mem = gdb.run(f"-data-read-memory-bytes {schedule_addr:#x} 16")["payload"]["memory"]
        code = bytes.fromhex(mem[0]["contents"])
        assert len(code) == 16 and code != bytes(16)
        assert gdb.run("-break-delete")["message"] == "done"
        assert gdb.run("-exec-continue")["message"] == "running"
        assert guest.agent.ping()                                  # runs under gdb
        assert gdb.run("-exec-interrupt")["message"] == "done"
        assert gdb.wait_stopped()["signal-name"] == "SIGINT"
        assert gdb.run("-target-detach")["message"] == "done"
    finally:
        gdb.close()
    assert guest.agent.ping()
    actions = [r.action for r in proxy.audit.records() if r.allowed and r.policy == "debug"]
    assert "g" in actions and f"Z 0,{schedule_addr:x},1" in actions
    assert any(a.startswith(f"m {schedule_addr:x},") for a in actions)
    assert code.hex() not in proxy.audit.path.read_text()


@pytest.mark.qemu
def test_gdb_without_debug_is_refused_and_the_guest_runs_on(guest, proxy_for, schedule_addr):
    proxy = proxy_for(False)
    gdb = Gdb()
    try:
        assert gdb.run(f"-target-select remote {proxy.listen_path}")["message"] == "connected"
        assert guest.agent.ping()          # attaching did not stop the guest
        res = gdb.run("-data-list-register-values x 0 7")
        assert [r["value"] for r in res["payload"]["register-values"]] == ["<unavailable>"] * 2
        res = gdb.run("-data-list-register-values x 17")
        assert res["message"] == "error" and POLICY_TEXT in res["payload"]["msg"]
        res = gdb.run(f"-data-read-memory-bytes {schedule_addr:#x} 16")
        assert res["message"] == "error"
        res = gdb.run('-interpreter-exec console "monitor info registers"')
        assert res["message"] == "error" and POLICY_TEXT in gdb.text()
        assert gdb.run(f"-break-insert *{schedule_addr:#x}")["message"] == "done"
        gdb.run("-exec-continue")          # inserting the breakpoint fails: aborted
        assert "Cannot insert breakpoint 1" in gdb.text()
        assert gdb.run("-target-detach")["message"] == "done"
    finally:
        gdb.close()
    assert guest.agent.ping()
    refused = {r.action.split()[0] for r in proxy.audit.records() if not r.allowed}
    assert {"p", "m", "Z", "monitor"} <= refused


@pytest.mark.qemu
def test_debug_client_vanishing_mid_continue_leaves_guest_running(guest, proxy_for,
                                                                   schedule_addr):
    proxy = proxy_for(True)
    c = Rsp(proxy.listen_path)
    assert c.ask(b"QStartNoAckMode") == b"OK"
    assert c.ask(b"?")[:1] == b"T"
    assert c.ask(f"Z0,{schedule_addr:x},1".encode()) == b"OK"
    c.send_raw(frame(b"c"))                       # the breakpoint is hit at once...
    c.close()                                     # ...but nobody is there any more
    c = Rsp(proxy.listen_path)                    # a new session after the cleanup
    assert c.ask(b"qC") == b"QC01"
    assert c.ask(b"D") == b"OK"
    c.close()
    assert guest.agent.ping()                     # breakpoint gone, vCPU resumed
    # the same, but the client leaves while stopped at the breakpoint
    c = Rsp(proxy.listen_path)
    assert c.ask(f"Z0,{schedule_addr:x},1".encode()) == b"OK"
    assert c.ask(b"c").startswith(b"T05")
    c.close()
    assert guest.agent.ping()
    assert guest.machine.qmp.cmd("query-status")["status"] == "running"


@pytest.mark.qemu
def test_debug_session_pauses_and_resumes_through_the_callbacks(guest, tmp_path):
    calls = []
    m = guest.machine
    proxy = GdbProxy(str(tmp_path / "cb.sock"), m.rsp, debug=True, domain="kd3",
                     audit=AuditLog(tmp_path / "a.log"),
                     on_stop=lambda: (calls.append("stop"), m.pause()),
                     on_cont=lambda: (calls.append("cont"), m.resume()))
    proxy.start()
    try:
        c = Rsp(proxy.listen_path)
        assert c.ask(b"?").startswith(b"T05")
        assert calls == ["stop"]
        assert m.qmp.cmd("query-status")["status"] == "paused"
        assert c.ask(b"D") == b"OK"
        c.close()
        c = Rsp(proxy.listen_path)            # served after the first session's cleanup
        assert c.ask(b"D") == b"OK"           # attach and detach again
        assert calls[:3] == ["stop", "cont", "stop"]
        c.close()
    finally:
        proxy.close()
    assert calls == ["stop", "cont", "stop", "cont"]
    assert m.qmp.cmd("query-status")["status"] == "running"
    assert guest.agent.ping()


@pytest.mark.qemu
def test_debug_proxy_survives_fuzzed_rsp(guest, proxy_for):
    proxy = proxy_for(True)
    inputs = [b"$qC#00", b"\x00\x01garbage\xff", b"$m1000,4",
              b"$" + b"m" * (MAX_PACKET + 5) + b"#00",
              b"$g#6" + b"$$$###", b"+-+-" * 100, b"}" * 1000]
    for blob in inputs:
        c = Rsp(proxy.listen_path)
        c.send_raw(blob)
        c.close()
    c = Rsp(proxy.listen_path)
    reply = c.ask(b"g")
    assert len(reply) > 16 * 16 and all(ch in b"0123456789abcdefx" for ch in reply)
    assert c.ask(b"D") == b"OK"
    c.close()
    assert guest.agent.ping()


@pytest.mark.qemu
def test_debug_requests_fail_closed_without_an_audit_log(guest, tmp_path):
    proxy = GdbProxy(str(tmp_path / "g.sock"), guest.machine.rsp, debug=True, domain="kd3",
                     audit=AuditLog(tmp_path / "missing-dir" / "audit.log"))
    proxy.start()
    try:
        c = Rsp(proxy.listen_path)
        assert c.ask(b"g") == b"E01" and c.ask(b"m1000,4") == b"E01"
        assert c.ask(b"qC") == b"QC01"
        assert c.ask(b"D") == b"OK"
        c.close()
    finally:
        proxy.close()
    assert guest.agent.ping()
