"""HMP command lines for the allow-list tests of the QMP and gdb endpoints.

``HMP_BYPASSES`` must be refused on every endpoint, with DEBUG and without:
each one changes the machine or runs the vCPU behind the platform's back, if
QEMU got it.  Kept harmless in case one ever got through: ``o`` writes a
no-op to port 0x80 (not a reset through 0xcf9), ``migrate_incoming`` and
``block_resize`` name nothing that exists.
"""

HMP_BYPASSES = (
    "s",                                   # QEMU's alias for stop: a pause without the exit
    "c",                                   # ... and for cont
    "q",                                   # ... and for quit
    "o /b 0x80 0",                         # port output (0xcf9 would reset the machine)
    "i /b 0x80",                           # port input: reads can have side effects
    "qom-set /machine/unattached/device[0] start-powered-off true",
    "mce 0 0 0 0 0 0",
    "system_wakeup",
    "boot_set c",
    "watchdog_action pause",
    "block_resize nodrive 1G",
    "migrate_incoming tcp:127.0.0.1:1",
    "system_reset",
    "gdbserver tcp::1234",
    "nmi",
    "sendkey ctrl-alt-delete",
    "cpu 0",
    "singlestep on",
    "info profile",                        # an info subcommand outside the list
    "info/status",                         # QEMU reads an empty subcommand here
    "stop now",                            # run control takes no arguments
    "info status\x00o /b 0x80 0",          # control characters are refused outright
    "no-such-command",
)
# Lines that pass with DEBUG only (and are audited there).
HMP_DEBUG_ONLY = ("info registers", "xp /8xg 0x100000", "x/2i $pc", "info mtree -f", "info tlb")
