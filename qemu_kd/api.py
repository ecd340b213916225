"""The Python API: a platform as a context manager, and the domains it launches.

::

    import qemu_kd

    with qemu_kd.Platform() as platform:
        guest = platform.launch()                  # protected; plain=True for an unprotected one
        result = guest.exec("uname -r")
        assert result.rc == 0
        report = guest.attest(b"my nonce")         # verified against the expected measurement

A protected domain goes the whole way a tenant goes: the platform daemon runs
the hardware, an untrusted host VMM process lays the domain out, the tenant
seals the image, the host loads and launches it, and the tenant attests the
guest and opens its session.  Every ``exec``, ``put_file`` and ``get_file``
then travels inside that session.  A plain domain is a QEMU guest without the
platform, driven through the guest agent directly (for comparison).

``docs/api.md`` documents this module.
"""

from __future__ import annotations

import hashlib
import os
import posixpath
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable

from qemu_kd.common.errors import ConfigError, GuestError, KdError

if TYPE_CHECKING:
    from qemu_kd.formats.report import AttestationReport
    from qemu_kd.guest.additions import GuestAdditions

MiB = 1 << 20
#: Platform memory beyond the guest's own (EPT, VMCS and the other pages a domain needs).
DOMAIN_OVERHEAD = 64 * MiB
REPORT_DATA_SIZE = 64
#: How long a snapshot or a restore may take the platform (seconds).
SNAPSHOT_TIMEOUT = 600.0
#: The phases of a protected launch the host VMM times and reports (they run between verify and attest).
PROTECTED_BOOT_PHASES = ("launch", "kernel to agent ready")
#: The phases of a restore the host VMM times and reports (they run before attest).
RESTORE_PHASES = ("restore", "agent ready")
#: The phases of a plain launch from QEMU's start to the agent's ready.
PLAIN_BOOT_PHASES = ("qemu start", "layout", "vcpu load", "kernel to agent ready")


class NotProtectedError(KdError):
    """An operation only a protected domain offers was asked of a plain one."""


class DomainGoneError(KdError):
    """The domain was destroyed."""


@dataclass(frozen=True)
class ExecResult:
    """A finished guest command.

    ``rc`` is the exit status (negative: killed by that signal); ``timed_out``
    says it ran past its timeout and was killed; ``truncated`` says an output
    stream hit the agent's cap and was cut.
    """

    rc: int
    stdout: bytes
    stderr: bytes
    timed_out: bool = False
    truncated: bool = False

    @property
    def ok(self) -> bool:
        """It exited with status 0 in time."""
        return self.rc == 0 and not self.timed_out

    @property
    def stdout_text(self) -> str:
        return self.stdout.decode("utf-8", errors="replace")

    @property
    def stderr_text(self) -> str:
        return self.stderr.decode("utf-8", errors="replace")


class ExecStream:
    """A guest command's output piece by piece, while it runs: iterate for ``(stream, data)``
    pairs (``stream`` is ``"stdout"`` or ``"stderr"``, ``data`` the bytes that arrived).  Once
    the iteration ends, ``result`` is the :class:`ExecResult` (the output in full).

    Use it as a context manager: leaving early (a ``break``, an exception) kills the command.
    """

    def __init__(self, pieces: Any):
        self._pieces = pieces
        self._out = {"stdout": bytearray(), "stderr": bytearray()}
        #: The finished command, once the iteration has ended.
        self.result: ExecResult | None = None

    def __iter__(self):
        while self.result is None:
            try:
                name, data = next(self._pieces)
            except StopIteration as stop:
                end = stop.value
                self.result = ExecResult(end["rc"], bytes(self._out["stdout"]), bytes(self._out["stderr"]),
                                         end["timed_out"], end["truncated"])
                return
            self._out[name] += data
            yield name, data

    def close(self) -> None:
        """Kill the command if it still runs (its output so far stays unread)."""
        self._pieces.close()

    def __enter__(self) -> "ExecStream":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass(frozen=True)
class AttestationResult:
    """A report over the caller's nonce: the raw report, the platform's certificate chain
    (PEM) and the verified view (signature, chain, measurement, policy and report_data
    all checked)."""

    report: bytes
    chain_pem: bytes
    verified: "AttestationReport"
    report_data: bytes
    #: The platform's root certificate (PEM) the chain was checked against.
    root_pem: bytes = b""

    def verify_report_argv(self, report_path: str | Path, root_path: str | Path,
                           chain_path: str | Path) -> list[str]:
        """The ``qemu-kd tenant verify-report`` arguments that check this report again, once
        ``report``, ``root_pem`` and ``chain_pem`` are written to those paths."""
        v = self.verified
        return ["tenant", "verify-report", "--report", str(report_path), "--root", str(root_path),
                "--chain", str(chain_path), "--report-data", self.report_data.hex(),
                "--measurement", v.measurement.hex(), "--policy", v.policy.pack().hex(),
                "--host-data", v.host_data.hex(), "--allow-emulated"]


def report_data_for_nonce(nonce: bytes) -> bytes:
    """The 64-byte report_data for ``nonce``: the nonce itself, zero-padded, when it fits;
    otherwise its SHA-512."""
    if len(nonce) <= REPORT_DATA_SIZE:
        return nonce.ljust(REPORT_DATA_SIZE, b"\0")
    return hashlib.sha512(nonce).digest()


def guest_memory(memory: int | str) -> int:
    """A guest memory size (``"256M"``, ``"1G"`` or bytes), checked."""
    from qemu_kd.common.units import check_guest_memory, parse_size

    return check_guest_memory(parse_size(memory) if isinstance(memory, str) else int(memory))


def in_order(timings: dict[str, float], order: tuple[str, ...]) -> dict[str, float]:
    """``timings`` with the phases named in ``order`` first, in that order (the order they ran)."""
    known = {name: timings[name] for name in order if name in timings}
    return {**known, **{name: secs for name, secs in timings.items() if name not in known}}


def surviving_files(endpoints: dict) -> dict:
    """The endpoints of a domain that is gone: its sockets are null, and so is any log
    that went with it; files that outlive it (the console log) keep their path."""
    return {name: path if path and Path(path).is_file() else None
            for name, path in endpoints.items()}


def keep_platform_log(exc: KdError, log: Path | None) -> Path | None:
    """Copy a platform daemon's log (in a private directory about to be removed) to the log
    directory, mode 0600, and name the copy in ``exc``'s hint; the copy, or None without a log."""
    import time

    from qemu_kd.common.files import write_file_atomic
    from qemu_kd.qemu.machine import log_dir

    if log is None:
        return None
    try:
        data = log.read_bytes()
    except OSError:
        return None
    saved = log_dir() / f"platform-{os.getpid()}-{int(time.time())}.log"
    try:
        write_file_atomic(saved, data, mode=0o600)
    except OSError:
        return None
    exc.hint = (f"{exc.hint}; " if exc.hint else "") + f"the platform's log is kept in {saved}"
    return saved


def _in_thread(fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)`` started in a thread of its own; a future whose ``result()`` waits for it
    (and raises what it raised)."""
    from concurrent.futures import ThreadPoolExecutor

    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=getattr(fn, "__name__", "work"))
    try:
        return pool.submit(fn, *args)
    finally:
        pool.shutdown(wait=False)


def _as_argv(command: str | Iterable[str]) -> list[str]:
    if isinstance(command, str):
        return ["/bin/sh", "-c", command]
    argv = [str(a) for a in command]
    if not argv:
        raise ConfigError("exec needs a command", "pass a shell string or a non-empty argv list")
    return argv


def _read(path: str | Path, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read the {what} {path}: {exc.strerror or exc}",
                          "pass an existing file, or neither kernel nor initrd for the default guest") from None


@dataclass(frozen=True)
class GuestImage:
    """The kernel and initrd a domain boots."""

    kernel: bytes
    initrd: bytes
    kernel_path: Path


def resolve_image(kernel: str | Path | None, initrd: str | Path | None,
                  additions: "GuestAdditions | None") -> GuestImage:
    """Your own kernel and initrd, or the default guest (with ``additions``), built if needed."""
    if kernel is not None or initrd is not None:
        if additions:
            raise ConfigError("additions build on the default guest, not on your own kernel and initrd",
                              "add the files to your own initrd, or drop kernel and initrd")
        if kernel is None or initrd is None:
            raise ConfigError("kernel and initrd go together", "pass both, or neither for the default guest")
        return GuestImage(_read(kernel, "kernel"), _read(initrd, "initrd"), Path(kernel))
    from qemu_kd.guest.additions import GuestAdditions, ensure_custom_guest

    art = ensure_custom_guest(additions or GuestAdditions())
    return GuestImage(_read(art.kernel, "kernel"), _read(art.initrd, "initrd"), Path(art.kernel))


# -- domains -------------------------------------------------------------------------------------

class Domain:
    """A running guest.  ``exec``, ``put_file`` and ``get_file`` work in both modes; a
    protected domain runs them through the tenant's attested session."""

    #: ``"protected"`` or ``"plain"``.
    mode: str = ""

    def __init__(self, name: str):
        self.name = name
        self._gone = False
        #: Seconds per launch phase, in the order they ran (``Platform(progress=...)`` names each
        #: phase as it starts).
        self.timings: dict[str, float] = {}
        #: The snapshot file this domain was restored from (``Platform.restore``); None when booted.
        self.restored_from: Path | None = None

    @property
    def protected(self) -> bool:
        return self.mode == "protected"

    # The operations each mode provides.
    def _exec(self, argv: list[str], stdin: bytes, timeout: float | None,
              env: dict[str, str] | None) -> dict:
        raise NotImplementedError

    def _exec_output(self, argv: list[str], stdin: bytes, timeout: float | None,
                     env: dict[str, str] | None) -> Any:
        """The command as a background job in the guest: a generator of ``(stream, data)``
        that returns ``rc``, ``timed_out`` and ``truncated`` (qemu_kd.channel.exec_job)."""
        raise NotImplementedError

    def _put(self, path: str, data: bytes, mode: int) -> None:
        raise NotImplementedError

    def _get(self, path: str) -> bytes:
        raise NotImplementedError

    def _shutdown(self) -> None:
        raise NotImplementedError

    @property
    def endpoints(self) -> dict[str, str | None]:
        """Socket and log paths: ``console``, ``console_log``, ``qmp``, ``gdb``, ``audit_log``."""
        raise NotImplementedError

    def _check(self) -> None:
        if self._gone:
            raise DomainGoneError(f"domain {self.name} was destroyed", "launch a new one")

    # -- the public operations ---------------------------------------------------------------
    def exec(self, command: str | Iterable[str], *, stdin: bytes | str | None = None,
             timeout: float | None = None, env: dict[str, str] | None = None,
             on_output: Callable[[str, bytes], None] | None = None) -> ExecResult:
        """Run ``command`` (a shell string, or an argv list) in the guest and wait for it.

        ``timeout`` (seconds; None: no limit) kills it when it runs longer; the result
        then has ``timed_out``.  Output beyond the agent's cap is cut (``truncated``).
        ``on_output(stream, data)`` (``stream`` is ``"stdout"`` or ``"stderr"``) gets the
        output as it arrives, while the command runs; the result is the same either way.
        """
        with self.exec_stream(command, stdin=stdin, timeout=timeout, env=env) as stream:
            for name, data in stream:
                if on_output is not None:
                    on_output(name, data)
        assert stream.result is not None
        return stream.result

    def exec_stream(self, command: str | Iterable[str], *, stdin: bytes | str | None = None,
                    timeout: float | None = None, env: dict[str, str] | None = None) -> ExecStream:
        """Start ``command`` as :meth:`exec` does and return its output as it arrives, an
        :class:`ExecStream` (``with domain.exec_stream(cmd) as s: for stream, data in s: ...``;
        then ``s.result``)."""
        self._check()
        data = stdin.encode() if isinstance(stdin, str) else (stdin or b"")
        return ExecStream(self._exec_output(_as_argv(command), data, timeout, env))

    def put_file(self, path: str, data: bytes | str | Path, mode: int = 0o644) -> int:
        """Write ``data`` (bytes, or the contents of a host file given as a Path) to ``path`` in
        the guest with ``mode``, creating missing parent directories; the number of bytes written."""
        self._check()
        if isinstance(data, Path):
            data = _read(data, "file")
        elif isinstance(data, str):
            data = data.encode()
        parent = posixpath.dirname(path)
        if parent not in ("", "/"):
            made = self._exec(["mkdir", "-p", parent], b"", None, None)
            if made["rc"] != 0:
                raise GuestError(f"cannot create {parent} in {self.name}: "
                                 f"{made['stderr'].decode(errors='replace').strip()}")
        self._put(path, data, mode)
        return len(data)

    def get_file(self, path: str) -> bytes:
        """The contents of ``path`` in the guest."""
        self._check()
        return self._get(path)

    def attest(self, nonce: bytes) -> AttestationResult:
        """A report over ``nonce`` (see :func:`report_data_for_nonce`), verified."""
        raise NotProtectedError(f"{self.name} is a plain domain: no platform signs a report for it",
                                "launch it with plain=False to attest it")

    def qmp(self) -> Any:
        """A connected ``qemu.qmp.legacy.QEMUMonitorProtocol`` client on the domain's QMP endpoint
        (the platform's filtering proxy for a protected domain).  Close it when done."""
        self._check()
        from qemu.qmp.legacy import QEMUMonitorProtocol

        path = self.endpoints.get("qmp")
        if not path:
            raise GuestError(f"{self.name} has no QMP endpoint")
        mon = QEMUMonitorProtocol(path)
        mon.connect()
        return mon

    def gdb(self, gdb: str = "gdb") -> Any:
        """A ``pygdbmi`` ``GdbController`` with gdb attached to the domain's gdb endpoint (the
        platform's filtering proxy) in asynchronous mode.  Call ``exit()`` on it when done."""
        self._check()
        path = self.endpoints.get("gdb")
        if not path:
            raise GuestError(f"{self.name} has no gdb endpoint",
                             "a plain domain's gdbstub serves the harness itself")
        if shutil.which(gdb) is None:
            raise ConfigError(f"{gdb} is not installed", "install gdb (Debian: apt-get install gdb)")
        from pygdbmi.gdbcontroller import GdbController

        ctl = GdbController(command=[gdb, "--nx", "--quiet", "--interpreter=mi3"])
        for command in ("-gdb-set mi-async on", "-gdb-set architecture i386:x86-64",
                        f"-target-select remote {path}"):
            records = ctl.write(command, timeout_sec=30, raise_error_on_timeout=False)
            errors = [r for r in records if r.get("type") == "result" and r.get("message") == "error"]
            if errors:
                ctl.exit()
                raise GuestError(f"gdb refused {command!r}: {errors[0].get('payload')}")
        return ctl

    def console(self, timeout: float = 30.0) -> Any:
        """A ``pexpect`` spawn on the guest's serial console (ttyS0).  A root shell answers there
        only in a plain or a DEBUG domain.  Close it when done."""
        self._check()
        import pexpect

        path = self.endpoints.get("console")
        if not path:
            raise GuestError(f"{self.name} has no console endpoint")
        python = shutil.which("python3") or "python3"
        bridge = ("import socket,sys,os,select\n"
                  "s=socket.socket(socket.AF_UNIX);s.connect(sys.argv[1])\n"
                  "while True:\n"
                  " r,_,_=select.select([s,0],[],[])\n"
                  " if s in r:\n"
                  "  d=s.recv(65536)\n"
                  "  if not d: break\n"
                  "  os.write(1,d)\n"
                  " if 0 in r:\n"
                  "  d=os.read(0,65536)\n"
                  "  if not d: break\n"
                  "  s.sendall(d)\n")
        return pexpect.spawn(python, ["-c", bridge, path], timeout=timeout, echo=False)

    def _log_text(self, endpoint: str) -> str:
        log = self.endpoints.get(endpoint)
        try:
            return Path(log).read_text(errors="replace") if log else ""
        except OSError:
            return ""

    def console_text(self) -> str:
        """The console output so far (the console log)."""
        return self._log_text("console_log")

    def audit_text(self) -> str:
        """The platform's audit log of the domain's QMP and gdb endpoints so far ("" when plain)."""
        return self._log_text("audit_log")

    def snapshot(self, path: str | Path) -> dict:
        """Write an encrypted snapshot of this running domain to ``path`` (docs/snapshots.md);
        only a protected domain has one."""
        raise NotProtectedError(f"{self.name} is a plain domain: only protected domains have snapshots",
                                "launch it with plain=False")

    def destroy(self) -> None:
        """Stop the guest and free its resources (idempotent)."""
        if self._gone:
            return
        self._gone = True
        self._shutdown()

    def __enter__(self) -> "Domain":
        return self

    def __exit__(self, *exc: object) -> None:
        self.destroy()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name} {self.mode}{' destroyed' if self._gone else ''}>"


class PlainDomain(Domain):
    """An unprotected QEMU guest, driven through its agent on the shared channel."""

    mode = "plain"

    def __init__(self, name: str, guest: Any):
        super().__init__(name)
        self._guest = guest
        self.ready: dict = guest.agent.ready or {}
        self._ram_window = None

    @property
    def endpoints(self) -> dict[str, str | None]:
        m = self._guest.machine
        if self._gone or m.sockdir is None:
            return {"console_log": str(m.console_log) if m.console_log else None}
        return {"console": m.socket_path("console"), "qmp": m.socket_path("qmp-host"), "gdb": None,
                "console_log": str(m.console_log) if m.console_log else None, "audit_log": None}

    def _exec(self, argv, stdin, timeout, env):
        import base64

        extra: dict = {"stdin": stdin.decode("utf-8", errors="surrogateescape")} if stdin else {}
        if env:
            extra["env"] = dict(env)
        raw = self._guest.agent.exec(argv, timeout=timeout, **extra)
        out = dict(raw)
        for stream in ("stdout", "stderr"):
            value = raw.get(stream, "")
            out[stream] = value.encode() if isinstance(value, str) else base64.b64decode(value)
        return out

    def _exec_output(self, argv, stdin, timeout, env):
        from qemu_kd.channel.exec_job import job_output, start_args

        return job_output(self._guest.agent.call, start_args(argv, stdin=stdin, timeout=timeout, env=env))

    def _window(self):
        """The buffer the guest shares for file transfers (asked for on first use)."""
        if self._ram_window is None:
            from qemu_kd.channel.ram_window import RamWindow

            self._ram_window = RamWindow(self._guest.agent, self._guest.machine.map_ram())
        return self._ram_window

    def _put(self, path, data, mode):
        try:
            self._window().put_file(path, data, mode)
        except GuestError as exc:
            raise GuestError(f"cannot write {path} in {self.name}: {exc.message}") from None

    def _get(self, path):
        try:
            return self._window().get_file(path)
        except GuestError as exc:
            raise GuestError(f"cannot read {path} in {self.name}: {exc.message}") from None

    def _shutdown(self):
        self._guest.shutdown()


class ProtectedDomain(Domain):
    """A key-domain protected guest: launched by the host VMM, attested by the tenant."""

    mode = "protected"

    def __init__(self, name: str, host: Any, session: Any, *, keyid: int, endpoints: dict,
                 expected: bytes, policy: Any, root_pem: bytes, layout: Any,
                 secret: Any = None, ready: dict | None = None,
                 host_verification: dict | None = None, exposed_register_mask: int = 0):
        super().__init__(name)
        self._host = host
        self.session = session
        self.keyid = keyid
        self._endpoints = dict(endpoints)
        self.measurement = expected
        self.policy = policy
        self._root_pem = root_pem
        self._layout = layout
        #: The tenant secret (the domain key, measurement, policy, host_data): what a later
        #: session with this domain needs (``qemu-kd exec`` keeps it for a kept domain).
        self.secret = secret
        #: The agent's ready message (``kernel``: the guest kernel's release, ``version``).
        self.ready: dict = dict(ready or {})
        #: The host VMM's checks before launch: {check name: {"ok", "detail"}}.
        self.host_verification: dict = dict(host_verification or {})
        self.exposed_register_mask = exposed_register_mask
        self._kept = False

    @property
    def attestation(self) -> Any:
        """The attestation the launch verified (``qemu_kd.tenant.session.Attestation``: the report,
        its raw bytes, the tenant's nonce, the agent's session public key and the chain)."""
        return self.session.attestation

    @property
    def chain_pem(self) -> bytes:
        """The platform's certificate chain (PEM) the tenant checked."""
        return self._layout.platform_chain_pem

    @property
    def endpoints(self) -> dict[str, str | None]:
        if self._gone and not self._kept:
            return surviving_files(self._endpoints)
        return dict(self._endpoints)

    def _check(self) -> None:
        if self._kept:
            raise DomainGoneError(f"domain {self.name} was handed over to its platform",
                                  f"reach it with qemu-kd exec {self.name}")
        super()._check()

    def status(self) -> dict:
        """The host VMM's status of the domain (``integrity_events`` among it)."""
        self._check()
        return self._host.call("status")

    def _release(self) -> None:
        """The host VMM lets go of the domain (its shared channel included); it keeps running."""
        self._check()
        self._host.call("detach")
        self._host.stop()
        self._kept = self._gone = True

    def _exec(self, argv, stdin, timeout, env):
        return self.session.exec(argv, stdin=stdin, timeout=timeout, env=env)

    def _exec_output(self, argv, stdin, timeout, env):
        return self.session.exec_output(argv, stdin=stdin, timeout=timeout, env=env)

    def _put(self, path, data, mode):
        self.session.put_file(path, data, mode)

    def _get(self, path):
        return self.session.get_file(path)

    def attest(self, nonce: bytes) -> AttestationResult:
        """Ask the guest (inside the session) for a report over ``nonce`` and verify it: the
        platform's signature and chain, the measurement, the policy, host_data and that the
        report_data is :func:`report_data_for_nonce` of ``nonce``."""
        self._check()
        from qemu_kd.tenant.verify import check_report

        data = report_data_for_nonce(bytes(nonce))
        raw = self.session.report(data)
        chain = self._layout.platform_chain_pem
        verified = check_report(raw, self._root_pem, chain, measurement=self.measurement,
                                policy=self.policy, report_data=data, host_data=self._layout.host_data,
                                allow_emulated=True)
        return AttestationResult(raw, chain, verified, data, self._root_pem)

    #: The host port of the platform the domain runs on (set by Platform.launch and restore).
    platform_socket: Path | None = None
    #: The platform's id for the domain's snapshots (hex; set by snapshot and restore).
    domain_id: str | None = None

    def snapshot(self, path: str | Path) -> dict:
        """Write an encrypted snapshot of the running domain to ``path``; the guest runs on.

        The platform writes the file: guest memory as its memory-encryption engine encrypted it,
        the vCPU and device state sealed to this platform (docs/snapshots.md).  Returns ``path``,
        ``domain_id``, ``version`` and ``size``; :meth:`Platform.restore` brings it back.
        """
        self._check()
        from qemu_kd.hostport.client import HostPortClient

        if self.platform_socket is None:
            raise ConfigError(f"{self.name} does not know its platform's host port")
        with HostPortClient(self.platform_socket, timeout=SNAPSHOT_TIMEOUT) as client:
            taken = client.snapshot_kd(self.keyid, Path(path).resolve())
        self.domain_id = taken["domain_id"]
        return taken

    def _shutdown(self):
        try:
            self._host.call("destroy")
        except KdError:
            pass   # the platform tears it down when the host VMM goes
        finally:
            self._host.stop()


# -- the platform --------------------------------------------------------------------------------

class Platform:
    """The emulated platform: a platform daemon this object starts (and stops on exit), or one
    already serving on ``socket``.

    ``memory`` is the platform's DRAM (every domain's memory plus 64 MiB each must fit);
    ``accel`` is ``"tcg"``, ``"kvm"`` or ``"auto"`` (KVM when it boots the guest).
    ``progress`` (a callable taking one line) hears the accelerator chosen and each phase of
    a start and a launch as it begins.  ``detach`` starts the daemon in its own session, so that
    :meth:`keep` can hand it a domain that outlives this process.
    """

    def __init__(self, *, socket: str | Path | None = None, memory: int | str = "1G",
                 accel: str = "auto", start_timeout: float = 60.0,
                 progress: Callable[[str], None] | None = None, detach: bool = False):
        from qemu_kd.common.units import parse_size

        self.memory = parse_size(memory) if isinstance(memory, str) else int(memory)
        self._requested_accel = accel
        self.accel: str | None = None
        #: Why ``accel`` was chosen (the probe's finding, ``requested``, or the daemon's).
        self.accel_reason: str | None = None
        self.socket: Path | None = Path(socket) if socket else None
        self._attached = socket is not None
        self._start_timeout = start_timeout
        self._progress = progress
        self._detach = detach
        self._proc: subprocess.Popen | None = None
        self._pid: int | None = None
        self.workdir: Path | None = None
        self.domains: list[Domain] = []
        #: Seconds the start took (``platform start``; empty when attached).
        self.timings: dict[str, float] = {}
        self._count = 0
        #: A daemon started and not yet waited for (``start(wait=False)``).
        self._starting: Any = None
        self._start_began = 0.0
        #: A host VMM process started together with the daemon, for the first protected launch.
        self._spare_host: Any = None
        #: A host VMM process the last restore started for the next one.
        self._restore_host: Any = None
        self._hosts = 0

    @property
    def state_dir(self) -> Path:
        from qemu_kd.hostport.registry import platform_state_dir

        return platform_state_dir()

    @property
    def log_path(self) -> Path | None:
        """The daemon's log (a platform this object started)."""
        return self.workdir / "platform.log" if self.workdir else None

    @property
    def pid(self) -> int | None:
        """The daemon's process id (an attached one's from the platform registry; None when it
        is not registered there)."""
        return self._pid

    def _say(self, message: str) -> None:
        if self._progress is not None:
            self._progress(message)

    def _choose_accel(self, kernel_path: Path) -> str:
        if self.accel is None:
            from qemu_kd.qemu.accel import choose_accel

            choice = choose_accel(self._requested_accel, kernel_path)
            self.accel, self.accel_reason = choice.name, choice.reason
            self._say(f"accelerator: {choice.name} ({choice.reason})")
        return self.accel

    def start(self, *, probe_kernel: str | Path | None = None, wait: bool = True) -> "Platform":
        """Start the daemon (or check that the one to attach to answers); idempotent.

        ``probe_kernel`` is the kernel ``accel="auto"`` and ``"kvm"`` boot to find out whether
        KVM runs it (default: the default guest's).  ``wait=False`` returns as soon as the daemon
        and the first launch's host VMM process are started, without waiting for them to serve:
        what the caller does next overlaps their start-up, and the next ``start()`` or launch
        waits for them (and raises the error of a daemon that did not start).
        """
        if self._starting is None and (self._proc is not None or
                                       (self._attached and self.workdir is not None)):
            return self
        if self._starting is None:
            from qemu_kd.common.rundirs import make_private_dir

            if self._attached:      # the daemon there runs QEMU; this process needs none
                self._attach()
                self.workdir = make_private_dir("run")
                return self
            self._spawn(probe_kernel, make_private_dir("run"))
        if wait:
            self._await_platform()
        return self

    def _spawn(self, probe_kernel: str | Path | None, workdir: Path) -> None:
        """Start the daemon and the first launch's host VMM process, side by side; wait for neither."""
        import time

        from qemu_kd.hostport.spawn import spawn_platform_process
        from qemu_kd.qemu.machine import QEMU_BINARY, find_qemu

        self.workdir = workdir
        try:
            find_qemu(os.environ.get("QEMU_KD_QEMU", QEMU_BINARY))   # a clear error now when QEMU is missing
            kernel = Path(probe_kernel) if probe_kernel else resolve_image(None, None, None).kernel_path
            accel = self._choose_accel(kernel)
            self._say("platform start")
            self._start_began = time.perf_counter()
            socket = workdir / "platform.sock"
            # The first launch's host VMM starts (imports, mostly) while the daemon does.
            self._spare_host = self._host_vmm(socket, wait_platform=self._start_timeout)
            self._starting = spawn_platform_process(
                socket, self.state_dir, accel=accel, memory_size=self.memory,
                exit_when_idle=self._detach, detach=self._detach,
                remove_dir=workdir if self._detach else None)
        except BaseException as exc:
            self._abandon_start(exc)
            raise
        self._proc = self._starting.proc    # close() stops it, whether it serves yet or not
        self._pid = self._proc.pid

    def _await_platform(self) -> None:
        """Wait for the daemon :meth:`_spawn` started to serve (``platform start`` in ``timings``
        runs from its start until then)."""
        import time

        starting, self._starting = self._starting, None
        if starting is None:
            return
        try:
            self.socket = starting.wait_ready(self._start_timeout)
        except BaseException as exc:
            from qemu_kd.hostport.spawn import stop_platform_process

            stop_platform_process(starting.proc)
            self._proc = self._pid = None
            self._abandon_start(exc)
            raise
        self.timings["platform start"] = time.perf_counter() - self._start_began

    def _abandon_start(self, exc: BaseException) -> None:
        """Undo a start that failed with ``exc``: the host VMM process and the private directory
        go; the daemon's log is kept (and named in ``exc``) when ``exc`` is an error."""
        if isinstance(exc, KdError):
            keep_platform_log(exc, self.log_path)
        self._stop_spare_host()
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)
        self.workdir = None

    def _host_vmm(self, socket: Path, wait_platform: float = 0.0) -> Any:
        """A new host VMM process for ``socket``'s platform, started; not waited for."""
        from host_vmm.process import HostVmmProcess

        assert self.workdir is not None
        self._hosts += 1
        return HostVmmProcess(str(socket), str(self.workdir / f"vmm-{self._hosts}.sock"),
                              wait_platform=wait_platform, wait_ready=False)

    def _take_host(self) -> Any:
        """The host VMM process started with the daemon if it still runs (it dies with the thread
        that started it), else a new one."""
        spare, self._spare_host = self._spare_host, None
        if spare is not None and spare.proc.poll() is None:
            return spare
        if spare is not None:
            spare.stop()
        assert self.socket is not None
        return self._host_vmm(self.socket)

    def _stop_spare_host(self) -> None:
        spare, self._spare_host = self._spare_host, None
        if spare is not None:
            spare.stop()
        spare, self._restore_host = self._restore_host, None
        if spare is not None:
            spare.stop()

    def _take_restore_host(self) -> Any:
        """The host VMM process the last restore started for this one if it still runs, else
        :meth:`_take_host`'s."""
        spare, self._restore_host = self._restore_host, None
        if spare is not None and spare.proc.poll() is None:
            return spare
        if spare is not None:
            spare.stop()
        return self._take_host()

    def _attach(self) -> None:
        """Check that a daemon answers on ``socket``; learn its accelerator and pid."""
        from qemu_kd.hostport.client import HostPortClient
        from qemu_kd.hostport.registry import running_platforms

        assert self.socket is not None
        if not self.socket.exists():
            raise ConfigError(f"no platform serves on {self.socket}",
                              "start one with `qemu-kd platform serve --socket PATH`, or leave out "
                              "socket= (--platform) to start a platform of your own")
        client = HostPortClient(self.socket, timeout=self._start_timeout)
        try:
            running = client.platform_info().accelerator    # "none" while no domain runs
        finally:
            client.close()
        here = os.path.realpath(self.socket)
        entry = next((e for e in running_platforms() if os.path.realpath(str(e["socket"])) == here), {})
        self._pid = int(entry["pid"]) if entry else None
        accel = entry.get("accel") or (running if running in ("tcg", "kvm") else None)
        if accel:
            self.accel, self.accel_reason = str(accel), f"the platform daemon's on {self.socket}"
            self._say(f"accelerator: {self.accel} ({self.accel_reason})")

    def launch(self, *, plain: bool = False, memory: int | str = "256M", debug: bool = False,
               cmdline_extra: str = "", additions: "GuestAdditions | None" = None,
               kernel: str | Path | None = None, initrd: str | Path | None = None,
               ready_timeout: float = 120.0, name: str | None = None,
               exposed_register_mask: int = 0, restorable: bool = False) -> Domain:
        """Boot a guest and return it once its agent is ready (and, protected, attested).

        ``plain`` boots it without protection (no platform, no attestation) for comparison;
        it does not need the daemon, and does not start one.
        ``debug`` seals the DEBUG policy (debug reads, a console shell, gdb stepping).
        ``cmdline_extra`` is appended to the kernel command line (and measured), e.g.
        ``"nokaslr"``.  ``additions`` adds your files to the default image; ``kernel`` and
        ``initrd`` replace it.  A guest that is not ready within ``ready_timeout`` seconds is
        an error (a :class:`~qemu_kd.common.errors.KdError`), never a hang.  ``name`` names a
        protected domain on the platform (as ``qemu-kd ls`` shows it; unique across the
        machine's platforms; by default the next free ``kdN``); a plain one is named here.
        ``exposed_register_mask`` (protected) is the VMCS's mask of the general registers the
        guest's hypercalls may show the host (measured).
        ``restorable`` (protected) seals the RESTORABLE test policy: one snapshot of the domain
        may be restored any number of times (docs/snapshots.md).
        """
        if plain and exposed_register_mask:
            raise ConfigError("exposed registers apply to protected domains",
                              "drop exposed_register_mask, or launch a protected domain")
        if not plain:
            self.start(wait=False)     # the daemon starts while the guest is read and measured
        size = guest_memory(memory)
        image = resolve_image(kernel, initrd, additions)
        from qemu_kd.qemu.launch import full_cmdline

        cmdline = full_cmdline(cmdline_extra)
        self._count += 1
        if plain:
            dom: Domain = self._launch_plain(name or f"plain-{os.getpid()}-{self._count}", image,
                                             cmdline, size, ready_timeout)
        else:
            dom = self._launch_protected(name, image, cmdline, size, debug, ready_timeout,
                                         exposed_register_mask, restorable=restorable)
            dom.platform_socket = self.socket
        self.domains.append(dom)
        return dom

    def _launch_plain(self, name: str, image: GuestImage, cmdline: str, size: int,
                      ready_timeout: float) -> PlainDomain:
        from qemu_kd.qemu.launch import PhaseTimer, boot_plain
        from qemu_kd.qemu.machine import MachineSpec, log_dir

        spec = MachineSpec(mem_size=size, accel=self._choose_accel(image.kernel_path), name=name)
        console_log = log_dir() / f"{name}-console.log"
        timer = PhaseTimer(progress=self._progress)
        guest = boot_plain(image.kernel, image.initrd, cmdline, spec, timer,
                           ready_timeout=ready_timeout, console_log=console_log)
        dom = PlainDomain(name, guest)
        dom.timings = dict(timer.phases)
        timer.progress = None     # progress covers the launch; the guest's shutdown goes unannounced
        return dom

    def _launch_protected(self, name: str | None, image: GuestImage, cmdline: str, size: int,
                          debug: bool, ready_timeout: float, exposed_register_mask: int = 0,
                          restorable: bool = False) -> ProtectedDomain:
        from qemu_kd.formats.layout import HostLayout
        from qemu_kd.formats.policy import Policy
        from qemu_kd.qemu.launch import PhaseTimer
        from qemu_kd.tenant.measure import measure_guest
        from qemu_kd.tenant.seal import seal
        from qemu_kd.tenant.session import TenantSession, attest

        timer = PhaseTimer(progress=self._progress)
        policy = Policy.make(debug=debug, restorable=restorable)
        mask = exposed_register_mask
        # The tenant builds the boot image and computes the expected measurement (no layout
        # enters either) while the platform daemon and the host VMM process start and allocate.
        measuring = _in_thread(measure_guest, image.kernel, image.initrd, cmdline, size, policy, mask)
        self._await_platform()
        assert self.workdir is not None and self.socket is not None
        host = self._take_host()
        try:
            host.wait_ready()
            with timer.phase("layout"):
                layout = HostLayout.unpack(host.call("allocate", memory_size=size)["layout"].encode())
            with timer.phase("seal"):
                measured = measuring.result()
                root_pem = (self.state_dir / "root-ca.crt").read_bytes()
                bundle, secret = seal(image.kernel, image.initrd, cmdline, size, policy, layout, root_pem,
                                      exposed_register_mask=mask, measured=measured)
                bundle_path = self.workdir / f"guest-{self._count}.kd"
                bundle.write(bundle_path, durable=False)   # loaded at once, then deleted
            expected = measured.measurement
            with timer.phase("load"):
                host.call("load", bundle=str(bundle_path))
            bundle_path.unlink()
            with timer.phase("verify"):
                checks = host.call("verify")["checks"]
            self._say("launch and boot to agent ready")
            named = {"name": name} if name is not None else {}
            launched = host.call("launch", ready_timeout=ready_timeout, timeout=ready_timeout + 120, **named)
            # The host VMM timed these phases; they ran between verify and attest.
            timer.phases.update(in_order(launched.get("timings", {}), PROTECTED_BOOT_PHASES))

            def relay(cmd: str, wait: float = 60.0, **args: Any) -> dict:
                return host.agent(cmd, wait=wait, **args)

            with timer.phase("attest"):
                # The tenant's part: the host VMM relays these requests and frames, and reads none of it.
                attestation = attest(relay, root_pem=root_pem, chain_pem=layout.platform_chain_pem,
                                     measurement=expected, policy=policy, host_data=layout.host_data)
                session = TenantSession(relay, attestation, secret.key)
        except BaseException:
            try:
                if host.sock is not None:
                    host.call("destroy", timeout=60)
            except (KdError, OSError):
                pass
            host.stop()
            raise
        dom = ProtectedDomain(launched.get("name") or name or f"kd{layout.keyid}", host, session,
                              keyid=layout.keyid, endpoints=launched["endpoints"], expected=expected,
                              policy=policy, root_pem=root_pem, layout=layout, secret=secret,
                              ready=launched.get("ready"),
                              host_verification={c["name"]: {"ok": c["ok"], "detail": c["detail"]}
                                                 for c in checks},
                              exposed_register_mask=mask)
        dom.timings = dict(timer.phases)
        return dom

    def restore(self, path: str | Path, *, of: ProtectedDomain, name: str | None = None,
                ready_timeout: float = 120.0) -> ProtectedDomain:
        """Restore the snapshot at ``path`` (from :meth:`ProtectedDomain.snapshot`) as a new,
        attested domain on this platform, named ``name`` (default: the next free ``kdN``).

        ``of`` is the snapshotted domain (it may be destroyed by now): the tenant's secret,
        measurement and policy come from it.  The platform refuses a snapshot of another domain,
        from another platform, tampered, or older than the domain's latest (unless the policy is
        restorable).  The tenant attests the restored guest over a fresh nonce before it opens
        the session.  The restored guest shares every secret of the snapshot's moment with the
        original and with every other restore of it (docs/snapshots.md).
        """
        from qemu_kd.qemu.launch import PhaseTimer
        from qemu_kd.tenant.session import TenantSession, attest

        if not isinstance(of, ProtectedDomain) or of.secret is None:
            raise NotProtectedError("restore needs the protected domain the snapshot was taken of",
                                    "pass of=<the ProtectedDomain>")
        self.start()
        assert self.socket is not None
        timer = PhaseTimer(progress=self._progress)
        host = self._take_restore_host()
        try:
            host.wait_ready()
            # The next restore's host VMM starts while the platform restores (a launch in between
            # leaves it alone: a series of restores never waits for a process start).
            self._restore_host = self._host_vmm(self.socket)
            # The host VMM asks the platform for restore-kd (the platform reads and checks the
            # file), then serves the domain as a launched one: relay, window, hypercalls.
            self._say("restore and the agent answering")
            # What the tenant expects the snapshot to be of: the platform refuses any other.
            args: dict[str, Any] = {"path": str(Path(path).resolve()), "ready_timeout": ready_timeout,
                                    "measurement": of.measurement.hex()}
            if of.domain_id:
                args["domain_id"] = of.domain_id
            if name is not None:
                args["name"] = name
            restored = host.call("restore", timeout=SNAPSHOT_TIMEOUT + ready_timeout, **args)
            timer.phases.update(in_order(restored.get("timings", {}), RESTORE_PHASES))

            def relay(cmd: str, wait: float = 60.0, **args: Any) -> dict:
                return host.agent(cmd, wait=wait, **args)

            with timer.phase("attest"):
                attestation = attest(relay, root_pem=of._root_pem, chain_pem=of.chain_pem,
                                     measurement=of.measurement, policy=of.policy,
                                     host_data=of._layout.host_data)
                session = TenantSession(relay, attestation, of.secret.key)
        except BaseException:
            try:
                if host.sock is not None:
                    host.call("destroy", timeout=60)
            except (KdError, OSError):
                pass
            host.stop()
            raise
        dom = ProtectedDomain(restored["name"], host, session, keyid=restored["keyid"],
                              endpoints=restored["endpoints"], expected=of.measurement, policy=of.policy,
                              root_pem=of._root_pem, layout=of._layout, secret=of.secret,
                              exposed_register_mask=of.exposed_register_mask)
        dom.platform_socket = self.socket
        dom.domain_id = restored["domain_id"]
        dom.restored_from = Path(path).resolve()
        dom.timings = dict(timer.phases)
        self.domains.append(dom)
        return dom

    def keep(self, domain: Domain) -> None:
        """Leave ``domain`` running on the platform when this object closes and this process
        ends: the host VMM lets go of it, and a daemon this object started (``detach=True``)
        is handed over; it ends by itself once it has no domain left.  Reach the domain with
        ``qemu-kd ls``, ``exec``, ``console``; end it with ``qemu-kd destroy``."""
        if not isinstance(domain, ProtectedDomain):
            raise NotProtectedError(f"{domain.name} is a plain domain: it ends with this process",
                                    "launch it with plain=False to keep it")
        if self._proc is not None and not self._detach:
            raise ConfigError("this platform's daemon ends with this process, and its domains with it",
                              "start it with Platform(detach=True), or attach to one with socket=")
        domain._release()
        if domain in self.domains:
            self.domains.remove(domain)
        if self._proc is not None:
            from qemu_kd.hostport.spawn import hand_over_platform

            hand_over_platform(self._proc)
            self._proc = None
            self.workdir = None      # the daemon removes it when it ends

    def close(self) -> None:
        """Destroy every domain launched here (and not kept), then stop the daemon this object
        started (unless it was handed a domain to keep)."""
        for dom in list(self.domains):
            try:
                dom.destroy()
            except KdError:
                pass
        self.domains.clear()
        self._stop_spare_host()
        self._starting = None
        if self._proc is not None:
            from qemu_kd.hostport.spawn import stop_platform_process

            stop_platform_process(self._proc)
            self._proc = None
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)
            self.workdir = None

    def __enter__(self) -> "Platform":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()
