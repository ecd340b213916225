import dataclasses
import struct

import pytest
from hypothesis import given, settings, strategies as st

from qemu_kd.formats.errors import (
    FieldValueError,
    MagicError,
    OversizedError,
    ReservedBitsError,
    TruncatedError,
    UnknownFieldError,
    VersionError,
)
from qemu_kd.formats.policy import Policy
from qemu_kd.formats.vcpu import VcpuState
from qemu_kd.formats.vmcs import (
    HOST_CHOSEN_CONTROLS,
    VMCS_FIELDS,
    VMCS_REVISION_ID,
    Vmcs,
    exposed_register_mask,
    exposed_registers,
    field_class,
    measured_fields,
    vmcs_field,
)

u64 = st.integers(min_value=0, max_value=(1 << 64) - 1)
u16 = st.integers(min_value=0, max_value=0xFFFF)


@st.composite
def vcpus(draw):
    values = {}
    for f in dataclasses.fields(VcpuState):
        width = vmcs_field(next(x.encoding for x in VMCS_FIELDS if x.in_guest and x.name == f.name)).width
        values[f.name] = draw(st.integers(min_value=0, max_value=(1 << width) - 1))
    return VcpuState(**values)


@st.composite
def vmcss(draw):
    return Vmcs(
        guest=draw(vcpus()), ept_pointer=draw(u64), save_area_hpa=draw(u64),
        exposed_register_mask=draw(st.integers(min_value=0, max_value=0xFFFF)),
        host_forced_exit=draw(st.booleans()), policy=Policy.make(draw(st.booleans())),
        vmcs_link_pointer=draw(u64), host_cr3=draw(u64), host_rip=draw(u64),
        exit_reason=draw(st.integers(min_value=0, max_value=(1 << 32) - 1)),
        exit_qualification=draw(u64))


def sample() -> Vmcs:
    guest = VcpuState(rip=0x100200, rsi=0x7000, rsp=0x8FF0, cr0=0x80000011, cr3=0x1000,
                      cr4=0x20, efer=0x500, cs=0x10, ds=0x18, r15=0xDEADBEEF)
    return Vmcs(guest=guest, ept_pointer=0x5000 | 0x1E, save_area_hpa=0x9000,
                exposed_register_mask=exposed_register_mask(["rax", "rcx"]),
                host_forced_exit=True, policy=Policy.make(debug=False))


@settings(max_examples=50)
@given(vmcss())
def test_round_trip(v):
    page = v.pack()
    assert len(page) == 4096
    assert Vmcs.unpack(page) == v


def test_every_vcpu_register_has_a_guest_field():
    guest_names = {f.name for f in VMCS_FIELDS if f.in_guest}
    assert guest_names == {f.name for f in dataclasses.fields(VcpuState)}
    assert all(f.field_class == "guest" for f in VMCS_FIELDS if f.in_guest)


def test_intel_encodings_and_classes():
    assert field_class(0x201A) == "control"        # EPT pointer
    assert field_class(0x6800) == "guest"          # guest CR0
    assert field_class(0x0800) == "guest"          # guest ES selector
    assert field_class(0x4402) == "readonly"       # exit reason
    assert field_class(0x6C16) == "host"           # host RIP
    v = sample()
    assert v.read_field(0x681E) == 0x100200        # RIP
    assert v.read_field(0x681C) == 0x8FF0          # RSP
    assert v.read_field(0x6820) == 0x2             # RFLAGS
    assert v.read_field(0x6802) == 0x1000          # CR3
    assert v.read_field(0x6804) == 0x20            # CR4
    assert v.read_field(0x2806) == 0x500           # EFER
    assert v.read_field(0x0802) == 0x10            # CS
    assert v.read_field(0x201A) == 0x501E
    assert v.read_field(0x2200) == 0x9000
    assert v.read_field(0x2202) == 0b11
    assert v.read_field(0x4200) == 1
    assert v.read_field(0x2204).to_bytes(8, "little") == Policy.make().pack()
    encodings = [f.encoding for f in VMCS_FIELDS]
    assert len(set(encodings)) == len(encodings)
    offsets = [f.offset for f in VMCS_FIELDS]
    assert len(set(offsets)) == len(offsets)


def test_field_slot_in_page():
    page = sample().pack()
    f = vmcs_field(0x681E)
    assert struct.unpack_from("<Q", page, f.offset)[0] == 0x100200
    assert struct.unpack_from("<I", page, 0)[0] == VMCS_REVISION_ID


def test_unknown_encoding():
    with pytest.raises(UnknownFieldError):
        field_class(0x1234)
    with pytest.raises(KeyError):
        sample().read_field(0x6C20)


def test_with_field():
    v = sample().with_field(0x4402, 12)
    assert v.exit_reason == 12 and v.read_field(0x4402) == 12
    assert sample().with_field(0x681E, 5).guest.rip == 5
    with pytest.raises(FieldValueError):
        sample().with_field(0x0800, 1 << 16)


def test_guest_state_bytes_exclude_host_chosen_fields():
    a = sample()
    b = dataclasses.replace(a, ept_pointer=0x77000 | 0x1E, save_area_hpa=0x123000, host_rip=9,
                            exit_reason=3)
    assert a.guest_state_bytes() == b.guest_state_bytes()
    names = {f.name for f in measured_fields()}
    assert not names & set(HOST_CHOSEN_CONTROLS)
    assert a.guest_state_bytes() != dataclasses.replace(
        a, guest=dataclasses.replace(a.guest, rsi=0x7001)).guest_state_bytes()
    assert a.guest_state_bytes() != dataclasses.replace(a, policy=Policy.make(True)).guest_state_bytes()
    assert a.guest_state_bytes() != dataclasses.replace(a, host_forced_exit=False).guest_state_bytes()
    assert a.guest_state_bytes() != dataclasses.replace(a, exposed_register_mask=1).guest_state_bytes()
    gs = a.guest_state_bytes()
    assert gs[:4] == b"KDGS" and len(gs) == 8 + 16 * len(measured_fields())


def test_exposed_registers():
    assert exposed_registers(exposed_register_mask(["rdx", "r8"])) == ["rdx", "r8"]
    assert exposed_register_mask(["rax"]) == 1 and exposed_register_mask(["rcx"]) == 2
    with pytest.raises(FieldValueError):
        exposed_register_mask(["rip"])


def test_negative_inputs():
    page = bytearray(sample().pack())
    with pytest.raises(TruncatedError):
        Vmcs.unpack(bytes(page[:-1]))
    with pytest.raises(OversizedError):
        Vmcs.unpack(bytes(page) + b"\0")
    bad = bytearray(page); struct.pack_into("<I", bad, 0, (VMCS_REVISION_ID & ~0xFFFF) | 2)
    with pytest.raises(VersionError):
        Vmcs.unpack(bytes(bad))
    bad = bytearray(page); struct.pack_into("<I", bad, 0, 0x12340001)
    with pytest.raises(MagicError):
        Vmcs.unpack(bytes(bad))
    bad = bytearray(page); bad[3] |= 0x80
    with pytest.raises(ReservedBitsError):
        Vmcs.unpack(bytes(bad))
    bad = bytearray(page); bad[4] = 1                      # VMX-abort indicator
    with pytest.raises(ReservedBitsError):
        Vmcs.unpack(bytes(bad))
    bad = bytearray(page); bad[0xFFF] = 1                  # reserved tail
    with pytest.raises(ReservedBitsError):
        Vmcs.unpack(bytes(bad))
    cs = vmcs_field(0x0802)                                 # 16-bit field, high bits set
    bad = bytearray(page); bad[cs.offset + 2] = 1
    with pytest.raises(ReservedBitsError):
        Vmcs.unpack(bytes(bad))
    hfe = vmcs_field(0x4200)
    bad = bytearray(page); bad[hfe.offset] = 2
    with pytest.raises(ReservedBitsError):
        Vmcs.unpack(bytes(bad))
    mask = vmcs_field(0x2202)
    bad = bytearray(page); bad[mask.offset + 2] = 1
    with pytest.raises(ReservedBitsError):
        Vmcs.unpack(bytes(bad))
    pol = vmcs_field(0x2204)
    bad = bytearray(page); bad[pol.offset + 4] = 4         # undefined policy flag
    with pytest.raises(ReservedBitsError):
        Vmcs.unpack(bytes(bad))


@given(st.integers(min_value=0, max_value=4095), st.integers(min_value=1, max_value=255))
def test_any_flipped_byte_is_rejected_or_changes_the_value(offset, xor):
    page = bytearray(sample().pack())
    page[offset] ^= xor
    try:
        v = Vmcs.unpack(bytes(page))
    except (ReservedBitsError, MagicError, VersionError):
        return
    assert v != sample()


def test_documented_field_table_matches_the_code():
    from pathlib import Path
    doc = Path(__file__).resolve().parents[1] / "docs" / "formats.md"
    rows = {}
    for line in doc.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 8 and cells[0].startswith("0x") and cells[1].startswith("0x"):
            rows[int(cells[1], 16)] = (int(cells[0], 16), cells[3], int(cells[4]), cells[5] == "yes")
    measured = {f.encoding for f in measured_fields()}
    assert rows == {f.encoding: (f.offset, f.field_class, f.width, f.encoding in measured)
                    for f in VMCS_FIELDS}
