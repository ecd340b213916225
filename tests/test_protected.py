"""The protected launch end to end, with a real platform daemon, host VMM and guest.

* ``qemu-kd run --json``: attestation verified, measurement equal to the offline
  ``qemu-kd tenant measure``, the command's output from inside the guest.
* Leak test in both polarities: a canary released into guest tmpfs is never in
  anything the host VMM received (host-port replies including every page of
  the domain, the shared channel, the console log, the audit log); with the
  DEBUG policy the debug-read path finds it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from leftovers import orphaned_machine_dirs
from protected import count_hits, protected_domain
from qemu_kd.platform.endpoints.audit import AuditLog
from qemu_kd.hostport.protocol import HostPortRefusedError

pytestmark = pytest.mark.qemu

QEMU_KD = [sys.executable, "-m", "qemu_kd.cli.main"]


def shm_leftovers() -> set[str]:
    return set(orphaned_machine_dirs())


def test_run_json_end_to_end(guest_artifacts, tmp_path):
    before = shm_leftovers()
    run = subprocess.run([*QEMU_KD, "run", "--json", "-q", "--cmd", "echo inside-$((6*7)); id -u"],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout)
    assert out["mode"] == "protected"
    assert out["exec"]["rc"] == 0 and out["exec"]["stdout"].split() == ["inside-42", "0"]
    att = out["attestation"]
    assert att["verified"] is True and att["emulated"] is True
    assert len(bytes.fromhex(att["report_data"])) == 64
    assert out["measurement"] == out["expected_measurement"]
    assert set(out["host_verification"]) == {"hash-kd", "host-forced-exit", "ept-pointer", "verify-ept",
                                             "measurement"}
    assert all(check["ok"] for check in out["host_verification"].values())
    assert out["policy"]["debug"] is False and 1 <= out["keyid"] <= 63
    assert out["boot_to_ready_s"] > 0 and {"seal", "load", "verify", "launch"} <= set(out["timings"])

    # Anyone holding the root can re-verify the attestation offline from the --json alone.
    import base64

    from guest_agent.session import report_data_for
    from qemu_kd.hostport.registry import platform_state_dir

    report, chain = tmp_path / "report.bin", tmp_path / "chain.pem"
    report.write_bytes(base64.b64decode(att["report"]))
    chain.write_text(att["chain_pem"])
    assert att["report_data"] == report_data_for(bytes.fromhex(att["nonce"]),
                                                 bytes.fromhex(att["agent_public_key"])).hex()
    verify = [*QEMU_KD, "tenant", "verify-report", "--report", str(report), "--chain", str(chain),
              "--root", str(platform_state_dir() / "root-ca.crt"), "--measurement", out["measurement"],
              "--policy", "nodebug", "--report-data", att["report_data"], "--allow-emulated"]
    checked = subprocess.run(verify, capture_output=True, text=True, timeout=120)
    assert checked.returncode == 0, checked.stderr
    other = subprocess.run([*verify[:-2], "00" * 64, "--allow-emulated"], capture_output=True, text=True,
                           timeout=120)
    assert other.returncode == 7, other.stderr      # report_data mismatch has its own exit code

    measured = subprocess.run([*QEMU_KD, "tenant", "measure", "--json"], capture_output=True, text=True,
                              timeout=120)
    assert measured.returncode == 0, measured.stderr
    assert json.loads(measured.stdout)["measurement"] == out["measurement"]
    # Nothing left behind: no QEMU RAM files, no platform daemon.
    assert shm_leftovers() <= before


def test_run_human_output_and_missing_kernel(guest_artifacts, tmp_path):
    bad = subprocess.run([*QEMU_KD, "run", "-q", "--kernel", str(tmp_path / "nope"), "--initrd",
                          str(guest_artifacts.initrd)], capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0
    assert bad.stderr.count("\n") == 1 and "does not exist" in bad.stderr and "Traceback" not in bad.stderr


@pytest.fixture(scope="module")
def canary():
    return os.urandom(32)


def host_received(dom) -> list[bytes]:
    """Everything the host VMM can get: every page of its layout through the host port
    (recorded with every other host-port reply and shared-channel byte), the console
    log and the audit log."""
    dom.host_memory_view()
    logs = [Path(dom.endpoints["console_log"]), Path(dom.endpoints["audit_log"])]
    return [*dom.received, *(p.read_bytes() for p in logs if p.exists())]


def plant_and_check(dom, canary: bytes) -> None:
    dom.plant_secret(canary)
    # The canary is in guest memory (checked inside the guest, without echoing it).
    import hashlib

    result = dom.session().exec(["sha256sum", "/run/secrets/canary"])
    assert result["rc"] == 0 and result["stdout"].split()[0].decode() == hashlib.sha256(canary).hexdigest()


def test_canary_never_reaches_the_host(guest_artifacts, tmp_path, canary):
    with protected_domain(tmp_path / "nodebug", guest_artifacts) as dom:
        plant_and_check(dom, canary)
        with pytest.raises(HostPortRefusedError, match="does not allow DEBUG"):
            dom.vmm.client.debug_read(dom.keyid, 0, 4096)
        received = host_received(dom)
        total = sum(len(chunk) for chunk in received)
        assert total > dom.vmm.layout.memory_size     # every page of the domain was read
        assert count_hits(received, canary) == {}
        # The scan finds what is there: the attestation's report_data crossed the shared channel
        # in hex.  The sha256 of the canary, computed in the guest, went inside the session.
        import hashlib

        assert count_hits(received, dom.session().attestation.report.report_data).get("hex")
        assert count_hits(received, hashlib.sha256(canary).digest()) == {}
        records = AuditLog(dom.endpoints["audit_log"]).records()
        assert [(r.endpoint, r.allowed) for r in records] == [("hostport", False)]
        assert dom.vmm.client.domain_status(dom.keyid)["state"] == "LAUNCHED"
        assert dom.vmm.agent.ping()


def test_debug_policy_lets_the_host_find_the_canary(guest_artifacts, tmp_path, canary):
    with protected_domain(tmp_path / "debug", guest_artifacts, debug=True) as dom:
        plant_and_check(dom, canary)
        # The encrypted view still hides it ...
        assert count_hits(host_received(dom), canary) == {}
        # ... the audited debug path finds it.
        plain = dom.debug_memory()
        assert len(plain) == dom.vmm.layout.memory_size
        assert count_hits([plain], canary).get("raw", 0) >= 1
        # Page by page: no guest page reads back through the host port as its plaintext.
        assert dom.pages_in_plaintext() == []
        records = AuditLog(dom.endpoints["audit_log"]).records()
        assert records and all(r.endpoint == "hostport" and r.allowed and r.policy == "debug" for r in records)


def leak_the_first_pages_of_each_read(platform, monkeypatch, count: int = 16) -> None:
    """Plant a partial leak: host-port page reads return the plaintext of the first
    ``count`` private pages of every request, ciphertext for the rest."""
    import numpy as np

    real = platform.read_phys_pages

    def leaky(dpas):
        data = bytearray(real(dpas))
        for i, dpa in enumerate(np.asarray(dpas, dtype=np.uint64)[:count].tolist()):
            for keyid in platform.memory.private_keyids(dpas=[dpa]):
                page = platform.domains[keyid].decrypt_pages(np.array([dpa], dtype=np.uint64))
                data[i * 4096:(i + 1) * 4096] = page
        return bytes(data)

    monkeypatch.setattr(platform, "read_phys_pages", leaky)


def test_a_partial_leak_is_caught_page_by_page(guest_artifacts, tmp_path, monkeypatch, canary):
    with protected_domain(tmp_path / "leaky", guest_artifacts, debug=True, in_process=True) as dom:
        plant_and_check(dom, canary)
        assert dom.pages_in_plaintext() == []
        leak_the_first_pages_of_each_read(dom.platform, monkeypatch)
        leaked = dom.pages_in_plaintext()
        # The first read starts at gpa 0: its first 16 pages are caught, whatever they hold.
        assert leaked[:16] == [i * 4096 for i in range(16)]
        monkeypatch.undo()
        assert dom.pages_in_plaintext() == []


def guest_state_becomes(dom, wanted: str, wait: float = 120.0) -> dict:
    """domain-status once its guest_state is ``wanted`` (or the last one after ``wait`` s)."""
    import time

    deadline = time.monotonic() + wait
    while True:
        status = dom.vmm.client.domain_status(dom.keyid)
        if status["guest_state"] == wanted or time.monotonic() > deadline:
            return status
        time.sleep(0.2)


def listed_by_ls(dom, capsys) -> tuple[dict, str]:
    """This domain as ``qemu-kd ls --json`` lists it, and its line of ``qemu-kd ls``."""
    from qemu_kd.cli.main import main as cli_main

    capsys.readouterr()
    assert cli_main(["ls", "--json"]) == 0
    [listed] = [d for d in json.loads(capsys.readouterr().out)
                if d["platform"]["pid"] == dom.platform_proc.pid and d["keyid"] == dom.keyid]
    assert cli_main(["ls"]) == 0
    [line] = [line for line in capsys.readouterr().out.splitlines()
              if f"{dom.platform_proc.pid}" in line.split()]
    return listed, line


def test_a_guest_that_powers_off_is_halted_and_a_quit_qemu_is_shutoff(guest_artifacts, tmp_path,
                                                                        capsys):
    from qemu.qmp.legacy import QEMUMonitorProtocol

    with protected_domain(tmp_path / "halts", guest_artifacts) as dom:
        status = dom.vmm.client.domain_status(dom.keyid)
        assert (status["state"], status["guest_state"], status["running"]) == ("LAUNCHED", "running",
                                                                               True)
        listed, line = listed_by_ls(dom, capsys)
        assert listed["guest_state"] == "running" and line.split()[2] == "LAUNCHED"
        # Without ACPI the guest's power-off halts its vCPU for good; QEMU stays up.
        res = dom.session().exec(shell="setsid sh -c 'sleep 1; poweroff -f' </dev/null >/dev/null 2>&1 &")
        assert res["rc"] == 0
        status = guest_state_becomes(dom, "halted")
        assert (status["state"], status["guest_state"], status["running"]) == ("LAUNCHED", "halted",
                                                                               False)
        assert status["endpoints"]["qmp"]                        # QEMU is still there
        assert b"System halted" in Path(dom.endpoints["console_log"]).read_bytes()
        listed, line = listed_by_ls(dom, capsys)
        assert (listed["guest_state"], listed["running"]) == ("halted", False)
        assert "LAUNCHED (halted)" in line
        # The host ends QEMU (quit is on its QMP endpoint's allow-list): shut off.
        mon = QEMUMonitorProtocol(dom.endpoints["qmp"])
        mon.connect()
        try:
            mon.cmd("quit")
        except Exception:  # noqa: BLE001 - QEMU may close the connection before it answers
            pass
        finally:
            mon.close()
        status = guest_state_becomes(dom, "shutoff")
        assert (status["guest_state"], status["running"], status["endpoints"]) == ("shutoff", False, {})
        listed, line = listed_by_ls(dom, capsys)
        assert listed["guest_state"] == "shutoff" and "LAUNCHED (shutoff)" in line


def test_a_guest_kernel_panic_is_crashed_and_a_reboot_is_shutoff(guest_artifacts, tmp_path):
    """A panic resets the guest at once (panic=-1) and QEMU ends with status 0, as on a
    reboot: the platform tells the two apart by the panic's last words on the console."""
    for trigger, wanted in (("echo c > /proc/sysrq-trigger", "crashed"), ("reboot -f", "shutoff")):
        with protected_domain(tmp_path / wanted, guest_artifacts) as dom:
            dom.session().exec(shell=f"setsid sh -c 'sleep 1; {trigger}' </dev/null >/dev/null 2>&1 &")
            status = guest_state_becomes(dom, wanted)
            console = Path(dom.endpoints["console_log"]).read_bytes()
            assert (status["guest_state"], status["running"]) == (wanted, False), \
                f"{trigger}: {status}; the console's last lines: {console[-600:]!r}"
            panicked = b"Kernel panic" in console
            assert panicked is (wanted == "crashed")


def qemu_children(pid: int) -> list[int]:
    kids = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            kids += [int(k) for k in (task / "children").read_text().split()]
        except OSError:
            pass
    return [k for k in kids if "qemu-system" in Path(f"/proc/{k}/cmdline").read_bytes().decode(errors="replace")]


def test_qemu_that_dies_gives_clear_errors_and_leaves_nothing(guest_artifacts, tmp_path):
    import signal

    from qemu_kd.common.errors import GuestError
    from qemu_kd.hostport.protocol import HostPortLaunchError

    before = shm_leftovers()
    with protected_domain(tmp_path / "dies", guest_artifacts) as dom:
        (qemu,) = qemu_children(dom.platform_proc.pid)
        os.kill(qemu, signal.SIGKILL)
        with pytest.raises(GuestError, match="shared channel closed|did not answer"):
            dom.vmm.agent.ping(timeout=10)
        import time

        deadline = time.monotonic() + 10      # the socket closes a moment before the process is gone
        while dom.vmm.client.domain_status(dom.keyid)["endpoints"] and time.monotonic() < deadline:
            time.sleep(0.05)
        status = dom.vmm.client.domain_status(dom.keyid)
        assert status["running"] is False and status["endpoints"] == {}
        assert (status["state"], status["guest_state"]) == ("LAUNCHED", "crashed")
        with pytest.raises(HostPortLaunchError, match="is not running.*destroy the domain"):
            dom.vmm.client.exit(dom.keyid)
        # Host reads still work (the shadow stays as it was) and the domain can be destroyed.
        assert len(dom.vmm.client.read_phys_pages(dom.vmm.layout.hpas[:4])) == 4 * 4096
        assert dom.vmm.client.destroy_kd(dom.keyid) > 0
        dom.vmm.layout = None   # already destroyed
    assert shm_leftovers() <= before
