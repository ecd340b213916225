"""The host port end to end: a platform served on a Unix socket, driven by HostPortClient.

The test plays both the untrusted host (through the client only) and the
tenant (sealing a small guest for the layout the host got from alloc).
"""

import base64
import json
import logging
import os
import random
import socket
import stat
import struct
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest

from qemu_kd.formats.ept import EptMapping, mapping_digest
from qemu_kd.common.errors import KdError
from qemu_kd.hostport.protocol import (
    HostPortBadRequestError,
    HostPortConnectionError,
    HostPortError,
    HostPortNotFoundError,
    HostPortOwnershipError,
    HostPortProtocolError,
    HostPortRefusedError,
    HostPortStateError,
    HostPortKeyIdExhaustedError,
    HostPortUnknownCommandError,
    HostPortUnwrapError,
    HostPortAddressError,
    HostPortLaunchError,
    HostPortVerifyError,
    PageEntry,
)
from qemu_kd.hostport.client import HostPortClient
from qemu_kd.hostport.protocol import (
    MAX_FRAME,
    PAGE_ENTRY_SIZE,
    Frame,
    Reply,
    Request,
    pack_page_entries,
    unpack_page_entries,
)
from qemu_kd.platform.hostport_server import HostPortServer, error_reply
from qemu_kd.platform.runtime import LaunchError, SaveAreaError
from qemu_kd.formats.measurement import PageType
from qemu_kd.platform.hardware import Platform
from qemu_kd.formats.policy import Policy
from qemu_kd.formats.vmcs import VMCS_FIELDS

from test_domain import ENC_EPT_POINTER, ENC_GUEST_RIP, MEMORY, PAGE, RW, guest_page_count, seal_guest
from serving import serving


@pytest.fixture
def served(identity, tmp_path):
    """(platform, socket path) with a running server; everything removed afterwards."""
    platform = Platform(identity, MEMORY, tmp_path / "platform")
    with serving(platform, frame_timeout=5) as (path, server):
        yield platform, path, server


@pytest.fixture
def client(served):
    _, path, _ = served
    with HostPortClient(path, timeout=10) as c:
        yield c


def host_loads(client, guest):
    """Everything the host does to build the domain, through the host port only."""
    hpas, data = guest.loaded_pages()
    client.write_phys_pages(hpas, data)
    client.create_kd(guest.keyid, guest.wrapped, guest.policy, guest.host_data)
    client.add_pages(guest.keyid, guest.page_entries())
    client.add_zero_pages(guest.keyid, guest.zero_entries())


class RecordingSocket:
    """Wraps the client's socket and keeps every byte the client receives."""

    def __init__(self, sock):
        self._sock = sock
        self.received = bytearray()

    def recv(self, bufsize, flags=0):
        data = self._sock.recv(bufsize, flags)
        self.received += data
        return data

    def recv_into(self, buf, nbytes=0, flags=0):
        n = self._sock.recv_into(buf, nbytes, flags)
        self.received += bytes(buf[:n])
        return n

    def __getattr__(self, name):
        return getattr(self._sock, name)


# -------------------------------------------------------------- full flow


def test_full_build_flow_through_the_socket(served, client, identity):
    platform, _, _ = served
    info = client.platform_info()
    assert info.keyid_bits == 6 and info.free_keyids == list(range(1, 64))
    assert info.accelerator == "none" and info.memory_size == MEMORY and info.page_size == PAGE
    assert info.chain_pem == identity.chain_pem()

    alloc = client.alloc(npages=guest_page_count())
    assert alloc.keyid == 1 and len(alloc.hpas) == guest_page_count()
    guest = seal_guest(alloc.keyid, alloc.hpas, identity.kak_public)   # the tenant seals for this layout
    host_loads(client, guest)

    assert client.hash_kd(guest.keyid) == guest.expected_hash_kd()
    assert client.vmread(guest.keyid, ENC_EPT_POINTER) == guest.vmcs.ept_pointer
    with pytest.raises(HostPortRefusedError, match="guest-state field rip"):
        client.vmread(guest.keyid, ENC_GUEST_RIP)
    verdict = client.verify_ept(guest.keyid, alloc.hpas)
    assert verdict.ok and verdict.reasons == []
    assert verdict.mapping_digest == mapping_digest(guest.mappings)
    assert platform.domain(guest.keyid).finalize_measurement() == guest.expected_measurement()

    assert client.destroy_kd(guest.keyid) == len(alloc.hpas)
    assert guest.keyid in client.platform_info().free_keyids
    assert client.read_phys(alloc.hpas[0], PAGE) == bytes(PAGE)
    with pytest.raises(HostPortNotFoundError):
        client.hash_kd(guest.keyid)


def test_alloc_with_host_chosen_hpas_and_free(client):
    a = client.alloc(hpas=[0x30000, 0x10000])
    assert a.hpas == [0x10000, 0x30000]
    b = client.alloc(hpas=[0x20000], keyid=a.keyid)            # extend the reservation
    assert b.keyid == a.keyid
    with pytest.raises(HostPortOwnershipError, match="in use"):
        client.alloc(hpas=[0x20000])
    with pytest.raises(HostPortAddressError, match="not aligned"):
        client.alloc(hpas=[0x20800])
    assert client.free(a.keyid) == 3
    with pytest.raises(HostPortNotFoundError):
        client.free(a.keyid)


# --------------------------------------------------------------- secrecy


def test_private_page_canary_never_reaches_the_host(served, client, identity):
    platform, _, _ = served
    canary = b"KD-CANARY:" + os.urandom(24)
    gpr_canary = int.from_bytes(os.urandom(8), "little") | 1 << 63
    alloc = client.alloc(npages=guest_page_count())
    guest = seal_guest(alloc.keyid, alloc.hpas, identity.kak_public, canary=canary, gpr_canary=gpr_canary)
    host_loads(client, guest)
    canary_hpa = guest.hpa_of[0x1000]
    assert canary in guest.plaintext[canary_hpa]

    rec = RecordingSocket(client._sock)
    client._sock = rec
    k = guest.keyid
    client.platform_info()
    client.read_phys(0, 64 * PAGE)
    client.read_phys_pages(alloc.hpas)
    client.hash_kd(k)
    for f in VMCS_FIELDS:
        try:
            client.vmread(k, f.encoding)
        except HostPortRefusedError:
            assert f.field_class == "guest"
    for attempt in (lambda: client.hash_kd(k, [canary_hpa]), lambda: client.read_phys(k << 40 | canary_hpa, 64)):
        with pytest.raises(HostPortError):
            attempt()
    assert client.verify_ept(k, alloc.hpas).ok
    platform.domain(k).mark_launched()
    with pytest.raises(HostPortOwnershipError):
        client.write_phys(canary_hpa, b"x")
    client.read_phys(canary_hpa, PAGE)

    received = bytes(rec.received)
    assert guest.ciphertext[canary_hpa] in received                # the recorder saw the page ...
    gpr = gpr_canary.to_bytes(8, "little")
    for needle in (canary, canary.hex().encode(), canary.hex().upper().encode(), base64.b64encode(canary),
                   gpr, gpr.hex().encode(), f"{gpr_canary:x}".encode(), str(gpr_canary).encode(),
                   guest.key, guest.key.hex().encode()):
        assert needle not in received                              # ... but never its plaintext
    for gpa in guest.image:                                        # no image page in the clear
        assert guest.plaintext[guest.hpa_of[gpa]][:64] not in received


# ----------------------------------------------------------- verify-ept


BAD_LAYOUTS = {
    "alias": lambda alloc, other: [EptMapping(0x100000, alloc.hpas[-1], RW)],
    "foreign": lambda alloc, other: [EptMapping(0x100000, other.hpas[0], RW)],
    "unallocated": lambda alloc, other: [EptMapping(0x100000, MEMORY - PAGE, RW)],
    "control-page": lambda alloc, other: [EptMapping(0x100000, alloc.hpas[1], RW)],
}


@pytest.mark.parametrize("reason", sorted(BAD_LAYOUTS) + ["reserved-bits"])
def test_verify_ept_reasons_through_the_socket(client, identity, reason):
    other = client.alloc(npages=1)
    alloc = client.alloc(npages=guest_page_count(extra_gpas=[0x100000]))
    def set_reserved_bit(tables):
        pt = tables[max(tables)]
        struct.pack_into("<Q", pt, 16, struct.unpack_from("<Q", pt, 16)[0] | 1 << 60)

    if reason == "reserved-bits":
        extras, tamper = [], set_reserved_bit
    else:
        extras, tamper = BAD_LAYOUTS[reason](alloc, other), None
    guest = seal_guest(alloc.keyid, alloc.hpas, identity.kak_public, extra_mappings=extras, tamper=tamper)
    host_loads(client, guest)
    verdict = client.verify_ept(guest.keyid, alloc.hpas)
    assert not verdict.ok
    assert any(r.startswith(f"{reason}: ") for r in verdict.reasons), verdict.reasons


# ------------------------------------------------------------- lifecycle


def test_write_to_private_page_after_launch(served, client, identity):
    platform, _, _ = served
    alloc = client.alloc(npages=guest_page_count())
    guest = seal_guest(alloc.keyid, alloc.hpas, identity.kak_public)
    host_loads(client, guest)
    target = guest.hpa_of[0x2000]
    client.write_phys(target, guest.ciphertext[target])            # building: allowed
    assert client.verify_ept(guest.keyid, alloc.hpas).ok
    platform.domain(guest.keyid).mark_launched()
    with pytest.raises(HostPortOwnershipError, match="PRIVATE IMAGE page of key domain 1") as err:
        client.write_phys(target + 16, b"tamper")
    assert err.value.code == "ownership" and isinstance(err.value, KdError)
    with pytest.raises(HostPortOwnershipError):
        client.write_phys_pages([target], bytes(PAGE))
    assert client.platform_info().integrity_events == 2
    assert client.read_phys(target, PAGE) == guest.ciphertext[target]
    with pytest.raises(HostPortStateError, match="LAUNCHED: add-pages"):
        client.add_pages(guest.keyid, [(alloc.hpas[-1], 0x100000, PageType.IMAGE, RW)])


def test_keyid_exhaustion_through_the_socket(client):
    for _ in range(63):
        client.alloc(npages=1)
    with pytest.raises(HostPortKeyIdExhaustedError,
                       match="no free KeyID: all 63 key domains are in use; destroy one with destroy-kd"):
        client.alloc(npages=1)
    assert client.platform_info().free_keyids == []


def test_error_codes_map_to_exception_classes(client, identity):
    alloc = client.alloc(npages=guest_page_count())
    guest = seal_guest(alloc.keyid, alloc.hpas, identity.kak_public)
    with pytest.raises(HostPortUnwrapError, match="does not open"):
        client.create_kd(alloc.keyid, guest.wrapped, Policy.make(debug=True), guest.host_data)
    with pytest.raises(HostPortBadRequestError, match="wrapped key"):
        client.create_kd(alloc.keyid, b"short", guest.policy, guest.host_data)
    with pytest.raises(HostPortOwnershipError, match="KeyID 3 refused"):
        client.read_phys(3 << 40 | alloc.hpas[0], 16)
    with pytest.raises(HostPortAddressError, match="runs past the end"):
        client.read_phys(MEMORY - 8, 16)
    with pytest.raises(HostPortNotFoundError, match="no key domain"):
        client.vmread(40, ENC_EPT_POINTER)
    with pytest.raises(HostPortBadRequestError, match="'keyid'"):
        client._call("vmread", {"keyid": "one", "encoding": 1})
    with pytest.raises(HostPortUnknownCommandError, match="launch-everything"):
        client._call("launch-everything")
    client.create_kd(alloc.keyid, guest.wrapped, guest.policy, guest.host_data)
    with pytest.raises(HostPortStateError, match="no VMCS page yet"):
        client.vmread(alloc.keyid, ENC_EPT_POINTER)
    with pytest.raises(HostPortNotFoundError, match="no VMCS field"):
        client.vmread(alloc.keyid, 0x7FFE)
    assert client.platform_info().memory_size == MEMORY               # the connection survived


def test_large_transfers_are_split(client):
    client.max_data = 3 * PAGE
    alloc = client.alloc(npages=10)
    data = os.urandom(10 * PAGE)
    client.write_phys_pages(list(reversed(alloc.hpas)), data)
    assert client.read_phys_pages(list(reversed(alloc.hpas))) == data
    assert client.read_phys(alloc.hpas[0], 10 * PAGE)[9 * PAGE:] == data[:PAGE]
    client.write_phys(alloc.hpas[0] + 5, data[:7 * PAGE])
    assert client.read_phys(alloc.hpas[0] + 5, 7 * PAGE) == data[:7 * PAGE]


def test_concurrent_connections_each_see_their_own_pages(served):
    _, path, _ = served
    errors = []

    def worker(seed):
        try:
            with HostPortClient(path, timeout=10) as c:
                alloc = c.alloc(npages=4)
                data = random.Random(seed).randbytes(4 * PAGE)
                for _ in range(5):
                    c.write_phys_pages(alloc.hpas, data)
                    assert c.read_phys_pages(alloc.hpas) == data
                assert c.free(alloc.keyid) == 4
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    with HostPortClient(path) as c:
        assert c.platform_info().free_keyids == list(range(1, 64))


def test_page_entry_wire_format():
    entry = PageEntry(0x5000, None, PageType.VMCS, 0)
    packed = entry.pack()
    assert len(packed) == PAGE_ENTRY_SIZE == 24
    assert packed == struct.pack("<QQBBHI", 0x5000, (1 << 64) - 1, 3, 0, 0, 0)
    assert PageEntry.unpack(packed) == entry
    image = PageEntry(0x6000, 0x1000, PageType.IMAGE, 7, True)
    assert PageEntry.unpack(image.pack()) == image
    with pytest.raises(HostPortBadRequestError, match="reserved"):
        unpack_page_entries(packed[:-1] + b"\x01")
    assert unpack_page_entries(pack_page_entries([(1 << 12, 0, 1, 1)]))["hpa"][0] == 0x1000
    array = unpack_page_entries(entry.pack() + image.pack())
    assert pack_page_entries(array) == entry.pack() + image.pack()      # structured-array fast path
    for bad in ([(-1, 0, 1, 1)], [(0, 0, 256, 1)], [(0, 0, 1, 1.5)], [(0, 0, 1)]):
        with pytest.raises(HostPortBadRequestError):
            pack_page_entries(bad)


# ------------------------------------------------- launch (runtime faked)


class FakeRuntime:
    """Stands in for kd_runtime.DomainRuntime: records what the platform asks of it."""

    made = []
    fail_next_launch = fail_next_resume = False

    def __init__(self, domain, identity, accel, name):
        self.domain, self.accel, self.name = domain, accel, name
        self.calls = []
        FakeRuntime.made.append(self)

    def launch(self):
        self.calls.append("launch")
        if FakeRuntime.fail_next_launch:
            FakeRuntime.fail_next_launch = False
            raise LaunchError("VM entry refused for key domain: guest RIP is outside guest memory")
        self.domain.on_destroy = self.stop
        return self.endpoints()

    def endpoints(self):
        return SimpleNamespace(shared="/r/shared.sock", console="/r/console.sock", console_log="/r/console.log",
                               qmp="/r/kd-qmp.sock", gdb="/r/kd-gdb.sock", audit_log="/r/audit.log",
                               raw_qmp="/r/qemu-qmp.sock")

    def run(self):
        self.calls.append("run")

    def exit(self):
        self.calls.append("exit")

    def resume(self):
        self.calls.append("resume")
        if FakeRuntime.fail_next_resume:
            FakeRuntime.fail_next_resume = False
            raise SaveAreaError("protected save area does not verify (tampered)")

    def stop(self):
        self.calls.append("stop")


@pytest.fixture
def launchable(identity, tmp_path):
    FakeRuntime.made = []
    FakeRuntime.fail_next_launch = FakeRuntime.fail_next_resume = False
    platform = Platform(identity, MEMORY, tmp_path / "platform", qemu_accel="tcg", runtime_factory=FakeRuntime)
    with serving(platform) as (path, _server), HostPortClient(path, timeout=10) as c:
        yield platform, c


def test_measure_launch_run_exit_resume_destroy(launchable, identity):
    platform, client = launchable
    alloc = client.alloc(npages=guest_page_count())
    guest = seal_guest(alloc.keyid, alloc.hpas, identity.kak_public)
    host_loads(client, guest)
    k = guest.keyid
    with pytest.raises(HostPortStateError, match="BUILDING: measure-kd is allowed only in VERIFIED"):
        client.measure_kd(k)
    with pytest.raises(HostPortStateError, match="BUILDING: launch"):
        client.launch(k)
    assert client.verify_ept(k, alloc.hpas).ok
    assert client.measure_kd(k) == guest.expected_measurement()

    FakeRuntime.fail_next_launch = True
    with pytest.raises(HostPortLaunchError, match="VM entry refused"):
        client.launch(k)
    assert platform.domain(k).state.value == "VERIFIED" and client.platform_info().accelerator == "none"

    endpoints = client.launch(k)
    # The filtering proxies are handed out, never QEMU's own sockets.
    assert endpoints == {"shared": "/r/shared.sock", "console": "/r/console.sock", "console_log": "/r/console.log",
                         "qmp": "/r/kd-qmp.sock", "gdb": "/r/kd-gdb.sock", "audit_log": "/r/audit.log"}
    status = client.domain_status(k)
    assert (status["state"], status["running"], status["endpoints"]) == ("LAUNCHED", True, endpoints)
    assert status["measurement"] == guest.expected_measurement().hex()
    assert [d["keyid"] for d in client.list_domains()] == [k]
    with pytest.raises(HostPortRefusedError, match="does not allow DEBUG"):
        client.debug_read(k, 0x100000, 64)
    runtime = FakeRuntime.made[-1]
    assert (runtime.accel, runtime.name) == ("tcg", f"kd{k}")
    assert client.platform_info().accelerator == "tcg"
    assert client.measure_kd(k) == guest.expected_measurement()      # fixed once launched
    client.run(k)
    with pytest.raises(HostPortStateError, match="LAUNCHED: resume"):
        client.resume(k)
    client.exit(k)
    assert platform.domain(k).state.value == "EXITED"
    with pytest.raises(HostPortStateError, match="EXITED: run"):
        client.run(k)
    FakeRuntime.fail_next_resume = True
    with pytest.raises(HostPortVerifyError, match="save area"):
        client.resume(k)
    assert platform.domain(k).state.value == "EXITED"
    client.resume(k)
    assert platform.domain(k).state.value == "LAUNCHED"
    assert runtime.calls == ["launch", "run", "exit", "resume", "resume"]
    client.destroy_kd(k)
    assert runtime.calls[-1] == "stop"
    assert client.platform_info().accelerator == "none"


def test_exit_refused_when_the_vmcs_forbids_host_forced_exits(launchable, identity):
    platform, client = launchable
    alloc = client.alloc(npages=guest_page_count())
    guest = seal_guest(alloc.keyid, alloc.hpas, identity.kak_public, host_forced_exit=False)
    host_loads(client, guest)
    assert client.verify_ept(guest.keyid, alloc.hpas).ok
    client.launch(guest.keyid)
    with pytest.raises(HostPortRefusedError, match="forbids host-forced exits"):
        client.exit(guest.keyid)
    assert FakeRuntime.made[-1].calls == ["launch"]


# ----------------------------------------------------------- robustness


def raw_connection(path):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(10)
    s.connect(str(path))
    return s


def read_reply(sock):
    head = b""
    while len(head) < 4:
        chunk = sock.recv(4 - len(head))
        if not chunk:
            return None
        head += chunk
    (length,) = struct.unpack(">I", head)
    body = b""
    while len(body) < length:
        chunk = sock.recv(length - len(body))
        assert chunk
        body += chunk
    return Reply.unpack(body)


def hello_frame(rid=1, versions=(1,)):
    return Request("hello", rid, {"versions": list(versions)}).pack()


def frame_with_header(header_bytes, payload=b""):
    return struct.pack(">II", 4 + len(header_bytes) + len(payload), len(header_bytes)) + header_bytes + payload


def fuzz_cases():
    rng = random.Random(1234)
    cases = [
        ("random bytes", [rng.randbytes(n) for n in (1, 3, 7, 64, 1000)]),
        ("truncated length prefix", [b"\x00\x00"]),
        ("truncated header", [struct.pack(">II", 100, 90) + b'{"cmd": "hel']),
        ("huge length prefix", [b"\xff\xff\xff\xff" + b"x" * 10]),
        ("just over the limit", [struct.pack(">I", MAX_FRAME + 1)]),
        ("header longer than frame", [struct.pack(">II", 8, 1000) + b"{}{}"]),
        ("bad JSON", [frame_with_header(b"{not json")]),
        ("bad UTF-8", [frame_with_header(b'{"cmd": "\xff\xfe"}')]),
        ("JSON array header", [frame_with_header(b"[1, 2, 3]")]),
        ("no cmd", [frame_with_header(b'{"id": 1}')]),
        ("string id", [frame_with_header(b'{"cmd": "hello", "id": "1"}')]),
        ("args not an object", [frame_with_header(b'{"cmd": "hello", "id": 1, "args": 5}')]),
        ("command before hello", [Request("platform-info", 1).pack()]),
        ("unsupported version", [hello_frame(versions=(99,))]),
        ("unknown command", [hello_frame(), Request("self-destruct", 2).pack()]),
        ("garbage after hello", [hello_frame(), b"\x00\x00\x00\x05abcde"]),
        ("bad payloads", [hello_frame(), Request("add-pages", 2, {"keyid": 1}, b"x" * 23).pack(),
                          Request("verify-ept", 3, {"keyid": 1}, b"x" * 9).pack(),
                          Request("write-phys-pages", 4, {"count": 2}, b"x" * 8).pack(),
                          Request("read-phys", 5, {"dpa": -1, "length": 1}).pack(),
                          Request("create-kd", 6, {"keyid": 1, "wrapped_key": "zz", "policy": ""}).pack()]),
    ]
    cases += [(f"random frame {i}", [hello_frame(), frame_with_header(rng.randbytes(rng.randrange(1, 40)),
                                                                        rng.randbytes(rng.randrange(0, 40)))])
              for i in range(10)]
    return cases


def test_fuzzed_frames_never_stop_the_service(served):
    platform, path, server = served
    bystander = HostPortClient(path, timeout=10)         # a connection open through all of it
    for name, chunks in fuzz_cases():
        s = raw_connection(path)
        try:
            for chunk in chunks:
                s.sendall(chunk)
            s.shutdown(socket.SHUT_WR)
            replies = []
            while (reply := read_reply(s)) is not None:
                replies.append(reply)
        except (BrokenPipeError, ConnectionResetError):
            replies = None
        finally:
            s.close()
        for reply in replies or []:
            assert reply.ok or reply.error.code in (
                "protocol", "unknown-command", "bad-request", "address", "not-found"), (name, reply)
        with HostPortClient(path, timeout=10) as fresh:
            assert fresh.platform_info().memory_size == MEMORY, name
    assert bystander.platform_info().free_keyids == list(range(1, 64))
    bystander.close()


def test_oversized_frame_gets_a_protocol_error_then_close(served):
    _, path, _ = served
    s = raw_connection(path)
    s.sendall(hello_frame())
    assert read_reply(s).ok
    s.sendall(struct.pack(">I", 0xFFFFFFF0))
    reply = read_reply(s)
    assert not reply.ok and reply.error.code == "protocol"
    assert "exceeds the maximum of 67108864 bytes" in reply.error.message
    assert read_reply(s) is None                           # that connection is closed
    s.close()


def test_protocol_errors_are_logged(served, caplog):
    _, path, _ = served
    caplog.set_level(logging.WARNING, logger="qemu_kd.platform.hostport_server")
    s = raw_connection(path)
    s.sendall(Request("platform-info", 3).pack())
    assert read_reply(s).error.code == "protocol"
    assert read_reply(s) is None
    s.close()
    records = [r for r in caplog.records if r.name == "qemu_kd.platform.hostport_server"]
    assert any(r.levelno == logging.WARNING and "must be hello" in r.getMessage()
               for r in records)


def test_error_replies_reveal_only_platform_messages(caplog):
    caplog.set_level(logging.INFO, logger="qemu_kd.platform.hostport_server")
    reply = error_reply(4, "vmread", HostPortNotFoundError("no field 0x1234", "see the list"))
    assert (reply.error.code, reply.error.message, reply.error.hint) == (
        "not-found", "no field 0x1234", "see the list")
    for exc in (ValueError("secret bytes 0xdeadbeef"), AssertionError("x"),
                HostPortError("plain failure")):
        reply = error_reply(5, "read-phys", exc)
        assert reply.error.code == "internal", exc
    assert reply.error.message == "plain failure"       # a HostPortError keeps its message
    reply = error_reply(5, "read-phys", ValueError("secret bytes 0xdeadbeef"))
    assert reply.error.message == "internal platform error while running read-phys"
    assert "deadbeef" not in reply.error.message + (reply.error.hint or "")
    assert any(r.levelno == logging.ERROR and "ValueError" in r.getMessage()
               for r in caplog.records)


def test_hello_is_required_and_versions_are_negotiated(served):
    _, path, _ = served
    s = raw_connection(path)
    s.sendall(hello_frame(versions=(7, 1, 2)))
    reply = read_reply(s)
    assert reply.ok and reply.result["version"] == 1 and reply.result["max_frame"] == MAX_FRAME
    assert "verify-ept" in reply.result["commands"]
    s.close()
    s = raw_connection(path)
    s.sendall(Request("platform-info", 9).pack())
    reply = read_reply(s)
    assert reply.error.code == "protocol" and "must be hello" in reply.error.message and reply.id == 9
    s.close()


def test_socket_is_private_and_removed_on_close(identity, tmp_path):
    with Platform(identity, MEMORY, tmp_path / "p") as platform, \
            tempfile.TemporaryDirectory(prefix="kd-") as sockdir:
        path = Path(sockdir) / "host.sock"
        server = HostPortServer(platform, path).start()
        assert stat.S_ISSOCK(os.stat(path).st_mode)
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        with pytest.raises(KdError, match="already listening"):
            HostPortServer(platform, path).start()
        with HostPortClient(path) as c:
            assert c.platform_info().free_keyids
            server.close()
            with pytest.raises(HostPortConnectionError):
                c.platform_info()
        assert not path.exists()
        with pytest.raises(HostPortConnectionError, match="cannot connect"):
            HostPortClient(path)
        # A stale socket file left behind by a dead platform is replaced.
        stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        stale.bind(str(path))
        stale.close()
        with HostPortServer(platform, path) as again:
            with HostPortClient(path) as c:
                assert c.platform_info().memory_size == MEMORY
        del again


def test_close_wakes_the_accept_loop(identity, tmp_path):
    """The accept loop blocks in accept() without polling; close() wakes it, and the connection
    that woke it is not served."""
    with Platform(identity, MEMORY, tmp_path / "p") as platform, \
            tempfile.TemporaryDirectory(prefix="kd-") as sockdir:
        server = HostPortServer(platform, Path(sockdir) / "host.sock").start()
        accept_thread = server._accept_thread
        assert server._listener.gettimeout() is None
        server.close()
        assert not accept_thread.is_alive()
        assert server.connection_count == 0

def test_client_imports_no_platform_module():
    code = (
        "import sys, json\n"
        "import qemu_kd.hostport.client\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.startswith('qemu_kd'))))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    loaded = set(json.loads(out))
    assert {"qemu_kd.hostport.protocol", "qemu_kd.hostport.client"} <= loaded
    assert all(m.split(".")[1] in ("common", "formats", "hostport") for m in loaded if m != "qemu_kd"), loaded
    # Nor any cryptography: the host VMM side has no use for it.
    child = subprocess.run([sys.executable, "-c", code.replace("m.startswith('qemu_kd')",
                                                               "m.startswith('cryptography')")],
                           check=True, capture_output=True, text=True).stdout
    assert json.loads(child) == []


def test_frame_round_trip_and_limits():
    frame = Frame({"cmd": "x", "id": 3}, b"\x00payload")
    packed = frame.pack()
    (length, hlen) = struct.unpack(">II", packed[:8])
    assert length == len(packed) - 4 and packed[8:8 + hlen] == b'{"cmd":"x","id":3}'
    back = Frame.unpack(packed[4:])
    assert back.header == frame.header and bytes(back.payload) == b"\x00payload"
    with pytest.raises(HostPortError, match="exceeds the maximum"):
        Frame({}, bytes(MAX_FRAME)).pack()
    with pytest.raises(HostPortProtocolError, match="not a JSON object"):
        Frame.unpack(struct.pack(">I", 2) + b"[]")
