import socket
import threading

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
