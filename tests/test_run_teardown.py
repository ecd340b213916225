"""Tearing a protected domain down without idle waits (no QEMU: a fake host port).

The host VMM's hypercall responder blocks in next-exit for up to POLL_WAIT
seconds at a time.  Destroying the domain closes its exits, which ends that
wait at once, so destroy must not sit out the poll before it asks for
destroy-kd.
"""

from __future__ import annotations

import threading

import pytest

import host_vmm.hypercalls as hypercalls
import host_vmm.vmm as vmm_module
from qemu_kd.formats.layout import HostLayout
from qemu_kd.hostport.protocol import HostPortNotFoundError

LONG_POLL = 5.0


class FakeHostPort:
    """next-exit waits like the platform's: until its wait ends, or at once once the domain
    is destroyed (its exits closed); afterwards the domain is not found."""

    def __init__(self, *_args, **_kwargs):
        self.destroyed = threading.Event()
        self.waiting = 0                       # next-exit calls blocked right now
        self.waiting_at_destroy: int | None = None
        self._lock = threading.Lock()

    def next_exit(self, keyid: int, after: int = 0, wait: float = 0.0):
        if self.destroyed.is_set():
            raise HostPortNotFoundError(f"no key domain {keyid}")
        with self._lock:
            self.waiting += 1
        try:
            self.destroyed.wait(wait)
        finally:
            with self._lock:
                self.waiting -= 1
        return None

    def destroy_kd(self, keyid: int) -> int:
        with self._lock:
            self.waiting_at_destroy = self.waiting
        self.destroyed.set()
        return 0

    def close(self) -> None:
        pass


@pytest.fixture
def host(monkeypatch):
    port = FakeHostPort()
    monkeypatch.setattr(vmm_module, "HostPortClient", lambda *a, **k: port)
    monkeypatch.setattr(hypercalls, "POLL_WAIT", LONG_POLL)
    vmm = vmm_module.HostVmm("/nonexistent/platform.sock")
    vmm.layout = HostLayout(keyid=3, memory_size=64 << 20, hpas=[], host_data=bytes(32),
                            platform_chain_pem=b"")
    vmm.responder = hypercalls.HypercallResponder(vmm.responder_client_factory, vmm.keyid)
    vmm.responder.start()
    for _ in range(500):                      # until the responder waits in next-exit
        if port.waiting:
            break
        threading.Event().wait(0.01)
    assert port.waiting == 1
    return vmm, port


def test_destroy_asks_for_destroy_kd_while_the_responder_still_polls(host):
    vmm, port = host
    responder = vmm.responder
    vmm.destroy()
    # destroy-kd came while the responder's next-exit was still waiting: destroy did not sit
    # out the poll first ...
    assert port.waiting_at_destroy == 1
    # ... and the responder is stopped and reaped all the same.
    assert not responder.is_alive()
    assert vmm.responder is None


def test_a_responder_told_to_stop_without_waiting_ends_with_its_poll(host):
    vmm, port = host
    responder = vmm.responder
    responder.stop(wait=False)
    assert responder.is_alive() and port.waiting == 1
    port.destroyed.set()
    responder.join(timeout=LONG_POLL + 5)
    assert not responder.is_alive()
