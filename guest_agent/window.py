"""Bulk data through a buffer the guest shares with the host (docs/agent-protocol.md, "Bulk window").

The serial shared channel moves about 0.1 MB/s into the guest, which is fine
for requests and far too slow for files.  So the host may ask the guest to
share a buffer of the guest's choosing:

* on a protected guest, with the control request ``share`` (the guest picks
  and locks the pages, the platform seals the change, the host installs it);
* on an unprotected guest, with the host command ``window`` (the host owns
  that guest's memory anyway).

A request may then name the buffer instead of carrying its bytes inline:
``{"window": {"gpa": G, "length": N}}`` says the payload is the first N bytes
of the buffer whose first page is at gpa G.  A request that carries
``"reply_window": {"gpa": G}`` lets the agent put a large answer there too;
its reply then holds ``{"window": {"gpa": G, "length": N}}``.

What the buffer holds is host-visible by design.  On a protected guest only
tenant-session frames go through it (ciphertext the host cannot open or
alter unnoticed), and the agent copies a frame out of the buffer before it
checks it, so a host that rewrites the buffer meanwhile only makes the check
fail.
"""

from __future__ import annotations

import ctypes

from .controls import PAGE, Region, pinning_libc, runs

#: Largest buffer an unprotected guest's host may ask for (pages).
MAX_WINDOW_PAGES = 1024
#: Answers smaller than this stay inline on the serial line.
INLINE_LIMIT = 4096


def _gpa(spec, what: str) -> int:
    gpa = spec.get("gpa") if isinstance(spec, dict) else None
    if not isinstance(gpa, int) or isinstance(gpa, bool) or gpa < 0:
        raise ValueError(f"'{what}' must be an object with 'gpa' (the buffer's first page)")
    return gpa


def find(regions: list[Region], spec, what: str = "window") -> Region:
    """The shared buffer a request names (by its first page)."""
    gpa = _gpa(spec, what)
    for region in regions:
        if region.gpas and region.gpas[0] == gpa and all(region.live):
            return region
    raise ValueError(f"no buffer shared with the host starts at gpa {gpa:#x}")


def read(regions: list[Region], spec) -> bytes:
    """A copy of the payload a request names: ``{"gpa": G, "length": N}``."""
    region = find(regions, spec)
    length = spec.get("length")
    if not isinstance(length, int) or isinstance(length, bool) or not 0 <= length <= region.npages * PAGE:
        raise ValueError(f"the window's 'length' must be 0 to {region.npages * PAGE} bytes")
    return ctypes.string_at(region.addr, length)


def answer(regions: list[Region], spec, data: bytes) -> dict | None:
    """Put ``data`` into the buffer ``spec`` names and return the reply's ``window`` object; None
    (answer inline) when there is no such buffer, it is too small, or ``data`` is small."""
    if spec is None or len(data) < INLINE_LIMIT:
        return None
    try:
        region = find(regions, spec, "reply_window")
    except ValueError:
        return None
    if len(data) > region.npages * PAGE:
        return None
    ctypes.memmove(region.addr, data, len(data))
    return {"gpa": region.gpas[0], "length": len(data)}


class PlainWindows:
    """The buffers an unprotected guest's host asked for (host command ``window``)."""

    def __init__(self):
        self.regions: list[Region] = []
        self._libc = None

    def open(self, req: dict) -> dict:
        """A new buffer of ``pages`` pages; its frames in order, as runs ``[gpa, count]``."""
        pages = req.get("pages")
        if not isinstance(pages, int) or isinstance(pages, bool) or not 0 < pages <= MAX_WINDOW_PAGES:
            raise ValueError(f"window needs 'pages': 1 to {MAX_WINDOW_PAGES}")
        if sum(r.npages for r in self.regions) + pages > MAX_WINDOW_PAGES:
            raise ValueError(f"more than {MAX_WINDOW_PAGES} pages would be shared")
        if self._libc is None:
            self._libc = pinning_libc()
        region = Region(self._libc, pages)
        ctypes.memset(region.addr, 0, pages * PAGE)
        self.regions.append(region)
        return {"gpa": region.gpas[0], "pages": pages, "runs": [r[1:] for r in runs("window", region.gpas)]}

