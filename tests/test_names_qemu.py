"""Two domains kept on two platforms: distinct default names that the printed hints and every
DOMAIN command accept, a name already in use refused, ls --json's dominfo fields, destroy by
name (the names themselves, without QEMU: test_names.py)."""

from __future__ import annotations

import json
import os

import pytest

from leftovers import stop_registered_platforms
from qemu_kd.cli.outcome import HARNESS_EXIT
from test_cli import qemu_kd

pytestmark = pytest.mark.qemu


def test_kept_domains_on_two_platforms_have_distinct_names(guest_artifacts, tmp_path):
    env = {**os.environ, "QEMU_KD_RUNTIME": str(tmp_path / "rt")}
    kept = []
    try:
        first = qemu_kd("run", "--keep", "--json", "-q", "--cmd", "true", env=env, timeout=600)
        assert first.returncode == 0, first.stderr
        one = json.loads(first.stdout)
        kept.append(f"{one['kept']['platform_pid']}:{one['name']}")
        assert one["name"] == one["kept"]["name"] == f"kd{one['keyid']}"

        # Another platform, the same KeyID: its default name must not be the first one's.
        second = qemu_kd("run", "--keep", "-q", "--cmd", "true", env=env, timeout=600)
        assert second.returncode == 0, second.stderr
        hint = next(line for line in second.stdout.splitlines() if "qemu-kd console" in line)
        two = hint.split()[-1]
        kept.append(two)
        assert two != one["name"] and two.startswith("kd")
        assert f"qemu-kd exec {two} -- CMD..." in second.stdout

        # A third run may not take a name a live domain has (on another platform).
        dup = qemu_kd("run", "--json", "-q", "--name", two, env=env, timeout=600)
        assert dup.returncode == HARNESS_EXIT, dup.stderr
        error = json.loads(dup.stdout)["error"]
        assert f"the domain name '{two}' is already used by a live domain" in error["message"]

        listed = qemu_kd("ls", "--json", env=env)
        assert listed.returncode == 0, listed.stderr
        doms = {d["name"]: d for d in json.loads(listed.stdout)}
        assert set(doms) == {one["name"], two}
        assert doms[one["name"]]["platform"]["pid"] != doms[two]["platform"]["pid"]
        for d in doms.values():
            assert (d["state"], d["guest_state"], d["vcpus"]) == ("LAUNCHED", "running", 1)
            assert (d["memory"], d["memory_mib"]) == (256 << 20, 256)
            assert d["uptime"] > 0

        ran = qemu_kd("exec", two, "--", "echo", "hello", env=env, timeout=300)
        assert (ran.returncode, ran.stdout) == (0, "hello\n"), ran.stderr
        gone = qemu_kd("destroy", "--json", two, env=env)
        assert gone.returncode == 0 and json.loads(gone.stdout)["name"] == two, gone.stderr
        kept.remove(two)
        assert [d["name"] for d in json.loads(qemu_kd("ls", "--json", env=env).stdout)] \
            == [one["name"]]
        assert qemu_kd("destroy", kept[0], env=env).returncode == 0     # the PID:NAME selector
        kept.clear()
    finally:
        for name in kept:
            qemu_kd("destroy", name, env=env)
        stop_registered_platforms(tmp_path / "rt")
