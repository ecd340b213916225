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


#: What a fresh ``qemu-kd run`` process does up to where its launch starts measuring the guest:
#: its modules, the sweep of dead processes' leftovers, then Platform._launch_protected, stopped
#: where it hands measure_guest to its thread.  Prints which of sealing's and verification's
#: modules had loaded by then.
UP_TO_MEASURING = """
import sys
from pathlib import Path
import qemu_kd.api as api
import qemu_kd.cli.main, qemu_kd.cli.run
from qemu_kd.cli.clean import sweep_leftovers

class Measuring(Exception):
    pass

def in_thread(fn, *args):
    late = ("qemu_kd.tenant.seal", "qemu_kd.tenant.verify", "qemu_kd.tenant.session", "cryptography.x509")
    print(fn.__name__, sorted(m for m in late if m in sys.modules), flush=True)
    raise Measuring

sweep_leftovers()
api._in_thread = in_thread
image = api.GuestImage(b"kernel", b"initrd", Path("/nonexistent/kernel"))
try:
    api.Platform()._launch_protected(None, image, "console=ttyS0", 64 << 20, False, 30.0)
except Measuring:
    pass
"""


def test_a_launch_starts_measuring_before_sealing_and_verification_load(tmp_path):
    """The measuring needs numpy, not X.509: sealing's and attesting's modules (some 0.05 CPU-s)
    load beside it, while the platform daemon starts, not ahead of it."""
    env = {**os.environ, "QEMU_KD_RUNTIME": str(tmp_path / "rt"), "QEMU_KD_STATE": str(tmp_path / "st")}
    out = subprocess.run([sys.executable, "-c", UP_TO_MEASURING], capture_output=True, text=True,
                         timeout=60, env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == ["measure_guest []"]


def test_the_tenant_package_names_are_its_functions_once_their_modules_load():
    """The package's names load with their submodules; ``seal`` and ``measure`` name the
    functions, as they did when the package imported them eagerly."""
    code = ("import importlib, sys\n"
            "import qemu_kd.tenant.measure\n"
            "print('qemu_kd.tenant.seal' in sys.modules)\n"
            "import qemu_kd.tenant.seal\n"
            "from qemu_kd import tenant\n"
            "from qemu_kd.tenant import seal\n"
            "print(callable(tenant.seal), callable(tenant.measure), seal is tenant.seal,\n"
            "      tenant.seal is importlib.import_module('qemu_kd.tenant.seal').seal,\n"
            "      tenant.TenantSecret.__module__, tenant.check_report.__module__)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == ["False",
                                       "True True True True qemu_kd.tenant.seal qemu_kd.tenant.verify"]
