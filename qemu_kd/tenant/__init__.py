"""The tenant: the guest's owner, who trusts only the platform's certificate chain.

It measures a guest offline (:mod:`.measure`), seals it for a host's layout
(:mod:`.seal`), checks the attestation reports the guest obtains
(:mod:`.verify`) and talks to its attested guest through a session that the
host relays but cannot read (:mod:`.session`).  Nothing here imports the platform or the QEMU
controller: a tenant can run anywhere.

The names this package offers (``qemu_kd.tenant.seal`` is the function, as
``qemu_kd.tenant.measure`` is) load with their submodule on first use: a launch
starts measuring its guest before sealing's and verification's X.509 code has
loaded, which then loads beside the measuring.  ``importlib.import_module``
reaches the submodules themselves.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import Any

#: Each name this package offers, and the submodule it comes from.
_HOMES = {"SealError": "measure", "guest_pages": "measure", "measure": "measure",
          "TenantSecret": "seal", "TenantSecretError": "seal", "seal": "seal",
          "ReportFormatError": "verify", "check_report": "verify"}

__all__ = sorted(_HOMES)


class _TenantPackage(types.ModuleType):
    """This package: its names come from their submodules, loaded when first asked for.

    Every lookup of one goes to its submodule, so ``seal`` and ``measure`` stay the functions
    even once their submodules (which the import system records here under the same names)
    have loaded."""

    def __getattribute__(self, name: str) -> Any:
        home = _HOMES.get(name)
        if home is None:
            return super().__getattribute__(name)
        return getattr(importlib.import_module(f"{__name__}.{home}"), name)


sys.modules[__name__].__class__ = _TenantPackage
