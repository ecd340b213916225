"""The host VMM as its own process, driven over a Unix socket.

``python -m host_vmm --platform PLATFORM_SOCKET --api API_SOCKET [--wait-platform S]``
connects to the platform's host port (waiting up to S seconds for its socket to
appear, for a host VMM started together with its platform daemon) and serves
newline-delimited JSON requests (the same framing as the guest agent's
protocol) from one caller at a time:

==========  ===========================================  =========================
command     arguments                                    result
==========  ===========================================  =========================
allocate    memory_size, host_data (hex, optional)       layout (JSON text)
load        bundle (path of the bundle file)             {}
verify      —                                            checks: [{name, ok, detail}]
launch      ready_timeout, name (optional)               endpoints, checks, ready, name
restore     path, ready_timeout, name, domain_id,        keyid, name, endpoints,
            measurement (the last three optional;        domain_id, version, timings
            the ids hex)
agent       agent_cmd, args, wait                        the guest agent's result
status      —                                            domain status from the platform
detach      —                                            {} (domain left running; service ends)
destroy     —                                            {}
==========  ===========================================  =========================

``restore`` takes the place of allocate, load, verify and launch: the platform
reads and checks the snapshot file (``restore-kd``, docs/snapshots.md), and the
restored domain is then served as a launched one (agent relay, shared window,
hypercall responder, controls, detach, destroy).

It prints ``ready`` on stdout once it serves.  Errors come back as error
replies carrying the one-line message; the process keeps serving.

What only load, launch and restore need (bundle reading, the hypercall
responder: ``host_vmm.vmm.LATER_MODULES``) is imported in a background thread
once the first request has been answered, while the tenant seals; a request
that needs it waits for that import, and a module that fails to import is an
error reply naming it.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import sys
import time

from guest_agent.protocol import ProtocolError, decode, encode, error, reply
from qemu_kd.common.errors import KdError
from qemu_kd.common.lateimports import LateImports
from qemu_kd.common.log import configure as configure_logging

from .vmm import LATER_MODULES, HostVmm

log = logging.getLogger(__name__)


#: The requests that may use :data:`host_vmm.vmm.LATER_MODULES`.
NEEDS_LATER = frozenset({"load", "verify", "launch", "restore", "agent"})


class HostVmmService:
    def __init__(self, vmm: HostVmm, later: LateImports | None = None):
        self.vmm = vmm
        self.later = later if later is not None else LateImports(LATER_MODULES, "the host VMM")
        self.done = False

    def do_allocate(self, req: dict) -> dict:
        host_data = bytes.fromhex(req.get("host_data", "00" * 32))
        layout = self.vmm.allocate(int(req["memory_size"]), host_data)
        return {"layout": layout.pack().decode(), "keyid": layout.keyid}

    def do_load(self, req: dict) -> dict:
        self.vmm.load_file(req["bundle"])
        return {}

    def do_verify(self, req: dict) -> dict:
        return {"checks": [c.as_dict() for c in self.vmm.verify()]}

    def do_launch(self, req: dict) -> dict:
        name = req.get("name")
        endpoints = self.vmm.launch(float(req.get("ready_timeout", 120)),
                                    name=None if name is None else str(name))
        status = self.vmm.client.domain_status(self.vmm.keyid)
        return {"endpoints": endpoints, "checks": [c.as_dict() for c in self.vmm.checks],
                "ready": self.vmm.agent.ready, "timings": self.vmm.timings,
                "name": status.get("name")}

    def do_restore(self, req: dict) -> dict:
        name = req.get("name")
        domain_id, measurement = req.get("domain_id"), req.get("measurement")
        restored = self.vmm.restore(str(req["path"]), float(req.get("ready_timeout", 120)),
                                    name=None if name is None else str(name),
                                    domain_id=None if domain_id is None else bytes.fromhex(domain_id),
                                    measurement=None if measurement is None else bytes.fromhex(measurement))
        return {"keyid": restored["keyid"], "name": restored["name"], "endpoints": restored["endpoints"],
                "domain_id": restored["domain_id"], "version": restored["version"],
                "timings": self.vmm.timings}

    def do_agent(self, req: dict) -> dict:
        return self.vmm.relay(str(req["agent_cmd"]), float(req.get("wait", 60)), req.get("args") or {})

    def do_status(self, req: dict) -> dict:
        return self.vmm.client.domain_status(self.vmm.keyid)

    def do_detach(self, req: dict) -> dict:
        """Let go of the domain and leave it running on the platform; the service then ends."""
        self.vmm.detach()
        self.done = True
        return {}

    def do_destroy(self, req: dict) -> dict:
        self.vmm.destroy()
        self.done = True
        return {}

    def answer(self, line: bytes) -> dict:
        try:
            req = decode(line)
        except ProtocolError as exc:
            log.info("malformed request: %s", exc)
            return error(None, f"malformed request: {exc}")
        rid, cmd = req.get("id"), req.get("cmd")
        handler = getattr(self, f"do_{cmd}", None) if isinstance(cmd, str) else None
        if handler is None:
            log.info("unknown command %r", cmd)
            return error(rid, f"unknown host VMM command {cmd!r}")
        log.debug("request %s (id %s)", cmd, rid)
        try:
            if cmd in NEEDS_LATER:
                self.later.wait()
            return reply(rid, handler(req))
        except KdError as exc:
            log.info("%s failed: %s", cmd, exc)
            return error(rid, str(exc))
        except (KeyError, ValueError, TypeError) as exc:
            log.info("bad %s request: %s", cmd, exc)
            return error(rid, f"bad {cmd} request: {exc}")

    def serve(self, listener: socket.socket) -> None:
        while not self.done:
            conn, _ = listener.accept()
            with conn:
                buf = bytearray()
                while not self.done:
                    chunk = conn.recv(65536)
                    if not chunk:
                        break
                    buf += chunk
                    while (nl := buf.find(b"\n")) >= 0:
                        line = bytes(buf[:nl])
                        del buf[:nl + 1]
                        if line.strip():
                            conn.sendall(encode(self.answer(line)))
                            # The first answer (an allocate) is out: the rest loads meanwhile.
                            self.later.start()


def wait_for_socket(path: str, seconds: float) -> None:
    """Return once ``path`` exists, or after ``seconds`` (connecting then says what is wrong)."""
    deadline = time.monotonic() + seconds
    while not os.path.exists(path) and time.monotonic() < deadline:
        time.sleep(0.01)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m host_vmm",
                                 description="the untrusted host VMM as a process")
    ap.add_argument("--platform", required=True, help="the platform's host-port socket")
    ap.add_argument("--api", required=True, help="Unix socket to serve requests on")
    ap.add_argument("--wait-platform", type=float, default=0.0, metavar="SECONDS",
                    help="wait up to SECONDS for the platform's socket to appear (a host VMM "
                         "started together with its platform daemon)")
    args = ap.parse_args(argv)
    configure_logging(logging.WARNING)
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt))
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    vmm = None
    try:
        wait_for_socket(args.platform, args.wait_platform)
        vmm = HostVmm(args.platform)
        listener.bind(args.api)
        os.chmod(args.api, 0o600)
        listener.listen(1)
        log.info("serving on %s for the platform at %s", args.api, args.platform)
        # Machine-readable (host_vmm.process waits for it): a plain line on stdout.
        print("ready", flush=True)
        HostVmmService(vmm).serve(listener)
    except KdError as exc:
        print(f"host-vmm: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except OSError as exc:
        print(f"host-vmm: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        pass
    finally:
        listener.close()
        try:
            os.unlink(args.api)
        except OSError:
            pass
        if vmm is not None and vmm.holds_domain:
            try:
                vmm.destroy()
            except KdError as exc:
                log.warning("could not destroy the domain on exit: %s", exc)
    return 0
