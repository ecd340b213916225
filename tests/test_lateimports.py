"""Modules imported in the background once a process serves (qemu_kd.common.lateimports).

The host VMM process announces that it serves before it imports what only load,
launch and restore need; it imports that once its first request is answered, and
a request that needs it waits for the import.  The platform daemon serves before it
imports what only launch, snapshot-kd and restore-kd use (qemu_kd.platform.daemon.LATER_MODULES);
it imports that once it has answered a request past platform-info, and those requests wait
for the import.
"""

from __future__ import annotations

import subprocess
import sys
import threading
from types import SimpleNamespace

import pytest

from guest_agent.protocol import encode, request
from host_vmm.service import HostVmmService
from host_vmm.vmm import LATER_MODULES
from qemu_kd.common.lateimports import LateImportError, LateImports
from qemu_kd.hostport.client import HostPortClient
from qemu_kd.hostport.protocol import HostPortError
from qemu_kd.platform.daemon import LATER_MODULES as PLATFORM_LATER_MODULES
from qemu_kd.platform.hardware import Platform
from serving import serving


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


# -- the platform daemon --------------------------------------------------------------

MEMORY = 64 << 20


class FakeSnapshots:
    def __init__(self, events: list[str]):
        self.events = events

    def restore(self, path, name, domain_id=None, measurement=None):
        self.events.append(f"restore {path}")
        return SimpleNamespace(keyid=5, name="kd5", endpoints={}, domain_id=b"\1" * 16, version=1)


def test_the_import_starts_after_an_alloc_and_restore_kd_waits_for_it(identity, tmp_path):
    events: list[str] = []
    importer = GatedImports(events)

    def make_snapshots():
        events.append("snapshot service made")
        return FakeSnapshots(events)

    later = LateImports(["some.module"], "the platform", importer)
    with serving(Platform(identity, MEMORY, tmp_path / "p"), snapshots=make_snapshots, later=later) as (path, _), \
            HostPortClient(path, timeout=60) as client:
        client.platform_info()
        assert not importer.entered.is_set()
        client.alloc(npages=4)
        assert importer.entered.wait(60)
        answers: list[dict] = []
        asking = threading.Thread(target=lambda: answers.append(client.restore_kd("/snap.kds")))
        asking.start()
        asking.join(0.2)
        importer.gate.set()
        asking.join(60)
        assert answers and answers[0]["keyid"] == 5
    assert events == ["imported some.module", "snapshot service made", "restore /snap.kds"]


def test_a_failing_background_import_in_the_daemon_is_a_one_line_error_reply(identity, tmp_path):
    def broken(name: str) -> None:
        raise ImportError(f"No module named {name!r}\nsecond line")

    later = LateImports(["qemu_kd.platform.nothing_here"], "the platform", broken)
    with serving(Platform(identity, MEMORY, tmp_path / "p"), later=later) as (path, _), \
            HostPortClient(path, timeout=60) as client:
        client.alloc(npages=4)    # served: it needs none of the modules
        for _ in range(2):        # every launch fails the same way; none hangs
            with pytest.raises(HostPortError) as err:
                client.launch(1)
            assert "\n" not in err.value.message
            assert err.value.message.startswith(
                "the platform could not import qemu_kd.platform.nothing_here: No module named")


def test_the_daemon_serves_before_it_imports_the_later_modules():
    code = ("import sys\n"
            "from qemu_kd.platform.daemon import LATER_MODULES, PlatformDaemon\n"
            "from qemu_kd.platform.hostport_server import HostPortServer\n"
            "from qemu_kd.platform.hardware import Platform\n"
            "import qemu_kd.platform.identity\n"
            "print(sorted(m for m in LATER_MODULES if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.splitlines() == ["[]"]
    assert "qemu_kd.platform.runtime" in PLATFORM_LATER_MODULES and "qemu_kd.platform.snapshot" in PLATFORM_LATER_MODULES
