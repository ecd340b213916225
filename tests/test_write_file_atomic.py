"""write_file_atomic: a file written whole or not at all, from its bytes or from its parts."""

from __future__ import annotations

import numpy as np
import pytest

from qemu_kd.common.files import write_file_atomic


def test_bytes_or_parts_give_the_same_file(tmp_path):
    whole, parted = tmp_path / "whole", tmp_path / "parted"
    records = np.arange(1000, dtype="<u8")
    write_file_atomic(whole, b"head" + records.tobytes() + b"tail")
    write_file_atomic(parted, iter([b"head", memoryview(records).cast("B"), bytearray(b"tail")]))
    assert parted.read_bytes() == whole.read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["parted", "whole"]


def test_parts_that_fail_midway_leave_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "f"
    write_file_atomic(path, b"old")

    def parts():
        yield b"new, but "
        raise RuntimeError("the next part could not be made")

    with pytest.raises(RuntimeError):
        write_file_atomic(path, parts(), durable=False)
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["f"]
