"""Choose the accelerator: KVM only if it really boots a Linux guest, else TCG.

Opening ``/dev/kvm`` is not enough: on some hosts KVM runs a trivial guest but
hangs a Linux kernel in early boot.  The probe boots the guest
kernel under KVM with a short timeout and waits for it to reach the point
where it looks for a root file system.  The verdict is cached in the state
directory, keyed by QEMU binary, host kernel and guest kernel.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from qemu_kd.common.errors import ConfigError
from qemu_kd.qemu.machine import find_qemu
from qemu_kd.common.paths import state_dir

PROBE_TIMEOUT = 10.0
BOOTED_MARKERS = (b"VFS: Unable to mount root", b"Kernel panic", b"Run /init")


@dataclass(frozen=True)
class AccelChoice:
    name: str  # "kvm" or "tcg"
    reason: str


def _cache_key(qemu: str, kernel: Path) -> str:
    st = os.stat(qemu)
    h = hashlib.sha256()
    h.update(f"{qemu}:{st.st_size}:{st.st_mtime_ns}:{os.uname().release}".encode())
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
                return False, f"QEMU with KVM exited with status {proc.returncode}"
            time.sleep(0.05)
        return False, f"a Linux guest under KVM did not boot within {timeout:.0f} s"
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()


def choose_accel(requested: str, kernel: Path, qemu: str = "qemu-system-x86_64",
                 timeout: float = PROBE_TIMEOUT) -> AccelChoice:
    """``requested`` is ``auto``, ``kvm`` or ``tcg`` (``QEMU_KD_ACCEL`` overrides ``auto``)."""
    if requested == "auto":
        requested = os.environ.get("QEMU_KD_ACCEL", "auto")
    if requested not in ("auto", "kvm", "tcg"):
        raise ConfigError(f"unknown accelerator {requested!r}", "use auto, kvm or tcg")
    if requested == "tcg":
        return AccelChoice("tcg", "requested")
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        if requested == "kvm":
            raise ConfigError("KVM was requested but /dev/kvm is not usable",
                              "use --accel tcg or load the kvm module")
        return AccelChoice("tcg", "no usable /dev/kvm")
    if requested == "kvm":
        return AccelChoice("kvm", "requested")
    qemu = find_qemu(qemu)
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
