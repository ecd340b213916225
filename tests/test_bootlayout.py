import struct

import pytest

from qemu_kd.formats import bootlayout as bl
from qemu_kd.common.errors import GuestImageError
from qemu_kd.formats.vcpu import GDB_REGS, LOAD_ORDER

from synthetic import fake_bzimage

MiB = 1 << 20


def layout(**kw):
    kernel = kw.pop("kernel", fake_bzimage())
    initrd = kw.pop("initrd", b"INITRD" * 1000)
    cmdline = kw.pop("cmdline", "console=ttyS0 quiet")
    mem = kw.pop("mem", 256 * MiB)
    return bl.build_boot_layout(kernel, initrd, cmdline, mem, **kw)


def region(lay, name):
    return next(r for r in lay.regions if r.name == name)


def zero_page(lay):
    return region(lay, "zero page").data


def test_setup_header_fields_are_read_at_boot_protocol_offsets():
    hdr = bl.SetupHeader.unpack(fake_bzimage(setup_sects=3, version=0x020D))
    assert hdr.setup_sects == 3
    assert hdr.kernel_offset == 4 * 512
    assert hdr.version == 0x020D
    assert hdr.xloadflags == 3
    assert hdr.cmdline_size == 2047
    assert hdr.init_size == 0x200000
    assert hdr.header_end == 0x268


def test_zero_setup_sects_means_four():
    assert bl.SetupHeader.unpack(fake_bzimage(setup_sects=0)).setup_sects == 4


def test_zero_page_copies_header_and_sets_loader_fields():
    kernel = fake_bzimage()
    lay = layout(kernel=kernel)
    zp = zero_page(lay)
    assert len(zp) == 4096
    assert zp[0x202:0x206] == b"HdrS"
    assert zp[0x210] == 0xFF  # type_of_loader
    ramdisk_image, ramdisk_size = struct.unpack_from("<II", zp, 0x218)
    assert (ramdisk_image, ramdisk_size) == (lay.initrd_gpa, len(b"INITRD" * 1000))
    assert struct.unpack_from("<I", zp, 0x228)[0] == bl.CMDLINE_GPA
    # Everything else in the header is the kernel's own bytes.
    changed = {0x210} | set(range(0x218, 0x220)) | set(range(0x228, 0x22C))
    for off in range(0x1F1, 0x268):
        if off not in changed:
            assert zp[off] == kernel[off], hex(off)


def test_e820_map_covers_ram_and_reserves_bios_area():
    lay = layout(mem=128 * MiB)
    zp = zero_page(lay)
    n = zp[bl.BP_E820_ENTRIES]
    entries = [struct.unpack_from("<QQI", zp, bl.BP_E820_TABLE + 20 * i) for i in range(n)]
    assert entries[0] == (0, bl.LOW_RAM_END, bl.E820_RAM)
    assert entries[1] == (bl.LOW_RAM_END, 0x100000 - bl.LOW_RAM_END, bl.E820_RESERVED)
    assert entries[-1] == (0x100000, 128 * MiB - 0x100000, bl.E820_RAM)
    assert sum(e[1] for e in entries) == 128 * MiB


def test_reserved_window_is_in_e820_and_avoided_by_initrd():
    window = (200 * MiB, 8 * MiB)
    lay = layout(mem=256 * MiB, reserved=[window])
    assert bl.E820Entry(*window, bl.E820_RESERVED) in lay.e820
    end = lay.initrd_gpa + lay.initrd_size
    assert end <= window[0] or lay.initrd_gpa >= sum(window)


def test_initrd_is_high_page_aligned_and_clear_of_kernel():
    kernel = fake_bzimage(init_size=32 * MiB)
    lay = layout(kernel=kernel, initrd=b"x" * (3 * MiB + 5), mem=256 * MiB)
    assert lay.initrd_gpa % 4096 == 0
    assert lay.initrd_gpa + lay.initrd_size <= 256 * MiB
    assert lay.initrd_gpa >= bl.KERNEL_GPA + 32 * MiB
    assert region(lay, "initrd").data == b"x" * (3 * MiB + 5)


def test_initrd_respects_initrd_addr_max():
    kernel = fake_bzimage(initrd_addr_max=100 * MiB - 1)
    lay = layout(kernel=kernel, mem=256 * MiB)
    assert lay.initrd_gpa + lay.initrd_size <= 100 * MiB


def test_kernel_goes_to_1mib_without_setup_code():
    kernel = fake_bzimage(setup_sects=2, payload=b"KERNEL" * 10)
    lay = layout(kernel=kernel)
    assert region(lay, "kernel").gpa == 0x100000
    assert region(lay, "kernel").data == b"KERNEL" * 10


def test_cmdline_is_nul_terminated_and_bounded():
    lay = layout(cmdline="abc def")
    assert region(lay, "cmdline").data == b"abc def\0"
    with pytest.raises(GuestImageError, match="command line"):
        layout(kernel=fake_bzimage(cmdline_size=10), cmdline="x" * 11)


def test_identity_page_tables_map_with_2mib_pages():
    lay = layout(mem=256 * MiB)
    pml4 = region(lay, "pml4").data
    pdpt = region(lay, "pdpt").data
    pds = region(lay, "page directories").data
    assert struct.unpack_from("<Q", pml4, 0)[0] == bl.PDPT_GPA | 3
    assert struct.unpack_from("<Q", pdpt, 0)[0] == bl.PD_GPA | 3
    for i in (0, 1, 100, 511):
        assert struct.unpack_from("<Q", pds, 8 * i)[0] == (i * 2 * MiB) | 0x83


def test_gdt_has_flat_long_mode_code_and_data():
    gdt = region(lay := layout(), "gdt")
    assert gdt.gpa == 0
    code = struct.unpack_from("<Q", gdt.data, bl.BOOT_CS)[0]
    data = struct.unpack_from("<Q", gdt.data, bl.BOOT_DS)[0]
    assert code >> 53 & 1 == 1  # L bit: 64-bit code
    assert code >> 47 & 1 == 1 and data >> 47 & 1 == 1  # present
    assert lay.vcpu.cs == bl.BOOT_CS and lay.vcpu.ds == bl.BOOT_DS


def test_vcpu_state_enters_64bit_kernel():
    lay = layout()
    v = lay.vcpu
    assert v.rip == bl.KERNEL_GPA + 0x200
    assert v.rsi == bl.ZERO_PAGE_GPA
    assert v.in_long_mode()
    assert v.rflags == 0x2
    assert v.cr3 == bl.PML4_GPA


def test_load_order_follows_qemu_requirements():
    order = list(LOAD_ORDER)
    assert order.index("cr4") < order.index("cr3") < order.index("efer") < order.index("cr0")
    assert order.index("cr0") < order.index("cs") < order.index("ds") < order.index("rsi")
    assert order[-1] == "rip" and order[-2] == "rflags"
    assert GDB_REGS["rip"] == (16, 8) and GDB_REGS["efer"] == (32, 8)


def test_regions_do_not_overlap_and_keep_decompressor_area_free():
    lay = layout()
    spans = sorted((r.gpa, r.end, r.name) for r in lay.regions)
    for (a0, a1, an), (b0, b1, bn) in zip(spans, spans[1:]):
        assert a1 <= b0, f"{an} overlaps {bn}"
    for r in lay.regions:
        assert r.end <= 0x9D000 or r.gpa >= 0x9F000, r.name


def test_pages_assemble_regions_into_4k_pages():
    lay = layout()
    pages = lay.pages()
    assert all(gpa % 4096 == 0 and len(p) == 4096 for gpa, p in pages.items())
    k = region(lay, "kernel")
    assert pages[0x100000][:len(k.data[:4096])] == k.data[:4096]
    assert pages[bl.ZERO_PAGE_GPA] == zero_page(lay)


@pytest.mark.parametrize("kw, msg", [
    ({"kernel": b"\0" * 100}, "too small"),
    ({"kernel": b"\0" * 4096}, "HdrS"),
    ({"kernel": fake_bzimage(version=0x020A)}, "2.12"),
    ({"kernel": fake_bzimage(xloadflags=0)}, "64-bit"),
    ({"kernel": fake_bzimage(relocatable=0)}, "relocatable"),
    ({"mem": 16 * MiB}, "memory size"),
    ({"initrd": b"x" * (70 * MiB), "mem": 64 * MiB}, "does not fit"),
    ({"reserved": [(0x1000, 4096)]}, "reserved range"),
])
def test_bad_inputs_give_clear_errors(kw, msg):
    with pytest.raises(GuestImageError, match=msg):
        layout(**kw)


# -- the platform's tsc_early_khz: appended at launch, in the zeroed space behind the line --

def guest_ram(lay) -> bytearray:
    """Guest memory as the platform has it after decrypting the image pages."""
    ram = bytearray(lay.mem_size)
    for gpa, page in lay.pages().items():
        ram[gpa:gpa + len(page)] = page
    return ram


def kernel_sees(ram, lay) -> bytes:
    """The command line as the kernel reads it: boot_params at RSI, cmd_line_ptr, up to the NUL."""
    zp = lay.vcpu.rsi
    ptr = struct.unpack_from("<I", ram, zp + 0x228)[0] | struct.unpack_from("<I", ram, zp + 0x0C8)[0] << 32
    return bytes(ram[ptr:ram.index(b"\0", ptr)])


def apply(ram, done):
    ram[done.gpa:done.gpa + len(done.data)] = done.data


def test_platform_appends_tsc_early_khz_in_the_zeroed_space():
    lay = layout(cmdline="console=ttyS0 quiet")
    ram = guest_ram(lay)
    done = bl.complete_cmdline(ram, lay.mem_size, lay.vcpu.rsi, 2_596_140)
    assert done.gpa == bl.CMDLINE_GPA + len("console=ttyS0 quiet")
    assert done.data == b" tsc_early_khz=2596140\0"
    apply(ram, done)
    assert kernel_sees(ram, lay) == b"console=ttyS0 quiet tsc_early_khz=2596140" == done.cmdline


def test_a_measured_tsc_early_khz_is_left_alone():
    lay = layout(cmdline="console=ttyS0 tsc_early_khz=1000 quiet")
    assert bl.complete_cmdline(guest_ram(lay), lay.mem_size, lay.vcpu.rsi, 2_000_000) is None
    assert bl.with_tsc_khz("a tsc_early_khz=5", 7) == "a tsc_early_khz=5"
    assert bl.with_tsc_khz("a", 7) == "a tsc_early_khz=7" and bl.with_tsc_khz("a", None) == "a"


def test_no_linux_boot_params_means_nothing_to_complete():
    lay = layout()
    ram = guest_ram(lay)
    assert bl.complete_cmdline(ram, lay.mem_size, 0x5000, 1000) is None   # no "HdrS" there
    struct.pack_into("<I", ram, lay.vcpu.rsi + 0x228, 0)                  # no command line
    assert bl.complete_cmdline(ram, lay.mem_size, lay.vcpu.rsi, 1000) is None


def test_the_layout_keeps_room_for_the_platform():
    size = 100
    kernel = fake_bzimage(cmdline_size=size)
    longest = "x" * (size - bl.PLATFORM_CMDLINE_ROOM)
    lay = layout(kernel=kernel, cmdline=longest)
    ram = guest_ram(lay)
    apply(ram, bl.complete_cmdline(ram, lay.mem_size, lay.vcpu.rsi, bl.TSC_KHZ_MAX))
    assert len(kernel_sees(ram, lay)) <= size
    with pytest.raises(GuestImageError, match="keeps 32 bytes for tsc_early_khz"):
        layout(kernel=kernel, cmdline=longest + "x")
    # A line that sets tsc_early_khz itself may use the whole space.
    layout(kernel=kernel, cmdline=("tsc_early_khz=1 " + longest)[:size])


def test_completion_refuses_what_does_not_fit():
    lay = layout(kernel=fake_bzimage(cmdline_size=100), cmdline="console=ttyS0")
    ram = guest_ram(lay)
    struct.pack_into("<I", ram, lay.vcpu.rsi + 0x238, 20)       # the kernel reads at most 20 bytes
    with pytest.raises(GuestImageError, match="no room"):
        bl.complete_cmdline(ram, lay.mem_size, lay.vcpu.rsi, 1000)
    ram = guest_ram(lay)
    ram[bl.CMDLINE_GPA + 20] = 0x41                              # not zero behind the line
    with pytest.raises(GuestImageError, match="not zero"):
        bl.complete_cmdline(ram, lay.mem_size, lay.vcpu.rsi, 1000)
    ram = guest_ram(lay)
    ram[bl.CMDLINE_GPA:bl.CMDLINE_GPA + 101] = b"y" * 101        # no NUL within cmdline_size + 1
    with pytest.raises(GuestImageError, match="no NUL"):
        bl.complete_cmdline(ram, lay.mem_size, lay.vcpu.rsi, 1000)
    with pytest.raises(GuestImageError, match="outside"):
        bl.complete_cmdline(guest_ram(lay), lay.mem_size, lay.mem_size, 1000)
    for bad in (0, -1, bl.TSC_KHZ_MAX + 1, True):
        with pytest.raises(GuestImageError, match="TSC frequency"):
            bl.complete_cmdline(guest_ram(lay), lay.mem_size, lay.vcpu.rsi, bad)


@pytest.mark.parametrize("line, sets", [
    ("console=ttyS0 tsc_early_khz=5", True),
    ('console=ttyS0 "tsc_early_khz=5"', True),           # the kernel drops the opening quote
    ('x="a tsc_early_khz=5"', False),                    # part of x's value
    ('x="a" tsc_early_khz=5', True),                     # the quote closed before the space
    ("a\xa0tsc_early_khz=5", True),                      # 0xA0 is a space to the kernel
    ("a\x1ctsc_early_khz=5", False),
    ("notsc_early_khz=5 tsc_early_khz", False),
])
def test_tsc_early_khz_is_found_as_the_kernel_parses_words(line, sets):
    assert bl.has_tsc_param(line) is sets
    assert (bl.with_tsc_khz(line, 7) == line) is sets


def test_a_kernel_without_a_protected_mode_part_is_refused():
    kernel = fake_bzimage()
    with pytest.raises(GuestImageError, match="no protected-mode kernel"):
        bl.build_boot_layout(kernel[:bl.SetupHeader.unpack(kernel).kernel_offset], b"", "console=ttyS0",
                             64 << 20)


def test_pages_of_whole_shared_and_partial_pages_are_the_regions_painted_in_order():
    import dataclasses

    def data(n, seed):
        return bytes((seed + i * 7) % 256 for i in range(n))
    regions = [bl.Region(0x0, data(32, 1), "a"), bl.Region(0x1000, data(3 * 4096, 2), "whole"),
               bl.Region(0x5010, data(4096, 3), "unaligned"), bl.Region(0x6800, data(100, 4), "shares"),
               bl.Region(0x9000, data(2 * 4096 + 5, 5), "ends mid-page"), bl.Region(0x9800, data(16, 6), "over")]
    lay = dataclasses.replace(layout(), regions=regions)
    ram = bytearray(0x10000)
    for r in regions:
        ram[r.gpa:r.end] = r.data
    touched = {base for r in regions for base in range(r.gpa & ~0xFFF, r.end, 4096)}
    assert lay.pages() == {base: bytes(ram[base:base + 4096]) for base in sorted(touched)}
    assert all(type(p) is bytes for p in lay.pages().values())
