"""The reproducible guest kernel and initramfs (``qemu-kd guest build``).

The guest is a Debian cloud kernel (a bzImage taken from the distribution's
package) and an initramfs that holds a static busybox, a pruned python3.11
with the ``cryptography`` package, and this project's ``guest_agent``.

Everything comes from Debian packages fetched with ``apt-get download`` and
unpacked with ``dpkg-deb``; nothing is copied from the host's own files.  The
shared libraries the guest needs are found by reading the ``DT_NEEDED``
entries of every ELF file in the staging tree and mapping each soname to its
package through a small pinned table (:data:`SONAME_PACKAGES`).  Python
bytecode is compiled by the guest's own interpreter inside a chroot of the
staging tree, which also proves that ``cryptography`` and the agent import
before any QEMU starts.

The output is reproducible: fixed mtimes, sorted entries, owner 0:0,
``cpio --reproducible -H newc`` and ``lz4 -l``.  Built artefacts live in
``cache_dir()/guest/<key>``, where the key hashes every input (package names
and versions, the agent's sources, the init script and :data:`RECIPE_VERSION`).

The byte-level contents, pruning rules and measurements are in
``docs/guest-image.md``.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import importlib.util
import json
import os
import re
import shutil
import stat
import struct
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path, PurePosixPath

from . import paths
from .errors import GuestImageError

#: Bump whenever the recipe below changes what ends up in the image.
RECIPE_VERSION = 3

#: Every file in the initramfs gets this mtime (2023-01-01T00:00:00Z).
SOURCE_DATE_EPOCH = 1672531200

ARCH = "amd64"
MULTIARCH = "x86_64-linux-gnu"
PYTHON = "python3.11"

#: The metapackage whose dependency names the real kernel package.
KERNEL_META_PACKAGE = "linux-image-cloud-amd64"
_KERNEL_PACKAGE_RE = re.compile(r"^linux-image-(\d[^\s,]*-cloud-amd64)$")

#: Packages the image is built from, besides the kernel and shared libraries.
ROOT_PACKAGES = (
    "busybox-static",
    "python3.11-minimal",
    "libpython3.11-minimal",
    "libpython3.11-stdlib",
    "python3-cryptography",
    "python3-cffi-backend",
)

#: Soname -> Debian package that ships it.  Pinned rather than asked of the
#: host's dpkg database, so the result does not depend on what the host has
#: installed.  A soname missing here fails the build with a clear message.
SONAME_PACKAGES: dict[str, str] = {
    "ld-linux-x86-64.so.2": "libc6",
    "libc.so.6": "libc6",
    "libm.so.6": "libc6",
    "libdl.so.2": "libc6",
    "libpthread.so.0": "libc6",
    "librt.so.1": "libc6",
    "libutil.so.1": "libc6",
    "libresolv.so.2": "libc6",
    "libz.so.1": "zlib1g",
    "libexpat.so.1": "libexpat1",
    "libssl.so.3": "libssl3",
    "libcrypto.so.3": "libssl3",
    "libffi.so.8": "libffi8",
    "libgcc_s.so.1": "libgcc-s1",
}

#: Files loaded with dlopen(), which no DT_NEEDED entry reveals: OpenSSL 3
#: loads its legacy provider by name, and cryptography refuses to start
#: without it.
DLOPENED_FILES = (
    f"usr/lib/{MULTIARCH}/ossl-modules/legacy.so",
)

#: Libraries kept although no DT_NEEDED entry names them: the ELF
#: interpreter (named by PT_INTERP) and libgcc_s, which glibc dlopen()s for
#: thread cancellation and unwinding.
ALWAYS_KEPT_SONAMES = frozenset({"ld-linux-x86-64.so.2", "libgcc_s.so.1"})

#: What must import inside the chroot before the image is accepted.
IMPORT_CHECK = (
    "import cryptography.hazmat.primitives.ciphers.aead as aead, guest_agent, pkgutil, importlib\n"
    "aead.AESGCM(bytes(32)).encrypt(bytes(12), b'probe', None)\n"
    "for m in pkgutil.walk_packages(guest_agent.__path__, 'guest_agent.'):\n"
    "    m.name.endswith('__main__') or importlib.import_module(m.name)\n"
    "print('import-check-ok')\n"
)

#: The kernel command line for the guest.  Callers append
#: ``tsc_early_khz=<host kHz>`` (see :func:`kernel_cmdline`) when they boot
#: without firmware.  Each option is explained in docs/guest-image.md.
DEFAULT_CMDLINE = "console=ttyS0 earlyprintk=serial,ttyS0,115200 panic=-1 reboot=t quiet loglevel=4"

HOSTNAME = "qemu-kd-guest"

#: The guest's /init, run by the kernel as PID 1 under busybox sh.
INIT_SCRIPT = f"""\
#!/bin/sh
# /init of the qemu-kd guest.  Runs as PID 1 under busybox sh and never exits.
# ttyS0 is the console, ttyS1 the shared channel to the host VMM, ttyS2 the
# guest port to the platform.
export PATH=/usr/sbin:/usr/bin HOME=/root TERM=vt100 LANG=C.UTF-8

mount -t proc -o nosuid,nodev,noexec proc /proc
mount -t sysfs -o nosuid,nodev,noexec sysfs /sys
mount -t devtmpfs -o nosuid,mode=0755 devtmpfs /dev
mount -t tmpfs -o nosuid,nodev,mode=1777 tmpfs /tmp
mount -t tmpfs -o nosuid,nodev,mode=0755 tmpfs /run
hostname {HOSTNAME}

for port in /dev/ttyS1 /dev/ttyS2; do
    stty -F "$port" 115200 raw -echo 2>/dev/null \\
        || echo "qemu-kd-guest: $port is not usable"
done

echo "qemu-kd-guest: starting agent"
(
    python3 -I -m guest_agent
    echo "qemu-kd-guest: agent exited with status $?" > /dev/console
) &

while true; do
    setsid cttyhack sh
    sleep 1
done
"""

#: Minimal account files so ``id``, ``whoami`` and ``~`` work.
ETC_FILES = {
    "etc/passwd": "root:x:0:0:root:/root:/bin/sh\n",
    "etc/group": "root:x:0:\n",
    "etc/hostname": f"{HOSTNAME}\n",
}

# --- pruning -------------------------------------------------------------

_STDLIB = f"usr/lib/{PYTHON}"
_DYNLOAD = f"{_STDLIB}/lib-dynload"

#: Whole directories dropped from the staging tree.
PRUNED_DIRS = (
    "usr/share",
    "usr/include",
    "usr/lib/binfmt.d",
    f"usr/lib/{MULTIARCH}/gconv",
    f"usr/lib/{MULTIARCH}/engines-3",
    f"usr/lib/{MULTIARCH}/audit",
    f"usr/lib/{MULTIARCH}/pkgconfig",
    *(f"{_STDLIB}/{name}" for name in (
        "test", "idlelib", "tkinter", "turtledemo", "ensurepip", "lib2to3",
        "pydoc_data", "distutils", "venv", "sqlite3", "curses", "dbm",
        "__phello__", f"config-3.11-{MULTIARCH}", "site-packages",
    )),
)

#: Stdlib modules (files) dropped: demos and tools nothing in the guest uses.
PRUNED_STDLIB_FILES = frozenset({
    "turtle.py", "antigravity.py", "this.py", "__hello__.py", "pydoc.py", "_pydecimal.py",
    "EXTERNALLY-MANAGED", "LICENSE.txt",
})

#: Test suites nested anywhere below the Python trees.
PRUNED_DIR_NAMES = frozenset({"test", "tests", "idle_test", "__pycache__"})

#: Extension modules dropped: test helpers, and modules whose libraries the
#: guest does not ship (readline, curses, dbm, sqlite, NIS, crypt, bz2, lzma,
#: uuid).  Their pure-Python users fall back or are pruned too.
PRUNED_EXTENSIONS = frozenset({
    "_testcapi", "_testinternalcapi", "_testbuffer", "_testclinic",
    "_testimportmultiple", "_testmultiphase", "_ctypes_test", "_xxtestfuzz",
    "xxlimited", "xxlimited_35", "_xxsubinterpreters",
    "_dbm", "_gdbm", "_curses", "_curses_panel", "readline", "nis",
    "_sqlite3", "_crypt", "ossaudiodev", "_tkinter", "_bz2", "_lzma", "_uuid",
    "audioop", "_codecs_cn", "_codecs_hk", "_codecs_jp", "_codecs_kr", "_codecs_tw",
    "_codecs_iso2022", "_multibytecodec",
})

#: File suffixes nobody at run time needs.
PRUNED_SUFFIXES = (".pyi", ".a", ".pc", ".rst", ".exe")


def is_pruned(relpath: str) -> bool:
    """Whether a staging-tree path (posix, relative, usr-merged) is left out."""
    path = PurePosixPath(relpath)
    text = path.as_posix()
    for prefix in PRUNED_DIRS:
        if text == prefix or text.startswith(prefix + "/"):
            return True
    if text.startswith(("usr/lib/python3", )):
        if any(part in PRUNED_DIR_NAMES for part in path.parts[3:]):
            return True
    if path.name.endswith(PRUNED_SUFFIXES):
        return True
    parent = path.parent.as_posix()
    if parent == _STDLIB and path.name in PRUNED_STDLIB_FILES:
        return True
    if parent == _DYNLOAD and path.name.split(".", 1)[0] in PRUNED_EXTENSIONS:
        return True
    return False


# --- data types ----------------------------------------------------------

class PackageDownloadError(GuestImageError):
    """apt-get could not fetch a package (stale lists, mirror or network)."""


@dataclass(frozen=True)
class PackageRef:
    """One Debian binary package at an exact version."""

    name: str
    version: str
    architecture: str = ARCH

    @property
    def deb_name(self) -> str:
        """File name of the package in the download cache."""
        return f"{self.name}_{self.version.replace(':', '%3a')}_{self.architecture}.deb"


@dataclass(frozen=True)
class FileDigest:
    sha256: str
    size: int

    @classmethod
    def of(cls, path: Path) -> "FileDigest":
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
        return cls(digest.hexdigest(), path.stat().st_size)


@dataclass
class GuestManifest:
    """``manifest.json``: what the guest was built from, and its hashes."""

    recipe_version: int
    cache_key: str
    kernel_package: PackageRef
    kernel_release: str
    packages: list[PackageRef]
    bzimage: FileDigest
    initramfs: FileDigest
    agent_sha256: str
    cmdline: str = DEFAULT_CMDLINE
    source_date_epoch: int = SOURCE_DATE_EPOCH
    format: int = 1

    def pack(self) -> bytes:
        data = asdict(self)
        data["packages"] = sorted(data["packages"], key=lambda p: p["name"])
        return (json.dumps(data, indent=2, sort_keys=True) + "\n").encode()

    @classmethod
    def unpack(cls, raw: bytes) -> "GuestManifest":
        try:
            data = json.loads(raw)
            if data.get("format") != 1:
                raise ValueError(f"unknown manifest format {data.get('format')!r}")
            return cls(
                recipe_version=int(data["recipe_version"]),
                cache_key=str(data["cache_key"]),
                kernel_package=PackageRef(**data["kernel_package"]),
                kernel_release=str(data["kernel_release"]),
                packages=[PackageRef(**p) for p in data["packages"]],
                bzimage=FileDigest(**data["bzimage"]),
                initramfs=FileDigest(**data["initramfs"]),
                agent_sha256=str(data["agent_sha256"]),
                cmdline=str(data["cmdline"]),
                source_date_epoch=int(data["source_date_epoch"]),
                format=1,
            )
        except (ValueError, KeyError, TypeError) as exc:
            raise GuestImageError(f"guest manifest is unreadable: {exc}",
                                  "rebuild it with 'qemu-kd guest build --force'") from exc


@dataclass
class GuestArtifacts:
    """The built guest: paths into the cache and what the kernel is."""

    kernel: Path
    initrd: Path
    manifest: Path
    kernel_release: str
    kernel_package_version: str


@dataclass
class BuildInputs:
    """Everything the image depends on; its hash names the cache entry."""

    packages: list[PackageRef]
    kernel_package: PackageRef
    agent_files: dict[str, bytes]
    init_script: str = INIT_SCRIPT
    recipe_version: int = RECIPE_VERSION

    def agent_digest(self) -> str:
        digest = hashlib.sha256()
        for name in sorted(self.agent_files):
            data = self.agent_files[name]
            digest.update(f"{name}\0{len(data)}\0".encode())
            digest.update(data)
        return digest.hexdigest()

    def cache_key(self) -> str:
        digest = hashlib.sha256()
        record = {
            "recipe": self.recipe_version,
            "kernel": asdict(self.kernel_package),
            "packages": sorted((p.name, p.version, p.architecture) for p in self.packages),
            "agent": self.agent_digest(),
            "init": hashlib.sha256(self.init_script.encode()).hexdigest(),
            "cmdline": DEFAULT_CMDLINE,
            "etc": ETC_FILES,
        }
        digest.update(json.dumps(record, sort_keys=True).encode())
        return digest.hexdigest()[:24]


def kernel_cmdline(tsc_khz: int | None = None, extra: Iterable[str] = ()) -> str:
    """:data:`DEFAULT_CMDLINE` plus ``tsc_early_khz`` and any extra options."""
    parts = [DEFAULT_CMDLINE]
    if tsc_khz is not None:
        if tsc_khz <= 0:
            raise GuestImageError(f"TSC frequency must be positive, not {tsc_khz} kHz")
        parts.append(f"tsc_early_khz={int(tsc_khz)}")
    parts.extend(extra)
    return " ".join(parts)


# --- ELF -----------------------------------------------------------------

_PT_LOAD, _PT_DYNAMIC = 1, 2
_DT_NULL, _DT_NEEDED, _DT_STRTAB = 0, 1, 5


def is_elf(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"\x7fELF"
    except OSError:
        return False


def elf_needed(data: bytes) -> list[str]:
    """The DT_NEEDED sonames of a 64-bit little-endian ELF file, in order.

    Returns an empty list for a static executable.
    """
    if data[:4] != b"\x7fELF":
        raise ValueError("not an ELF file")
    if data[4] != 2 or data[5] != 1:
        raise ValueError("only 64-bit little-endian ELF files are supported")
    phoff, = struct.unpack_from("<Q", data, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", data, 0x36)
    loads: list[tuple[int, int, int]] = []
    dynamic: tuple[int, int] | None = None
    for i in range(phnum):
        p_type, _flags, p_offset, p_vaddr, _paddr, p_filesz = struct.unpack_from(
            "<IIQQQQ", data, phoff + i * phentsize)
        if p_type == _PT_LOAD:
            loads.append((p_vaddr, p_offset, p_filesz))
        elif p_type == _PT_DYNAMIC:
            dynamic = (p_offset, p_filesz)
    if dynamic is None:
        return []
    needed: list[int] = []
    strtab_vaddr = None
    offset, size = dynamic
    for pos in range(offset, offset + size, 16):
        tag, value = struct.unpack_from("<qQ", data, pos)
        if tag == _DT_NULL:
            break
        if tag == _DT_NEEDED:
            needed.append(value)
        elif tag == _DT_STRTAB:
            strtab_vaddr = value
    if not needed:
        return []
    if strtab_vaddr is None:
        raise ValueError("ELF file has DT_NEEDED entries but no string table")
    for vaddr, file_offset, filesz in loads:
        if vaddr <= strtab_vaddr < vaddr + filesz:
            strtab = file_offset + strtab_vaddr - vaddr
            break
    else:
        raise ValueError("ELF string table lies outside every loadable segment")
    names = []
    for index in needed:
        start = strtab + index
        end = data.index(b"\0", start)
        names.append(data[start:end].decode())
    return names


# --- tools ---------------------------------------------------------------

#: Tool -> Debian package to install when it is missing.
REQUIRED_TOOLS = {
    "apt-get": "apt",
    "apt-cache": "apt",
    "dpkg-deb": "dpkg",
    "cpio": "cpio",
    "lz4": "lz4",
    "chroot": "coreutils",
}


def check_tools(tools: Mapping[str, str] | None = None) -> None:
    """Fail with the packages to install if a tool the build runs is missing."""
    if tools is None:
        tools = dict(REQUIRED_TOOLS)
        if os.geteuid() != 0:
            tools["unshare"] = "util-linux"  # chroot through a user namespace
    missing = sorted({pkg for tool, pkg in tools.items() if shutil.which(tool) is None})
    if missing:
        names = ", ".join(t for t in tools if shutil.which(t) is None)
        raise GuestImageError(f"building the guest image needs {names}, which is not installed",
                              f"run: apt-get install {' '.join(missing)}")


def _run(argv: list[str], *, what: str, hint: str, cwd: Path | None = None,
         env: Mapping[str, str] | None = None, input: bytes | None = None) -> bytes:
    try:
        proc = subprocess.run(argv, cwd=cwd, env=env, input=input, capture_output=True)
    except OSError as exc:
        raise GuestImageError(f"{what}: {exc}", hint) from exc
    if proc.returncode != 0:
        lines = [ln for ln in proc.stderr.decode(errors="replace").splitlines()
                 if ln.strip() and not ln.startswith("W:")]
        detail = lines[-1] if lines else f"exit status {proc.returncode}"
        raise GuestImageError(f"{what}: {detail}", hint)
    return proc.stdout


# --- apt -----------------------------------------------------------------

def parse_apt_records(text: str) -> dict[str, dict[str, str]]:
    """Parse ``apt-cache show`` output: package name -> first record's fields."""
    records: dict[str, dict[str, str]] = {}
    for block in re.split(r"\n\s*\n", text):
        fields_: dict[str, str] = {}
        key = None
        for line in block.splitlines():
            if line[:1] in (" ", "\t") and key:
                fields_[key] += "\n" + line.strip()
            elif ":" in line:
                key, value = line.split(":", 1)
                fields_[key] = value.strip()
        name = fields_.get("Package")
        if name and name not in records:
            records[name] = fields_
    return records


def kernel_package_from_depends(depends: str) -> str:
    """The real ``linux-image-<release>`` package in a metapackage's Depends."""
    for alternative in re.split(r"[,|]", depends):
        name = alternative.strip().split(" ", 1)[0].split(":", 1)[0]
        if _KERNEL_PACKAGE_RE.match(name):
            return name
    raise GuestImageError(f"{KERNEL_META_PACKAGE} does not depend on a cloud kernel package "
                          f"(Depends: {depends})", "run apt-get update")


def resolve_versions(names: Iterable[str]) -> dict[str, PackageRef]:
    """Candidate versions of packages, as apt would download them."""
    names = list(dict.fromkeys(names))
    argv = ["apt-cache", "show", "--no-all-versions", *(f"{n}:{ARCH}" for n in names)]
    proc = subprocess.run(argv, capture_output=True, env=_apt_env())
    records = parse_apt_records(proc.stdout.decode(errors="replace"))
    missing = [n for n in names if n not in records]
    if missing:
        raise GuestImageError(f"apt knows no candidate for {', '.join(missing)}",
                              "run apt-get update (the package lists are missing or stale)")
    return {n: PackageRef(n, records[n]["Version"], records[n].get("Architecture", ARCH))
            for n in names}


def resolve_inputs() -> tuple[PackageRef, list[PackageRef]]:
    """(kernel package, all other packages) at their candidate versions."""
    argv = ["apt-cache", "show", "--no-all-versions", f"{KERNEL_META_PACKAGE}:{ARCH}"]
    proc = subprocess.run(argv, capture_output=True, env=_apt_env())
    meta = parse_apt_records(proc.stdout.decode(errors="replace")).get(KERNEL_META_PACKAGE)
    if not meta or "Depends" not in meta:
        raise GuestImageError(f"apt knows no {KERNEL_META_PACKAGE} package",
                              "run apt-get update (the package lists are missing or stale)")
    kernel_name = kernel_package_from_depends(meta["Depends"])
    wanted = [kernel_name, *ROOT_PACKAGES, *sorted(set(SONAME_PACKAGES.values()))]
    refs = resolve_versions(wanted)
    kernel = refs.pop(kernel_name)
    return kernel, list(refs.values())


def _apt_env() -> dict[str, str]:
    env = dict(os.environ)
    env["LC_ALL"] = "C"
    return env


def _apt_update() -> None:
    if os.geteuid() != 0:
        raise GuestImageError("the package lists are stale and updating them needs root",
                              "run apt-get update as root, then build again")
    _run(["apt-get", "update", "-q"], what="apt-get update failed",
         hint="check network access to the Debian mirror")


def download_packages(refs: Iterable[PackageRef], debs_dir: Path,
                      progress: Callable[[str], None]) -> dict[str, Path]:
    """Fetch packages into the download cache; returns name -> .deb path."""
    debs_dir.mkdir(parents=True, exist_ok=True)
    refs = list(refs)
    result = {r.name: debs_dir / r.deb_name for r in refs}
    todo = [r for r in refs if not result[r.name].is_file()]
    if not todo:
        return result
    progress(f"downloading {len(todo)} packages")
    with tempfile.TemporaryDirectory(prefix=".download-", dir=debs_dir) as tmp:
        argv = ["apt-get", "download", "-q",
                *(f"{r.name}:{r.architecture}={r.version}" for r in todo)]
        try:
            _run(argv, cwd=Path(tmp), env=_apt_env(), what="apt-get download failed",
                 hint="run apt-get update, and check network access to the Debian mirror")
        except GuestImageError as exc:
            raise PackageDownloadError(exc.message, exc.hint) from exc
        for ref in todo:
            found = sorted(Path(tmp).glob(f"{ref.name}_*.deb"))
            if len(found) != 1:
                raise PackageDownloadError(
                    f"apt-get download did not produce {ref.name} {ref.version}",
                    "run apt-get update")
            os.replace(found[0], result[ref.name])
    return result


# --- staging -------------------------------------------------------------

_USRMERGE = {"bin": "usr/bin", "sbin": "usr/sbin", "lib": "usr/lib", "lib64": "usr/lib64"}


def usrmerged(relpath: str) -> str:
    """Map /bin, /sbin, /lib, /lib64 into /usr, as a merged-/usr system has them."""
    head, sep, tail = relpath.partition("/")
    if head in _USRMERGE:
        return _USRMERGE[head] + (sep + tail if tail else "")
    return relpath


def extract_deb(deb: Path, dest: Path) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    _run(["dpkg-deb", "-x", str(deb), str(dest)], what=f"dpkg-deb could not unpack {deb.name}",
         hint="delete the guest cache and build again")


def install_tree(src: Path, staging: Path) -> list[str]:
    """Copy an unpacked package into the usr-merged staging tree, minus pruned paths.

    Returns the staging-relative paths installed.
    """
    installed = []
    for dirpath, dirnames, filenames in os.walk(src):
        rel_dir = Path(dirpath).relative_to(src)
        dirnames[:] = sorted(d for d in dirnames
                             if not is_pruned(usrmerged((rel_dir / d).as_posix())))
        for name in sorted(dirnames + filenames):
            rel = usrmerged((rel_dir / name).as_posix())
            source = Path(dirpath) / name
            target = staging / rel
            if is_pruned(rel):
                continue
            if source.is_symlink():
                if target.is_symlink() or target.exists():
                    target.unlink()
                target.parent.mkdir(parents=True, exist_ok=True)
                os.symlink(os.readlink(source), target)
            elif source.is_dir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            else:
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(source, target, follow_symlinks=False)
                os.chmod(target, stat.S_IMODE(source.lstat().st_mode))
            installed.append(rel)
    return installed


def prune_tree(staging: Path) -> None:
    """Remove pruned paths, and the directories below /usr left empty."""
    for dirpath, dirnames, filenames in os.walk(staging, topdown=False):
        rel_dir = Path(dirpath).relative_to(staging)
        for name in filenames + dirnames:
            rel = (rel_dir / name).as_posix()
            path = Path(dirpath) / name
            if is_pruned(rel):
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path)
                else:
                    path.unlink()
            elif (rel.startswith("usr/") and not path.is_symlink() and path.is_dir()
                  and not any(path.iterdir())):
                path.rmdir()


def missing_sonames(staging: Path) -> dict[str, list[str]]:
    """Sonames some ELF file in the tree needs but no library file provides.

    Returns soname -> staging paths of the files that need it.
    """
    provided = set()
    for libdir in (f"usr/lib/{MULTIARCH}", "usr/lib64", "usr/lib"):
        base = staging / libdir
        if base.is_dir():
            provided.update(p.name for p in base.iterdir())
    needers: dict[str, list[str]] = {}
    for path in sorted(staging.rglob("*")):
        if path.is_symlink() or not path.is_file() or not is_elf(path):
            continue
        try:
            sonames = elf_needed(path.read_bytes())
        except ValueError as exc:
            raise GuestImageError(f"cannot read {path.relative_to(staging)}: {exc}") from exc
        for soname in sonames:
            if soname not in provided:
                needers.setdefault(soname, []).append(path.relative_to(staging).as_posix())
    return needers


def prune_unused_libraries(staging: Path) -> list[str]:
    """Drop libraries in the multiarch directory that nothing loads.

    Keeps the DT_NEEDED closure of every other ELF file in the tree, the
    files in :data:`DLOPENED_FILES` and :data:`ALWAYS_KEPT_SONAMES`, and the
    files their symlinks lead to.  Returns the paths removed.
    """
    libdir = staging / "usr/lib" / MULTIARCH
    libs = {p.name: p for p in libdir.iterdir() if not p.is_dir() or p.is_symlink()}
    wanted = set(ALWAYS_KEPT_SONAMES)
    roots = [p for p in sorted(staging.rglob("*"))
             if p.parent != libdir and not p.is_symlink() and p.is_file() and is_elf(p)]
    roots += [staging / rel for rel in DLOPENED_FILES]
    for path in roots:
        wanted.update(elf_needed(path.read_bytes()))
    keep: set[str] = set()
    todo = sorted(wanted)
    while todo:
        name = todo.pop()
        if name in keep or name not in libs:
            continue
        keep.add(name)
        path = libs[name]
        if path.is_symlink():
            todo.append(os.readlink(path).rsplit("/", 1)[-1])
        elif is_elf(path):
            todo.extend(elf_needed(path.read_bytes()))
    removed = []
    for name, path in sorted(libs.items()):
        if name not in keep:
            path.unlink()
            removed.append(path.relative_to(staging).as_posix())
    return removed


def packages_for_sonames(sonames: Iterable[str]) -> set[str]:
    unknown = sorted(s for s in sonames if s not in SONAME_PACKAGES)
    if unknown:
        raise GuestImageError(f"no package is pinned for the shared libraries {', '.join(unknown)}",
                              "add them to SONAME_PACKAGES in qemu_kd/guest_build.py "
                              "(dpkg -S <soname> names the package)")
    return {SONAME_PACKAGES[s] for s in sonames}


def install_busybox_applets(staging: Path) -> int:
    """Symlink every busybox applet to /usr/bin/busybox; returns how many."""
    busybox = staging / "usr/bin/busybox"
    out = _run([str(busybox), "--list-full"], what="cannot list the busybox applets",
               hint="delete the guest cache and build again")
    count = 0
    for line in sorted(out.decode().split()):
        rel = usrmerged(line.strip("/"))
        if "/" not in rel:
            continue  # e.g. linuxrc: /init is ours
        target = staging / rel
        if target.exists() or target.is_symlink():
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        os.symlink("/usr/bin/busybox", target)
        count += 1
    return count


def find_agent_sources() -> dict[str, bytes]:
    """The ``guest_agent`` package's .py files: relative path -> contents."""
    spec = importlib.util.find_spec("guest_agent")
    if spec is None or not spec.submodule_search_locations:
        raise GuestImageError("the guest_agent package is not installed",
                              "install qemu-kd with pip (it ships guest_agent)")
    root = Path(list(spec.submodule_search_locations)[0])
    files = {}
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if "__pycache__" in rel.parts:
            continue
        files[rel.as_posix()] = path.read_bytes()
    if "__init__.py" not in files:
        raise GuestImageError(f"{root} holds no guest_agent package", "reinstall qemu-kd")
    return files


def _chroot_argv(staging: Path, argv: list[str]) -> list[str]:
    if os.geteuid() == 0:
        return ["chroot", str(staging), *argv]
    return ["unshare", "--map-root-user", "chroot", str(staging), *argv]


def run_in_guest_tree(staging: Path, argv: list[str], *, what: str) -> str:
    """Run a program of the staging tree inside a chroot of it."""
    env = {"PATH": "/usr/bin:/usr/sbin", "LC_ALL": "C.UTF-8", "PYTHONHASHSEED": "0",
           "HOME": "/root", "SOURCE_DATE_EPOCH": str(SOURCE_DATE_EPOCH)}
    try:
        proc = subprocess.run(_chroot_argv(staging, argv), env=env, capture_output=True)
    except OSError as exc:
        raise GuestImageError(f"{what}: {exc}", "run as root (the check uses chroot)") from exc
    output = (proc.stdout + proc.stderr).decode(errors="replace")
    if proc.returncode != 0:
        lines = [ln for ln in output.splitlines() if ln.strip()]
        detail = lines[-1] if lines else f"exit status {proc.returncode}"
        hint = "a shared library or module is missing from the image; see SONAME_PACKAGES and the pruning rules"
        if "Operation not permitted" in output and "chroot" in output:
            hint = "run as root, or enable unprivileged user namespaces"
        raise GuestImageError(f"{what}: {detail}", hint)
    return output


def compile_bytecode(staging: Path) -> None:
    """Compile .pyc with the guest's interpreter, then drop the .py sources."""
    trees = [f"/{_STDLIB}", "/usr/lib/python3/dist-packages"]
    run_in_guest_tree(staging, [f"/usr/bin/{PYTHON}", "-m", "compileall", "-q", "-b", "-f",
                                "--invalidation-mode", "unchecked-hash", *trees],
                      what="compiling python bytecode in the guest tree failed")
    for tree in trees:
        for path in sorted((staging / tree.lstrip("/")).rglob("*.py")):
            if not path.with_suffix(".pyc").is_file():
                raise GuestImageError(f"no bytecode was written for {path.relative_to(staging)}")
            path.unlink()


def normalize_tree(staging: Path, epoch: int = SOURCE_DATE_EPOCH) -> None:
    """Fixed permissions on directories and one mtime for every entry."""
    special = {staging / "root": 0o700, staging / "tmp": 0o1777}
    for dirpath, dirnames, filenames in os.walk(staging, topdown=False):
        for name in filenames + dirnames:
            path = Path(dirpath) / name
            if not path.is_symlink() and path.is_dir():
                os.chmod(path, special.get(path, 0o755))
            os.utime(path, (epoch, epoch), follow_symlinks=False)
    os.chmod(staging, 0o755)
    os.utime(staging, (epoch, epoch))


def sorted_entries(root: Path) -> list[str]:
    """Every path below root, relative, parents before children, sorted."""
    entries = []
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = Path(dirpath).relative_to(root)
        for name in dirnames + filenames:
            entries.append((rel_dir / name).as_posix())
    return sorted(entries, key=lambda p: p.split("/"))


def write_cpio(root: Path, out: Path) -> None:
    """Write a reproducible newc cpio archive of the tree at root."""
    names = b"".join(p.encode() + b"\0" for p in sorted_entries(root))
    with open(out, "wb") as f:
        try:
            proc = subprocess.run(
                ["cpio", "--create", "--null", "--quiet", "--reproducible", "-R", "0:0",
                 "-H", "newc"], cwd=root, input=names, stdout=f, stderr=subprocess.PIPE)
        except OSError as exc:
            raise GuestImageError(f"cannot run cpio: {exc}", "run: apt-get install cpio") from exc
    if proc.returncode != 0:
        raise GuestImageError(f"cpio failed: {proc.stderr.decode(errors='replace').strip()}",
                              "run: apt-get install cpio (version 2.12 or later)")


def compress_lz4(src: Path, dest: Path) -> None:
    """Compress with lz4's legacy frame format, the one the kernel unpacks."""
    _run(["lz4", "-l", "-9", "-f", "-q", str(src), str(dest)],
         what="lz4 compression failed", hint="run: apt-get install lz4")


def extract_kernel(deb: Path, dest_dir: Path) -> tuple[Path, str]:
    """Unpack the bzImage from a kernel package: (path, kernel release).

    Streams the package's data archive and keeps only ``/boot/vmlinuz-*``;
    the modules are not needed (the cloud kernel has 8250 serial built in).
    """
    target = dest_dir / "bzImage"
    release = None
    try:
        proc = subprocess.Popen(["dpkg-deb", "--fsys-tarfile", str(deb)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    except OSError as exc:
        raise GuestImageError(f"cannot run dpkg-deb: {exc}", "run: apt-get install dpkg") from exc
    with proc:
        try:
            with tarfile.open(fileobj=proc.stdout, mode="r|") as archive:
                for member in archive:
                    name = member.name.lstrip("./")
                    if member.isfile() and re.fullmatch(r"boot/vmlinuz-[^/]+", name):
                        if release is not None:
                            raise GuestImageError(f"{deb.name} holds more than one vmlinuz")
                        release = name[len("boot/vmlinuz-"):]
                        source = archive.extractfile(member)
                        with open(target, "wb") as out:
                            shutil.copyfileobj(source, out)
        except tarfile.TarError as exc:
            raise GuestImageError(f"{deb.name} is not a readable package: {exc}",
                                  "delete the guest cache and build again") from exc
        stderr = proc.stderr.read()
    if proc.returncode != 0:
        raise GuestImageError(f"dpkg-deb could not read {deb.name}: "
                              f"{stderr.decode(errors='replace').strip()}",
                              "delete the guest cache and build again")
    if release is None:
        raise GuestImageError(f"{deb.name} holds no /boot/vmlinuz-*",
                              "check that the package is a Debian kernel image")
    os.chmod(target, 0o644)
    with open(target, "rb") as f:
        header = f.read(0x210)
    if header[0x202:0x206] != b"HdrS":
        raise GuestImageError(f"vmlinuz-{release} is not a bzImage")
    return target, release


# --- the build -----------------------------------------------------------

def build_initramfs_tree(staging: Path, debs: Mapping[str, Path], root_names: Iterable[str],
                         agent_files: Mapping[str, bytes], init_script: str,
                         progress: Callable[[str], None]) -> list[str]:
    """Fill the staging tree; returns the names of the packages installed."""
    for top, target in _USRMERGE.items():
        (staging / target).mkdir(parents=True, exist_ok=True)
        os.symlink(target, staging / top)
    unpacked = staging.parent / "unpacked"
    installed: list[str] = []

    def install(names: Iterable[str]) -> None:
        for name in sorted(names):
            if name not in debs:
                raise GuestImageError(f"package {name} is needed but was not downloaded")
            extract_deb(debs[name], unpacked / name)
            install_tree(unpacked / name, staging)
            installed.append(name)

    progress("extracting")
    install(root_names)
    while True:
        needers = missing_sonames(staging)
        if not needers:
            break
        new = packages_for_sonames(needers) - set(installed)
        if not new:
            soname, users = next(iter(sorted(needers.items())))
            raise GuestImageError(f"{users[0]} needs {soname}, which its package does not ship",
                                  "fix SONAME_PACKAGES in qemu_kd/guest_build.py")
        install(new)
    shutil.rmtree(unpacked)
    prune_unused_libraries(staging)
    for rel in DLOPENED_FILES:
        if not (staging / rel).is_file():
            raise GuestImageError(f"the image lacks {rel}, which is loaded at run time",
                                  "check the libssl3 package")

    install_busybox_applets(staging)
    os.symlink(PYTHON, staging / "usr/bin/python3")
    for name in ("dev", "proc", "sys", "tmp", "run", "root", "etc", "var", "mnt"):
        (staging / name).mkdir(exist_ok=True)
    for rel, text in ETC_FILES.items():
        (staging / rel).write_text(text)
        os.chmod(staging / rel, 0o644)
    agent_root = staging / "usr/lib/python3/dist-packages/guest_agent"
    for rel, data in sorted(agent_files.items()):
        target = agent_root / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
        os.chmod(target, 0o644)
    (staging / "init").write_text(init_script)
    os.chmod(staging / "init", 0o755)

    progress("compiling python bytecode")
    compile_bytecode(staging)
    prune_tree(staging)
    progress("checking imports in the guest tree")
    out = run_in_guest_tree(staging, [f"/usr/bin/{PYTHON}", "-I", "-c", IMPORT_CHECK],
                            what="cryptography or guest_agent does not import in the guest tree")
    if "import-check-ok" not in out:
        raise GuestImageError("the import check in the guest tree printed no result")
    return sorted(installed)


def _lock(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = open(path, "a")
    fcntl.flock(handle, fcntl.LOCK_EX)
    return handle


def _artifacts(entry: Path, manifest: GuestManifest) -> GuestArtifacts:
    return GuestArtifacts(kernel=entry / "bzImage", initrd=entry / "initramfs.cpio.lz4",
                          manifest=entry / "manifest.json",
                          kernel_release=manifest.kernel_release,
                          kernel_package_version=manifest.kernel_package.version)


def load_cached(entry: Path) -> GuestArtifacts | None:
    """The artefacts in a cache entry, or None if it is incomplete."""
    manifest_path = entry / "manifest.json"
    if not manifest_path.is_file():
        return None
    try:
        manifest = GuestManifest.unpack(manifest_path.read_bytes())
    except GuestImageError:
        return None
    arts = _artifacts(entry, manifest)
    for path, digest in ((arts.kernel, manifest.bzimage), (arts.initrd, manifest.initramfs)):
        if not path.is_file() or path.stat().st_size != digest.size:
            return None
    return arts


def build_guest(inputs: BuildInputs, out_dir: Path, debs_dir: Path,
                progress: Callable[[str], None]) -> GuestManifest:
    """Build the kernel and initramfs from inputs into out_dir (which must be empty)."""
    debs = download_packages([inputs.kernel_package, *inputs.packages], debs_dir, progress)
    kernel, release = extract_kernel(debs[inputs.kernel_package.name], out_dir)
    with tempfile.TemporaryDirectory(prefix=".staging-", dir=out_dir) as tmp:
        staging = Path(tmp) / "root"
        staging.mkdir()
        installed = build_initramfs_tree(staging, debs, ROOT_PACKAGES, inputs.agent_files,
                                         inputs.init_script, progress)
        normalize_tree(staging)
        raw = Path(tmp) / "initramfs.cpio"
        write_cpio(staging, raw)
        progress(f"writing initramfs ({raw.stat().st_size / 1e6:.0f} MB)")
        compress_lz4(raw, out_dir / "initramfs.cpio.lz4")
    by_name = {p.name: p for p in inputs.packages}
    manifest = GuestManifest(
        recipe_version=inputs.recipe_version,
        cache_key=inputs.cache_key(),
        kernel_package=inputs.kernel_package,
        kernel_release=release,
        packages=[by_name[n] for n in installed],
        bzimage=FileDigest.of(kernel),
        initramfs=FileDigest.of(out_dir / "initramfs.cpio.lz4"),
        agent_sha256=inputs.agent_digest(),
    )
    (out_dir / "manifest.json").write_bytes(manifest.pack())
    return manifest


#: Files whose change may change apt's candidate versions.
APT_STATE_PATHS = (
    "/var/lib/apt/lists",
    "/etc/apt/sources.list",
    "/etc/apt/sources.list.d",
    "/etc/apt/preferences",
    "/etc/apt/preferences.d",
    "/etc/apt/apt.conf.d",
    "/var/lib/dpkg/status",
)


def apt_state_fingerprint(roots: Iterable[str] = APT_STATE_PATHS) -> str:
    """A digest of the names, sizes and mtimes of apt's lists and settings.

    apt-cache takes about a second per call; as long as this fingerprint is
    unchanged, the versions it resolved last time are still its answer.
    """
    digest = hashlib.sha256()
    digest.update(json.dumps([RECIPE_VERSION, KERNEL_META_PACKAGE, ROOT_PACKAGES,
                              sorted(SONAME_PACKAGES.items())]).encode())
    for root in roots:
        base = Path(root)
        entries = [base] + (sorted(base.rglob("*")) if base.is_dir() else [])
        for path in entries:
            try:
                st = path.stat()
            except OSError:
                digest.update(f"{path}\0missing\n".encode())
                continue
            digest.update(f"{path}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()


@dataclass
class ResolvedVersions:
    """``resolved.json``: the package versions apt chose, and for which apt state."""

    fingerprint: str
    kernel_package: PackageRef
    packages: list[PackageRef]

    def pack(self) -> bytes:
        return (json.dumps(asdict(self), indent=2, sort_keys=True) + "\n").encode()

    @classmethod
    def unpack(cls, raw: bytes) -> "ResolvedVersions":
        data = json.loads(raw)
        return cls(str(data["fingerprint"]), PackageRef(**data["kernel_package"]),
                   [PackageRef(**p) for p in data["packages"]])


def resolve_cached(base: Path, refresh: bool = False) -> tuple[PackageRef, list[PackageRef]]:
    """:func:`resolve_inputs`, remembered in ``base/resolved.json`` while apt's state holds."""
    memo = base / "resolved.json"
    fingerprint = apt_state_fingerprint()
    if not refresh and memo.is_file():
        try:
            known = ResolvedVersions.unpack(memo.read_bytes())
        except (ValueError, KeyError, TypeError):
            known = None
        if known is not None and known.fingerprint == fingerprint:
            return known.kernel_package, known.packages
    try:
        kernel, packages = resolve_inputs()
    except GuestImageError:
        _apt_update()
        fingerprint = apt_state_fingerprint()
        kernel, packages = resolve_inputs()
    base.mkdir(parents=True, exist_ok=True)
    tmp = memo.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_bytes(ResolvedVersions(fingerprint, kernel, packages).pack())
    os.replace(tmp, memo)
    return kernel, packages


def _drop_old_entries(base: Path, current: Path, keep: int = 2) -> None:
    """Keep the current cache entry and the ``keep`` newest others."""
    entries = [p for p in base.iterdir()
               if p.is_dir() and p != current and (p / "manifest.json").is_file()]
    entries.sort(key=lambda p: (p / "manifest.json").stat().st_mtime, reverse=True)
    for old in entries[keep:]:
        shutil.rmtree(old, ignore_errors=True)


def ensure_guest(force: bool = False, progress: Callable[[str], None] | None = None,
                 cache: Path | None = None) -> GuestArtifacts:
    """Return the guest kernel and initramfs, building them first if needed.

    The result is cached under ``<cache>/guest/<key>``; a cached entry is
    returned at once.  ``force`` rebuilds it.  ``progress`` receives one line
    per long step.
    """
    report = progress or (lambda _msg: None)
    check_tools()
    base = (cache if cache is not None else paths.cache_dir()) / "guest"
    kernel, packages = resolve_cached(base, refresh=force)
    inputs = BuildInputs(packages=packages, kernel_package=kernel,
                         agent_files=find_agent_sources())
    entry = base / inputs.cache_key()
    if not force:
        cached = load_cached(entry)
        if cached is not None:
            return cached
    with _lock(base / ".lock"):
        if not force:
            cached = load_cached(entry)
            if cached is not None:
                return cached
        _drop_leftovers(base)
        out = Path(tempfile.mkdtemp(prefix=".build-", dir=base))
        try:
            try:
                manifest = build_guest(inputs, out, base / "debs", report)
            except PackageDownloadError:
                report("package download failed; updating the package lists")
                _apt_update()
                kernel, packages = resolve_cached(base, refresh=True)
                inputs = BuildInputs(packages=packages, kernel_package=kernel,
                                     agent_files=inputs.agent_files)
                entry = base / inputs.cache_key()
                shutil.rmtree(out)
                out.mkdir()
                manifest = build_guest(inputs, out, base / "debs", report)
            os.chmod(out, 0o755)
            if entry.exists():
                shutil.rmtree(entry)
            os.replace(out, entry)
        except BaseException:
            shutil.rmtree(out, ignore_errors=True)
            raise
        _drop_stale_debs(base / "debs", [inputs.kernel_package, *inputs.packages])
        _drop_old_entries(base, entry)
    return _artifacts(entry, manifest)


def _drop_leftovers(base: Path) -> None:
    """Remove what an interrupted build left behind (call with the lock held)."""
    for leftover in [*base.glob(".build-*"), *base.glob("debs/.download-*")]:
        shutil.rmtree(leftover, ignore_errors=True)


def _drop_stale_debs(debs_dir: Path, keep: Iterable[PackageRef]) -> None:
    """Remove downloaded versions of our packages other than the current ones."""
    keep = list(keep)
    current = {r.deb_name for r in keep}
    names = {r.name for r in keep}
    for deb in debs_dir.glob("*.deb"):
        if deb.name not in current and deb.name.split("_", 1)[0] in names:
            deb.unlink()
    for deb in debs_dir.glob("linux-image-*.deb"):
        if deb.name not in current:
            deb.unlink()


def main(argv: list[str] | None = None) -> int:
    """``qemu-kd guest build [--force]``: print where the artefacts are."""
    parser = argparse.ArgumentParser(prog="qemu-kd guest build",
                                     description="Build the guest kernel and initramfs.")
    parser.add_argument("--force", action="store_true", help="rebuild even if cached")
    parser.add_argument("--cache", type=Path, default=None, help="cache directory")
    args = parser.parse_args(argv)
    start = time.monotonic()
    try:
        arts = ensure_guest(force=args.force, cache=args.cache,
                            progress=lambda msg: print(f"guest build: {msg}", file=sys.stderr))
    except GuestImageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    print(f"kernel    {arts.kernel} ({arts.kernel_release}, {arts.kernel_package_version})")
    print(f"initramfs {arts.initrd} ({arts.initrd.stat().st_size} bytes)")
    print(f"manifest  {arts.manifest}")
    print(f"took {time.monotonic() - start:.1f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
