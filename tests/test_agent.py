"""The guest agent's protocol handling, run in-process over a socket pair.

The same agent runs inside real guests in test_plain_run.py.
"""

import json
import os
import socket
import threading

import pytest

from guest_agent import protocol
from guest_agent.agent import Agent, LineChannel
from qemu_kd.channel.agent_client import AgentClient
from qemu_kd.common.errors import GuestError


@pytest.fixture
def pair():
    host, guest = socket.socketpair()
    agent = Agent(LineChannel(guest.fileno()))
    thread = threading.Thread(target=agent.serve, daemon=True)
    thread.start()
    client = AgentClient(host)
    yield client, host, agent
    host.close()
    thread.join(timeout=5)
    guest.close()


def read_json(sock):
    buf = b""
    while not buf.endswith(b"\n"):
        buf += sock.recv(65536)
    return [json.loads(line) for line in buf.splitlines()]


def test_ready_then_ping_and_exec(pair):
    client, _, _ = pair
    ready = client.wait_ready(timeout=5)
    assert ready["event"] == "ready" and ready["version"] and ready["kernel"]
    assert client.ping()
    res = client.exec(["sh", "-c", "echo out; echo err >&2; exit 3"], timeout=10)
    assert (res["rc"], res["stdout"], res["stderr"]) == (3, "out\n", "err\n")


def test_exec_timeout_and_missing_program(pair):
    client, _, _ = pair
    client.wait_ready(timeout=5)
    res = client.exec(["sleep", "5"], timeout=0.3)
    assert res["timed_out"] and res["rc"] == -9
    assert client.exec(["/no/such/program"])["rc"] == 127


def test_exec_output_is_bounded(pair):
    client, _, _ = pair
    client.wait_ready(timeout=5)
    res = client.exec(["sh", "-c", f"head -c {protocol.MAX_OUTPUT + 5000} /dev/zero"])
    assert res["truncated"] and len(res["stdout"]) == protocol.MAX_OUTPUT


def test_malformed_lines_get_errors_and_agent_keeps_serving(pair):
    client, host, _ = pair
    client.wait_ready(timeout=5)
    for junk in (b"not json\n", b"[1,2]\n", b"\xff\xfe\n", b'{"id": 7, "cmd": "nope"}\n',
                 b'{"id": 8, "cmd": "exec", "argv": "ls"}\n'):
        host.sendall(junk)
        (msg,) = read_json(host)
        assert msg["ok"] is False and msg["error"]
    assert client.ping()


def test_refusal_raises_guest_error(pair):
    client, _, _ = pair
    client.wait_ready(timeout=5)
    with pytest.raises(GuestError, match="unknown command"):
        client.call("format-disk")


def test_poweroff_stops_serving(pair):
    client, _, agent = pair
    client.wait_ready(timeout=5)
    client.poweroff()
    assert agent.running is False


def test_client_times_out_without_ready():
    host, guest = socket.socketpair()
    client = AgentClient(host, diagnose=lambda: "console says: stuck")
    with pytest.raises(GuestError, match="did not answer.*console says: stuck"):
        client.wait_ready(timeout=0.3)
    host.close(); guest.close()


def test_client_reports_closed_channel():
    host, guest = socket.socketpair()
    guest.close()
    with pytest.raises(GuestError, match="closed"):
        AgentClient(host).wait_ready(timeout=2)
    host.close()


@pytest.fixture
def with_port():
    """Agent with a guest port answered by the platform's GuestPortServer."""
    from qemu_kd.platform.guestport import GuestPortServer

    host, guest = socket.socketpair()
    plat, gport = socket.socketpair()
    seen = []

    def report(req):
        seen.append(bytes.fromhex(req["report_data"]))
        return {"report": "UkVQT1JU"}

    server = GuestPortServer(plat, {"report": report})
    server.start()
    agent = Agent(LineChannel(guest.fileno()), LineChannel(gport.fileno()))
    thread = threading.Thread(target=agent.serve, daemon=True)
    thread.start()
    client = AgentClient(host)
    client.wait_ready(timeout=5)
    yield client, seen, server
    host.close()
    thread.join(timeout=5)
    server.stop()
    for s in (guest, gport):
        s.close()


def test_attested_secret_release_round_trip(with_port, tmp_path):
    from qemu_kd.tenant.secret_release import check_binding, encrypt_secret

    client, seen, _ = with_port
    nonce = os.urandom(32)
    res = client.call("attest", nonce=nonce.hex())
    agent_pub = bytes.fromhex(res["public_key"])
    assert res["report"] == "UkVQT1JU"
    check_binding(seen[0], nonce, agent_pub)  # the platform saw the binding report_data
    target = str(tmp_path / "secret.bin")
    secret = os.urandom(48)
    args = encrypt_secret(secret, agent_pub, target)
    assert client.call("put_secret", **args) == {"written": 48, "path": target}
    with open(target, "rb") as f:
        assert f.read() == secret
    assert os.stat(target).st_mode & 0o777 == 0o600


def test_secret_for_another_key_or_path_is_refused(with_port, tmp_path):
    from qemu_kd.tenant.secret_release import SecretReleaseError, check_binding, encrypt_secret

    client, seen, _ = with_port
    nonce = os.urandom(32)
    res = client.call("attest", nonce=nonce.hex())
    agent_pub = bytes.fromhex(res["public_key"])
    with pytest.raises(SecretReleaseError):
        check_binding(seen[0], os.urandom(32), agent_pub)
    args = encrypt_secret(b"s3cret", agent_pub, str(tmp_path / "a"))
    args["path"] = str(tmp_path / "b")  # path is bound as associated data
    with pytest.raises(GuestError, match="does not open"):
        client.call("put_secret", **args)
    args = encrypt_secret(b"s3cret", agent_pub, "/etc/passwd")
    with pytest.raises(GuestError, match="only be written under"):
        client.call("put_secret", **args)


def test_report_without_platform_times_out_cleanly(pair, monkeypatch):

    client, _, agent = pair
    client.wait_ready(timeout=5)
    with pytest.raises(GuestError, match="no guest port"):
        client.call("report", report_data="00" * 64)
    with pytest.raises(GuestError, match="64 bytes"):
        client.call("report", report_data="zz")


def test_guest_port_server_survives_garbage(with_port):
    client, _, server = with_port
    server.sock.sendall(b"")  # nothing
    # The agent's own port is well-behaved; poke the server directly with junk.
    assert server._answer(b"junk")["ok"] is False
    assert server._answer(b'{"id": 1, "cmd": "nope"}')["error"].startswith("unknown")
    assert client.call("report", report_data="11" * 64)["report"] == "UkVQT1JU"
