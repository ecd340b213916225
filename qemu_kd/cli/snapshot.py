"""``qemu-kd snapshot DOMAIN FILE`` and ``qemu-kd restore FILE``: encrypted snapshots of running
protected domains (docs/snapshots.md).

``snapshot`` asks the domain's platform, through its host port, to write the file.  ``restore``
starts a host VMM process for the platform that took it (found by the platform id in the file's
header, or named with ``--platform``); the host VMM has the platform restore it (``restore-kd``)
and serves it as a launched domain until its agent answers, then lets go of it: the domain runs
on as one ``run --keep`` kept, for ``exec``, ``ls`` and ``destroy``.

The tenant's side: ``run --keep`` left a tenant record for the domain (cli/kept.py), which
``exec`` needs to attest it.  ``snapshot`` keeps a copy of that record for the snapshot's
domain id (``<state>/tenants/snapshot-<domain id>.json``, mode 0600), and ``restore`` writes it
for the restored domain, so ``qemu-kd exec NAME`` attests the restored guest over a fresh nonce
and opens a new session.
"""

from __future__ import annotations

import argparse
import json
import shutil
from dataclasses import replace
from pathlib import Path

from qemu_kd.common.errors import ConfigError, KdError

HOST_PORT_TIMEOUT = 600.0
#: How long the restored guest's agent may take to answer.
READY_TIMEOUT = 120.0


class SnapshotCliError(KdError):
    """A snapshot or restore the command line cannot carry out."""


def snapshot_record_path(domain_id: str) -> Path:
    from qemu_kd.cli.kept import tenants_dir

    return tenants_dir() / f"snapshot-{domain_id}.json"


def _keep_tenant_record(platform_pid: int, keyid: int, domain_id: str) -> bool:
    """Copy the kept domain's tenant record for its snapshots; False when it has none."""
    from qemu_kd.cli.kept import record_path
    from qemu_kd.common.files import write_file_atomic

    try:
        data = record_path(platform_pid, keyid).read_bytes()
    except FileNotFoundError:
        return False
    except OSError as exc:
        raise SnapshotCliError(f"cannot read the domain's tenant record: {exc.strerror or exc}") from None
    write_file_atomic(snapshot_record_path(domain_id), data, mode=0o600)
    return True


def _restored_tenant_record(domain_id: str, platform_pid: int, keyid: int) -> Path | None:
    """Write the tenant record of a restored domain from its snapshot's; None when there is none."""
    from qemu_kd.cli.kept import KeptTenant
    from qemu_kd.tenant.seal import TenantSecret, TenantSecretError

    try:
        doc = json.loads(snapshot_record_path(domain_id).read_text())
        secret = TenantSecret.unpack(json.dumps(doc["secret"]).encode())
        chain = doc["chain_pem"].encode()
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError, AttributeError, TenantSecretError) as exc:
        raise SnapshotCliError(f"the snapshot's tenant record is unusable: {exc}") from None
    return KeptTenant(platform_pid, replace(secret, keyid=keyid), chain).save()


def snapshot_domain(name: str, path: str) -> dict:
    """Snapshot the running domain ``name`` into ``path``; the result as JSON-able data."""
    from qemu_kd.cli.domains import resolve
    from qemu_kd.hostport.client import HostPortClient

    dom = resolve(name)
    target = Path(path).resolve()
    with HostPortClient(dom.platform_socket, timeout=HOST_PORT_TIMEOUT,
                        client_name="qemu-kd snapshot") as client:
        taken = client.snapshot_kd(dom.keyid, target)
    tenant = _keep_tenant_record(dom.platform_pid, dom.keyid, taken["domain_id"])
    return {"name": dom.name, "qualified_name": dom.qualified, "keyid": dom.keyid,
            "path": taken["path"], "domain_id": taken["domain_id"], "version": taken["version"],
            "size": taken["size"], "tenant_record": tenant,
            "platform": {"pid": dom.platform_pid, "socket": dom.platform_socket}}


def _platform_id(chain_pem: bytes) -> str | None:
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    try:
        leaf = x509.load_pem_x509_certificates(chain_pem)[0]
        serials = leaf.subject.get_attributes_for_oid(NameOID.SERIAL_NUMBER)
    except (ValueError, IndexError):
        return None
    return str(serials[0].value) if serials else None


def choose_platform(snapshot_platform_id: str, wanted: int | None) -> dict:
    """The registry entry of the platform daemon to restore on: pid ``wanted``, or the one
    whose platform id is the snapshot's."""
    from qemu_kd.hostport.client import HostPortClient
    from qemu_kd.hostport.protocol import HostPortError
    from qemu_kd.hostport.registry import running_platforms

    platforms = running_platforms()
    if wanted is not None:
        for info in platforms:
            if int(info["pid"]) == wanted:
                return info
        raise SnapshotCliError(f"no platform daemon with pid {wanted} is running",
                               "run `qemu-kd ls` to see the running platforms")
    for info in platforms:
        try:
            with HostPortClient(info["socket"], timeout=10.0, client_name="qemu-kd restore") as client:
                chain = client.platform_info().chain_pem
        except (HostPortError, OSError):
            continue
        if _platform_id(chain) == snapshot_platform_id:
            return info
    raise SnapshotCliError(f"no running platform daemon is the platform that took the snapshot "
                           f"({snapshot_platform_id})",
                           "start it with its state directory (qemu-kd platform serve --state DIR), "
                           "or name one with --platform PID")


def restore_and_let_go(platform_socket: str, path: Path, name: str | None) -> dict:
    """A host VMM process restores the snapshot at ``path`` on the platform at
    ``platform_socket`` and serves it until its agent answers, then lets go of it (it runs on);
    the host VMM's ``restore`` result.  A failed restore leaves no domain behind."""
    from host_vmm.process import HostVmmProcess
    from qemu_kd.common.rundirs import make_private_dir

    workdir = make_private_dir("run")
    host = None
    try:
        host = HostVmmProcess(platform_socket, str(workdir / "vmm.sock"))
        named = {"name": name} if name is not None else {}
        try:
            restored = host.call("restore", timeout=HOST_PORT_TIMEOUT + READY_TIMEOUT, path=str(path),
                                 ready_timeout=READY_TIMEOUT, **named)
            host.call("detach")
        except BaseException:
            try:
                host.call("destroy", timeout=60)
            except (KdError, OSError):
                pass
            raise
        return restored
    finally:
        if host is not None:
            host.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def restore_snapshot(path: str, name: str | None, platform_pid: int | None) -> dict:
    """Restore the snapshot at ``path`` and let it run; the result as JSON-able data."""
    from qemu_kd.formats.errors import FormatError
    from qemu_kd.formats.snapshot import HEADER_SIZE, SnapshotHeader

    target = Path(path).resolve()
    try:
        with open(target, "rb") as f:
            header, _count = SnapshotHeader.unpack(f.read(HEADER_SIZE))
    except OSError as exc:
        raise ConfigError(f"cannot read the snapshot {target}: {exc.strerror or exc}") from None
    except FormatError as exc:
        raise ConfigError(f"{target}: {exc.message}", exc.hint) from None
    info = choose_platform(header.platform_id.hex(), platform_pid)
    pid = int(info["pid"])
    restored = restore_and_let_go(str(info["socket"]), target, name)
    record = _restored_tenant_record(restored["domain_id"], pid, restored["keyid"])
    return {"name": restored["name"], "qualified_name": f"{pid}:{restored['name']}",
            "keyid": restored["keyid"], "domain_id": restored["domain_id"],
            "version": restored["version"], "endpoints": restored["endpoints"],
            "tenant_record": record is not None, "platform": {"pid": pid, "socket": info["socket"]}}


def _cmd_snapshot(args: argparse.Namespace) -> int:
    out = snapshot_domain(args.domain, args.file)
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        print(f"{out['name']}: snapshot version {out['version']} written to {out['path']} "
              f"({out['size'] >> 20} MiB, domain id {out['domain_id']})")
        if not out["tenant_record"]:
            print("  no tenant record for it (only `qemu-kd run --keep` keeps one): "
                  "`qemu-kd exec` cannot attest a restore of it")
    return 0


def _cmd_restore(args: argparse.Namespace) -> int:
    out = restore_snapshot(args.file, args.name, args.platform)
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        print(f"restored as {out['name']} (KeyID {out['keyid']}, platform pid {out['platform']['pid']}) "
              f"from snapshot version {out['version']}")
        if out["tenant_record"]:
            print(f"  exec:     qemu-kd exec {out['name']} -- CMD...")
        print(f"  end it:   qemu-kd destroy {out['name']}")
    return 0


def add_snapshot_parsers(sub) -> None:
    """Register ``snapshot`` and ``restore`` on ``sub``."""
    from qemu_kd.cli.args import domain_name

    snap = sub.add_parser("snapshot", help="write an encrypted snapshot of a running protected domain",
                          description="The platform exits the domain, writes its memory as the "
                                      "memory-encryption engine encrypted it and its vCPU and device "
                                      "state sealed to the platform, and resumes it.")
    snap.add_argument("domain", help="the domain: its name (run --name, or kdN), N, or PID:NAME")
    snap.add_argument("file", help="the snapshot file to write")
    snap.add_argument("--json", action="store_true", help="print one JSON object")
    snap.set_defaults(func=_cmd_snapshot)

    rest = sub.add_parser("restore", help="launch a snapshot again as a new domain",
                          description="The platform that took the snapshot checks it (MAC, "
                                      "rollback) and launches it as a new domain that resumes "
                                      "where the snapshot was taken.")
    rest.add_argument("file", help="the snapshot file")
    rest.add_argument("--name", type=domain_name, default=None,
                      help="name the restored domain (default: the next free kdN)")
    rest.add_argument("--platform", type=int, default=None, metavar="PID",
                      help="restore on this platform daemon (default: the one that took it)")
    rest.add_argument("--json", action="store_true", help="print one JSON object")
    rest.set_defaults(func=_cmd_restore)
