"""``--add SRC:DEST`` and ``--overlay DIR``: users' files in the guest image.

The same options on ``guest build``, ``run``, ``tenant measure`` and
``tenant seal`` build the same customised image (see docs/guest-image.md), so
the measurement a tenant computes matches the image that runs.
"""

from __future__ import annotations

import argparse

from qemu_kd.common.errors import ConfigError


def add_addition_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--add", action="append", metavar="SRC:DEST",
                   help="put the host file (or directory) SRC at the absolute guest path DEST "
                        "(DEST ending in / keeps SRC's name); repeatable")
    p.add_argument("--overlay", action="append", metavar="DIR",
                   help="put the tree DIR at the guest's root (DIR/usr/bin/x becomes /usr/bin/x); "
                        "repeatable")


def additions_from_args(args: argparse.Namespace):
    """The :class:`GuestAdditions` the options give (empty when none)."""
    from qemu_kd.guest.additions import GuestAdditions

    additions = GuestAdditions.from_options(args.add, args.overlay)
    if additions and getattr(args, "initrd", None):
        raise ConfigError("--add and --overlay build on the default guest, not on --initrd",
                          "drop --initrd, or add the files to your own initrd")
    return additions
