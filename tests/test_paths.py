"""The state, cache and runtime directories: created private, checked, one-line errors."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from qemu_kd.common import paths
from qemu_kd.common.paths import DirectoryError, cache_dir, runtime_dir, state_dir

VARIABLES = ("QEMU_KD_STATE", "QEMU_KD_RUNTIME", "QEMU_KD_CACHE")
QEMU_KD = [str(Path(sys.executable).with_name("qemu-kd"))]
is_root = os.getuid() == 0


def mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


@pytest.fixture
def clean_env(monkeypatch):
    for name in VARIABLES + ("XDG_RUNTIME_DIR", "XDG_STATE_HOME", "XDG_CACHE_HOME"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_missing_directories_are_created_private(tmp_path, clean_env):
    clean_env.setenv("QEMU_KD_RUNTIME", str(tmp_path / "a" / "run"))
    clean_env.setenv("QEMU_KD_STATE", str(tmp_path / "b" / "state"))
    assert runtime_dir() == tmp_path / "a" / "run" and mode(runtime_dir()) == 0o700
    assert state_dir() == tmp_path / "b" / "state" and mode(state_dir()) == 0o700


def test_runtime_fallback_under_tmp_follows_the_xdg_runtime_rules(tmp_path, clean_env):
    clean_env.setattr(paths, "TMP_ROOT", tmp_path)
    mine = tmp_path / f"qemu-kd-{os.getuid()}"
    assert runtime_dir() == mine and mode(mine) == 0o700
    mine.chmod(0o755)          # e.g. made by someone else's umask or an old version: refused, not repaired
    with pytest.raises(DirectoryError, match=r"has mode 0755, not 0700 .*chmod 700"):
        runtime_dir()
    assert mode(mine) == 0o755
    mine.rmdir()
    (tmp_path / "elsewhere").mkdir(mode=0o700)
    mine.symlink_to(tmp_path / "elsewhere")    # a planted symbolic link
    with pytest.raises(DirectoryError, match="is a symbolic link.*XDG_RUNTIME_DIR or QEMU_KD_RUNTIME"):
        runtime_dir()
    mine.unlink()
    mine.write_text("")                        # a planted file
    with pytest.raises(DirectoryError, match="exists and is not a directory"):
        runtime_dir()


@pytest.mark.skipif(not is_root, reason="needs root to make a directory of another user")
def test_runtime_and_state_directories_of_another_user_are_refused(tmp_path, clean_env):
    clean_env.setattr(paths, "TMP_ROOT", tmp_path)
    theirs = tmp_path / f"qemu-kd-{os.getuid()}"
    theirs.mkdir(mode=0o700)
    os.chown(theirs, 65534, 65534)
    with pytest.raises(DirectoryError, match="belongs to uid 65534, not to you"):
        runtime_dir()
    clean_env.setenv("QEMU_KD_STATE", str(theirs))
    with pytest.raises(DirectoryError, match="QEMU_KD_STATE.*belongs to uid 65534"):
        state_dir()


def test_loose_default_state_directory_is_tightened(tmp_path, clean_env):
    clean_env.setenv("XDG_STATE_HOME", str(tmp_path))
    (tmp_path / "qemu-kd").mkdir(mode=0o755)
    (tmp_path / "qemu-kd").chmod(0o755)
    assert state_dir() == tmp_path / "qemu-kd"
    assert mode(tmp_path / "qemu-kd") == 0o700


def test_loose_state_directory_named_by_the_variable_is_refused_not_changed(tmp_path, clean_env):
    named = tmp_path / "mine"
    named.mkdir()
    named.chmod(0o755)
    clean_env.setenv("QEMU_KD_STATE", str(named))
    with pytest.raises(DirectoryError, match=r"QEMU_KD_STATE\) has mode 0755, not 0700"):
        state_dir()
    assert mode(named) == 0o755


@pytest.mark.parametrize("variable", VARIABLES)
@pytest.mark.parametrize("where", ["under-file", "proc"])
def test_unusable_directories_are_one_config_error_naming_the_variable(tmp_path, clean_env, variable, where):
    target = {"under-file": tmp_path / "file" / "qemu-kd", "proc": Path("/proc/qemu-kd-test")}[where]
    (tmp_path / "file").write_text("not a directory")
    clean_env.setenv(variable, str(target))
    get = {"QEMU_KD_STATE": state_dir, "QEMU_KD_RUNTIME": runtime_dir, "QEMU_KD_CACHE": cache_dir}[variable]
    with pytest.raises(DirectoryError, match=variable) as err:
        get()
    assert err.value.exit_code == 2 and "\n" not in str(err.value)


def test_proc_itself_is_refused_and_left_alone(clean_env):
    before = mode(Path("/proc"))
    for variable, get in (("QEMU_KD_STATE", state_dir), ("QEMU_KD_RUNTIME", runtime_dir),
                          ("QEMU_KD_CACHE", cache_dir)):
        clean_env.setenv(variable, "/proc")
        with pytest.raises(DirectoryError, match=variable):
            get()
    assert mode(Path("/proc")) == before


@pytest.mark.parametrize("variable", VARIABLES)
@pytest.mark.parametrize("where", ["under-file", "proc"])
@pytest.mark.parametrize("command", [["ls"], ["run", "--accel", "tcg", "-q"], ["clean"]])
def test_cli_reports_unusable_directories_in_one_line(tmp_path, variable, where, command):
    (tmp_path / "file").write_text("not a directory")
    target = {"under-file": tmp_path / "file" / "sub", "proc": Path("/proc/qemu-kd-test")}[where]
    env = {**os.environ, variable: str(target), "QEMU_KD_ACCEL": "tcg"}
    proc = subprocess.run(QEMU_KD + command, env=env, capture_output=True, text=True, timeout=120)
    assert "Traceback" not in proc.stderr
    must_fail = command[0] == "run" or variable == "QEMU_KD_RUNTIME"   # what each command uses
    if proc.returncode == 0 and not must_fail:
        return
    assert proc.returncode == (125 if command[0] == "run" else 2), proc.stderr   # run: qemu-kd's own code
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("qemu-kd: error:") and variable in lines[0], lines
