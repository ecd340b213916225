"""``qemu-kd ls``, ``qmp-shell``, ``gdb``, ``console`` and ``destroy``.

These commands find the running key domains of every live platform daemon on
this machine (the daemons register themselves, see :mod:`qemu_kd.platform.daemon`)
and reach them through the host port and the host-facing endpoints the
platform hands out: the filtering QMP and gdb proxies and the console.  They
are host tools: they see exactly what the host may see, nothing more.

Domain names
    A domain's name (``run --name``, or the ``kdN`` the platform picked; names
    are unique across the platforms of the machine), ``kdN`` or just ``N`` for
    KeyID N, and ``PID:NAME`` (``PID:kdN``, ``PID:N``) to pick the domain of one
    platform daemon.  An exact name match wins over a KeyID.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import select
import shutil
import socket
import sys
import time
from dataclasses import dataclass

from qemu_kd.channel.console import QueryFilter, strip_queries as strip_console_queries
from qemu_kd.cli.args import wait_seconds
from qemu_kd.common.errors import ConfigError, KdError

#: States in which a domain has a guest (its QEMU was started).
LIVE_STATES = ("LAUNCHED", "EXITED")
#: Ctrl-] ends an interactive console session, as in ``virsh console`` and telnet.
ESCAPE = 0x1D
HOST_PORT_TIMEOUT = 10.0
_SELECTOR_RE = re.compile(r"^(?:(?P<pid>\d+):)?(?P<name>[A-Za-z0-9][A-Za-z0-9_.-]{0,31})$")
_KEYID_RE = re.compile(r"^(?:kd)?(?P<keyid>\d+)$")
MiB = 1 << 20


class DomainLookupError(KdError):
    """The domain named on the command line does not exist or is ambiguous."""


# -- finding domains ---------------------------------------------------------------------------

@dataclass
class DomainRef:
    """One key domain of one platform daemon, with its status as the host port reports it."""

    platform: dict
    status: dict

    @property
    def platform_pid(self) -> int:
        return int(self.platform["pid"])

    @property
    def platform_socket(self) -> str:
        return str(self.platform["socket"])

    @property
    def keyid(self) -> int:
        return int(self.status["keyid"])

    @property
    def name(self) -> str:
        return str(self.status.get("name") or f"kd{self.keyid}")

    @property
    def qualified(self) -> str:
        return f"{self.platform_pid}:{self.name}"

    @property
    def state(self) -> str:
        return str(self.status.get("state", "?"))

    @property
    def running(self) -> bool:
        return bool(self.status.get("running"))

    @property
    def live(self) -> bool:
        return self.state in LIVE_STATES

    @property
    def debug(self) -> bool:
        return bool((self.status.get("policy") or {}).get("debug"))

    @property
    def endpoints(self) -> dict:
        return dict(self.status.get("endpoints") or {})

    @property
    def guest_state(self) -> str | None:
        """running, paused, exited, halted, shutoff or crashed (None from older platforms)."""
        guest = self.status.get("guest_state")
        return str(guest) if guest else None

    def shown_state(self) -> str:
        guest = self.guest_state
        if self.live and guest and guest not in ("running", "exited"):
            return f"{self.state} ({guest})"
        if self.live and not self.running and not guest:
            return f"{self.state} (QEMU gone)"
        return self.state

    @property
    def memory(self) -> int | None:
        """Guest memory in bytes (None before launch, or from older platforms)."""
        size = self.status.get("memory")
        return size if isinstance(size, int) else None

    @property
    def uptime(self) -> float | None:
        """Seconds since launch (None before launch, or from older platforms)."""
        up = self.status.get("uptime")
        return float(up) if isinstance(up, (int, float)) else None

    def as_json(self) -> dict:
        memory = self.memory
        return {"name": self.name, "qualified_name": self.qualified, "keyid": self.keyid,
                "state": self.state, "guest_state": self.guest_state, "running": self.running,
                "memory": memory, "memory_mib": memory // MiB if memory is not None else None,
                "vcpus": self.status.get("vcpus", 1), "uptime": self.uptime,
                "policy": self.status.get("policy"), "measurement": self.status.get("measurement"),
                "host_data": self.status.get("host_data"),
                "integrity_events": self.status.get("integrity_events"),
                "platform": {"pid": self.platform_pid, "socket": self.platform_socket,
                             "accel": self.platform.get("accel")},
                "endpoints": self.endpoints}


@dataclass
class Survey:
    """Every domain found, and the platform daemons that did not answer."""

    domains: list[DomainRef]
    unreachable: list[tuple[dict, str]]


def _platforms() -> list[dict]:
    from qemu_kd.hostport.registry import running_platforms

    try:
        return running_platforms()
    except OSError as exc:
        raise KdError(f"cannot read the platform registry: {exc.strerror or exc}") from None


def survey(platforms: list[dict] | None = None) -> Survey:
    """Ask every live platform daemon for its domains."""
    from qemu_kd.hostport.client import HostPortClient
    from qemu_kd.hostport.protocol import HostPortError

    domains: list[DomainRef] = []
    unreachable: list[tuple[dict, str]] = []
    for info in _platforms() if platforms is None else platforms:
        try:
            with HostPortClient(info["socket"], timeout=HOST_PORT_TIMEOUT,
                                client_name="qemu-kd ls") as client:
                listed = client.list_domains()
        except HostPortError as exc:
            unreachable.append((info, exc.message))
            continue
        except OSError as exc:
            unreachable.append((info, str(exc.strerror or exc)))
            continue
        domains += [DomainRef(info, status) for status in listed
                    if isinstance(status, dict) and isinstance(status.get("keyid"), int)]
    domains.sort(key=lambda d: (d.keyid, d.platform_pid))
    return Survey(domains, unreachable)


def _unreachable_note(found: Survey) -> str:
    if not found.unreachable:
        return ""
    pids = ", ".join(str(info.get("pid")) for info, _ in found.unreachable)
    return f"; platform {pids} did not answer"


def parse_domain_name(text: str) -> tuple[int | None, str, int | None]:
    """``NAME``, ``kdN``, ``N`` or any of them after ``PID:``, as (platform pid or None,
    the name, the KeyID it reads as or None)."""
    match = _SELECTOR_RE.match(text.strip())
    if not match:
        raise ConfigError(f"{text!r} is not a domain name",
                          "use NAME, kdN, N or PID:NAME; `qemu-kd ls` lists the domains")
    pid, name = match.group("pid"), match.group("name")
    keyid = _KEYID_RE.match(name)
    return ((int(pid) if pid is not None else None), name,
            int(keyid.group("keyid")) if keyid else None)


def resolve(text: str, found: Survey | None = None) -> DomainRef:
    """The one domain ``text`` names (DomainLookupError when none or several match).

    A domain whose name is ``text`` wins; otherwise ``kdN``/``N`` picks KeyID N.
    """
    pid, name, keyid = parse_domain_name(text)
    found = survey() if found is None else found
    here = [d for d in found.domains if pid is None or d.platform_pid == pid]
    matches = [d for d in here if d.name == name]
    if not matches and keyid is not None:
        matches = [d for d in here if d.keyid == keyid]
    if len(matches) == 1:
        return matches[0]
    if len(matches) > 1:
        choices = ", ".join(d.qualified for d in matches)
        raise DomainLookupError(f"{name} is on several platforms: {choices}",
                                "name one of them as PID:kdN")
    where = f" on platform {pid}" if pid is not None else ""
    if pid is not None and all(int(info["pid"]) != pid for info in _platforms()):
        raise DomainLookupError(f"no platform daemon with pid {pid} is running",
                                "run `qemu-kd ls` to see the running domains")
    raise DomainLookupError(f"no key domain {name}{where}{_unreachable_note(found)}",
                            "run `qemu-kd ls` to see the running domains")


def require_endpoint(dom: DomainRef, name: str) -> str:
    """The path of a live domain's host endpoint (one-line error when it has none)."""
    if not dom.live:
        raise DomainLookupError(f"{dom.name} is {dom.state}: it has no guest running yet",
                                "launch it first, or pick another domain with `qemu-kd ls`")
    path = dom.endpoints.get(name)
    if not path:      # the platform hands out endpoints while the domain's QEMU is up
        raise DomainLookupError(f"{dom.name} has no {name} endpoint: its QEMU has stopped",
                                f"destroy it with `qemu-kd destroy {dom.qualified}`")
    if not os.path.exists(path):
        raise DomainLookupError(f"the {name} endpoint of {dom.name} is gone ({path})",
                                "the domain or its platform is stopping; run `qemu-kd ls`")
    return path


# -- ls ----------------------------------------------------------------------------------------

def short_size(size: int | None) -> str:
    """``256M``, ``1G`` (``-`` when unknown), as the MEMORY column shows a guest's memory."""
    if size is None:
        return "-"
    if size and size % (1 << 30) == 0:
        return f"{size >> 30}G"
    return f"{size // MiB}M" if size % MiB == 0 else f"{size}B"


def short_duration(seconds: float | None) -> str:
    """``42s``, ``1m05s``, ``2h03m``, ``3d04h`` (``-`` when unknown), as the UPTIME column shows it."""
    if seconds is None:
        return "-"
    whole = max(int(seconds), 0)
    days, rest = divmod(whole, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d{hours:02d}h"
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def format_domains(domains: list[DomainRef]) -> str:
    names = [d.name for d in domains]
    headers = ("NAME", "KEYID", "STATE", "POLICY", "PLATFORM", "MEMORY", "UPTIME", "QMP", "GDB",
               "CONSOLE")
    rows = []
    for d in domains:
        ep = d.endpoints
        rows.append((d.qualified if names.count(d.name) > 1 else d.name, str(d.keyid),
                     d.shown_state(), "debug" if d.debug else "no-debug", str(d.platform_pid),
                     short_size(d.memory), short_duration(d.uptime),
                     ep.get("qmp") or "-", ep.get("gdb") or "-", ep.get("console") or "-"))
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip()
             for row in (headers, *rows)]
    return "\n".join(lines)


def no_domains_line(hidden: int) -> str:
    """What ``ls`` says when it lists nothing; ``hidden`` domains are still being built."""
    if not hidden:
        return "no key domains"
    return (f"no key domains with a guest ({hidden} still being built; `qemu-kd ls -a` lists "
            f"{'it' if hidden == 1 else 'them'})")


def _cmd_ls(args: argparse.Namespace) -> int:
    found = survey()
    domains = found.domains if args.all else [d for d in found.domains if d.live]
    for info, why in found.unreachable:
        print(f"qemu-kd: warning: platform {info.get('pid')} ({info.get('socket')}) did not "
              f"answer: {why}", file=sys.stderr)
    if args.json:
        print(json.dumps([d.as_json() for d in domains], indent=2))
    elif not domains:
        print(no_domains_line(len(found.domains)))
    else:
        print(format_domains(domains))
    return 0


# -- qmp-shell and gdb -------------------------------------------------------------------------

def exec_program(argv: list[str]) -> None:
    """Replace this process with ``argv`` (the tool then owns the terminal and signals)."""
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execv(argv[0], argv)
    except OSError as exc:
        raise ConfigError(f"cannot run {argv[0]}: {exc.strerror or exc}") from None


def qmp_shell_argv(path: str, *, hmp: bool = False, pretty: bool = False,
                   verbose: bool = False) -> list[str]:
    if importlib.util.find_spec("qemu") is None or importlib.util.find_spec("qemu.qmp") is None \
            or importlib.util.find_spec("qemu.qmp.qmp_shell") is None:
        raise ConfigError("qmp-shell is not available: the qemu.qmp package is not installed",
                          "pip install qemu.qmp")
    argv = [sys.executable, "-m", "qemu.qmp.qmp_shell"]
    argv += ["-H"] * hmp + ["-p"] * pretty + ["-v"] * verbose
    return argv + [path]


def _cmd_qmp_shell(args: argparse.Namespace) -> int:
    dom = resolve(args.domain)
    path = require_endpoint(dom, "qmp")
    argv = qmp_shell_argv(path, hmp=args.hmp, pretty=args.pretty, verbose=args.verbose)
    exec_program(argv)
    return 0


def gdb_argv(path: str, gdb: str = "gdb", extra: list[str] | None = None) -> list[str]:
    found = shutil.which(gdb)
    if found is None:
        raise ConfigError(f"{gdb} is not installed or not on PATH",
                          "on Debian: apt-get install gdb; or pass --gdb PATH")
    return [found, "-q", "-ex", "set architecture i386:x86-64", "-ex", f"target remote {path}",
            *(extra or [])]


def _cmd_gdb(args: argparse.Namespace) -> int:
    dom = resolve(args.domain)
    path = require_endpoint(dom, "gdb")
    extra = list(args.gdb_args)
    if extra[:1] == ["--"]:
        extra = extra[1:]
    exec_program(gdb_argv(path, args.gdb, extra))
    return 0


# -- console -----------------------------------------------------------------------------------

def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def relay_console(sock: socket.socket, stdin_fd: int, stdout_fd: int, *, interactive: bool,
                  linger: float = 1.0, escape: int = ESCAPE, strip_queries: bool = False) -> str:
    """Copy bytes between the console socket and stdin/stdout; returns why it ended.

    ``interactive``: stop at the escape byte typed on stdin (``"escape"``).
    Otherwise, once stdin ends, keep printing console output until it has been
    quiet for ``linger`` seconds (``"stdin closed"``).  Either way the relay
    ends when the console closes (``"console closed"``).  ``strip_queries``
    leaves the guest's terminal queries out of stdout (for a stdout that is no
    terminal, see :mod:`qemu_kd.channel.console`).
    """
    queries = QueryFilter() if strip_queries else None
    try:
        return _relay(sock, stdin_fd, stdout_fd, interactive, linger, escape, queries)
    finally:
        if queries is not None:
            _write_all(stdout_fd, queries.flush())


def _relay(sock: socket.socket, stdin_fd: int, stdout_fd: int, interactive: bool, linger: float,
           escape: int, queries: QueryFilter | None) -> str:
    stdin_open = True
    quiet_since = None
    while True:
        watch = [sock] + ([stdin_fd] if stdin_open else [])
        timeout = None
        if not stdin_open and linger != float("inf"):
            timeout = max(0.0, quiet_since + linger - time.monotonic())
        ready, _, _ = select.select(watch, [], [], timeout)
        if not ready:
            return "stdin closed"
        if sock in ready:
            data = sock.recv(65536)
            if not data:
                return "console closed"
            _write_all(stdout_fd, queries.feed(data) if queries is not None else data)
            if not stdin_open:
                quiet_since = time.monotonic()
        if stdin_open and stdin_fd in ready:
            data = os.read(stdin_fd, 65536)
            if interactive and escape in data:
                sock.sendall(data[:data.index(escape)])
                return "escape"
            if not data:
                stdin_open = False
                quiet_since = time.monotonic()
                if linger <= 0:
                    return "stdin closed"
                continue
            sock.sendall(data)


def _cmd_console(args: argparse.Namespace) -> int:
    dom = resolve(args.domain)
    path = require_endpoint(dom, "console")
    try:
        stdin_fd = sys.stdin.fileno()
    except (AttributeError, ValueError, OSError):   # started with stdin closed
        stdin_fd = os.open(os.devnull, os.O_RDONLY)
    stdout_fd = sys.stdout.fileno()
    if args.log:
        log = dom.endpoints.get("console_log")
        try:
            with open(log, "rb") as fh:
                sys.stdout.flush()
                # Always without queries: replayed to a terminal, they would make it answer
                # into the guest's shell.
                _write_all(stdout_fd, strip_console_queries(fh.read()))
        except (OSError, TypeError) as exc:
            print(f"qemu-kd: warning: cannot read the console log of {dom.name}: {exc}",
                  file=sys.stderr)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(path)
    except OSError as exc:
        sock.close()
        raise DomainLookupError(f"cannot attach to the console of {dom.name}: "
                                f"{exc.strerror or exc}", "is the domain still running?") from None
    interactive = os.isatty(stdin_fd) and not args.no_tty
    saved = None
    try:
        if interactive:
            import termios
            import tty

            print(f"Connected to the console of {dom.name} (escape character is ^])",
                  file=sys.stderr, flush=True)
            saved = termios.tcgetattr(stdin_fd)
            tty.setraw(stdin_fd)
        sys.stdout.flush()
        why = relay_console(sock, stdin_fd, stdout_fd, interactive=interactive, linger=args.linger,
                            strip_queries=not os.isatty(stdout_fd))
    except KeyboardInterrupt:
        why = "interrupted"
    except BrokenPipeError:
        why = "output closed"
    except OSError as exc:
        raise KdError(f"the console of {dom.name} broke: {exc.strerror or exc}") from None
    finally:
        if saved is not None:
            import termios

            termios.tcsetattr(stdin_fd, termios.TCSADRAIN, saved)
        sock.close()
    if why == "console closed":
        print(f"\nthe console of {dom.name} closed (has the domain stopped?)", file=sys.stderr)
    elif interactive:
        print(f"\ndetached from the console of {dom.name}", file=sys.stderr)
    return 0


# -- destroy -----------------------------------------------------------------------------------

def _cmd_destroy(args: argparse.Namespace) -> int:
    from qemu_kd.hostport.client import HostPortClient

    dom = resolve(args.domain)
    with HostPortClient(dom.platform_socket, timeout=120.0, client_name="qemu-kd destroy") as client:
        freed = client.destroy_kd(dom.keyid)
    from qemu_kd.cli.kept import remove_record

    remove_record(dom.platform_pid, dom.keyid)
    if args.json:
        print(json.dumps({"name": dom.name, "qualified_name": dom.qualified, "keyid": dom.keyid,
                          "platform": {"pid": dom.platform_pid, "socket": dom.platform_socket},
                          "destroyed": True, "pages_freed": freed}, indent=2))
    else:
        print(f"{dom.name} destroyed on platform {dom.platform_pid}: QEMU stopped, "
              f"{freed} pages scrubbed and freed")
    return 0


# -- parsers -----------------------------------------------------------------------------------

def add_domain_parsers(sub) -> None:
    """Register ``ls``, ``qmp-shell``, ``gdb``, ``console`` and ``destroy`` on ``sub``."""
    name_help = "the domain: its name (run --name, or kdN), N for KeyID N, or PID:NAME"

    ls = sub.add_parser("ls", help="list the running key domains of every platform daemon")
    ls.add_argument("--json", action="store_true", help="print a JSON list")
    ls.add_argument("-a", "--all", action="store_true",
                    help="also list domains that are still being built")
    ls.set_defaults(func=_cmd_ls)

    qmp = sub.add_parser("qmp-shell", help="qmp-shell on a domain's filtered QMP endpoint")
    qmp.add_argument("domain", help=name_help)
    qmp.add_argument("-H", "--hmp", action="store_true", help="HMP through human-monitor-command")
    qmp.add_argument("-p", "--pretty", action="store_true", help="pretty-print JSON")
    qmp.add_argument("-v", "--verbose", action="store_true", help="echo commands sent and received")
    qmp.set_defaults(func=_cmd_qmp_shell)

    gdb = sub.add_parser("gdb", help="gdb on a domain's filtered gdb endpoint",
                         description="Runs gdb attached to the domain. Arguments after the "
                                     "domain (or after --) go to gdb.")
    gdb.add_argument("--gdb", default="gdb", help="the gdb to run (default: gdb on PATH)")
    gdb.add_argument("domain", help=name_help)
    gdb.add_argument("gdb_args", nargs=argparse.REMAINDER, help="more gdb arguments")
    gdb.set_defaults(func=_cmd_gdb)

    con = sub.add_parser("console", help="attach to a domain's console (Ctrl-] detaches)")
    con.add_argument("domain", help=name_help)
    con.add_argument("--log", action="store_true",
                     help="print the console log since the domain started first")
    con.add_argument("--linger", type=wait_seconds, default=1.0, metavar="SECONDS",
                     help="without a terminal: after stdin ends, keep printing console output "
                          "until it has been quiet this long (default 1; inf waits for the end)")
    con.add_argument("--no-tty", action="store_true",
                     help="relay bytes as is even when stdin is a terminal")
    con.set_defaults(func=_cmd_console)

    destroy = sub.add_parser("destroy", help="destroy a domain (QEMU stopped, memory scrubbed)")
    destroy.add_argument("domain", help=name_help)
    destroy.add_argument("--json", action="store_true", help="print one JSON object")
    destroy.set_defaults(func=_cmd_destroy)
