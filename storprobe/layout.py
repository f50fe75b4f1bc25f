"""Header layouts written once, as data, in the order of the spec.

    QCOW2_HEADER = Layout(">", "qcow2 header",
        ("magic", "4s"),
        ("version", "I"),
        ...
    )
    hdr = QCOW2_HEADER.unpack(img.header)   # -> a named tuple
    hdr.version

A field is ``(name, struct-code)``; a name of ``None`` is padding the reader
skips. Reading past the end of the buffer raises :class:`TruncatedHeader`.
"""

from __future__ import annotations

import re
import struct
from collections import namedtuple
from typing import Any

from .errors import TruncatedHeader


class Layout:
    """A fixed-size structure: an endianness and an ordered list of fields."""

    __slots__ = ("what", "size", "_unpack_from", "_names", "_tuple")

    def __init__(self, endian: str, what: str, *fields: tuple[str | None, str]) -> None:
        self.what = what
        layout = struct.Struct(endian + "".join(code for _, code in fields))
        self.size: int = layout.size
        self._unpack_from = layout.unpack_from
        self._names = [name for name, _ in fields if name]
        self._tuple: type | None = None  # made on first use: most layouts of a process never are

    def unpack(self, buf: bytes | memoryview, offset: int = 0) -> Any:
        """The fields at ``offset`` of ``buf`` as a named tuple."""
        if self._tuple is None:
            self._tuple = namedtuple(re.sub(r"\W", "_", self.what).strip("_") or "header", self._names)
        return tuple.__new__(self._tuple, self.values(buf, offset))

    def values(self, buf: bytes | memoryview, offset: int = 0) -> tuple[Any, ...]:
        """The fields at ``offset`` of ``buf`` as a plain tuple, for loops that unpack it at once."""
        if offset < 0 or offset + self.size > len(buf):
            raise TruncatedHeader(
                f"{self.what} needs {self.size} bytes at offset {offset}, "
                f"only {max(0, len(buf) - offset)} available"
            )
        return self._unpack_from(buf, offset)


def read_uint(buf: bytes | memoryview, offset: int, width: int, endian: str) -> int:
    """An unsigned integer of ``width`` bytes at ``offset``; TruncatedHeader if short."""
    if offset < 0 or offset + width > len(buf):
        raise TruncatedHeader(f"{width}-byte field at offset {offset} lies beyond the header")
    return int.from_bytes(buf[offset : offset + width], "big" if endian == ">" else "little")


def cstring(raw: bytes, encoding: str = "utf-8") -> str:
    """A NUL-terminated (or NUL-padded) byte string, decoded leniently."""
    return raw.split(b"\0", 1)[0].decode(encoding, "replace")
