"""Guest-verified control changes on a real protected guest (sealed without DEBUG).

One domain serves the whole module (a protected boot costs seconds of TCG).
Every request goes the real way: the host VMM asks the guest agent on the
shared channel, the agent checks its measured policy and has the platform seal
the update, the host stages, verifies and installs it.  Each refusal is
followed by a check that the guest still answers.
"""

import base64
import hashlib
import os

import pytest

from host_vmm.controls import ControlHost, ControlOutcome
from qemu_kd.formats.ctlupdate import ControlUpdate
from qemu_kd.hostport.protocol import HostPortRefusedError, HostPortVerifyError

from protected import count_hits, protected_domain

pytestmark = pytest.mark.qemu

MiB = 1 << 20
PAGE = 4096
BALLOON = 64 * MiB // PAGE


@pytest.fixture(scope="module")
def canary():
    return os.urandom(32)


@pytest.fixture(scope="module")
def dom(guest_artifacts, tmp_path_factory, canary):
    with protected_domain(tmp_path_factory.mktemp("controls"), guest_artifacts) as d:
        d.plant_secret(canary)
        yield d


@pytest.fixture
def host(dom):
    return ControlHost(dom.vmm.client, dom.vmm.agent, dom.keyid)


def guest_answers(dom) -> None:
    assert dom.vmm.agent.ping()
    result = dom.session().exec(["sha256sum", "/run/secrets/canary"])
    assert result["rc"] == 0, result


def mem_free_kib(dom) -> int:
    out = dom.session().exec(["cat", "/proc/meminfo"])["stdout"].decode()
    return int(next(line.split()[1] for line in out.splitlines() if line.startswith("MemFree:")))


def ask(host, op, **args):
    """The guest's raw answer to a control request (the host relays it unverified)."""
    return host.agent.call("control", wait=600, op=op, keyid=host.keyid, **args)


def test_balloon_out_and_in_by_64_mib(dom, host):
    free0 = host.client.platform_info().free_pages
    mem0 = mem_free_kib(dom)
    out = host.balloon_out(BALLOON)
    assert out.verdict == "accepted", out.as_json()
    assert out.free_pages_after == free0 + BALLOON
    assert host.status()["current_memory"] == 192 * MiB
    assert mem_free_kib(dom) <= mem0 - 60 * 1024              # Linux gave the memory up
    guest_answers(dom)

    back = host.balloon_in(BALLOON)
    assert back.verdict == "accepted", back.as_json()
    assert back.free_pages_after == free0
    assert host.status()["current_memory"] == 256 * MiB
    assert mem_free_kib(dom) >= mem0 - 8 * 1024               # and has it back
    guest_answers(dom)


def test_a_request_against_the_policy_is_refused_with_its_reason(dom, host):
    refused = host.balloon_out(200 * MiB // PAGE)
    assert refused.verdict == "refused" and refused.refused_by == "guest"
    assert "below the guest's memory floor of 128 MiB" in refused.reason
    assert "floor of every 20 ms" in host.set_exit_interval(5).reason
    assert "guest state" in host.vmwrite(0x681E, 0x1000).reason                  # RIP
    assert "guest state" in host.vmwrite(0x6802, 0x1000).reason                  # CR3
    assert "widen" in host.vmwrite(0x2202, 0xFFFF).reason                        # exposed registers
    other = host.agent.call("control", wait=60, op="exit-interval", keyid=host.keyid + 1, ms=100)
    assert other["verdict"] == "refused" and "names KeyID" in other["reason"]
    assert host.status()["installed_version"] == host.status()["installs"]
    guest_answers(dom)


def test_exit_interval_forces_periodic_exits(dom, host):
    import time

    set_ = host.set_exit_interval(200)
    assert set_.verdict == "accepted", set_.as_json()
    assert host.client.vmread(host.keyid, 0x4202) == 200
    deadline = time.monotonic() + 120
    while host.status()["interval_exits"] < 3:
        assert time.monotonic() < deadline, "no periodic exits"
        time.sleep(0.2)
    after, reasons = 0, set()
    while (record := host.client.next_exit(host.keyid, after=after)) is not None:
        after, reasons = record["seq"], reasons | {record["reason"]}
    assert "interval" in reasons                         # the host sees them as exits
    guest_answers(dom)
    assert host.set_exit_interval(0).verdict == "accepted"
    assert host.client.vmread(host.keyid, 0x4202) == 0


def test_relocating_1_mib_keeps_the_guest_running(dom, host):
    before = dom.session().exec(["sha256sum", "/bin/busybox"])["stdout"]
    free0 = host.client.platform_info().free_pages
    gpas = [16 * MiB + i * PAGE for i in range(MiB // PAGE)]        # the kernel's own text
    moved = host.relocate(gpas)
    assert moved.verdict == "accepted", moved.as_json()
    assert moved.installed["moved"] == len(gpas)
    assert host.client.platform_info().free_pages == free0          # as many taken as given back
    guest_answers(dom)
    assert dom.session().exec(["sha256sum", "/bin/busybox"])["stdout"] == before


def sealed_update(host, pages=16):
    """A fresh update the guest made (balloon out of ``pages`` pages), not yet installed."""
    answer = ask(host, "balloon-out", pages=pages)
    assert answer["verdict"] == "accepted", answer
    return base64.b64decode(answer["update"]), answer["version"]


def test_forged_replayed_and_modified_updates_are_refused(dom, host):
    update, version = sealed_update(host)
    parsed = ControlUpdate.unpack(update)

    forged = bytearray(update)                         # host-forged EPT ciphertext
    ept_at = len(update) - 48 - PAGE * len(parsed.pages) + 100
    forged[ept_at] ^= 1
    with pytest.raises(HostPortVerifyError, match="tag does not match"):
        host.client.controls_stage(host.keyid, bytes(forged))
    vmcs_update = ControlUpdate.unpack(base64.b64decode(ask(host, "exit-interval", ms=500)["update"]))
    assert [p.page_type for p in vmcs_update.pages] == [3]
    forged_vmcs = bytearray(vmcs_update.pack())        # host-forged VMCS ciphertext
    forged_vmcs[-48 - PAGE + 0x38] ^= 0xFF             # where exit_interval_ms lies (in plaintext)
    with pytest.raises(HostPortVerifyError, match="tag does not match"):
        host.client.controls_stage(host.keyid, bytes(forged_vmcs))
    in_flight = bytearray(update)                      # the guest's reply changed on the way
    in_flight[0x28 + 9] ^= 0x10
    with pytest.raises(HostPortVerifyError, match="tag does not match"):
        host.client.controls_stage(host.keyid, bytes(in_flight))
    guest_answers(dom)

    outcome = ControlOutcome("balloon-out", "refused")
    assert host.install(update, lambda staged, verdict: (True, "ok"), outcome), outcome.as_json()
    ask(host, "installed", version=version)
    with pytest.raises(HostPortRefusedError, match="replayed"):
        host.client.controls_stage(host.keyid, update)
    guest_answers(dom)


def test_other_domains_pages_are_refused(dom, host):
    other = host.client.alloc(npages=4)                 # another KeyID's reservation
    try:
        answer = ask(host, "relocate", moves=[[16 * MiB, other.hpas[0]]])
        assert answer["verdict"] == "refused"
        assert f"not a page the host allocated to KeyID {host.keyid}" in answer["reason"]
    finally:
        host.client.free(other.keyid)
    guest_answers(dom)


def test_a_guest_chosen_buffer_is_shared_then_private_again(dom, host):
    shared = host.share(4)
    assert shared.verdict == "accepted", shared.as_json()
    first = shared.ops[0]
    gpa, hpa = first["gpa"], first["old_hpa"]
    label = f"qemu-kd shared page keyid={host.keyid} gpa={gpa:#x}\n".encode()
    assert host.client.read_phys_pages([hpa]).startswith(label)         # plaintext to the host
    pattern = os.urandom(PAGE)
    host.client.write_phys_pages([hpa], pattern)                        # and the host's bytes reach
    status = ask(host, "status")                                        # the guest
    assert (status["shared_gpa"], status["shared_pages"]) == (gpa, 4)
    assert status["shared_sha256"] == hashlib.sha256(pattern).hexdigest()
    back = host.unshare()
    assert back.verdict == "accepted", back.as_json()
    assert ask(host, "status")["shared_pages"] == 0
    page = host.client.read_phys_pages([hpa])
    assert page != pattern and not page.startswith(label)                # ciphertext again
    guest_answers(dom)


def run_cli(*argv):
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "qemu_kd.cli.main", *argv], capture_output=True, text=True,
                          timeout=600)


def test_setmem_and_friends_on_the_command_line(dom, host):
    """The issue's check: setmem down and up by 64 MiB on a domain sealed without DEBUG shows the
    guest's verdict and the host's free pool growing and shrinking; the guest keeps answering."""
    import json

    from host_vmm.vmm import connect_shared_channel
    from qemu_kd.channel.agent_client import AgentClient

    from protected import RecordingSocket

    name = f"{dom.platform_proc.pid}:kd{dom.keyid}"
    before = host.status()["current_memory"]        # earlier tests may have kept a few pages out
    dom.vmm.agent.sock.close()           # the host VMM lets go of the shared channel (run --keep)
    try:
        down = run_cli("setmem", name, f"{before - 64 * MiB}B", "--json")
        assert down.returncode == 0, down.stderr
        down = json.loads(down.stdout)
        assert down["verdict"] == "accepted", down
        assert down["free_pages_after"] - down["free_pages_before"] == BALLOON
        assert host.status()["current_memory"] == before - 64 * MiB
        up = json.loads(run_cli("setmem", name, "256M", "--json").stdout)
        assert (up["verdict"], up["memory_after"]) == ("accepted", "256 MiB")
        assert up["free_pages_before"] - up["free_pages_after"] == (256 * MiB - before) // PAGE + BALLOON
        floor = run_cli("setmem", name, "64M")
        assert floor.returncode == 3
        assert "balloon-out refused by the guest: giving up 49152 pages" in floor.stdout, floor.stdout
        assert "memory floor of 128 MiB" in floor.stdout
        fast = json.loads(run_cli("exit-interval", name, "5", "--json").stdout)
        assert fast["verdict"] == "refused" and "floor of every 20 ms" in fast["reason"]
        moved = run_cli("relocate", name, "0x1000000", "--size", "1M")
        assert moved.returncode == 0 and "relocate accepted by the guest" in moved.stdout, moved.stdout
    finally:
        dom.vmm.agent = AgentClient(RecordingSocket(connect_shared_channel(dom.endpoints["shared"]),
                                                    dom.received))
    guest_answers(dom)


def test_no_canary_in_requests_replies_or_updates(dom, host, canary):
    host.set_exit_interval(0)
    received = list(dom.received)
    assert base64.b64encode(b"KDCU")[:6] in b"".join(received)   # sealed updates went through here
    assert count_hits(received, canary) == {}
    assert count_hits(received, hashlib.sha256(canary).digest()) == {}
