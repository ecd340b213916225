"""The host's side of guest-verified control changes (docs/protocol.md).

The host cannot write a running domain's VMCS or EPT.  To change them it asks
the guest (``control`` on the shared channel); the guest either refuses, with
a reason, or returns an update the platform sealed for it.  The host then
only verifies and installs:

1. ``controls-stage``: the platform checks the update's tag, KeyID and version
   and keeps it; the host learns the update's operations and the hash-kd its
   control pages will have;
2. staged ``vmread`` of the field it asked to change, staged ``verify-ept``
   (every mapped page the domain's, no alias, and exactly the mapping changes
   it asked for), staged ``hash-kd``;
3. ``controls-install``; afterwards ``hash-kd`` must equal the staged digest;
4. ``control`` ``installed`` tells the guest, which checks with the platform
   and finishes its side (balloon in: gives the pages back to Linux).

Nothing here reads guest memory or holds a key.
"""

from __future__ import annotations

import base64
import time
from dataclasses import dataclass, field

from qemu_kd.common.errors import KdError
from qemu_kd.hostport.protocol import HostPortError

PAGE_SIZE = 4096
VMCS_EXIT_INTERVAL = 0x4202
#: How long the guest may take over one request (ballooning 64 MiB under TCG takes seconds).
GUEST_WAIT = 600.0


class ControlRefused(KdError):
    """The guest refused the request, the platform refused its update, or the host's checks failed."""

    exit_code = 3


@dataclass
class ControlOutcome:
    """What one control request came to, as ``--json`` prints it."""

    op: str
    verdict: str                     # accepted (and installed), or refused
    refused_by: str | None = None    # guest, platform or host
    reason: str | None = None
    version: int | None = None
    summary: dict = field(default_factory=dict)
    checks: list[dict] = field(default_factory=list)
    ops: list[dict] = field(default_factory=list)     # the update's page runs (gpa, hpas, count)
    installed: dict = field(default_factory=dict)
    free_pages_before: int | None = None
    free_pages_after: int | None = None
    timings: dict = field(default_factory=dict)

    def as_json(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if v not in (None, {}, [])}


class ControlHost:
    """Asks one domain's guest for control changes, verifies and installs what it returns."""

    def __init__(self, client, agent, keyid: int, guest_wait: float = GUEST_WAIT):
        self.client, self.agent, self.keyid = client, agent, keyid
        self.guest_wait = guest_wait

    def status(self) -> dict:
        return self.client.controls_status(self.keyid)

    # -- requests ---------------------------------------------------------------------
    def balloon_out(self, pages: int) -> ControlOutcome:
        """Ask for ``pages`` pages back; they become FREE on the platform."""
        def expect(staged, verdict):
            changes = verdict["changes"]
            ok = (staged["ops"] == {"unmap": pages} and len(changes) == pages
                  and all("new_hpa" not in c and "old_hpa" in c for c in changes))
            return ok, f"{len(changes)} gpas unmapped" if ok else f"unexpected changes: {staged['ops']}"
        return self._request("balloon-out", expect, pages=pages)

    def balloon_in(self, pages: int) -> ControlOutcome:
        """Offer ``pages`` fresh pages; the guest accepts them zeroed."""
        free_before = self.client.platform_info().free_pages
        hpas = self.client.alloc(npages=pages, keyid=self.keyid).hpas
        offered = set(hpas)

        def expect(staged, verdict):
            changes = verdict["changes"]
            ok = (staged["ops"] == {"accept": pages} and len(changes) == pages
                  and {c.get("new_hpa") for c in changes} == offered
                  and all("old_hpa" not in c for c in changes))
            return ok, f"{len(changes)} offered pages mapped" if ok else "the update maps other pages"
        outcome = self._request("balloon-in", expect, free_before, hpas=list(hpas))
        if outcome.verdict != "accepted":
            self.client.controls_release(self.keyid, hpas)
            self._finish(outcome)
        return outcome

    def relocate(self, gpas: list[int]) -> ControlOutcome:
        """Move the guest pages at ``gpas`` to fresh host pages; the old ones become FREE."""
        free_before = self.client.platform_info().free_pages
        hpas = self.client.alloc(npages=len(gpas), keyid=self.keyid).hpas
        moves = [[g, h] for g, h in zip(gpas, hpas)]
        wanted = {g: h for g, h in moves}

        def expect(staged, verdict):
            changes = verdict["changes"]
            ok = (staged["ops"] == {"move": len(moves)}
                  and {c["gpa"]: c.get("new_hpa") for c in changes} == wanted
                  and all("old_hpa" in c for c in changes))
            return ok, f"{len(changes)} gpas moved" if ok else "the update moves other pages"
        outcome = self._request("relocate", expect, free_before, moves=moves)
        if outcome.verdict != "accepted":
            self.client.controls_release(self.keyid, hpas)
            self._finish(outcome)
        return outcome

    def share(self, pages: int) -> ControlOutcome:
        """Ask the guest to share a buffer of ``pages`` pages of its choosing (plaintext to the host)."""
        def expect(staged, verdict):
            ok = staged["ops"] == {"share": pages} and not verdict["changes"]
            return ok, f"{pages} pages shared, mapping unchanged" if ok else "unexpected changes"
        return self._request("share", expect, pages=pages)

    def unshare(self) -> ControlOutcome:
        """Ask the guest to make its shared buffers private again."""
        def expect(staged, verdict):
            ok = set(staged["ops"]) == {"unshare"} and not verdict["changes"]
            return ok, "pages private again, mapping unchanged" if ok else "unexpected changes"
        return self._request("unshare", expect)

    def set_exit_interval(self, ms: int) -> ControlOutcome:
        """Ask for a host-forced exit every ``ms`` milliseconds (0: none)."""
        return self.vmwrite(VMCS_EXIT_INTERVAL, ms, op="exit-interval")

    def vmwrite(self, encoding: int, value: int, op: str = "vmwrite") -> ControlOutcome:
        """Ask for one VMCS field to change (the guest allows few)."""
        def expect(staged, verdict):
            got = self.client.staged_vmread(self.keyid, encoding)
            ok = got == value and not staged["ops"] and not verdict["changes"]
            return ok, f"vmread {encoding:#06x} = {got}" if ok else f"vmread {encoding:#06x} = {got}, not {value}"
        if op == "exit-interval":
            return self._request(op, expect, ms=value)
        return self._request(op, expect, field=encoding, value=value)

    # -- the flow -----------------------------------------------------------------------
    def _request(self, op: str, expect, free_before: int | None = None, **args) -> ControlOutcome:
        """Ask the guest; verify and install what it returns.  ``free_before``: the host's free
        pool before it allocated the pages it offers (default: now)."""
        outcome = ControlOutcome(op=op, verdict="refused")
        outcome.free_pages_before = (self.client.platform_info().free_pages if free_before is None
                                     else free_before)
        t0 = time.perf_counter()
        answer = self.agent.call("control", wait=self.guest_wait, op=op, keyid=self.keyid, **args)
        t1 = time.perf_counter()
        outcome.timings["guest"] = t1 - t0
        if answer.get("verdict") != "accepted":
            outcome.refused_by, outcome.reason = "guest", str(answer.get("reason"))
            return self._finish(outcome)
        outcome.version = int(answer["version"])
        try:
            update = base64.b64decode(answer["update"], validate=True)
        except (KeyError, TypeError, ValueError):
            outcome.refused_by, outcome.reason = "host", "the guest's answer carries no update"
            return outcome
        try:
            installed = self.install(update, expect, outcome)
        except HostPortError as exc:
            outcome.refused_by, outcome.reason = "platform", f"{exc.code}: {exc.message}"
            return self._finish(outcome)
        outcome.timings["verify and install"] = time.perf_counter() - t1
        if installed:
            self.agent.call("control", wait=self.guest_wait, op="installed", keyid=self.keyid,
                            version=outcome.version)
            outcome.verdict = "accepted"
        outcome.timings["total"] = time.perf_counter() - t0
        return self._finish(outcome)

    def _finish(self, outcome: ControlOutcome) -> ControlOutcome:
        outcome.free_pages_after = self.client.platform_info().free_pages
        return outcome

    def install(self, update: bytes, expect, outcome: ControlOutcome) -> bool:
        """Stage, verify and install one update; False (and the reason) when a check fails."""
        staged = self.client.controls_stage(self.keyid, update)
        outcome.summary = staged
        verdict = self.client.staged_verify_ept(self.keyid)
        outcome.ops = verdict["ops"]
        checks = [("verify-ept", bool(verdict["verdict_ok"]),
                   "; ".join(verdict["reasons"]) or f"{verdict['mapped_pages']} pages mapped, all this domain's")]
        ok, detail = expect(staged, verdict)
        checks.append(("request", ok, detail))
        digest = self.client.staged_hash_kd(self.keyid).hex()
        checks.append(("hash-kd", digest == staged["digest"], "staged control pages hashed"))
        outcome.checks = [{"name": n, "ok": o, "detail": d} for n, o, d in checks]
        failed = [c for c in outcome.checks if not c["ok"]]
        if failed:
            outcome.refused_by = "host"
            outcome.reason = "; ".join(f"{c['name']}: {c['detail']}" for c in failed)
            return False
        outcome.installed = self.client.controls_install(self.keyid, staged["version"])
        after = self.client.hash_kd(self.keyid).hex()
        outcome.checks.append({"name": "installed", "ok": after == digest,
                               "detail": "hash-kd equals the staged digest" if after == digest
                               else "hash-kd after install differs from the staged digest"})
        return after == digest
