"""Small synthetic inputs shared by unit tests (no QEMU, no real kernel)."""

import struct


def fake_bzimage(*, version=0x020F, xloadflags=0x3, relocatable=1, setup_sects=1,
                 payload=b"\x90" * 5000, init_size=0x200000, cmdline_size=2047,
                 initrd_addr_max=0x7FFFFFFF) -> bytes:
    """A byte string with a valid-looking Linux setup header and a payload."""
    img = bytearray(((setup_sects or 4) + 1) * 512)
    img[0x1F1] = setup_sects
    img[0x1FE:0x200] = b"\x55\xaa"
    img[0x200] = 0xEB            # short jmp
    img[0x201] = 0x66            # header runs to 0x268
    img[0x202:0x206] = b"HdrS"
    struct.pack_into("<H", img, 0x206, version)
    img[0x211] = 0x01            # LOADED_HIGH
    struct.pack_into("<II", img, 0x22C, initrd_addr_max, 0x200000)
    img[0x234] = relocatable
    struct.pack_into("<H", img, 0x236, xloadflags)
    struct.pack_into("<I", img, 0x238, cmdline_size)
    struct.pack_into("<QI", img, 0x258, 0x1000000, init_size)
    return bytes(img) + payload


# A tiny guest for sealing and measuring tests: a fake bzImage, an initrd that starts like a
# cpio archive, and a short command line.
SYNTH_KERNEL = fake_bzimage(payload=bytes(range(256)) * 40)
SYNTH_INITRD = b"070701" + bytes(range(251)) * 97
SYNTH_CMDLINE = "console=ttyS0 quiet"
