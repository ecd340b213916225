"""The guest's side of host-requested VMCS/EPT changes (docs/protocol.md).

The host asks on the shared channel (``control``); this module checks the
request against the guest's control policy, a JSON file that is part of the
measured image (:data:`POLICY_FILE`; docs/protocol.md lists the settings and
their defaults), does the Linux side of the change and asks the platform on
the guest port to seal the new control structures (``controls-seal``):
balloon out and in, relocation, sharing a buffer of its choosing with the host
(and making it private again), and VMCS writes (the exit interval, a narrower
exposed-register mask).  The
answer to the host is the guest's verdict: ``accepted`` with the sealed
update, or ``refused`` with the reason.  A refused request changes nothing.

Ballooning from user space.  Balloon out allocates anonymous memory, turns
transparent huge pages off for it, locks it (``mlock``), touches every page
and reads each page's frame number from ``/proc/self/pagemap``: those frames
are the gpas the guest gives up.  ``vm.compact_unevictable_allowed`` is set to
0 so compaction never migrates the locked pages.  The memory stays held by
this process for as long as the pages are out.  Balloon in names such gpas
for the host's fresh pages; once the platform has installed the update (it
then maps zeroed pages there), the agent unmaps that memory and Linux has the
pages back.  Limits: Linux still counts the ballooned pages as used memory;
the platform cannot fault a guest that touched an unmapped gpa (it would read
zeros), which only a kernel bug could do, since nothing but this process maps
them; and memory hot-unplug or CMA could still migrate locked pages.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import struct

POLICY_FILE = "/etc/kd-control-policy.json"
POLICY_VERSION = 1
#: What the guest accepts when the image carries no policy file.
DEFAULT_POLICY = {
    "memory_floor_mib": 128,
    "max_pages_per_request": 65536,
    "min_exit_interval_ms": 20,
    "allow_balloon": True,
    "allow_relocate": True,
    "allow_share": True,
    "max_shared_pages": 1024,
}
PAGE = 4096
# VMCS field encodings the guest reasons about (docs/formats.md §3).
VMCS_EXPOSED_MASK = 0x2202
VMCS_EXIT_INTERVAL = 0x4202
_CLASS_GUEST = 2
#: Seconds the platform may take to seal (the update crosses the guest port, a serial line).
SEAL_TIMEOUT = 600.0

_PROT_RW = 0x1 | 0x2
_MAP_PRIVATE_ANON = 0x02 | 0x20
_MADV_NOHUGEPAGE = 15
_MAP_FAILED = (1 << 64) - 1
_PFN_MASK = (1 << 55) - 1
_PRESENT = 1 << 63


class Refused(Exception):
    """The guest refuses a request; the message is the reason the host gets."""


def load_policy(path: str = POLICY_FILE) -> dict:
    """The control policy: the image's file, or the defaults when there is none."""
    try:
        with open(path, "rb") as f:
            obj = json.loads(f.read().decode("utf-8"))
    except FileNotFoundError:
        return dict(DEFAULT_POLICY)
    if not isinstance(obj, dict) or obj.get("version") != POLICY_VERSION:
        raise ValueError(f"control policy {path} is not a version {POLICY_VERSION} policy")
    unknown = sorted(set(obj) - set(DEFAULT_POLICY) - {"version"})
    if unknown:
        raise ValueError(f"control policy {path}: unknown setting {unknown[0]!r}")
    policy = dict(DEFAULT_POLICY)
    for name, default in DEFAULT_POLICY.items():
        value = obj.get(name, default)
        if isinstance(default, bool) and not isinstance(value, bool) or \
                not isinstance(default, bool) and (not isinstance(value, int) or isinstance(value, bool)
                                                   or value < 0):
            raise ValueError(f"control policy {path}: {name} has a bad value")
        policy[name] = value
    return policy


def runs(op: str, gpas: list[int], hpas: list[int] | None = None) -> list[list]:
    """[op, gpa, count] (or [op, gpa, count, hpa]) entries for pages that step together."""
    out: list[list] = []
    for i, gpa in enumerate(gpas):
        hpa = None if hpas is None else hpas[i]
        if out:
            last = out[-1]
            step = last[2] * PAGE
            if last[1] + step == gpa and (hpa is None or last[3] + step == hpa):
                last[2] += 1
                continue
        out.append([op, gpa, 1] if hpa is None else [op, gpa, 1, hpa])
    return out


def pinning_libc():
    """The C library set up for :class:`Region` (mmap returning a pointer); also tells Linux
    never to migrate locked pages (``vm.compact_unevictable_allowed`` = 0)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                          ctypes.c_int, ctypes.c_long]
    try:
        with open("/proc/sys/vm/compact_unevictable_allowed", "w") as f:
            f.write("0")
    except OSError:
        pass
    return libc


class Region:
    """Anonymous memory this process took from Linux and holds locked."""

    def __init__(self, libc, npages: int):
        self.libc = libc
        size = npages * PAGE
        addr = libc.mmap(None, size, _PROT_RW, _MAP_PRIVATE_ANON, -1, 0)
        if addr is None or addr == _MAP_FAILED:
            raise Refused(f"Linux cannot spare {npages} pages (mmap failed)")
        self.addr, self.npages = int(addr), npages
        self.live = [True] * npages
        libc.madvise(ctypes.c_void_p(self.addr), ctypes.c_size_t(size), _MADV_NOHUGEPAGE)
        if libc.mlock(ctypes.c_void_p(self.addr), ctypes.c_size_t(size)) != 0:
            err = ctypes.get_errno()
            self.release_all()
            raise Refused(f"Linux cannot spare {npages} pages (mlock: {os.strerror(err)})")
        ctypes.memset(self.addr, 0x5A, size)        # every page backed by a frame of its own
        self.gpas = self._frames()

    def _frames(self) -> list[int]:
        with open("/proc/self/pagemap", "rb") as f:
            f.seek(self.addr // PAGE * 8)
            raw = f.read(self.npages * 8)
        gpas = []
        for (entry,) in struct.iter_unpack("<Q", raw):
            if not entry & _PRESENT or not entry & _PFN_MASK:
                self.release_all()
                raise Refused("the ballooned memory's frames cannot be read from /proc/self/pagemap")
            gpas.append((entry & _PFN_MASK) * PAGE)
        if len(set(gpas)) != len(gpas):
            self.release_all()
            raise Refused("the ballooned memory shares frames")
        return gpas

    def release(self, gpas: set[int]) -> int:
        """Give the pages at these gpas back to Linux (munmap); returns how many."""
        done = 0
        for i, gpa in enumerate(self.gpas):
            if self.live[i] and gpa in gpas:
                self.libc.munmap(ctypes.c_void_p(self.addr + i * PAGE), ctypes.c_size_t(PAGE))
                self.live[i] = False
                done += 1
        return done

    def release_all(self) -> None:
        self.libc.munmap(ctypes.c_void_p(self.addr), ctypes.c_size_t(self.npages * PAGE))
        self.live = [False] * self.npages


class Controls:
    """Validates the host's control requests and has the platform seal the accepted ones."""

    def __init__(self, platform_call, policy_path: str = POLICY_FILE):
        self.platform_call = platform_call
        try:
            self.policy = load_policy(policy_path)
            self.policy_error = None
        except (OSError, ValueError) as exc:
            self.policy, self.policy_error = dict(DEFAULT_POLICY), str(exc)
        self._libc = None
        self.last_sealed = 0
        self.out: dict[int, Region] = {}               # gpa -> region: ballooned out, installed
        self.pending_out: dict[int, Region] = {}       # version -> region sealed for UNMAP
        self.pending_in: dict[int, list[int]] = {}     # version -> gpas sealed for ACCEPT
        self.shared: list[Region] = []                 # buffers shared with the host, installed
        self.pending_share: dict[int, Region] = {}     # version -> buffer sealed for SHARE
        self.pending_unshare: dict[int, list[Region]] = {}  # version -> buffers sealed for UNSHARE

    # -- the request ---------------------------------------------------------------
    def handle(self, req: dict) -> dict:
        """One host request: the verdict, never an exception for a refusal."""
        op = req.get("op")
        try:
            if self.policy_error:
                raise Refused(f"the guest's control policy is unusable: {self.policy_error}")
            info = self.platform_call("controls-info")
            if req.get("keyid") != info.get("keyid"):
                raise Refused(f"the request names KeyID {req.get('keyid')!r}; this guest is KeyID "
                              f"{info.get('keyid')}")
            self._reconcile(info)
            handler = getattr(self, "op_" + op.replace("-", "_"), None) if isinstance(op, str) else None
            if handler is None:
                raise Refused(f"unknown control request {op!r}")
            return {"verdict": "accepted", "op": op, **handler(req, info)}
        except Refused as exc:
            return {"verdict": "refused", "op": op, "reason": str(exc)}

    def _seal(self, info: dict, ops=None, vmcs=None) -> dict:
        version = max(int(info["installed_version"]), self.last_sealed) + 1
        try:
            # The second argument is how long to wait for the platform's answer.
            sealed = self.platform_call("controls-seal", SEAL_TIMEOUT, version=version,
                                        ops=ops or [], vmcs=vmcs or {})
        except RuntimeError as exc:
            reason = str(exc).rpartition("controls-seal: ")[2]
            raise Refused(f"the platform will not seal it: {reason}") from None
        self.last_sealed = version
        return {"version": version, "update": sealed["update"], "summary": sealed.get("summary", {})}

    def _count(self, req: dict, name: str) -> int:
        value = req.get(name)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise Refused(f"'{name}' must be a positive number of pages")
        if value > self.policy["max_pages_per_request"]:
            raise Refused(f"{value} pages exceed the policy's {self.policy['max_pages_per_request']} "
                          "pages per request")
        return value

    def _reconcile(self, info: dict) -> None:
        """Settle sealed updates: installed ones take effect here, dead ones are undone."""
        installed = set(info.get("installed_versions") or [])
        current = int(info.get("installed_version", 0))
        for version in sorted(self.pending_out):
            if version in installed:
                region = self.pending_out.pop(version)
                self.out.update({gpa: region for i, gpa in enumerate(region.gpas) if region.live[i]})
            elif version <= current:         # can never be installed now
                self.pending_out.pop(version).release_all()
        for version in sorted(self.pending_share):
            if version in installed:
                self.shared.append(self.pending_share.pop(version))
            elif version <= current:
                self.pending_share.pop(version).release_all()
        for version in sorted(self.pending_unshare):
            regions = self.pending_unshare.pop(version) if version in installed or version <= current else None
            if regions is not None:
                for region in regions:
                    if version in installed:
                        region.release_all()        # private again, zeroed: back to Linux
                    else:
                        self.shared.append(region)  # the update died: still shared
        for version in sorted(self.pending_in):
            if version in installed:
                gpas = set(self.pending_in.pop(version))
                for region in {id(self.out[g]): self.out[g] for g in gpas if g in self.out}.values():
                    region.release(gpas)
                for gpa in gpas:
                    self.out.pop(gpa, None)
            elif version <= current:
                self.pending_in.pop(version)

    # -- operations ----------------------------------------------------------------
    def op_balloon_out(self, req: dict, info: dict) -> dict:
        if not self.policy["allow_balloon"]:
            raise Refused("the guest's policy does not allow ballooning")
        n = self._count(req, "pages")
        pending = sum(r.npages for r in self.pending_out.values())
        left = int(info["mapped_pages"]) - pending - n
        floor = self.policy["memory_floor_mib"] * (1 << 20) // PAGE
        if left < floor:
            raise Refused(f"giving up {n} pages would leave {left * PAGE >> 20} MiB, below the guest's "
                          f"memory floor of {self.policy['memory_floor_mib']} MiB")
        self._prepare_balloon()
        region = Region(self._libc, n)
        try:
            sealed = self._seal(info, ops=runs("unmap", region.gpas))
        except Refused:
            region.release_all()
            raise
        self.pending_out[sealed["version"]] = region
        return {**sealed, "pages": n}

    def _prepare_balloon(self) -> None:
        if self._libc is None:
            self._libc = pinning_libc()

    def op_balloon_in(self, req: dict, info: dict) -> dict:
        if not self.policy["allow_balloon"]:
            raise Refused("the guest's policy does not allow ballooning")
        hpas = req.get("hpas")
        if not isinstance(hpas, list) or not all(isinstance(h, int) and not isinstance(h, bool) for h in hpas):
            raise Refused("'hpas' must be a list of host-physical addresses")
        self._count({"pages": len(hpas)}, "pages")
        if len(set(hpas)) != len(hpas):
            raise Refused("an hpa is offered twice")
        claimed = {g for gpas in self.pending_in.values() for g in gpas}
        free = [gpa for gpa in sorted(self.out) if gpa not in claimed]
        if len(free) < len(hpas):
            raise Refused(f"{len(hpas)} pages offered, but the guest has only {len(free)} ballooned out")
        gpas = free[:len(hpas)]
        sealed = self._seal(info, ops=runs("accept", gpas, hpas))
        self.pending_in[sealed["version"]] = gpas
        return {**sealed, "pages": len(gpas)}

    def op_relocate(self, req: dict, info: dict) -> dict:
        if not self.policy["allow_relocate"]:
            raise Refused("the guest's policy does not allow relocation")
        moves = req.get("moves")
        if not isinstance(moves, list) or not all(
                isinstance(m, list) and len(m) == 2 and all(isinstance(x, int) and not isinstance(x, bool)
                                                            for x in m) for m in moves):
            raise Refused("'moves' must be a list of [gpa, new hpa] pairs")
        self._count({"pages": len(moves)}, "pages")
        out = set(self.out) | {g for r in self.pending_out.values() for g in r.gpas}
        for gpa, _hpa in moves:
            if gpa in out:
                raise Refused(f"gpa {gpa:#x} is ballooned out: there is nothing to move")
        sealed = self._seal(info, ops=runs("move", [g for g, _ in moves], [h for _, h in moves]))
        return {**sealed, "pages": len(moves)}

    def op_vmwrite(self, req: dict, info: dict) -> dict:
        encoding, value = req.get("field"), req.get("value")
        if not isinstance(encoding, int) or not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise Refused("'field' (a VMCS encoding) and 'value' (a non-negative integer) are required")
        if (encoding >> 10) & 3 == _CLASS_GUEST:
            raise Refused(f"VMCS field {encoding:#06x} is guest state: the guest never lets the host "
                          "change it")
        if encoding == VMCS_EXPOSED_MASK:
            current = int(info.get("exposed_register_mask", 0))
            if value & ~current:
                raise Refused(f"exposed-register mask {value:#x} would widen {current:#x}: the host may "
                              "only see fewer registers")
        elif encoding == VMCS_EXIT_INTERVAL:
            floor = self.policy["min_exit_interval_ms"]
            if value and value < floor:
                raise Refused(f"an exit every {value} ms is more often than the guest's floor of every "
                              f"{floor} ms")
        else:
            raise Refused(f"VMCS field {encoding:#06x} is not one the guest lets the host change")
        return {**self._seal(info, vmcs={hex(encoding): value}), "field": encoding, "value": value}

    def op_exit_interval(self, req: dict, info: dict) -> dict:
        return self.op_vmwrite({"field": VMCS_EXIT_INTERVAL, "value": req.get("ms")}, info)

    def op_share(self, req: dict, info: dict) -> dict:
        """Share a buffer of the guest's choosing with the host (its pages become plaintext to it)."""
        if not self.policy["allow_share"]:
            raise Refused("the guest's policy does not allow sharing memory with the host")
        n = self._count(req, "pages")
        busy = sum(r.npages for r in self.shared) + sum(r.npages for r in self.pending_share.values())
        if busy + n > self.policy["max_shared_pages"]:
            raise Refused(f"sharing {n} more pages would exceed the policy's {self.policy['max_shared_pages']} "
                          f"shared pages ({busy} shared or being shared)")
        self._prepare_balloon()
        region = Region(self._libc, n)
        # What the host will read there: a label per page, nothing else of the guest's.
        for i, gpa in enumerate(region.gpas):
            label = f"qemu-kd shared page keyid={info['keyid']} gpa={gpa:#x}\n".encode()
            ctypes.memset(region.addr + i * PAGE, 0, PAGE)
            ctypes.memmove(region.addr + i * PAGE, label, len(label))
        try:
            sealed = self._seal(info, ops=runs("share", region.gpas))
        except Refused:
            region.release_all()
            raise
        self.pending_share[sealed["version"]] = region
        return {**sealed, "pages": n, "gpas": runs("share", region.gpas)}

    def op_unshare(self, req: dict, info: dict) -> dict:
        """Make every shared buffer private again (zeroed) and give it back to Linux."""
        regions = list(self.shared)
        if not regions:
            raise Refused("nothing is shared")
        gpas = [gpa for region in regions for gpa in region.gpas]
        sealed = self._seal(info, ops=runs("unshare", gpas))
        self.shared = []
        self.pending_unshare[sealed["version"]] = regions
        return {**sealed, "pages": len(gpas)}

    def op_installed(self, req: dict, info: dict) -> dict:
        """The host says it installed an update: settled already by the check against the platform."""
        return {"installed_version": int(info["installed_version"]), "ballooned_pages": len(self.out)}

    def op_status(self, req: dict, info: dict) -> dict:
        shared = {}
        if self.shared:     # what the guest sees in its first shared page (the host may have written it)
            first = self.shared[0]
            shared = {"shared_gpa": first.gpas[0],
                      "shared_sha256": hashlib.sha256(ctypes.string_at(first.addr, PAGE)).hexdigest()}
        return {"policy": dict(self.policy), "installed_version": int(info["installed_version"]),
                "ballooned_pages": len(self.out), "shared_pages": sum(r.npages for r in self.shared),
                "pending": sorted([*self.pending_out, *self.pending_in, *self.pending_share,
                                   *self.pending_unshare]), **shared}
