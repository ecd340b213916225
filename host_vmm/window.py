"""Bulk tenant-session frames through a buffer the guest shares with the host.

The shared channel is a serial line: fine for requests, slow for files.  When
the tenant marks a session request as bulk (``put_file``, ``get_file``), the
host VMM asks the guest once to share a buffer of its choosing (the ``share``
control request, verified and installed like any other, see
:mod:`host_vmm.controls`).  From then on a large frame goes into that buffer
through the host port's ``write-phys`` (the pages are SHARED, so the platform
lets the host write them and passes the bytes on to guest memory), and the
serial line carries only ``{"window": {"gpa", "length"}}``; the guest may
answer the same way, and the host reads the answer with ``read-phys``.

The frames are tenant-session ciphertext either way: the buffer changes how
they travel, not what the host can read (docs/agent-protocol.md).
"""

from __future__ import annotations

import base64
import logging
from dataclasses import dataclass

from .controls import ControlHost

log = logging.getLogger(__name__)

PAGE_SIZE = 4096
#: The buffer's size: a 1 MiB file chunk, base64 inside a sealed frame, fits.
WINDOW_PAGES = 512
#: Frames smaller than this go inline on the serial line.
INLINE_LIMIT = 4096


@dataclass
class SharedWindow:
    """A guest-chosen shared buffer: its first gpa and its host pages in the guest's order."""

    client: object          # HostPortClient
    gpa: int
    hpas: list[int]

    @property
    def size(self) -> int:
        return len(self.hpas) * PAGE_SIZE

    @classmethod
    def establish(cls, controls: ControlHost, pages: int = WINDOW_PAGES) -> "SharedWindow | None":
        """Ask the guest to share a buffer; None if it (or the platform, or a check) refuses."""
        outcome = controls.share(pages)
        if outcome.verdict != "accepted":
            log.warning("no shared window: %s refused: %s", outcome.refused_by, outcome.reason)
            return None
        # The update's runs, in the guest's order: gpa and hpa step by a page along a run.
        runs = [op for op in outcome.ops if op.get("op") == "share"]
        hpas = [run["old_hpa"] + i * PAGE_SIZE for run in runs for i in range(run["count"])]
        if len(hpas) != pages:
            log.warning("no shared window: the update shares %d pages, not %d", len(hpas), pages)
            return None
        return cls(controls.client, runs[0]["gpa"], hpas)

    def write(self, data: bytes) -> dict:
        """Put ``data`` at the buffer's start; the request's ``window`` object."""
        if len(data) > self.size:
            raise ValueError(f"{len(data)} bytes do not fit the {self.size}-byte shared window")
        npages = -(-len(data) // PAGE_SIZE)
        self.client.write_phys_pages(self.hpas[:npages], data.ljust(npages * PAGE_SIZE, b"\0"))
        return {"gpa": self.gpa, "length": len(data)}

    def read(self, spec) -> bytes:
        """The answer the guest left in the buffer (``{"gpa", "length"}`` from its reply)."""
        length = spec.get("length") if isinstance(spec, dict) else None
        if spec.get("gpa") != self.gpa or not isinstance(length, int) or not 0 <= length <= self.size:
            raise ValueError("the guest's reply names no part of the shared window")
        npages = -(-length // PAGE_SIZE)
        return self.client.read_phys_pages(self.hpas[:npages])[:length]


class SessionRelay:
    """Relays session frames for the tenant, through the shared window when it pays."""

    def __init__(self, controls_factory):
        self._controls_factory = controls_factory
        self.window: SharedWindow | None = None
        self._tried = False

    def _window(self) -> SharedWindow | None:
        if not self._tried:
            self._tried = True
            self.window = SharedWindow.establish(self._controls_factory())
        return self.window

    def relay(self, agent, cmd: str, wait: float, args: dict) -> dict:
        """One shared-channel request for the tenant: ``session`` frames through :meth:`call`,
        anything else as it is."""
        if cmd == "session":
            return self.call(agent, wait, args)
        return agent.call(cmd, wait=wait, **args)

    def call(self, agent, wait: float, args: dict) -> dict:
        """One ``session`` request; ``args`` may carry ``bulk``: true (use the window, asking the
        guest for one first if there is none yet) or ``"if-open"`` (use it if there is one)."""
        args = dict(args)
        bulk = args.pop("bulk", False)
        window = self._window() if bulk is True else self.window if bulk == "if-open" else None
        if window is not None:
            frame = base64.b64decode(args.get("frame", ""), validate=True)
            if INLINE_LIMIT <= len(frame) <= window.size:
                args.pop("frame")
                args["window"] = window.write(frame)
            args["reply_window"] = {"gpa": window.gpa}
        answer = agent.call("session", wait=wait, **args)
        if window is not None and "window" in answer:
            answer = {"frame": base64.b64encode(window.read(answer["window"])).decode()}
        return answer
