"""The QEMU process wrapper: one paused, firmware-less x86-64 machine.

A :class:`QemuMachine` owns a private directory (``<runtime>/qemu-kd-<pid>-*``,
mode 0700) that holds the QMP, gdbstub and serial sockets (mode 0600; QEMU runs
under umask 077) and QEMU's stderr log.  The console log is created mode 0600.

Guest RAM is an anonymous memory file (``memfd_create``), never a file on any
file system: QEMU gets it as an inherited descriptor and maps it through
``memory-backend-file`` with ``mem-path=/proc/self/fd/N,share=on``; the
platform maps the same descriptor (:meth:`QemuMachine.map_ram`), coherent both
ways.  The memory goes away with the last process that holds it, however it
ends, so no copy of guest plaintext outlives QEMU and its parent.  The platform
may fill guest RAM before QEMU starts (:class:`GuestRam`, handed to the
machine, which then owns it).

Every way out (normal stop, exception, Ctrl-C, QEMU crash, even the parent
being killed: QEMU gets ``PR_SET_PDEATHSIG``) stops QEMU; every way but the
parent's SIGKILL removes the directory, and those left by a killed parent are
swept at the next start (:mod:`qemu_kd.common.rundirs`).

Devices: ttyS0 console, ttyS1 shared channel (host VMM), ttyS2 guest port
(platform only).
"""

from __future__ import annotations

import mmap
import os
import shutil
import socket
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from qemu_kd.common.errors import ConfigError, QemuError
from qemu_kd.qemu.gdbstub import RspClient
from qemu_kd.common.paths import state_dir
from qemu_kd.common.process import die_with_parent
from qemu_kd.common.rundirs import make_private_dir, sweep_dead_dirs

QEMU_BINARY = "qemu-system-x86_64"
DIR_KIND = "qemu-kd"
SERIALS = ("console", "shared", "guestport")
SOCKET_MODE = 0o600
LOG_MODE = 0o600
# QEMU creates its sockets (and anything else) private to the user.
QEMU_UMASK = 0o077


def find_qemu(binary: str = QEMU_BINARY) -> str:
    path = shutil.which(binary)
    if not path:
        raise ConfigError(f"{binary} is not installed",
                          "install it with: apt-get install qemu-system-x86")
    return path


def log_dir() -> Path:
    """Console logs (mode 0700; each log 0600)."""
    path = state_dir() / "logs"
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    return path


def create_private_file(path: Path) -> None:
    """Create (or truncate) ``path`` with mode 0600, never through a symbolic link."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, LOG_MODE)
    try:
        os.fchmod(fd, LOG_MODE)
    finally:
        os.close(fd)


class GuestRam:
    """Guest RAM before (and while) QEMU maps it: an anonymous memory file of ``size`` bytes,
    mapped shared in this process.  Pages nobody writes stay holes (read as zeros)."""

    def __init__(self, size: int, name: str = "kd-ram"):
        self.size = size
        self.fd: int | None = os.memfd_create(name, os.MFD_CLOEXEC)
        try:
            os.ftruncate(self.fd, size)
            self.map: mmap.mmap | None = mmap.mmap(self.fd, size, mmap.MAP_SHARED)
        except BaseException:
            os.close(self.fd)
            raise

    def close(self) -> None:
        """Unmap and close: the memory goes once no process (QEMU) holds the file any more."""
        if self.map is not None:
            try:
                self.map.close()
            except (BufferError, ValueError):   # a view is still out: the mapping goes with it
                pass
            self.map = None
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


@dataclass
class MachineSpec:
    """What QEMU to start.  ``accel`` is ``"tcg"`` or ``"kvm"``."""

    mem_size: int
    accel: str = "tcg"
    name: str = "guest"
    machine: str = "pc"
    qemu: str = field(default_factory=lambda: os.environ.get("QEMU_KD_QEMU", QEMU_BINARY))
    extra_args: list[str] = field(default_factory=list)
    #: Start waiting for a migration stream (``-incoming defer``; see :meth:`QemuMachine.load_device_state`).
    incoming: bool = False


class QemuMachine:
    """A paused QEMU with memfd-backed RAM, QMP, gdbstub and three serial sockets."""

    def __init__(self, spec: MachineSpec, console_log: Path | None = None, ram: GuestRam | None = None):
        """``ram``: guest RAM the caller already filled (its size must be ``spec.mem_size``);
        the machine owns it from here on and closes it when it stops."""
        if ram is not None and ram.size != spec.mem_size:
            raise QemuError(f"guest RAM of {ram.size} bytes for a machine of {spec.mem_size}")
        self.spec = spec
        self.proc: subprocess.Popen | None = None
        self.sockdir: Path | None = None
        self._ram = ram
        self.console_log = console_log
        self.qmp = None
        self.rsp: RspClient | None = None
        self._stderr = None

    @property
    def guest_ram(self) -> GuestRam | None:
        """The guest RAM this machine maps (None once stopped)."""
        return self._ram

    @property
    def ram_fd(self) -> int | None:
        """The guest-RAM memory file's descriptor (None once stopped)."""
        return self._ram.fd if self._ram is not None else None

    # -- paths ---------------------------------------------------------------------
    def socket_path(self, name: str) -> str:
        assert self.sockdir is not None
        return str(self.sockdir / f"{name}.sock")

    @property
    def stderr_path(self) -> Path:
        assert self.sockdir is not None
        return self.sockdir / "qemu.stderr"

    # -- lifecycle -----------------------------------------------------------------
    def command_line(self) -> list[str]:
        s = self.spec
        assert self.ram_fd is not None
        mem_mib = s.mem_size >> 20
        args = [
            find_qemu(s.qemu),
            "-name", s.name,
            "-nodefaults", "-no-user-config", "-nographic", "-no-reboot", "-S",
            "-machine", f"{s.machine},memory-backend=ram0",
            "-m", f"{mem_mib}M",
            "-object", f"memory-backend-file,id=ram0,size={mem_mib}M,"
                       f"mem-path=/proc/self/fd/{self.ram_fd},share=on,prealloc=off",
            "-smp", "1",
            "-chardev", f"socket,id=qmp0,path={self.socket_path('qmp')},server=on,wait=off",
            "-mon", "chardev=qmp0,mode=control",
            # A second monitor for the host-facing QMP proxy (QMP serves one client per socket).
            "-chardev", f"socket,id=qmp1,path={self.socket_path('qmp-host')},server=on,wait=off",
            "-mon", "chardev=qmp1,mode=control",
            "-chardev", f"socket,id=gdb0,path={self.socket_path('gdb')},server=on,wait=off",
            "-gdb", "chardev:gdb0",
        ]
        if s.accel == "kvm":
            args += ["-accel", "kvm", "-cpu", "host"]
        else:
            args += ["-accel", "tcg", "-cpu", "max"]
        for name in SERIALS:
            chardev = f"socket,id={name},path={self.socket_path(name)},server=on,wait=off"
            if name == "console" and self.console_log is not None:
                chardev += f",logfile={self.console_log},logappend=off"
            args += ["-chardev", chardev, "-serial", f"chardev:{name}"]
        if s.incoming:
            args += ["-incoming", "defer"]
        return args + list(s.extra_args)

    def start(self, timeout: float = 15.0) -> None:
        """Start QEMU paused and connect QMP and the gdbstub."""
        from qemu.qmp.legacy import QEMUMonitorProtocol

        find_qemu(self.spec.qemu)
        sweep_dead_dirs()
        # Unix socket paths are limited to 108 bytes: keep sockets short-named.
        self.sockdir = make_private_dir(DIR_KIND)
        if self.console_log is None:
            self.console_log = log_dir() / f"{self.spec.name}-{os.getpid()}-{int(time.time())}.log"
        try:
            create_private_file(self.console_log)
            if self._ram is None:
                self._ram = GuestRam(self.spec.mem_size)
            self._stderr = open(self.stderr_path, "wb")
            os.fchmod(self._stderr.fileno(), LOG_MODE)
            self.proc = subprocess.Popen(self.command_line(), stdin=subprocess.DEVNULL,
                                         stdout=self._stderr, stderr=subprocess.STDOUT,
                                         pass_fds=(self.ram_fd,), umask=QEMU_UMASK,
                                         preexec_fn=die_with_parent())
            deadline = time.monotonic() + timeout
            self._wait_for_sockets(deadline)
            self.qmp = QEMUMonitorProtocol(self.socket_path("qmp"))
            self.qmp.connect()
            self.qmp.settimeout(timeout)
            self.rsp = RspClient(self.socket_path("gdb"), timeout=timeout)
            self.rsp.connect(deadline)
        except BaseException:
            self.stop()
            raise

    def _wait_for_sockets(self, deadline: float) -> None:
        """Wait for QEMU's sockets, then make them 0600 before anyone connects."""
        needed = [self.socket_path(n) for n in ("qmp", "qmp-host", "gdb", *SERIALS)]
        while not all(os.path.exists(p) for p in needed):
            self.check_alive("while starting")
            if time.monotonic() > deadline:
                raise QemuError("QEMU did not create its sockets in time",
                                f"see {self.stderr_path}")
            time.sleep(0.01)
        for path in needed:
            os.chmod(path, SOCKET_MODE)

    def stderr_tail(self, lines: int = 5) -> str:
        try:
            text = self.stderr_path.read_text(errors="replace").strip().splitlines()
        except (OSError, AssertionError):
            return ""
        return " | ".join(text[-lines:])

    def check_alive(self, doing: str = "") -> None:
        if self.proc is None:
            raise QemuError("QEMU is not running")
        rc = self.proc.poll()
        if rc is not None:
            tail = self.stderr_tail()
            what = f"QEMU exited with status {rc}" + (f" {doing}" if doing else "")
            raise QemuError(what + (f": {tail}" if tail else ""),
                            "check the QEMU command line and the console log")

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def map_ram(self) -> mmap.mmap:
        """Guest RAM, mapped (the memfd QEMU maps too: shared, coherent both ways)."""
        if self._ram is None or self._ram.map is None:
            raise QemuError("QEMU is not running")
        return self._ram.map

    def write_ram(self, gpa: int, data: bytes) -> None:
        ram = self.map_ram()
        if gpa < 0 or gpa + len(data) > self.spec.mem_size:
            raise QemuError(f"write of {len(data)} bytes at gpa {gpa:#x} is outside guest RAM")
        ram[gpa:gpa + len(data)] = data

    def connect_serial(self, name: str, timeout: float = 5.0) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(self.socket_path(name))
        except OSError as exc:
            sock.close()
            raise QemuError(f"cannot connect to the {name} serial port: {exc}") from None
        sock.settimeout(timeout)
        return sock

    def resume(self) -> None:
        self.check_alive()
        self.qmp.cmd("cont")

    # -- device state (QEMU's migration stream, without guest RAM) ----------------------
    def _pass_fd(self, fd: int, name: str) -> None:
        """Hand QEMU a descriptor over QMP (SCM_RIGHTS) under ``name``, for a ``fd:`` URI."""
        self.qmp.send_fd_scm(fd)
        self.qmp.cmd("getfd", fdname=name)

    def _ignore_shared_ram(self) -> None:
        # Guest RAM is the shared memfd backend: it stays out of the stream.
        self.qmp.cmd("migrate-set-capabilities",
                     capabilities=[{"capability": "x-ignore-shared", "state": True}])

    def _await_migration(self, deadline: float, doing: str) -> None:
        while True:
            self.check_alive(doing)
            info = self.qmp.cmd("query-migrate")
            status = info.get("status")
            if status == "completed":
                return
            if status in ("failed", "cancelled"):
                raise QemuError(f"QEMU's migration stream failed while {doing}: "
                                f"{info.get('error-desc', status)}", f"see {self.stderr_path}")
            if time.monotonic() > deadline:
                raise QemuError(f"QEMU's migration stream did not finish while {doing}")
            time.sleep(0.01)

    def save_device_state(self, timeout: float = 60.0) -> bytes:
        """QEMU's device state as its migration stream, guest RAM left out (x-ignore-shared).

        The stream goes through a pipe to this process only; nothing is written to a
        file.  The vCPU should be stopped; QEMU stays stopped (``postmigrate``) and
        ``cont`` runs it again.
        """
        self.check_alive()
        rfd, wfd = os.pipe2(os.O_CLOEXEC)
        chunks: list[bytes] = []

        def drain() -> None:
            while True:
                data = os.read(rfd, 1 << 16)
                if not data:
                    return
                chunks.append(data)

        reader = threading.Thread(target=drain, name="kd-devstate-out", daemon=True)
        reader.start()
        try:
            try:
                self._ignore_shared_ram()
                self._pass_fd(wfd, "kd-devstate")
            finally:
                os.close(wfd)     # QEMU holds its own copy; EOF comes when it closes that
            self.qmp.cmd("migrate", uri="fd:kd-devstate")
            self._await_migration(time.monotonic() + timeout, "saving the device state")
            reader.join(timeout)
            if reader.is_alive():
                raise QemuError("QEMU did not close its device-state stream")
        finally:
            if not reader.is_alive():
                os.close(rfd)
        return b"".join(chunks)

    def load_device_state(self, stream: bytes, timeout: float = 60.0) -> None:
        """Feed a stream from :meth:`save_device_state` to a machine started ``incoming``.

        Guest RAM must already hold the guest's memory (it is not in the stream).
        The machine stays paused (``-S``).
        """
        self.check_alive()
        rfd, wfd = os.pipe2(os.O_CLOEXEC)
        failed: list[BaseException] = []

        def feed() -> None:
            try:
                view = memoryview(stream)
                while view:
                    written = os.write(wfd, view[:1 << 16])
                    view = view[written:]
            except OSError as exc:    # QEMU gave up reading (its error tells why)
                failed.append(exc)
            finally:
                os.close(wfd)

        writer = threading.Thread(target=feed, name="kd-devstate-in", daemon=True)
        try:
            try:
                self._ignore_shared_ram()
                self._pass_fd(rfd, "kd-devstate")
            finally:
                os.close(rfd)
            writer.start()
            self.qmp.cmd("migrate-incoming", uri="fd:kd-devstate")
            self._await_migration(time.monotonic() + timeout, "loading the device state")
        finally:
            if writer.ident is None:
                os.close(wfd)
            else:
                writer.join(timeout)

    def pause(self) -> None:
        self.check_alive()
        self.qmp.cmd("stop")

    def stop(self, timeout: float = 5.0) -> None:
        """Stop QEMU (QMP quit, then SIGTERM, then SIGKILL), release guest RAM, remove every file."""
        if self.rsp is not None:
            self.rsp.close()
            self.rsp = None
        if self.qmp is not None:
            if self.running:
                try:
                    self.qmp.settimeout(1.0)
                    self.qmp.cmd("quit")
                except Exception:  # noqa: BLE001 - any failure falls through to signals
                    pass
            try:
                self.qmp.close()
            except Exception:  # noqa: BLE001
                pass
            self.qmp = None
        if self.proc is not None:
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.terminate()
                try:
                    self.proc.wait(timeout=2)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
        if self._stderr is not None:
            self._stderr.close()
            self._stderr = None
        if self._ram is not None:
            self._ram.close()
            self._ram = None
        if self.sockdir is not None:
            shutil.rmtree(self.sockdir, ignore_errors=True)
            self.sockdir = None

    def __enter__(self) -> "QemuMachine":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
