"""The host port under load and abuse: bounded memory and connections, malformed frames,
a failing thread start, bursts of clients, and no descriptor leaked by a failed connect.

Each test ends by showing that a normal client is still served.
"""

import errno
import os
import socket
import struct
import tempfile
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from host_vmm.process import HostVmmError, HostVmmProcess
from host_vmm.vmm import Check, HostVmm
from qemu_kd.common.errors import KdError
from qemu_kd.hostport.client import HostPortClient
from qemu_kd.hostport.protocol import (
    MAX_FRAME,
    MAX_HEADER,
    MAX_HEADER_DEPTH,
    Frame,
    HostPortBusyError,
    HostPortConnectionError,
    HostPortProtocolError,
    Request,
)
from qemu_kd.platform.hardware import Platform
from qemu_kd.platform.hostport_server import HostPortServer

from test_domain import MEMORY
from test_hostport import frame_with_header, hello_frame, raw_connection, read_reply


@pytest.fixture
def platform(identity, tmp_path):
    with Platform(identity, MEMORY, tmp_path / "platform") as p:
        yield p


@pytest.fixture
def sockdir():
    with tempfile.TemporaryDirectory(prefix="kd-") as d:   # short path for AF_UNIX
        yield Path(d)


@pytest.fixture
def make_server(platform, sockdir):
    """Start a server with the given limits; every one started is closed afterwards."""
    servers = []

    def make(**limits):
        server = HostPortServer(platform, sockdir / f"host{len(servers)}.sock", **limits).start()
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.close()


def wait_for(predicate, what, limit=60.0):
    """Poll until ``predicate()`` holds (the limit only keeps a broken run from hanging)."""
    deadline = time.monotonic() + limit
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {what}")
        time.sleep(0.01)


def still_served(server):
    with HostPortClient(server.socket_path, timeout=30) as c:
        assert c.platform_info().memory_size == MEMORY


def greeted_connection(server):
    s = raw_connection(server.socket_path)
    s.sendall(hello_frame())
    assert read_reply(s).ok
    return s


def rss_bytes():
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/self/status")


def open_fds():
    return len(os.listdir("/proc/self/fd"))


# ------------------------------------------------------------------ memory and connections


def test_half_open_frames_announcing_64_mib_hold_no_memory(make_server):
    server = make_server()
    half_open = []
    started = rss_bytes()
    try:
        for _ in range(16):
            s = greeted_connection(server)
            # A maximal frame: its prefix, header length and a little of the header, then nothing.
            s.sendall(struct.pack(">II", MAX_FRAME, 64) + b'{"cmd": "platform-info", ')
            half_open.append(s)
        wait_for(lambda: server.pending_bytes == 16 * (4 + 25), "the server to read the frame starts")
        # 16 x 64 MiB would be 1 GiB if the announced lengths were allocated up front.
        assert rss_bytes() - started < 100 << 20
        still_served(server)
    finally:
        for s in half_open:
            s.close()
    wait_for(lambda: server.pending_bytes == 0, "the unfinished frames to be released")


def test_connections_beyond_the_limit_are_turned_away_busy(make_server):
    server = make_server(max_connections=2)
    held = [greeted_connection(server), greeted_connection(server)]
    with pytest.raises(HostPortBusyError, match="already serves 2 host-port connections"):
        HostPortClient(server.socket_path, timeout=10, connect_retry=0)
    assert server.connections_refused == 1
    # A client that may retry gets in as soon as a slot frees.
    outcome = []
    waiting = threading.Thread(target=lambda: outcome.append(still_served(server) or "served"))
    waiting.start()
    wait_for(lambda: server.connections_refused >= 2, "the waiting client to be refused once")
    held.pop().close()
    waiting.join(60)
    assert outcome == ["served"]
    held.pop().close()


def test_frames_beyond_the_memory_budget_are_refused_busy(make_server):
    server = make_server(max_pending=1 << 20)
    a, b = greeted_connection(server), greeted_connection(server)
    big = Request("platform-info", 2, {}, bytes(800 << 10)).pack()
    a.sendall(big[:4 + (600 << 10)])
    wait_for(lambda: server.pending_bytes == 600 << 10, "the first frame's bytes to arrive")
    try:
        b.sendall(big)
    except (BrokenPipeError, ConnectionResetError):
        pass                                              # refused while still sending
    reply = read_reply(b)
    assert reply.error.code == "busy" and "unfinished requests (limit 1 MiB)" in reply.error.message
    b.close()
    a.sendall(big[4 + (600 << 10):])                      # the frame within the budget completes
    assert read_reply(a).ok
    a.close()
    wait_for(lambda: server.pending_bytes == 0, "the budget to be given back")
    still_served(server)


# ------------------------------------------------------------------ malformed frames


def test_deeply_nested_header_gets_a_protocol_error(make_server):
    server = make_server()
    too_deep = b'{"cmd": "hello", "id": 1, "args": {"a": ' + b"[" * MAX_HEADER_DEPTH + b"]" * MAX_HEADER_DEPTH + b"}}"
    for header in (b"[" * 100_000, b'{"a": ' + b"[" * 100_000, too_deep):
        s = greeted_connection(server)
        s.sendall(frame_with_header(header))
        reply = read_reply(s)
        assert reply.error.code == "protocol"
        assert reply.error.message == f"frame header is nested more than {MAX_HEADER_DEPTH} levels deep"
        assert read_reply(s) is None
        s.close()
        still_served(server)


def test_header_nesting_limit_is_exact():
    def nested(levels):                                   # the header object is level 1
        return b'{"a": ' + b"[" * (levels - 1) + b"]" * (levels - 1) + b"}"

    body = struct.pack(">I", len(nested(MAX_HEADER_DEPTH))) + nested(MAX_HEADER_DEPTH)
    assert Frame.unpack(body).header["a"]
    body = struct.pack(">I", len(nested(MAX_HEADER_DEPTH + 1))) + nested(MAX_HEADER_DEPTH + 1)
    with pytest.raises(HostPortProtocolError, match="nested more than"):
        Frame.unpack(body)


@pytest.mark.parametrize("name, data, message", [
    ("zero-length frame", struct.pack(">I", 0), "frame length 0 is shorter than the header-length field"),
    ("length prefix above the maximum", struct.pack(">I", MAX_FRAME + 1),
     f"exceeds the maximum of {MAX_FRAME} bytes"),
    ("header length above the maximum", struct.pack(">II", 2 * MAX_HEADER, 2 * MAX_HEADER - 4),
     f"(limit {MAX_HEADER})"),
    ("header longer than its frame", struct.pack(">II", 100, 200), "does not fit in a frame of 100 bytes"),
    ("non-UTF-8 header", frame_with_header(b'{"cmd": "\xff"}'), "not UTF-8 JSON"),
    ("non-object header", frame_with_header(b'"hello"'), "not a JSON object"),
    ("non-JSON header", frame_with_header(b"{cmd"), "not UTF-8 JSON"),
])
def test_malformed_frames_get_a_protocol_error_before_any_body(make_server, name, data, message):
    server = make_server()
    s = greeted_connection(server)
    s.sendall(data)                      # nothing more: the refusal needs none of what was announced
    reply = read_reply(s)
    assert reply.error.code == "protocol" and message in reply.error.message, name
    assert read_reply(s) is None
    s.close()
    still_served(server)


def test_client_disconnecting_mid_frame(make_server):
    server = make_server()
    s = greeted_connection(server)
    s.sendall(Request("platform-info", 2, {}, bytes(1000)).pack()[:500])
    s.shutdown(socket.SHUT_WR)
    reply = read_reply(s)
    assert reply.error.code == "protocol" and "closed in the middle of a frame" in reply.error.message
    s.close()
    s = greeted_connection(server)
    s.sendall(b"\x00\x00\x10")
    s.close()                                             # gone for good, mid-prefix
    wait_for(lambda: server.frames_refused == 2, "the server to notice")
    wait_for(lambda: server.pending_bytes == 0 and server.connection_count == 0, "the connections to end")
    still_served(server)


def test_a_stalled_length_prefix_times_out(make_server):
    server = make_server(frame_timeout=0.5)
    s = greeted_connection(server)
    s.sendall(b"\x00\x00")                                # half a length prefix, then nothing
    reply = read_reply(s)
    assert reply.error.code == "protocol" and reply.error.message == "frame not completed within 0.5 s"
    s.close()
    still_served(server)


# ------------------------------------------------------------------ accept loop and bursts


def test_accept_loop_survives_a_thread_that_cannot_start(make_server, monkeypatch):
    server = make_server()
    real_start = threading.Thread.start
    failed = []

    def start_fails_once(thread):
        if thread.name == "hostport-conn" and not failed:
            failed.append(thread)
            raise RuntimeError("can't start new thread")
        return real_start(thread)

    monkeypatch.setattr(threading.Thread, "start", start_fails_once)
    with pytest.raises(HostPortBusyError, match="cannot serve another connection"):
        HostPortClient(server.socket_path, timeout=10, connect_retry=0)
    assert failed and server.connection_count == 0
    still_served(server)
    still_served(server)
    server.close()                                        # shuts down cleanly, socket file gone
    assert not server.socket_path.exists()


def test_a_burst_of_clients_is_served(make_server):
    server = make_server()
    errors = []
    barrier = threading.Barrier(200)

    def one_client():
        try:
            barrier.wait()
            with HostPortClient(server.socket_path, timeout=120) as c:
                assert c.platform_info().memory_size == MEMORY
        except Exception as exc:  # noqa: BLE001 - collected and reported below
            errors.append(f"{type(exc).__name__}: {exc}")

    clients = [threading.Thread(target=one_client) for _ in range(200)]
    for t in clients:
        t.start()
    for t in clients:
        t.join(300)
    assert errors == []


def test_client_retries_a_full_listen_queue(make_server, monkeypatch):
    server = make_server()
    real_connect = socket.socket.connect
    attempts = []

    def queue_full_three_times(sock, address):
        attempts.append(address)
        if len(attempts) <= 3:
            raise BlockingIOError(errno.EAGAIN, os.strerror(errno.EAGAIN))
        return real_connect(sock, address)

    monkeypatch.setattr(socket.socket, "connect", queue_full_three_times)
    fds = open_fds()
    with HostPortClient(server.socket_path, timeout=10) as c:
        assert c.platform_info().memory_size == MEMORY
    wait_for(lambda: server.connection_count == 0, "the server to close its end")
    assert len(attempts) == 4 and open_fds() == fds
    attempts.clear()
    with pytest.raises(HostPortConnectionError, match="is the platform running"):
        HostPortClient(server.socket_path, timeout=10, connect_retry=0)
    assert len(attempts) == 1 and open_fds() == fds


# ------------------------------------------------------------------ descriptors


def test_failed_connects_leak_no_descriptor(sockdir):
    missing = sockdir / "missing.sock"
    stale = sockdir / "stale.sock"
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(str(stale))                                 # a socket file nobody listens on
    dead.close()
    fds = open_fds()
    for path in (missing, stale):
        with pytest.raises(HostPortConnectionError, match="is the platform running"):
            HostPortClient(path, timeout=5)
        assert open_fds() == fds, path


def test_host_vmm_closes_the_shared_channel_socket_when_connect_fails(make_server, sockdir, monkeypatch):
    server = make_server()
    vmm = HostVmm(str(server.socket_path))
    try:
        vmm.layout = SimpleNamespace(keyid=1)
        vmm.checks = [Check("all", True, "")]
        monkeypatch.setattr(vmm.client, "launch", lambda keyid, name=None: {"shared": str(sockdir / "gone.sock")})
        fds = open_fds()
        with pytest.raises(KdError, match="cannot connect to the domain's shared channel"):
            vmm.launch()
        assert open_fds() == fds
    finally:
        vmm.client.close()


def test_host_vmm_process_is_stopped_when_its_api_socket_refuses(make_server, sockdir, monkeypatch):
    server = make_server()
    api = str(sockdir / "api.sock")
    real_connect = socket.socket.connect

    def refuse_the_api(sock, address):
        if address == api:
            raise ConnectionRefusedError(errno.ECONNREFUSED, os.strerror(errno.ECONNREFUSED))
        return real_connect(sock, address)

    monkeypatch.setattr(socket.socket, "connect", refuse_the_api)
    fds = open_fds()
    with pytest.raises(HostVmmError, match="cannot connect to the host VMM process"):
        HostVmmProcess(str(server.socket_path), api)
    assert open_fds() == fds
    # The child had connected to the platform; it was stopped, so its connection ends.
    wait_for(lambda: server.connection_count == 0, "the host VMM process to end")
