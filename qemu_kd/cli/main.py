"""The ``qemu-kd`` command line.

User errors (:class:`~qemu_kd.common.errors.KdError`) print one line and exit with the
error's code; Ctrl-C and SIGTERM unwind through every cleanup handler.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys

from qemu_kd import __version__
from qemu_kd.common.errors import KdError


def _cmd_run(args: argparse.Namespace) -> int:
    from qemu_kd.common.errors import ConfigError
    from qemu_kd.cli.run import ProtectedOptions, format_run, run_plain, run_protected
    from qemu_kd.cli.guest_files import additions_from_args

    opts = ProtectedOptions(cmd=args.cmd, mem_size=args.mem, accel=args.accel,
                            ready_timeout=args.timeout, progress=not args.quiet,
                            kernel=args.kernel, initrd=args.initrd, debug=args.debug,
                            keep=args.keep, exposed_register_mask=args.expose, name=args.name,
                            cmd_timeout=args.cmd_timeout, additions=additions_from_args(args),
                            platform=args.platform)
    if not args.json:
        # Output as it arrives (docker run's way), before the report: a long command shows progress.
        from qemu_kd.cli.run import OutputPrinter

        opts.on_output = OutputPrinter()
    if args.plain:
        if args.debug or args.keep or args.expose:
            raise ConfigError("--debug, --keep and --expose apply to protected domains",
                              "drop --plain, or drop --debug/--keep/--expose")
        if args.name:
            raise ConfigError("--name names a protected domain", "drop --plain, or drop --name")
        if args.platform:
            raise ConfigError("--platform runs a protected domain on that platform; a plain one "
                              "needs none", "drop --plain, or drop --platform")
        result = run_plain(opts)
    else:
        result = run_protected(opts)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        opts.on_output.end_lines()
        print(format_run(result, output_shown=True))
        if result.get("kept"):
            kept = result["kept"]
            name = kept["name"]
            print(f"\ndomain {name} kept running (KeyID {result['keyid']}, platform pid "
                  f"{kept['platform_pid']}, host port {kept['platform_socket']})")
            print(f"  console:  qemu-kd console {name}")
            print(f"  QMP:      qemu-kd qmp-shell {name}   ({result['endpoints']['qmp']})")
            print(f"  gdb:      qemu-kd gdb {name}         ({result['endpoints']['gdb']})")
            print(f"  exec:     qemu-kd exec {name} -- CMD...")
            print(f"  end it:   qemu-kd destroy {name}")
    from qemu_kd.cli.outcome import guest_exit_status

    return guest_exit_status(result["exec"])


def _cmd_platform_serve(args: argparse.Namespace) -> int:
    from qemu_kd.platform.daemon import main as platformd_main

    # The daemon parses its own options (--help included): they are the arguments
    # this parser left unrecognised.
    return platformd_main(args.passthrough)


def _cmd_host_serve(args: argparse.Namespace) -> int:
    from host_vmm.service import main as host_main

    return host_main(["--platform", args.platform, "--api", args.api])


def _cmd_host_layout(args: argparse.Namespace) -> int:
    from host_vmm.vmm import HostVmm

    vmm = HostVmm(args.platform)
    layout = vmm.allocate(args.mem)
    layout.write(args.out)
    print(f"KeyID {layout.keyid} reserved with {len(layout.hpas)} pages; layout written to {args.out}")
    vmm.client.close()
    return 0


def _cmd_guest_build(args: argparse.Namespace) -> int:
    from pathlib import Path

    from qemu_kd.cli.guest_files import additions_from_args
    from qemu_kd.cli.run import progress_printer
    from qemu_kd.guest.additions import ensure_custom_guest, export_guest

    art = ensure_custom_guest(additions_from_args(args), force=args.force,
                              progress=progress_printer(True))
    if args.out:
        art = export_guest(art, Path(args.out))
    info = {"kernel": str(art.kernel), "initrd": str(art.initrd), "manifest": str(art.manifest),
            "kernel_release": art.kernel_release,
            "kernel_package_version": art.kernel_package_version}
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        for key, value in info.items():
            print(f"{key:24} {value}")
    return 0


def add_run_parser(sub) -> None:
    from qemu_kd.cli.args import add_expose_option, domain_name, guest_memory, positive_seconds
    from qemu_kd.cli.guest_files import add_addition_options

    run = sub.add_parser("run", help="boot the default guest, run a command in it, shut down")
    run.add_argument("--plain", action="store_true",
                     help="boot without key-domain protection (for comparison)")
    run.add_argument("--debug", action="store_true",
                     help="seal with the DEBUG policy (host may read guest memory, audited)")
    add_expose_option(run)
    run.add_argument("--keep", action="store_true",
                     help="leave the domain running and print how to reach it")
    run.add_argument("--platform", metavar="SOCKET", default=None,
                     help="run on the platform daemon already serving on SOCKET (qemu-kd platform "
                          "serve) instead of starting one; it keeps running afterwards")
    run.add_argument("--name", type=domain_name, default=None,
                     help="name the domain (1-32 of A-Z a-z 0-9 _ . -, unique among the live "
                          "domains of every platform; default: the next free kdN)")
    run.add_argument("--cmd", default="uname -a", help="shell command to run in the guest")
    run.add_argument("--mem", default="256M", type=guest_memory,
                     help="guest memory size: a multiple of 2M from 64M to 3G (default 256M)")
    run.add_argument("--accel", default="auto", choices=("auto", "kvm", "tcg"),
                     help="accelerator (auto probes KVM and falls back to TCG)")
    run.add_argument("--timeout", type=positive_seconds, default=120.0,
                     help="seconds to wait for the guest agent (default 120)")
    run.add_argument("--cmd-timeout", type=positive_seconds, default=None, metavar="S",
                     help="kill the guest command after S seconds (exit 124; default: no limit)")
    run.add_argument("--kernel", help="a bzImage to boot instead of the default guest's")
    run.add_argument("--initrd", help="the initramfs to go with --kernel")
    add_addition_options(run)
    run.add_argument("--json", action="store_true", help="print one JSON object")
    run.add_argument("-q", "--quiet", action="store_true", help="no progress lines")
    run.set_defaults(func=_cmd_run, harness_exit=True)
    run.harness_exit = True


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The whole command line; ``command="run"`` builds the ``run`` command's parser only: it
    parses a ``run`` command line the same, without loading every other command's module
    first (a protected run starts its platform daemon sooner)."""
    parser = KdArgumentParser(
        prog="qemu-kd",
        description="Key-domain protected VMs emulated around real QEMU guests.")
    parser.add_argument("--version", action="version", version=f"qemu-kd {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    add_run_parser(sub)
    if command == "run":
        return parser
    from qemu_kd.cli.args import guest_memory
    from qemu_kd.cli.guest_files import add_addition_options

    guest = sub.add_parser("guest", help="the default guest kernel and image")
    gsub = guest.add_subparsers(dest="guest_command", metavar="ACTION")
    gsub.required = True
    build = gsub.add_parser("build", help="obtain the kernel and build the initramfs (cached)")
    build.add_argument("--force", action="store_true", help="rebuild even if cached")
    add_addition_options(build)
    build.add_argument("--out", metavar="DIR",
                       help="also copy bzImage, initramfs.cpio.lz4 and manifest.json into DIR")
    build.add_argument("--json", action="store_true", help="print one JSON object")
    build.set_defaults(func=_cmd_guest_build)

    from qemu_kd.cli.tenant import add_tenant_parser

    add_tenant_parser(sub)

    from qemu_kd.cli.domains import add_domain_parsers

    add_domain_parsers(sub)

    from qemu_kd.cli.exec import add_exec_parser

    add_exec_parser(sub)

    from qemu_kd.cli.snapshot import add_snapshot_parsers

    add_snapshot_parsers(sub)

    from qemu_kd.cli.controls import add_control_parsers

    add_control_parsers(sub)

    from qemu_kd.cli.clean import add_clean_parser

    add_clean_parser(sub)

    host = sub.add_parser("host", help="the untrusted host VMM")
    hsub = host.add_subparsers(dest="host_command", metavar="ACTION")
    hsub.required = True
    serve = hsub.add_parser("serve", help="run the host VMM process (API on a Unix socket)")
    serve.add_argument("--platform", required=True, help="the platform's host-port socket")
    serve.add_argument("--api", required=True, help="socket to serve the VMM API on")
    serve.set_defaults(func=_cmd_host_serve)
    lay = hsub.add_parser("layout", help="reserve a KeyID and pages; write the layout for the tenant")
    lay.add_argument("--platform", required=True, help="the platform's host-port socket")
    lay.add_argument("--mem", default="256M", type=guest_memory,
                     help="guest memory size: a multiple of 2M from 64M to 3G (default 256M)")
    lay.add_argument("--out", required=True, help="layout file to write")
    lay.set_defaults(func=_cmd_host_layout)

    plat = sub.add_parser("platform", help="the emulated platform (processor and MEE)")
    psub = plat.add_subparsers(dest="platform_command", metavar="ACTION")
    psub.required = True
    pserve = psub.add_parser("serve", help="run the platform daemon (see --help of it)",
                             add_help=False)
    pserve.set_defaults(func=_cmd_platform_serve, passthrough=[])
    return parser


class KdArgumentParser(argparse.ArgumentParser):
    """argparse, except that the commands which run guest commands (``harness_exit``) raise
    their usage errors, so that they exit with qemu-kd's own code and ``--json`` reports them."""

    harness_exit = False

    def error(self, message: str):
        if self.harness_exit:
            from qemu_kd.cli.outcome import CommandLineError

            self.print_usage(sys.stderr)
            raise CommandLineError(message)
        super().error(message)


def _on_sigterm(signum, frame):  # pragma: no cover - exercised through subprocess tests
    raise KeyboardInterrupt


class InterruptWatch:
    """The SIGINT and SIGTERM handler of ``run`` and ``exec``: raises KeyboardInterrupt, as
    Python's own does, and remembers that it did.  A KeyboardInterrupt raised inside a C
    extension's import (numpy loading while the platform starts, say) can come out as another
    exception, an ImportError; once an interrupt was seen, that is the interrupt, not a bug."""

    def __init__(self):
        self.seen = False

    def __call__(self, signum, frame):  # pragma: no cover - exercised through subprocess tests
        self.seen = True
        raise KeyboardInterrupt

    def install(self) -> "InterruptWatch":
        signal.signal(signal.SIGINT, self)
        signal.signal(signal.SIGTERM, self)
        return self


def _harness_command(args: argparse.Namespace, interrupts: InterruptWatch) -> int:
    """Run ``run`` or ``exec``: a failure is reported in one line (or one JSON object) and exits
    with qemu-kd's own code."""
    from qemu_kd.cli.outcome import report_failure

    try:
        return args.func(args)
    except (KdError, KeyboardInterrupt) as exc:
        return report_failure(exc, as_json=args.json)
    except Exception as exc:  # noqa: BLE001 - a bug: its traceback, and still one JSON object
        if interrupts.seen:     # the interrupt, come out of an import as another exception
            return report_failure(KeyboardInterrupt(), as_json=args.json)
        import traceback

        traceback.print_exc()
        return report_failure(exc, as_json=args.json)


def parse_args(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Parse ``argv``; only ``platform serve`` takes arguments this parser does not know.

    Bad arguments print argparse's usage line and exit with status 2.
    """
    args, unknown = parser.parse_known_args(argv)
    if "passthrough" in args:
        args.passthrough = unknown
    elif unknown:
        if getattr(args, "harness_exit", False):
            from qemu_kd.cli.outcome import CommandLineError

            raise CommandLineError(f"unrecognized arguments: {' '.join(unknown)}")
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    return args


def main(argv: list[str] | None = None) -> int:
    """The ``qemu-kd`` command with ``argv`` (default: this process's arguments); its exit status.

    A ``run`` on this process's own arguments ends the process itself once everything is
    cleaned up (:func:`qemu_kd.common.process.exit_without_teardown`); called with ``argv``,
    main returns as every command does.
    """
    from qemu_kd.cli.outcome import CommandLineError, report_failure

    whole_process = argv is None
    if whole_process:
        # numpy's BLAS would spin a worker thread on the other CPU while the platform daemon and
        # the host VMM start beside this process; a command line needs no linear algebra.
        from qemu_kd.common.blas import single_threaded_blas

        single_threaded_blas()
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(argv[0] if argv else None)
    try:
        args = parse_args(parser, argv)
    except CommandLineError as exc:   # run/exec: qemu-kd's own code, and --json still reports
        return report_failure(exc, as_json="--json" in argv)
    if getattr(args, "harness_exit", False):
        code = _harness_command(args, InterruptWatch().install())
        if whole_process and args.command == "run":
            from qemu_kd.common.process import exit_without_teardown

            exit_without_teardown(code)
        return code
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
