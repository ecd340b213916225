"""``qemu-kd ls``'s MEMORY and UPTIME columns, and ``qemu-kd run --platform SOCKET``."""

from __future__ import annotations

from qemu_kd.cli.domains import DomainRef, format_domains, short_duration, short_size

MiB = 1 << 20


def domain(keyid: int, status: dict) -> DomainRef:
    return DomainRef({"pid": 7, "socket": "/run/p7/platform.sock", "accel": "tcg"},
                     {"keyid": keyid, "name": f"kd{keyid}", "state": "LAUNCHED", "running": True,
                      "policy": {"debug": False, "hex": ""}, "endpoints": {}, **status})


def test_ls_table_shows_memory_and_uptime():
    lines = format_domains([domain(1, {"memory": 256 * MiB, "uptime": 65.4}),
                            domain(2, {"memory": 1 << 30, "uptime": 3 * 3600 + 7 * 60 + 9}),
                            domain(3, {})]).splitlines()
    header = lines[0].split()
    memory, uptime = header.index("MEMORY"), header.index("UPTIME")
    assert [line.split()[memory] for line in lines[1:]] == ["256M", "1G", "-"]
    assert [line.split()[uptime] for line in lines[1:]] == ["1m05s", "3h07m", "-"]


def test_short_sizes_and_durations():
    assert [short_size(s) for s in (None, 64 * MiB, 1536 * MiB, 2 << 30, 5000)] == \
        ["-", "64M", "1536M", "2G", "5000B"]
    assert [short_duration(s) for s in (None, 0.4, 59.9, 60, 3599, 3600, 86400 + 7200)] == \
        ["-", "0s", "59s", "1m00s", "59m59s", "1h00m", "1d02h"]
