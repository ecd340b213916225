"""The QEMU process wrapper: one paused, firmware-less x86-64 machine.

A :class:`QemuMachine` owns a private directory (mode 0700) that holds the
QMP, gdbstub and serial sockets, QEMU's stderr log and the guest-RAM file.
The RAM is a ``memory-backend-file`` with ``share=on`` so the platform can map
it; it lives under ``/dev/shm`` when available.  Every way out (normal stop,
exception, Ctrl-C, QEMU crash, even the parent being killed: QEMU gets
``PR_SET_PDEATHSIG``) stops QEMU and removes the directory.  Directories left by
a killed parent are swept at the next start.

Devices: ttyS0 console, ttyS1 shared channel (host VMM), ttyS2 guest port
(platform only).
"""

from __future__ import annotations

import ctypes
import mmap
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from qemu_kd.common.errors import ConfigError, QemuError
from qemu_kd.qemu.gdbstub import RspClient
from qemu_kd.common.paths import runtime_dir, state_dir
from qemu_kd.common.process import pid_alive

QEMU_BINARY = "qemu-system-x86_64"
SHM_ROOT = Path("/dev/shm")
DIR_PREFIX = "qemu-kd-"
SERIALS = ("console", "shared", "guestport")


def _die_with_parent() -> None:  # runs in the child between fork and exec
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def sweep_stale_dirs() -> list[Path]:
    """Remove machine directories whose owning process no longer exists."""
    removed = []
    for root in {SHM_ROOT, runtime_dir()}:
        if not root.is_dir():
            continue
        for entry in root.glob(f"{DIR_PREFIX}*"):
            parts = entry.name.split("-")
            if len(parts) < 4 or not parts[2].isdigit():
                continue
            if not pid_alive(int(parts[2])):
                shutil.rmtree(entry, ignore_errors=True)
                removed.append(entry)
    return removed


def find_qemu(binary: str = QEMU_BINARY) -> str:
    path = shutil.which(binary)
    if not path:
        raise ConfigError(f"{binary} is not installed",
                          "install it with: apt-get install qemu-system-x86")
    return path


def log_dir() -> Path:
    path = state_dir() / "logs"
    path.mkdir(parents=True, exist_ok=True)
    return path


@dataclass
class MachineSpec:
    """What QEMU to start.  ``accel`` is ``"tcg"`` or ``"kvm"``."""

    mem_size: int
    accel: str = "tcg"
    name: str = "guest"
    machine: str = "pc"
    qemu: str = field(default_factory=lambda: os.environ.get("QEMU_KD_QEMU", QEMU_BINARY))
    extra_args: list[str] = field(default_factory=list)


class QemuMachine:
    """A paused QEMU with file-backed RAM, QMP, gdbstub and three serial sockets."""

    def __init__(self, spec: MachineSpec, console_log: Path | None = None):
        self.spec = spec
        self.proc: subprocess.Popen | None = None
        self.dir: Path | None = None
        self.sockdir: Path | None = None
        self.ram_path: Path | None = None
        self.console_log = console_log
        self.qmp = None
        self.rsp: RspClient | None = None
        self._ram_map: mmap.mmap | None = None
        self._stderr = None

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
        assert self.ram_path is not None
        mem_mib = s.mem_size >> 20
        args = [
            find_qemu(s.qemu),
            "-name", s.name,
            "-nodefaults", "-no-user-config", "-nographic", "-no-reboot", "-S",
            "-machine", f"{s.machine},memory-backend=ram0",
            "-m", f"{mem_mib}M",
            "-object", f"memory-backend-file,id=ram0,size={mem_mib}M,"
                       f"mem-path={self.ram_path},share=on,prealloc=off",
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
        return args + list(s.extra_args)

    def start(self, timeout: float = 15.0) -> None:
        """Start QEMU paused and connect QMP and the gdbstub."""
        from qemu.qmp.legacy import QEMUMonitorProtocol

        find_qemu(self.spec.qemu)
        sweep_stale_dirs()
        tag = f"{DIR_PREFIX}{os.getpid()}-"
        shm_ok = SHM_ROOT.is_dir() and os.access(SHM_ROOT, os.W_OK)
        self.dir = Path(tempfile.mkdtemp(prefix=tag, dir=SHM_ROOT if shm_ok else runtime_dir()))
        os.chmod(self.dir, 0o700)
        # Unix socket paths are limited to 108 bytes: keep sockets short-named.
        self.sockdir = Path(tempfile.mkdtemp(prefix=tag, dir=runtime_dir()))
        os.chmod(self.sockdir, 0o700)
        self.ram_path = self.dir / "ram"
        if self.console_log is None:
            self.console_log = log_dir() / f"{self.spec.name}-{os.getpid()}-{int(time.time())}.log"
        try:
            self._stderr = open(self.stderr_path, "wb")
            self.proc = subprocess.Popen(self.command_line(), stdin=subprocess.DEVNULL,
                                         stdout=self._stderr, stderr=subprocess.STDOUT,
                                         preexec_fn=_die_with_parent)
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
        needed = [self.socket_path(n) for n in ("qmp", "qmp-host", "gdb", *SERIALS)]
        while not all(os.path.exists(p) for p in needed):
            self.check_alive("while starting")
            if time.monotonic() > deadline:
                raise QemuError("QEMU did not create its sockets in time",
                                f"see {self.stderr_path}")
            time.sleep(0.01)

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
        """Map the guest-RAM file (shared with QEMU, coherent both ways)."""
        if self._ram_map is None:
            assert self.ram_path is not None
            fd = os.open(self.ram_path, os.O_RDWR)
            try:
                self._ram_map = mmap.mmap(fd, self.spec.mem_size, mmap.MAP_SHARED)
            finally:
                os.close(fd)
        return self._ram_map

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

    def pause(self) -> None:
        self.check_alive()
        self.qmp.cmd("stop")

    def stop(self, timeout: float = 5.0) -> None:
        """Stop QEMU (QMP quit, then SIGTERM, then SIGKILL) and remove every file."""
        if self._ram_map is not None:
            try:
                self._ram_map.close()
            except (BufferError, ValueError):
                pass
            self._ram_map = None
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
        for path in (self.dir, self.sockdir):
            if path is not None:
                shutil.rmtree(path, ignore_errors=True)
        self.dir = self.sockdir = None

    def __enter__(self) -> "QemuMachine":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
