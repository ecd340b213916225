"""What the ``qemu-kd`` process does before it needs the platform.

A protected run starts the platform daemon and the host VMM first; what this
process loads and computes until it needs them runs beside them on the
machine's CPUs, so what it need not do there it does not.
"""

from __future__ import annotations

import os
import subprocess
import sys

#: The command line's ``main`` in a fresh process, stopped where it would parse its arguments:
#: prints the BLAS thread setting it leaves its children and whether numpy is loaded by then.
STOP_AT_PARSER = ("import os, sys\n"
                  "import qemu_kd.cli.main as m\n"
                  "def stop(*args, **kwargs):\n"
                  "    print(os.environ.get('OPENBLAS_NUM_THREADS'), 'numpy' in sys.modules, flush=True)\n"
                  "    raise SystemExit(0)\n"
                  "m.build_parser = stop\n"
                  "sys.argv[0] = 'qemu-kd'\n"
                  "m.main()\n")


def _fresh_cli(env: dict[str, str]) -> list[str]:
    out = subprocess.run([sys.executable, "-c", STOP_AT_PARSER, "run"], capture_output=True, text=True,
                         timeout=60, env=env)
    assert out.returncode == 0, out.stderr
    return out.stdout.splitlines()


def test_the_command_keeps_blas_to_one_thread_before_numpy_loads():
    """numpy's BLAS would spin a worker thread on the other CPU while the daemon and the host
    VMM start beside the command (about 0.1 CPU-seconds of a 2-CPU machine)."""
    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_NUM_THREADS"}
    assert _fresh_cli(env) == ["1 False"]


def test_the_command_leaves_a_users_blas_setting():
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "4"}
    assert _fresh_cli(env) == ["4 False"]
