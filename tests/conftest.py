import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(autouse=True, scope="session")
def _isolated_state(tmp_path_factory):
    """Keep test state (logs, probe cache, throwaway CA) and runtime files (sockets, the
    platform registry) out of the user's directories.

    The guest-image cache stays shared: building it is expensive and it is
    keyed by its inputs.
    """
    import shutil
    import tempfile

    state = tmp_path_factory.mktemp("state")
    # Sockets need short paths (108 bytes), so the runtime directory is a short one in /tmp.
    runtime = tempfile.mkdtemp(prefix="qemu-kd-test-")
    saved = {name: os.environ.get(name) for name in ("QEMU_KD_STATE", "QEMU_KD_RUNTIME")}
    os.environ["QEMU_KD_STATE"] = str(state)
    os.environ["QEMU_KD_RUNTIME"] = runtime
    yield state
    from leftovers import stop_registered_platforms

    # A test that failed half-way may have left a kept domain's platform running.
    stop_registered_platforms(Path(runtime))
    shutil.rmtree(runtime, ignore_errors=True)
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


@pytest.fixture(scope="session")
def guest_artifacts():
    """The default guest kernel and image (built once, then cached)."""
    from qemu_kd.guest.cache import ensure_guest

    return ensure_guest()


@pytest.fixture(scope="module")
def root():
    """A throwaway root CA for one test module (nothing written to the state directory)."""
    from qemu_kd.platform.identity import RootCA

    return RootCA.create_throwaway()


@pytest.fixture(scope="module")
def identity(root):
    """A throwaway platform identity signed by ``root``, for one test module."""
    from qemu_kd.platform.identity import PlatformIdentity

    return PlatformIdentity.create_throwaway(root)
