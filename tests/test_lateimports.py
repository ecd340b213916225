"""Modules imported in the background once a process serves (qemu_kd.common.lateimports).

The host VMM process announces that it serves before it imports what only load,
launch and restore need; it imports that once its first request is answered, and
a request that needs it waits for the import.
"""

from __future__ import annotations

import subprocess
import sys
import threading

import pytest

from guest_agent.protocol import encode, request
from host_vmm.service import HostVmmService
from host_vmm.vmm import LATER_MODULES
from qemu_kd.common.lateimports import LateImportError, LateImports


class GatedImports:
    """An importer that blocks until the test opens the gate, recording what happens."""

    def __init__(self, events: list[str]):
        self.events = events
        self.entered = threading.Event()
        self.gate = threading.Event()

    def __call__(self, name: str) -> None:
        self.entered.set()
        assert self.gate.wait(60)
        self.events.append(f"imported {name}")


class FakeVmm:
    def __init__(self, events: list[str]):
        self.events = events

    def load_file(self, path: str) -> None:
        self.events.append(f"load {path}")


def ask(service: HostVmmService, cmd: str, **args) -> dict:
    return service.answer(encode(request(1, cmd, **args)).strip())


def test_a_request_that_arrives_during_the_import_waits_for_it():
    events: list[str] = []
    importer = GatedImports(events)
    service = HostVmmService(FakeVmm(events), LateImports(["some.module"], "the host VMM", importer))
    service.later.start()
    assert importer.entered.wait(60)
    answers: list[dict] = []
    asking = threading.Thread(target=lambda: answers.append(ask(service, "load", bundle="/b.kd")))
    asking.start()
    asking.join(0.2)
    importer.gate.set()
    asking.join(60)
    assert answers == [{"id": 1, "ok": True, "result": {}}]
    assert events == ["imported some.module", "load /b.kd"]


def test_a_failing_background_import_is_a_one_line_error_reply():
    def broken(name: str) -> None:
        raise ImportError(f"No module named {name!r}\nsecond line")

    service = HostVmmService(FakeVmm([]), LateImports(["qemu_kd.nothing_here"], "the host VMM", broken))
    answer = ask(service, "load", bundle="/b.kd")
    assert answer["ok"] is False
    message = answer["error"]
    assert "\n" not in message
    assert message.startswith("the host VMM could not import qemu_kd.nothing_here: No module named")
    # Every later request that needs the modules fails the same way; none hangs.
    assert ask(service, "verify")["error"] == message


def test_wait_raises_for_a_module_that_is_not_there():
    later = LateImports(["qemu_kd.common.errors", "qemu_kd.no_such_module_here"], "the platform")
    with pytest.raises(LateImportError, match=r"^the platform could not import qemu_kd\.no_such_module_here"):
        later.wait()
    later.start()   # once: nothing starts again
    with pytest.raises(LateImportError):
        later.wait()


def test_the_host_vmm_serves_before_it_imports_the_later_modules():
    code = ("import sys, host_vmm.service as s\n"
            "from host_vmm.vmm import LATER_MODULES\n"
            "print(sorted(m for m in LATER_MODULES if m in sys.modules))\n"
            "s.HostVmmService(None).later.wait()\n"
            "print(sorted(m for m in LATER_MODULES if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.splitlines() == ["[]", str(sorted(LATER_MODULES))]
