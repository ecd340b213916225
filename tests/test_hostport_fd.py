"""write-phys-pages from a file the host passes over the host port (SCM_RIGHTS), played by a
hostile host: a short, foreign or unreadable file, the wrong number of descriptors, or a
descriptor sent with another command is refused in one line, leaves DRAM as it was, and
leaves no descriptor open in the platform; a bundle loaded this way builds the domain a
bundle sent through the socket builds, and a tampered one still fails verification (no QEMU)."""

import hashlib
import os
import socket
import stat

import numpy as np
import pytest

from host_vmm.vmm import HostVmm
from qemu_kd.formats.bundle import PAGE_RECORD_SIZE
from qemu_kd.formats.errors import FormatError, TruncatedError
from qemu_kd.formats.measurement import PageType
from qemu_kd.formats.policy import Policy
from qemu_kd.hostport.client import HostPortClient
from qemu_kd.hostport.protocol import HostPortBadRequestError, HostPortBusyError, HostPortError
from qemu_kd.platform import hostport_server
from qemu_kd.platform.hardware import Platform
from qemu_kd.tenant.seal import seal

from serving import serving
from synthetic import fake_bzimage

MiB = 1 << 20
PAGE = 4096
STRIDE = 24 + PAGE          # pages laid out as a bundle's records: a 24-byte head before each


@pytest.fixture
def served(identity, tmp_path):
    platform = Platform(identity, 128 * MiB, tmp_path / "platform")
    with serving(platform, frame_timeout=5) as (path, server):
        yield platform, path, server


@pytest.fixture
def client(served):
    with HostPortClient(served[1], timeout=10) as c:
        yield c


def descriptors_of(target) -> int:
    """How many descriptors of this process are open on ``target``: a path, or the file,
    pipe or socket an open descriptor (an int) refers to."""
    if isinstance(target, int):
        target = os.readlink(f"/proc/self/fd/{target}")
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            count += os.readlink(f"/proc/self/fd/{fd}") == str(target)
        except OSError:
            pass
    return count


def page_file(tmp_path, pages: np.ndarray, name="pages", tail=b"tail") -> tuple[object, int]:
    """A file of 100 junk bytes, then ``pages`` with a 24-byte head before each, then ``tail``."""
    data = bytearray(os.urandom(100))
    for page in pages:
        data += os.urandom(24) + page.tobytes()
    path = tmp_path / name
    path.write_bytes(bytes(data) + tail)
    return path, 100 + 24


def test_pages_from_a_passed_file_land_as_from_the_socket(client, tmp_path):
    alloc = client.alloc(npages=20)
    pages = np.frombuffer(os.urandom(20 * PAGE), dtype=np.uint8).reshape(20, PAGE)
    path, offset = page_file(tmp_path, pages)
    hpas = list(reversed(alloc.hpas))
    client.max_data = 6 * PAGE                                     # four requests
    with open(path, "rb") as f:
        client.write_phys_pages_from_file(hpas, f.fileno(), offset, STRIDE)
        assert descriptors_of(path) == 1                           # ours: the platform kept none
        assert f.tell() == 0                                       # read with pread: position untouched
    assert client.read_phys_pages(hpas) == pages.tobytes()


def refused(client, hpas, fd, offset, stride=STRIDE, match=""):
    """The request is refused in one line, leaves the pages as they were and no descriptor open."""
    was = client.read_phys_pages(hpas)
    before = descriptors_of(fd)
    with pytest.raises(HostPortError, match=match) as exc:
        client.write_phys_pages_from_file(hpas, fd, offset, stride)
    assert "\n" not in exc.value.message
    assert descriptors_of(fd) == before
    assert client.read_phys_pages(hpas) == was
    return exc.value


def test_a_short_file_is_refused_and_nothing_is_written(client, tmp_path):
    alloc = client.alloc(npages=8)
    client.write_phys_pages(alloc.hpas, b"\x5a" * (8 * PAGE))
    pages = np.frombuffer(os.urandom(8 * PAGE), dtype=np.uint8).reshape(8, PAGE)
    path, offset = page_file(tmp_path, pages, tail=b"")
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) - 1)                      # the last page is one byte short
        err = refused(client, alloc.hpas, f.fileno(), offset, match="holds .* bytes; 8 pages from offset")
        assert isinstance(err, HostPortBadRequestError)
        refused(client, alloc.hpas, f.fileno(), offset + 10 * STRIDE, match="need")   # past the end


def test_a_file_that_ends_while_it_is_read_is_refused(client, tmp_path, monkeypatch):
    alloc = client.alloc(npages=300)
    pages = np.zeros((300, PAGE), dtype=np.uint8)
    path, offset = page_file(tmp_path, pages)
    real_fstat = os.fstat

    def grown(fd):      # the file looks longer than it is (it shrank after the size was taken)
        st = real_fstat(fd)
        return os.stat_result((st.st_mode, st.st_ino, st.st_dev, st.st_nlink, st.st_uid, st.st_gid,
                               st.st_size + 10 * STRIDE, st.st_atime, st.st_mtime, st.st_ctime))
    monkeypatch.setattr(hostport_server.os, "fstat", grown)
    with open(path, "rb") as f:
        refused(client, alloc.hpas, f.fileno(), offset + 5 * STRIDE, match="ended early, at byte")


def test_a_pipe_socket_or_directory_is_refused_without_waiting(client, tmp_path):
    alloc = client.alloc(npages=2)
    r, w = os.pipe()
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    fifo_fd = os.open(fifo, os.O_RDWR)              # open both ways: nothing would ever be written
    a, b = socket.socketpair()
    dir_fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for fd in (r, fifo_fd, a.fileno(), dir_fd):
            refused(client, alloc.hpas, fd, 0, match="not a regular file")
        assert not stat.S_ISREG(os.fstat(r).st_mode)
    finally:
        for fd in (r, w, fifo_fd, dir_fd):
            os.close(fd)
        a.close()
        b.close()


def test_a_file_the_platform_cannot_read_is_refused(client, tmp_path):
    alloc = client.alloc(npages=2)
    path = tmp_path / "write-only"
    path.write_bytes(bytes(3 * PAGE))
    fd = os.open(path, os.O_WRONLY)
    try:
        refused(client, alloc.hpas, fd, 0, PAGE, match="cannot read the file passed")
    finally:
        os.close(fd)


def raw_request(client, cmd, args, payload=b"", fds=()):
    return client._call(cmd, args, payload, fds=list(fds))


def test_descriptors_in_the_wrong_number_or_with_another_command_are_refused(client, tmp_path):
    alloc = client.alloc(npages=1)
    path = tmp_path / "one"
    path.write_bytes(bytes(PAGE))
    dpa = alloc.hpas[0].to_bytes(8, "little")
    file_args = {"count": 1, "file": {"offset": 0, "stride": PAGE}}
    with open(path, "rb") as f, open(path, "rb") as g:
        with pytest.raises(HostPortBadRequestError, match="exactly one file descriptor with the request, not 0"):
            raw_request(client, "write-phys-pages", file_args, dpa)
        with pytest.raises(HostPortBadRequestError, match="not 2"):
            raw_request(client, "write-phys-pages", file_args, dpa, [f.fileno(), g.fileno()])
        with pytest.raises(HostPortBadRequestError, match="but no 'file' argument"):
            raw_request(client, "write-phys-pages", {"count": 1}, dpa + bytes(PAGE), [f.fileno()])
        with pytest.raises(HostPortBadRequestError, match="platform-info takes no file descriptor"):
            raw_request(client, "platform-info", {}, b"", [f.fileno()])
        for bad in ({"offset": -1, "stride": PAGE}, {"offset": 0, "stride": PAGE - 1},
                    {"offset": 0, "stride": 1 << 30}, {"offset": 0}, [0, PAGE]):
            with pytest.raises(HostPortBadRequestError):
                raw_request(client, "write-phys-pages", {"count": 1, "file": bad}, dpa, [f.fileno()])
        with pytest.raises(HostPortBadRequestError, match="page addresses need 8"):
            raw_request(client, "write-phys-pages", file_args, dpa + b"x", [f.fileno()])
        assert descriptors_of(path) == 2                            # f and g: the platform kept none
    assert client.platform_info().chain_pem                         # the connection still serves


def test_pages_read_from_a_file_count_against_the_platforms_budget(identity, tmp_path):
    platform = Platform(identity, 16 * MiB, tmp_path / "platform")
    path = tmp_path / "pages"
    path.write_bytes(bytes(64 * PAGE))
    with serving(platform, frame_timeout=5, max_pending=32 * PAGE) as (sock, _):
        with HostPortClient(sock, timeout=10) as c:
            alloc = c.alloc(npages=64)
            with open(path, "rb") as f:
                c.write_phys_pages_from_file(alloc.hpas[:16], f.fileno(), 0, PAGE)    # within the budget
                with pytest.raises(HostPortBusyError, match="unfinished requests"):
                    c.write_phys_pages_from_file(alloc.hpas, f.fileno(), 0, PAGE)
                assert descriptors_of(path) == 1            # ours; the platform closed its copy


# ------------------------------------------------------------ a bundle loaded from its file

@pytest.fixture
def host(served):
    vmm = HostVmm(str(served[1]), timeout=30)
    yield vmm
    vmm.destroy()


def sealed_file(host, root, tmp_path):
    layout = host.allocate(64 * MiB)
    bundle, _ = seal(fake_bzimage(payload=os.urandom(100_000)), os.urandom(50_000), "console=ttyS0",
                     64 * MiB, Policy.make(), layout, root.certificate_pem)
    path = tmp_path / "guest.kd"
    bundle.write(path, durable=False)
    return bundle, path


def test_a_bundle_loaded_from_its_file_builds_the_domain_and_passes_every_check(host, root, tmp_path):
    bundle, path = sealed_file(host, root, tmp_path)
    host.load_file(path)
    assert descriptors_of(path) == 0                              # neither side kept the file open
    checks = host.verify()
    assert all(c.ok for c in checks), [(c.name, c.detail) for c in checks]
    image = next(p for p in bundle.pages if p.page_type == PageType.IMAGE)
    assert host.client.read_phys_pages([image.hpa]) == image.ciphertext


def test_a_tampered_file_with_a_fixed_checksum_fails_the_measurement(host, root, tmp_path):
    bundle, path = sealed_file(host, root, tmp_path)
    raw = bytearray(path.read_bytes())
    index = next(i for i, p in enumerate(bundle.pages) if p.page_type == PageType.IMAGE)
    offset, stride = bundle.ciphertext_in_file(len(raw))
    assert stride == PAGE_RECORD_SIZE
    raw[offset + index * stride + 100] ^= 1
    raw[-32:] = hashlib.sha256(raw[:-32]).digest()
    path.write_bytes(bytes(raw))
    host.load_file(path)
    assert {c.name for c in host.verify() if not c.ok} == {"measurement"}


def test_a_damaged_bundle_file_is_refused_before_anything_is_loaded(host, root, tmp_path):
    bundle, path = sealed_file(host, root, tmp_path)
    raw = path.read_bytes()
    path.write_bytes(raw[:-1])
    with pytest.raises(TruncatedError, match="guest.kd: bundle is truncated"):
        host.load_file(path)
    assert descriptors_of(path) == 0
    assert host.bundle is None
    with pytest.raises(FormatError, match="does not exist"):
        host.load_file(tmp_path / "missing.kd")


def test_a_frame_with_more_descriptors_than_allowed_ends_the_connection(served, tmp_path):
    path = tmp_path / "many"
    path.write_bytes(bytes(PAGE))
    with HostPortClient(served[1], timeout=10) as c, open(path, "rb") as f:
        sock = c._sock
        prefix = (64).to_bytes(4, "big")                  # a frame still being sent...
        for i in range(3):                                # ...two descriptors with each of its bytes
            socket.send_fds(sock, [prefix[i:i + 1]], [f.fileno(), f.fileno()])
        reply = sock.recv(65536)
        assert b"more than 4 file descriptors" in reply
        assert sock.recv(65536) == b""                    # and the platform closed the connection
        assert descriptors_of(path) == 1                  # ours alone


def test_short_reads_are_continued_where_they_stopped(client, tmp_path, monkeypatch):
    alloc = client.alloc(npages=300)
    pages = np.frombuffer(os.urandom(300 * PAGE), dtype=np.uint8).reshape(300, PAGE)
    path, offset = page_file(tmp_path, pages)

    def reluctant_preadv(fd, buffers, position):     # as a read cut short by a signal: 5000 bytes at most
        data = os.pread(fd, 5000, position)
        done = 0
        for buf in buffers:
            piece = data[done:done + len(buf)]
            memoryview(buf)[:len(piece)] = piece
            done += len(piece)
            if len(piece) < len(buf):
                break
        return done
    monkeypatch.setattr(hostport_server.os, "preadv", reluctant_preadv)
    with open(path, "rb") as f:
        client.write_phys_pages_from_file(alloc.hpas, f.fileno(), offset, STRIDE)
    assert client.read_phys_pages(alloc.hpas) == pages.tobytes()
