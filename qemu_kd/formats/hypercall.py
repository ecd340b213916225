"""Hypercalls: the leaf registry, the host's exit records and its replies.

A guest makes a hypercall through the platform (the guest port's
``hypercall`` op stands for VMCALL): a leaf number and a register file of the
16 general registers.  The platform performs a real exit and shows the host an
:class:`ExitRecord` with the leaf and the *exposed* input registers only: those
in the VMCS's ``exposed_register_mask``, narrowed by the guest for the call.
The host answers with a :class:`HypercallReply` that may write exposed
registers only.  Exit records are published for every exit, whatever its
reason (``host``, ``hypercall``, ``interval``).

The leaf table is the single source of leaf numbers on the host side; the
guest's copy (``guest_agent.hypercall.LEAVES``) must agree (a test checks).
See docs/agent-protocol.md for the guest's view and docs/hostport.md for the
host's.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from qemu_kd.formats.errors import FieldValueError
from qemu_kd.formats.savearea import EXIT_REASONS
from qemu_kd.formats.vmcs import X86_GPR_ORDER, exposed_register_mask, exposed_registers


@dataclass(frozen=True)
class Leaf:
    """One hypercall leaf: its number, what it asks, and its register convention."""

    number: int
    name: str
    summary: str
    reserved: bool = False      # defined for a flow the host VMM does not answer by itself


LEAVES: tuple[Leaf, ...] = (
    Leaf(0x0001, "ECHO", "the host writes every exposed input register back unchanged (for tests)"),
    Leaf(0x0002, "HOST_TIME", "the host writes its wall-clock time, ns since the Unix epoch, into rax "
                              "(rax must be exposed)"),
    Leaf(0x0010, "MEMORY_REQUEST", "reserved for the control-change flow: the guest asks the host "
                                   "for memory back", reserved=True),
    Leaf(0x0011, "SHARE_NOTIFY", "reserved for the control-change flow: the guest tells the host a "
                                 "buffer became shared", reserved=True),
)
LEAF_BY_NUMBER = {leaf.number: leaf for leaf in LEAVES}
LEAF_BY_NAME = {leaf.name: leaf for leaf in LEAVES}
ECHO = LEAF_BY_NAME["ECHO"].number
HOST_TIME = LEAF_BY_NAME["HOST_TIME"].number
MEMORY_REQUEST = LEAF_BY_NAME["MEMORY_REQUEST"].number
SHARE_NOTIFY = LEAF_BY_NAME["SHARE_NOTIFY"].number

MAX_LEAF = 0xFFFF_FFFF
U64 = (1 << 64) - 1
#: Status a host sets when it does not serve a leaf.
STATUS_UNSUPPORTED = 1


def leaf_name(number: int) -> str | None:
    leaf = LEAF_BY_NUMBER.get(number)
    return leaf.name if leaf else None


def check_registers(regs: object, what: str) -> dict[str, int]:
    """``{name: u64}`` with general-register names only (FieldValueError otherwise)."""
    if not isinstance(regs, dict):
        raise FieldValueError(f"{what} must map register names to values")
    out = {}
    for name, value in regs.items():
        if name not in X86_GPR_ORDER:
            raise FieldValueError(f"{what}: {name!r} is not a general-purpose register",
                                  f"choose from {', '.join(X86_GPR_ORDER)}")
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= U64:
            raise FieldValueError(f"{what}: {name} must be an unsigned 64-bit integer")
        out[name] = value
    return out


@dataclass
class ExitRecord:
    """What the host learns of one exit (the ``next-exit`` answer)."""

    seq: int
    keyid: int
    reason: str
    leaf: int | None = None
    exposed: list[str] = field(default_factory=list)     # register names, x86 order
    inputs: dict[str, int] = field(default_factory=dict)  # exposed registers only
    timeout: float | None = None                          # how long the guest waits for a reply

    def __post_init__(self) -> None:
        if self.reason not in EXIT_REASONS:
            raise FieldValueError(f"unknown exit reason {self.reason!r}")

    def pack(self) -> dict:
        out: dict = {"seq": self.seq, "keyid": self.keyid, "reason": self.reason}
        if self.reason == "hypercall":
            out.update(leaf=self.leaf, leaf_name=leaf_name(self.leaf or 0), exposed=list(self.exposed),
                       inputs={name: self.inputs[name] for name in self.exposed}, timeout=self.timeout)
        return out

    @classmethod
    def unpack(cls, data: dict) -> "ExitRecord":
        inputs = check_registers(data.get("inputs", {}), "exit record inputs")
        return cls(seq=int(data["seq"]), keyid=int(data["keyid"]), reason=str(data["reason"]),
                   leaf=data.get("leaf"), exposed=list(data.get("exposed", [])), inputs=inputs,
                   timeout=data.get("timeout"))

    @property
    def mask(self) -> int:
        return exposed_register_mask(self.exposed)


@dataclass
class HypercallReply:
    """The host's answer to a hypercall exit: exposed output registers and a status."""

    seq: int
    outputs: dict[str, int] = field(default_factory=dict)
    status: int = 0

    def pack(self) -> dict:
        return {"seq": self.seq, "outputs": dict(self.outputs), "status": self.status}


def unexposed_writes(outputs: dict[str, int], mask: int) -> list[str]:
    """The registers ``outputs`` names that ``mask`` does not expose."""
    allowed = set(exposed_registers(mask))
    return [name for name in outputs if name not in allowed]


def narrow_mask(vmcs_mask: int, expose: object) -> int:
    """The call's mask: the VMCS mask, or the guest's narrower choice (never wider).

    ``expose`` is None (take the VMCS mask) or a list of register names;
    naming a register the VMCS does not expose raises FieldValueError.
    """
    if expose is None:
        return vmcs_mask
    if not isinstance(expose, list) or not all(isinstance(n, str) for n in expose):
        raise FieldValueError("expose must be a list of register names")
    wanted = exposed_register_mask(expose)
    wider = exposed_registers(wanted & ~vmcs_mask)
    if wider:
        allowed = ", ".join(exposed_registers(vmcs_mask)) or "none"
        raise FieldValueError(f"the guest may narrow the exposed-register mask, never widen it: "
                              f"{', '.join(wider)} not exposed by the VMCS (it exposes {allowed})")
    return wanted
