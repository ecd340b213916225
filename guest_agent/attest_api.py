"""Attestation for programs in the guest: reports over their own data, and sealing keys.

The in-guest counterpart of ``/dev/sev-guest`` (or configfs-tsm) with
``snpguest report``: a program asks the agent on its local socket
(:mod:`guest_agent.local_api`, root only), the agent asks the platform on the
guest port, and the program gets the signed report and the platform's
certificate chain, which it hands to whoever checks it (for the tenant:
``qemu-kd tenant verify-report``).  The host never sees these requests.

Library use::

    from guest_agent.attest_api import derive_key, get_report
    got = get_report(nonce)          # 1..64 bytes, zero-padded to 64
    got.report, got.chain_pem        # 352 bytes; PEM
    key = derive_key("disk")         # 32 bytes, stable for this image, policy and platform

Commands::

    kd-report --report-data HEX [--out FILE] [--chain-out FILE] [--json]
    kd-derive-key LABEL [--out FILE]

See docs/agent-protocol.md, "In-guest attestation API".
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import sys
from dataclasses import dataclass

from .local_api import AGENT_SOCKET, LocalApiError, ask

REPORT_DATA_SIZE = 64
REPORT_SIZE = 352
KEY_SIZE = 32
MAX_LABEL = 256
TIMEOUT = 60.0


class AttestationFailed(LocalApiError):
    """The agent or the platform refused, or the agent could not be reached."""


@dataclass(frozen=True)
class GuestReport:
    """What ``report`` returns: the signed report, its report_data and the certificate chain."""
    report: bytes           # 352 bytes, signed by the platform (docs/formats.md §8)
    report_data: bytes      # the 64 bytes the report carries
    chain_pem: bytes        # the platform's certificate chain, leaf first

    def to_json(self) -> dict:
        return {"report": base64.b64encode(self.report).decode(), "report_data": self.report_data.hex(),
                "chain_pem": self.chain_pem.decode()}


def pad_report_data(data: bytes) -> bytes:
    """``data`` zero-padded to 64 bytes (as ``qemu-kd tenant verify-report`` pads its expected value)."""
    if not isinstance(data, (bytes, bytearray)) or not 0 < len(data) <= REPORT_DATA_SIZE:
        raise ValueError(f"report_data must be 1..{REPORT_DATA_SIZE} bytes")
    return bytes(data).ljust(REPORT_DATA_SIZE, b"\0")


def get_report(report_data: bytes, socket_path: str = AGENT_SOCKET) -> GuestReport:
    """A report over ``report_data`` (1..64 bytes, zero-padded) from the platform."""
    data = pad_report_data(report_data)
    result = ask({"op": "report", "report_data": data.hex()}, TIMEOUT, socket_path, AttestationFailed)
    try:
        report = base64.b64decode(result["report"], validate=True)
        chain = result["chain_pem"].encode()
    except (KeyError, TypeError, ValueError, AttributeError):
        raise AttestationFailed("the agent's report answer is malformed") from None
    if len(report) != REPORT_SIZE:
        raise AttestationFailed(f"the report is {len(report)} bytes, expected {REPORT_SIZE}")
    return GuestReport(report, data, chain)


def derive_key(label: str, socket_path: str = AGENT_SOCKET) -> bytes:
    """The platform's 32-byte sealing key for this image and policy, under ``label``."""
    if not isinstance(label, str) or len(label) > MAX_LABEL:
        raise ValueError(f"the label must be a string of at most {MAX_LABEL} characters")
    result = ask({"op": "derive-key", "label": label}, TIMEOUT, socket_path, AttestationFailed)
    try:
        key = bytes.fromhex(result["key"])
    except (KeyError, TypeError, ValueError):
        raise AttestationFailed("the agent's key answer is malformed") from None
    if len(key) != KEY_SIZE:
        raise AttestationFailed(f"the key is {len(key)} bytes, expected {KEY_SIZE}")
    return key


def _write(path: str, data: bytes, mode: int = 0o644) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _hex(text: str) -> bytes:
    try:
        return bytes.fromhex(text.strip().removeprefix("0x"))
    except ValueError:
        raise ValueError(f"--report-data {text!r} is not hexadecimal") from None


def report_main(argv: list[str] | None = None, socket_path: str = AGENT_SOCKET) -> int:
    parser = argparse.ArgumentParser(
        prog="kd-report", description="get an attestation report over your own report_data")
    parser.add_argument("--report-data", required=True, metavar="HEX",
                        help=f"1..{REPORT_DATA_SIZE} bytes as hex, zero-padded to {REPORT_DATA_SIZE}")
    parser.add_argument("--out", help="write the report (352 bytes, binary) here")
    parser.add_argument("--chain-out", help="write the platform certificate chain (PEM) here")
    parser.add_argument("--json", action="store_true",
                        help="print report (base64), report_data (hex) and chain_pem as one JSON object")
    args = parser.parse_args(argv)
    try:
        got = get_report(_hex(args.report_data), socket_path)
        if args.out:
            _write(args.out, got.report)
        if args.chain_out:
            _write(args.chain_out, got.chain_pem)
    except (ValueError, OSError, LocalApiError) as exc:
        print(f"kd-report: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(got.to_json(), sort_keys=True))
    elif not args.out:
        print(got.report.hex())
    return 0


def derive_key_main(argv: list[str] | None = None, socket_path: str = AGENT_SOCKET) -> int:
    parser = argparse.ArgumentParser(prog="kd-derive-key", description="derive a sealing key")
    parser.add_argument("label", help=f"what the key is for (at most {MAX_LABEL} characters)")
    parser.add_argument("--out", help="write the 32-byte key here (mode 0600) instead of printing it as hex")
    args = parser.parse_args(argv)
    try:
        key = derive_key(args.label, socket_path)
        if args.out:
            _write(args.out, key, 0o600)
    except (ValueError, OSError, LocalApiError) as exc:
        print(f"kd-derive-key: {exc}", file=sys.stderr)
        return 1
    if not args.out:
        print(key.hex())
    return 0


COMMANDS = {"report": report_main, "derive-key": derive_key_main}


def main(argv: list[str] | None = None) -> int:
    """``python3 -m guest_agent.attest_api report|derive-key ARGS...`` (the guest commands' entry)."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS:
        print(f"usage: python3 -m guest_agent.attest_api {{{','.join(COMMANDS)}}} ...", file=sys.stderr)
        return 2
    return COMMANDS[argv[0]](argv[1:])


if __name__ == "__main__":
    sys.exit(main())
