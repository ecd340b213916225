import select
import socket
import threading
import time

import pytest

from qemu_kd.qemu import gdbstub
from qemu_kd.qemu.gdbstub import RspClient, RspError


def test_frame_has_checksum_and_escapes_reserved_bytes():
    assert gdbstub.frame(b"g") == b"$g#67"
    raw = b"a$b#c}d*"
    body = gdbstub.escape(raw)
    assert b"$" not in body and b"#" not in body
    assert gdbstub.unescape(body) == raw


def test_little_endian_register_encoding():
    assert gdbstub.le_hex(0x100200, 8) == "0002100000000000"
    assert gdbstub.from_le_hex("0002100000000000") == 0x100200


class FakeStub(threading.Thread):
    """Serves canned replies; only to test framing and error paths of the client."""

    def __init__(self, path, replies):
        super().__init__(daemon=True)
        self.srv = socket.socket(socket.AF_UNIX)
        self.srv.bind(path)
        self.srv.listen(1)
        self.replies = replies
        self.seen = []

    def run(self):
        conn, _ = self.srv.accept()
        buf = b""
        for reply in self.replies:
            while b"#" not in buf or len(buf) < buf.index(b"#") + 3:
                chunk = conn.recv(4096)
                if not chunk:
                    return
                buf += chunk
            buf = buf.lstrip(b"+-")
            end = buf.index(b"#") + 3
            self.seen.append(buf[:end])
            buf = buf[end:]
            conn.sendall(b"+" + reply)
        while conn.recv(4096):  # until the client hangs up
            pass
        conn.close()


def test_client_retries_on_bad_checksum_and_reports_refusals(tmp_path):
    path = str(tmp_path / "gdb.sock")
    ok_xml = gdbstub.frame(b"l<target/>")
    bad = b"$OK#00"
    stub = FakeStub(path, [gdbstub.frame(b""), ok_xml, bad + gdbstub.frame(b"OK"),
                           gdbstub.frame(b"E14")])
    stub.start()
    client = RspClient(path, timeout=2)
    client.connect()
    client.write_register(16, 8, 0x100200)  # bad checksum is NAKed, good copy accepted
    assert stub.seen[2] == gdbstub.frame(b"P10=0002100000000000")
    with pytest.raises(RspError, match="refused to read register"):
        client.read_register(1)
    client.close()


def test_client_times_out_on_silent_stub(tmp_path):
    path = str(tmp_path / "gdb.sock")
    srv = socket.socket(socket.AF_UNIX)
    srv.bind(path)
    srv.listen(1)
    client = RspClient(path, timeout=0.3)
    with pytest.raises(RspError, match="did not answer"):
        client.connect()
    srv.close()


def connected_pair(tmp_path, name="stub.sock", timeout=2.0):
    """An RspClient connected (no-ack mode) to a socket the test drives by hand."""
    path = str(tmp_path / name)
    srv = socket.socket(socket.AF_UNIX)
    srv.bind(path)
    srv.listen(1)
    conns = []

    def handshake():
        conn, _ = srv.accept()
        conn.settimeout(5)
        buf = b""
        for reply in (b"OK", b"l<target/>"):
            while b"#" not in buf or len(buf) < buf.index(b"#") + 3:
                buf += conn.recv(4096)
            buf = buf[buf.index(b"#") + 3:]
            conn.sendall(b"+" + gdbstub.frame(reply))
        conns.append(conn)

    t = threading.Thread(target=handshake, daemon=True)
    t.start()
    client = RspClient(path, timeout=timeout)
    client.connect()
    t.join(5)
    srv.close()
    return client, conns[0]


def recv_exactly(conn, n):
    data = b""
    while len(data) < n:
        data += conn.recv(n - len(data))
    return data


def test_async_api_for_a_relayed_continue(tmp_path):
    client, stub = connected_pair(tmp_path)
    try:
        assert client.connected
        # Unsolicited traffic (a stop reply after a QMP stop) is discarded.
        stub.sendall(gdbstub.frame(b"T02thread:01;"))
        time.sleep(0.1)
        client.discard_pending()
        assert not client.packet_ready()
        # Continue: sent without waiting; nothing has arrived yet.
        client.send_packet(b"c")
        assert recv_exactly(stub, 5) == gdbstub.frame(b"c")
        stub.sendall(b"+")                         # QEMU acks even in no-ack mode
        time.sleep(0.05)
        assert not client.packet_ready()
        assert client.wait_stop_reply(0.1) is None
        # Ctrl-C: the interrupt byte goes out bare; the stop reply follows in pieces.
        client.send_interrupt()
        assert recv_exactly(stub, 1) == b"\x03"
        reply = gdbstub.frame(b"T02thread:01;")
        stub.sendall(gdbstub.frame(b"O6869") + reply[:4])
        time.sleep(0.05)
        assert client.packet_ready()                # the console packet is whole
        stub.sendall(reply[4:])
        assert client.wait_stop_reply(2) == b"T02thread:01;"   # the O packet is skipped
        # Raw receive: packets in order, whatever they are.
        stub.sendall(gdbstub.frame(b"O41") + gdbstub.frame(b"OK"))
        assert client.read_packet() == b"O41" and client.read_packet() == b"OK"
        # The client can be selected on.
        stub.sendall(gdbstub.frame(b"S05"))
        assert select.select([client], [], [], 2)[0] == [client]
        assert client.read_stop_reply() == b"S05"
    finally:
        client.close()
        stub.close()
    assert not client.connected
    with pytest.raises(RspError, match="not connected"):
        client.send_interrupt()
    with pytest.raises(RspError, match="not connected"):
        client.fileno()


def test_async_api_reports_a_vanished_stub(tmp_path):
    client, stub = connected_pair(tmp_path, "a.sock")
    stub.close()
    with pytest.raises(RspError, match="closed the connection"):
        client.discard_pending()
    client.close()
    client, stub = connected_pair(tmp_path, "b.sock")
    stub.close()
    with pytest.raises(RspError, match="closed the connection"):
        client.wait_stop_reply(2)
    client.close()
