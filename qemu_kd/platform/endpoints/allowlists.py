"""The human-monitor (HMP) allow-list, shared by the QMP endpoint (``human-monitor-command``)
and the gdb endpoint (gdb's ``monitor``, the ``qRcmd`` packet).

HMP is an allow-list, like QMP: a command line passes only if it is one of the
commands below (docs/debugging.md).  Everything else, including QEMU's
one-letter aliases (``s`` for ``stop``, ``c`` for ``cont``, ``q`` for ``quit``,
``?`` for ``help``)
and commands QEMU does not have, is refused.

The command line is split the way QEMU's monitor splits it: the command name
ends at white space or at ``/`` (so ``xp/8xg 0x1000`` is ``xp``), and ``info``
takes its subcommand the same way.  A line with any character other than
printable ASCII and white space is refused before it is looked at.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

# What QEMU's monitor counts as white space (C isspace in the C locale).
HMP_SPACE = " \t\n\v\f\r"
# ``info`` subcommands that reveal nothing about the guest: allowed without DEBUG,
# and only without arguments.
HARMLESS_INFO = frozenset({"status", "version", "name", "kvm", "uuid"})
# ``info`` subcommands that only read guest or machine state: DEBUG only, audited.
# Left out: anything that resets counters (``profile``), touches block devices
# (``snapshots``) or is unrelated to debugging a guest.
DEBUG_INFO = HARMLESS_INFO | frozenset({
    "registers", "cpus", "tlb", "mem", "mtree", "qtree", "qom-tree", "roms", "pic", "irq",
    "lapic", "pci", "chardev", "block", "memdev", "memory-devices", "memory_size_summary",
    "numa", "hotpluggable-cpus", "ramblock", "jit", "opcount", "iothreads",
})
# The monitor's own help (the command list; qmp-shell -H asks for it, and for ``info``
# alone, at start): always, with or without arguments.
HARMLESS_COMMANDS = frozenset({"help"})
# Memory dumps (virtual and physical): DEBUG only, audited.
DEBUG_DUMPS = frozenset({"x", "xp"})
# Run control: carried through the platform's exit and resume, never to QEMU directly.
HMP_STOP = "stop"
HMP_CONT = "cont"
# The harmless command lines, as text.
HARMLESS_HMP = frozenset(f"info {sub}" for sub in HARMLESS_INFO)


class HmpAction(Enum):
    """What an endpoint does with an HMP command line."""

    HARMLESS = "harmless"    # forwarded, not audited
    INSPECT = "inspect"      # forwarded, audited (DEBUG only)
    STOP = "stop"            # the platform's exit
    CONT = "cont"            # the platform's resume
    REFUSED = "refused"


@dataclass(frozen=True)
class HmpVerdict:
    """The allow-list's answer for one command line.

    ``command`` is what a refusal names (``o``, ``info profile``); ``needs_debug``
    says that DEBUG would have let the line through.
    """

    action: HmpAction
    command: str
    needs_debug: bool = False

    @property
    def allowed(self) -> bool:
        return self.action is not HmpAction.REFUSED


def _next_word(text: str) -> tuple[str, str]:
    """QEMU's get_command_name: skip white space, read up to white space or ``/``."""
    rest = text.lstrip(HMP_SPACE)
    end = 0
    while end < len(rest) and rest[end] != "/" and rest[end] not in HMP_SPACE:
        end += 1
    return rest[:end], rest[end:]


def hmp_command(line: str) -> str:
    """The command a line names: ``info <sub>`` for ``info``, else the command word."""
    word, rest = _next_word(line)
    if word == "info":
        sub, _ = _next_word(rest)
        return f"info {sub}" if sub else "info"
    return word


def judge_hmp(line: object, *, debug: bool, run_control: bool = True) -> HmpVerdict:
    """Judge one HMP command line under the domain's policy.

    ``run_control`` is False where ``stop``/``cont`` may not be used (gdb's
    ``monitor``: gdb has its own run control).
    """
    if not isinstance(line, str) or any(not (ch.isascii() and (ch.isprintable() or ch in HMP_SPACE))
                                        for ch in line):
        return HmpVerdict(HmpAction.REFUSED, "(not a printable command line)")
    word, rest = _next_word(line)
    command = hmp_command(line)
    has_args = bool(rest.strip(HMP_SPACE))
    if word == "info":
        sub, args = _next_word(rest)
        if not sub and not args.strip(HMP_SPACE):
            return HmpVerdict(HmpAction.HARMLESS, command)     # the list of subcommands
        if sub in HARMLESS_INFO and not args.strip(HMP_SPACE):
            return HmpVerdict(HmpAction.HARMLESS, command)
        if sub in DEBUG_INFO:
            if debug:
                return HmpVerdict(HmpAction.INSPECT, command)
            return HmpVerdict(HmpAction.REFUSED, command, needs_debug=True)
        return HmpVerdict(HmpAction.REFUSED, command)
    if word in HARMLESS_COMMANDS:
        return HmpVerdict(HmpAction.HARMLESS, command)
    if word in DEBUG_DUMPS:
        if debug:
            return HmpVerdict(HmpAction.INSPECT, command)
        return HmpVerdict(HmpAction.REFUSED, command, needs_debug=True)
    if word in (HMP_STOP, HMP_CONT) and run_control and not has_args:
        return HmpVerdict(HmpAction.STOP if word == HMP_STOP else HmpAction.CONT, command)
    return HmpVerdict(HmpAction.REFUSED, command)
