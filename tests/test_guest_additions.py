"""Users' own files in the guest image: --add/--overlay, the measured initrd, unpack failures."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from qemu_kd.channel.console import check_initramfs_unpacked
from qemu_kd.common.errors import ConfigError, GuestImageError
from qemu_kd.guest.additions import (GuestAdditions, GuestFile, check_composed, compose_initrd,
                                     read_cpio_archives)
from qemu_kd.guest.initramfs import compress_lz4, write_cpio

pytestmark = pytest.mark.skipif(shutil.which("lz4") is None or shutil.which("cpio") is None,
                                reason="needs lz4 and cpio")


def qemu_kd(*args, timeout=900):
    return subprocess.run([sys.executable, "-m", "qemu_kd.cli.main", *args], capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture
def user_files(tmp_path):
    script = tmp_path / "hello.py"
    script.write_text("#!/usr/bin/python3\nimport sys\nprint('python says', sys.argv[1:])\nsys.exit(4)\n")
    script.chmod(0o755)
    overlay = tmp_path / "overlay"
    (overlay / "etc").mkdir(parents=True)
    (overlay / "etc/greeting").write_text("from the overlay\n")
    os.symlink("greeting", overlay / "etc/greeting-link")
    return script, overlay


def fake_base(tmp_path):
    """A small lz4 initramfs standing in for the default one."""
    root = tmp_path / "base"
    (root / "etc").mkdir(parents=True)
    (root / "init").write_text("#!/bin/sh\n")
    raw = tmp_path / "base.cpio"
    write_cpio(root, raw)
    compress_lz4(raw, tmp_path / "base.cpio.lz4")
    return tmp_path / "base.cpio.lz4"


def test_add_parses_and_names_guest_paths(user_files):
    script, overlay = user_files
    assert GuestFile.parse(f"{script}:/usr/local/bin/") == GuestFile(script, "/usr/local/bin/hello.py")
    with pytest.raises(ConfigError):
        GuestFile.parse("no-colon")
    adds = GuestAdditions.from_options([f"{script}:/opt/../etc/x"], None)
    with pytest.raises(ConfigError, match="absolute"):
        adds.entries()
    adds = GuestAdditions.from_options([f"{script}:/usr/local/bin/hello"], [str(overlay)])
    entries = adds.entries()
    assert list(entries) == ["etc", "etc/greeting", "etc/greeting-link", "usr", "usr/local",
                             "usr/local/bin", "usr/local/bin/hello"]
    assert entries["usr/local/bin/hello"].mode == 0o755
    assert entries["etc/greeting"].mode == 0o644
    assert entries["etc/greeting-link"].kind == "symlink"


def test_composed_initrd_is_reproducible_and_checked(tmp_path, user_files):
    script, overlay = user_files
    base = fake_base(tmp_path)
    adds = GuestAdditions.from_options([f"{script}:/usr/local/bin/hello"], [str(overlay)])
    outs = []
    for name in ("a", "b"):
        os.utime(script, (1000 + len(name) * 7, 1000 + len(name) * 7))  # mtimes do not matter
        (tmp_path / name).mkdir()
        out = tmp_path / name / "initrd"
        compose_initrd(base, adds.entries(), out)
        outs.append(out.read_bytes())
    assert outs[0] == outs[1]
    assert outs[0].startswith(base.read_bytes())
    check_composed(tmp_path / "a" / "initrd", adds.entries())
    stream = subprocess.run(["lz4", "-d", "-c", str(tmp_path / "a" / "initrd")], check=True,
                            capture_output=True).stdout
    base_archive, added = read_cpio_archives(stream)
    assert {m.name for m in base_archive} == {"etc", "init"}
    members = {m.name: m for m in added}
    assert members["usr/local/bin/hello"].data == script.read_bytes()
    assert members["usr/local/bin/hello"].mode & 0o777 == 0o755
    # A changed file changes the key and the image
    before = adds.digest()
    script.write_text("#!/usr/bin/python3\nprint('changed')\n")
    assert adds.digest() != before
    compose_initrd(base, adds.entries(), tmp_path / "c")
    assert (tmp_path / "c").read_bytes() != outs[0]


def test_an_archive_appended_uncompressed_is_refused(tmp_path, user_files):
    """What a user who appends their own cpio gets: the check finds it cannot unpack."""
    script, _overlay = user_files
    base = fake_base(tmp_path)
    tree = tmp_path / "tree"
    tree.mkdir()
    shutil.copy(script, tree / "hello")
    write_cpio(tree, tmp_path / "raw.cpio")
    bad = tmp_path / "bad"
    bad.write_bytes(base.read_bytes() + (tmp_path / "raw.cpio").read_bytes())
    adds = GuestAdditions.from_options([f"{script}:/hello"], None)
    with pytest.raises(GuestImageError):
        check_composed(bad, adds.entries())
    with pytest.raises(GuestImageError, match="no cpio header|trailer"):
        read_cpio_archives(b"070701" + b"0" * 200)


def test_console_showing_an_unpack_failure_is_an_error(tmp_path):
    log = tmp_path / "console.log"
    log.write_bytes(b"[    0.1] booting\n")
    check_initramfs_unpacked(log)
    log.write_bytes(b"[    1.2] Initramfs unpacking failed: Decoding failed\r\n[ 2.0] more\n")
    with pytest.raises(GuestImageError, match="could not unpack the initrd: Initramfs unpacking failed"):
        check_initramfs_unpacked(log)


@pytest.mark.qemu
def test_user_programs_run_in_a_protected_guest_and_measure_alike(tmp_path, user_files, guest_artifacts):
    if shutil.which("gcc") is None:
        pytest.skip("needs gcc to build a static test binary")
    script, overlay = user_files
    source = tmp_path / "hello.c"
    source.write_text('#include <stdio.h>\nint main(int c, char **v)'
                      '{ printf("static %s\\n", v[1]); return 3; }\n')
    binary = tmp_path / "hello-static"
    subprocess.run(["gcc", "-static", "-O2", "-o", str(binary), str(source)], check=True)
    adds = ["--add", f"{binary}:/usr/local/bin/hello-static", "--add", f"{script}:/opt/app/",
            "--overlay", str(overlay)]
    out = tmp_path / "image"
    built = qemu_kd("guest", "build", *adds, "--out", str(out), "--json")
    assert built.returncode == 0, built.stderr
    assert json.loads(built.stdout)["initrd"] == str(out / "initramfs.cpio.lz4")
    by_options = qemu_kd("tenant", "measure", *adds)
    by_files = qemu_kd("tenant", "measure", "--kernel", str(out / "bzImage"),
                       "--initrd", str(out / "initramfs.cpio.lz4"))
    default = qemu_kd("tenant", "measure")
    assert by_options.returncode == by_files.returncode == 0, by_options.stderr + by_files.stderr
    assert by_options.stdout == by_files.stdout != default.stdout
    cmd = ("/usr/local/bin/hello-static one; echo rc=$?; /opt/app/hello.py two; echo rc=$?; "
           "cat /etc/greeting-link")
    run = qemu_kd("run", "-q", "--json", "--accel", "tcg", *adds, "--cmd", cmd)
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout)
    assert result["exec"]["stdout"] == ("static one\nrc=3\npython says ['two']\nrc=4\n"
                                        "from the overlay\n")
    assert result["measurement"] == by_options.stdout.strip()


@pytest.mark.qemu
def test_an_initrd_the_kernel_cannot_unpack_fails_the_run(tmp_path, user_files, guest_artifacts):
    script, _overlay = user_files
    tree = tmp_path / "tree"
    tree.mkdir()
    shutil.copy(script, tree / "hello.py")
    write_cpio(tree, tmp_path / "raw.cpio")
    bad = tmp_path / "appended.img"
    bad.write_bytes(guest_artifacts.initrd.read_bytes() + (tmp_path / "raw.cpio").read_bytes())
    run = qemu_kd("run", "-q", "--accel", "tcg", "--kernel", str(guest_artifacts.kernel),
                  "--initrd", str(bad), "--cmd", "true")
    assert run.returncode != 0
    assert "could not unpack the initrd: Initramfs unpacking failed" in run.stderr
