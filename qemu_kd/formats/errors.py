"""Errors raised by the wire-format parsers and builders.

Every parser in qemu-kd checks the input it is given and raises one of these
specific classes, so callers (and tests) can tell a truncated file from a
foreign one or from a newer format version.  Helpers at the bottom do the
common length checks with uniform messages.
"""

from __future__ import annotations


from qemu_kd.common.errors import KdError


class FormatError(KdError):
    """Input is not a well-formed instance of a qemu-kd wire format."""


class TruncatedError(FormatError):
    """Fewer bytes than the format needs."""


class OversizedError(FormatError):
    """More bytes than the format allows."""


class VersionError(FormatError):
    """A version (or record-length) field names a format this code does not speak."""


class ReservedBitsError(FormatError):
    """Reserved bits or bytes are not zero, or a value exceeds its field width."""


class MagicError(FormatError):
    """The magic value or marker is wrong: this is not the expected kind of data."""


class FieldValueError(FormatError):
    """A field holds a value outside its allowed set (e.g. an unknown page type)."""


class UnknownFieldError(FormatError, KeyError):
    """A field encoding or name that the format does not define."""


class CorruptError(FormatError):
    """A checksum over the data does not match: the data was damaged."""


def require_length(what: str, data: bytes | bytearray | memoryview, size: int) -> None:
    """Raise TruncatedError/OversizedError unless ``len(data) == size``."""
    n = len(data)
    if n < size:
        raise TruncatedError(f"{what} is truncated: {n} bytes, need {size}",
                             "the data was cut short; regenerate or copy it again")
    if n > size:
        raise OversizedError(f"{what} is too long: {n} bytes, expected exactly {size}",
                             "extra bytes follow the record; pass exactly one record")


def require_at_least(what: str, data: bytes | bytearray | memoryview, size: int) -> None:
    """Raise TruncatedError unless ``len(data) >= size``."""
    if len(data) < size:
        raise TruncatedError(f"{what} is truncated: {len(data)} bytes, need at least {size}",
                             "the data was cut short; regenerate or copy it again")


def require_zero(what: str, value: bytes | int) -> None:
    """Raise ReservedBitsError unless a reserved field is all zero."""
    if (isinstance(value, int) and value) or (not isinstance(value, int) and any(value)):
        raise ReservedBitsError(f"{what}: reserved bits are set",
                                "the data was produced by a newer or broken tool")


def require_fits(what: str, value: int, bits: int) -> None:
    """Raise FieldValueError unless ``0 <= value < 2**bits`` (for building)."""
    if not isinstance(value, int) or value < 0 or value >> bits:
        raise FieldValueError(f"{what} = {value!r} does not fit in {bits} unsigned bits")


def require_bytes(what: str, value: bytes, size: int) -> None:
    """Raise FieldValueError unless ``value`` is exactly ``size`` bytes (for building)."""
    if not isinstance(value, (bytes, bytearray)) or len(value) != size:
        got = len(value) if isinstance(value, (bytes, bytearray)) else type(value).__name__
        raise FieldValueError(f"{what} must be {size} bytes, got {got}")


def pad_field(what: str, value: bytes, size: int) -> bytes:
    """``value`` zero-padded to a ``size``-byte field; FieldValueError if it is longer (for building)."""
    if not isinstance(value, (bytes, bytearray)) or len(value) > size:
        raise FieldValueError(f"{what} must be at most {size} bytes")
    return bytes(value).ljust(size, b"\0")
