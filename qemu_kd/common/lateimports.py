"""Modules a process imports in the background once it serves.

The platform daemon and the host VMM process start side by side with the
caller on a machine with few CPUs; what their first requests need is imported
before they announce that they serve, and the modules only later requests use
(QEMU runtime, snapshots, bundle reading, hypercalls) follow in a background
thread started once the first request has been answered, while the caller is
busy with work of its own.  A request that needs them calls :meth:`wait`;
a module that fails to import makes every such request fail with one line.
"""

from __future__ import annotations

import importlib
import logging
import threading
from typing import Callable, Sequence

from qemu_kd.common.errors import KdError

log = logging.getLogger(__name__)


class LateImportError(KdError):
    """A module imported in the background could not be imported."""


class LateImports:
    """Import ``modules`` (names, in order) in one background thread, at most once.
    ``what`` names the process in the error ("the host VMM"); ``import_module`` is
    :func:`importlib.import_module` unless a test passes its own."""

    def __init__(self, modules: Sequence[str], what: str,
                 import_module: Callable[[str], object] = importlib.import_module):
        self.modules = tuple(modules)
        self.what = what
        self._import = import_module
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._failure: str | None = None

    def start(self) -> None:
        """Begin importing (once; later calls do nothing)."""
        with self._lock:
            if self._thread is not None:
                return
            self._thread = threading.Thread(target=self._run, daemon=True, name="late-imports")
            self._thread.start()

    def _run(self) -> None:
        for name in self.modules:
            try:
                self._import(name)
            except Exception as exc:   # noqa: BLE001 - any import failure becomes a one-line error
                detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                self._failure = f"{self.what} could not import {name}: {detail}"
                log.error("%s", self._failure)
                return

    def wait(self) -> None:
        """Return once every module is imported (starting the import if nobody has);
        raise :class:`LateImportError` if one failed."""
        self.start()
        assert self._thread is not None
        self._thread.join()
        if self._failure is not None:
            raise LateImportError(self._failure, "reinstall qemu-kd (scripts/setup) and start again")
