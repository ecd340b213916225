"""Tests for the reproducible guest kernel and initramfs build.

The unit tests use small synthetic trees and ELF files and run in seconds.
The tests marked ``qemu`` build (or reuse) the real image from Debian
packages and boot it under TCG.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import subprocess
import tempfile
from pathlib import Path

import socket
import time

import pytest

from qemu_kd.qemu.guestport import GuestPortServer
from qemu_kd.qemu.launch import UNPROTECTED_PORT
from qemu_kd.guest import cache, initramfs, packages, recipe, rootfs
from qemu_kd.common.errors import GuestImageError


# --- helpers -------------------------------------------------------------

def make_elf(needed: list[str]) -> bytes:
    """A minimal 64-bit little-endian ELF with one PT_LOAD and a PT_DYNAMIC
    whose DT_NEEDED entries name ``needed`` (empty list: no PT_DYNAMIC)."""
    base = 0x400000
    ehsize, phentsize = 64, 56
    phnum = 2 if needed else 1
    strtab = b"\0"
    offsets = []
    for name in needed:
        offsets.append(len(strtab))
        strtab += name.encode() + b"\0"
    strtab_off = ehsize + phnum * phentsize
    dyn_off = (strtab_off + len(strtab) + 7) & ~7
    dynamic = b"".join(struct.pack("<qQ", 1, off) for off in offsets)
    if needed:
        dynamic += struct.pack("<qQ", 5, base + strtab_off)  # DT_STRTAB
        dynamic += struct.pack("<qQ", 10, len(strtab))  # DT_STRSZ
        dynamic += struct.pack("<qQ", 0, 0)  # DT_NULL
    total = dyn_off + len(dynamic)
    header = b"\x7fELF" + bytes([2, 1, 1]) + bytes(9)
    header += struct.pack("<HHIQQQIHHHHHH", 3, 62, 1, base, ehsize, 0, 0, ehsize,
                          phentsize, phnum, 64, 0, 0)
    phdrs = struct.pack("<IIQQQQQQ", 1, 5, 0, base, base, total, total, 0x1000)
    if needed:
        phdrs += struct.pack("<IIQQQQQQ", 2, 6, dyn_off, base + dyn_off, base + dyn_off,
                             len(dynamic), len(dynamic), 8)
    image = header + phdrs + strtab
    image += bytes(dyn_off - len(image)) + dynamic
    return image


def read_newc(data: bytes) -> list[dict]:
    """Parse a newc cpio archive into its headers and names."""
    entries = []
    pos = 0
    while True:
        assert data[pos:pos + 6] == b"070701", f"bad magic at {pos}"
        fields = [int(data[pos + 6 + 8 * i:pos + 14 + 8 * i], 16) for i in range(13)]
        ino, mode, uid, gid, nlink, mtime, size, _, _, _, _, namesize, _ = fields
        name_start = pos + 110
        name = data[name_start:name_start + namesize - 1].decode()
        pos = (name_start + namesize + 3) & ~3
        body = data[pos:pos + size]
        pos = (pos + size + 3) & ~3
        if name == "TRAILER!!!":
            return entries
        entries.append({"name": name, "mode": mode, "uid": uid, "gid": gid,
                        "mtime": mtime, "size": size, "body": body, "ino": ino})


def fake_inputs(**changes) -> cache.BuildInputs:
    values = dict(
        packages=[packages.PackageRef("busybox-static", "1:1.35.0-4"),
                  packages.PackageRef("libc6", "2.36-9")],
        kernel_package=packages.PackageRef("linux-image-6.1.0-9-cloud-amd64", "6.1.27-1"),
        agent_files={"__init__.py": b"", "__main__.py": b"print('agent')\n"},
    )
    values.update(changes)
    return cache.BuildInputs(**values)


def fake_manifest(kernel: Path, initrd: Path) -> cache.GuestManifest:
    inputs = fake_inputs()
    return cache.GuestManifest(
        recipe_version=recipe.RECIPE_VERSION, cache_key=inputs.cache_key(),
        kernel_package=inputs.kernel_package, kernel_release="6.1.0-9-cloud-amd64",
        packages=list(reversed(inputs.packages)), bzimage=cache.FileDigest.of(kernel),
        initramfs=cache.FileDigest.of(initrd), agent_sha256=inputs.agent_digest())


# --- pruning -------------------------------------------------------------

@pytest.mark.parametrize("path", [
    "usr/lib/python3.11/test/test_os.py",
    "usr/lib/python3.11/idlelib/run.py",
    "usr/lib/python3.11/tkinter/__init__.py",
    "usr/lib/python3.11/ensurepip/__init__.py",
    "usr/lib/python3.11/lib2to3/main.py",
    "usr/lib/python3.11/pydoc_data/topics.py",
    "usr/lib/python3.11/distutils/core.py",
    "usr/lib/python3.11/unittest/test/test_case.py",
    "usr/lib/python3.11/ctypes/test/test_funcs.py",
    "usr/lib/python3/dist-packages/somepkg/tests/test_x.py",
    "usr/lib/python3.11/lib-dynload/_testcapi.cpython-311-x86_64-linux-gnu.so",
    "usr/lib/python3.11/lib-dynload/_sqlite3.cpython-311-x86_64-linux-gnu.so",
    "usr/lib/python3.11/lib-dynload/readline.cpython-311-x86_64-linux-gnu.so",
    "usr/lib/python3.11/turtle.py",
    "usr/lib/python3/dist-packages/cryptography/hazmat/bindings/_rust/x509.pyi",
    "usr/share/doc/libc6/copyright",
    "usr/share",
    "usr/lib/x86_64-linux-gnu/gconv/UTF-16.so",
    "usr/lib/x86_64-linux-gnu/engines-3/padlock.so",
])
def test_pruned_paths(path):
    assert recipe.is_pruned(path)


@pytest.mark.parametrize("path", [
    "usr/lib/python3.11/email/message.py",
    "usr/lib/python3.11/email/mime/text.py",
    "usr/lib/python3.11/os.py",
    "usr/lib/python3.11/encodings/utf_8.py",
    "usr/lib/python3.11/unittest/case.py",
    "usr/lib/python3.11/testing_helper.py",
    "usr/lib/python3.11/lib-dynload/_ssl.cpython-311-x86_64-linux-gnu.so",
    "usr/lib/python3.11/lib-dynload/_ctypes.cpython-311-x86_64-linux-gnu.so",
    "usr/lib/python3/dist-packages/cryptography/hazmat/primitives/ciphers/aead.py",
    "usr/lib/python3/dist-packages/cryptography/hazmat/bindings/_rust.abi3.so",
    "usr/lib/python3/dist-packages/_cffi_backend.cpython-311-x86_64-linux-gnu.so",
    "usr/lib/x86_64-linux-gnu/ossl-modules/legacy.so",
    "usr/lib/x86_64-linux-gnu/libcrypto.so.3",
    "usr/bin/python3.11",
    "usr/bin/busybox",
    "etc/python3.11/sitecustomize.py",
])
def test_kept_paths(path):
    assert not recipe.is_pruned(path)


def test_dlopened_legacy_provider_is_never_pruned():
    for rel in recipe.DLOPENED_FILES:
        assert not recipe.is_pruned(rel)
    assert any(rel.endswith("ossl-modules/legacy.so") for rel in recipe.DLOPENED_FILES)


@pytest.mark.parametrize("src,dest", [
    ("bin/busybox", "usr/bin/busybox"),
    ("sbin/init", "usr/sbin/init"),
    ("lib/x86_64-linux-gnu/libc.so.6", "usr/lib/x86_64-linux-gnu/libc.so.6"),
    ("lib64/ld-linux-x86-64.so.2", "usr/lib64/ld-linux-x86-64.so.2"),
    ("lib", "usr/lib"),
    ("usr/bin/python3.11", "usr/bin/python3.11"),
    ("etc/passwd", "etc/passwd"),
    ("library/x", "library/x"),
])
def test_usrmerged(src, dest):
    assert rootfs.usrmerged(src) == dest


def test_install_tree_merges_usr_prunes_and_keeps_symlinks(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "lib/x86_64-linux-gnu").mkdir(parents=True)
    (pkg / "lib/x86_64-linux-gnu/libz.so.1.2.13").write_bytes(b"lib")
    os.symlink("libz.so.1.2.13", pkg / "lib/x86_64-linux-gnu/libz.so.1")
    (pkg / "usr/share/doc/zlib1g").mkdir(parents=True)
    (pkg / "usr/share/doc/zlib1g/copyright").write_text("text")
    (pkg / "bin").mkdir()
    (pkg / "bin/tool").write_bytes(b"#!/bin/sh\n")
    os.chmod(pkg / "bin/tool", 0o755)
    staging = tmp_path / "staging"
    staging.mkdir()
    installed = rootfs.install_tree(pkg, staging)
    assert (staging / "usr/lib/x86_64-linux-gnu/libz.so.1.2.13").read_bytes() == b"lib"
    assert os.readlink(staging / "usr/lib/x86_64-linux-gnu/libz.so.1") == "libz.so.1.2.13"
    assert (staging / "usr/bin/tool").stat().st_mode & 0o777 == 0o755
    assert not (staging / "usr/share").exists()
    assert not (staging / "lib").exists()
    assert "usr/bin/tool" in installed
    assert not any(p.startswith("usr/share") for p in installed)


def test_prune_tree_removes_pruned_and_empty_dirs(tmp_path):
    stub = tmp_path / "usr/lib/python3/dist-packages/cryptography/hazmat/bindings/_rust"
    stub.mkdir(parents=True)
    (stub / "x509.pyi").write_text("")
    (tmp_path / "usr/lib/python3.11/test").mkdir(parents=True)
    (tmp_path / "usr/lib/python3.11/test/t.pyc").write_bytes(b"")
    (tmp_path / "usr/lib/python3.11/os.pyc").write_bytes(b"")
    (tmp_path / "proc").mkdir()
    rootfs.prune_tree(tmp_path)
    assert not stub.exists()
    assert not (tmp_path / "usr/lib/python3.11/test").exists()
    assert (tmp_path / "usr/lib/python3.11/os.pyc").exists()
    assert (tmp_path / "proc").is_dir()  # mount points stay, though empty


# --- ELF -----------------------------------------------------------------

def test_elf_needed_reads_dt_needed_in_order():
    names = ["libssl.so.3", "libcrypto.so.3", "libc.so.6"]
    assert rootfs.elf_needed(make_elf(names)) == names


def test_elf_needed_static_binary_has_none():
    assert rootfs.elf_needed(make_elf([])) == []


def test_elf_needed_rejects_non_elf():
    with pytest.raises(ValueError):
        rootfs.elf_needed(b"#!/bin/sh\n" + bytes(64))


def test_elf_needed_matches_readelf_on_a_real_binary():
    readelf = shutil.which("readelf")
    if readelf is None:
        pytest.skip("readelf (binutils) is not installed")
    binary = Path(os.path.realpath(shutil.which("ls") or "/bin/ls"))
    out = subprocess.run([readelf, "-d", str(binary)], capture_output=True, text=True).stdout
    expected = [line.split("[", 1)[1].rstrip("]") for line in out.splitlines()
                if "(NEEDED)" in line]
    assert expected, "the test binary should be dynamically linked"
    assert rootfs.elf_needed(binary.read_bytes()) == expected


def _lib_tree(tmp_path: Path) -> Path:
    libdir = tmp_path / "usr/lib/x86_64-linux-gnu"
    (libdir / "ossl-modules").mkdir(parents=True)
    (tmp_path / "usr/bin").mkdir(parents=True)
    (tmp_path / "usr/bin/prog").write_bytes(make_elf(["libfoo.so.1", "libc.so.6"]))
    (libdir / "libfoo.so.1.2").write_bytes(make_elf(["libdep.so.0"]))
    os.symlink("libfoo.so.1.2", libdir / "libfoo.so.1")
    (libdir / "libdep.so.0").write_bytes(make_elf([]))
    (libdir / "libc.so.6").write_bytes(make_elf([]))
    (libdir / "ld-linux-x86-64.so.2").write_bytes(make_elf([]))
    (libdir / "libunused.so.1").write_bytes(make_elf([]))
    (libdir / "libcrypto.so.3").write_bytes(make_elf(["libc.so.6"]))
    (libdir / "ossl-modules/legacy.so").write_bytes(make_elf(["libcrypto.so.3"]))
    return libdir


def test_prune_unused_libraries_keeps_closure(tmp_path):
    libdir = _lib_tree(tmp_path)
    removed = rootfs.prune_unused_libraries(tmp_path)
    assert removed == ["usr/lib/x86_64-linux-gnu/libunused.so.1"]
    for name in ("libfoo.so.1", "libfoo.so.1.2", "libdep.so.0", "libc.so.6",
                 "ld-linux-x86-64.so.2", "libcrypto.so.3"):
        assert (libdir / name).exists(), name


def test_missing_sonames_names_the_needers(tmp_path):
    _lib_tree(tmp_path)
    (tmp_path / "usr/bin/other").write_bytes(make_elf(["libffi.so.8", "libfoo.so.1"]))
    assert rootfs.missing_sonames(tmp_path) == {"libffi.so.8": ["usr/bin/other"]}


def test_packages_for_sonames():
    assert rootfs.packages_for_sonames(["libssl.so.3", "libcrypto.so.3", "libc.so.6"]) == {
        "libssl3", "libc6"}
    with pytest.raises(GuestImageError, match="libnotthere.so.9"):
        rootfs.packages_for_sonames(["libc.so.6", "libnotthere.so.9"])


# --- reproducible archive --------------------------------------------------

def _small_tree(root: Path, order: list[str], mtime: int) -> None:
    files = {"init": b"#!/bin/sh\n", "usr/bin/a": b"a" * 700, "usr/lib/b": b"b",
             "usr/lib/z/c": b"c", "etc/passwd": b"root:x:0:0::/root:/bin/sh\n"}
    for name in order:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(files[name])
        os.chmod(path, 0o755 if name == "init" else 0o644)
        os.utime(path, (mtime, mtime))
    os.symlink("usr/bin", root / "bin")
    (root / "tmp").mkdir()


def test_cpio_is_byte_identical_and_normalized(tmp_path):
    if shutil.which("cpio") is None:
        pytest.skip("cpio is not installed")
    names = ["init", "usr/bin/a", "usr/lib/b", "usr/lib/z/c", "etc/passwd"]
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir()
    two.mkdir()
    _small_tree(one, names, 1_000_000)
    _small_tree(two, list(reversed(names)), 2_000_000)
    archives = []
    for root in (one, two):
        initramfs.normalize_tree(root)
        out = tmp_path / f"{root.name}.cpio"
        initramfs.write_cpio(root, out)
        archives.append(out.read_bytes())
    assert archives[0] == archives[1]
    entries = read_newc(archives[0])
    names_in = [e["name"] for e in entries]
    assert names_in == sorted(names_in, key=lambda p: p.split("/"))
    assert names_in.index("usr") < names_in.index("usr/lib") < names_in.index("usr/lib/z/c")
    assert all(e["uid"] == 0 and e["gid"] == 0 for e in entries)
    assert {e["mtime"] for e in entries} == {recipe.SOURCE_DATE_EPOCH}
    by_name = {e["name"]: e for e in entries}
    assert by_name["init"]["mode"] & 0o777 == 0o755
    assert by_name["tmp"]["mode"] & 0o7777 == 0o1777
    assert by_name["bin"]["body"] == b"usr/bin"
    assert by_name["usr/bin/a"]["body"] == b"a" * 700


def test_lz4_output_is_legacy_format(tmp_path):
    if shutil.which("lz4") is None:
        pytest.skip("lz4 is not installed")
    src = tmp_path / "x.cpio"
    src.write_bytes(bytes(range(256)) * 64)
    initramfs.compress_lz4(src, tmp_path / "x.lz4")
    data = (tmp_path / "x.lz4").read_bytes()
    assert struct.unpack_from("<I", data)[0] == 0x184C2102  # legacy frame magic
    out = subprocess.run(["lz4", "-dc", str(tmp_path / "x.lz4")], capture_output=True).stdout
    assert out == src.read_bytes()


# --- cache key, manifest, apt parsing -------------------------------------

def test_cache_key_is_stable_and_depends_on_every_input():
    base = fake_inputs()
    assert base.cache_key() == fake_inputs().cache_key()
    reordered = fake_inputs(packages=list(reversed(base.packages)),
                            agent_files=dict(reversed(list(base.agent_files.items()))))
    assert reordered.cache_key() == base.cache_key()
    variants = [
        fake_inputs(packages=[packages.PackageRef("busybox-static", "1:1.35.0-5"),
                              packages.PackageRef("libc6", "2.36-9")]),
        fake_inputs(packages=base.packages + [packages.PackageRef("libffi8", "3.4.4-1")]),
        fake_inputs(kernel_package=packages.PackageRef("linux-image-6.1.0-9-cloud-amd64", "6.1.27-2")),
        fake_inputs(agent_files={**base.agent_files, "__main__.py": b"print('v2')\n"}),
        fake_inputs(agent_files={**base.agent_files, "extra.py": b""}),
        fake_inputs(init_script=recipe.INIT_SCRIPT + "# changed\n"),
        fake_inputs(recipe_version=recipe.RECIPE_VERSION + 1),
    ]
    keys = {v.cache_key() for v in variants}
    assert base.cache_key() not in keys
    assert len(keys) == len(variants)


def test_manifest_round_trip_and_contents(tmp_path):
    kernel, initrd = tmp_path / "bzImage", tmp_path / "initramfs.cpio.lz4"
    kernel.write_bytes(b"k" * 1000)
    initrd.write_bytes(b"i" * 300)
    manifest = fake_manifest(kernel, initrd)
    raw = manifest.pack()
    assert cache.GuestManifest.unpack(raw) == cache.GuestManifest.unpack(manifest.pack())
    data = json.loads(raw)
    assert data["kernel_package"] == {"name": "linux-image-6.1.0-9-cloud-amd64",
                                      "version": "6.1.27-1", "architecture": "amd64"}
    assert data["kernel_release"] == "6.1.0-9-cloud-amd64"
    assert data["bzimage"] == {"sha256": hashlib.sha256(b"k" * 1000).hexdigest(), "size": 1000}
    assert data["initramfs"] == {"sha256": hashlib.sha256(b"i" * 300).hexdigest(), "size": 300}
    assert [p["name"] for p in data["packages"]] == ["busybox-static", "libc6"]
    assert data["recipe_version"] == recipe.RECIPE_VERSION
    assert raw == manifest.pack()  # deterministic text


def test_manifest_unpack_rejects_garbage():
    with pytest.raises(GuestImageError, match="manifest"):
        cache.GuestManifest.unpack(b"{not json")
    with pytest.raises(GuestImageError, match="format"):
        cache.GuestManifest.unpack(b'{"format": 99}')


APT_SHOW = """\
Package: linux-image-cloud-amd64
Source: linux-signed-amd64 (6.1.192+2)
Version: 6.1.192-2
Architecture: amd64
Depends: linux-image-6.1.0-56-cloud-amd64 (= 6.1.192-2)
Description: Linux for x86-64 cloud (meta-package)
 This package depends on the latest Linux kernel
 and modules for use on cloud platforms.

Package: busybox-static
Version: 1:1.35.0-4+deb12u1+b1
Architecture: amd64

"""


def test_parse_apt_records_and_kernel_dependency():
    records = packages.parse_apt_records(APT_SHOW)
    assert records["busybox-static"]["Version"] == "1:1.35.0-4+deb12u1+b1"
    meta = records["linux-image-cloud-amd64"]
    assert "modules for use" in meta["Description"]
    assert packages.kernel_package_from_depends(meta["Depends"]) == "linux-image-6.1.0-56-cloud-amd64"
    assert packages.kernel_package_from_depends(
        "linux-image-6.1.0-9-cloud-amd64-unsigned | linux-image-6.1.0-9-cloud-amd64 (= 1)"
    ) == "linux-image-6.1.0-9-cloud-amd64"
    with pytest.raises(GuestImageError, match="cloud kernel"):
        packages.kernel_package_from_depends("linux-base, initramfs-tools")


def test_deb_name_escapes_epoch():
    assert packages.PackageRef("zlib1g", "1:1.2.13.dfsg-1").deb_name == "zlib1g_1%3a1.2.13.dfsg-1_amd64.deb"


def test_apt_state_fingerprint_tracks_list_changes(tmp_path):
    lists = tmp_path / "lists"
    lists.mkdir()
    (lists / "Packages").write_text("a")
    first = packages.apt_state_fingerprint([str(lists), str(tmp_path / "absent")])
    assert first == packages.apt_state_fingerprint([str(lists), str(tmp_path / "absent")])
    (lists / "Packages").write_text("ab")
    assert packages.apt_state_fingerprint([str(lists), str(tmp_path / "absent")]) != first


def test_resolved_versions_round_trip():
    memo = packages.ResolvedVersions("f" * 64, packages.PackageRef("linux-image-x-cloud-amd64", "1"),
                               [packages.PackageRef("libc6", "2.36-9")])
    assert packages.ResolvedVersions.unpack(memo.pack()) == memo


def test_resolve_cached_memoizes_and_updates_lists_once(tmp_path, monkeypatch):
    answer = (packages.PackageRef("linux-image-6.1.0-9-cloud-amd64", "6.1.27-1"),
              [packages.PackageRef("libc6", "2.36-9")])
    calls = {"resolve": 0, "update": 0}

    def resolve():
        calls["resolve"] += 1
        if calls["resolve"] == 1:
            raise GuestImageError("apt knows no candidate for libc6", "run apt-get update")
        return answer

    monkeypatch.setattr(packages, "resolve_inputs", resolve)
    monkeypatch.setattr(packages, "apt_update", lambda: calls.__setitem__("update", calls["update"] + 1))
    monkeypatch.setattr(packages, "apt_state_fingerprint", lambda: "state-1")
    assert packages.resolve_cached(tmp_path) == answer
    assert calls == {"resolve": 2, "update": 1}
    assert packages.resolve_cached(tmp_path) == answer  # memo hit: apt is not asked
    assert calls["resolve"] == 2
    monkeypatch.setattr(packages, "apt_state_fingerprint", lambda: "state-2")
    packages.resolve_cached(tmp_path)  # apt's lists changed: ask again
    assert calls["resolve"] == 3
    packages.resolve_cached(tmp_path, refresh=True)
    assert calls["resolve"] == 4


def test_missing_tool_names_package_to_install():
    with pytest.raises(GuestImageError) as info:
        packages.check_tools({"sh": "dash", "qemu-kd-no-such-tool": "no-such-package"})
    assert "qemu-kd-no-such-tool" in info.value.message
    assert info.value.hint == "run: apt-get install no-such-package"


def test_kernel_cmdline():
    assert recipe.kernel_cmdline() == recipe.DEFAULT_CMDLINE
    line = recipe.kernel_cmdline(2_100_000, ["kd.debug=1"])
    assert line == recipe.DEFAULT_CMDLINE + " tsc_early_khz=2100000 kd.debug=1"
    for option in ("console=ttyS0", "panic=-1", "quiet"):
        assert option in recipe.DEFAULT_CMDLINE.split()
    with pytest.raises(GuestImageError):
        recipe.kernel_cmdline(0)


def test_init_script_is_valid_shell_and_starts_the_agent(tmp_path):
    script = tmp_path / "init"
    script.write_text(recipe.INIT_SCRIPT)
    shell = shutil.which("busybox") and [shutil.which("busybox"), "sh"] or ["sh"]
    check = subprocess.run([*shell, "-n", str(script)], capture_output=True, text=True)
    assert check.returncode == 0, check.stderr
    text = recipe.INIT_SCRIPT
    for needle in ("mount -t proc", "mount -t sysfs", "mount -t devtmpfs",
                   "mount -t tmpfs -o nosuid,nodev,mode=1777 tmpfs /tmp",
                   "tmpfs /run", "hostname ", "/dev/ttyS1 /dev/ttyS2",
                   "115200 raw -echo", "python3 -I -m guest_agent", "agent exited"):
        assert needle in text, needle
    # The console shell is the agent's decision (by the platform's policy), never init's.
    assert "cttyhack" not in text
    assert text.index("stty") < text.index("python3 -I -m guest_agent")


def test_find_agent_sources_reads_the_package():
    files = rootfs.find_agent_sources()
    assert "__init__.py" in files
    assert all(name.endswith(".py") and "__pycache__" not in name for name in files)


# --- cache behaviour (no apt, no build) -------------------------------------

@pytest.fixture
def offline(monkeypatch):
    inputs = fake_inputs()
    monkeypatch.setattr(cache, "check_tools", lambda *a, **k: None)
    monkeypatch.setattr(cache, "resolve_cached", lambda base, refresh=False:
                        (inputs.kernel_package, inputs.packages))
    monkeypatch.setattr(cache, "find_agent_sources", lambda: inputs.agent_files)
    builds = []

    def fake_build(inp, out_dir, debs_dir, progress):
        builds.append(out_dir)
        progress("building")
        (out_dir / "bzImage").write_bytes(b"kernel")
        (out_dir / "initramfs.cpio.lz4").write_bytes(b"initrd")
        manifest = fake_manifest(out_dir / "bzImage", out_dir / "initramfs.cpio.lz4")
        (out_dir / "manifest.json").write_bytes(manifest.pack())
        return manifest

    monkeypatch.setattr(cache, "build_guest", fake_build)
    return inputs, builds


def test_ensure_guest_builds_once_then_uses_cache(tmp_path, offline):
    inputs, builds = offline
    messages = []
    first = cache.ensure_guest(cache=tmp_path, progress=messages.append)
    assert len(builds) == 1 and messages == ["building"]
    assert first.kernel == tmp_path / "guest" / inputs.cache_key() / "bzImage"
    assert first.initrd.read_bytes() == b"initrd"
    assert first.kernel_release == "6.1.0-9-cloud-amd64"
    assert first.kernel_package_version == "6.1.27-1"
    second = cache.ensure_guest(cache=tmp_path)
    assert len(builds) == 1
    assert second == first
    cache.ensure_guest(cache=tmp_path, force=True)
    assert len(builds) == 2
    assert not [p for p in (tmp_path / "guest").iterdir() if p.name.startswith(".build-")]


def test_ensure_guest_rebuilds_a_damaged_entry(tmp_path, offline):
    inputs, builds = offline
    arts = cache.ensure_guest(cache=tmp_path)
    arts.initrd.write_bytes(b"truncated!")  # size no longer matches the manifest
    cache.ensure_guest(cache=tmp_path)
    assert len(builds) == 2


def test_failed_build_leaves_no_entry(tmp_path, offline, monkeypatch):
    def broken(*args):
        raise GuestImageError("cryptography does not import in the guest tree")
    monkeypatch.setattr(cache, "build_guest", broken)
    with pytest.raises(GuestImageError, match="does not import"):
        cache.ensure_guest(cache=tmp_path)
    assert [p.name for p in (tmp_path / "guest").iterdir() if not p.name.startswith(".")] == []


def test_download_failure_updates_lists_and_retries_once(tmp_path, offline, monkeypatch):
    inputs, builds = offline
    real_build = cache.build_guest
    calls = {"build": 0, "update": 0}

    def flaky(*args):
        calls["build"] += 1
        if calls["build"] == 1:
            raise packages.PackageDownloadError("apt-get download failed: 404 Not Found")
        return real_build(*args)

    monkeypatch.setattr(cache, "build_guest", flaky)
    monkeypatch.setattr(cache, "apt_update", lambda: calls.__setitem__("update", calls["update"] + 1))
    messages = []
    arts = cache.ensure_guest(cache=tmp_path, progress=messages.append)
    assert calls == {"build": 2, "update": 1}
    assert any("updating the package lists" in m for m in messages)
    assert arts.initrd.read_bytes() == b"initrd"


def test_interrupted_build_leftovers_are_removed(tmp_path, offline):
    stale = tmp_path / "guest" / ".build-crashed"
    (stale / ".staging-x/root").mkdir(parents=True)
    (tmp_path / "guest/debs/.download-y").mkdir(parents=True)
    cache.ensure_guest(cache=tmp_path)
    assert not stale.exists()
    assert not (tmp_path / "guest/debs/.download-y").exists()


def test_unreadable_manifest_is_a_cache_miss(tmp_path, offline):
    inputs, builds = offline
    arts = cache.ensure_guest(cache=tmp_path)
    arts.manifest.write_text("{broken")
    assert cache.load_cached(arts.manifest.parent) is None
    cache.ensure_guest(cache=tmp_path)
    assert len(builds) == 2


# --- the real image (slow) ------------------------------------------------

def _qemu_or_skip() -> str:
    qemu = shutil.which("qemu-system-x86_64")
    if qemu is None:
        pytest.skip("qemu-system-x86_64 is not installed")
    return qemu


@pytest.fixture(scope="module")
def real_guest() -> cache.GuestArtifacts:
    return cache.ensure_guest()


@pytest.mark.qemu
def test_real_image_boots_and_imports_cryptography(real_guest, tmp_path):
    pexpect = pytest.importorskip("pexpect")
    qemu = _qemu_or_skip()
    shared = tmp_path / "ttyS1.out"
    port_path = tmp_path / "gp.sock"
    argv = [
        "-accel", "tcg", "-cpu", "max", "-m", "512", "-nodefaults", "-no-reboot",
        "-nographic", "-serial", "stdio",
        "-chardev", f"file,id=shared,path={shared}", "-device", "isa-serial,chardev=shared",
        "-chardev", f"socket,id=port,path={port_path},server=on,wait=off",
        "-device", "isa-serial,chardev=port",
        "-kernel", str(real_guest.kernel), "-initrd", str(real_guest.initrd),
        "-append", recipe.kernel_cmdline(),
    ]
    child = pexpect.spawn(qemu, argv, timeout=120, encoding="utf-8", codec_errors="replace")
    # The guest port says what a plain run's says: no platform protects this guest, so the
    # agent gives the console a shell.
    port = None
    for _ in range(100):
        try:
            port = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            port.connect(str(port_path))
            break
        except OSError:
            port.close()
            port = None
            time.sleep(0.1)
    assert port is not None, "QEMU did not open the guest-port socket"
    server = GuestPortServer(port, UNPROTECTED_PORT)
    server.start()
    try:
        child.expect_exact("qemu-kd-guest: starting agent")
        child.expect_exact("# ")
        child.sendline("python3 -I -c 'import sys, cryptography.hazmat.primitives.ciphers.aead "
                       "as a; a.AESGCM(bytes(32)).encrypt(bytes(12), b\"x\", None); "
                       "print(\"KD\" + \"-PY-OK\", sys.version_info[:2], "
                       "sys.flags.isolated)'; stty -F /dev/ttyS1 | head -1; hostname")
        child.expect(r"KD-PY-OK \(3, 11\) 1")
        child.expect_exact("speed 115200 baud")
        child.expect_exact(recipe.HOSTNAME)
        child.sendline("uname -r")
        child.expect_exact(real_guest.kernel_release)
        # The init started the agent on the shared channel (ttyS1).
        for _ in range(240):
            if shared.exists() and b'"ready"' in shared.read_bytes():
                break
            child.expect([pexpect.TIMEOUT, pexpect.EOF], timeout=0.5)
        assert b'"ready"' in shared.read_bytes()
        child.sendline("echo b > /proc/sysrq-trigger")
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
        server.stop()


@pytest.mark.qemu
def test_real_image_rebuild_is_byte_identical(real_guest, tmp_path):
    """A second build from the same inputs gives the same bytes and manifest."""
    cached = cache.GuestManifest.unpack(real_guest.manifest.read_bytes())
    kernel, refs = packages.resolve_cached(real_guest.manifest.parent.parent)
    inputs = cache.BuildInputs(packages=refs, kernel_package=kernel,
                            agent_files=rootfs.find_agent_sources())
    assert inputs.cache_key() == cached.cache_key
    out = Path(tempfile.mkdtemp(dir=real_guest.manifest.parent.parent, prefix=".test-"))
    try:
        rebuilt = cache.build_guest(inputs, out, real_guest.manifest.parent.parent / "debs",
                                 lambda _msg: None)
        assert rebuilt.pack() == cached.pack()
        assert (out / "initramfs.cpio.lz4").read_bytes() == real_guest.initrd.read_bytes()
        assert (out / "manifest.json").read_bytes() == real_guest.manifest.read_bytes()
    finally:
        shutil.rmtree(out, ignore_errors=True)
