"""Linux x86 64-bit boot protocol layout, built without firmware.

Pure functions: a bzImage, an initrd, a command line and a memory size go in;
the guest-physical pages and the vCPU state a key domain starts from come
out.  Nothing here touches QEMU or files.

Guest-physical map (all below 1 MiB lives in conventional memory)::

    0x00000  GDT (QEMU's reset GDTR is base 0, limit 0xffff)
    0x01000  PML4, 0x02000 PDPT, 0x03000.. page directories (2 MiB pages,
             identity map of the first min(RAM, 4 GiB) rounded up to 1 GiB)
    0x07000  zero page (struct boot_params)
    0x08000  boot stack (RSP = 0x8ff0)
    0x20000  kernel command line (its space up to the kernel's cmdline_size
             stays zero; the platform appends ``tsc_early_khz`` there at launch)
    0x9d000-0x9efff  left free: the decompressor uses it
    0x100000 protected-mode kernel (64-bit entry at +0x200)
    top      initrd, page aligned, below initrd_addr_max and the end of RAM

The references are the kernel's Documentation/arch/x86/boot.rst and
zero-page.rst.  docs/formats.md §11 specifies every byte written here.

The measured command line carries nothing host-specific.  The one boot
parameter that depends on the machine, ``tsc_early_khz`` (without firmware,
Linux under TCG cannot calibrate its TSC and marks it unstable), is added at
launch by the platform from its own processor: :func:`complete_cmdline` finds
the command line through the zero page and appends it in the zeroed space
behind it.  Plain runs append it directly (:func:`with_tsc_khz`).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from qemu_kd.common.errors import GuestImageError
from qemu_kd.common.units import check_guest_memory
from qemu_kd.formats.vcpu import CR0_ET, CR0_PE, CR0_PG, CR4_PAE, EFER_LMA, EFER_LME, VcpuState
from qemu_kd.formats.addresses import PAGE_SIZE

MiB = 1 << 20
GiB = 1 << 30

GDT_GPA = 0x0
PML4_GPA = 0x1000
PDPT_GPA = 0x2000
PD_GPA = 0x3000
ZERO_PAGE_GPA = 0x7000
STACK_TOP = 0x8FF0
CMDLINE_GPA = 0x20000
CMDLINE_MAX = 0x7C000 - 0x20000  # stays below the area the decompressor uses
KERNEL_GPA = 0x100000
LOW_RAM_END = 0x9FC00  # conventional memory, as a PC BIOS reports it

BOOT_CS = 0x10
BOOT_DS = 0x18
# Null, null, flat 64-bit code (L=1), flat data.
GDT_ENTRIES = (0, 0, 0x00AF9B000000FFFF, 0x00CF93000000FFFF)

E820_RAM = 1
E820_RESERVED = 2

# Offsets into struct boot_params (the zero page).
BP_EXT_RAMDISK_IMAGE = 0x0C0
BP_EXT_RAMDISK_SIZE = 0x0C4
BP_EXT_CMD_LINE_PTR = 0x0C8
BP_E820_ENTRIES = 0x1E8
BP_SETUP_HEADER = 0x1F1
BP_E820_TABLE = 0x2D0
BP_HEADER_MAGIC = 0x202      # "HdrS"
BP_VERSION = 0x206
BP_CMD_LINE_PTR = 0x228
BP_CMDLINE_SIZE = 0x238
E820_MAX = 128

#: The launch parameter the platform supplies (unmeasured) from its own processor.
TSC_PARAM = "tsc_early_khz"
#: Largest TSC frequency the platform writes, in kHz (9 digits).
TSC_KHZ_MAX = 999_999_999
#: Bytes of the command-line space kept free for the platform's " tsc_early_khz=<kHz>"
#: when the measured line has no tsc_early_khz of its own.
PLATFORM_CMDLINE_ROOM = 32

XLF_KERNEL_64 = 1 << 0
XLF_CAN_BE_LOADED_ABOVE_4G = 1 << 1
MIN_PROTOCOL = 0x020C  # xloadflags and the 64-bit entry point


@dataclass(frozen=True)
class SetupHeader:
    """The fields of the bzImage setup header this loader uses."""

    setup_sects: int
    version: int
    loadflags: int
    initrd_addr_max: int
    kernel_alignment: int
    relocatable_kernel: int
    xloadflags: int
    cmdline_size: int
    pref_address: int
    init_size: int
    header_end: int  # offset of the first byte after the header in the image

    @classmethod
    def unpack(cls, image: bytes) -> "SetupHeader":
        if len(image) < 0x268:
            raise GuestImageError(
                f"kernel image is too small ({len(image)} bytes) to be a bzImage",
                "pass a Linux bzImage (vmlinuz), not a vmlinux or a module")
        if image[0x202:0x206] != b"HdrS" or image[0x1FE:0x200] != b"\x55\xaa":
            raise GuestImageError("kernel image has no Linux boot-protocol header (HdrS)",
                                  "pass a Linux bzImage (vmlinuz)")
        setup_sects = image[0x1F1] or 4
        version, = struct.unpack_from("<H", image, 0x206)
        loadflags = image[0x211]
        initrd_addr_max, kernel_alignment = struct.unpack_from("<II", image, 0x22C)
        relocatable = image[0x234]
        xloadflags, = struct.unpack_from("<H", image, 0x236)
        cmdline_size, = struct.unpack_from("<I", image, 0x238)
        pref_address, init_size = struct.unpack_from("<QI", image, 0x258)
        header_end = 0x202 + image[0x201]
        return cls(setup_sects, version, loadflags, initrd_addr_max, kernel_alignment,
                   relocatable, xloadflags, cmdline_size, pref_address, init_size,
                   header_end)

    def check_64bit_boot(self) -> None:
        if self.version < MIN_PROTOCOL:
            raise GuestImageError(
                f"kernel speaks boot protocol {self.version >> 8}.{self.version & 0xff:02d}; "
                "the 64-bit entry needs 2.12 or later", "use a newer kernel")
        if not self.xloadflags & XLF_KERNEL_64:
            raise GuestImageError("kernel has no 64-bit entry point (XLF_KERNEL_64 unset)",
                                  "use an x86-64 kernel")
        if not self.relocatable_kernel:
            raise GuestImageError("kernel is not relocatable",
                                  "build it with CONFIG_RELOCATABLE=y")

    @property
    def kernel_offset(self) -> int:
        """Offset of the protected-mode kernel inside the bzImage."""
        return (self.setup_sects + 1) * 512


@dataclass(frozen=True)
class E820Entry:
    addr: int
    size: int
    type: int

    def pack(self) -> bytes:
        return struct.pack("<QQI", self.addr, self.size, self.type)


@dataclass(frozen=True)
class Region:
    """Bytes to place at a guest-physical address."""

    gpa: int
    data: bytes
    name: str

    @property
    def end(self) -> int:
        return self.gpa + len(self.data)


@dataclass
class BootLayout:
    """Everything a firmware-less launch writes, plus the vCPU state to load."""

    mem_size: int
    regions: list[Region]
    vcpu: VcpuState
    e820: list[E820Entry]
    header: SetupHeader
    cmdline: str
    initrd_gpa: int = 0
    initrd_size: int = 0
    reserved: list[tuple[int, int]] = field(default_factory=list)

    def pages(self) -> dict[int, bytes]:
        """Every 4 KiB guest page that holds layout data, keyed by gpa.

        Pages that no region touches are zero and are left out.
        """
        # Pages one region fills alone are sliced from it in one copy; pages that regions
        # share or fill in part are assembled.
        users: dict[int, int] = {}
        for region in self.regions:
            first = region.gpa & ~(PAGE_SIZE - 1)
            for base in range(first, region.gpa + len(region.data), PAGE_SIZE):
                users[base] = users.get(base, 0) + 1
        out: dict[int, bytes | bytearray] = {}
        for region in self.regions:
            data = memoryview(region.data)
            pos = 0
            while pos < len(data):
                gpa = region.gpa + pos
                base = gpa & ~(PAGE_SIZE - 1)
                off = gpa - base
                n = min(PAGE_SIZE - off, len(data) - pos)
                if n == PAGE_SIZE and users[base] == 1:
                    out[base] = bytes(data[pos:pos + n])
                else:
                    page = out.setdefault(base, bytearray(PAGE_SIZE))
                    page[off:off + n] = data[pos:pos + n]
                pos += n
        return {gpa: bytes(page) for gpa, page in sorted(out.items())}


def cmdline_space(cmdline_size: int) -> int:
    """Bytes from the command-line pointer the kernel may read: the line, its NUL and zeros.

    The setup header's ``cmdline_size`` is the longest line without its NUL
    (0: not given); the space never reaches the decompressor's area.
    """
    return min(CMDLINE_MAX, cmdline_size + 1) if cmdline_size else CMDLINE_MAX


#: Bytes the kernel's command-line parser treats as spaces (its ctype table: TAB, LF, VT, FF,
#: CR, space and the Latin-1 no-break space 0xA0).
CMDLINE_SPACES = frozenset(b"\t\n\x0b\x0c\r \xa0")


def cmdline_words(cmdline: str | bytes) -> list[bytes]:
    """The command line's words as the kernel splits them.

    Words end at a space byte outside double quotes; a double quote toggles
    quoting, so ``x="a b"`` is one word.
    """
    data = cmdline if isinstance(cmdline, bytes) else cmdline.encode()
    words, word, quoted = [], bytearray(), False
    for byte in data:
        if byte in CMDLINE_SPACES and not quoted:
            if word:
                words.append(bytes(word))
                word.clear()
            continue
        if byte == 0x22:
            quoted = not quoted
        word.append(byte)
    if word:
        words.append(bytes(word))
    return words


def has_tsc_param(cmdline: str | bytes) -> bool:
    """Whether the command line already sets ``tsc_early_khz`` (as a parameter of its own,
    possibly quoted: ``"tsc_early_khz=N"``; not inside another parameter's quoted value)."""
    prefix = TSC_PARAM.encode() + b"="
    return any(word.removeprefix(b'"').startswith(prefix) for word in cmdline_words(cmdline))


def _tsc_suffix(tsc_khz: int) -> bytes:
    if not isinstance(tsc_khz, int) or isinstance(tsc_khz, bool) or not 0 < tsc_khz <= TSC_KHZ_MAX:
        raise GuestImageError(f"TSC frequency {tsc_khz!r} kHz is not between 1 and {TSC_KHZ_MAX}")
    return f" {TSC_PARAM}={tsc_khz}".encode()


def with_tsc_khz(cmdline: str, tsc_khz: int | None) -> str:
    """``cmdline`` plus `` tsc_early_khz=<kHz>`` unless it has one or the frequency is unknown."""
    if tsc_khz is None or has_tsc_param(cmdline):
        return cmdline
    return cmdline + _tsc_suffix(tsc_khz).decode()


@dataclass(frozen=True)
class CmdlineCompletion:
    """What the platform writes into guest RAM at launch, and the line the guest then sees."""

    gpa: int           # where the appended bytes go: the measured line's NUL
    data: bytes        # " tsc_early_khz=<kHz>" and a new NUL
    cmdline: bytes     # the completed line, without its NUL
    tsc_khz: int


def complete_cmdline(memory, mem_size: int, zero_page_gpa: int,
                     tsc_khz: int) -> CmdlineCompletion | None:
    """Where and what to append so the guest's command line carries ``tsc_early_khz``.

    ``memory`` is guest RAM (anything sliceable by gpa: bytes, mmap,
    memoryview) holding the measured image; ``zero_page_gpa`` is the guest's
    RSI at entry.  Returns None when there is nothing to complete: the page
    at RSI is no boot_params with a Linux setup header ("HdrS"), its
    command-line pointer is 0, or the measured line already sets
    ``tsc_early_khz``.  Raises GuestImageError when the line cannot be
    completed in place: out of RAM, not NUL-terminated within the kernel's
    ``cmdline_size``, no room left, or the bytes behind it are not zero.
    """
    suffix = _tsc_suffix(tsc_khz)
    if zero_page_gpa < 0 or zero_page_gpa + PAGE_SIZE > mem_size:
        raise GuestImageError(f"the boot parameters at gpa {zero_page_gpa:#x} (RSI) are outside "
                              f"{mem_size} bytes of guest memory")
    zp = bytes(memory[zero_page_gpa:zero_page_gpa + PAGE_SIZE])
    if zp[BP_HEADER_MAGIC:BP_HEADER_MAGIC + 4] != b"HdrS":
        return None
    version, = struct.unpack_from("<H", zp, BP_VERSION)
    low, = struct.unpack_from("<I", zp, BP_CMD_LINE_PTR)
    high, = struct.unpack_from("<I", zp, BP_EXT_CMD_LINE_PTR)
    pointer = low | high << 32
    if not pointer:
        return None
    cmdline_size = struct.unpack_from("<I", zp, BP_CMDLINE_SIZE)[0] if version >= 0x0206 else 255
    if pointer >= mem_size:
        raise GuestImageError(f"the kernel command line at gpa {pointer:#x} is outside guest memory")
    space = min(cmdline_space(cmdline_size), mem_size - pointer)
    area = bytes(memory[pointer:pointer + space])
    end = area.find(b"\0")
    if end < 0:
        raise GuestImageError(f"the kernel command line at gpa {pointer:#x} has no NUL within "
                              f"its {space} bytes")
    measured = area[:end]
    if has_tsc_param(measured):
        return None
    grown = end + len(suffix) + 1
    if grown > space:
        raise GuestImageError(f"no room for '{suffix.decode().strip()}' behind the {end}-byte kernel "
                              f"command line (the kernel reads at most {space} bytes)",
                              "seal a command line at least "
                              f"{PLATFORM_CMDLINE_ROOM} bytes shorter, or with tsc_early_khz of its own")
    if any(area[end + 1:grown]):
        raise GuestImageError(f"the {len(suffix)} bytes behind the kernel command line at gpa "
                              f"{pointer:#x} are not zero")
    return CmdlineCompletion(gpa=pointer + end, data=suffix + b"\0", cmdline=measured + suffix,
                             tsc_khz=tsc_khz)


def _page_tables(mem_size: int) -> tuple[bytes, bytes, bytes]:
    """PML4, PDPT and page directories identity-mapping the low GiBs with 2 MiB pages."""
    gib = max(1, min(4, -(-mem_size // GiB)))
    pml4 = struct.pack("<Q", PDPT_GPA | 0x3).ljust(PAGE_SIZE, b"\0")
    pdpt = b"".join(struct.pack("<Q", (PD_GPA + i * PAGE_SIZE) | 0x3) for i in range(gib))
    pdpt = pdpt.ljust(PAGE_SIZE, b"\0")
    pds = b"".join(struct.pack("<Q", (i * 2 * MiB) | 0x83) for i in range(gib * 512))
    return pml4, pdpt, pds


def _e820(mem_size: int, reserved: list[tuple[int, int]]) -> list[E820Entry]:
    entries = [E820Entry(0, LOW_RAM_END, E820_RAM),
               E820Entry(LOW_RAM_END, 0x100000 - LOW_RAM_END, E820_RESERVED)]
    cursor = KERNEL_GPA
    for gpa, size in sorted(reserved):
        if gpa > cursor:
            entries.append(E820Entry(cursor, gpa - cursor, E820_RAM))
        entries.append(E820Entry(gpa, size, E820_RESERVED))
        cursor = gpa + size
    if mem_size > cursor:
        entries.append(E820Entry(cursor, mem_size - cursor, E820_RAM))
    return entries


def build_boot_layout(kernel: bytes, initrd: bytes, cmdline: str, mem_size: int,
                      reserved: list[tuple[int, int]] | None = None) -> BootLayout:
    """Lay out a Linux guest for a direct 64-bit entry.

    ``reserved`` lists (gpa, size) ranges at or above 1 MiB that the e820 map
    marks reserved (for example a shared-memory window) and that the initrd
    must avoid.
    """
    reserved = sorted(reserved or [])
    hdr = SetupHeader.unpack(kernel)
    hdr.check_64bit_boot()
    check_guest_memory(mem_size)
    for gpa, size in reserved:
        if gpa < KERNEL_GPA or gpa % PAGE_SIZE or size % PAGE_SIZE or gpa + size > mem_size:
            raise GuestImageError(f"reserved range {gpa:#x}+{size:#x} is invalid",
                                  "reserve page-aligned ranges between 1 MiB and the end of RAM")

    cmd = cmdline.encode() + b"\0"
    limit = cmdline_space(hdr.cmdline_size)
    if not has_tsc_param(cmdline):
        limit -= PLATFORM_CMDLINE_ROOM   # the platform appends tsc_early_khz at launch
    if len(cmd) > limit:
        raise GuestImageError(f"kernel command line is {len(cmd) - 1} bytes; this kernel "
                              f"accepts at most {limit - 1} here (the platform keeps "
                              f"{PLATFORM_CMDLINE_ROOM} bytes for tsc_early_khz unless the line sets it)",
                              "shorten the command line")

    pm_kernel = kernel[hdr.kernel_offset:]
    if not pm_kernel:
        raise GuestImageError(f"kernel image ends inside its {hdr.setup_sects} setup sectors: "
                              "it has no protected-mode kernel", "pass a complete Linux bzImage")
    kernel_end = KERNEL_GPA + max(len(pm_kernel), hdr.init_size)

    # The initrd goes as high as allowed, below any reserved range above it.
    top = min(mem_size, hdr.initrd_addr_max + 1)
    for gpa, size in reversed(reserved):
        if gpa + size > top - len(initrd):
            top = min(top, gpa)
    initrd_gpa = (top - len(initrd)) & ~(PAGE_SIZE - 1)
    if initrd and initrd_gpa < kernel_end:
        raise GuestImageError(
            f"initrd ({len(initrd) // MiB} MiB) does not fit in {mem_size // MiB} MiB of "
            "guest memory beside the kernel", "give the guest more memory (--mem)")

    e820 = _e820(mem_size, reserved)
    if len(e820) > E820_MAX:
        raise GuestImageError("too many reserved ranges for the e820 map")

    zp = bytearray(PAGE_SIZE)
    zp[BP_SETUP_HEADER:hdr.header_end] = kernel[BP_SETUP_HEADER:hdr.header_end]
    zp[0x210] = 0xFF  # type_of_loader: undefined boot loader
    struct.pack_into("<II", zp, 0x218, initrd_gpa if initrd else 0, len(initrd))
    struct.pack_into("<I", zp, BP_CMD_LINE_PTR, CMDLINE_GPA)
    struct.pack_into("<III", zp, BP_EXT_RAMDISK_IMAGE, 0, 0, 0)
    zp[BP_E820_ENTRIES] = len(e820)
    zp[BP_E820_TABLE:BP_E820_TABLE + 20 * len(e820)] = b"".join(e.pack() for e in e820)

    pml4, pdpt, pds = _page_tables(mem_size)
    gdt = b"".join(struct.pack("<Q", d) for d in GDT_ENTRIES)
    regions = [
        Region(GDT_GPA, gdt, "gdt"),
        Region(PML4_GPA, pml4, "pml4"),
        Region(PDPT_GPA, pdpt, "pdpt"),
        Region(PD_GPA, pds, "page directories"),
        Region(ZERO_PAGE_GPA, bytes(zp), "zero page"),
        Region(CMDLINE_GPA, cmd, "cmdline"),
        Region(KERNEL_GPA, pm_kernel, "kernel"),
    ]
    if initrd:
        regions.append(Region(initrd_gpa, initrd, "initrd"))

    vcpu = VcpuState(
        rip=KERNEL_GPA + 0x200,
        rsi=ZERO_PAGE_GPA,
        rsp=STACK_TOP,
        rflags=0x2,
        cs=BOOT_CS, ss=BOOT_DS, ds=BOOT_DS, es=BOOT_DS, fs=BOOT_DS, gs=BOOT_DS,
        cr0=CR0_PE | CR0_ET | CR0_PG,
        cr3=PML4_GPA,
        cr4=CR4_PAE,
        efer=EFER_LME | EFER_LMA,
        gdtr_base=GDT_GPA,
        gdtr_limit=0xFFFF,
    )
    return BootLayout(mem_size=mem_size, regions=regions, vcpu=vcpu, e820=e820, header=hdr,
                      cmdline=cmdline, initrd_gpa=initrd_gpa if initrd else 0,
                      initrd_size=len(initrd), reserved=reserved)
