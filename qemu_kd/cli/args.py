"""Argument types shared by the ``qemu-kd`` subcommands.

Each one checks its value while the command line is parsed, so a bad value is
a usage error (argparse's one line and exit status 2) before anything starts.
"""

from __future__ import annotations

import argparse
import math

from qemu_kd.common.errors import KdError


def guest_memory(text: str) -> int:
    """``--mem``: a guest memory size such as ``256M`` (see common.units.check_guest_memory)."""
    from qemu_kd.common.units import parse_guest_memory

    try:
        return parse_guest_memory(text)
    except KdError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if math.isnan(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds")
    return value


def positive_seconds(text: str) -> float:
    """A timeout: a finite number of seconds greater than 0."""
    value = _seconds(text)
    if not 0 < value < math.inf:
        raise argparse.ArgumentTypeError(f"{text} is not a positive number of seconds")
    return value


def wait_seconds(text: str) -> float:
    """A wait: 0 or more seconds, ``inf`` for no limit."""
    value = _seconds(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text} is not 0 or more seconds (inf waits without limit)")
    return value


def exposed_registers(text: str) -> int:
    """``--expose``: general registers a hypercall may show the host, e.g. ``rax,rbx,rcx``
    (``none``: nothing; ``all``: the 16 general registers); the VMCS mask value."""
    from qemu_kd.formats.vmcs import X86_GPR_ORDER, exposed_register_mask

    names = [name.strip().lower() for name in text.split(",") if name.strip()]
    if names in ([], ["none"]):
        return 0
    if names == ["all"]:
        names = list(X86_GPR_ORDER)
    try:
        return exposed_register_mask(names)
    except KdError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def domain_name(text: str) -> str:
    """``run --name``: a domain name (see hostport.names.check_name)."""
    from qemu_kd.hostport.names import check_name

    try:
        return check_name(text)
    except KdError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_expose_option(parser: argparse.ArgumentParser) -> None:
    """``--expose REGS`` (see :func:`exposed_registers`), for the commands that seal or measure."""
    parser.add_argument("--expose", default="none", type=exposed_registers, metavar="REGS",
                        help="general registers the guest's hypercalls may show the host (the "
                             "VMCS's measured exposed-register mask), e.g. rax,rbx,rcx; all or "
                             "none (default none)")
