"""Writing the initramfs reproducibly: fixed mtimes, sorted entries, cpio newc, lz4 legacy.

Also extracts the bzImage and its release from the kernel package.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tarfile
from pathlib import Path

from qemu_kd.common.errors import GuestImageError
from qemu_kd.guest.recipe import SOURCE_DATE_EPOCH
from qemu_kd.guest.packages import run_tool


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
    run_tool(["lz4", "-l", "-9", "-f", "-q", str(src), str(dest)],
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
