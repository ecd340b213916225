"""Test helper: a real protected domain (platform daemon process + host VMM + default guest).

Everything the host VMM receives is recorded: every host-port reply byte and
every byte from the shared channel, so leak tests can scan them.
"""

from __future__ import annotations

import base64
import socket
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from host_vmm.vmm import HostVmm
from qemu_kd.formats.layout import plan
from qemu_kd.qemu.launch import full_cmdline
from qemu_kd.hostport.spawn import start_platform_process, stop_platform_process
from qemu_kd.formats.policy import Policy
from qemu_kd.hostport.client import HostPortClient
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
    platform: object = None                         # the Platform itself when run in-process
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

    def pages_in_plaintext(self) -> list[int]:
        """The gpas of every guest page whose host view (the host port's read of its hpa,
        KeyID 0) equals its plaintext (debug-read): none, unless the platform leaks.

        The check is structural: it catches a leak of any page, whatever the page
        holds, where a canary scan catches only the pages that hold the canary.
        Needs DEBUG (for the plaintext).
        """
        guest_hpas = plan(self.vmm.layout).guest
        plain = np.frombuffer(self.debug_memory(), dtype=np.uint8).reshape(-1, PAGE)
        host = np.frombuffer(self.vmm.client.read_phys_pages(guest_hpas), dtype=np.uint8)
        same = (host.reshape(-1, PAGE) == plain[:len(guest_hpas)]).all(axis=1)
        return [int(i) * PAGE for i in np.flatnonzero(same)]


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
def in_process_platform(socket_path: Path, pstate: Path, memory_size: int):
    """The platform in this process (so a test can plant faults in it), served on
    ``socket_path`` as the daemon serves it."""
    from qemu_kd.platform.daemon import load_identity
    from qemu_kd.platform.hardware import Platform
    from qemu_kd.platform.hostport_server import HostPortServer

    _root, identity = load_identity(pstate)
    platform = Platform(identity, memory_size, socket_path.parent / "platform", qemu_accel="tcg")
    try:
        server = HostPortServer(platform, socket_path).start()
        try:
            yield platform
        finally:
            server.close()
    finally:
        platform.close()


@contextmanager
def protected_domain(workdir: Path, guest, *, debug: bool = False, mem_size: int = 256 * MiB,
                     ready_timeout: float = 120.0, in_process: bool = False, exposed_register_mask: int = 0):
    """Platform daemon, host VMM, seal, load, verify, launch; torn down on exit.

    ``in_process``: the platform runs in this process instead of a daemon
    (``ProtectedDomain.platform`` is then the Platform; ``platform_proc`` is None).
    ``exposed_register_mask``: the VMCS's hypercall register mask the tenant seals.
    The host VMM answers ECHO and HOST_TIME hypercalls on a connection of its own,
    recorded like the others.
    """
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    pstate = workdir / "pstate"
    with ExitStack() as stack:
        if in_process:
            psock, proc = workdir / "p.sock", None
            platform = stack.enter_context(in_process_platform(psock, pstate, mem_size + 64 * MiB))
        else:
            platform = None
            proc, psock = start_platform_process(workdir / "p.sock", pstate, accel="tcg",
                                                 memory_size=mem_size + 64 * MiB)
            stack.callback(stop_platform_process, proc)
        yield from _launched(workdir, guest, psock, proc, platform, pstate, debug, mem_size,
                             ready_timeout, exposed_register_mask)


@contextmanager
def in_process_domain(workdir: Path, guest, mem_size: int, platform_memory: int):
    """A protected domain of ``mem_size`` on a platform of ``platform_memory`` bytes that runs in
    this process (``ProtectedDomain.platform``), at ``workdir``; torn down on exit."""
    with in_process_platform(workdir / "p.sock", workdir / "pstate", platform_memory) as platform:
        yield from _launched(workdir, guest, workdir / "p.sock", None, platform, workdir / "pstate",
                             False, mem_size, 120.0)


def _launched(workdir, guest, psock, proc, platform, pstate, debug, mem_size, ready_timeout,
              exposed_register_mask=0):
    received: list = []
    vmm = None
    try:
        vmm = HostVmm(str(psock))
        vmm.client._sock = RecordingSocket(vmm.client._sock, received)

        def recorded_client():
            client = HostPortClient(str(psock), timeout=120)
            client._sock = RecordingSocket(client._sock, received)
            return client

        vmm.responder_client_factory = recorded_client
        layout = vmm.allocate(mem_size)
        policy = Policy.make(debug=debug)
        root_pem = (pstate / "root-ca.crt").read_bytes()
        bundle, secret = seal(guest.kernel.read_bytes(), guest.initrd.read_bytes(), full_cmdline(),
                               mem_size, policy, layout, root_pem,
                               exposed_register_mask=exposed_register_mask)
        vmm.load(bundle)
        vmm.launch(ready_timeout)
        vmm.agent.sock = RecordingSocket(vmm.agent.sock, received)
        yield ProtectedDomain(vmm, psock, proc, root_pem, policy, bundle.manifest.measurement, received,
                              secret, platform)
    finally:
        if vmm is not None:
            vmm.destroy()
