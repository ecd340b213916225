"""The tenant: the guest's owner, who trusts only the platform's certificate chain.

It measures a guest offline (:mod:`.measure`), seals it for a host's layout
(:mod:`.seal`), checks the attestation reports the guest obtains
(:mod:`.verify`) and talks to its attested guest through a session that the
host relays but cannot read (:mod:`.session`).  Nothing here imports the platform or the QEMU
controller: a tenant can run anywhere.
"""

from qemu_kd.tenant.measure import SealError, guest_pages, measure
from qemu_kd.tenant.seal import TenantSecret, TenantSecretError, seal
from qemu_kd.tenant.verify import ReportFormatError, check_report

__all__ = ["SealError", "TenantSecret", "TenantSecretError", "ReportFormatError",
           "check_report", "guest_pages", "measure", "seal"]
