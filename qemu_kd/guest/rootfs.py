"""The guest's root tree: unpacked packages, pruned, with only the shared libraries it links.

Libraries are found by reading the ``DT_NEEDED`` entries of every ELF file
and mapping each soname to its package (:data:`~qemu_kd.guest.recipe.SONAME_PACKAGES`).
Bytecode is compiled by the guest's own interpreter in a chroot of the tree,
which also proves that ``cryptography`` and the agent import.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import stat
import struct
import subprocess
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

from qemu_kd.common.errors import GuestImageError
from qemu_kd.guest.recipe import ALWAYS_KEPT_SONAMES, DLOPENED_FILES, ETC_FILES, GUEST_COMMANDS, IMPORT_CHECK, MULTIARCH, PYTHON, SONAME_PACKAGES, SOURCE_DATE_EPOCH, STDLIB_DIR, is_pruned
from qemu_kd.guest.packages import run_tool


# ELF program-header and dynamic-section tags read by elf_needed
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


# --- staging -------------------------------------------------------------

USRMERGE = {"bin": "usr/bin", "sbin": "usr/sbin", "lib": "usr/lib", "lib64": "usr/lib64"}


def usrmerged(relpath: str) -> str:
    """Map /bin, /sbin, /lib, /lib64 into /usr, as a merged-/usr system has them."""
    head, sep, tail = relpath.partition("/")
    if head in USRMERGE:
        return USRMERGE[head] + (sep + tail if tail else "")
    return relpath


def extract_deb(deb: Path, dest: Path) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    run_tool(["dpkg-deb", "-x", str(deb), str(dest)], what=f"dpkg-deb could not unpack {deb.name}",
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
    out = run_tool([str(busybox), "--list-full"], what="cannot list the busybox applets",
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
    trees = [f"/{STDLIB_DIR}", "/usr/lib/python3/dist-packages"]
    run_in_guest_tree(staging, [f"/usr/bin/{PYTHON}", "-m", "compileall", "-q", "-b", "-f",
                                "--invalidation-mode", "unchecked-hash", *trees],
                      what="compiling python bytecode in the guest tree failed")
    for tree in trees:
        for path in sorted((staging / tree.lstrip("/")).rglob("*.py")):
            if not path.with_suffix(".pyc").is_file():
                raise GuestImageError(f"no bytecode was written for {path.relative_to(staging)}")
            path.unlink()


# --- the build -----------------------------------------------------------

def build_initramfs_tree(staging: Path, debs: Mapping[str, Path], root_names: Iterable[str],
                         agent_files: Mapping[str, bytes], init_script: str,
                         progress: Callable[[str], None]) -> list[str]:
    """Fill the staging tree; returns the names of the packages installed."""
    for top, target in USRMERGE.items():
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
    for rel, text in GUEST_COMMANDS.items():
        (staging / rel).write_text(text)
        os.chmod(staging / rel, 0o755)
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
