import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(autouse=True, scope="session")
def _isolated_state(tmp_path_factory):
    """Keep test state (logs, probe cache, throwaway CA) out of the user's state dir.

    The guest-image cache stays shared: building it is expensive and it is
    keyed by its inputs.
    """
    state = tmp_path_factory.mktemp("state")
    old = os.environ.get("QEMU_KD_STATE")
    os.environ["QEMU_KD_STATE"] = str(state)
    yield state
    if old is None:
        os.environ.pop("QEMU_KD_STATE", None)
    else:
        os.environ["QEMU_KD_STATE"] = old


@pytest.fixture(scope="session")
def guest_artifacts():
    """The default guest kernel and image (built once, then cached)."""
    from qemu_kd.guest_build import ensure_guest

    return ensure_guest()
