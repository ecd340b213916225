"""Encrypted snapshots and restore (docs/snapshots.md): the file holds no plaintext, tampered,
foreign and old snapshots are refused with their reason and leave nothing behind, and a restored
domain runs commands, attests, keeps time and is served by a host VMM as a launched one (its
hypercalls answered)."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from qemu_kd.api import Platform
from qemu_kd.common.errors import KdError
from qemu_kd.formats.errors import FormatError, MagicError
from qemu_kd.formats.policy import Policy
from qemu_kd.formats.snapshot import (
    HEADER_SIZE,
    SECTION_KINDS,
    SECTION_MEMORY,
    Snapshot,
    SnapshotHeader,
)
from qemu_kd.hostport.client import HostPortClient
from qemu_kd.platform.snapshot import VersionStore

QEMU_KD = [sys.executable, "-m", "qemu_kd.cli.main"]
CANARY = "kd-snapshot-canary-" + "5e1f0c8a93d27b64" * 2


# -- without QEMU ------------------------------------------------------------------------------

def _header(**changes) -> SnapshotHeader:
    fields = dict(platform_id=b"P" * 16, domain_id=b"D" * 16, version=3, keyid=7, measurement=b"M" * 48,
                  policy=Policy.make(restorable=True), host_data=b"H" * 32)
    fields.update(changes)
    return SnapshotHeader(**fields)


def test_snapshot_format_round_trips_and_refuses_damage():
    snap = Snapshot(_header(), {sid: bytes([sid]) * (sid * 10) for sid in SECTION_KINDS})
    body = snap.pack_body()
    again = Snapshot.unpack_body(body)
    assert again.header == snap.header and again.sections == snap.sections
    assert body[:4] == b"KDSN" and SnapshotHeader.unpack(body[:HEADER_SIZE])[0].policy.restorable
    with pytest.raises(FormatError, match="truncated"):
        Snapshot.unpack_body(body[:-1])
    with pytest.raises(FormatError, match="follow the last"):
        Snapshot.unpack_body(body + b"\0")
    with pytest.raises(MagicError):
        Snapshot.unpack_body(b"XXXX" + body[4:])
    with pytest.raises(FormatError, match="lacks its memory"):
        Snapshot(_header(), {sid: b"" for sid in SECTION_KINDS if sid != SECTION_MEMORY}).pack_body()


def test_a_snapshot_of_the_older_format_is_refused_with_a_one_line_reason():
    """Version 1 stored every guest page (no zero flags): its page list means something else,
    so the platform refuses it instead of guessing."""
    import struct

    from qemu_kd.formats.errors import VersionError

    body = bytearray(Snapshot(_header(), {sid: b"x" for sid in SECTION_KINDS}).pack_body())
    assert struct.unpack_from("<H", body, 4) == (2,)
    struct.pack_into("<H", body, 4, 1)
    with pytest.raises(VersionError) as caught:
        Snapshot.unpack_body(bytes(body))
    assert caught.value.message == ("snapshot format version 1 is not supported (an older format: it "
                                    "stored every guest page); this platform reads version 2")
    assert caught.value.hint == "take a new snapshot of the domain"


def test_version_store_only_moves_forward(tmp_path):
    store = VersionStore(tmp_path)
    assert store.latest(b"d" * 16) == 0
    store.advance(b"d" * 16, 2)
    store.advance(b"d" * 16, 1)
    assert store.latest(b"d" * 16) == 2 and store.latest(b"e" * 16) == 0
    assert oct((tmp_path / "snapshots" / (b"d" * 16).hex()).stat().st_mode & 0o777) == "0o600"


def test_a_domain_with_installed_control_updates_is_not_snapshotted(tmp_path):
    import threading
    from types import SimpleNamespace

    from qemu_kd.platform.snapshot import SnapshotError, SnapshotService

    exited = []
    runtime = SimpleNamespace(exit=lambda **kw: exited.append(kw))
    platform = SimpleNamespace(
        lock=threading.RLock(), _runtime=lambda keyid, cmd, states: (object(), runtime),
        controls=SimpleNamespace(status=lambda keyid: {"installed_version": 2, "shared_pages": 0}))
    with pytest.raises(SnapshotError, match=r"installed control updates \(version 2\)"):
        SnapshotService(platform, tmp_path).take(1, tmp_path / "x.kdsnap")
    assert exited == [] and not (tmp_path / "x.kdsnap").exists()


# -- with QEMU ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def plat():
    with Platform(memory="3G") as platform:
        yield platform


@pytest.fixture(scope="module")
def guarded(plat):
    """A domain without RESTORABLE, with the canary in its memory."""
    dom = plat.launch(memory="256M")
    result = dom.exec(["sh", "-c", f"echo {CANARY} > /tmp/canary && cat /tmp/canary"])
    assert result.stdout_text.strip() == CANARY
    return dom


#: rax and rbx: what HOST_TIME answers in, and a register ECHO hands back.
EXPOSED_RAX_RBX = 1 << 0 | 1 << 3


@pytest.fixture(scope="module")
def restorable(plat):
    return plat.launch(memory="256M", restorable=True, exposed_register_mask=EXPOSED_RAX_RBX)


def _usage(plat) -> tuple:
    """What a refused restore must leave as it was: domains, free pages and KeyIDs."""
    with HostPortClient(plat.socket) as client:
        info = client.platform_info()
        names = sorted(d["name"] for d in client.list_domains())
    return names, info.free_pages, tuple(info.free_keyids)


def _refused(plat, path, of, match):
    """The restore is refused with the platform's reason, in one line, and leaves nothing behind."""
    before = _usage(plat)
    with pytest.raises(KdError, match=match) as caught:
        plat.restore(path, of=of)
    assert "\n" not in caught.value.message and caught.value.message.startswith("snapshot")
    assert _usage(plat) == before
    return caught.value


def _uptime(dom) -> float:
    return float(dom.exec("cut -d' ' -f1 /proc/uptime").stdout_text.strip())


def _clock(dom) -> int:
    return int(dom.exec("date +%s").stdout_text.strip())


@pytest.mark.qemu
def test_the_snapshot_file_holds_no_plaintext_of_guest_memory(guarded, tmp_path):
    path = tmp_path / "guarded.kdsnap"
    taken = guarded.snapshot(path)
    data = path.read_bytes()
    # sparse: the pages the guest never wrote (all zeros) are flagged in the sealed page list,
    # not stored, so a snapshot of a freshly booted 256 MiB guest is far smaller than its memory
    assert taken["size"] == len(data) < (256 << 20) * 3 // 4
    canary = CANARY.encode()
    forms = [canary, canary.decode().encode("utf-16-le"), canary.decode().encode("utf-16-be"),
             canary.hex().encode()]
    # base64 of the canary at each of the three alignments it can have in a longer text
    forms += [base64.b64encode(b"x" * shift + canary)[4 if shift else 0:][:32] for shift in range(3)]
    assert [form for form in forms if form in data] == []
    # and the domain key never appears in the clear either
    assert guarded.secret.key not in data


@pytest.mark.qemu
def test_a_restored_domain_runs_commands_attests_and_keeps_time(plat, guarded, tmp_path):
    path = tmp_path / "guarded.kdsnap"
    uptime_before, clock_before = _uptime(guarded), _clock(guarded)
    guarded.snapshot(path)
    restored = plat.restore(path, of=guarded, name="restored-guarded")
    try:
        assert restored.name == "restored-guarded" and restored.keyid != guarded.keyid
        result = restored.exec("cat /tmp/canary; echo $((6 * 7))")
        assert result.ok and result.stdout_text.split() == [CANARY, "42"]
        # files move through the shared window on a restored domain too
        data = os.urandom(3 << 20)
        restored.put_file("/tmp/big", data)
        assert restored.get_file("/tmp/big") == data
        with HostPortClient(plat.socket) as client:
            assert client.controls_status(restored.keyid)["shared_pages"] == 512
        # the restored guest resumes where it was, and its clocks move on from there
        first = _uptime(restored)
        assert first >= uptime_before and _clock(restored) >= clock_before
        time.sleep(1.5)
        assert _uptime(restored) > first
        # the tenant attests it over a fresh nonce: the original measurement and policy
        attested = restored.attest(os.urandom(32))
        assert attested.verified.measurement == guarded.measurement
        # the original runs on, and the two are separate guests from here on
        restored.exec("echo restored > /tmp/which")
        assert guarded.exec("cat /tmp/which 2>/dev/null || echo original").stdout_text.strip() == "original"
    finally:
        restored.destroy()
    # without RESTORABLE, a snapshot restores once
    _refused(plat, path, guarded, "older than the domain's latest")


def _hypercall(dom, *argv: str) -> dict:
    result = dom.exec(["kd-hypercall", *argv, "--timeout", "60", "--json"])
    assert result.ok, result.stderr_text
    return json.loads(result.stdout)


def _number(value) -> int:
    return int(value, 0) if isinstance(value, str) else int(value)


@pytest.mark.qemu
def test_a_restored_domain_gets_its_hypercalls_answered_by_its_host_vmm(plat, restorable, tmp_path):
    """A restored domain is served by a host VMM as a launched one: its responder answers."""
    path = tmp_path / "hypercalls.kdsnap"
    restorable.snapshot(path)
    restored = plat.restore(path, of=restorable)
    try:
        shown = int.from_bytes(os.urandom(7), "little")
        echo = _hypercall(restored, "ECHO", f"rbx={shown}", "--expose", "rbx")
        assert echo["status"] == 0 and {k: _number(v) for k, v in echo["outputs"].items()} == {"rbx": shown}
        clock = _hypercall(restored, "HOST_TIME", "--expose", "rax")
        assert clock["status"] == 0 and abs(_number(clock["outputs"]["rax"]) / 1e9 - time.time()) < 600
    finally:
        restored.destroy()


@pytest.mark.qemu
def test_pages_the_guest_zeroed_or_filled_read_back_so_after_a_restore(plat, restorable, tmp_path):
    """A sparse snapshot leaves out the pages that are all zeros: a file the guest filled with
    random bytes and then overwrote with zeros in place reads back as zeros, and a file it
    filled reads back intact."""
    size = 4 << 20
    made = restorable.exec(["sh", "-c", f"head -c {size} /dev/urandom > /tmp/filled && "
                            "cp /tmp/filled /tmp/zeroed && "
                            f"head -c {size} /dev/zero | dd of=/tmp/zeroed conv=notrunc bs=4096 2>/dev/null && "
                            "sha256sum /tmp/filled /tmp/zeroed"])
    assert made.ok, made.stderr_text
    sums = [line.split()[0] for line in made.stdout_text.splitlines()]
    zeros = hashlib.sha256(bytes(size)).hexdigest()
    assert sums[1] == zeros and sums[0] != zeros
    path = tmp_path / "zeroed.kdsnap"
    restorable.snapshot(path)
    restored = plat.restore(path, of=restorable)
    try:
        again = restored.exec("sha256sum /tmp/filled /tmp/zeroed")
        assert [line.split()[0] for line in again.stdout_text.splitlines()] == sums
    finally:
        restored.destroy()
        restorable.exec("rm -f /tmp/filled /tmp/zeroed")


@pytest.mark.qemu
def test_an_older_snapshot_is_refused_without_the_restorable_policy(plat, guarded, tmp_path):
    older, newer = tmp_path / "v1.kdsnap", tmp_path / "v2.kdsnap"
    first = guarded.snapshot(older)
    second = guarded.snapshot(newer)
    assert second["version"] == first["version"] + 1 and second["domain_id"] == first["domain_id"]
    _refused(plat, older, guarded, rf"older than the domain's latest \(version {first['version']}, "
                                   rf"latest {second['version']}\)")


@pytest.mark.qemu
@pytest.mark.parametrize("where", ["header", "memory", "sealed", "mac"])
def test_a_tampered_snapshot_is_refused(plat, guarded, tmp_path, where):
    path = tmp_path / "guarded.kdsnap"
    guarded.snapshot(path)
    data = bytearray(path.read_bytes())
    offset = {"header": 0x60,                          # inside the measurement
              "memory": len(data) // 2,                # guest ciphertext
              "sealed": HEADER_SIZE + 16 + 20,         # the domain section (key, VMCS)
              "mac": len(data) - 1}[where]
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))
    _refused(plat, path, guarded, "snapshot does not verify: its MAC is wrong")


@pytest.mark.qemu
@pytest.mark.parametrize("kind", ["fifo", "device"])
def test_a_snapshot_that_is_not_a_regular_file_is_refused_not_read(plat, guarded, tmp_path, kind):
    """A FIFO would block the platform's read and /dev/zero never ends: both are refused."""
    path = tmp_path / "pipe.kdsnap" if kind == "fifo" else Path("/dev/zero")
    if kind == "fifo":
        os.mkfifo(path)
    _refused(plat, path, guarded, "is not a regular file")


@pytest.mark.qemu
def test_another_domains_snapshot_is_refused(plat, guarded, restorable, tmp_path):
    guarded.snapshot(tmp_path / "mine.kdsnap")       # the tenant knows its domain's id from here on
    path = tmp_path / "other.kdsnap"
    restorable.snapshot(path)
    error = _refused(plat, path, guarded, "snapshot is of another domain")
    assert restorable.domain_id in error.message


@pytest.mark.qemu
def test_a_snapshot_from_another_platform_is_refused(guarded, tmp_path, monkeypatch):
    path = tmp_path / "guarded.kdsnap"
    guarded.snapshot(path)
    monkeypatch.setenv("QEMU_KD_STATE", str(tmp_path / "other-state"))
    with Platform(memory="512M") as other:
        _refused(other, path, guarded, "taken on another platform")


@pytest.mark.qemu
def test_a_restorable_snapshot_restores_three_working_guests(plat, restorable, tmp_path):
    path = tmp_path / "restorable.kdsnap"
    restorable.exec("echo before > /tmp/moment")
    restorable.snapshot(path)
    restorable.exec("echo after > /tmp/moment")
    guests = []
    try:
        for i in range(3):
            guests.append(plat.restore(path, of=restorable, name=f"again-{i}"))
        for i, guest in enumerate(guests):
            guest.exec(f"echo {i} > /tmp/mine")
        for i, guest in enumerate(guests):
            assert guest.exec("cat /tmp/moment /tmp/mine").stdout_text.split() == ["before", str(i)]
            assert guest.attest(os.urandom(32)).verified.measurement == restorable.measurement
        # a restored domain is the same domain: its own snapshot is the domain's next version
        again = guests[0].snapshot(tmp_path / "again.kdsnap")
        assert again["domain_id"] == restorable.domain_id
        guests.append(plat.restore(tmp_path / "again.kdsnap", of=guests[0]))
        assert guests[-1].exec("cat /tmp/moment /tmp/mine").stdout_text.split() == ["before", "0"]
    finally:
        for guest in guests:
            guest.destroy()
    assert restorable.exec("cat /tmp/moment").stdout_text.strip() == "after"


@pytest.mark.qemu
def test_cli_snapshot_and_restore(plat, guarded, tmp_path):
    env = dict(os.environ)
    path = tmp_path / "cli.kdsnap"
    out = subprocess.run([*QEMU_KD, "snapshot", guarded.name, str(path), "--json"], env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    taken = json.loads(out.stdout)
    assert taken["name"] == guarded.name and taken["path"] == str(path.resolve())
    out = subprocess.run([*QEMU_KD, "restore", str(path), "--name", "cli-restored", "--json"], env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    restored = json.loads(out.stdout)
    try:
        assert restored["name"] == "cli-restored" and restored["domain_id"] == taken["domain_id"]
        listed = json.loads(subprocess.run([*QEMU_KD, "ls", "--json"], env=env, capture_output=True,
                                           text=True, timeout=60, check=True).stdout)
        mine = [d for d in listed if d["name"] == "cli-restored"]
        assert mine and mine[0]["guest_state"] == "running"
        again = subprocess.run([*QEMU_KD, "restore", str(path)], env=env, capture_output=True, text=True,
                               timeout=600)
        assert again.returncode != 0
        assert again.stderr.strip().splitlines() == [
            f"qemu-kd: error: snapshot {path.resolve()} is older than the domain's latest (version "
            f"{taken['version']}, latest {taken['version'] + 1}); the domain's policy is not restorable"]
    finally:
        subprocess.run([*QEMU_KD, "destroy", "cli-restored"], env=env, capture_output=True, timeout=120)


@pytest.mark.qemu
def test_cli_exec_reaches_a_restored_kept_domain(plat, tmp_path):
    """run --keep leaves the tenant record exec needs; the snapshot carries it to the restore."""
    def cli(*argv, check=True):
        out = subprocess.run([*QEMU_KD, *argv], capture_output=True, text=True, timeout=600)
        assert not check or out.returncode == 0, out.stderr
        return out

    cli("run", "--platform", str(plat.socket), "--keep", "--name", "kept-snap", "-q",
        "--cmd", "echo from-before > /tmp/f")
    try:
        cli("snapshot", "kept-snap", str(tmp_path / "kept.kdsnap"))
        cli("exec", "kept-snap", "--", "sh", "-c", "echo from-after > /tmp/f")
        restored = json.loads(cli("restore", str(tmp_path / "kept.kdsnap"), "--name", "kept-copy",
                                  "--json").stdout)
        assert restored["tenant_record"] is True
        try:
            assert cli("exec", "kept-copy", "--", "cat", "/tmp/f").stdout == "from-before\n"
            assert cli("exec", "kept-snap", "--", "cat", "/tmp/f").stdout == "from-after\n"
        finally:
            cli("destroy", "kept-copy", check=False)
    finally:
        cli("destroy", "kept-snap", check=False)

