"""``qemu-kd exec DOMAIN -- CMD...``: run a command in a kept domain, as ``docker exec`` does.

It runs as the tenant: the domain's tenant record (written by ``run --keep``)
gives the key and the expected measurement; ``exec`` attests the guest over a
fresh nonce through the domain's shared channel, opens the tenant session and
runs the command inside it.  In text mode the command's output is printed as it
arrives; ``--json`` prints one object at the end.  Exit statuses are ``run``'s
(docs/usage.md).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Callable


def exec_in_domain(name: str, argv: list[str], timeout: float | None,
                   on_output: Callable[[str, bytes], None] | None = None) -> dict:
    """Attest the kept domain ``name``, open its session and run ``argv``; the result.

    ``on_output(stream, data)`` gets the command's output as it arrives."""
    from qemu_kd.channel.agent_client import AgentClient, connect_shared_channel
    from qemu_kd.cli.domains import require_endpoint, resolve
    from qemu_kd.cli.kept import KeptTenant
    from qemu_kd.hostport.registry import platform_state_dir
    from qemu_kd.tenant.session import TenantSession, attest

    dom = resolve(name)
    shared = require_endpoint(dom, "shared")
    kept = KeptTenant.load(dom.platform_pid, dom.keyid, dom.qualified)
    sock = connect_shared_channel(shared, "another client may hold it; run `qemu-kd ls`")
    client = AgentClient(sock)
    try:
        def relay(cmd: str, wait: float = 60.0, **args) -> dict:
            return client.call(cmd, wait=wait, **args)

        secret = kept.secret
        root_pem = (platform_state_dir() / "root-ca.crt").read_bytes()
        attestation = attest(relay, root_pem=root_pem, chain_pem=kept.chain_pem,
                             measurement=secret.measurement, policy=secret.policy,
                             host_data=secret.host_data)
        session = TenantSession(relay, attestation, secret.key)
        result = session.exec_stream(argv, timeout=timeout, on_output=on_output)
    finally:
        sock.close()
    return {"name": dom.name, "qualified_name": dom.qualified, "keyid": dom.keyid,
            "measurement": attestation.report.measurement.hex(), "attested": True,
            "exec": {"argv": list(argv), "rc": result["rc"], "timeout": timeout,
                     "stdout": result["stdout"].decode("utf-8", errors="replace"),
                     "stderr": result["stderr"].decode("utf-8", errors="replace"),
                     "timed_out": result["timed_out"], "truncated": result["truncated"]}}


def _cmd_exec(args: argparse.Namespace) -> int:
    from qemu_kd.cli.outcome import CommandLineError, guest_exit_status

    argv = args.argv[1:] if args.argv[:1] == ["--"] else args.argv
    if not argv:
        raise CommandLineError("exec needs a command after the domain",
                               "qemu-kd exec kd1 -- uname -a")
    out = exec_in_domain(args.domain, argv, args.cmd_timeout, None if args.json else _print_output)
    ran = out["exec"]
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        if ran["timed_out"]:
            sys.stderr.write(f"qemu-kd: the command timed out after {args.cmd_timeout:g} s and was killed\n")
        if ran["truncated"]:
            sys.stderr.write("qemu-kd: the command's output was truncated\n")
        sys.stderr.flush()
    return guest_exit_status(ran)


def _print_output(stream: str, data: bytes) -> None:
    """Pass a piece of the command's output through to our own stdout or stderr, as it comes."""
    out = sys.stdout if stream == "stdout" else sys.stderr
    out.flush()
    out.buffer.write(data)
    out.buffer.flush()


def add_exec_parser(sub) -> None:
    from qemu_kd.cli.args import positive_seconds

    ex = sub.add_parser("exec", help="run a command in a kept domain, through the tenant session",
                        description="Attests the domain, opens the tenant session and runs the "
                                    "command in it; exits with the command's status (125: "
                                    "qemu-kd failed, 124: timed out).")
    ex.harness_exit = True
    ex.add_argument("--cmd-timeout", type=positive_seconds, default=None, metavar="S",
                    help="kill the command after S seconds (exit 124; default: no limit)")
    ex.add_argument("--json", action="store_true", help="print one JSON object")
    ex.add_argument("domain", help="the domain: its name (run --name, or kdN), N, or PID:NAME")
    ex.add_argument("argv", nargs=argparse.REMAINDER, help="-- and the command and its arguments")
    ex.set_defaults(func=_cmd_exec, harness_exit=True)
