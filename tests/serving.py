"""A host-port server on a platform, for tests that talk to the platform over its socket."""

from __future__ import annotations

import tempfile
from contextlib import contextmanager
from pathlib import Path

from qemu_kd.platform.hostport_server import HostPortServer


@contextmanager
def serving(platform, **server_args):
    """Serve ``platform``'s host port on a short socket path (AF_UNIX allows 108 bytes);
    yields (socket path, server). The server and then the platform are closed afterwards."""
    with tempfile.TemporaryDirectory(prefix="kd-") as sockdir:
        path = Path(sockdir) / "host.sock"
        try:
            server = HostPortServer(platform, path, **server_args).start()
        except BaseException:
            platform.close()
            raise
        try:
            yield path, server
        finally:
            server.close()
            platform.close()
