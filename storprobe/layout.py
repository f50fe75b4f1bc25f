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

#: A structure as :meth:`Layout.unpack` returns it: a named tuple whose fields the
#: layout names at run time, so a type checker knows none of them (it is Any).
Header = Any


class Layout:
    """A fixed-size structure: an endianness and an ordered list of fields."""

    __slots__ = ("what", "size", "_unpack_from", "_names", "_tuple")

    def __init__(self, endian: str, what: str, *fields: tuple[str | None, str]) -> None:
        self.what = what
        layout = struct.Struct(endian + "".join(code for _, code in fields))
        self.size: int = layout.size
        self._unpack_from = layout.unpack_from
        self._names = [name for name, _ in fields if name]
        self._tuple: type[tuple[Any, ...]] | None = None  # made on first use: most layouts never are

    def unpack(self, buf: bytes | memoryview, offset: int = 0) -> Header:
        """The fields at ``offset`` of ``buf`` as a named tuple."""
        if self._tuple is None:
            self._tuple = _record_type(re.sub(r"\W", "_", self.what).strip("_") or "header", self._names)
        return tuple.__new__(self._tuple, self.values(buf, offset))

    def values(self, buf: bytes | memoryview, offset: int = 0) -> tuple[Any, ...]:
        """The fields at ``offset`` of ``buf`` as a plain tuple, for loops that unpack it at once."""
        if offset < 0 or offset + self.size > len(buf):
            raise TruncatedHeader(
                f"{self.what} needs {self.size} bytes at offset {offset}, "
                f"only {max(0, len(buf) - offset)} available"
            )
        return self._unpack_from(buf, offset)


def _record_type(name: str, fields: list[str]) -> type[tuple[Any, ...]]:
    """A named-tuple class made at run time (mypy checks only literal ones, hence the ignore)."""
    made: type[tuple[Any, ...]] = namedtuple(name, fields)  # type: ignore[misc]
    return made


#: The last two bytes of an MBR (and of a FAT boot sector): 0x55 0xAA at 510.
BOOT_SIGNATURE = b"\x55\xaa"


def read_uint(buf: bytes | memoryview, offset: int, width: int, endian: str) -> int:
    """An unsigned integer of ``width`` bytes at ``offset``; TruncatedHeader if short."""
    if offset < 0 or offset + width > len(buf):
        raise TruncatedHeader(f"{width}-byte field at offset {offset} lies beyond the header")
    return int.from_bytes(buf[offset : offset + width], "big" if endian == ">" else "little")


def cstring(raw: bytes) -> str:
    """A NUL-terminated (or NUL-padded) byte string, decoded as qemu-img's JSON
    shows it (:func:`qemu_utf8`)."""
    return qemu_utf8(raw.split(b"\0", 1)[0])


#: Code points QEMU's UTF-8 reader refuses although UTF-8 encodes them (noncharacters:
#: U+FDD0..U+FDEF and the last two of every plane), each mapped to U+FFFD for str.translate.
#: (As a regular expression's character class this took 4.5 ms to compile: a tenth of start-up.)
_NONCHARACTERS = dict.fromkeys(
    [*range(0xFDD0, 0xFDF0), *(plane << 16 | last for plane in range(17) for last in (0xFFFE, 0xFFFF))], "\ufffd"
)
#: Smallest code point of a sequence of 2, 3, 4, 5 and 6 bytes (anything less is overlong).
_SHORTEST = (0x80, 0x800, 0x10000, 0x200000, 0x4000000)


def qemu_utf8(raw: bytes) -> str:
    """``raw`` (no NUL) decoded as QEMU reads a C string into its JSON output
    (util/unicode.c): a malformed sequence, however many bytes it spans up to
    the first byte that cannot continue it, is one U+FFFD; so are code points
    beyond U+10FFFF, surrogates, noncharacters and overlong forms, except that
    C0 80 is U+0000."""
    try:
        text = raw.decode("utf-8")
        return text if text.isascii() else text.translate(_NONCHARACTERS)
    except UnicodeDecodeError:
        pass
    out: list[str] = []
    at, end = 0, len(raw)
    while at < end:
        lead = raw[at]
        at += 1
        if lead < 0x80:
            out.append(chr(lead))
            continue
        if lead >= 0xFE or not lead & 0x40:  # impossible byte, or a continuation with no lead
            out.append("\ufffd")
            continue
        length = 8 - (lead ^ 0xFF).bit_length()  # leading one bits: 2..6
        point = lead & (0x7F >> length)
        for _ in range(length - 1):
            if at == end or raw[at] & 0xC0 != 0x80:
                point = -1
                break
            point = point << 6 | raw[at] & 0x3F
            at += 1
        if (
            point < 0
            or point > 0x10FFFF
            or 0xD800 <= point <= 0xDFFF
            or point in _NONCHARACTERS
            or (point < _SHORTEST[length - 2] and not (point == 0 and length == 2))
        ):
            out.append("\ufffd")
        else:
            out.append(chr(point))
    return "".join(out)
