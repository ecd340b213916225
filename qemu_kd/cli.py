"""The ``qemu-kd`` command line.

User errors (:class:`~qemu_kd.errors.KdError`) print one line and exit with the
error's code; Ctrl-C and SIGTERM unwind through every cleanup handler.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys

from . import __version__
from .errors import KdError


def _cmd_run(args: argparse.Namespace) -> int:
    from .run import RunOptions, format_run, parse_size, run_plain

    opts = RunOptions(cmd=args.cmd, mem_size=parse_size(args.mem), accel=args.accel,
                      ready_timeout=args.timeout, progress=not args.quiet,
                      kernel=args.kernel, initrd=args.initrd)
    if not args.plain:
        from .errors import ConfigError
        raise ConfigError("the protected flow is not available in this build",
                          "use qemu-kd run --plain")
    result = run_plain(opts)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(format_run(result))
    return 0 if result["exec"]["rc"] == 0 else 1


def _cmd_guest_build(args: argparse.Namespace) -> int:
    from .guest_build import ensure_guest
    from .run import progress_printer

    art = ensure_guest(force=args.force, progress=progress_printer(True))
    info = {"kernel": str(art.kernel), "initrd": str(art.initrd), "manifest": str(art.manifest),
            "kernel_release": art.kernel_release,
            "kernel_package_version": art.kernel_package_version}
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        for key, value in info.items():
            print(f"{key:24} {value}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qemu-kd",
        description="Key-domain protected VMs emulated around real QEMU guests.")
    parser.add_argument("--version", action="version", version=f"qemu-kd {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    run = sub.add_parser("run", help="boot the default guest, run a command in it, shut down")
    run.add_argument("--plain", action="store_true",
                     help="boot without key-domain protection (for comparison)")
    run.add_argument("--cmd", default="uname -a", help="shell command to run in the guest")
    run.add_argument("--mem", default="256M", help="guest memory size (default 256M)")
    run.add_argument("--accel", default="auto", choices=("auto", "kvm", "tcg"),
                     help="accelerator (auto probes KVM and falls back to TCG)")
    run.add_argument("--timeout", type=float, default=120.0,
                     help="seconds to wait for the guest agent (default 120)")
    run.add_argument("--kernel", help="a bzImage to boot instead of the default guest's")
    run.add_argument("--initrd", help="the initramfs to go with --kernel")
    run.add_argument("--json", action="store_true", help="print one JSON object")
    run.add_argument("-q", "--quiet", action="store_true", help="no progress lines")
    run.set_defaults(func=_cmd_run)

    guest = sub.add_parser("guest", help="the default guest kernel and image")
    gsub = guest.add_subparsers(dest="guest_command", metavar="ACTION")
    gsub.required = True
    build = gsub.add_parser("build", help="obtain the kernel and build the initramfs (cached)")
    build.add_argument("--force", action="store_true", help="rebuild even if cached")
    build.add_argument("--json", action="store_true", help="print one JSON object")
    build.set_defaults(func=_cmd_guest_build)
    return parser


def _on_sigterm(signum, frame):  # pragma: no cover - exercised through subprocess tests
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        return args.func(args)
    except KdError as exc:
        print(f"qemu-kd: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("qemu-kd: interrupted; QEMU stopped and its files removed", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
