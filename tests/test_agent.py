"""The guest agent's protocol handling, run in-process over a socket pair.

The same agent runs inside real guests in test_plain_run.py.
"""

import json
import socket
import threading

import pytest

from guest_agent import protocol
from guest_agent.agent import Agent, LineChannel
from qemu_kd.channel.agent_client import AgentClient
from qemu_kd.qemu.guestport import GuestPortServer
from qemu_kd.qemu.launch import UNPROTECTED_PORT
from qemu_kd.common.errors import GuestError


@pytest.fixture
def pair():
    """An agent whose guest port says what a plain run's says: no platform protects it."""
    host, guest = socket.socketpair()
    plat, gport = socket.socketpair()
    server = GuestPortServer(plat, UNPROTECTED_PORT)
    server.start()
    agent = Agent(LineChannel(guest.fileno()), LineChannel(gport.fileno()))
    agent.learn_identity()
    assert agent.protected is False
    thread = threading.Thread(target=agent.serve, daemon=True)
    thread.start()
    client = AgentClient(host)
    yield client, host, agent
    host.close()
    thread.join(timeout=5)
    server.stop()
    for s in (guest, gport):
        s.close()


def read_json(sock):
    buf = b""
    while not buf.endswith(b"\n"):
        buf += sock.recv(65536)
    return [json.loads(line) for line in buf.splitlines()]


def test_ready_then_ping_and_exec(pair):
    client, _, _ = pair
    ready = client.wait_ready(timeout=5)
    assert ready["event"] == "ready" and ready["version"] and ready["kernel"]
    with open("/proc/uptime") as f:     # the agent runs on this machine here: the same clock
        assert 0 < ready["uptime_s"] <= float(f.read().split()[0])
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
    with pytest.raises(GuestError, match="is unknown"):
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


def test_guest_port_server_survives_garbage():
    plat, other = socket.socketpair()
    server = GuestPortServer(plat, UNPROTECTED_PORT)
    assert server._answer(b"junk")["ok"] is False
    assert server._answer(b'{"id": 1, "cmd": "nope"}')["error"].startswith("unknown")
    assert server._answer(b'{"id": 2, "cmd": "info"}')["result"] == {"protected": False}
    plat.close(); other.close()


def test_an_agent_whose_platform_is_silent_fails_closed():
    """No answer on the guest port: the agent serves the host only the protected surface."""
    import guest_agent.agent as agent_mod

    host, guest = socket.socketpair()
    plat, gport = socket.socketpair()   # nobody answers on plat
    agent = Agent(LineChannel(guest.fileno()), LineChannel(gport.fileno()))
    old = agent_mod.GUEST_PORT_TIMEOUT
    agent_mod.GUEST_PORT_TIMEOUT = 0.2
    try:
        agent.learn_identity()
    finally:
        agent_mod.GUEST_PORT_TIMEOUT = old
    assert agent.protected is True and agent.debug is False
    thread = threading.Thread(target=agent.serve, daemon=True)
    thread.start()
    client = AgentClient(host)
    assert client.wait_ready(timeout=5)["protected"] is True
    with pytest.raises(GuestError, match="not served to the host"):
        client.exec(["id"])
    host.close()
    thread.join(timeout=5)
    for s in (guest, gport, plat):
        s.close()
