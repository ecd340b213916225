"""restore-kd's own steps without a guest: reading the snapshot file and its page list, and the
guest RAM a restore fills for launch (docs/snapshots.md)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from qemu_kd.formats.snapshot import PageList
from qemu_kd.platform import snapshot as snapshot_module
from qemu_kd.platform.snapshot import SnapshotRefused, _read


def test_the_snapshot_is_read_whole_and_exactly(tmp_path):
    path = tmp_path / "s.kdsnap"
    data = os.urandom(3 * 4096 + 17)
    path.write_bytes(data)
    assert bytes(_read(path)) == data


def test_a_snapshot_that_grows_while_it_is_read_is_refused(tmp_path, monkeypatch):
    path = tmp_path / "s.kdsnap"
    path.write_bytes(os.urandom(8192))
    real_fstat = os.fstat

    def smaller(fd):   # the file as it was before a writer appended to it
        info = real_fstat(fd)
        return os.stat_result((info.st_mode, info.st_ino, info.st_dev, info.st_nlink, info.st_uid,
                               info.st_gid, 4096, info.st_atime, info.st_mtime, info.st_ctime))

    monkeypatch.setattr(snapshot_module.os, "fstat", smaller)
    with pytest.raises(SnapshotRefused, match="grew while it was read"):
        _read(path)


def test_reading_a_snapshot_reserves_memory_for_its_size_only(tmp_path):
    """A small snapshot is read within a 3 GiB address-space limit (the read's buffer is the
    file's size, not the largest snapshot the platform would read)."""
    path = tmp_path / "s.kdsnap"
    path.write_bytes(os.urandom(4096))
    code = textwrap.dedent(f"""
        import resource
        from pathlib import Path
        from qemu_kd.platform.snapshot import _read
        resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))
        assert len(_read(Path({str(path)!r}))) == 4096
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, "OPENBLAS_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-2000:]


def test_the_page_list_round_trips_as_arrays():
    rows = PageList(np.arange(5, dtype=np.uint64) * 4096, np.arange(5, 10, dtype=np.uint64) * 4096,
                    [1, 1, 2, 1, 2], [7, 3, 3, 1, 7])
    packed = rows.pack()
    assert len(packed) == 5 * 24
    back = PageList.unpack(memoryview(packed))
    assert back.gpas.tolist() == rows.gpas.tolist() and back.hpas.tolist() == rows.hpas.tolist()
    assert back.types.tolist() == [1, 1, 2, 1, 2] and back.perms.tolist() == [7, 3, 3, 1, 7]
    # The same bytes as one struct per row ("<QQBBB5x": flags 0, no page flagged zero).
    import struct

    assert packed[:24] == struct.pack("<QQBBB5x", 0, 5 * 4096, 1, 7, 0)


def test_the_page_list_flags_zero_pages_and_sizes_the_memory_section():
    """A sparse snapshot: pages flagged zero carry no ciphertext, so the memory section holds
    exactly the other pages; the flag is the fifth byte of a row (docs/formats.md §16)."""
    import struct

    rows = PageList(np.arange(4, dtype=np.uint64) * 4096, np.arange(4, 8, dtype=np.uint64) * 4096,
                    [1, 2, 2, 1], [7, 7, 3, 7], [False, True, True, False])
    packed = rows.pack()
    assert packed[24:48] == struct.pack("<QQBBB5x", 4096, 5 * 4096, 2, 7, 1)
    back = PageList.unpack(packed)
    assert back.zero.tolist() == [False, True, True, False]
    assert back.data_pages == 2 and back.memory_size() == 2 * 4096
    # without flags, no page is zero: every page is carried
    assert PageList(rows.gpas, rows.hpas, rows.types, rows.perms).memory_size() == 4 * 4096


@pytest.mark.parametrize("offset, value, match", [(18, 0x02, "unknown page flags"),
                                                  (18, 0x81, "unknown page flags"),
                                                  (19, 0x01, "reserved bytes"),
                                                  (23, 0x01, "reserved bytes")])
def test_a_page_list_with_unknown_flags_or_reserved_bytes_is_refused(offset, value, match):
    from qemu_kd.formats.errors import FormatError

    packed = bytearray(PageList([0, 4096], [8192, 12288], [1, 2], [7, 7], [False, True]).pack())
    packed[24 + offset] = value
    with pytest.raises(FormatError, match=match):
        PageList.unpack(bytes(packed))
