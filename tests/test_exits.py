"""Complete exits (whole vCPU state sealed, scrubbed, restored) and hypercalls.

* Without QEMU: the save-area format and its MAC, QEMU's register description
  against the pinned list, the exposed-register mask (narrow, never widen),
  the exit log's refusals, the host VMM's answers, the guest's leaf table.
* With a real protected guest (in-process platform, so a test can look at
  QEMU's own gdbstub and tamper with the save area):
  - during an exit QEMU's gdbstub shows only scrub values;
  - a guest loop with 16 live SSE registers and 12 general registers gives
    the right answer across dozens of forced exits;
  - hypercalls from the guest command and the agent API; the host sees only
    the exposed registers (canaries in the others appear in nothing the host
    receives); a reply writing an unexposed register, a stale reply and a
    host resume of a hypercall exit are refused; an unanswered hypercall ends
    with "host did not answer" and the guest runs on;
  - a tampered save area is refused on resume and the domain is destroyed.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from pathlib import Path

import numpy as np
import pytest

from guest_agent import hypercall as guest_hypercall
from host_vmm.hypercalls import HypercallResponder, answer_host_time
from protected import protected_domain
from qemu_kd.formats.errors import FieldValueError
from qemu_kd.formats.hypercall import (
    ECHO,
    HOST_TIME,
    LEAVES,
    STATUS_UNSUPPORTED,
    ExitRecord,
    HypercallReply,
    narrow_mask,
)
from qemu_kd.formats.savearea import (
    FULL_STATE,
    RESTORE_ORDER,
    SCRUB_ORDER,
    SCRUB_VALUES,
    HypercallFrame,
    SaveArea,
    check_target_registers,
    target_registers,
)
from qemu_kd.formats.vmcs import X86_GPR_ORDER, exposed_register_mask
from qemu_kd.hostport.client import HostPortClient
from qemu_kd.hostport.protocol import HostPortRefusedError, HostPortStateError, HostPortVerifyError
from qemu_kd.platform.exits import (
    ExitLog,
    SaveAreaError,
    StaleReplyError,
    UnexposedRegisterError,
    VcpuSealer,
    open_save_area,
    seal_save_area,
)

KEY = bytes(range(48))
HPA = 0x7000


def some_area(**kw) -> SaveArea:
    regs = {r.name: (i * 0x0101010101 + 7) % (1 << (8 * r.size)) for i, r in enumerate(FULL_STATE)}
    return SaveArea(seq=kw.get("seq", 3), reason=kw.get("reason", "host"), keyid=5, registers=regs,
                    hypercall=kw.get("hypercall"))


# -- without QEMU ---------------------------------------------------------------------------------

def test_save_area_round_trip_and_its_mac():
    frame = HypercallFrame(ECHO, exposed_register_mask(["rbx"]), {n: i for i, n in enumerate(X86_GPR_ORDER)})
    area = some_area(reason="hypercall", hypercall=frame)
    page = seal_save_area(area, KEY, HPA)
    assert len(page) == 4096
    back = open_save_area(page, KEY, 5, HPA, 3)
    assert back == area
    for offset in (0, 40, 200, len(area.pack_body()) + 5, 4000):
        bad = bytearray(page)
        bad[offset] ^= 1
        with pytest.raises(SaveAreaError, match="does not verify"):
            open_save_area(bytes(bad), KEY, 5, HPA, 3)
    with pytest.raises(SaveAreaError, match="does not verify"):
        open_save_area(page, KEY, 5, HPA + 4096, 3)        # bound to where it lives
    with pytest.raises(SaveAreaError, match="does not verify"):
        open_save_area(page, bytes(48), 5, HPA, 3)
    with pytest.raises(SaveAreaError, match="replayed"):
        open_save_area(page, KEY, 5, HPA, 4)               # an older exit's valid save area


def test_register_orders_cover_every_register_and_keep_the_launch_order():
    names = [r.name for r in FULL_STATE]
    assert sorted(RESTORE_ORDER) == sorted(names) == sorted(SCRUB_ORDER) == sorted(SCRUB_VALUES)
    assert RESTORE_ORDER[:4] == ("cr4", "cr3", "efer", "cr0") and RESTORE_ORDER[-2:] == ("eflags", "rip")
    # Segments load after the control registers, the 64-bit registers after CS.
    assert RESTORE_ORDER.index("cs") > RESTORE_ORDER.index("cr0")
    assert min(RESTORE_ORDER.index(n) for n in ("r8", "r15", "k_gs_base", "rax")) > RESTORE_ORDER.index("cs")
    assert SCRUB_ORDER == tuple(reversed(RESTORE_ORDER))


def test_target_description_is_checked_against_the_pinned_list():
    regs = "".join(f'<reg name="{r.name}" bitsize="{r.size * 8}"/>' for r in FULL_STATE)
    docs = {"target.xml": b'<target><xi:include href="core.xml"/></target>',
            "core.xml": f"<feature>{regs}<!--reg name=\"cs_base\" bitsize=\"64\"/--></feature>".encode()}
    assert check_target_registers(target_registers(docs)) == []
    docs["core.xml"] = docs["core.xml"].replace(b"</feature>", b'<reg name="ymm0h" bitsize="128"/></feature>')
    assert check_target_registers(target_registers(docs)) == ["the platform cannot seal ymm0h (128 bits)"]


def test_the_guest_narrows_the_mask_and_never_widens_it():
    vmcs = exposed_register_mask(["rax", "rbx", "rcx"])
    assert narrow_mask(vmcs, None) == vmcs
    assert narrow_mask(vmcs, ["rbx"]) == exposed_register_mask(["rbx"])
    assert narrow_mask(vmcs, []) == 0
    with pytest.raises(FieldValueError, match="never widen it: r12 not exposed by the VMCS"):
        narrow_mask(vmcs, ["rbx", "r12"])
    with pytest.raises(FieldValueError, match="not a general-purpose register"):
        narrow_mask(vmcs, ["rip"])


def test_exit_log_refuses_unexposed_writes_and_stale_replies():
    log = ExitLog(keyid=2)
    record = ExitRecord(seq=log.next_seq(), keyid=2, reason="hypercall", leaf=ECHO, exposed=["rbx"],
                        inputs={"rbx": 5}, timeout=5.0)
    log.publish(record)
    assert log.next_after(0, 0)["pending"] is True
    with pytest.raises(UnexposedRegisterError, match="writes r12, which the guest did not expose"):
        log.answer(HypercallReply(record.seq, {"rbx": 1, "r12": 2}))
    with pytest.raises(StaleReplyError, match="no hypercall exit 9"):
        log.answer(HypercallReply(9, {"rbx": 1}))
    log.answer(HypercallReply(record.seq, {"rbx": 6}))
    assert log.await_reply(record.seq, 1.0).outputs == {"rbx": 6}
    with pytest.raises(StaleReplyError):
        log.answer(HypercallReply(record.seq, {"rbx": 7}))     # answered already
    # A hypercall nobody answers gives None; a late reply is then stale.
    late = ExitRecord(seq=log.next_seq(), keyid=2, reason="hypercall", leaf=ECHO, exposed=[], timeout=0.1)
    log.publish(late)
    assert log.await_reply(late.seq, 0.05) is None
    with pytest.raises(StaleReplyError):
        log.answer(HypercallReply(late.seq, {}))
    assert log.next_after(late.seq, 0.01) is None


def test_host_answers_and_the_leaf_tables_agree():
    assert guest_hypercall.LEAVES == {leaf.name: leaf.number for leaf in LEAVES}
    assert guest_hypercall.GPRS == X86_GPR_ORDER
    responder = HypercallResponder(lambda: None, keyid=1)
    echo = ExitRecord(seq=1, keyid=1, reason="hypercall", leaf=ECHO, exposed=["rbx", "rcx"],
                      inputs={"rbx": 1, "rcx": 2})
    assert responder.answer(echo) == HypercallReply(1, {"rbx": 1, "rcx": 2}, 0)
    no_rax = ExitRecord(seq=2, keyid=1, reason="hypercall", leaf=HOST_TIME, exposed=["rbx"], inputs={"rbx": 0})
    assert answer_host_time(no_rax).status == STATUS_UNSUPPORTED
    unknown = ExitRecord(seq=3, keyid=1, reason="hypercall", leaf=0x999, exposed=[])
    assert responder.answer(unknown).status == STATUS_UNSUPPORTED


def test_guest_command_arguments():
    assert guest_hypercall.parse_leaf("echo") == ECHO and guest_hypercall.parse_leaf("0x10") == 0x10
    assert guest_hypercall.parse_assignments(["rbx=7", "R8=0x10"]) == {"rbx": 7, "r8": 16}
    for bad in (["rip=1"], ["rbx"], ["rbx=x"], [f"rbx={1 << 64}"]):
        with pytest.raises(ValueError):
            guest_hypercall.parse_assignments(bad)
    with pytest.raises(ValueError, match="unknown leaf"):
        guest_hypercall.parse_leaf("FROB")
    assert guest_hypercall.main(["ECHO", "--expose", "rip"]) == 1


# -- with a real guest -----------------------------------------------------------------------------

EXPOSED = ("rax", "rcx", "rdx", "rbx", "rsi", "rdi", "r8", "r9")

# A function f(uint64_t buf[44], uint64_t n) in x86-64 machine code: it loads xmm0..xmm15
# and r8..r15, rax, rbx, rdx, rbp from buf, then n times
#     xmm[i] += xmm[i+1] (i = 0..14, paddq); xmm15 ^= xmm0;
#     g[j] += g[j+1] (j = 0..10, add);       g[11] ^= g[0]
# and n times the exact inverse (in reverse order, psubq/sub/xor), and stores them all back.
# Every step depends on registers only, so any register that changes under the loop
# (a scrub without restore, a partial restore) leaves buf different from what it was.
SSE_LOOP = bytes.fromhex(
    "53554154415541564157f30f6f07f30f6f4f10f30f6f5720f30f6f5f30f30f6f6740f30f6f6f50f30f6f7760"
    "f30f6f7f70f3440f6f8780000000f3440f6f8f90000000f3440f6f97a0000000f3440f6f9fb0000000f344"
    "0f6fa7c0000000f3440f6fafd0000000f3440f6fb7e0000000f3440f6fbff00000004c8b87000100004c8b"
    "8f080100004c8b97100100004c8b9f180100004c8ba7200100004c8baf280100004c8bb7300100004c8bbf"
    "38010000488b8740010000488b9f48010000488b9750010000488baf580100004889f1660fd4c1660fd4ca"
    "660fd4d3660fd4dc660fd4e5660fd4ee660fd4f766410fd4f866450fd4c166450fd4ca66450fd4d366450f"
    "d4dc66450fd4e566450fd4ee66450fd4f766440feff84d01c84d01d14d01da4d01e34d01ec4d01f54d01fe"
    "4901c74801d84801d34801ea4c31c548ffc9758e4889f14c31c54829ea4829d34829d84929c74d29fe4d29"
    "f54d29ec4d29e34d29da4d29d14d29c866440feff866450ffbf766450ffbee66450ffbe566450ffbdc6645"
    "0ffbd366450ffbca66450ffbc166410ffbf8660ffbf7660ffbee660ffbe5660ffbdc660ffbd3660ffbca66"
    "0ffbc148ffc9758ef30f7f07f30f7f4f10f30f7f5720f30f7f5f30f30f7f6740f30f7f6f50f30f7f7760f3"
    "0f7f7f70f3440f7f8780000000f3440f7f8f90000000f3440f7f97a0000000f3440f7f9fb0000000f3440f"
    "7fa7c0000000f3440f7fafd0000000f3440f7fb7e0000000f3440f7fbff00000004c8987000100004c898f"
    "080100004c8997100100004c899f180100004c89a7200100004c89af280100004c89b7300100004c89bf38"
    "0100004889874001000048899f48010000488997500100004889af58010000415f415e415d415c5d5bc3")

SSE_PROGRAM = """
import ctypes, mmap, os, sys
code = bytes.fromhex(sys.argv[1])
mem = mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
mem.write(code)
fn = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_uint64)(ctypes.addressof(ctypes.c_char.from_buffer(mem)))
start = os.urandom(352)
buf = ctypes.create_string_buffer(start, 352)
print("started", flush=True)
fn(ctypes.addressof(buf), int(sys.argv[2]))
print("same" if buf.raw == start else "DIFFERENT " + start.hex() + " " + buf.raw.hex())
"""
# Iterations: long enough under TCG for dozens of exits while the loop runs.
SSE_ITERATIONS = 50_000_000


@pytest.fixture(scope="module")
def dom(guest_artifacts, tmp_path_factory):
    with protected_domain(tmp_path_factory.mktemp("exits"), guest_artifacts, in_process=True,
                          exposed_register_mask=exposed_register_mask(EXPOSED)) as d:
        yield d


def runtime_of(dom):
    return dom.platform.runtimes[dom.keyid]


def sealed_state(dom) -> SaveArea:
    """The exited vCPU's state, from the save area (in-process only: the platform's key)."""
    rt = runtime_of(dom)
    page = rt.domain.decrypt_pages(np.array([rt._save_hpa], dtype=np.uint64))
    return open_save_area(page, rt._save_mac_key, dom.keyid, rt._save_hpa, rt._exit_seq)


@pytest.mark.qemu
def test_qemu_shows_no_guest_value_during_an_exit(dom):
    rt = runtime_of(dom)
    for _ in range(3):
        dom.vmm.client.exit(dom.keyid)
        try:
            with rt.rsp_lock:
                shown = VcpuSealer(rt.machine.rsp).capture()
                single = {r.name: rt.machine.rsp.read_register(r.number) for r in FULL_STATE}
            saved = sealed_state(dom).registers
        finally:
            dom.vmm.client.resume(dom.keyid)
        assert shown == single == SCRUB_VALUES
        # The check is not vacuous: the guest's own values are in the save area, and differ.
        differ = [n for n in saved if saved[n] != SCRUB_VALUES[n]]
        assert {"rip", "rsp", "cr3", "cr0", "cr4", "efer", "cs"} <= set(differ)
    assert dom.agent("ping")["pong"]


@pytest.mark.qemu
def test_live_sse_state_survives_dozens_of_exits(dom):
    session = dom.session()
    out: dict = {}

    def compute():
        out["result"] = session.exec(["python3", "-c", SSE_PROGRAM, SSE_LOOP.hex(), str(SSE_ITERATIONS)],
                                     timeout=1800)

    worker = threading.Thread(target=compute)
    worker.start()
    cycles, in_user_mode = 0, 0
    while worker.is_alive():
        dom.vmm.client.exit(dom.keyid)
        state = sealed_state(dom).registers
        in_user_mode += state["cs"] & 3 == 3
        dom.vmm.client.resume(dom.keyid)
        cycles += 1
    worker.join()
    result = out["result"]
    assert result["rc"] == 0, result["stderr"]
    assert result["stdout"].split()[-1] == b"same", result["stdout"]
    # Dozens of exits, many of them inside the loop (user mode, CPL 3).
    assert cycles >= 24 and in_user_mode >= 8, (cycles, in_user_mode)


def register_forms(value: int) -> list[bytes]:
    """How a register value could appear in what the host receives."""
    return [str(value).encode(), f"{value:x}".encode(), f"{value:X}".encode(),
            value.to_bytes(8, "little"), value.to_bytes(8, "big")]


def hits(haystacks, value: int) -> int:
    return sum(h.count(form) for h in haystacks for form in register_forms(value))


@pytest.mark.qemu
def test_hypercalls_expose_only_the_masked_registers(dom, caplog):
    caplog.set_level(logging.DEBUG)
    session = dom.session()
    shown = int.from_bytes(os.urandom(8), "little") | 1 << 63
    hidden = {name: int.from_bytes(os.urandom(8), "little") | 1 << 63
              for name in ("rcx", "rdx", "r10", "r11", "r12", "r13", "r14", "r15", "rbp")}
    argv = ["kd-hypercall", "ECHO", f"rbx={shown}", *(f"{n}={v}" for n, v in hidden.items()),
            "--expose", "rbx", "--json"]
    result = session.exec(argv)
    assert result["rc"] == 0, result["stderr"]
    answer = json.loads(result["stdout"])
    assert answer["exposed"] == ["rbx"] and answer["outputs"] == {"rbx": shown} and answer["status"] == 0
    # Unexposed registers come back exactly as the guest passed them (from the save area).
    assert {n: answer["regs"][n] for n in hidden} == hidden

    # The exit record the host saw: the leaf and rbx, nothing else.
    last = dom.vmm.client.next_exit(dom.keyid, after=answer["seq"] - 1)
    assert last["seq"] == answer["seq"] and last["reason"] == "hypercall" and last["leaf_name"] == "ECHO"
    assert last["exposed"] == ["rbx"] and last["inputs"] == {"rbx": shown}

    # The agent API: the tenant session's op and the guest library.
    time_answer = session.call("hypercall", leaf=HOST_TIME, regs={"r12": hidden["r12"]}, expose=["rax"])
    assert time_answer["status"] == 0 and time_answer["outputs"]["rax"] > 1_600_000_000 * 10**9
    program = ("from guest_agent.hypercall import call; import json; "
               f"print(json.dumps(call('ECHO', {{'rsi': 11, 'r13': {hidden['r13']}}}, expose=['rsi'])))")
    lib = session.exec(["python3", "-c", program])
    assert lib["rc"] == 0, lib["stderr"]
    assert json.loads(lib["stdout"])["outputs"] == {"rsi": 11}

    # Widening is refused to the guest.
    wide = session.exec(["kd-hypercall", "ECHO", "r12=1", "--expose", "rbx,r12"])
    assert wide["rc"] == 1 and b"never widen it: r12 not exposed by the VMCS" in wide["stderr"]

    # The canary hunt over every host-visible byte: host-port replies on both host
    # connections (exit records), the shared channel, the console and the platform's log.
    dom.host_memory_view()
    haystacks = [bytes(s) for s in dom.received] + [Path(dom.endpoints["console_log"]).read_bytes(),
                                                     caplog.text.encode()]
    assert hits(haystacks, shown) > 0            # the scan finds what the guest exposed
    assert {n: hits(haystacks, v) for n, v in hidden.items()} == {n: 0 for n in hidden}


@pytest.mark.qemu
def test_host_replies_are_checked_and_unanswered_calls_end(dom):
    session = dom.session()
    dom.vmm._stop_responder()           # this test answers itself
    client = HostPortClient(str(dom.platform_socket), timeout=60)
    try:
        start = client.next_exit(dom.keyid, after=0)
        after = max(int(start["seq"]) if start else 0, dom.platform.runtimes[dom.keyid].exits.last_seq)
        out: dict = {}
        worker = threading.Thread(target=lambda: out.update(r=session.exec(
            ["kd-hypercall", "ECHO", "rbx=5", "rcx=6", "r12=7", "--expose", "rbx,rcx", "--timeout", "120"])))
        worker.start()
        record = client.next_exit(dom.keyid, after=after, wait=60)
        while record["reason"] != "hypercall":
            record = client.next_exit(dom.keyid, after=record["seq"], wait=60)
        seq = record["seq"]
        assert record["pending"] and record["inputs"] == {"rbx": 5, "rcx": 6}
        with pytest.raises(HostPortRefusedError, match="writes r12, which the guest did not expose"):
            client.hypercall_reply(dom.keyid, seq, {"rbx": 50, "r12": 70})
        with pytest.raises(HostPortStateError, match=f"no hypercall exit {seq + 1} is waiting"):
            client.hypercall_reply(dom.keyid, seq + 1, {"rbx": 50})
        with pytest.raises(HostPortStateError, match="answer it with hypercall-reply"):
            client.resume(dom.keyid)
        client.hypercall_reply(dom.keyid, seq, {"rbx": 50})
        worker.join()
        assert out["r"]["rc"] == 0 and out["r"]["stdout"].split()[-1] == b"rbx=0x32", out["r"]
        with pytest.raises(HostPortStateError):
            client.hypercall_reply(dom.keyid, seq, {"rbx": 51})           # stale now

        # Nobody answers: the guest gets a clear error after its timeout and runs on.
        late = session.exec(["kd-hypercall", "HOST_TIME", "--expose", "rax", "--timeout", "2"])
        assert late["rc"] == 1 and b"host did not answer hypercall" in late["stderr"], late
        assert dom.vmm.client.domain_status(dom.keyid)["state"] == "LAUNCHED"
        assert session.ping()["pong"]
    finally:
        client.close()
        dom.vmm.responder = HypercallResponder(dom.vmm.responder_client_factory, dom.keyid)
        dom.vmm.responder.start()


def value_block_offset() -> int:
    """The offset of a 16-byte cipher block that lies wholly inside one XMM register's value
    in the save area: changing it keeps the record's structure, so only the MAC can tell."""
    offset = 32
    for reg in FULL_STATE:
        start = offset + 4
        if reg.size == 16 and start % 16 == 0:
            return start
        offset = start + reg.size
    raise AssertionError("no aligned XMM value in the save area")


@pytest.mark.qemu
def test_a_tampered_or_replayed_save_area_is_refused_and_the_domain_destroyed(dom):
    """Last in this module: the domain is destroyed."""
    rt = runtime_of(dom)
    hpa = rt._save_hpa
    memory = dom.platform.memory           # the host cannot write this page: the platform's own API
    dom.vmm.client.exit(dom.keyid)
    older = memory.read_pages([hpa]).copy()
    dom.vmm.client.resume(dom.keyid)
    dom.vmm.client.exit(dom.keyid)
    current = memory.read_pages([hpa]).copy()
    memory.write_pages([hpa], older)       # an older exit's save area, valid in itself
    with pytest.raises(HostPortVerifyError, match="belongs to exit .*replayed"):
        dom.vmm.client.resume(dom.keyid)
    memory.write_pages([hpa], current)
    dom.vmm.client.resume(dom.keyid)
    assert dom.agent("ping")["pong"]

    dom.vmm.client.exit(dom.keyid)
    page = memory.read_pages([hpa]).copy()
    page[0, value_block_offset() + 3] ^= 0x40     # one bit of the ciphertext of one XMM value
    memory.write_pages([hpa], page)
    with pytest.raises(HostPortVerifyError, match="save area of key domain .* does not verify"):
        dom.vmm.client.resume(dom.keyid)
    assert dom.vmm.client.domain_status(dom.keyid)["state"] == "EXITED"
    before = dom.vmm.client.platform_info().free_keyids
    dom.vmm.destroy()
    with HostPortClient(str(dom.platform_socket), timeout=30) as c:
        assert dom.keyid in c.platform_info().free_keyids and dom.keyid not in before
        assert c.list_domains() == []
