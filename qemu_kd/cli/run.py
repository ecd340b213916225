"""``qemu-kd run``: boot the default guest, run a command in it, shut it down."""

from __future__ import annotations

import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from guest_agent.protocol import MAX_OUTPUT

from qemu_kd.qemu.accel import choose_accel
from qemu_kd.common.errors import ConfigError, GuestImageError, KdError
from qemu_kd.guest.additions import GuestAdditions
from qemu_kd.qemu.launch import PhaseTimer, boot_plain, full_cmdline
from qemu_kd.qemu.machine import MachineSpec

MiB = 1 << 20
BOOT_PHASES = ("qemu start", "layout", "vcpu load", "kernel to agent ready")


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


def read_guest_file(path, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{what} {path} does not exist",
                          "pass an existing file, or omit it to use the default guest") from None
    except IsADirectoryError:
        raise ConfigError(f"{what} {path} is a directory, not a file") from None
    except OSError as exc:
        raise GuestImageError(f"cannot read {what} {path}: {exc.strerror}") from None


def guest_inputs(opts: "RunOptions", show) -> tuple[bytes, bytes, Path, str | None]:
    """Kernel and initrd bytes: the user's, or the default guest's (built if needed)."""
    if opts.kernel or opts.initrd:
        if opts.additions:
            raise ConfigError("--add and --overlay build on the default guest, not on --kernel/--initrd",
                              "drop --kernel and --initrd, or add the files to your own initrd")
        if not (opts.kernel and opts.initrd):
            raise ConfigError("--kernel and --initrd go together",
                              "pass both, or neither for the default guest")
        return (read_guest_file(opts.kernel, "kernel"), read_guest_file(opts.initrd, "initrd"),
                Path(opts.kernel), None)
    from qemu_kd.guest.additions import ensure_custom_guest

    art = ensure_custom_guest(opts.additions or GuestAdditions(), progress=show)
    return (read_guest_file(art.kernel, "kernel"), read_guest_file(art.initrd, "initrd"),
            art.kernel, art.kernel_release)


def prepare_run(opts: RunOptions):
    """What every run starts with: the progress printer, the guest's kernel and initrd,
    the accelerator (announced) and the phase timer."""
    show = progress_printer(opts.progress)
    kernel, initrd, kernel_path, _release = guest_inputs(opts, show)
    accel = choose_accel(opts.accel, kernel_path)
    show(f"accelerator: {accel.name} ({accel.reason})")
    return show, kernel, initrd, accel, PhaseTimer(progress=show)


def run_plain(opts: RunOptions) -> dict:
    """Boot the default guest without protection and run ``opts.cmd`` through the agent."""
    show, kernel, initrd, accel, timer = prepare_run(opts)
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
                 "timeout": opts.cmd_timeout, "output_cap": MAX_OUTPUT,
                 "stdout": result["stdout"], "stderr": result["stderr"],
                 "timed_out": result.get("timed_out", False),
                 "truncated": result.get("truncated", False)},
        "timings": {k: round(v, 4) for k, v in timer.phases.items()},
        "boot_to_ready_s": round(sum(timer.phases.get(p, 0.0) for p in BOOT_PHASES), 4),
        "console_log": console_log,
    }


PROTECTED_BOOT_PHASES = ("launch", "kernel to agent ready")


@dataclass
class ProtectedOptions(RunOptions):
    debug: bool = False
    keep: bool = False
    exposed_register_mask: int = 0
    name: str | None = None     # the domain's name; None: the platform picks the next free kdN


def run_protected(opts: ProtectedOptions) -> dict:
    """The whole flow: platform, host VMM, layout, seal, load, verify, launch, attest, run."""
    import base64

    from host_vmm.process import HostVmmProcess

    from qemu_kd.formats.layout import HostLayout
    from qemu_kd.hostport.registry import platform_state_dir
    from qemu_kd.cli.clean import sweep_leftovers
    from qemu_kd.common.rundirs import make_private_dir
    from qemu_kd.hostport.spawn import hand_over_platform, start_platform_process, stop_platform_process
    from qemu_kd.formats.policy import Policy
    from qemu_kd.tenant.session import TenantSession, attest
    from qemu_kd.tenant.measure import measure
    from qemu_kd.tenant.seal import seal

    show, kernel, initrd, accel, timer = prepare_run(opts)
    cmdline = full_cmdline()
    policy = Policy.make(debug=opts.debug)
    pstate = platform_state_dir()
    sweep_leftovers()
    workdir = make_private_dir("run")   # <runtime>/run-<pid>-*: swept once its owners are dead
    platform = host = None
    keep = False
    try:
        with timer.phase("platform start"):
            platform, psock = start_platform_process(
                workdir / "platform.sock", pstate, accel=accel.name,
                memory_size=opts.mem_size + (64 << 20), exit_when_idle=opts.keep, detach=opts.keep,
                remove_dir=workdir if opts.keep else None)
            host = HostVmmProcess(str(psock), str(workdir / "host-vmm.sock"))
        with timer.phase("layout"):
            layout = HostLayout.unpack(host.call("allocate", memory_size=opts.mem_size)["layout"].encode())
        with timer.phase("seal"):
            root_pem = (pstate / "root-ca.crt").read_bytes()
            bundle, secret = seal(kernel, initrd, cmdline, opts.mem_size, policy, layout, root_pem,
                                  exposed_register_mask=opts.exposed_register_mask)
            bundle_path = workdir / "guest.kd"
            bundle.write(bundle_path)
        expected = measure(kernel, initrd, cmdline, opts.mem_size, policy,
                           exposed_register_mask=opts.exposed_register_mask)
        with timer.phase("load"):
            host.call("load", bundle=str(bundle_path))
        with timer.phase("verify"):
            checks = host.call("verify")["checks"]
        show("launch and boot to agent ready")
        launched = host.call("launch", ready_timeout=opts.ready_timeout, name=opts.name)
        name = launched.get("name") or f"kd{layout.keyid}"
        # The host VMM timed these phases; they ran between verify and attest.
        timer.phases.update(in_order(launched.get("timings", {}), PROTECTED_BOOT_PHASES))
        with timer.phase("attest"):
            # The tenant's part: the host VMM relays these requests and frames, and can read none of it.
            def relay(cmd: str, wait: float = 60.0, **args) -> dict:
                return host.agent(cmd, wait=wait, **args)

            attestation = attest(relay, root_pem=root_pem, chain_pem=layout.platform_chain_pem,
                                 measurement=expected, policy=policy, host_data=layout.host_data)
            report = attestation.report
            session = TenantSession(relay, attestation, secret.key)
        with timer.phase("command"):
            result = session.exec(shell=opts.cmd, timeout=opts.cmd_timeout)
        status = host.call("status")
        out = {
            "mode": "protected",
            "accel": accel.name,
            "accel_reason": accel.reason,
            "kernel_release": launched["ready"].get("kernel"),
            "agent_version": launched["ready"].get("version"),
            "keyid": layout.keyid,
            "name": name,
            "measurement": report.measurement.hex(),
            "expected_measurement": expected.hex(),
            "policy": {"debug": policy.debug, "hex": policy.pack().hex()},
            "attestation": {"verified": True, "emulated": report.emulated,
                            "policy": report.policy.pack().hex(),
                            "report_data": report.report_data.hex(),
                            "report_id": report.report_id.hex(),
                            "nonce": attestation.nonce.hex(),
                            "agent_public_key": attestation.agent_public.hex(),
                            "report": base64.b64encode(attestation.report_bytes).decode(),
                            "chain_pem": attestation.chain_pem.decode()},
            "host_verification": {c["name"]: {"ok": c["ok"], "detail": c["detail"]}
                                  for c in checks},
            "exec": {"argv": ["/bin/sh", "-c", opts.cmd], "rc": result["rc"],
                 "timeout": opts.cmd_timeout, "output_cap": MAX_OUTPUT,
                     "stdout": result["stdout"].decode("utf-8", errors="replace"),
                     "stderr": result["stderr"].decode("utf-8", errors="replace"),
                     "timed_out": result["timed_out"], "truncated": result["truncated"]},
            "console_log": launched["endpoints"].get("console_log"),
            "endpoints": launched["endpoints"],
            "integrity_events": status.get("integrity_events", 0),
        }
        if opts.keep:
            # The host VMM lets go of the domain (its shared channel included); the detached
            # platform daemon keeps it running until `qemu-kd destroy`.
            host.call("detach")
            hand_over_platform(platform)
            keep = True
            from qemu_kd.cli.kept import KeptTenant

            KeptTenant(platform.pid, secret, layout.platform_chain_pem).save()
            out["kept"] = {"platform_pid": platform.pid, "platform_socket": str(psock),
                           "name": name}
        else:
            with timer.phase("shutdown"):
                host.call("destroy")
    except KdError as exc:
        saved = keep_platform_log(workdir / "platform.log")
        if saved is not None:
            exc.hint = (f"{exc.hint}; " if exc.hint else "") + f"the platform's log is kept in {saved}"
        raise
    finally:
        if host is not None:
            host.stop()
        if not keep:
            if platform is not None:
                stop_platform_process(platform)
            shutil.rmtree(workdir, ignore_errors=True)
    if not keep:
        out["endpoints"] = surviving_files(out["endpoints"])
    out["timings"] = {k: round(v, 4) for k, v in timer.phases.items()}
    out["boot_to_ready_s"] = round(sum(timer.phases.get(p, 0.0) for p in PROTECTED_BOOT_PHASES), 4)
    return out


def keep_platform_log(log: Path) -> Path | None:
    """Copy a failed run's platform log (in the run directory, about to be removed) to the
    log directory, mode 0600; its new path, or None when there is no log."""
    import os
    import time

    from qemu_kd.common.files import write_file_atomic
    from qemu_kd.qemu.machine import log_dir

    try:
        data = log.read_bytes()
    except OSError:
        return None
    saved = log_dir() / f"platform-{os.getpid()}-{int(time.time())}.log"
    try:
        write_file_atomic(saved, data, mode=0o600)
    except OSError:
        return None
    return saved


def in_order(timings: dict[str, float], order: tuple[str, ...]) -> dict[str, float]:
    """``timings`` with the phases named in ``order`` first, in that order (the order they ran)."""
    known = {name: timings[name] for name in order if name in timings}
    return {**known, **{name: secs for name, secs in timings.items() if name not in known}}


def surviving_files(endpoints: dict) -> dict:
    """The endpoints of a domain that is gone: its sockets are null, and so is any log
    that went with it; files that outlive the run (the console log) keep their path."""
    return {name: path if path and Path(path).is_file() else None
            for name, path in endpoints.items()}


def format_table(rows: list[tuple[str, str]], headers: tuple[str, str], align: str = ">") -> str:
    width = max(len(headers[0]), *(len(r[0]) for r in rows))
    vwidth = max(len(headers[1]), *(len(r[1]) for r in rows))
    lines = [f"{headers[0]:<{width}}  {headers[1]:{align}{vwidth}}", f"{'-' * width}  {'-' * vwidth}"]
    lines += [f"{a:<{width}}  {b:{align}{vwidth}}" for a, b in rows]
    return "\n".join(lines)


def format_run(result: dict) -> str:
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
    out += [f"$ {ran['argv'][-1]}   (exit status {ran['rc']}{''.join('; ' + n for n in notes)})",
            ran["stdout"].rstrip()]
    out.append(f"console log: {result['console_log']}")
    return "\n".join(out)
