"""Fixtures for tests of restore inside the platform: a protected domain of 128 MiB on an
in-process platform with room for a restored copy, and a snapshot service of its own per test.

A test module takes them with ``dom, service = restore_fixtures.dom, restore_fixtures.service``.
"""

from __future__ import annotations

import pytest

from protected import in_process_domain
from qemu_kd.platform.snapshot import SnapshotService

MiB = 1 << 20
GUEST = 128 * MiB


@pytest.fixture(scope="module")
def dom(guest_artifacts, tmp_path_factory):
    """A protected domain of 128 MiB on an in-process platform with room for a restored copy."""
    work = tmp_path_factory.mktemp("restore")
    with in_process_domain(work, guest_artifacts, GUEST, 2 * GUEST + 64 * MiB) as d:
        yield d


@pytest.fixture
def service(dom, tmp_path):
    return SnapshotService(dom.platform, tmp_path / "pstate")
