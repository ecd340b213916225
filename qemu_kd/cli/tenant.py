"""``qemu-kd tenant``: measure, seal and verify-report from the command line.

:func:`add_tenant_parser` registers the ``tenant`` command on the main
``qemu-kd`` parser; :func:`main` runs it stand-alone.  Errors print one line
on stderr and exit with the error's code; ``verify-report`` exits with one
code per failure class (see :data:`EXIT_CODES` and docs/tenant.md).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from qemu_kd.cli.args import add_expose_option, guest_memory
from qemu_kd.common.errors import ConfigError, KdError

EXIT_OK = 0
EXIT_CODES = {
    "usage": 2,
    "signature": 3,
    "chain": 4,
    "measurement": 5,
    "policy": 6,
    "report_data": 7,
    "host_data": 8,
    "emulated": 9,
}


# ------------------------------------------------------------- arguments

def _read_file(path: str | Path, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{what} {path} does not exist", f"check the path given for the {what}") from None
    except IsADirectoryError:
        raise ConfigError(f"{what} {path} is a directory, not a file") from None
    except OSError as exc:
        raise ConfigError(f"cannot read {what} {path}: {exc.strerror}") from None


def _parsed(unpack, path: str, what: str):
    """Read a file (missing or unreadable: usage error) and parse it, naming the file on errors."""
    from qemu_kd.formats.errors import FormatError

    data = _read_file(path, what)
    try:
        return unpack(data)
    except FormatError as exc:
        raise type(exc)(f"{path}: {exc.message}", exc.hint) from None


def _hex_arg(text: str | None, what: str, *, exact: int | None = None, at_most: int | None = None) -> bytes | None:
    if text is None:
        return None
    try:
        value = bytes.fromhex(text.strip().removeprefix("0x"))
    except ValueError:
        raise ConfigError(f"{what} {text!r} is not hexadecimal", "give the bytes as hex digits") from None
    if exact is not None and len(value) != exact:
        raise ConfigError(f"{what} is {len(value)} bytes, expected {exact} ({2 * exact} hex digits)")
    if at_most is not None and len(value) > at_most:
        raise ConfigError(f"{what} is {len(value)} bytes, at most {at_most} allowed")
    return value


def parse_policy(text: str):
    """``debug``, ``nodebug``/``no-debug`` or the packed policy as 16 hex digits."""
    from qemu_kd.formats.errors import FormatError
    from qemu_kd.formats.policy import Policy

    word = text.strip().lower()
    if word == "debug":
        return Policy.make(debug=True)
    if word in ("nodebug", "no-debug"):
        return Policy.make(debug=False)
    raw = _hex_arg(text, "--policy", exact=8)
    try:
        return Policy.unpack(raw)
    except FormatError as exc:
        raise ConfigError(f"--policy {text}: {exc.message}", "use debug, nodebug or 16 hex digits") from None


def _read_report(path: str) -> bytes:
    """The report file's bytes; empty, truncated or oversized is a usage error (exit 2):
    the file is not a report, so there is no signature to check."""
    from qemu_kd.formats.report import REPORT_SIZE

    data = _read_file(path, "report")
    if len(data) != REPORT_SIZE:
        what = "empty" if not data else f"{len(data)} bytes"
        raise ConfigError(f"report {path} is {what}, not an attestation report ({REPORT_SIZE} bytes)",
                          "pass the raw report, e.g. base64-decoded from run --json")
    return data


def _read_root(path: str):
    from cryptography import x509

    data = _read_file(path, "root certificate")
    try:
        return x509.load_pem_x509_certificate(data)
    except ValueError:
        raise ConfigError(f"root certificate {path} is not a PEM X.509 certificate",
                          "pass the emulated manufacturer's root-ca.crt") from None


def _guest_inputs(args: argparse.Namespace) -> tuple[bytes, bytes, str]:
    """Kernel, initrd and cmdline from the options, defaulting to the built guest."""
    from qemu_kd.cli.guest_files import additions_from_args

    kernel_path, initrd_path = args.kernel, args.initrd
    additions = additions_from_args(args)
    if kernel_path is None or initrd_path is None:
        from qemu_kd.guest.additions import ensure_custom_guest
        from qemu_kd.guest.cache import ensure_guest

        art = ensure_custom_guest(additions) if additions else ensure_guest()
        kernel_path = kernel_path or art.kernel
        initrd_path = initrd_path or art.initrd
        _note(f"guest: kernel {kernel_path}, initrd {initrd_path}")
    cmdline = args.cmdline
    if cmdline is None:
        from qemu_kd.qemu.launch import full_cmdline

        cmdline = full_cmdline()
    _note(f"cmdline: {cmdline}")
    return _read_file(kernel_path, "kernel"), _read_file(initrd_path, "initrd"), cmdline


def _note(message: str) -> None:
    print(f"[qemu-kd tenant] {message}", file=sys.stderr, flush=True)


def _policy_from_debug(args: argparse.Namespace):
    from qemu_kd.formats.policy import Policy

    return Policy.make(debug=args.debug)


# -------------------------------------------------------------- commands

def _cmd_measure(args: argparse.Namespace) -> int:
    from qemu_kd.tenant.measure import measure

    memory_size = args.mem
    kernel, initrd, cmdline = _guest_inputs(args)
    policy = _policy_from_debug(args)
    digest = measure(kernel, initrd, cmdline, memory_size, policy,
                     exposed_register_mask=args.expose)
    if args.json:
        print(json.dumps({"measurement": digest.hex(), "policy": policy.pack().hex(),
                          "debug": policy.debug, "memory_size": memory_size, "cmdline": cmdline}, indent=2))
    else:
        print(digest.hex())
    return EXIT_OK


def _cmd_seal(args: argparse.Namespace) -> int:
    from qemu_kd.formats.certs import verify_chain
    from qemu_kd.formats.layout import HostLayout
    from qemu_kd.tenant.seal import seal

    memory_size = args.mem
    layout = _parsed(HostLayout.unpack, args.layout, "host layout")
    root = _read_root(args.root)
    verify_chain(layout.platform_chain_pem, root)    # fail before building or reading the guest
    kernel, initrd, cmdline = _guest_inputs(args)
    policy = _policy_from_debug(args)
    bundle, secret = seal(kernel, initrd, cmdline, memory_size, policy, layout, root,
                          exposed_register_mask=args.expose)
    bundle.write(Path(args.out))
    secret.write(Path(args.secret))
    platform = "EMULATED platform" if secret.platform_emulated else "platform"
    print(f"sealed {args.out} for {platform} {secret.platform_id.hex()}, KeyID {secret.keyid}, "
          f"{memory_size >> 20} MiB, policy {policy.describe()}")
    print(f"measurement {secret.measurement.hex()}")
    print(f"tenant secret {args.secret} (mode 0600; keep it: it holds the domain key)")
    return EXIT_OK


def _cmd_verify_report(args: argparse.Namespace) -> int:
    from qemu_kd.tenant.seal import TenantSecret
    from qemu_kd.tenant.verify import check_report

    secret = _parsed(TenantSecret.unpack, args.secret, "tenant secret") if args.secret else None
    measurement = _hex_arg(args.measurement, "--measurement", exact=48)
    policy = parse_policy(args.policy) if args.policy is not None else None
    host_data = _hex_arg(args.host_data, "--host-data", at_most=32)
    if secret is not None:
        measurement = measurement if measurement is not None else secret.measurement
        policy = policy if policy is not None else secret.policy
        host_data = host_data if host_data is not None else secret.host_data
    if measurement is None or policy is None:
        raise ConfigError("verify-report needs the expected --measurement and --policy",
                          "give them, or --secret with the tenant secret from seal")
    report_data = _hex_arg(args.report_data, "--report-data", at_most=64)
    report = _read_report(args.report)
    chain = _read_file(args.chain, "certificate chain")
    root = _read_root(args.root)
    verified = check_report(report, root, chain, measurement=measurement, policy=policy,
                            report_data=report_data, host_data=host_data,
                            allow_emulated=args.allow_emulated)
    where = "EMULATED platform" if verified.emulated else "platform"
    print(f"OK: report from {where} {verified.platform_id.hex()}, KeyID {verified.keyid}, "
          f"measurement {verified.measurement.hex()[:16]}..., policy {verified.policy.describe()}")
    return EXIT_OK


# ---------------------------------------------------------------- parser

def _guest_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--kernel", help="guest bzImage (default: the built default guest)")
    p.add_argument("--initrd", help="guest initramfs (default: the built default guest)")
    p.add_argument("--cmdline", help="kernel command line (default: the default guest's, the same on "
                                     "every host; give the same to measure and seal). Leave "
                                     "tsc_early_khz out: the platform adds this processor's at launch, "
                                     "unmeasured; a line that sets it is measured and kept as given")
    p.add_argument("--mem", default="256M", type=guest_memory,
                   help="guest memory size: a multiple of 2M from 64M to 3G (default 256M)")
    p.add_argument("--debug", action="store_true",
                   help="seal with the DEBUG policy (the host may read guest memory and registers)")
    add_expose_option(p)
    from qemu_kd.cli.guest_files import add_addition_options

    add_addition_options(p)


def add_tenant_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``tenant`` with its subcommands on the main parser's subparsers."""
    tenant = subparsers.add_parser("tenant", help="the guest owner's side: measure, seal, verify reports",
                                   description="The tenant's side of a protected launch.")
    tsub = tenant.add_subparsers(dest="tenant_command", metavar="ACTION")
    tsub.required = True

    m = tsub.add_parser("measure", help="print the expected launch measurement")
    _guest_options(m)
    m.add_argument("--json", action="store_true", help="print one JSON object")
    m.set_defaults(func=_cmd_measure)

    s = tsub.add_parser("seal", help="seal the guest for a host's layout")
    _guest_options(s)
    s.add_argument("--layout", required=True, help="host layout JSON (from the host's alloc)")
    s.add_argument("--root", required=True, help="trusted root certificate (PEM)")
    s.add_argument("--out", required=True, help="bundle file to write")
    s.add_argument("--secret", required=True, help="tenant secret file to write (mode 0600)")
    s.set_defaults(func=_cmd_seal)

    v = tsub.add_parser("verify-report", help="verify an attestation report",
                        usage="%(prog)s --report FILE --root PEM --chain PEM --report-data HEX\n"
                              "       (--secret FILE | --measurement HEX --policy POLICY)\n"
                              "       [--host-data HEX] [--allow-emulated]",
                        description="The expected measurement and policy come from --secret, or both "
                                    "from --measurement and --policy: --measurement needs --policy (or "
                                    "--secret) and the other way round. Given with --secret, "
                                    "--measurement, --policy and --host-data override its values. "
                                    "Exit codes: 0 OK, 2 usage, 3 signature, 4 chain, 5 measurement, "
                                    "6 policy, 7 report_data, 8 host_data, 9 emulated platform not allowed.")
    v.add_argument("--report", required=True, help="the report (352 bytes, binary)")
    v.add_argument("--root", required=True, help="trusted root certificate (PEM)")
    v.add_argument("--chain", required=True, help="platform certificate chain (PEM)")
    v.add_argument("--measurement", help="expected launch measurement (96 hex digits); "
                                         "needs --policy or --secret")
    v.add_argument("--policy", help="expected policy: debug, nodebug or 16 hex digits; "
                                    "needs --measurement or --secret")
    v.add_argument("--report-data", required=True, help="expected report_data (hex, up to 64 bytes)")
    v.add_argument("--host-data", help="expected host_data (hex, up to 32 bytes)")
    v.add_argument("--secret", help="tenant secret from seal: default measurement, policy and host_data")
    v.add_argument("--allow-emulated", action="store_true",
                   help="accept reports from an EMULATED platform")
    v.set_defaults(func=_cmd_verify_report)
    return tenant


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qemu-kd")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    add_tenant_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run ``qemu-kd tenant ...`` (``argv`` starts with ``tenant``); returns the exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse already printed the usage error
        return exc.code if isinstance(exc.code, int) else EXIT_CODES["usage"]
    try:
        return args.func(args)
    except KdError as exc:
        print(f"qemu-kd: error: {exc}", file=sys.stderr)
        return exc.exit_code


if __name__ == "__main__":
    sys.exit(main())
