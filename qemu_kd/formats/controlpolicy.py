"""The guest's control policy: which host-requested VMCS/EPT changes its agent accepts.

The policy is a JSON file in the guest image (``/etc/kd-control-policy.json``),
so it is part of the launch measurement: a tenant who attests the image knows
the rules its guest enforces.  The guest agent reads it at start
(``guest_agent.controls``, which cannot import this module and parses the same
format itself); a missing file means :data:`DEFAULT`.  An unreadable or invalid
file makes the agent refuse every request: it fails closed.

Rules that no file can relax (they are not settings): a request for another
KeyID is refused; no gpa is mapped outside the domain or twice (the platform
checks every hpa's owner when it seals and again when it installs); no
remap loses contents (MOVE re-encrypts, only ballooned-out pages are dropped);
no guest-state field of the VMCS changes, and the exposed-register mask may
only shrink.

::

    {"version": 1,
     "memory_floor_mib": 128,        guest memory never drops below this
     "max_pages_per_request": 65536, at most this many pages per request
     "min_exit_interval_ms": 20,     a host-forced exit interval is 0 (off) or at least this
     "allow_balloon": true, "allow_relocate": true, "allow_share": true,
     "max_shared_pages": 1024}       at most this many pages shared with the host at once
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields

from qemu_kd.formats.errors import FieldValueError, VersionError

POLICY_PATH = "etc/kd-control-policy.json"
CONTROL_POLICY_VERSION = 1


@dataclass(frozen=True)
class ControlPolicy:
    memory_floor_mib: int = 128
    max_pages_per_request: int = 65536
    min_exit_interval_ms: int = 20
    allow_balloon: bool = True
    allow_relocate: bool = True
    allow_share: bool = True
    max_shared_pages: int = 1024

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if f.type in ("bool", bool):
                if not isinstance(value, bool):
                    raise FieldValueError(f"control policy: {f.name} must be true or false")
            elif not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise FieldValueError(f"control policy: {f.name} must be a non-negative integer")

    def pack(self) -> bytes:
        return (json.dumps({"version": CONTROL_POLICY_VERSION, **asdict(self)}, indent=1, sort_keys=True)
                + "\n").encode()

    @classmethod
    def unpack(cls, data: bytes) -> "ControlPolicy":
        try:
            obj = json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise FieldValueError(f"control policy is not JSON: {exc}") from None
        if not isinstance(obj, dict):
            raise FieldValueError("control policy must be a JSON object")
        if obj.get("version") != CONTROL_POLICY_VERSION:
            raise VersionError(f"control policy version {obj.get('version')!r} is not supported "
                               f"(expected {CONTROL_POLICY_VERSION})")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(obj) - known - {"version"})
        if unknown:
            raise FieldValueError(f"control policy: unknown setting {unknown[0]!r}")
        return cls(**{k: v for k, v in obj.items() if k in known})


DEFAULT = ControlPolicy()
