"""Files in and out of an unprotected guest through a buffer it shares with the host.

An unprotected (plain) guest's memory is the host's to read anyway, so its
agent serves the host command ``window``: it locks a buffer of its choosing
and names its pages.  The host then reads and writes those pages straight in
guest RAM (the memory file QEMU maps), and the agent's ``put_file`` and
``get_file`` name the buffer instead of carrying the bytes on the serial line
(docs/agent-protocol.md, "Bulk window").  A protected guest never serves
this: its files travel inside the tenant session (host_vmm.window).
"""

from __future__ import annotations

import base64

from qemu_kd.common.errors import GuestError

PAGE_SIZE = 4096
#: The buffer's size in pages (2 MiB).
WINDOW_PAGES = 512


class RamWindow:
    """A guest-locked buffer, reached by the host through guest RAM."""

    def __init__(self, agent, ram, pages: int = WINDOW_PAGES):
        answer = agent.call("window", pages=pages)
        try:
            self.gpas = [gpa + i * PAGE_SIZE for gpa, count in answer["runs"] for i in range(count)]
            self.gpa = int(answer["gpa"])
        except (KeyError, TypeError, ValueError):
            raise GuestError("the guest's window answer is malformed") from None
        if len(self.gpas) != pages or self.gpas[0] != self.gpa or \
                any(g < 0 or g + PAGE_SIZE > len(ram) for g in self.gpas):
            raise GuestError("the guest's window names pages outside its memory")
        self.agent, self.ram = agent, ram

    @property
    def size(self) -> int:
        return len(self.gpas) * PAGE_SIZE

    def _write(self, data: bytes) -> dict:
        for i in range(0, len(data), PAGE_SIZE):
            gpa = self.gpas[i // PAGE_SIZE]
            piece = data[i:i + PAGE_SIZE]
            self.ram[gpa:gpa + len(piece)] = piece
        return {"gpa": self.gpa, "length": len(data)}

    def _read(self, spec) -> bytes:
        length = spec.get("length") if isinstance(spec, dict) else None
        if not isinstance(length, int) or not 0 <= length <= self.size:
            raise GuestError("the guest's reply names no part of the window")
        return b"".join(self.ram[g:g + PAGE_SIZE] for g in self.gpas[:-(-length // PAGE_SIZE)])[:length]

    def put_file(self, path: str, data: bytes, mode: int) -> None:
        for start in range(0, max(len(data), 1), self.size):
            self.agent.call("put_file", wait=120.0, path=path, mode=mode, append=start > 0,
                            window=self._write(data[start:start + self.size]))

    def get_file(self, path: str) -> bytes:
        out = bytearray()
        while True:
            result = self.agent.call("get_file", wait=120.0, path=path, offset=len(out),
                                     length=self.size, reply_window={"gpa": self.gpa})
            chunk = self._read(result["window"]) if "window" in result else \
                base64.b64decode(result.get("data", ""))
            out += chunk
            if not chunk or len(out) >= result.get("size", 0):
                return bytes(out)
