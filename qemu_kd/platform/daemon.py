"""The platform daemon: one emulated key-domain platform serving its host port.

``qemu-kd platform serve [--socket PATH] [--state DIR] [--memory SIZE] [--accel A]``

* keeps numpy's BLAS to one thread (:mod:`qemu_kd.common.blas`): its worker threads
  would only take CPU from the host VMM and the CLI starting beside it;
* sweeps what dead qemu-kd processes left in the runtime directory (registry
  entries, private directories: :mod:`qemu_kd.common.rundirs`);
* loads (or creates, on first use) the installation's emulated root CA and the
  platform identity from the state directory;
* serves the host port on a Unix socket (mode 0600) and prints one line,
  ``ready <socket>``, on stdout once clients can connect; what only launch,
  snapshot-kd and restore-kd use (the QEMU runtime, the QMP and gdb proxies,
  snapshots: :data:`LATER_MODULES`) it imports in a background thread once it has
  answered its first request past platform-info (an alloc), and those requests
  wait for that import (a module that fails to import is an error reply);
* registers itself in ``<runtime>/platforms/<pid>.json`` so ``qemu-kd ls`` and
  friends find it, and removes that entry when it ends;
* on SIGTERM or SIGINT destroys every domain (QEMU stopped, guest RAM and
  shadow scrubbed), removes its socket and its work directory, and exits 0
  (run as ``python -m``, with ``os._exit`` once all that is done: the
  interpreter's teardown would only keep its starter waiting);
* with ``--exit-when-idle`` it also ends by itself once it has launched a
  domain and none is left running: a domain whose QEMU has ended (the guest
  powered off, or QEMU was killed) is destroyed (what ``qemu-kd run --keep``
  uses);
* with ``--remove-dir DIR`` it takes over the caller's private directory DIR
  (its pid goes into ``DIR/owner``) and removes it when it ends;
* with ``--stdin-lifeline`` it stops, as on SIGTERM, if its stdin reaches end of
  file before a ``keep`` line arrived: the process that started it died before
  handing a domain over to it.

Whatever it maps is gone when it dies, even by SIGKILL: DRAM is an unlinked
file, guest RAM a memfd, and QEMU dies with it (``PR_SET_PDEATHSIG``).  Its
registry entry and private directories are swept by the next platform or run,
or ``qemu-kd clean``.

A socket another live platform serves is a one-line error (exit 2), never a
takeover.
"""

from __future__ import annotations

import argparse
import json
import ctypes
import logging
import os
import shutil
import signal
import sys
import threading
import time
from pathlib import Path

from qemu_kd.common.blas import single_threaded_blas
from qemu_kd.common.errors import ConfigError, KdError
from qemu_kd.common.lateimports import LateImports
from qemu_kd.common.log import configure as configure_logging
from qemu_kd.common.rundirs import sweep_dead_dirs, take_over
from qemu_kd.hostport.registry import default_socket, platform_state_dir, registry_dir, sweep_stale_entries
from qemu_kd.hostport.spawn import KEEP_LINE, READY_PREFIX

DEFAULT_MEMORY = "1G"
IDLE_POLL = 1.0
#: Imported once the platform serves (:class:`qemu_kd.common.lateimports.LateImports`).
LATER_MODULES = ("qemu_kd.platform.runtime", "qemu_kd.platform.endpoints.qmp_proxy",
                 "qemu_kd.platform.endpoints.gdb_proxy", "qemu_kd.platform.snapshot")

log = logging.getLogger(__name__)


def load_identity(pstate: Path):
    """The root CA and platform identity kept in ``pstate`` (created on first use)."""
    from qemu_kd.platform.identity import PlatformIdentity, RootCA

    pstate.mkdir(mode=0o700, parents=True, exist_ok=True)
    root = RootCA.load_or_create(pstate)
    return root, PlatformIdentity.load_or_create(pstate, root)


class PlatformDaemon:
    """Platform + host-port server + registry entry, with a clean stop."""

    def __init__(self, socket_path: Path, pstate: Path, memory_size: int, accel: str,
                 exit_when_idle: bool = False):
        self.socket_path = Path(socket_path)
        self.pstate = Path(pstate)
        self.memory_size = memory_size
        self.accel = accel
        self.exit_when_idle = exit_when_idle
        self.platform = None
        self.server = None
        self.registry_entry = registry_dir() / f"{os.getpid()}.json"
        self._stop = threading.Event()

    def start(self) -> None:
        from qemu_kd.platform.hostport_server import HostPortServer
        from qemu_kd.platform.hardware import Platform

        swept = sweep_stale_entries() + sweep_dead_dirs()
        if swept:
            log.info("removed %d leftovers of dead qemu-kd processes: %s", len(swept),
                     ", ".join(p.name for p in swept))
        _root, identity = load_identity(self.pstate)
        self.platform = Platform(identity, self.memory_size, qemu_accel=self.accel)
        platform, pstate = self.platform, self.pstate

        def snapshots():
            from qemu_kd.platform.snapshot import SnapshotService

            return SnapshotService(platform, pstate)

        try:
            self.server = HostPortServer(self.platform, self.socket_path, snapshots=snapshots,
                                         later=LateImports(LATER_MODULES, "the platform")).start()
        except BaseException:
            self.platform.close()
            self.platform = None
            raise
        entry = json.dumps({"pid": os.getpid(), "socket": str(self.socket_path),
                            "state": str(self.pstate), "accel": self.accel,
                            "memory_size": self.memory_size, "started": time.time()})
        tmp = self.registry_entry.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "w") as f:
            os.fchmod(f.fileno(), 0o600)
            f.write(entry)
        os.replace(tmp, self.registry_entry)

    def wait(self) -> None:
        """Block until asked to stop (or, with exit_when_idle, until no domain is left)."""
        launched_once = False
        while not self._stop.wait(IDLE_POLL):
            if not self.exit_when_idle:
                continue
            with self.platform.lock:
                self._destroy_ended_domains()
                busy = bool(self.platform.domains)
                launched_once |= bool(self.platform.runtimes)
            # A request still being answered (the destroy-kd that ended the last domain, say)
            # keeps the platform up until its reply is sent: closing cuts its connection.
            busy = busy or self.server.pending_bytes > 0
            if launched_once and not busy:
                log.info("no domain is left; the platform ends (--exit-when-idle)")
                return

    def _destroy_ended_domains(self) -> None:
        """Destroy the launched domains whose QEMU has ended (powered off or killed)."""
        for keyid, runtime in list(self.platform.runtimes.items()):
            if not getattr(runtime, "running", True) and keyid in self.platform.domains:
                log.info("key domain %d: its QEMU has ended; destroying the domain", keyid)
                try:
                    self.platform.destroy_kd(keyid)
                except KdError as exc:
                    log.warning("key domain %d: destroy failed: %s", keyid, exc)

    def watch_lifeline(self, stream) -> None:
        """Stop unless ``stream`` (stdin) carries a keep line before it ends."""
        def watch() -> None:
            try:
                for line in stream:
                    if line.strip() == KEEP_LINE:
                        log.info("the domain was handed over; the platform outlives its starter")
                        return
            except (OSError, ValueError):
                pass
            log.info("the process that started the platform has ended; stopping")
            self.request_stop()

        threading.Thread(target=watch, daemon=True, name="lifeline").start()

    def request_stop(self, *_args) -> None:
        self._stop.set()

    def close(self) -> None:
        if self.server is not None or self.platform is not None:
            log.info("platform stopping: destroying its domains")
        self.registry_entry.unlink(missing_ok=True)
        if self.server is not None:
            self.server.close()
            self.server = None
        if self.platform is not None:
            self.platform.close()
            self.platform = None


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="qemu-kd platform serve",
                                 description="run the emulated key-domain platform and serve its host port")
    ap.add_argument("--socket", help="host-port socket (default: platform.sock in the runtime directory)")
    ap.add_argument("--state", help="state directory for the root CA and platform keys "
                                    "(default: platform/ in the qemu-kd state directory)")
    ap.add_argument("--memory", default=DEFAULT_MEMORY,
                    help=f"host-physical memory the platform emulates (default {DEFAULT_MEMORY})")
    ap.add_argument("--accel", default="auto", choices=("auto", "kvm", "tcg"),
                    help="accelerator for launched domains (auto probes KVM, falls back to TCG)")
    ap.add_argument("--exit-when-idle", action="store_true",
                    help="exit once a launched domain has been destroyed and none is left")
    ap.add_argument("--remove-dir", help="a private directory of the caller's to take over and remove on exit")
    ap.add_argument("--stdin-lifeline", action="store_true",
                    help=f"stop when stdin ends before a {KEEP_LINE!r} line arrived")
    return ap.parse_args(argv)


#: glibc's mallopt parameter for the size from which an allocation gets its own mapping.
_M_MMAP_THRESHOLD = -3


def return_large_frees_to_the_kernel(threshold: int = 128 << 10) -> None:
    """Large temporaries (guest pages on their way through the MEE) get their own mappings,
    so freeing them gives the memory back instead of leaving it in glibc's heap."""
    try:
        ctypes.CDLL(None).mallopt(_M_MMAP_THRESHOLD, threshold)
    except (OSError, AttributeError):
        pass    # not glibc: the default behaviour


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    single_threaded_blas()      # before numpy's first import (in start)
    return_large_frees_to_the_kernel()
    configure_logging(logging.INFO)
    daemon = None
    served = False
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set() if daemon is None else daemon.request_stop())
    signal.signal(signal.SIGINT, lambda *_: stop.set() if daemon is None else daemon.request_stop())
    try:
        from qemu_kd.qemu.accel import choose_accel
        from qemu_kd.common.units import parse_size

        memory_size = parse_size(args.memory)
        accel = args.accel
        if accel == "auto":
            from qemu_kd.guest.cache import ensure_guest

            accel = choose_accel("auto", ensure_guest().kernel).name
        if args.remove_dir:
            try:
                take_over(args.remove_dir)
            except OSError as exc:
                raise ConfigError(f"cannot take over the directory {args.remove_dir}: {exc.strerror or exc}",
                                  "give an existing private directory of the caller's") from None
        daemon = PlatformDaemon(Path(args.socket) if args.socket else default_socket(),
                                Path(args.state) if args.state else platform_state_dir(),
                                memory_size, accel, exit_when_idle=args.exit_when_idle)
        if args.stdin_lifeline:
            daemon.watch_lifeline(sys.stdin)
        daemon.start()
        if stop.is_set():
            return 0
        log.info("platform serving its host port on %s (%s MiB, accel %s, pid %d)",
                 daemon.socket_path, memory_size >> 20, accel, os.getpid())
        # Machine-readable (hostport.spawn parses it): a plain line on stdout, not a log record.
        print(f"{READY_PREFIX}{daemon.socket_path}", flush=True)
        served = True
        daemon.wait()
        return 0
    except KdError as exc:
        print(f"qemu-kd platform: error: {exc}", file=sys.stderr, flush=True)
        return exc.exit_code
    finally:
        if daemon is not None:
            daemon.close()
        if served:   # after a failed start the error line stays the log's last line
            log.info("platform stopped")
        if args.remove_dir:
            shutil.rmtree(args.remove_dir, ignore_errors=True)


if __name__ == "__main__":
    # Everything is destroyed, scrubbed and removed by the time main returns.
    from qemu_kd.common.process import exit_without_teardown

    exit_without_teardown(main())
