"""``qemu-kd run``: boot the default guest, run a command in it, shut it down.

A thin layer over :mod:`qemu_kd.api`: a :class:`~qemu_kd.api.Platform` launches the domain
(and holds the launch flow); this module checks the command line's guest inputs, runs the
command, and turns what the platform and the domain report into ``run``'s report.
"""

from __future__ import annotations

import base64
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from guest_agent.protocol import MAX_OUTPUT

from qemu_kd.api import (
    DOMAIN_OVERHEAD, PLAIN_BOOT_PHASES, PROTECTED_BOOT_PHASES, Domain, ExecResult, Platform,
    ProtectedDomain, keep_platform_log,
)
from qemu_kd.common.errors import ConfigError, GuestImageError, KdError

if TYPE_CHECKING:
    # The modules a run needs beyond these load where they are used, so that a protected run's
    # platform daemon is already starting while they load.
    from qemu_kd.guest.additions import GuestAdditions
    from qemu_kd.qemu.launch import PhaseTimer

MiB = 1 << 20


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
    cmd_timeout: float | None = None     # None: the guest command runs until it ends
    progress: bool = True
    kernel: str | None = None
    initrd: str | None = None
    additions: GuestAdditions | None = None   # --add/--overlay on the default guest
    on_output: Callable[[str, bytes], None] | None = None   # the command's output as it arrives


@dataclass
class ProtectedOptions(RunOptions):
    debug: bool = False
    keep: bool = False
    exposed_register_mask: int = 0
    name: str | None = None     # the domain's name; None: the platform picks the next free kdN
    platform: str | None = None   # a running platform daemon's host-port socket; None: start one


def check_guest_file(path, what: str) -> Path:
    """``path``, once it is known to be a file qemu-kd can read."""
    try:
        with open(path, "rb"):
            return Path(path)
    except FileNotFoundError:
        raise ConfigError(f"{what} {path} does not exist",
                          "pass an existing file, or omit it to use the default guest") from None
    except IsADirectoryError:
        raise ConfigError(f"{what} {path} is a directory, not a file") from None
    except OSError as exc:
        raise GuestImageError(f"cannot read {what} {path}: {exc.strerror}") from None


def guest_inputs(opts: RunOptions, show) -> tuple[Path, Path]:
    """The kernel and initrd to boot: the user's, or the default guest's (built if needed)."""
    if opts.kernel or opts.initrd:
        if opts.additions:
            raise ConfigError("--add and --overlay build on the default guest, not on --kernel/--initrd",
                              "drop --kernel and --initrd, or add the files to your own initrd")
        if not (opts.kernel and opts.initrd):
            raise ConfigError("--kernel and --initrd go together",
                              "pass both, or neither for the default guest")
        return check_guest_file(opts.kernel, "kernel"), check_guest_file(opts.initrd, "initrd")
    from qemu_kd.guest.additions import GuestAdditions, ensure_custom_guest

    art = ensure_custom_guest(opts.additions or GuestAdditions(), progress=show)
    return check_guest_file(art.kernel, "kernel"), check_guest_file(art.initrd, "initrd")


def exec_fields(opts: RunOptions, result: ExecResult) -> dict:
    """The ``exec`` object of ``run --json``."""
    return {"argv": ["/bin/sh", "-c", opts.cmd], "rc": result.rc, "timeout": opts.cmd_timeout,
            "output_cap": MAX_OUTPUT, "stdout": result.stdout_text, "stderr": result.stderr_text,
            "timed_out": result.timed_out, "truncated": result.truncated}


def run_command(opts: RunOptions, dom: Domain, timer: PhaseTimer) -> dict:
    """Run ``opts.cmd`` in ``dom`` (the ``command`` phase); its ``exec`` object."""
    with timer.phase("command"):
        return exec_fields(opts, dom.exec(opts.cmd, timeout=opts.cmd_timeout, on_output=opts.on_output))


def launch_fields(mode: str, platform: Platform, dom: Domain) -> dict:
    """The first fields of every run's report: the mode, the accelerator and the guest."""
    return {"mode": mode, "accel": platform.accel, "accel_reason": platform.accel_reason,
            "kernel_release": dom.ready.get("kernel"), "agent_version": dom.ready.get("version"),
            "guest_uptime_at_ready_s": dom.ready.get("uptime_s")}


def finish_timings(out: dict, timer: PhaseTimer, boot_phases: tuple[str, ...]) -> dict:
    out["timings"] = {k: round(v, 4) for k, v in timer.phases.items()}
    out["boot_to_ready_s"] = round(sum(timer.phases.get(p, 0.0) for p in boot_phases), 4)
    return out


def run_plain(opts: RunOptions) -> dict:
    """Boot the default guest without protection and run ``opts.cmd`` through the agent."""
    from qemu_kd.qemu.launch import PhaseTimer

    show = progress_printer(opts.progress)
    kernel, initrd = guest_inputs(opts, show)
    platform = Platform(accel=opts.accel, progress=show)    # a plain domain needs no daemon
    timer = PhaseTimer(progress=show)
    try:
        dom = platform.launch(plain=True, memory=opts.mem_size, kernel=kernel, initrd=initrd,
                              ready_timeout=opts.ready_timeout)
        timer.phases.update(dom.timings)
        out = {**launch_fields("plain", platform, dom), "exec": run_command(opts, dom, timer),
               "timings": {}, "boot_to_ready_s": 0.0, "console_log": dom.endpoints.get("console_log")}
        with timer.phase("shutdown"):
            dom.destroy()
    finally:
        platform.close()
    return finish_timings(out, timer, PLAIN_BOOT_PHASES)


def run_protected(opts: ProtectedOptions) -> dict:
    """The whole flow: platform, host VMM, layout, seal, load, verify, launch, attest, run."""
    show = progress_printer(opts.progress)
    platform = Platform(socket=opts.platform, memory=opts.mem_size + DOMAIN_OVERHEAD,
                        accel=opts.accel, progress=show, detach=opts.keep and not opts.platform)
    try:
        if opts.platform:
            attach_platform(platform, opts)    # a wrong socket fails before any guest is built
        kernel, initrd = guest_inputs(opts, show)
        # The daemon and the host VMM start first; what this process does until it needs them
        # (sweeping, loading the tenant's modules, reading and measuring the guest) overlaps.
        platform.start(probe_kernel=kernel, wait=False)
        from qemu_kd.cli.clean import sweep_leftovers
        from qemu_kd.qemu.launch import PhaseTimer

        sweep_leftovers()
        dom = platform.launch(memory=opts.mem_size, debug=opts.debug, kernel=kernel, initrd=initrd,
                              ready_timeout=opts.ready_timeout, name=opts.name,
                              exposed_register_mask=opts.exposed_register_mask)
        timer = PhaseTimer({**platform.timings, **dom.timings}, progress=show)
        out = {**launch_fields("protected", platform, dom), **protected_fields(dom),
               "exec": run_command(opts, dom, timer), "console_log": dom.endpoints.get("console_log"),
               "endpoints": dom.endpoints, "integrity_events": dom.status().get("integrity_events", 0)}
        if opts.keep:
            pid = platform.pid
            platform.keep(dom)
            from qemu_kd.cli.kept import KeptTenant

            KeptTenant(pid, dom.secret, dom.chain_pem).save()
            out["kept"] = {"platform_pid": pid, "platform_socket": str(platform.socket),
                           "name": dom.name}
        else:
            with timer.phase("shutdown"):
                dom.destroy()
            out["endpoints"] = dom.endpoints
    except KdError as exc:
        keep_platform_log(exc, platform.log_path)
        raise
    finally:
        platform.close()
    return finish_timings(out, timer, PROTECTED_BOOT_PHASES)


def attach_platform(platform: Platform, opts: ProtectedOptions) -> None:
    """Check the platform daemon ``run --platform`` names: it answers, runs the accelerator
    asked for, and (for ``--keep``) is one ``qemu-kd exec`` can find again."""
    platform.start()
    if opts.accel != "auto" and opts.accel != platform.accel:
        raise ConfigError(f"the platform on {opts.platform} runs {platform.accel}, not {opts.accel}",
                          "drop --accel: a domain runs on its platform's accelerator")
    if opts.keep and platform.pid is None:
        raise ConfigError(f"the platform on {opts.platform} is not in the platform registry, so a "
                          "kept domain could not be found again",
                          "use the same QEMU_KD_RUNTIME as the daemon, or drop --keep")


def protected_fields(dom: ProtectedDomain) -> dict:
    """What ``run --json`` reports of a protected launch: the domain, its measurement and
    policy, the attestation the tenant verified and the host VMM's checks."""
    att = dom.attestation
    report = att.report
    return {
        "keyid": dom.keyid,
        "name": dom.name,
        "measurement": report.measurement.hex(),
        "expected_measurement": dom.measurement.hex(),
        "policy": {"debug": dom.policy.debug, "hex": dom.policy.pack().hex()},
        "attestation": {"verified": True, "emulated": report.emulated,
                        "policy": report.policy.pack().hex(),
                        "report_data": report.report_data.hex(),
                        "report_id": report.report_id.hex(),
                        "nonce": att.nonce.hex(),
                        "agent_public_key": att.agent_public.hex(),
                        "report": base64.b64encode(att.report_bytes).decode(),
                        "chain_pem": att.chain_pem.decode()},
        "host_verification": dom.host_verification,
    }


def format_table(rows: list[tuple[str, str]], headers: tuple[str, str], align: str = ">") -> str:
    width = max(len(headers[0]), *(len(r[0]) for r in rows))
    vwidth = max(len(headers[1]), *(len(r[1]) for r in rows))
    lines = [f"{headers[0]:<{width}}  {headers[1]:{align}{vwidth}}", f"{'-' * width}  {'-' * vwidth}"]
    lines += [f"{a:<{width}}  {b:{align}{vwidth}}" for a, b in rows]
    return "\n".join(lines)


class OutputPrinter:
    """The guest command's output on ours, as it arrives: stdout to stdout, stderr to stderr."""

    def __init__(self):
        self.open_line = {"stdout": False, "stderr": False}   # last piece did not end a line

    def __call__(self, stream: str, data: bytes) -> None:
        out = sys.stdout if stream == "stdout" else sys.stderr
        out.flush()
        out.buffer.write(data)
        out.buffer.flush()
        if data:
            self.open_line[stream] = not data.endswith(b"\n")

    def end_lines(self) -> None:
        """Finish a last line the command left open, so what follows starts on its own."""
        for stream, open_line in self.open_line.items():
            if open_line:
                self(stream, b"\n")


def format_run(result: dict, output_shown: bool = False) -> str:
    """The text report; ``output_shown``: the command's output was already printed as it came."""
    rows = [(name, f"{secs:.3f} s") for name, secs in result["timings"].items()]
    rows.append(("boot to agent ready", f"{result['boot_to_ready_s']:.3f} s"))
    out = [f"mode: {result['mode']}   accelerator: {result['accel']}   "
           f"guest kernel: {result['kernel_release']}", "",
           format_table(rows, ("phase", "time")), ""]
    if result["mode"] == "protected":
        att = result["attestation"]
        out += [f"KeyID:                {result['keyid']}",
                f"policy:               {'DEBUG' if result['policy']['debug'] else 'no debug'}",
                f"measurement:          {result['measurement']}",
                f"expected (offline):   {result['expected_measurement']}",
                f"attestation:          {'verified' if att['verified'] else 'NOT verified'}"
                f"{' (EMULATED platform)' if att['emulated'] else ''}", "",
                format_table([(name, ("ok  " if c["ok"] else "FAIL") + "  " + c["detail"])
                              for name, c in result["host_verification"].items()],
                             ("host check", "result"), align="<"), ""]
    ran = result["exec"]
    notes = ([f"timed out after {ran['timeout']:g} s, killed"] if ran.get("timed_out") else []) + \
        ([f"output truncated to {ran.get('output_cap', 0) >> 20} MiB per stream"]
         if ran.get("truncated") else [])
    out.append(f"$ {ran['argv'][-1]}   (exit status {ran['rc']}{''.join('; ' + n for n in notes)})")
    if not output_shown:
        out.append(ran["stdout"].rstrip())
    out.append(f"console log: {result['console_log']}")
    return "\n".join(out)
