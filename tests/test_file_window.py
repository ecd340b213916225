"""Files through a buffer the guest shares with its host (host_vmm.window, guest_agent.window,
qemu_kd.channel.ram_window; docs/agent-protocol.md, "Bulk window").

A protected guest's session frames cross the buffer as ciphertext: the host
reads nothing of the files, and whatever it writes there in place of a frame
(garbage, a replayed frame, a bad length, a buffer that is not shared) is
refused without breaking the session.  A plain guest's buffer is plain guest
memory, which is also how the tests show that their scan finds a planted file
where it is in the clear.
"""

from __future__ import annotations

import base64
import ctypes
import hashlib
import os

import pytest

from guest_agent import window
from guest_agent.controls import PAGE
from qemu_kd.common.errors import GuestError
from qemu_kd.tenant.session import TenantSession
from tests.protected import count_hits, protected_domain

MiB = 1 << 20


# -- the guest's side, without QEMU --------------------------------------------------------------

class FakeRegion:
    """A locked buffer as guest_agent.controls.Region describes it, over a ctypes array."""

    def __init__(self, gpas: list[int]):
        self.buf = ctypes.create_string_buffer(len(gpas) * PAGE)
        self.addr, self.npages, self.gpas = ctypes.addressof(self.buf), len(gpas), gpas
        self.live = [True] * len(gpas)


def test_a_request_names_only_a_shared_buffer_and_only_its_bytes():
    region = FakeRegion([0x200000, 0x201000])
    ctypes.memmove(region.addr, b"frame bytes", 11)
    assert window.read([region], {"gpa": 0x200000, "length": 11}) == b"frame bytes"
    for spec, why in [({"gpa": 0x201000, "length": 1}, "no buffer shared"),      # not a first page
                      ({"gpa": 0x200000, "length": 2 * PAGE + 1}, "'length' must be"),
                      ({"gpa": 0x200000, "length": -1}, "'length' must be"),
                      ({"gpa": 0x200000, "length": True}, "'length' must be"),
                      ({"gpa": "0x200000", "length": 1}, "'window' must be"),
                      ([0x200000, 1], "'window' must be")]:
        with pytest.raises(ValueError, match=why):
            window.read([region], spec)
    region.live[1] = False                    # part of it went back to Linux
    with pytest.raises(ValueError, match="no buffer shared"):
        window.read([region], {"gpa": 0x200000, "length": 1})


def test_answers_go_into_the_buffer_only_when_asked_large_and_fitting():
    region = FakeRegion([0x300000])
    big = os.urandom(PAGE)
    assert window.answer([region], {"gpa": 0x300000}, big) == {"gpa": 0x300000, "length": PAGE}
    assert ctypes.string_at(region.addr, PAGE) == big
    assert window.answer([region], None, big) is None                       # not asked
    assert window.answer([region], {"gpa": 0x300000}, b"small") is None     # stays inline
    assert window.answer([region], {"gpa": 0x300000}, big + b"x") is None   # does not fit
    assert window.answer([region], {"gpa": 0x999000}, big) is None          # no such buffer


def test_the_tenant_put_file_never_takes_bytes_from_a_shared_buffer(tmp_path):
    from guest_agent.agent import Agent

    agent = Agent.__new__(Agent)                # no channels: the handler alone
    agent.protected, agent._controls = True, None
    with pytest.raises(ValueError, match="'data' must be a string"):
        agent.tenant_put_file({"path": str(tmp_path / "f"), "window": {"gpa": 0, "length": 1}})
    assert not (tmp_path / "f").exists()


# -- a protected guest ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def dom(guest_artifacts, tmp_path_factory):
    with protected_domain(tmp_path_factory.mktemp("window"), guest_artifacts) as d:
        yield d


class Tenant:
    """The tenant's session, relayed the way qemu-kd relays it (HostVmm.relay), keeping a copy
    of every frame it sent."""

    def __init__(self, dom):
        self.dom, self.sent = dom, []

        def relay(cmd, wait=60.0, **args):
            if cmd == "session":
                self.sent.append(base64.b64decode(args["frame"]))
            return dom.vmm.relay(cmd, wait, args)

        self.session = TenantSession(relay, dom.attest(), dom.secret.key)


@pytest.fixture(scope="module")
def tenant(dom):
    return Tenant(dom)


@pytest.mark.qemu
def test_files_cross_the_shared_window_as_ciphertext(dom, tenant):
    canary = os.urandom(32)
    data = (canary + os.urandom(96)) * (3 * MiB // 128)
    assert tenant.session.put_file("/tmp/canary.bin", data) == len(data)
    shared = dom.vmm.sessions.window
    assert shared is not None and shared.size == 2 * MiB                    # the window was used
    assert dom.vmm.client.controls_status(dom.keyid)["shared_pages"] == 512
    seen = [dom.vmm.client.read_phys_pages(shared.hpas)]                   # after the way in,
    assert tenant.session.get_file("/tmp/canary.bin") == data
    seen.append(dom.vmm.client.read_phys_pages(shared.hpas))               # after the way out
    out = tenant.session.exec(["sha256sum", "/tmp/canary.bin"])["stdout"].decode()
    assert out.split()[0] == hashlib.sha256(data).hexdigest()
    assert all(pages.count(0) < len(pages) // 2 for pages in seen)         # each holds a frame
    # Everything the host received (host port and shared channel, the window's reads included)
    # and the window itself: no form of the canary anywhere.
    assert count_hits([*dom.received, *seen], canary) == {}


@pytest.mark.qemu
def test_what_the_host_leaves_in_the_window_is_refused_and_the_session_lives_on(dom, tenant):
    tenant.session.put_file("/tmp/kept", b"before" * 2000)
    shared = dom.vmm.sessions.window
    assert shared is not None
    replay = tenant.sent[-1]                    # a frame the guest already took
    attacks = [os.urandom(len(replay)),                                 # garbage
               replay[:40] + bytes([replay[40] ^ 1]) + replay[41:],        # a flipped byte
               replay]                                                     # a replayed frame
    for frame in attacks:
        with pytest.raises(GuestError):
            dom.vmm.agent.call("session", window=shared.write(frame))
    for spec in ({"gpa": shared.gpa, "length": shared.size + 1}, {"gpa": shared.gpa + PAGE, "length": 8},
                 {"gpa": 0, "length": 8}, "window"):
        with pytest.raises(GuestError, match="window|buffer"):
            dom.vmm.agent.call("session", window=spec)
    for cmd in ("window", "put_file", "get_file"):          # an unprotected guest's commands
        with pytest.raises(GuestError, match="not served to the host"):
            dom.vmm.agent.call(cmd, pages=4, path="/tmp/kept")
    assert tenant.session.get_file("/tmp/kept") == b"before" * 2000       # nothing landed
    tenant.session.put_file("/tmp/after", b"after" * 3000)                 # and it still works
    assert tenant.session.get_file("/tmp/after") == b"after" * 3000


# -- a plain guest -------------------------------------------------------------------------------

@pytest.mark.qemu
def test_plain_files_go_through_guest_ram_where_the_scan_finds_them():
    import qemu_kd

    canary = os.urandom(32)
    data = (canary + os.urandom(224)) * (5 * MiB // 256) + b"tail"
    with qemu_kd.Platform() as platform:
        dom = platform.launch(plain=True)
        assert dom.put_file("/tmp/p.bin", data, mode=0o750) == len(data)
        assert dom.get_file("/tmp/p.bin") == data
        assert dom.exec("stat -c %a /tmp/p.bin").stdout.strip() == b"750"
        shared = dom._ram_window
        ram = dom._guest.machine.map_ram()
        pages = b"".join(ram[g:g + PAGE] for g in shared.gpas)
        # The same scan as above finds the canary here: a plain guest's window is plain memory.
        assert count_hits([pages], canary).get("raw")
        with pytest.raises(GuestError, match="cannot read /nonexistent in .*No such file"):
            dom.get_file("/nonexistent")
        assert dom.put_file("/tmp/empty", b"") == 0 and dom.get_file("/tmp/empty") == b""


@pytest.mark.qemu
def test_large_command_output_takes_the_open_window(dom, tenant):
    tenant.session.put_file("/tmp/opens-it", b"x" * 8192)        # the window is open from here on
    assert dom.vmm.sessions.window is not None
    serial = dom.vmm.agent.sock._stream                          # every byte the shared channel carried
    before = len(serial)
    result = tenant.session.exec_stream(["sh", "-c", "head -c 600000 /dev/zero | tr '\\0' x"])
    assert (result["rc"], result["stdout"]) == (0, b"x" * 600000)
    assert len(serial) - before < 100_000                        # the output came through the window


@pytest.mark.qemu
def test_large_output_asks_for_the_window_itself(guest_artifacts, tmp_path):
    """No file moved yet: the first large poll answer makes the next polls ask for the buffer."""
    with protected_domain(tmp_path, guest_artifacts) as fresh:
        tenant = Tenant(fresh)
        result = tenant.session.exec_stream(["sh", "-c", "head -c 2000000 /dev/zero | tr '\\0' y"])
        assert (result["rc"], result["stdout"]) == (0, b"y" * 2000000)
        assert fresh.vmm.sessions.window is not None
        assert len(fresh.vmm.agent.sock._stream) < 1_000_000          # most of it took the window


@pytest.mark.qemu
def test_a_guest_that_shares_nothing_still_gets_its_files_inline(tmp_path):
    """A control policy without sharing: the guest refuses the buffer, and files go inline."""
    import json

    import qemu_kd
    from qemu_kd.guest.additions import GuestAdditions
    from qemu_kd.hostport.client import HostPortClient

    policy = tmp_path / "policy.json"
    policy.write_text(json.dumps({"version": 1, "allow_share": False}))
    data = os.urandom(96 << 10)
    with qemu_kd.Platform() as platform:
        dom = platform.launch(additions=GuestAdditions.from_options([f"{policy}:/etc/kd-control-policy.json"],
                                                                    None))
        assert dom.put_file("/tmp/inline.bin", data) == len(data)
        assert dom.get_file("/tmp/inline.bin") == data
        with HostPortClient(platform.socket) as client:
            assert client.controls_status(dom.keyid)["shared_pages"] == 0
