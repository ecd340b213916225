"""Test helper: a real protected domain (platform daemon process + host VMM + default guest).

Everything the host VMM receives is recorded: every host-port reply byte and
every byte from the shared channel, so leak tests can scan them.
"""

from __future__ import annotations

import base64
import socket
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from host_vmm.vmm import HostVmm
from qemu_kd.qemu.launch import full_cmdline
from qemu_kd.hostport.spawn import start_platform_process, stop_platform_process
from qemu_kd.formats.policy import Policy
from qemu_kd.tenant.session import TenantSession, attest
from qemu_kd.tenant.seal import seal

MiB = 1 << 20
PAGE = 4096


class RecordingSocket:
    """A socket that keeps a copy of every byte it receives, as one stream.

    The copy is a single bytearray appended to ``sink``, so a canary split across
    two reads is still found.
    """

    def __init__(self, sock: socket.socket, sink: list):
        self._sock = sock
        self._stream = bytearray()
        sink.append(self._stream)

    def recv(self, n, *flags):
        data = self._sock.recv(n, *flags)
        self._stream += data
        return data

    def recv_into(self, buf, n=0, *flags):
        k = self._sock.recv_into(buf, n, *flags)
        self._stream += memoryview(buf)[:k]
        return k

    def __getattr__(self, name):
        return getattr(self._sock, name)


@dataclass
class ProtectedDomain:
    vmm: HostVmm
    platform_socket: Path
    platform_proc: object
    root_pem: bytes
    policy: Policy
    expected: bytes
    received: list = field(default_factory=list)    # one bytearray per recorded stream
    secret: object = None                           # the TenantSecret: the domain key stays here
    _session: object = None

    @property
    def keyid(self) -> int:
        return self.vmm.keyid

    @property
    def endpoints(self) -> dict:
        return self.vmm.endpoints

    def agent(self, cmd: str, wait: float = 60.0, **args) -> dict:
        return self.vmm.agent.call(cmd, wait=wait, **args)

    def relay(self, cmd: str, wait: float = 60.0, **args) -> dict:
        """The tenant's requests, relayed by the host VMM (as in ``qemu-kd run``)."""
        return self.agent(cmd, wait=wait, **args)

    def attest(self):
        """Attest with a fresh nonce through the host; the verified attestation."""
        layout = self.vmm.layout
        return attest(self.relay, root_pem=self.root_pem, chain_pem=layout.platform_chain_pem,
                      measurement=self.expected, policy=self.policy, host_data=layout.host_data)

    def session(self) -> TenantSession:
        """The tenant's attested session (opened once, then reused)."""
        if self._session is None:
            self._session = TenantSession(self.relay, self.attest(), self.secret.key)
        return self._session

    def plant_secret(self, secret: bytes, path: str = "/run/secrets/canary") -> None:
        """Release ``secret`` to the guest through the tenant session; it lands in a tmpfs file.

        Only session ciphertext crosses the shared channel.
        """
        assert self.session().put_secret(path, secret) == len(secret)

    def host_memory_view(self) -> bytes:
        """Every page of the domain's layout, read through the host port (KeyID 0)."""
        return self.vmm.client.read_phys_pages(self.vmm.layout.hpas)

    def debug_memory(self) -> bytes:
        """All guest memory through debug-read (refused without DEBUG)."""
        size = self.vmm.layout.memory_size
        return b"".join(self.vmm.client.debug_read(self.keyid, gpa, MiB) for gpa in range(0, size, MiB))


def canary_forms(canary: bytes) -> dict[str, bytes]:
    """The canary as raw bytes, hex (both cases) and base64 at each of the three alignments."""
    forms = {"raw": canary, "hex": canary.hex().encode(), "HEX": canary.hex().upper().encode()}
    for pad in range(3):
        encoded = base64.b64encode(b"\0" * pad + canary)
        # Drop characters that mix in the padding or whatever follows the canary.
        start = (0, 2, 3)[pad]
        forms[f"base64+{pad}"] = encoded[start:len(encoded) - 4]
    return forms


def count_hits(haystacks, canary: bytes) -> dict[str, int]:
    """How often each form of the canary occurs across ``haystacks``."""
    forms = canary_forms(canary)
    hits = {name: 0 for name in forms}
    for data in haystacks:
        for name, form in forms.items():
            hits[name] += data.count(form)
    return {name: n for name, n in hits.items() if n}


@contextmanager
def protected_domain(workdir: Path, guest, *, debug: bool = False, mem_size: int = 256 * MiB,
                     ready_timeout: float = 120.0):
    """Platform daemon, host VMM, seal, load, verify, launch; torn down on exit."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    pstate = workdir / "pstate"
    proc, psock = start_platform_process(workdir / "p.sock", pstate, accel="tcg",
                                         memory_size=mem_size + 64 * MiB)
    received: list = []
    vmm = None
    try:
        vmm = HostVmm(str(psock))
        vmm.client._sock = RecordingSocket(vmm.client._sock, received)
        layout = vmm.allocate(mem_size)
        policy = Policy.make(debug=debug)
        root_pem = (pstate / "root-ca.crt").read_bytes()
        bundle, secret = seal(guest.kernel.read_bytes(), guest.initrd.read_bytes(), full_cmdline(),
                               mem_size, policy, layout, root_pem)
        vmm.load(bundle)
        vmm.launch(ready_timeout)
        vmm.agent.sock = RecordingSocket(vmm.agent.sock, received)
        yield ProtectedDomain(vmm, psock, proc, root_pem, policy, bundle.manifest.measurement, received,
                              secret)
    finally:
        if vmm is not None:
            vmm.destroy()
        stop_platform_process(proc)
