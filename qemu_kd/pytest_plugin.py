"""The pytest plugin (entry point ``pytest11``): ``kd_platform`` and ``kd_guest`` fixtures.

It stays idle until a test asks for one of its fixtures: it only adds its
``--kd-*`` options and the ``kd`` marker.  ``docs/api.md`` documents it.

- ``kd_platform`` (session scope): a :class:`qemu_kd.api.Platform` of this pytest
  process; under pytest-xdist every worker is its own process, so it gets its
  own daemon, runtime directory and domain names.
- ``kd_guest``: a ready domain (a protected one attested, its session open),
  destroyed after the test; ``--kd-mode both`` parametrizes it.

qemu-kd's own errors (QEMU missing, a guest that does not come up in time) fail
the test with their one-line message instead of a traceback.  A test that asks a
plain ``kd_guest`` for an attestation is skipped.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Iterator

import pytest

if TYPE_CHECKING:
    from qemu_kd.api import Domain, Platform

MODES = ("plain", "protected", "both")
MARKER = ("kd(memory=None, debug=None, image=None, cmdline=None, additions=None): "
          "how the qemu-kd plugin launches kd_guest for this test (image: a (kernel, initrd) pair)")
SECTION_LIMIT = 64 * 1024
#: The domain a test's kd_guest fixture launched (for the failure report).
GUEST_KEY = pytest.StashKey["Domain"]()


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("qemu-kd", "qemu-kd guests (kd_platform, kd_guest)")
    group.addoption("--kd-mode", choices=MODES, default="protected",
                    help="kd_guest's mode: plain, protected (default) or both (each test runs twice)")
    group.addoption("--kd-debug", action="store_true", default=False,
                    help="launch protected guests with the DEBUG policy")
    group.addoption("--kd-memory", default="256M", metavar="SIZE", help="guest memory (default 256M)")
    group.addoption("--kd-accel", choices=("auto", "tcg", "kvm"), default="auto",
                    help="QEMU accelerator (default auto: KVM when it works)")
    group.addoption("--kd-ready-timeout", type=float, default=120.0, metavar="S",
                    help="seconds for a guest to come up before the test fails (default 120)")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", MARKER)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "kd_guest" in metafunc.fixturenames and metafunc.config.getoption("kd_mode") == "both":
        metafunc.parametrize("kd_guest", ["plain", "protected"], indirect=True)


def _fail(exc: Exception) -> None:
    pytest.fail(f"qemu-kd: {exc}", pytrace=False)


@pytest.fixture(scope="session")
def kd_platform(request: pytest.FixtureRequest) -> Iterator["Platform"]:
    """The qemu-kd platform of this pytest process (a daemon started here, stopped at the end)."""
    from qemu_kd.api import Platform
    from qemu_kd.common.errors import KdError

    platform = Platform(accel=request.config.getoption("kd_accel"))
    try:
        platform.start()
    except KdError as exc:
        platform.close()
        _fail(exc)
    try:
        yield platform
    finally:
        platform.close()


def launch_options(request: pytest.FixtureRequest) -> dict[str, Any]:
    """``Platform.launch`` arguments from the options and the test's ``kd`` marker."""
    config = request.config
    mode = getattr(request, "param", None) or config.getoption("kd_mode")
    if mode == "both":
        mode = "protected"
    opts: dict[str, Any] = {"plain": mode == "plain", "memory": config.getoption("kd_memory"),
                            "debug": config.getoption("kd_debug"),
                            "ready_timeout": config.getoption("kd_ready_timeout")}
    marker = request.node.get_closest_marker("kd")
    if marker is not None:
        unknown = set(marker.kwargs) - {"memory", "debug", "image", "cmdline", "additions"}
        if unknown or marker.args:
            raise pytest.UsageError(f"@pytest.mark.kd takes memory=, debug=, image=, cmdline=, "
                                    f"additions= (got {sorted(unknown) or list(marker.args)})")
        for key in ("memory", "debug", "additions"):
            if marker.kwargs.get(key) is not None:
                opts[key] = marker.kwargs[key]
        if marker.kwargs.get("cmdline"):
            opts["cmdline_extra"] = marker.kwargs["cmdline"]
        if marker.kwargs.get("image") is not None:
            opts["kernel"], opts["initrd"] = marker.kwargs["image"]
    return opts


@pytest.fixture
def kd_guest(request: pytest.FixtureRequest, kd_platform: "Platform") -> Iterator["Domain"]:
    """A ready guest (protected: attested, its session open), destroyed after the test."""
    from qemu_kd.common.errors import KdError

    try:
        guest = kd_platform.launch(**launch_options(request))
    except KdError as exc:
        _fail(exc)
    request.node.stash[GUEST_KEY] = guest
    try:
        yield guest
    finally:
        try:
            guest.destroy()
        except KdError:
            pass


@pytest.hookimpl(wrapper=True)
def pytest_pyfunc_call(pyfuncitem: pytest.Function) -> Iterator[None]:
    """A test that attests a plain kd_guest is skipped: no platform can attest a plain guest, so
    under ``--kd-mode both`` the test counts once, for the protected guest."""
    from qemu_kd.api import NotProtectedError

    try:
        return (yield)
    except NotProtectedError as exc:
        guest = pyfuncitem.stash.get(GUEST_KEY, None)
        if guest is None or guest.protected:
            raise
        pytest.skip(f"qemu-kd: {exc.message}")


def _tail(text: str) -> str:
    return text if len(text) <= SECTION_LIMIT else "...\n" + text[-SECTION_LIMIT:]


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()
    if not report.failed:
        return
    guest = item.stash.get(GUEST_KEY, None)
    if guest is None:
        return
    report.sections.append((f"kd console ({guest.name})", _tail(guest.console_text())))
    if guest.protected:
        report.sections.append((f"kd audit ({guest.name})", _tail(guest.audit_text())))
