"""``qemu-kd clean``: remove what killed qemu-kd processes left in the runtime directory.

A process killed with SIGKILL cannot clean up after itself.  What holds guest
plaintext dies with it anyway (guest RAM is a memfd, DRAM an unlinked file);
what is left are names: registry entries of dead platform daemons, the private
directories of dead processes (``run-*``, ``platform-*``, ``qemu-kd-*``: sockets,
sealed images, audit and platform logs, see :mod:`qemu_kd.common.rundirs`), and
a default host-port socket nobody listens on.  Only things whose owning
process is dead are removed; the next ``qemu-kd run`` and the next platform
daemon sweep the same way.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from qemu_kd.common.files import ListenPathError, claim_socket_path
from qemu_kd.common.rundirs import sweep_dead_dirs
from qemu_kd.hostport.registry import default_socket, sweep_stale_entries


def sweep_leftovers() -> list[Path]:
    """Remove every leftover of dead qemu-kd processes; what was removed."""
    from qemu_kd.cli.kept import sweep_dead_records

    removed = sweep_stale_entries() + sweep_dead_dirs() + sweep_dead_records()
    sock = default_socket()
    if sock.exists():
        try:
            claim_socket_path(sock)   # removes it only if nobody listens on it
        except ListenPathError:
            pass
        if not sock.exists():
            removed.append(sock)
    return removed


def _cmd_clean(args: argparse.Namespace) -> int:
    removed = sweep_leftovers()
    if args.json:
        print(json.dumps({"removed": [str(p) for p in removed]}, indent=2))
    elif removed:
        print(f"removed {len(removed)} leftover{'s' if len(removed) != 1 else ''} of dead qemu-kd processes:")
        for path in removed:
            print(f"  {path}")
    else:
        print("nothing to clean: no leftovers of dead qemu-kd processes")
    return 0


def add_clean_parser(sub) -> None:
    clean = sub.add_parser("clean", help="remove files left by killed qemu-kd processes")
    clean.add_argument("--json", action="store_true", help="print one JSON object")
    clean.set_defaults(func=_cmd_clean)
