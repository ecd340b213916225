"""One logging configuration for qemu-kd processes (qemu_kd.common.log)."""

import io
import logging

import pytest

from qemu_kd.common import log as kdlog


@pytest.fixture
def restore_logging():
    root = logging.getLogger()
    saved = (root.level, list(root.handlers), logging.getLogger("qemu.qmp").level)
    yield
    if kdlog._handler is not None:
        root.removeHandler(kdlog._handler)
        kdlog._handler = None
    root.setLevel(saved[0])
    for handler in saved[1]:
        if handler not in root.handlers:
            root.addHandler(handler)
    logging.getLogger("qemu.qmp").setLevel(saved[2])


def test_default_level_and_format(monkeypatch, restore_logging):
    monkeypatch.delenv(kdlog.ENV_VAR, raising=False)
    out = io.StringIO()
    assert kdlog.configure(logging.INFO, stream=out) == logging.INFO
    logging.getLogger("qemu_kd.example").info("hello %s", "there")
    logging.getLogger("qemu_kd.example").debug("not shown")
    lines = out.getvalue().splitlines()
    assert len(lines) == 1
    assert lines[0].endswith(" qemu_kd.example INFO: hello there")
    assert lines[0][:4].isdigit()                        # starts with the time
    assert logging.getLogger("qemu.qmp").getEffectiveLevel() == logging.WARNING


@pytest.mark.parametrize("value, level", [("debug", logging.DEBUG), (" ERROR ", logging.ERROR),
                                          ("15", 15), ("nonsense", logging.WARNING),
                                          ("", logging.WARNING)])
def test_level_from_the_environment(monkeypatch, restore_logging, value, level):
    monkeypatch.setenv(kdlog.ENV_VAR, value)
    assert kdlog.configure(stream=io.StringIO()) == level
    assert logging.getLogger().level == level


def test_configuring_twice_does_not_duplicate_records(monkeypatch, restore_logging):
    monkeypatch.delenv(kdlog.ENV_VAR, raising=False)
    first, second = io.StringIO(), io.StringIO()
    kdlog.configure("INFO", stream=first)
    kdlog.configure("INFO", stream=second)
    logging.getLogger("qemu_kd.example").warning("once")
    assert first.getvalue() == "" and second.getvalue().count("once") == 1
