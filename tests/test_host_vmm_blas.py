"""The host VMM process keeps numpy's BLAS to one thread (no QEMU, no platform).

Its BLAS library would otherwise start worker threads as numpy loads, which spin on the
CPUs the platform daemon and the caller start on at the same moment."""

from __future__ import annotations

import os
import time
from pathlib import Path

from host_vmm.process import HostVmmProcess


def _loaded_blas(pid: int) -> bool:
    try:
        return "openblas" in Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return False


def test_the_host_vmm_process_starts_no_blas_worker_threads(tmp_path, monkeypatch):
    monkeypatch.delenv("OPENBLAS_NUM_THREADS", raising=False)
    # No platform: the process imports its modules, then waits for the platform's socket.
    host = HostVmmProcess(str(tmp_path / "none.sock"), str(tmp_path / "vmm.sock"), wait_platform=60,
                          wait_ready=False)
    try:
        pid = host.proc.pid
        deadline = time.monotonic() + 60
        while not _loaded_blas(pid) and time.monotonic() < deadline and host.proc.poll() is None:
            time.sleep(0.02)
        assert _loaded_blas(pid), "the host VMM process never loaded numpy"
        time.sleep(0.5)                  # its BLAS library has started whatever threads it starts
        assert host.proc.poll() is None
        assert len(os.listdir(f"/proc/{pid}/task")) == 1
    finally:
        host.stop()
