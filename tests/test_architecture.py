"""The import contracts in pyproject.toml hold, and break when a part imports across its boundary."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LINT = [sys.executable, "-c", "import sys; from importlinter.cli import lint_imports_command; "
        "sys.exit(lint_imports_command())"]


def lint(tree: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(tree))
    return subprocess.run([*LINT, "--no-cache"], cwd=tree, env=env, capture_output=True, text=True,
                          timeout=120)


def copy_tree(tmp_path: Path) -> Path:
    tree = tmp_path / "tree"
    for name in ("qemu_kd", "host_vmm", "guest_agent"):
        shutil.copytree(ROOT / name, tree / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tree / "pyproject.toml")
    return tree


def test_contracts_hold():
    result = lint(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


@pytest.mark.parametrize("module, line, contract", [
    ("host_vmm/vmm.py", "import qemu_kd.platform.physmem", "reaches the platform only through the host port"),
    ("host_vmm/vmm.py", "import qemu_kd.crypto.mee", "reaches the platform only through the host port"),
    ("host_vmm/service.py", "import guest_agent.secrets", "reaches the platform only through the host port"),
    ("qemu_kd/tenant/seal.py", "import qemu_kd.qemu.machine", "tenant imports neither"),
    ("qemu_kd/tenant/verify.py", "import qemu_kd.platform.identity", "tenant imports neither"),
    ("guest_agent/agent.py", "import qemu_kd.common.errors", "imports nothing from the host side"),
    ("qemu_kd/formats/layout.py", "import qemu_kd.cli.run", "only downwards"),
    ("qemu_kd/platform/daemon.py", "import qemu_kd.cli.main", "only downwards"),
    ("qemu_kd/qemu/launch.py", "import qemu_kd.platform.runtime", "Only the platform imports the platform"),
    ("qemu_kd/api.py", "import qemu_kd.cli.run", "only downwards"),
    ("qemu_kd/api.py", "import qemu_kd.platform.hardware", "Only the platform imports the platform"),
])
def test_a_forbidden_import_breaks_the_contracts(tmp_path, module, line, contract):
    tree = copy_tree(tmp_path)
    assert lint(tree).returncode == 0
    path = tree / module
    path.write_text(path.read_text() + f"\n{line}  # planted by the test\n")
    result = lint(tree)
    assert result.returncode != 0
    broken = [row for row in result.stdout.splitlines() if "BROKEN" in row]
    assert any(contract in row for row in broken), result.stdout
