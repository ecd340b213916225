"""``qemu-kd run``: boot the default guest, run a command in it, shut it down."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .accel import choose_accel
from .errors import ConfigError, GuestImageError
from .launch import PhaseTimer, boot_plain, full_cmdline
from .machine import MachineSpec

MiB = 1 << 20
BOOT_PHASES = ("qemu start", "layout", "vcpu load", "kernel to agent ready")


def parse_size(text: str) -> int:
    """``256M``, ``1G``, ``512`` (MiB) or ``268435456B`` → bytes."""
    units = {"K": 1 << 10, "M": MiB, "G": 1 << 30, "B": 1}
    t = text.strip().upper().removesuffix("IB")
    try:
        if t and t[-1] in units:
            return int(float(t[:-1]) * units[t[-1]])
        return int(t) * MiB
    except ValueError:
        raise ConfigError(f"cannot read memory size {text!r}", "write it like 256M or 1G") from None


def progress_printer(enabled: bool) -> Callable[[str], None]:
    def show(message: str) -> None:
        if enabled:
            print(f"[qemu-kd] {message}", file=sys.stderr, flush=True)
    return show


@dataclass
class RunOptions:
    cmd: str = "uname -a"
    mem_size: int = 256 * MiB
    accel: str = "auto"
    ready_timeout: float = 120.0
    cmd_timeout: float = 60.0
    progress: bool = True
    kernel: str | None = None
    initrd: str | None = None


def read_guest_file(path, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        raise GuestImageError(f"{what} {path} does not exist",
                              "pass an existing file, or omit it to use the default guest") from None
    except OSError as exc:
        raise GuestImageError(f"cannot read {what} {path}: {exc.strerror}") from None


def guest_inputs(opts: "RunOptions", show) -> tuple[bytes, bytes, Path, str | None]:
    """Kernel and initrd bytes: the user's, or the default guest's (built if needed)."""
    if opts.kernel or opts.initrd:
        if not (opts.kernel and opts.initrd):
            raise ConfigError("--kernel and --initrd go together",
                              "pass both, or neither for the default guest")
        return (read_guest_file(opts.kernel, "kernel"), read_guest_file(opts.initrd, "initrd"),
                Path(opts.kernel), None)
    from .guest_build import ensure_guest

    art = ensure_guest(progress=show)
    return (read_guest_file(art.kernel, "kernel"), read_guest_file(art.initrd, "initrd"),
            art.kernel, art.kernel_release)


def run_plain(opts: RunOptions) -> dict:
    """Boot the default guest without protection and run ``opts.cmd`` through the agent."""
    show = progress_printer(opts.progress)
    kernel, initrd, kernel_path, _release = guest_inputs(opts, show)
    accel = choose_accel(opts.accel, kernel_path)
    show(f"accelerator: {accel.name} ({accel.reason})")
    timer = PhaseTimer(progress=show)
    spec = MachineSpec(mem_size=opts.mem_size, accel=accel.name, name="plain")
    guest = boot_plain(kernel, initrd, full_cmdline(), spec, timer,
                       ready_timeout=opts.ready_timeout)
    try:
        ready = guest.agent.ready
        with timer.phase("command"):
            result = guest.agent.exec(["/bin/sh", "-c", opts.cmd], timeout=opts.cmd_timeout)
        console_log = str(guest.machine.console_log)
    finally:
        guest.shutdown()
    return {
        "mode": "plain",
        "accel": accel.name,
        "accel_reason": accel.reason,
        "kernel_release": ready.get("kernel"),
        "agent_version": ready.get("version"),
        "exec": {"argv": ["/bin/sh", "-c", opts.cmd], "rc": result["rc"],
                 "stdout": result["stdout"], "stderr": result["stderr"]},
        "timings": {k: round(v, 4) for k, v in timer.phases.items()},
        "boot_to_ready_s": round(sum(timer.phases.get(p, 0.0) for p in BOOT_PHASES), 4),
        "console_log": console_log,
    }


def format_table(rows: list[tuple[str, str]], headers: tuple[str, str]) -> str:
    width = max(len(headers[0]), *(len(r[0]) for r in rows))
    vwidth = max(len(headers[1]), *(len(r[1]) for r in rows))
    lines = [f"{headers[0]:<{width}}  {headers[1]:>{vwidth}}", f"{'-' * width}  {'-' * vwidth}"]
    lines += [f"{a:<{width}}  {b:>{vwidth}}" for a, b in rows]
    return "\n".join(lines)


def format_run(result: dict) -> str:
    rows = [(name, f"{secs:.3f} s") for name, secs in result["timings"].items()]
    rows.append(("boot to agent ready", f"{result['boot_to_ready_s']:.3f} s"))
    out = [f"mode: {result['mode']}   accelerator: {result['accel']}   "
           f"guest kernel: {result['kernel_release']}", "",
           format_table(rows, ("phase", "time")), "",
           f"$ {result['exec']['argv'][-1]}   (exit status {result['exec']['rc']})",
           result["exec"]["stdout"].rstrip()]
    if result["exec"]["stderr"].strip():
        out.append(result["exec"]["stderr"].rstrip())
    out.append(f"console log: {result['console_log']}")
    return "\n".join(out)
