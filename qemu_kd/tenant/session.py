"""The tenant's end of the attested session with its guest.

The host relays every byte (``attest`` and ``session`` requests on the shared
channel) but can read none of it.  The tenant:

1. sends a fresh nonce; the agent answers with a report whose report_data is
   ``SHA-512(label ‖ len(nonce) ‖ nonce ‖ agent session key)``;
2. verifies the report (signature, chain, measurement, policy, host_data) and
   that report_data binds its nonce and the agent's key;
3. opens the session with a MAC under the tenant authority key, which only it
   and the platform can derive from the key-domain key;
4. checks the agent's key confirmation, then sends requests as numbered,
   encrypted frames (``docs/agent-protocol.md``).

Secrets, commands, files, sealing keys and reports over tenant data travel
only inside the session.
"""

from __future__ import annotations

import base64
import json
import os
from dataclasses import dataclass
from typing import Callable, Generator

from guest_agent.session import SessionError, TenantHandshake, report_data_for

from qemu_kd.channel.exec_job import OnOutput, job_output, run_job, start_args
from qemu_kd.common.errors import GuestError, KdError
from qemu_kd.crypto.authority import tenant_authority_key
from qemu_kd.formats.policy import Policy
from qemu_kd.formats.report import AttestationReport
from qemu_kd.tenant.verify import check_report

#: Sends one shared-channel agent command through the host and returns its result.
Relay = Callable[..., dict]
FILE_CHUNK = 1 << 20
#: A poll answer this large (base64 characters) makes the next polls take the shared buffer.
LARGE_POLL = 64 << 10


class SessionRefused(KdError):
    """The guest or the session refused: binding, handshake or a frame failed its checks."""

    exit_code = 7


class GuestCommandError(KdError):
    """An operation inside the session failed in the guest."""


@dataclass
class Attestation:
    """What the tenant verified, with the raw material for re-verification offline."""

    report: AttestationReport
    report_bytes: bytes
    nonce: bytes
    agent_public: bytes
    chain_pem: bytes


def attest(relay: Relay, *, root_pem: bytes, chain_pem: bytes, measurement: bytes, policy: Policy,
           host_data: bytes | None, allow_emulated: bool = True, nonce: bytes | None = None) -> Attestation:
    """Ask the agent (through the host) for a report over a fresh nonce, and verify it fully."""
    nonce = os.urandom(32) if nonce is None else nonce
    answer = relay("attest", nonce=nonce.hex())
    try:
        report_bytes = base64.b64decode(answer["report"], validate=True)
        agent_public = bytes.fromhex(answer["public_key"])
    except (KeyError, TypeError, ValueError):
        raise SessionRefused("the attestation answer is malformed",
                             "the host or the guest altered it") from None
    report = check_report(report_bytes, root_pem, chain_pem, measurement=measurement, policy=policy,
                          report_data=report_data_for(nonce, agent_public), host_data=host_data,
                          allow_emulated=allow_emulated)
    return Attestation(report, report_bytes, nonce, agent_public, chain_pem)


class TenantSession:
    """An open session: each call is one encrypted request and one encrypted answer."""

    def __init__(self, relay: Relay, attestation: Attestation, domain_key: bytes):
        self._relay = relay
        self.attestation = attestation
        self._large_output = False      # a command's output ran large: polls ask for the buffer
        handshake = TenantHandshake(attestation.report.report_data, attestation.agent_public,
                                    tenant_authority_key(domain_key))
        reply = self._frame(handshake.open_frame(), wait=30.0)
        try:
            self._channel = handshake.finish(reply)
        except SessionError as exc:
            raise SessionRefused(f"the guest did not confirm the session: {exc}") from None

    def _frame(self, frame: bytes, wait: float, bulk: bool | str = False) -> bytes:
        # ``bulk`` lets the host move the frame through a shared buffer instead of the serial
        # line (host_vmm.window), ``"if-open"`` only through one it already has: the frame is
        # the same ciphertext either way.
        extra = {"bulk": bulk} if bulk else {}
        try:
            answer = self._relay("session", wait=wait, frame=base64.b64encode(frame).decode(), **extra)
        except GuestError as exc:
            raise SessionRefused(f"the guest refused a session frame: {exc.message}",
                                 "the frame was altered, replayed or dropped on the way; "
                                 "attest and open a new session") from None
        try:
            return base64.b64decode(answer["frame"], validate=True)
        except (KeyError, TypeError, ValueError):
            raise SessionRefused("the session answer is malformed") from None

    def call(self, op: str, wait: float = 60.0, *, bulk: bool | str = False, **args) -> dict:
        request = json.dumps({"op": op, **args}, separators=(",", ":")).encode()
        reply = self._frame(self._channel.seal(request), wait, bulk)
        try:
            answer = json.loads(self._channel.open(reply))
        except SessionError as exc:
            raise SessionRefused(f"the guest's answer does not open: {exc}") from None
        if not answer.get("ok"):
            raise GuestCommandError(f"guest refused {op}: {answer.get('error')}")
        return answer.get("result", {})

    # -- operations -------------------------------------------------------------
    def exec(self, argv: list[str] | None = None, *, shell: str | None = None, stdin: bytes = b"",
             timeout: float | None = None, env: dict[str, str] | None = None) -> dict:
        """Run a command; rc, stdout and stderr (bytes), timed_out and truncated."""
        args: dict = {"stdin": base64.b64encode(stdin).decode()}
        if argv is not None:
            args["argv"] = list(argv)
        if shell is not None:
            args["shell"] = shell
        if timeout is not None:
            args["timeout"] = timeout
        if env:
            args["env"] = dict(env)
        wait = (timeout + 30.0) if timeout is not None else 24 * 3600.0
        result = self.call("exec", wait=wait, **args)
        result["stdout"] = base64.b64decode(result.get("stdout", ""))
        result["stderr"] = base64.b64decode(result.get("stderr", ""))
        return result

    def exec_stream(self, argv: list[str] | None = None, *, shell: str | None = None, stdin: bytes = b"",
                    timeout: float | None = None, env: dict[str, str] | None = None,
                    on_output: OnOutput | None = None) -> dict:
        """Run a command as a background job in the guest (``exec_start``, ``exec_poll``),
        passing its output to ``on_output(stream, data)`` as it arrives; the result as
        :meth:`exec` gives it.  The agent serves other requests while the command runs."""
        return run_job(self._job_call, start_args(argv, shell=shell, stdin=stdin, timeout=timeout, env=env),
                       on_output)

    def exec_output(self, argv: list[str] | None = None, *, shell: str | None = None, stdin: bytes = b"",
                    timeout: float | None = None,
                    env: dict[str, str] | None = None) -> Generator[tuple[str, bytes], None, dict]:
        """The output of a background job as ``(stream, data)`` pieces while it runs; the
        generator returns ``rc``, ``timed_out`` and ``truncated``.  Closing it early kills the job."""
        return job_output(self._job_call, start_args(argv, shell=shell, stdin=stdin, timeout=timeout, env=env))

    def _job_call(self, op: str, wait: float = 60.0, **args) -> dict:
        # A poll's answer (up to 256 KiB a stream) takes the shared buffer when one is open;
        # once a command's output runs large, the next polls ask for one.
        if op != "exec_poll":
            return self.call(op, wait, **args)
        answer = self.call(op, wait, bulk=True if self._large_output else "if-open", **args)
        if len(answer.get("stdout", "")) + len(answer.get("stderr", "")) >= LARGE_POLL:
            self._large_output = True
        return answer

    def put_file(self, path: str, data: bytes, mode: int = 0o644) -> int:
        for start in range(0, max(len(data), 1), FILE_CHUNK):
            chunk = data[start:start + FILE_CHUNK]
            self.call("put_file", wait=120.0, bulk=True, path=path, data=base64.b64encode(chunk).decode(), mode=mode,
                      append=start > 0)
        return len(data)

    def get_file(self, path: str) -> bytes:
        out = bytearray()
        while True:
            result = self.call("get_file", wait=120.0, bulk=True, path=path, offset=len(out), length=FILE_CHUNK)
            chunk = base64.b64decode(result["data"])
            out += chunk
            if not chunk or len(out) >= result["size"]:
                return bytes(out)

    def put_secret(self, path: str, secret: bytes) -> int:
        return self.call("put_secret", path=path, secret=base64.b64encode(secret).decode())["written"]

    def derive_key(self, label: str) -> bytes:
        return bytes.fromhex(self.call("derive_key", label=label)["key"])

    def report(self, report_data: bytes) -> bytes:
        """A report over tenant-chosen report_data (64 bytes), raw."""
        return base64.b64decode(self.call("report", report_data=report_data.hex())["report"])

    def ping(self) -> dict:
        return self.call("ping")
