"""Every name the scripts in ``scripts/`` import from the project exists.

The benchmarks import most of what they use inside functions, so a name that moves or goes away
would only show up when a benchmark reaches that line (for instance its clean-up after the table
is printed).  This reads each script's import statements and resolves every one of them.
"""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"
PROJECT_PACKAGES = ("qemu_kd", "host_vmm", "guest_agent")


def _python_scripts() -> list[Path]:
    found = []
    for path in sorted(SCRIPTS.iterdir()):
        if path.is_file() and (path.suffix == ".py" or path.read_bytes()[:40].startswith(b"#!")
                               and b"python" in path.read_bytes().split(b"\n", 1)[0]):
            found.append(path)
    return found


def _project_imports(path: Path) -> list[tuple[str, str | None, int]]:
    """(module, name or None, line) for each project import in the script."""
    tree = ast.parse(path.read_text(), filename=str(path))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 \
                and node.module.split(".")[0] in PROJECT_PACKAGES:
            out.extend((node.module, alias.name, node.lineno) for alias in node.names)
        elif isinstance(node, ast.Import):
            out.extend((alias.name, None, node.lineno) for alias in node.names
                       if alias.name.split(".")[0] in PROJECT_PACKAGES)
    return out


def test_the_scripts_are_found():
    names = {p.name for p in _python_scripts()}
    assert {"bench-launch", "bench-boot", "bench-run", "bench-restore"} <= names


@pytest.mark.parametrize("script", _python_scripts(), ids=lambda p: p.name)
def test_every_project_name_a_script_imports_exists(script: Path):
    missing = []
    for module, name, line in _project_imports(script):
        mod = importlib.import_module(module)
        if name is not None and not hasattr(mod, name):
            try:
                importlib.import_module(f"{module}.{name}")
            except ImportError:
                missing.append(f"{script.name}:{line}: {module}.{name}")
    assert not missing, "scripts import names that do not exist: " + ", ".join(missing)
