"""What goes into the default guest: packages, init script, kernel command line, pruning rules.

Bump :data:`RECIPE_VERSION` whenever a change here changes the image.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import PurePosixPath

from qemu_kd.common.errors import GuestImageError
from qemu_kd.formats.controlpolicy import DEFAULT as DEFAULT_CONTROL_POLICY, POLICY_PATH as CONTROL_POLICY_PATH

#: Bump whenever the recipe below changes what ends up in the image.
RECIPE_VERSION = 6

#: Every file in the initramfs gets this mtime (2023-01-01T00:00:00Z).
SOURCE_DATE_EPOCH = 1672531200

ARCH = "amd64"
MULTIARCH = "x86_64-linux-gnu"
PYTHON = "python3.11"

#: The metapackage whose dependency names the real kernel package.
KERNEL_META_PACKAGE = "linux-image-cloud-amd64"
KERNEL_PACKAGE_RE = re.compile(r"^linux-image-(\d[^\s,]*-cloud-amd64)$")

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
    "import guest_agent.libcrypto as lc; lc.Libcrypto().generate().close()\n"
    "for m in pkgutil.walk_packages(guest_agent.__path__, 'guest_agent.'):\n"
    "    m.name.endswith('__main__') or importlib.import_module(m.name)\n"
    "print('import-check-ok')\n"
)

#: The kernel command line for the guest, the same on every host.  Booting
#: without firmware, the guest also needs ``tsc_early_khz=<kHz>``: the platform
#: appends it at launch (unmeasured, from its own processor) and a plain run
#: appends it itself.  Each option is explained in docs/guest-image.md.
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

# The agent decides whether the console gets a shell: only when the platform
# reports a DEBUG policy, or no platform protects the guest.  PID 1 just waits.
while true; do
    sleep 3600
done
"""

#: Guest commands (mode 0755): small wrappers around guest_agent modules.
GUEST_COMMANDS = {
    "usr/bin/kd-hypercall": '#!/bin/sh\nexec python3 -I -m guest_agent.hypercall "$@"\n',
    "usr/bin/kd-report": '#!/bin/sh\nexec python3 -I -m guest_agent.attest_api report "$@"\n',
    "usr/bin/kd-derive-key": '#!/bin/sh\nexec python3 -I -m guest_agent.attest_api derive-key "$@"\n',
}

#: Minimal account files so ``id``, ``whoami`` and ``~`` work.
ETC_FILES = {
    "etc/passwd": "root:x:0:0:root:/root:/bin/sh\n",
    "etc/group": "root:x:0:\n",
    "etc/hostname": f"{HOSTNAME}\n",
    # The guest's control policy (measured with the image): what host-requested
    # VMCS/EPT changes its agent accepts (docs/protocol.md).
    CONTROL_POLICY_PATH: DEFAULT_CONTROL_POLICY.pack().decode(),
}

# --- pruning -------------------------------------------------------------

STDLIB_DIR = f"usr/lib/{PYTHON}"
DYNLOAD_DIR = f"{STDLIB_DIR}/lib-dynload"

#: Whole directories dropped from the staging tree.
PRUNED_DIRS = (
    "usr/share",
    "usr/include",
    "usr/lib/binfmt.d",
    f"usr/lib/{MULTIARCH}/gconv",
    f"usr/lib/{MULTIARCH}/engines-3",
    f"usr/lib/{MULTIARCH}/audit",
    f"usr/lib/{MULTIARCH}/pkgconfig",
    *(f"{STDLIB_DIR}/{name}" for name in (
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
    if parent == STDLIB_DIR and path.name in PRUNED_STDLIB_FILES:
        return True
    if parent == DYNLOAD_DIR and path.name.split(".", 1)[0] in PRUNED_EXTENSIONS:
        return True
    return False


def kernel_cmdline(tsc_khz: int | None = None, extra: Iterable[str] = ()) -> str:
    """:data:`DEFAULT_CMDLINE` plus any extra options (and ``tsc_early_khz`` if given).

    Lines to be measured leave ``tsc_khz`` out, so the measurement does not
    depend on the host (docs/formats.md §11.7).
    """
    parts = [DEFAULT_CMDLINE]
    if tsc_khz is not None:
        if tsc_khz <= 0:
            raise GuestImageError(f"TSC frequency must be positive, not {tsc_khz} kHz")
        parts.append(f"tsc_early_khz={int(tsc_khz)}")
    parts.extend(extra)
    return " ".join(parts)
