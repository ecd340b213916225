"""Guest-verified control updates on an in-process platform (no QEMU).

The runtime is the real DomainRuntime with guest RAM in a byte array instead
of QEMU, so sealing, staging, the host's checks and installing (scrub, zeroed
accept, re-encryption, the shadow) run as they do for a real guest.  The
guest's requests go to the platform's seal directly, as the agent's guest-port
calls would; tests/test_controls_guest.py drives real guests.
"""

import base64
import dataclasses
import os
import time
from types import SimpleNamespace

import numpy as np
import pytest

from guest_agent.controls import Controls, load_policy, DEFAULT_POLICY
from qemu_kd.formats.controlpolicy import DEFAULT, ControlPolicy
from qemu_kd.formats.ctlupdate import ControlUpdate, Op, PageOp
from qemu_kd.formats.errors import FormatError
from qemu_kd.formats.vmcs import Vmcs
from qemu_kd.hostport.client import HostPortClient
from qemu_kd.hostport.protocol import (HostPortRefusedError, HostPortStateError, HostPortVerifyError)
from qemu_kd.platform.controls import UpdateRefused
from qemu_kd.platform.hardware import Platform
from qemu_kd.platform.physmem import PageState
from qemu_kd.platform.runtime import UNMAPPED, DomainRuntime, Endpoints

from test_domain import guest_page_count, seal_guest
from test_hostport import host_loads
from serving import serving

PAGE = 4096
N_IMAGE, N_ZERO = 3, 13
VMCS_RIP, VMCS_MASK, VMCS_INTERVAL = 0x681E, 0x2202, 0x4202


class RamMachine:
    """What the runtime needs of QEMU for control updates: guest RAM, and being up."""

    running = True

    def __init__(self, size: int):
        self.ram = bytearray(size)

    def map_ram(self):
        return self.ram


class RamRuntime(DomainRuntime):
    """DomainRuntime with guest RAM in memory: launch fills it from DRAM through the EPT."""

    def launch(self):
        gpas, hpas = self.domain.guest_mapping()
        self.mem_size = 2 << 20
        self.machine = RamMachine(self.mem_size)
        ram = np.frombuffer(self.machine.ram, dtype=np.uint8).reshape(-1, PAGE)
        idx = (gpas // PAGE).astype(np.int64)
        ram[idx] = np.frombuffer(self.domain.decrypt_pages(hpas), dtype=np.uint8).reshape(-1, PAGE)
        self._snapshot = ram.copy()
        self.gpa_to_hpa = np.full(self.mem_size // PAGE, UNMAPPED, dtype=np.uint64)
        self.gpa_to_hpa[idx] = hpas
        self.calls = []
        self.domain.shadow_sync = self.sync_shadow
        self.domain.on_destroy = self.stop
        return self.endpoints()

    def endpoints(self):
        return Endpoints("s", "c", "cl", "q", "g", "a")

    def start_proxies(self, *args, **kwargs):
        pass

    def ram(self):
        return np.frombuffer(self.machine.ram, dtype=np.uint8).reshape(-1, PAGE)

    def run(self):
        self.calls.append("run")

    def exit(self, reason="host", **kwargs):
        self.calls.append(("exit", reason))
        return SimpleNamespace(seq=len(self.calls))

    def resume(self, seq=None):
        self.calls.append(("resume", seq))

    def stop(self):
        self.calls.append("stop")


@pytest.fixture
def served(identity, tmp_path):
    platform = Platform(identity, 16 << 20, tmp_path / "platform", qemu_accel="tcg", runtime_factory=RamRuntime)
    with serving(platform) as (path, _server), HostPortClient(path, timeout=10) as client:
        yield platform, client


def launched(platform, client, identity):
    alloc = client.alloc(npages=guest_page_count(N_IMAGE, N_ZERO))
    guest = seal_guest(alloc.keyid, alloc.hpas, identity.kak_public, n_image=N_IMAGE, n_zero=N_ZERO)
    host_loads(client, guest)
    assert client.verify_ept(guest.keyid, alloc.hpas).ok
    client.launch(guest.keyid)
    client.run(guest.keyid)
    return guest, platform.runtimes[guest.keyid]


@pytest.fixture
def domain(served, identity):
    platform, client = served
    guest, runtime = launched(platform, client, identity)
    return SimpleNamespace(platform=platform, client=client, guest=guest, runtime=runtime, keyid=guest.keyid,
                           plane=platform.controls)


def seal(d, ops=(), vmcs=None, version=None):
    """What the guest agent asks of the platform once it has agreed (guest port controls-seal)."""
    info = d.plane.guest_info(d.keyid)
    version = info["installed_version"] + 1 if version is None else version
    runs = [[o[0], o[1], 1, *o[2:]] for o in ops]
    answer = d.plane.seal(d.keyid, {"version": version, "ops": runs, "vmcs": vmcs or {}})
    return base64.b64decode(answer["update"])


def stage_and_install(d, blob):
    staged = d.client.controls_stage(d.keyid, blob)
    return staged, d.client.controls_install(d.keyid, staged["version"])


# ------------------------------------------------------------------ formats


def test_update_format_round_trips_and_parses_strictly():
    upd = ControlUpdate(3, 7, 6, [PageOp(Op.UNMAP, 0x5000, 0x9000)], tag=bytes(48))
    assert ControlUpdate.unpack(upd.pack()) == upd
    packed = bytearray(upd.pack())
    for offset, what in ((0, "magic"), (6, "reserved"), (0x28 + 2, "reserved"), (0x28, "unknown operation")):
        bad = bytearray(packed)
        bad[offset] ^= 0x7F
        with pytest.raises(FormatError, match=what):
            ControlUpdate.unpack(bytes(bad))
    with pytest.raises(FormatError, match="announces"):
        ControlUpdate.unpack(bytes(packed) + b"\0")


def test_the_image_policy_file_and_the_agents_reader_agree(tmp_path):
    from qemu_kd.guest.recipe import ETC_FILES
    from qemu_kd.formats.controlpolicy import POLICY_PATH

    text = ETC_FILES[POLICY_PATH]
    assert ControlPolicy.unpack(text.encode()) == DEFAULT
    path = tmp_path / "policy.json"
    path.write_text(text)
    assert load_policy(str(path)) == DEFAULT_POLICY == dataclasses.asdict(DEFAULT)
    assert load_policy(str(tmp_path / "missing.json")) == DEFAULT_POLICY      # safe defaults
    path.write_text('{"version": 1, "memory_floor_mib": -1}')
    with pytest.raises(ValueError):
        load_policy(str(path))
    with pytest.raises(FormatError):
        ControlPolicy.unpack(b'{"version": 1, "memory_floor_mib": -1}')


# ------------------------------------------------------------ the changes


def test_balloon_out_frees_the_pages_and_scrubs_them(domain):
    d = domain
    gpas = [0x3000, 0x4000]
    hpas = [d.guest.hpa_of[g] for g in gpas]
    free_before = d.client.platform_info().free_pages
    staged = d.client.controls_stage(d.keyid, seal(d, [("unmap", g) for g in gpas]))
    assert staged["ops"] == {"unmap": 2} and staged["version"] == 1
    verdict = d.client.staged_verify_ept(d.keyid)
    assert verdict["verdict_ok"], verdict["reasons"]
    assert verdict["changes"] == [{"gpa": g, "old_hpa": h} for g, h in zip(gpas, hpas)]
    assert verdict["ops"] == [{"op": "unmap", "gpa": 0x3000, "count": 2, "old_hpa": hpas[0]}]   # one run
    assert d.client.staged_hash_kd(d.keyid).hex() == staged["digest"]
    installed = d.client.controls_install(d.keyid, 1)
    assert installed["unmapped"] == 2
    assert d.client.hash_kd(d.keyid).hex() == staged["digest"]
    assert d.client.platform_info().free_pages == free_before + 2
    assert all(d.platform.memory.owner(h).state == PageState.FREE for h in hpas)
    assert d.client.read_phys_pages(hpas) == bytes(2 * PAGE)
    assert not d.runtime.ram()[[3, 4]].any()
    status = d.client.controls_status(d.keyid)
    assert (status["installed_version"], status["mapped_pages"]) == (1, N_IMAGE + N_ZERO - 2)
    # The guest writing an unmapped gpa (only a bug could) never reaches the freed page.
    d.runtime.ram()[3][:8] = 0xEE
    assert d.client.read_phys_pages([d.guest.hpa_of[0], *hpas])[PAGE:] == bytes(2 * PAGE)   # syncs kd


def test_balloon_in_maps_the_hosts_pages_as_zeros(domain):
    d = domain
    stage_and_install(d, seal(d, [("unmap", 0x4000)]))
    d.runtime.ram()[4][:4] = 0x11                        # stale bytes must not survive the accept
    new = d.client.alloc(npages=1, keyid=d.keyid).hpas[0]
    assert d.platform.memory.owner(new).state == PageState.HOST
    staged, installed = stage_and_install(d, seal(d, [("accept", 0x4000, new)]))
    assert installed["accepted"] == 1 and staged["ops"] == {"accept": 1}
    assert d.platform.memory.owner(new).state == PageState.PRIVATE
    assert d.platform.domain(d.keyid).decrypt_pages(np.array([new], dtype=np.uint64)) == bytes(PAGE)
    assert not d.runtime.ram()[4].any()
    assert int(d.runtime.gpa_to_hpa[4]) == new
    assert d.client.controls_status(d.keyid)["mapped_pages"] == N_IMAGE + N_ZERO


def test_relocation_keeps_the_contents_under_the_new_address(domain):
    d = domain
    gpa = 0x1000
    old = d.guest.hpa_of[gpa]
    new = d.client.alloc(npages=1, keyid=d.keyid).hpas[0]
    before = d.runtime.ram()[1].tobytes()
    assert before == d.guest.image[gpa]
    old_ciphertext = d.client.read_phys_pages([old])
    _staged, installed = stage_and_install(d, seal(d, [("move", gpa, new)]))
    assert installed["moved"] == 1
    assert d.platform.memory.owner(old).state == PageState.FREE
    assert d.client.read_phys_pages([old]) == bytes(PAGE)
    moved = d.client.read_phys_pages([new])
    assert moved != old_ciphertext and moved != before               # re-encrypted for the new hpa
    assert d.platform.domain(d.keyid).decrypt_pages(np.array([new], dtype=np.uint64)) == before
    assert d.runtime.ram()[1].tobytes() == before
    gpas, hpas = d.platform.domain(d.keyid).guest_mapping()
    assert dict(zip(gpas.tolist(), hpas.tolist()))[gpa] == new


def test_exit_interval_runs_and_stops(domain):
    d = domain
    staged = d.client.controls_stage(d.keyid, seal(d, vmcs={hex(VMCS_INTERVAL): 5}))
    assert d.client.staged_vmread(d.keyid, VMCS_INTERVAL) == 5
    assert d.client.vmread(d.keyid, VMCS_INTERVAL) == 0              # not before install
    assert staged["vmcs_pages"] == 1 and staged["ept_pages"] == 0
    d.client.controls_install(d.keyid, staged["version"])
    assert d.client.vmread(d.keyid, VMCS_INTERVAL) == 5
    deadline = time.monotonic() + 60
    while d.client.controls_status(d.keyid)["interval_exits"] < 3:
        assert time.monotonic() < deadline, "no periodic exits"
        time.sleep(0.01)
    exits = [c for c in d.runtime.calls if c[0] == "exit"]
    assert len(exits) >= 3 and all(reason == "interval" for _, reason in exits)
    stage_and_install(d, seal(d, vmcs={hex(VMCS_INTERVAL): 0}))
    time.sleep(0.1)
    count = d.client.controls_status(d.keyid)["interval_exits"]
    time.sleep(0.1)
    assert d.client.controls_status(d.keyid)["interval_exits"] == count


# --------------------------------------------------------------- refusals


def test_the_platform_refuses_guest_state_and_a_wider_mask(domain):
    d = domain
    with pytest.raises(UpdateRefused, match="guest state"):
        seal(d, vmcs={hex(VMCS_RIP): 0x1234})
    with pytest.raises(UpdateRefused, match="widens"):
        seal(d, vmcs={hex(VMCS_MASK): 0x1})
    with pytest.raises(UpdateRefused, match="cannot change while the guest runs"):
        seal(d, vmcs={hex(0x201A): 0})


def test_forged_ept_ciphertext_is_refused(domain):
    d = domain
    update = ControlUpdate.unpack(seal(d, [("unmap", 0x4000)]))
    page = update.pages[0]
    update.pages[0] = dataclasses.replace(page, ciphertext=bytes([page.ciphertext[0] ^ 1]) + page.ciphertext[1:])
    with pytest.raises(HostPortVerifyError, match="tag does not match"):
        d.client.controls_stage(d.keyid, update.pack())
    # A host that makes up a whole update has no MAC key either.
    forged = ControlUpdate(d.keyid, 9, 0, [PageOp(Op.UNMAP, 0x4000, d.guest.hpa_of[0x4000])],
                           [page], os.urandom(48))
    with pytest.raises(HostPortVerifyError, match="tag does not match"):
        d.client.controls_stage(d.keyid, forged.pack())
    assert d.client.controls_status(d.keyid)["installed_version"] == 0
    assert d.platform.memory.owner(d.guest.hpa_of[0x4000]).state == PageState.PRIVATE


def test_forged_vmcs_is_refused_even_with_a_valid_tag(domain):
    """The structure checks stand on their own: a VMCS that changes RIP never installs."""
    d = domain
    dom = d.platform.domain(d.keyid)
    vmcs = dataclasses.replace(dom.read_vmcs(), guest=dataclasses.replace(dom.read_vmcs().guest, rip=0x4444))
    plane = d.plane
    state = plane._live(d.keyid, "test")[2]      # the MAC key only the platform holds
    update = ControlUpdate(d.keyid, 1, 0, [], [plane._encrypt(dom, dom.vmcs_hpa, 3, vmcs.pack())])
    update.tag = plane._tag(state, update.body())
    with pytest.raises(HostPortVerifyError, match="changes guest state"):
        d.client.controls_stage(d.keyid, update.pack())
    garbage = ControlUpdate(d.keyid, 1, 0, [], [plane._encrypt(dom, dom.vmcs_hpa, 3, bytes(PAGE))])
    garbage.tag = plane._tag(state, garbage.body())
    with pytest.raises(HostPortVerifyError, match="valid VMCS"):
        d.client.controls_stage(d.keyid, garbage.pack())
    assert Vmcs.unpack(dom.decrypt_pages(np.array([dom.vmcs_hpa], dtype=np.uint64))).guest.rip != 0x4444


def test_replayed_and_stale_updates_are_refused(domain):
    d = domain
    first = seal(d, [("unmap", 0x4000)])
    late = seal(d, [("unmap", 0x3000)], version=5)       # built on version 0 too
    stage_and_install(d, first)
    with pytest.raises(HostPortRefusedError, match="not newer than the installed version 1 \\(replayed\\)"):
        d.client.controls_stage(d.keyid, first)
    with pytest.raises(HostPortRefusedError, match="built on version 0, the installed version is 1"):
        d.client.controls_stage(d.keyid, late)
    with pytest.raises(HostPortStateError, match="no staged control update"):
        d.client.controls_install(d.keyid, 1)
    assert d.platform.memory.owner(d.guest.hpa_of[0x3000]).state == PageState.PRIVATE


def test_a_reply_modified_in_flight_is_refused(domain):
    d = domain
    blob = bytearray(seal(d, [("unmap", 0x4000)]))
    for offset in (0x10, 0x28 + 9):             # the version, the operation's gpa (0x4000 -> 0x5000)
        bad = bytearray(blob)
        bad[offset] ^= 0x10
        with pytest.raises(HostPortVerifyError, match="tag does not match"):
            d.client.controls_stage(d.keyid, bytes(bad))
    with pytest.raises(HostPortVerifyError, match="malformed"):
        d.client.controls_stage(d.keyid, bytes(blob[:-1]))
    stage_and_install(d, bytes(blob))           # the untouched update still installs


def test_another_domains_pages_or_keyid_are_refused(served, identity):
    platform, client = served
    a, _ = launched(platform, client, identity)
    b, _ = launched(platform, client, identity)
    da = SimpleNamespace(platform=platform, client=client, keyid=a.keyid, plane=platform.controls)
    db = SimpleNamespace(platform=platform, client=client, keyid=b.keyid, plane=platform.controls)
    with pytest.raises(UpdateRefused, match=f"not a page the host allocated to KeyID {a.keyid}"):
        seal(da, [("move", 0x1000, b.hpa_of[0x1000])])
    with pytest.raises(UpdateRefused, match=f"not a page the host allocated to KeyID {a.keyid}"):
        seal(da, [("move", 0x1000, client.alloc(npages=1, keyid=b.keyid).hpas[0])])
    with pytest.raises(HostPortRefusedError, match=f"sealed for KeyID {b.keyid}, not {a.keyid}"):
        client.controls_stage(a.keyid, seal(db, [("unmap", 0x4000)]))
    # Ownership changed between seal and install: the install checks again.
    spare = client.alloc(npages=1, keyid=a.keyid).hpas[0]
    blob = seal(da, [("move", 0x1000, spare)])
    client.controls_release(a.keyid, [spare])
    client.alloc(hpas=[spare], keyid=b.keyid)
    with pytest.raises(HostPortRefusedError, match=f"KeyID {b.keyid}"):
        client.controls_stage(a.keyid, blob)


# ------------------------------------------------------------ the guest side


class GuestSide:
    """guest_agent.controls.Controls with its platform calls answered by the plane."""

    def __init__(self, d, policy_path="/nonexistent"):
        def call(cmd, _wait=None, **args):
            try:
                if cmd == "controls-info":
                    return d.plane.guest_info(d.keyid)
                return d.plane.seal(d.keyid, args)
            except Exception as exc:
                raise RuntimeError(f"platform refused {cmd}: {cmd}: {exc}") from None
        self.controls = Controls(call, policy_path)
        self.keyid = d.keyid

    def ask(self, op, **args):
        return self.controls.handle({"op": op, "keyid": self.keyid, **args})


def test_the_guest_refuses_against_its_policy(domain):
    guest = GuestSide(domain)
    assert guest.ask("balloon-out", pages=4)["reason"].startswith(
        "giving up 4 pages would leave 0 MiB, below the guest's memory floor of 128 MiB")
    # The guest's own reasons (the platform would refuse these too, in its words).
    assert "guest state: the guest never lets the host change it" in \
        guest.ask("vmwrite", field=VMCS_RIP, value=1)["reason"]
    assert "would widen" in guest.ask("vmwrite", field=VMCS_MASK, value=0xFFFF)["reason"]
    assert "floor of every 20 ms" in guest.ask("exit-interval", ms=5)["reason"]
    assert "not one the guest lets the host change" in guest.ask("vmwrite", field=0x201A, value=0)["reason"]
    other = guest.controls.handle({"op": "exit-interval", "keyid": domain.keyid + 1, "ms": 50})
    assert other["verdict"] == "refused" and "names KeyID" in other["reason"]
    accepted = guest.ask("exit-interval", ms=50)
    assert accepted["verdict"] == "accepted" and accepted["version"] == 1
    # The platform's own refusals reach the host as the guest's reason.
    refused = guest.ask("relocate", moves=[[0x1000, domain.guest.hpa_of[0x2000]]])
    assert refused["verdict"] == "refused" and "not a page the host allocated" in refused["reason"]
    assert domain.client.controls_status(domain.keyid)["installed_version"] == 0


def test_a_broken_policy_file_refuses_everything(domain, tmp_path):
    path = tmp_path / "policy.json"
    path.write_text("{not json")
    guest = GuestSide(domain, str(path))
    assert "control policy is unusable" in guest.ask("exit-interval", ms=50)["reason"]


def test_a_shared_page_is_plaintext_both_ways_until_unshared(domain):
    d = domain
    gpa, hpa = 0x3000, d.guest.hpa_of[0x3000]
    d.runtime.ram()[3][:5] = np.frombuffer(b"hello", dtype=np.uint8)
    assert d.client.read_phys_pages([hpa])[:5] != b"hello"
    staged, installed = stage_and_install(d, seal(d, [("share", gpa)]))
    assert staged["ops"] == {"share": 1} and staged["ept_pages"] == 0 and installed["shared"] == 1
    assert d.platform.memory.owner(hpa).state == PageState.SHARED
    assert d.client.read_phys_pages([hpa])[:5] == b"hello"                 # the guest's bytes, plain
    d.runtime.ram()[3][5:11] = np.frombuffer(b" world", dtype=np.uint8)     # the guest writes
    assert d.client.read_phys_pages([hpa])[:11] == b"hello world"
    d.client.write_phys_pages([hpa], b"from the host".ljust(PAGE, b"\0"))  # the host writes
    assert d.runtime.ram()[3][:13].tobytes() == b"from the host"
    with pytest.raises(UpdateRefused, match="is shared"):
        seal(d, [("unmap", gpa)])
    _staged, installed = stage_and_install(d, seal(d, [("unshare", gpa)]))
    assert installed["unshared"] == 1
    assert d.platform.memory.owner(hpa).state == PageState.PRIVATE
    assert not d.runtime.ram()[3].any()                                     # dropped, accepted as zeros
    assert d.client.read_phys_pages([hpa])[:13] != b"from the host"
    assert d.platform.domain(d.keyid).decrypt_pages(np.array([hpa], dtype=np.uint64)) == bytes(PAGE)
