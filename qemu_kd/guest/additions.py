"""Users' own files in the guest image (``qemu-kd guest build --add/--overlay``).

A customised image is the default guest's kernel and initramfs with one more
archive appended to the initramfs: a reproducible newc cpio of the user's
files, compressed like the default one (``lz4 -l``).  The kernel unpacks the
archives in order, so an added file replaces a default one of the same path.
Because the appended archive is part of the initrd, it is part of the launch
measurement: the same additions give the same bytes and the same measurement.

Every entry of the appended archive is owned by 0:0, dated
:data:`~qemu_kd.guest.recipe.SOURCE_DATE_EPOCH`, and has mode 0755 (directories
and files with any execute bit) or 0644; symlinks are kept as symlinks.  The
composed initrd is checked before it is used: it must decompress and parse as a
sequence of cpio archives, and the last one must hold exactly the added files.

Built images are cached in ``cache_dir()/guest/custom/<key>``, the key hashing
the default image and every added path, mode and content.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from qemu_kd.common import paths
from qemu_kd.common.errors import ConfigError, GuestImageError
from qemu_kd.guest.cache import FileDigest, GuestArtifacts, ensure_guest
from qemu_kd.guest.initramfs import compress_lz4, normalize_tree, write_cpio
from qemu_kd.guest.packages import run_tool

#: Custom images kept in the cache besides the one just used.
KEEP_CUSTOM = 4


@dataclass(frozen=True)
class GuestFile:
    """One ``--add SRC:DEST``: a host file (or directory) and its absolute path in the guest."""

    source: Path
    dest: str

    @classmethod
    def parse(cls, text: str) -> "GuestFile":
        """``SRC:DEST``; a DEST ending in ``/`` receives SRC under its own name."""
        src, sep, dest = text.rpartition(":")
        if not sep or not src or not dest:
            raise ConfigError(f"--add {text!r} is not SRC:DEST",
                              "e.g. --add ./hello:/usr/local/bin/hello")
        if dest.endswith("/"):
            dest += Path(src).name
        return cls(Path(src), dest)


@dataclass(frozen=True)
class Entry:
    """One path of the appended archive."""

    kind: str          # "file", "dir" or "symlink"
    mode: int
    data: bytes = b""  # the contents, or the symlink's target


@dataclass
class GuestAdditions:
    """What to add to the default image: ``--overlay`` trees first (in order), then ``--add`` files.

    A later source replaces an earlier one at the same guest path.
    """

    files: list[GuestFile] = field(default_factory=list)
    overlays: list[Path] = field(default_factory=list)

    @classmethod
    def from_options(cls, add: list[str] | None, overlay: list[str] | None) -> "GuestAdditions":
        return cls([GuestFile.parse(a) for a in add or []], [Path(o) for o in overlay or []])

    def __bool__(self) -> bool:
        return bool(self.files or self.overlays)

    def entries(self) -> dict[str, Entry]:
        """Guest path (relative, no leading slash) -> entry, with every parent directory."""
        out: dict[str, Entry] = {}
        for tree in self.overlays:
            if not tree.is_dir():
                raise ConfigError(f"--overlay {tree} is not a directory",
                                  "give a directory laid out like the guest's root")
            _add_tree(out, tree, "")
        for item in self.files:
            rel = guest_path(item.dest)
            if item.source.is_dir() and not item.source.is_symlink():
                _add_tree(out, item.source, rel)
            else:
                _add_parents(out, rel)
                out[rel] = _entry(item.source)
        return dict(sorted(out.items()))

    def digest(self, entries: dict[str, Entry] | None = None) -> str:
        entries = self.entries() if entries is None else entries
        h = hashlib.sha256()
        for rel, e in entries.items():
            h.update(f"{rel}\0{e.kind}\0{e.mode:o}\0{len(e.data)}\0".encode())
            h.update(e.data)
        return h.hexdigest()


def guest_path(dest: str) -> str:
    """An absolute guest path, checked, without its leading slash."""
    path = PurePosixPath(dest)
    if not path.is_absolute() or ".." in path.parts or str(path) == "/":
        raise ConfigError(f"guest path {dest!r} is not an absolute file path",
                          "give DEST as an absolute path in the guest, e.g. /usr/local/bin/tool")
    return str(path).lstrip("/")


def _mode(st_mode: int) -> int:
    return 0o755 if st_mode & 0o111 else 0o644


def _entry(source: Path) -> Entry:
    try:
        st = source.lstat()
        if stat.S_ISLNK(st.st_mode):
            return Entry("symlink", 0o777, os.readlink(source).encode())
        if stat.S_ISDIR(st.st_mode):
            return Entry("dir", 0o755)
        if not stat.S_ISREG(st.st_mode):
            raise ConfigError(f"{source} is neither a file, a directory nor a symlink",
                              "add regular files only")
        return Entry("file", _mode(st.st_mode), source.read_bytes())
    except FileNotFoundError:
        raise ConfigError(f"{source} does not exist", "check the path given to --add or --overlay") from None
    except OSError as exc:
        raise ConfigError(f"cannot read {source}: {exc.strerror}") from None


def _add_parents(out: dict[str, Entry], rel: str) -> None:
    parent = PurePosixPath(rel).parent
    while str(parent) != ".":
        out.setdefault(str(parent), Entry("dir", 0o755))
        parent = parent.parent


def _add_tree(out: dict[str, Entry], root: Path, prefix: str) -> None:
    if prefix:
        _add_parents(out, prefix)
        out[prefix] = Entry("dir", 0o755)
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        rel_dir = Path(dirpath).relative_to(root)
        for name in sorted(dirnames + filenames):
            rel = str(PurePosixPath(prefix or ".", rel_dir.as_posix(), name))
            out[rel] = _entry(Path(dirpath) / name)


# --- the archive -----------------------------------------------------------

def stage(entries: dict[str, Entry], staging: Path) -> None:
    """Write the entries below staging with their modes and the fixed mtime."""
    for rel, e in entries.items():
        target = staging / rel
        if e.kind == "dir":
            target.mkdir(parents=True, exist_ok=True)
        elif e.kind == "symlink":
            target.parent.mkdir(parents=True, exist_ok=True)
            os.symlink(e.data.decode(), target)
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(e.data)
            os.chmod(target, e.mode)
    normalize_tree(staging)


def compose_initrd(base_initrd: Path, entries: dict[str, Entry], out: Path) -> None:
    """Write ``out``: the base initrd followed by an lz4 cpio archive of the entries."""
    with tempfile.TemporaryDirectory(prefix=".overlay-", dir=out.parent) as tmp:
        staging = Path(tmp) / "root"
        staging.mkdir()
        stage(entries, staging)
        raw = Path(tmp) / "overlay.cpio"
        write_cpio(staging, raw)
        packed = Path(tmp) / "overlay.cpio.lz4"
        compress_lz4(raw, packed)
        with open(out, "wb") as f:
            with open(base_initrd, "rb") as base:
                shutil.copyfileobj(base, f)
            with open(packed, "rb") as overlay:
                shutil.copyfileobj(overlay, f)


@dataclass(frozen=True)
class CpioMember:
    name: str
    mode: int
    data: bytes


def read_cpio_archives(stream: bytes) -> list[list[CpioMember]]:
    """Parse concatenated newc archives as the kernel does (zero padding between them).

    Raises :class:`GuestImageError` on anything the kernel would reject.
    """
    archives: list[list[CpioMember]] = []
    pos = 0
    current: list[CpioMember] | None = None
    while pos < len(stream):
        if current is None:
            while pos < len(stream) and stream[pos] == 0:
                pos += 1
            if pos >= len(stream):
                break
            current = []
        if pos % 4:
            raise GuestImageError(f"cpio header at offset {pos} is not 4-byte aligned")
        header = stream[pos:pos + 110]
        if len(header) < 110 or header[:6] not in (b"070701", b"070702"):
            raise GuestImageError(f"no cpio header at offset {pos} of the unpacked initrd")
        try:
            fields = [int(header[6 + 8 * i:14 + 8 * i], 16) for i in range(13)]
        except ValueError:
            raise GuestImageError(f"cpio header at offset {pos} is not hexadecimal") from None
        mode, filesize, namesize = fields[1], fields[6], fields[11]
        name_end = pos + 110 + namesize
        name = stream[pos + 110:name_end - 1].decode(errors="replace")
        data_start = (name_end + 3) & ~3
        data_end = data_start + filesize
        if data_end > len(stream):
            raise GuestImageError(f"cpio member {name!r} runs past the end of the unpacked initrd")
        pos = (data_end + 3) & ~3
        if name == "TRAILER!!!":
            archives.append(current)
            current = None
            continue
        current.append(CpioMember(name, mode, stream[data_start:data_end]))
    if current is not None:
        raise GuestImageError("the last cpio archive of the initrd has no trailer")
    return archives


def check_composed(initrd: Path, entries: dict[str, Entry]) -> None:
    """The composed initrd unpacks, and its last archive holds exactly the entries."""
    stream = run_tool(["lz4", "-d", "-c", str(initrd)], what=f"{initrd.name} does not decompress",
                      hint="run: apt-get install lz4")
    archives = read_cpio_archives(stream)
    if len(archives) < 2:
        raise GuestImageError("the customised initrd holds no added archive")
    found = {m.name: m for m in archives[-1]}
    for rel, e in entries.items():
        member = found.pop(rel, None)
        kind = {"dir": stat.S_IFDIR, "symlink": stat.S_IFLNK, "file": stat.S_IFREG}[e.kind]
        if member is None or stat.S_IFMT(member.mode) != kind or (
                e.kind != "dir" and member.data != e.data):
            raise GuestImageError(f"the added archive lacks /{rel} or holds it wrong")
    if found:
        raise GuestImageError(f"the added archive holds unexpected /{sorted(found)[0]}")


# --- the cache -------------------------------------------------------------

def _write_manifest(path: Path, base: GuestArtifacts, additions_sha256: str,
                    entries: dict[str, Entry], initrd: Path) -> None:
    record = {
        "format": 1,
        "base_manifest": json.loads(base.manifest.read_bytes()),
        "additions_sha256": additions_sha256,
        "added": {"/" + rel: {"kind": e.kind, "mode": f"{e.mode:04o}",
                              "sha256": hashlib.sha256(e.data).hexdigest()}
                  for rel, e in entries.items()},
        "initramfs": FileDigest.of(initrd).__dict__,
    }
    path.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")


def ensure_custom_guest(additions: GuestAdditions, *, force: bool = False,
                        progress: Callable[[str], None] | None = None,
                        cache: Path | None = None) -> GuestArtifacts:
    """The default guest with ``additions`` appended to its initramfs (cached).

    Without additions this is :func:`~qemu_kd.guest.cache.ensure_guest`.  The
    result's kernel is the default guest's; its initrd holds one more archive.
    """
    base = ensure_guest(force=force, progress=progress, cache=cache)
    if not additions:
        return base
    report = progress or (lambda _msg: None)
    entries = additions.entries()
    digest = additions.digest(entries)
    base_key = hashlib.sha256(base.manifest.read_bytes()).hexdigest()[:16]
    root = (cache if cache is not None else paths.cache_dir()) / "guest" / "custom"
    entry = root / f"{base_key}-{digest[:16]}"
    initrd = entry / "initramfs.cpio.lz4"
    arts = GuestArtifacts(kernel=base.kernel, initrd=initrd, manifest=entry / "manifest.json",
                          kernel_release=base.kernel_release,
                          kernel_package_version=base.kernel_package_version)
    if not force and arts.manifest.is_file() and initrd.is_file():
        os.utime(arts.manifest)
        return arts
    report(f"adding {sum(e.kind != 'dir' for e in entries.values())} files to the initramfs")
    root.mkdir(parents=True, exist_ok=True)
    out = Path(tempfile.mkdtemp(prefix=".build-", dir=root))
    try:
        compose_initrd(base.initrd, entries, out / initrd.name)
        check_composed(out / initrd.name, entries)
        _write_manifest(out / "manifest.json", base, digest, entries, out / initrd.name)
        os.chmod(out, 0o755)
        if entry.exists():
            shutil.rmtree(entry)
        os.replace(out, entry)
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)
        raise
    _drop_old(root, entry)
    return arts


def _drop_old(root: Path, current: Path) -> None:
    others = [p for p in root.iterdir() if p.is_dir() and p != current and not p.name.startswith(".")]
    others.sort(key=lambda p: (p / "manifest.json").stat().st_mtime
                if (p / "manifest.json").exists() else 0, reverse=True)
    for old in others[KEEP_CUSTOM:]:
        shutil.rmtree(old, ignore_errors=True)


def export_guest(arts: GuestArtifacts, out_dir: Path) -> GuestArtifacts:
    """Copy a guest's kernel, initrd and manifest into ``out_dir`` (``guest build --out``)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    copies = []
    for src, name in ((arts.kernel, "bzImage"), (arts.initrd, "initramfs.cpio.lz4"),
                      (arts.manifest, "manifest.json")):
        dest = out_dir / name
        tmp = out_dir / f".{name}.tmp"
        shutil.copyfile(src, tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, dest)
        copies.append(dest)
    return GuestArtifacts(kernel=copies[0], initrd=copies[1], manifest=copies[2],
                          kernel_release=arts.kernel_release,
                          kernel_package_version=arts.kernel_package_version)
