"""The tenant's record of a domain kept by ``run --keep``, so that ``qemu-kd exec`` can attest
it and open a session later.

``<state>/tenants/<platform-pid>-<keyid>.json`` (mode 0600, in a 0700 directory): the tenant
secret (the domain key, measurement, policy, host_data) and the platform's certificate chain.
``qemu-kd destroy`` removes it; ``qemu-kd clean`` (and every ``run``) removes those whose
platform daemon is dead.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from qemu_kd.common.errors import KdError
from qemu_kd.common.files import write_file_atomic
from qemu_kd.common.process import pid_alive
from qemu_kd.hostport.registry import platform_state_dir
from qemu_kd.tenant.seal import TenantSecret, TenantSecretError


class KeptRecordError(KdError):
    """No usable tenant record for a domain."""


def tenants_dir() -> Path:
    return platform_state_dir() / "tenants"


def record_path(platform_pid: int, keyid: int) -> Path:
    return tenants_dir() / f"{platform_pid}-{keyid}.json"


@dataclass(frozen=True)
class KeptTenant:
    """What ``exec`` needs to attest a kept domain and open its session."""

    platform_pid: int
    secret: TenantSecret
    chain_pem: bytes

    def save(self) -> Path:
        directory = tenants_dir()
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        path = record_path(self.platform_pid, self.secret.keyid)
        doc = {"platform_pid": self.platform_pid, "chain_pem": self.chain_pem.decode(),
               "secret": json.loads(self.secret.pack())}
        write_file_atomic(path, json.dumps(doc, indent=1).encode() + b"\n", mode=0o600)
        return path

    @classmethod
    def load(cls, platform_pid: int, keyid: int, name: str) -> "KeptTenant":
        path = record_path(platform_pid, keyid)
        try:
            doc = json.loads(path.read_text())
            secret = TenantSecret.unpack(json.dumps(doc["secret"]).encode())
            return cls(int(doc["platform_pid"]), secret, doc["chain_pem"].encode())
        except FileNotFoundError:
            raise KeptRecordError(f"no tenant secret for {name}: only domains kept by "
                                  "`qemu-kd run --keep` can run commands through exec",
                                  f"expected {path}") from None
        except (OSError, ValueError, KeyError, TypeError, AttributeError, TenantSecretError) as exc:
            raise KeptRecordError(f"the tenant record {path} is unusable: {exc}") from None


def remove_record(platform_pid: int, keyid: int) -> None:
    try:
        os.unlink(record_path(platform_pid, keyid))
    except FileNotFoundError:
        pass


def sweep_dead_records() -> list[Path]:
    """Remove the records of domains whose platform daemon is dead; what was removed."""
    removed = []
    try:
        entries = list(tenants_dir().glob("*-*.json"))
    except OSError:
        return removed
    for path in entries:
        pid = path.name.split("-", 1)[0]
        if pid.isdigit() and not pid_alive(int(pid)):
            try:
                path.unlink()
                removed.append(path)
            except OSError:
                pass
    return removed
