"""Test helper: module-scoped fixtures for one protected and one plain domain through the
Python API, and ``domain``, which runs a test on each.

Import the fixtures into a test module (``from tests.api_domains import domain, plain,
platform, protected``); each module that does gets its own platform and domains.
"""

from __future__ import annotations

import pytest

import qemu_kd


@pytest.fixture(scope="module")
def platform():
    with qemu_kd.Platform(accel="tcg") as p:
        yield p


@pytest.fixture(scope="module")
def protected(platform):
    dom = platform.launch(memory="256M")
    yield dom
    dom.destroy()


@pytest.fixture(scope="module")
def plain(platform):
    dom = platform.launch(plain=True, memory="256M")
    yield dom
    dom.destroy()


@pytest.fixture(params=["protected", "plain"])
def domain(request):
    return request.getfixturevalue(request.param)
