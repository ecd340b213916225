"""The pytest plugin (entry point ``pytest11``): ``kd_platform`` and ``kd_guest`` fixtures.

It stays idle until a test asks for one of its fixtures: it only adds its
``--kd-*`` options and the ``kd`` marker.  ``docs/api.md`` documents it.

- ``kd_platform`` (session scope): a :class:`qemu_kd.api.Platform` of this pytest
  process; under pytest-xdist every worker is its own process, so it gets its
  own daemon, runtime directory and domain names.
- ``kd_guest``: a ready domain (a protected one attested, its session open),
  destroyed after the test; ``--kd-mode both`` parametrizes it.  A protected one is
  restored from a snapshot (:class:`Snapshots`): the first test of each launch
  configuration boots a template guest with the RESTORABLE policy and snapshots it,
  and every test gets its own restore of that snapshot.  ``--kd-reset=boot`` or
  ``@pytest.mark.kd(cold=True)`` boots a fresh guest instead.

qemu-kd's own errors (QEMU missing, a guest that does not come up in time) fail
the test with their one-line message instead of a traceback.  A test that asks a
plain ``kd_guest`` for an attestation is skipped.
"""

from __future__ import annotations

import shutil
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import pytest

if TYPE_CHECKING:
    from qemu_kd.api import Domain, Platform, ProtectedDomain
    from qemu_kd.common.errors import KdError

MODES = ("plain", "protected", "both")
RESETS = ("snapshot", "boot")
MARKER_ARGS = ("memory", "debug", "image", "cmdline", "additions", "cold")
MARKER = ("kd(memory=None, debug=None, image=None, cmdline=None, additions=None, cold=False): "
          "how the qemu-kd plugin launches kd_guest for this test (image: a (kernel, initrd) pair; "
          "cold: boot a fresh guest instead of restoring a snapshot)")
SECTION_LIMIT = 64 * 1024
#: The domain a test's kd_guest fixture launched (for the failure report).
GUEST_KEY = pytest.StashKey["Domain"]()
#: The console of the template a test's kd_guest was restored from, up to its snapshot.
TEMPLATE_CONSOLE_KEY = pytest.StashKey[str]()
#: The name of the ``user_properties`` entry in which kd_guest says how it was set up.
PROPERTY = "qemu-kd"
#: How a kd_guest came to be (the ``guest`` of that entry).
RESTORED, SNAPSHOT_AND_RESTORED, BOOTED = "restored", "snapshot+restored", "booted"


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
    group.addoption("--kd-reset", choices=RESETS, default="snapshot",
                    help="how a protected kd_guest starts each test: snapshot (default: restore a "
                         "snapshot taken once per session and configuration) or boot (a cold boot)")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", MARKER)
    config.pluginmanager.register(SetupTally(), "qemu-kd-setup-tally")


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
        unknown = set(marker.kwargs) - set(MARKER_ARGS)
        if unknown or marker.args:
            raise pytest.UsageError(f"@pytest.mark.kd takes memory=, debug=, image=, cmdline=, "
                                    f"additions=, cold= (got {sorted(unknown) or list(marker.args)})")
        for key in ("memory", "debug", "additions"):
            if marker.kwargs.get(key) is not None:
                opts[key] = marker.kwargs[key]
        if marker.kwargs.get("cmdline"):
            opts["cmdline_extra"] = marker.kwargs["cmdline"]
        if marker.kwargs.get("image") is not None:
            opts["kernel"], opts["initrd"] = marker.kwargs["image"]
    return opts


def cold_boot(request: pytest.FixtureRequest, opts: dict[str, Any]) -> bool:
    """Whether this test's kd_guest boots instead of being restored from a snapshot: a plain
    guest, ``--kd-reset=boot``, or ``@pytest.mark.kd(cold=True)``."""
    marker = request.node.get_closest_marker("kd")
    return bool(opts["plain"] or request.config.getoption("kd_reset") == "boot"
                or (marker is not None and marker.kwargs.get("cold")))


def template_key(opts: dict[str, Any]) -> str:
    """What makes two launches the same guest: every launch argument but the ready timeout."""
    return repr(sorted((k, v) for k, v in opts.items() if k != "ready_timeout"))


@dataclass
class Template:
    """A booted guest's snapshot that kd_guest restores: ``domain`` (destroyed once snapshotted)
    is what :meth:`Platform.restore` needs as ``of``."""

    domain: "ProtectedDomain"
    path: Path
    console: str


@dataclass
class Snapshots:
    """The template snapshots of one pytest process (one xdist worker), one per launch
    configuration, in a private temporary directory removed by :meth:`close`.

    A template is booted with the RESTORABLE policy (so one snapshot restores any number of
    times), snapshotted before anything else happens to it, and destroyed.  A configuration
    whose template failed fails every later test that asks for it, with the same message.
    """

    platform: "Platform"
    directory: Path | None = None
    templates: dict[str, "Template | str"] = field(default_factory=dict)

    def template(self, opts: dict[str, Any]) -> tuple[Template, bool]:
        """The template of ``opts`` (launch arguments), and whether it was made just now."""
        from qemu_kd.common.errors import KdError

        key = template_key(opts)
        known = self.templates.get(key)
        if isinstance(known, str):
            raise _reset_failed(f"{known} (in an earlier test)")
        if known is not None:
            return known, False
        if self.directory is None:
            self.directory = Path(tempfile.mkdtemp(prefix="qemu-kd-snapshots-"))
        path = self.directory / f"template-{len(self.templates) + 1}.kdsnap"
        domain, step = None, "launch"
        try:
            domain = self.platform.launch(**opts, restorable=True)
            step = "snapshot"
            domain.snapshot(path)
            console = domain.console_text()
        except (KdError, OSError) as exc:
            self.templates[key] = f"the template guest for snapshot reset failed to {step}: {_one_line(exc)}"
            raise _reset_failed(self.templates[key]) from None
        finally:
            if domain is not None:
                domain.destroy()
        made = self.templates[key] = Template(domain, path, console)
        return made, True

    def restore(self, opts: dict[str, Any]) -> tuple["ProtectedDomain", Template, bool]:
        """A new restore of the template of ``opts`` (attested, its session open), its template,
        and whether the template was made for it."""
        from qemu_kd.common.errors import KdError

        template, made = self.template(opts)
        try:
            guest = self.platform.restore(template.path, of=template.domain,
                                          ready_timeout=opts["ready_timeout"])
        except (KdError, OSError) as exc:
            raise _reset_failed(f"restoring kd_guest from its snapshot failed: {_one_line(exc)}") from None
        return guest, template, made

    def close(self) -> None:
        if self.directory is not None:
            shutil.rmtree(self.directory, ignore_errors=True)
            self.directory = None


def _reset_failed(message: str) -> KdError:
    """kd_guest's snapshot reset failed: one line, and the cold boot as the hint."""
    from qemu_kd.common.errors import KdError

    return KdError(message, "boot fresh guests instead with --kd-reset=boot, "
                            "or @pytest.mark.kd(cold=True) for one test")


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


@pytest.fixture(scope="session")
def _kd_snapshots(kd_platform: "Platform") -> Iterator[Snapshots]:
    """The template snapshots kd_guest restores (this process's; removed at the end)."""
    snapshots = Snapshots(kd_platform)
    try:
        yield snapshots
    finally:
        snapshots.close()


@pytest.fixture
def kd_guest(request: pytest.FixtureRequest, kd_platform: "Platform",
             _kd_snapshots: Snapshots) -> Iterator["Domain"]:
    """A ready guest (protected: attested, its session open), destroyed after the test.  A
    protected one is a restore of a snapshot taken once per configuration, unless
    ``--kd-reset=boot`` or ``@pytest.mark.kd(cold=True)`` asks for a cold boot."""
    from qemu_kd.common.errors import KdError

    opts = launch_options(request)
    start = time.monotonic()
    try:
        if cold_boot(request, opts):
            guest, how = kd_platform.launch(**opts), BOOTED
        else:
            guest, template, made = _kd_snapshots.restore(opts)
            how = SNAPSHOT_AND_RESTORED if made else RESTORED
            request.node.stash[TEMPLATE_CONSOLE_KEY] = template.console
    except KdError as exc:
        _fail(exc)
    request.node.user_properties.append(
        (PROPERTY, {"guest": how, "mode": guest.mode, "setup_s": round(time.monotonic() - start, 3)}))
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
    console = guest.console_text()
    template = item.stash.get(TEMPLATE_CONSOLE_KEY, None)
    if template is not None and guest.restored_from is not None:
        console = f"{template}\n--- [qemu-kd] snapshot taken here; {guest.name} restored from it ---\n{console}"
    report.sections.append((f"kd console ({guest.name})", _tail(console)))
    if guest.protected:
        report.sections.append((f"kd audit ({guest.name})", _tail(guest.audit_text())))


class SetupTally:
    """Counts how each kd_guest was set up (from the ``qemu-kd`` user property of the setup
    reports, which pytest-xdist's workers send to the controller) and prints one summary line:
    restores, snapshots taken, cold boots, and the median set-up time of each."""

    def __init__(self) -> None:
        self.setups: dict[str, list[float]] = {}

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        if report.when != "setup":
            return
        for name, value in report.user_properties:
            if name == PROPERTY and isinstance(value, dict):
                kind = value["guest"] if value.get("mode") != "plain" else "booted plain"
                self.setups.setdefault(kind, []).append(float(value["setup_s"]))

    def line(self) -> str | None:
        if not self.setups:
            return None

        def median(kind: str) -> str:
            return f"median {statistics.median(self.setups[kind]):.1f} s"

        parts = []
        again, first = self.setups.get(RESTORED, []), self.setups.get(SNAPSHOT_AND_RESTORED, [])
        if again or first:
            times = [f"restore {median(RESTORED)}"] if again else []
            if first:
                times.append(f"boot, snapshot and restore {median(SNAPSHOT_AND_RESTORED)}")
            parts.append(f"{len(again) + len(first)} restored from {len(first)} "
                         f"snapshot{'' if len(first) == 1 else 's'} ({'; '.join(times)})")
        for kind, what in ((BOOTED, "booted protected"), ("booted plain", "booted plain")):
            if kind in self.setups:
                parts.append(f"{len(self.setups[kind])} {what} ({median(kind)})")
        return "qemu-kd: kd_guest set-ups: " + ", ".join(parts)

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        line = self.line()
        if line is not None:
            terminalreporter.write_line(line)
