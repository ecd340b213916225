"""Debian packages for the guest: resolving pinned names to versions, and downloading them.

Versions are resolved through ``apt-cache`` and memoised against the state of
apt's lists; packages come from ``apt-get download``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

from qemu_kd.common.errors import GuestImageError
from qemu_kd.guest.recipe import ARCH, KERNEL_META_PACKAGE, KERNEL_PACKAGE_RE, RECIPE_VERSION, ROOT_PACKAGES, SONAME_PACKAGES


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


def run_tool(argv: list[str], *, what: str, hint: str, cwd: Path | None = None,
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
        if KERNEL_PACKAGE_RE.match(name):
            return name
    raise GuestImageError(f"{KERNEL_META_PACKAGE} does not depend on a cloud kernel package "
                          f"(Depends: {depends})", "run apt-get update")


def resolve_versions(names: Iterable[str]) -> dict[str, PackageRef]:
    """Candidate versions of packages, as apt would download them."""
    names = list(dict.fromkeys(names))
    argv = ["apt-cache", "show", "--no-all-versions", *(f"{n}:{ARCH}" for n in names)]
    proc = subprocess.run(argv, capture_output=True, env=apt_env())
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
    proc = subprocess.run(argv, capture_output=True, env=apt_env())
    meta = parse_apt_records(proc.stdout.decode(errors="replace")).get(KERNEL_META_PACKAGE)
    if not meta or "Depends" not in meta:
        raise GuestImageError(f"apt knows no {KERNEL_META_PACKAGE} package",
                              "run apt-get update (the package lists are missing or stale)")
    kernel_name = kernel_package_from_depends(meta["Depends"])
    wanted = [kernel_name, *ROOT_PACKAGES, *sorted(set(SONAME_PACKAGES.values()))]
    refs = resolve_versions(wanted)
    kernel = refs.pop(kernel_name)
    return kernel, list(refs.values())


def apt_env() -> dict[str, str]:
    env = dict(os.environ)
    env["LC_ALL"] = "C"
    return env


def apt_update() -> None:
    if os.geteuid() != 0:
        raise GuestImageError("the package lists are stale and updating them needs root",
                              "run apt-get update as root, then build again")
    run_tool(["apt-get", "update", "-q"], what="apt-get update failed",
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
            run_tool(argv, cwd=Path(tmp), env=apt_env(), what="apt-get download failed",
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
        apt_update()
        fingerprint = apt_state_fingerprint()
        kernel, packages = resolve_inputs()
    base.mkdir(parents=True, exist_ok=True)
    tmp = memo.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_bytes(ResolvedVersions(fingerprint, kernel, packages).pack())
    os.replace(tmp, memo)
    return kernel, packages


def drop_stale_debs(debs_dir: Path, keep: Iterable[PackageRef]) -> None:
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
