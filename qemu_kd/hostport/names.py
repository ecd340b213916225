"""Domain names: host-chosen labels, unique across the platform daemons of this machine.

A name is a label the host gives a domain at launch (``launch``'s ``name``),
shown by ``qemu-kd ls`` and accepted wherever a command takes a DOMAIN.  It is
host-visible and carries no security meaning.  Without one the platform picks
``kdN``: ``kd<KeyID>`` when that is free, else the next free ``kdN``.

Uniqueness across platforms: the platform that launches a domain claims its
name with a file ``<runtime>/platforms/<name>.name`` (created atomically, next
to the registry entries) holding its pid and an owner token; it removes the
file when the domain is destroyed.  A claim whose process is dead is stale and
taken over.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import tempfile
from pathlib import Path

from qemu_kd.common.errors import ConfigError
from qemu_kd.common.process import pid_alive
from qemu_kd.hostport.protocol import HostPortNameTakenError

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,31}$")
NAME_RULE = "1 to 32 of A-Z a-z 0-9 _ . -, starting with a letter or digit, not only digits"
SUFFIX = ".name"


class DomainNameError(ConfigError):
    """A name that is not a valid domain name."""


class DomainNameTaken(HostPortNameTakenError):
    """The name belongs to a live domain (of this platform or another one)."""


def check_name(name: str) -> str:
    """``name`` if it is a valid domain name (DomainNameError otherwise)."""
    if not isinstance(name, str) or not NAME_RE.match(name) or name.isdigit():
        raise DomainNameError(f"{name!r} is not a valid domain name", f"use {NAME_RULE}")
    return name


def default_name(keyid: int) -> str:
    return f"kd{keyid}"


class NameClaims:
    """The names one platform holds, as claim files in ``directory``."""

    def __init__(self, directory: Path, owner: str, pid: int | None = None):
        self.directory = Path(directory)
        self.owner = owner
        self.pid = os.getpid() if pid is None else pid

    def _path(self, name: str) -> Path:
        return self.directory / f"{name}{SUFFIX}"

    def holder(self, name: str) -> dict | None:
        """The live claim on ``name`` (pid, owner, keyid), or None when it is free or stale."""
        try:
            doc = json.loads(self._path(name).read_text())
            pid = int(doc["pid"])
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError):
            return {"pid": None, "owner": None, "keyid": None}   # unreadable: counts as taken
        if not pid_alive(pid):
            return None
        return {"pid": pid, "owner": doc.get("owner"), "keyid": doc.get("keyid")}

    def claim(self, name: str, keyid: int) -> str:
        """Claim ``name`` for ``keyid`` (DomainNameTaken when a live domain has it)."""
        check_name(name)
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.directory, prefix=".claim-")
        try:
            with os.fdopen(fd, "w") as fh:
                json.dump({"pid": self.pid, "owner": self.owner, "keyid": keyid}, fh)
            for _ in range(3):
                try:
                    os.link(tmp, self._path(name))     # atomic: fails if the name is claimed
                    return name
                except FileExistsError:
                    held = self.holder(name)
                    if held is not None:
                        raise self._taken(name, held) from None
                    self._path(name).unlink(missing_ok=True)   # stale: its platform is gone
            raise DomainNameTaken(f"cannot claim the domain name {name!r}: it keeps changing hands")
        finally:
            os.unlink(tmp)

    def claim_default(self, keyid: int) -> str:
        """``kd<keyid>`` if free, else the next free ``kdN``."""
        for n in itertools.count(keyid):
            try:
                return self.claim(default_name(n), keyid)
            except DomainNameTaken:
                continue
        raise AssertionError("unreachable")

    def free_default(self, keyid: int, limit: int = 64) -> str | None:
        """The name :meth:`claim_default` would claim now (the first free ``kdN`` from
        ``kd<keyid>``, at most ``limit`` names on), without claiming it; None if none is free."""
        for n in range(keyid, keyid + limit):
            if self.holder(default_name(n)) is None:
                return default_name(n)
        return None

    def release(self, name: str) -> None:
        """Give ``name`` back (only if this platform holds it)."""
        held = self.holder(name)
        if held is not None and held["owner"] == self.owner and held["pid"] == self.pid:
            self._path(name).unlink(missing_ok=True)

    def _taken(self, name: str, held: dict) -> DomainNameTaken:
        if held["owner"] == self.owner:
            where = "this platform"
        else:
            where = f"platform {held['pid']}" if held["pid"] is not None else "another platform"
        keyid = f" (KeyID {held['keyid']})" if held.get("keyid") is not None else ""
        return DomainNameTaken(f"the domain name {name!r} is already used by a live domain{keyid} "
                               f"on {where}",
                               "choose another --name, or destroy that domain first")


def sweep_stale_claims(directory: Path) -> list[Path]:
    """Remove the claims of dead processes in ``directory``; those removed."""
    removed = []
    try:
        entries = sorted(directory.glob(f"*{SUFFIX}"))
    except OSError:
        return removed
    for path in entries:
        try:
            pid = int(json.loads(path.read_text())["pid"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if not pid_alive(pid):
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed
