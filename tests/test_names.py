"""Domain names: host-chosen labels given at launch, unique across the machine's platforms,
and the name lookups of the DOMAIN commands.  No QEMU here (runtimes are faked); the
end-to-end test with two kept domains is in test_names_qemu.py."""

from __future__ import annotations

import json
import subprocess
import sys
from contextlib import ExitStack

import pytest

from qemu_kd.cli import domains as domains_cli
from qemu_kd.cli.domains import DomainRef, Survey, resolve
from qemu_kd.hostport.client import HostPortClient
from qemu_kd.hostport.names import DomainNameError, NameClaims, check_name, sweep_stale_claims
from qemu_kd.hostport.protocol import HostPortBadRequestError, HostPortNameTakenError
from qemu_kd.platform.hardware import Platform

from serving import serving
from test_domain import MEMORY, guest_page_count, seal_guest
from test_hostport import FakeRuntime, host_loads


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_valid_and_invalid_names():
    for good in ("web", "kd1", "a", "db-1.test_2", "x" * 32, "1web"):
        assert check_name(good) == good
    for bad in ("", "x" * 33, "-web", ".hidden", "a b", "a:b", "a/b", "a,b", "42", "wéb"):
        with pytest.raises(DomainNameError, match="is not a valid domain name"):
            check_name(bad)


def test_free_default_is_the_name_claim_default_would_take_without_taking_it(tmp_path):
    a = NameClaims(tmp_path, owner="platform-a")
    assert a.claim_default(1) == "kd1"
    assert a.free_default(1) == "kd2" and a.holder("kd2") is None
    assert a.claim_default(1) == "kd2"
    assert a.free_default(1, limit=2) is None


def test_claims_are_unique_across_owners_and_default_to_the_next_free_kdn(tmp_path):
    a = NameClaims(tmp_path, owner="platform-a")
    b = NameClaims(tmp_path, owner="platform-b")
    assert a.claim("web", 1) == "web"
    with pytest.raises(HostPortNameTakenError) as err:
        b.claim("web", 1)
    assert "'web' is already used by a live domain (KeyID 1)" in str(err.value)
    assert a.claim_default(1) == "kd1"
    assert b.claim_default(1) == "kd2"           # kd1 is platform a's
    assert a.claim_default(2) == "kd3"
    b.release("web")                             # not b's: stays claimed
    with pytest.raises(HostPortNameTakenError):
        b.claim("web", 2)
    a.release("web")
    assert b.claim("web", 2) == "web"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kd1.name", "kd2.name", "kd3.name",
                                                         "web.name"]


def test_a_dead_platforms_claims_are_stale(tmp_path):
    gone = NameClaims(tmp_path, owner="gone", pid=dead_pid())
    gone.claim("web", 1)
    gone.claim("kd1", 1)
    assert NameClaims(tmp_path, owner="live").claim("web", 3) == "web"
    assert [p.name for p in sweep_stale_claims(tmp_path)] == ["kd1.name"]
    assert [p.name for p in tmp_path.iterdir()] == ["web.name"]


def launched(client: HostPortClient, identity, name: str | None = None) -> tuple[int, dict]:
    alloc = client.alloc(npages=guest_page_count())
    guest = seal_guest(alloc.keyid, alloc.hpas, identity.kak_public)
    host_loads(client, guest)
    assert client.verify_ept(guest.keyid, alloc.hpas).ok
    return guest.keyid, client.launch(guest.keyid, name)


def test_launch_names_are_unique_across_platforms(identity, tmp_path):
    names = tmp_path / "names"
    with ExitStack() as stack:
        clients = []
        for which in ("a", "b"):
            platform = stack.enter_context(Platform(identity, MEMORY, tmp_path / which,
                                                    runtime_factory=FakeRuntime, names_dir=names))
            path, _server = stack.enter_context(serving(platform))
            clients.append(stack.enter_context(HostPortClient(path, timeout=10)))
        a, b = clients
        kd, _ = launched(a, identity)
        assert a.domain_status(kd)["name"] == "kd1"
        ka, _ = launched(a, identity, "web")
        assert FakeRuntime.made[-1].name == "web"            # QEMU's -name and the log's name
        status = a.domain_status(ka)
        assert (status["name"], status["vcpus"]) == ("web", 1)
        assert isinstance(status["uptime"], float) and status["uptime"] >= 0

        alloc = b.alloc(npages=guest_page_count())
        guest = seal_guest(alloc.keyid, alloc.hpas, identity.kak_public)
        host_loads(b, guest)
        assert b.verify_ept(guest.keyid, alloc.hpas).ok
        with pytest.raises(HostPortNameTakenError, match="'web' is already used by a live domain"):
            b.launch(guest.keyid, "web")
        with pytest.raises(HostPortBadRequestError, match="is not a valid domain name"):
            b.launch(guest.keyid, "no/such")
        assert b.domain_status(guest.keyid)["state"] == "VERIFIED"    # a refused launch: unchanged
        b.launch(guest.keyid)
        # Platform b's KeyID 1 would be kd1, which platform a's domain has: the next free kdN.
        assert guest.keyid == 1 and b.domain_status(guest.keyid)["name"] == "kd2"

        a.destroy_kd(ka)                                    # frees the name
        assert not (names / "web.name").exists()
        k2, _ = launched(b, identity, "web")
        assert b.domain_status(k2)["name"] == "web"
    assert list(names.iterdir()) == []                       # closing a platform frees its names


def ref(pid: int, keyid: int, name: str | None = None, **status) -> DomainRef:
    return DomainRef({"pid": pid, "socket": f"/run/p{pid}/platform.sock"},
                     {"keyid": keyid, "name": name or f"kd{keyid}", "state": "LAUNCHED",
                      "running": True, "policy": {"debug": False}, **status})


def test_lookup_by_name_keyid_and_platform(monkeypatch):
    monkeypatch.setattr(domains_cli, "_platforms", lambda: [{"pid": 100}, {"pid": 200}])
    found = Survey([ref(100, 1, "web"), ref(200, 1, "kd2"), ref(200, 2, "kd1")], [])
    assert resolve("web", found).platform_pid == 100
    assert resolve("100:web", found).keyid == 1
    assert resolve("kd2", found).platform_pid == 200 and resolve("kd2", found).keyid == 1
    assert resolve("kd1", found).keyid == 2          # a name match wins over the KeyID
    assert resolve("100:kd1", found).name == "web"   # PID:kdN still picks KeyID N
    with pytest.raises(domains_cli.DomainLookupError, match="no key domain db"):
        resolve("db", found)
    with pytest.raises(domains_cli.DomainLookupError, match="no key domain web on platform 200"):
        resolve("200:web", found)


def test_ls_json_has_dominfo_fields():
    dom = ref(100, 3, "web", guest_state="halted", memory=256 << 20, vcpus=1, uptime=12.5)
    info = dom.as_json()
    assert {k: info[k] for k in ("name", "state", "guest_state", "memory", "memory_mib", "vcpus",
                                 "uptime")} == {
        "name": "web", "state": "LAUNCHED", "guest_state": "halted", "memory": 256 << 20,
        "memory_mib": 256, "vcpus": 1, "uptime": 12.5}
    json.dumps(info)
    old = ref(100, 4).as_json()                      # an older platform: no such fields
    assert (old["memory"], old["memory_mib"], old["uptime"]) == (None, None, None)
