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

import fcntl
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from qemu_kd.common import paths
from qemu_kd.common.errors import GuestImageError
from qemu_kd.guest.recipe import DEFAULT_CMDLINE, ETC_FILES, INIT_SCRIPT, RECIPE_VERSION, ROOT_PACKAGES, SOURCE_DATE_EPOCH
from qemu_kd.guest.packages import PackageDownloadError, PackageRef, apt_update, check_tools, download_packages, drop_stale_debs, resolve_cached
from qemu_kd.guest.rootfs import build_initramfs_tree, find_agent_sources
from qemu_kd.guest.initramfs import compress_lz4, extract_kernel, normalize_tree, write_cpio


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


# --- ELF -----------------------------------------------------------------



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
                apt_update()
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
        drop_stale_debs(base / "debs", [inputs.kernel_package, *inputs.packages])
        _drop_old_entries(base, entry)
    return _artifacts(entry, manifest)


def _drop_leftovers(base: Path) -> None:
    """Remove what an interrupted build left behind (call with the lock held)."""
    for leftover in [*base.glob(".build-*"), *base.glob("debs/.download-*")]:
        shutil.rmtree(leftover, ignore_errors=True)
