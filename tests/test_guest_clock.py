"""A protected guest keeps time: the platform's tsc_early_khz reaches its command line.

The measured command line carries no tsc_early_khz (so the measurement does not
depend on the host); the platform appends its own processor's at launch.  Without
it, Linux under TCG without firmware would mark its TSC unstable.
"""

from __future__ import annotations

import re
import time

import pytest

from protected import protected_domain

pytestmark = pytest.mark.qemu

HOST_SLEEP = 8.0


def guest_uptime(session) -> float:
    result = session.exec(["cat", "/proc/uptime"], timeout=30)
    assert result["rc"] == 0, result
    return float(result["stdout"].split()[0])


def test_protected_guest_clock_runs_at_the_host_rate(guest_artifacts, tmp_path):
    with protected_domain(tmp_path / "clock", guest_artifacts) as dom:
        session = dom.session()
        cmdline = session.exec(["cat", "/proc/cmdline"], timeout=30)["stdout"].decode()
        found = re.search(r"(?:^|\s)tsc_early_khz=(\d+)(?:\s|$)", cmdline)
        assert found and int(found.group(1)) > 0, cmdline

        outer_start = time.monotonic()
        first = guest_uptime(session)
        inner_start = time.monotonic()
        time.sleep(HOST_SLEEP)
        inner_end = time.monotonic()
        second = guest_uptime(session)
        outer_end = time.monotonic()

        guest_elapsed = second - first
        # The guest's readings fall between the inner and the outer host interval; the
        # tolerance is for the clock's rate, not for speed.
        assert 0.8 * (inner_end - inner_start) <= guest_elapsed <= 1.25 * (outer_end - outer_start), \
            (guest_elapsed, inner_end - inner_start, outer_end - outer_start)

        dmesg = session.exec(["dmesg"], timeout=30)
        if dmesg["rc"] == 0:
            log = dmesg["stdout"].decode(errors="replace")
            unstable = [line for line in log.splitlines()
                        if "tsc" in line.lower() and "unstable" in line.lower()]
            assert not unstable, unstable
