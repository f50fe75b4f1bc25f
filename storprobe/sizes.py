"""Byte counts as qemu-img writes and reads them: ``64 TiB`` out, ``64T`` or ``1.5G`` in."""

from __future__ import annotations

import re

from .spec import INT64_MAX

_UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB")
#: qemu_strtosz's suffixes (either case): bytes, then powers of 1024.
_SCALES = {suffix: 1024**power for power, suffix in enumerate("BKMGTPE")}
#: A decimal size: C's leading white space and plus sign, digits, a fraction
#: (digits optional, as in ``1.k``), one suffix. A leading minus is never a size.
_DECIMAL = re.compile(r"[ \t\n\v\f\r]*\+?(?P<whole>[0-9]+)(?:\.(?P<fraction>[0-9]*))?(?P<suffix>[BKMGTPE]?)", re.I)
#: A hexadecimal size: bytes, with no fraction and no suffix.
_HEX = re.compile(r"[ \t\n\v\f\r]*\+?0[xX](?P<digits>[0-9a-fA-F]+)")


def size_to_str(n: int) -> str:
    """Bytes in the largest binary unit that keeps the number under 1000 (QEMU's ``size_to_str``)."""
    value, unit = float(n), 0
    while value >= 1000 and unit < len(_UNITS) - 1:
        value /= 1024
        unit += 1
    return f"{value:.3g} {_UNITS[unit]}"


def size_text(n: int) -> str:
    """``100 TiB (109951162777600 bytes)``, as qemu-img shows a virtual size."""
    return f"{size_to_str(n)} ({n} bytes)"


def parse_size(text: str) -> int:
    """The byte count ``text`` denotes, read as qemu-img reads a size (QEMU's
    ``qemu_strtosz``): a decimal number with an optional suffix B, K, M, G, T,
    P or E in either case (powers of 1024); a fraction (``1.5G``) only with a
    suffix that scales it past bytes, rounded to the nearest byte, half up;
    or ``0x`` and hexadecimal digits. ValueError unless it is one of those
    and at most INT64_MAX (qemu-img's limit), so never negative."""
    if text.lstrip(" \t\n\v\f\r").startswith("-"):
        raise ValueError("a size cannot be negative")
    hexadecimal = _HEX.fullmatch(text)
    if hexadecimal:
        size = int(hexadecimal["digits"], 16)
    else:
        decimal = _DECIMAL.fullmatch(text)
        if decimal is None:
            raise ValueError("not a size: use a number of bytes, or one with a suffix k, M, G, T, P or E")
        scale = _SCALES[(decimal["suffix"] or "B").upper()]
        size = int(decimal["whole"]) * scale
        if decimal["fraction"]:
            # QEMU reads the fraction as a double, takes it as a 64-bit binary
            # fraction, scales that exactly and rounds half up.
            binary = min(int(float("0." + decimal["fraction"]) * 2**64), 2**64 - 1)
            if binary and scale == 1:
                raise ValueError("a fraction of a byte is not a size: give a suffix k, M, G, T, P or E")
            scaled = binary * scale
            size += (scaled >> 64) + (scaled >> 63 & 1)
    if size > INT64_MAX:
        raise ValueError(f"larger than {INT64_MAX} bytes")
    return size
