"""HMP commands the filtering proxies let through, shared by the QMP and gdb endpoints."""

from __future__ import annotations


# Human-monitor commands that reveal nothing about the guest (compared after
# collapsing whitespace).
HARMLESS_HMP = frozenset({"info status", "info version", "info name", "info kvm", "info uuid"})
# Human-monitor commands refused even with DEBUG: they change the machine rather than
# inspect it, or bypass the platform (run control goes through exit/resume instead).
HMP_NEVER = frozenset({
    "system_reset", "quit", "q", "gdbserver", "migrate", "migrate_set_parameter",
    "migrate_set_capability", "savevm", "loadvm", "delvm", "device_add", "device_del",
    "object_add", "object_del", "chardev-add", "chardev-change", "chardev-remove", "netdev_add",
    "netdev_del", "drive_add", "drive_del", "change", "eject", "set_link", "singlestep",
    "one-insn-per-tb", "cpu", "nmi", "sendkey", "mouse_move", "mouse_button",
})
HMP_STOP = frozenset({"stop"})
HMP_CONT = frozenset({"cont", "c"})


def hmp_command(line: str) -> str:
    """The command word of a human-monitor command line."""
    words = line.split()
    return words[0] if words else ""
