"""Where qemu-kd keeps its cache, persistent state and runtime files.

Overridable through environment variables so tests and CI can isolate
themselves: ``QEMU_KD_CACHE``, ``QEMU_KD_STATE``, ``QEMU_KD_RUNTIME``.

Each function creates its directory if needed and checks it, so that a bad
setting is one :class:`DirectoryError` naming the variable behind it, never a
traceback later on:

* the runtime directory (sockets, the platform registry, private per-process
  directories) follows the rules of ``XDG_RUNTIME_DIR``: it is a real
  directory, not a symbolic link, owned by the user, mode 0700.  Anything else
  is refused, never repaired: under ``/tmp`` another user may have planted it;
* the state directory (root CA, platform keys, logs) is mode 0700: the default
  one (``.../qemu-kd``) of the user's with a looser mode is tightened; one named
  by ``QEMU_KD_STATE`` with a looser mode, or one of another user's, is refused;
* the cache directory (public packages and the built guest) must be writable.
"""

from __future__ import annotations

import os
import stat
import tempfile
from pathlib import Path

from qemu_kd.common.errors import ConfigError

PRIVATE_MODE = 0o700
TMP_ROOT = Path("/tmp")
HOME = "the default under HOME"
FALLBACK = "the default, as XDG_RUNTIME_DIR is not set"


class DirectoryError(ConfigError):
    """A state, cache or runtime directory cannot be used."""


def _choose(env: str, xdg: str, default: str) -> tuple[Path, str]:
    """The directory and the setting that chose it (for error messages)."""
    if os.environ.get(env):
        return Path(os.environ[env]), env
    root = os.environ.get(xdg)
    if root:
        return Path(root) / "qemu-kd", xdg
    return Path.home() / default / "qemu-kd", HOME


def _fix_hint(source: str) -> str:
    if source == HOME:
        return "check the permissions under your home directory, or set the QEMU_KD_* variable"
    return f"set {source} to a directory of yours that you can write"


def _make(path: Path, what: str, source: str) -> os.stat_result:
    """Create ``path`` (mode 0700) if missing; its lstat."""
    try:
        path.mkdir(mode=PRIVATE_MODE, parents=True, exist_ok=True)
        return os.lstat(path)
    except FileExistsError:
        raise DirectoryError(f"the {what} {path} (from {source}) exists and is not a directory",
                             _fix_hint(source)) from None
    except OSError as exc:
        raise DirectoryError(f"cannot create the {what} {path} (from {source}): "
                             f"{exc.strerror or exc}", _fix_hint(source)) from None


def _require_writable(path: Path, what: str, source: str) -> None:
    """Create and remove a file in ``path`` (permission bits alone do not tell, e.g. for root)."""
    try:
        fd, probe = tempfile.mkstemp(prefix=".probe-", dir=path)
    except OSError as exc:
        raise DirectoryError(f"the {what} {path} (from {source}) is not writable: "
                             f"{exc.strerror or exc}", _fix_hint(source)) from None
    os.close(fd)
    os.unlink(probe)


def cache_dir() -> Path:
    """Per-user cache: downloaded packages, the built guest kernel and image."""
    path, source = _choose("QEMU_KD_CACHE", "XDG_CACHE_HOME", ".cache")
    _make(path, "cache directory", source)
    _require_writable(path, "cache directory", source)
    return path


def state_dir() -> Path:
    """Per-installation state: the emulated manufacturer root CA, platform keys (mode 0700)."""
    what = "state directory"
    path, source = _choose("QEMU_KD_STATE", "XDG_STATE_HOME", ".local/state")
    _make(path, what, source)
    try:
        st = os.stat(path)
    except OSError as exc:
        raise DirectoryError(f"cannot use the {what} {path} (from {source}): {exc.strerror}",
                             _fix_hint(source)) from None
    if st.st_uid != os.getuid():
        raise DirectoryError(f"the {what} {path} (from {source}) belongs to uid {st.st_uid}, "
                             "not to you", _fix_hint(source))
    _require_writable(path, what, source)
    mode = stat.S_IMODE(st.st_mode)
    if mode != PRIVATE_MODE and source == "QEMU_KD_STATE":
        # A directory the user named may be anything (for root, even /etc): never chmod it.
        raise DirectoryError(f"the {what} {path} (from {source}) has mode {mode:04o}, not 0700",
                             f"chmod 700 {path}, or {_fix_hint(source)}")
    if mode != PRIVATE_MODE:   # our own qemu-kd directory, made by an older version
        try:
            os.chmod(path, PRIVATE_MODE)
        except OSError as exc:
            raise DirectoryError(f"cannot make the {what} {path} (from {source}) private (mode 0700): "
                                 f"{exc.strerror}", _fix_hint(source)) from None
    return path


def runtime_dir() -> Path:
    """Sockets, the platform registry and per-process directories (private, mode 0700)."""
    if os.environ.get("QEMU_KD_RUNTIME"):
        path, source = Path(os.environ["QEMU_KD_RUNTIME"]), "QEMU_KD_RUNTIME"
    elif os.environ.get("XDG_RUNTIME_DIR"):
        path, source = Path(os.environ["XDG_RUNTIME_DIR"]) / "qemu-kd", "XDG_RUNTIME_DIR"
    else:
        path, source = TMP_ROOT / f"qemu-kd-{os.getuid()}", FALLBACK
    what = "runtime directory"
    hint = ("remove it, or set XDG_RUNTIME_DIR or QEMU_KD_RUNTIME to a private directory"
            if source == FALLBACK else _fix_hint(source))
    st = _make(path, what, source)
    if stat.S_ISLNK(st.st_mode):
        raise DirectoryError(f"the {what} {path} (from {source}) is a symbolic link", hint)
    if not stat.S_ISDIR(st.st_mode):
        raise DirectoryError(f"the {what} {path} (from {source}) is not a directory", hint)
    if st.st_uid != os.getuid():
        raise DirectoryError(f"the {what} {path} (from {source}) belongs to uid {st.st_uid}, "
                             "not to you", hint)
    mode = stat.S_IMODE(st.st_mode)
    if mode != PRIVATE_MODE:
        raise DirectoryError(f"the {what} {path} (from {source}) has mode {mode:04o}, not 0700",
                             f"chmod 700 {path} if only you have used it; otherwise {hint}")
    _require_writable(path, what, source)
    return path
