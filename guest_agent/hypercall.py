"""Hypercalls from guest user space: the library call and the ``kd-hypercall`` command.

A hypercall is a leaf number and a register file of the 16 general registers.
The agent owns the guest port, so programs reach the platform through the
agent's local socket (:data:`AGENT_SOCKET`, root only); the agent makes the
call on the guest port, where the platform exits to the host with the exposed
registers only and resumes the guest with the host's outputs.

Library use::

    from guest_agent.hypercall import call
    result = call("ECHO", {"rbx": 7}, expose=["rbx"])
    result["regs"]["rbx"]      # the register file after the call

Command::

    kd-hypercall LEAF [REG=VALUE ...] [--expose r1,r2] [--timeout S] [--json]

See docs/agent-protocol.md.
"""

from __future__ import annotations

import json
import sys

from .local_api import AGENT_SOCKET, LocalApiError, ask

#: Leaf numbers; the platform's table (qemu_kd.formats.hypercall.LEAVES) must agree.
LEAVES = {"ECHO": 0x0001, "HOST_TIME": 0x0002, "MEMORY_REQUEST": 0x0010, "SHARE_NOTIFY": 0x0011}
LEAF_NAMES = {number: name for name, number in LEAVES.items()}
#: The general registers in x86 encoding order (bit i of a mask is register i).
GPRS = ("rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi",
        "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15")
DEFAULT_TIMEOUT = 10.0


class HypercallFailed(LocalApiError):
    """The agent or the platform refused the hypercall, or the host did not answer."""


def parse_leaf(text: str | int) -> int:
    """A leaf by name (``ECHO``) or number (``1``, ``0x10``)."""
    if isinstance(text, int) and not isinstance(text, bool):
        number = text
    elif str(text).upper() in LEAVES:
        return LEAVES[str(text).upper()]
    else:
        try:
            number = int(str(text), 0)
        except ValueError:
            raise ValueError(f"unknown leaf {text!r}: give a number or one of "
                             f"{', '.join(LEAVES)}") from None
    if not 0 <= number <= 0xFFFF_FFFF:
        raise ValueError(f"leaf {number} is out of range (0..0xffffffff)")
    return number


def check_regs(regs: dict) -> dict[str, int]:
    out = {}
    for name, value in regs.items():
        if name not in GPRS:
            raise ValueError(f"{name!r} is not a general register; choose from {', '.join(GPRS)}")
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 1 << 64:
            raise ValueError(f"{name} must be an unsigned 64-bit integer")
        out[name] = value
    return out


def parse_assignments(items: list[str]) -> dict[str, int]:
    """``["rbx=7", "r8=0x10"]`` -> ``{"rbx": 7, "r8": 16}``."""
    regs = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"{item!r} is not REG=VALUE")
        try:
            regs[name.strip().lower()] = int(value.strip(), 0)
        except ValueError:
            raise ValueError(f"{item!r}: the value is not an integer") from None
    return check_regs(regs)


def request(leaf: str | int, regs: dict | None = None, expose: list[str] | None = None,
            timeout: float = DEFAULT_TIMEOUT) -> dict:
    """The agent's ``hypercall`` operation for these arguments (checked)."""
    if expose is not None:
        bad = [n for n in expose if n not in GPRS]
        if bad:
            raise ValueError(f"cannot expose {', '.join(bad)}: not general registers")
    if not 0 < timeout <= 600:
        raise ValueError("timeout must be 0..600 seconds")
    return {"op": "hypercall", "leaf": parse_leaf(leaf), "regs": check_regs(regs or {}),
            "expose": list(expose) if expose is not None else None, "timeout": timeout}


def call(leaf: str | int, regs: dict | None = None, expose: list[str] | None = None,
         timeout: float = DEFAULT_TIMEOUT, socket_path: str = AGENT_SOCKET) -> dict:
    """Make a hypercall through the agent; the result (``seq``, ``status``, ``outputs``, ``regs``).

    Raises HypercallFailed with the platform's or the agent's reason.
    """
    return ask(request(leaf, regs, expose, timeout), timeout + 60, socket_path, HypercallFailed)


def format_result(result: dict) -> str:
    leaf = result.get("leaf", 0)
    lines = [f"seq {result.get('seq')} leaf {LEAF_NAMES.get(leaf, hex(leaf))} status {result.get('status')}"]
    outputs = result.get("outputs", {})
    for name in GPRS:
        if name in outputs:
            lines.append(f"{name}={outputs[name]:#x}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    import argparse     # kd-hypercall's only: the agent imports this module at start-up

    parser = argparse.ArgumentParser(prog="kd-hypercall", description="make a hypercall to the host")
    parser.add_argument("leaf", help=f"leaf number or name ({', '.join(LEAVES)})")
    parser.add_argument("regs", nargs="*", metavar="REG=VALUE", help="input registers")
    parser.add_argument("--expose", help="registers to expose, comma-separated (narrows the VMCS mask)")
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT, help="seconds to wait for the host")
    parser.add_argument("--json", action="store_true", help="print the whole result as JSON")
    args = parser.parse_args(argv)
    try:
        expose = [n.strip().lower() for n in args.expose.split(",") if n.strip()] \
            if args.expose is not None else None
        result = call(args.leaf, parse_assignments(args.regs), expose, args.timeout)
    except (ValueError, HypercallFailed) as exc:
        print(f"kd-hypercall: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(result, sort_keys=True) if args.json else format_result(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
