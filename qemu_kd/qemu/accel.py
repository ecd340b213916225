"""Choose the accelerator: KVM only if it really boots a Linux guest, else TCG.

Opening ``/dev/kvm`` is not enough: on some hosts KVM runs a trivial guest but
hangs a Linux kernel in early boot, or QEMU aborts setting up the host CPU
model under KVM.  The probe boots the guest kernel under KVM with a short
timeout and waits for it to reach the point where it looks for a root file
system.  The verdict is cached in the state directory, keyed by QEMU binary,
host kernel and guest kernel.

``auto`` falls back to TCG when the probe fails; an explicit ``kvm`` request
runs the same probe and fails up front with the reason (a one-line
ConfigError), before anything is started.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from qemu_kd.common.errors import ConfigError
from qemu_kd.qemu.machine import QEMU_BINARY, find_qemu
from qemu_kd.common.paths import state_dir

PROBE_TIMEOUT = 10.0
BOOTED_MARKERS = (b"VFS: Unable to mount root", b"Kernel panic", b"Run /init")
#: Bumped when the probe changes, so cached verdicts of an older probe are not reused.
PROBE_VERSION = 2


@dataclass(frozen=True)
class AccelChoice:
    name: str  # "kvm" or "tcg"
    reason: str


def _cache_key(qemu: str, kernel: Path) -> str:
    st = os.stat(qemu)
    h = hashlib.sha256()
    h.update(f"v{PROBE_VERSION}:{qemu}:{st.st_size}:{st.st_mtime_ns}:{os.uname().release}".encode())
    h.update(str(kernel.stat().st_size).encode() + kernel.name.encode())
    return h.hexdigest()[:32]


def _boot_test(qemu: str, kernel: Path, timeout: float) -> tuple[bool, str]:
    args = [qemu, "-accel", "kvm", "-cpu", "host", "-m", "256M", "-nodefaults",
            "-no-user-config", "-nographic", "-no-reboot", "-serial", "stdio",
            "-kernel", str(kernel), "-append", "console=ttyS0 panic=-1 root=/dev/none"]
    proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    os.set_blocking(proc.stdout.fileno(), False)
    seen = b""
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            chunk = proc.stdout.read() or b""
            seen += chunk
            if any(m in seen for m in BOOTED_MARKERS):
                return True, "KVM boots the guest kernel"
            if proc.poll() is not None and not chunk:
                return False, _exit_reason(proc.returncode, seen)
            time.sleep(0.05)
        return False, f"a Linux guest under KVM did not boot within {timeout:.0f} s"
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()


def _exit_reason(returncode: int, output: bytes) -> str:
    """Why QEMU under KVM ended before the kernel booted: its status and its first error line."""
    if returncode < 0:
        try:
            how = f"was killed by {signal.Signals(-returncode).name}"
        except ValueError:
            how = f"was killed by signal {-returncode}"
    else:
        how = f"exited with status {returncode}"
    lines = [line.strip() for line in output.decode(errors="replace").splitlines() if line.strip()]
    errors = [line for line in lines if "error" in line.lower()]
    said = (errors or lines[-1:] or [""])[0]
    said = said.split(": ", 1)[1] if said.startswith("qemu-system") and ": " in said else said
    said = said.removeprefix("error: ")
    return f"QEMU with KVM {how}" + (f": {said}" if said else "")


def choose_accel(requested: str, kernel: Path, qemu: str | None = None,
                 timeout: float = PROBE_TIMEOUT) -> AccelChoice:
    """``requested`` is ``auto``, ``kvm`` or ``tcg`` (``QEMU_KD_ACCEL`` overrides ``auto``).

    ``kvm`` is probed like ``auto``; when KVM cannot run the guest kernel here it
    is a ConfigError that says why, instead of a QEMU that fails later.
    """
    from_env = requested == "auto" and "QEMU_KD_ACCEL" in os.environ
    if requested == "auto":
        requested = os.environ.get("QEMU_KD_ACCEL", "auto")
    if requested not in ("auto", "kvm", "tcg"):
        raise ConfigError(f"unknown accelerator {requested!r}", "use auto, kvm or tcg")
    if requested == "tcg":
        return AccelChoice("tcg", "requested")
    fallback = ("set QEMU_KD_ACCEL=tcg, or unset it to fall back to TCG" if from_env
                else "use --accel tcg, or auto to fall back to TCG")
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        if requested == "kvm":
            raise ConfigError("KVM was requested but is not usable: /dev/kvm is missing or not "
                              "readable and writable", fallback + "; or load the kvm module")
        return AccelChoice("tcg", "no usable /dev/kvm")
    choice = _probe(find_qemu(qemu or os.environ.get("QEMU_KD_QEMU", QEMU_BINARY)), kernel, timeout)
    if requested == "kvm":
        if choice.name != "kvm":
            raise ConfigError(f"KVM was requested but is not usable: {choice.reason}", fallback)
        return AccelChoice("kvm", f"requested; {choice.reason}")
    return choice


def _probe(qemu: str, kernel: Path, timeout: float) -> AccelChoice:
    """Whether KVM boots ``kernel`` with this QEMU (cached per QEMU, host and guest kernel)."""
    cache = state_dir() / "accel-probe.json"
    key = _cache_key(qemu, kernel)
    try:
        cached = json.loads(cache.read_text())
        if cached.get("key") == key:
            return AccelChoice(cached["name"], cached["reason"] + " (cached probe)")
    except (OSError, ValueError, KeyError):
        pass
    ok, reason = _boot_test(qemu, kernel, timeout)
    choice = AccelChoice("kvm" if ok else "tcg", reason)
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps({"key": key, "name": choice.name, "reason": choice.reason}))
    return choice
