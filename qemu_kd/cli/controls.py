"""``qemu-kd setmem``, ``relocate`` and ``exit-interval``: host-requested changes the guest validates.

Like ``virsh setmem``, these act on a running domain (``qemu-kd ls`` lists
them), but the host cannot make the change itself: it asks the guest on the
shared channel, the guest checks the request against its measured control
policy and, if it agrees, returns new control structures the platform sealed
for it; the host verifies and installs them (docs/protocol.md).  Each
command prints the guest's verdict: accepted, or refused with the reason.
The shared channel must be free: a domain kept with ``qemu-kd run --keep``
is; one whose host VMM is still attached is not.
"""

from __future__ import annotations

import argparse
import json
from contextlib import contextmanager

from qemu_kd.common.errors import ConfigError, KdError
from qemu_kd.common.units import describe_size, parse_size

PAGE = 4096
#: How long the shared channel may take to answer a ping before it counts as held by another host.
PING_WAIT = 15.0


class SharedChannelBusy(KdError):
    """The domain's shared channel does not answer: another host VMM holds it, or the guest hangs."""


def page_size_arg(text: str) -> int:
    """A size (``64M``, ``1M``, ``4096B``) that is a positive multiple of 4 KiB."""
    try:
        size = parse_size(text)
    except KdError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if size <= 0 or size % PAGE:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive multiple of 4 KiB")
    return size


def address_arg(text: str) -> int:
    try:
        value = int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an address (e.g. 0x1000000)") from None
    if value < 0 or value % PAGE:
        raise argparse.ArgumentTypeError(f"{text!r} is not a page-aligned guest-physical address")
    return value


def milliseconds_arg(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of milliseconds") from None
    if not 0 <= value < 1 << 32:
        raise argparse.ArgumentTypeError(f"{text!r} is out of range (0 turns the interval off)")
    return value


@contextmanager
def control_host(name: str, command: str):
    """The domain and a ControlHost on its host port and shared channel."""
    from host_vmm.controls import ControlHost
    from qemu_kd.channel.agent_client import AgentClient, connect_shared_channel
    from qemu_kd.cli.domains import require_endpoint, resolve
    from qemu_kd.hostport.client import HostPortClient

    dom = resolve(name)
    shared = require_endpoint(dom, "shared")
    with HostPortClient(dom.platform_socket, timeout=600.0, client_name=f"qemu-kd {command}") as client:
        sock = connect_shared_channel(shared)
        try:
            agent = AgentClient(sock)
            try:
                agent.ping(timeout=PING_WAIT)
            except KdError:
                raise SharedChannelBusy(f"the shared channel of {dom.name} does not answer",
                                        "another host VMM may hold it (detach it), or the guest hangs; "
                                        f"see `qemu-kd console {dom.qualified} --log`") from None
            yield dom, ControlHost(client, agent, dom.keyid)
        finally:
            sock.close()


def report(dom, outcome, as_json: bool, extra: dict | None = None) -> int:
    """Print the guest's verdict; exit status 0 when the change was made, 3 when refused."""
    data = {"name": dom.name, "keyid": dom.keyid, **outcome.as_json(), **(extra or {})}
    if as_json:
        print(json.dumps(data, indent=2))
    else:
        if outcome.verdict == "accepted":
            print(f"{dom.name}: {outcome.op} accepted by the guest and installed (version {outcome.version})")
        else:
            by = {"guest": "the guest", "platform": "the platform", "host": "the host's checks"}
            print(f"{dom.name}: {outcome.op} refused by {by.get(outcome.refused_by, '?')}: {outcome.reason}")
        for key, value in (extra or {}).items():
            print(f"  {key.replace('_', ' ')}: {value}")
        if outcome.free_pages_before is not None and outcome.free_pages_after is not None:
            print(f"  host free pool: {_pool(outcome.free_pages_before)} -> {_pool(outcome.free_pages_after)}")
    return 0 if outcome.verdict == "accepted" else 3


def _pool(pages: int) -> str:
    return f"{pages} pages ({pages * PAGE / (1 << 20):.1f} MiB)"


def _cmd_setmem(args: argparse.Namespace) -> int:
    from host_vmm.controls import ControlOutcome

    with control_host(args.domain, "setmem") as (dom, host):
        status = host.status()
        current, full = status["current_memory"], status["memory_size"]
        target = args.size
        if target > full:
            raise ConfigError(f"{dom.name} has {describe_size(full)} of guest memory; setmem cannot go "
                              f"above it (asked for {describe_size(target)})")
        delta = (target - current) // PAGE
        if delta < 0:
            outcome = host.balloon_out(-delta)
        elif delta > 0:
            outcome = host.balloon_in(delta)
        else:
            outcome = ControlOutcome("setmem", "accepted", reason="already at that size")
        after = host.status()["current_memory"]
    return report(dom, outcome, args.json, {"memory_before": describe_size(current),
                                            "memory_after": describe_size(after)})


def _cmd_relocate(args: argparse.Namespace) -> int:
    with control_host(args.domain, "relocate") as (dom, host):
        gpas = [args.gpa + i * PAGE for i in range(args.size // PAGE)]
        outcome = host.relocate(gpas)
    return report(dom, outcome, args.json, {"moved": describe_size(args.size), "from_gpa": hex(args.gpa)})


def _cmd_exit_interval(args: argparse.Namespace) -> int:
    with control_host(args.domain, "exit-interval") as (dom, host):
        outcome = host.set_exit_interval(args.ms)
        status = host.status()
    return report(dom, outcome, args.json, {"exit_interval_ms": status["exit_interval_ms"],
                                            "interval_exits": status["interval_exits"]})


def add_control_parsers(sub) -> None:
    """Register ``setmem``, ``relocate`` and ``exit-interval`` on ``sub``."""
    name_help = "the domain: its name (run --name, or kdN), N for KeyID N, or PID:NAME"
    setmem = sub.add_parser("setmem", help="change a running domain's memory (the guest agrees or refuses)",
                            description="Balloon a running domain to SIZE of guest memory, like virsh "
                                        "setmem: below its current size the guest gives pages back to the "
                                        "host's free pool, above it the guest accepts fresh zeroed pages.")
    setmem.add_argument("domain", help=name_help)
    setmem.add_argument("size", type=page_size_arg, help="the memory the guest should have, e.g. 192M")
    setmem.add_argument("--json", action="store_true", help="print one JSON object")
    setmem.set_defaults(func=_cmd_setmem)

    reloc = sub.add_parser("relocate", help="move guest pages to other host pages (contents kept)")
    reloc.add_argument("domain", help=name_help)
    reloc.add_argument("gpa", type=address_arg, help="first guest-physical address, e.g. 0x1000000")
    reloc.add_argument("--size", type=page_size_arg, default=PAGE, help="how much to move (default 4K)")
    reloc.add_argument("--json", action="store_true", help="print one JSON object")
    reloc.set_defaults(func=_cmd_relocate)

    interval = sub.add_parser("exit-interval", help="set the host-forced exit interval (0: off)",
                              description="Ask for a host-forced exit every MS milliseconds; the guest "
                                          "refuses intervals below the floor its control policy sets.")
    interval.add_argument("domain", help=name_help)
    interval.add_argument("ms", type=milliseconds_arg, help="milliseconds between exits, 0 to stop")
    interval.add_argument("--json", action="store_true", help="print one JSON object")
    interval.set_defaults(func=_cmd_exit_interval)
