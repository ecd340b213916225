"""qemu-kd: key-domain protected-VM hardware emulated around real QEMU guests.

The Python API (``docs/api.md``) is importable from here; it loads on first use,
so ``import qemu_kd`` stays cheap::

    with qemu_kd.Platform() as platform:
        guest = platform.launch()
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

#: The names of the API (qemu_kd.api) offered at the top level.
API_NAMES = ("Platform", "Domain", "PlainDomain", "ProtectedDomain", "ExecResult",
             "AttestationResult", "NotProtectedError", "DomainGoneError", "report_data_for_nonce")

__all__ = ["__version__", *API_NAMES]

if TYPE_CHECKING:
    from qemu_kd.api import (AttestationResult, Domain, DomainGoneError, ExecResult,  # noqa: F401
                             NotProtectedError, PlainDomain, Platform, ProtectedDomain,
                             report_data_for_nonce)


def __getattr__(name: str) -> Any:
    if name in API_NAMES:
        from qemu_kd import api

        return getattr(api, name)
    raise AttributeError(f"module 'qemu_kd' has no attribute {name!r}")
