"""What a fresh platform process imports on its way through alloc, load, verify-ept and measure-kd.

``np.unique`` imports ``numpy.ma`` on its first call (10-30 ms in a fresh process); the
platform finds distinct values and repeats by one sort instead (qemu_kd.common.arrays).
"""

from __future__ import annotations

import subprocess
import sys

from synthetic import SYNTH_CMDLINE, SYNTH_INITRD, SYNTH_KERNEL

from qemu_kd import tenant
from qemu_kd.formats.layout import HostLayout, pages_needed
from qemu_kd.formats.policy import Policy

MiB = 1 << 20
MEM = 64 * MiB
PLATFORM_MEMORY = 80 * MiB

# Run in a fresh process: the platform's side of loading, verifying and measuring a bundle.
HOST_STEPS = """
import sys
from pathlib import Path
from qemu_kd.formats.bundle import Bundle
from qemu_kd.formats.layout import pages_needed
from qemu_kd.platform.daemon import load_identity
from qemu_kd.platform.hardware import Platform

pstate, workdir, bundle_path = (Path(a) for a in sys.argv[1:4])
_root, identity = load_identity(pstate)
with Platform(identity, {memory}, workdir / "platform") as platform:
    platform.platform_info()
    alloc = platform.alloc(npages=pages_needed({mem}))
    bundle = Bundle.unpack(bundle_path.read_bytes())
    m = bundle.manifest
    assert m.keyid == alloc.keyid
    platform.write_phys_pages([p.hpa for p in bundle.pages], b"".join(p.ciphertext for p in bundle.pages))
    platform.create_kd(m.keyid, bundle.wrapped_key, m.policy, m.host_data)
    platform.add_pages(m.keyid, [(p.hpa, p.gpa, p.page_type, p.perms, p.host_verifiable)
                                 for p in bundle.pages])
    platform.add_zero_pages(m.keyid, [(z.hpa, z.gpa, z.perms) for z in bundle.zero_pages])
    assert platform.verify_ept(m.keyid, alloc.hpas).ok
    assert platform.measure_kd(m.keyid) == m.measurement
    print("numpy.ma" in sys.modules)
"""


def test_alloc_load_verify_and_measure_do_not_import_numpy_ma(tmp_path):
    from qemu_kd.platform.daemon import load_identity
    from qemu_kd.platform.hardware import Platform

    pstate = tmp_path / "pstate"
    root, identity = load_identity(pstate)
    # The fresh process's platform hands out the same KeyID and pages as this one.
    with Platform(identity, PLATFORM_MEMORY, tmp_path / "here") as platform:
        alloc = platform.alloc(npages=pages_needed(MEM))
        layout = HostLayout(alloc.keyid, MEM, alloc.hpas, b"", platform.platform_info().chain_pem)
    bundle, _ = tenant.seal(SYNTH_KERNEL, SYNTH_INITRD, SYNTH_CMDLINE, MEM, Policy.make(), layout,
                            root.certificate)
    (tmp_path / "there").mkdir()
    bundle_path = tmp_path / "guest.kd"
    bundle_path.write_bytes(bundle.pack())
    code = HOST_STEPS.format(memory=PLATFORM_MEMORY, mem=MEM)
    out = subprocess.run([sys.executable, "-c", code, str(pstate), str(tmp_path / "there"), str(bundle_path)],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"
