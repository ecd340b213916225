"""Run a script of scripts/ under the repository's virtualenv.

``use_venv(__file__)`` at the top of a script, before it imports anything
installed in the virtualenv: under any other Python it sets the virtualenv up
(``scripts/setup``) if it is missing, then execs the virtualenv's Python on
the same script with the same arguments.  Standard library only.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VENV = ROOT / ".venv"


def use_venv(script: str) -> None:
    """Return at once under the virtualenv's Python; otherwise re-run ``script`` under it."""
    if Path(sys.prefix).resolve() == VENV.resolve():
        return
    python = VENV / "bin" / "python"
    if not python.exists():
        subprocess.run([str(ROOT / "scripts" / "setup")], check=True)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(str(python), [str(python), str(Path(script).resolve()), *sys.argv[1:]])
