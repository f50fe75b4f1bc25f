"""``storprobe verify``: what ``qemu-img check`` reports on an image, read-only.

A format row's ``check`` callback walks the image's metadata the way QEMU 7.2's
driver checks it and returns a :class:`CheckResult`; this module opens the image
(a probe: what QEMU's open refuses, storprobe refuses with the same exit status),
reads for the callback through a bounded :class:`CheckReader`, and renders the
outcome as qemu-img check prints it: JSON byte for byte, the human lines, and
the exit status (0 clean, 2 corruptions, 3 leaks only, 63 no check, 1 could not
check). Nothing is ever repaired: the file is opened read-only.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TYPE_CHECKING, NamedTuple

from .blockmap import DataPathError
from .detect import Target, open_source, probe
from .errors import ProbeError, ReadLimitExceeded
from .registry import FormatTable, format_table
from .source import Image
from .spec import QEMU_MAX_LENGTH

if TYPE_CHECKING:
    from .datapath import BackingPolicy
    from .source import ByteSource

#: qemu-img check's exit statuses.
EXIT_CLEAN, EXIT_FAILED, EXIT_CORRUPT, EXIT_LEAKS, EXIT_NO_CHECK = 0, 1, 2, 3, 63
#: The ImageCheck keys in the order qemu-img 7.2 prints them: its JSON object is
#: a QDict, iterated by hash bucket (tdb_hash(key) % 512); no two keys share one.
JSON_KEYS = (
    "image-end-offset", "compressed-clusters", "total-clusters", "corruptions", "corruptions-fixed",
    "check-errors", "leaks", "leaks-fixed", "allocated-clusters", "filename", "format", "fragmented-clusters",
)
#: Metadata bytes one check may read: at least this, and at least
#: :data:`READ_FACTOR` times the file's size (snapshots re-read shared tables).
MIN_READ_BUDGET = 1 << 30
READ_FACTOR = 4


class NoCheck(ProbeError):
    """The image's QEMU driver has no check: qemu-img check exits 63."""

    code = "verify.no-check"


class CheckNotImplemented(ProbeError):
    """QEMU has a check for this format and storprobe does not have it yet."""

    code = "verify.not-implemented"


class CheckFailed(ProbeError):
    """The check could not complete, as qemu-img's "Check failed: REASON" (exit 1, no report)."""

    code = "verify.failed"


class CheckResult(NamedTuple):
    """QEMU's BdrvCheckResult of a read-only check (nothing fixed, so no *-fixed counts)."""

    check_errors: int = 0
    corruptions: int = 0
    leaks: int = 0
    image_end_offset: int = 0
    total_clusters: int = 0
    allocated_clusters: int = 0
    fragmented_clusters: int = 0
    compressed_clusters: int = 0


class Report(NamedTuple):
    """qemu-img check's ImageCheck: the result with the name it was asked about and the format."""

    filename: str
    format: str
    result: CheckResult

    @property
    def exit_status(self) -> int:
        """qemu-img check's status for a check that completed."""
        result = self.result
        if result.check_errors:
            return EXIT_FAILED
        if result.corruptions:
            return EXIT_CORRUPT
        return EXIT_LEAKS if result.leaks else EXIT_CLEAN


class CheckReader:
    """Metadata reads for a check, as QEMU's block layer serves a format driver:
    bytes past the end of the file read as zeros, a range past the block
    layer's limit (QEMU_MAX_LENGTH) fails the check. Every read counts against a
    budget (``budget``: bytes; default the larger of :data:`MIN_READ_BUDGET` and
    :data:`READ_FACTOR` times the file's size); a check that needs more raises
    ReadLimitExceeded instead of reading on. ``open_named`` opens the files the
    image names for its own data, as the check's policy allows (None: none)."""

    __slots__ = ("_source", "size", "_left", "_budget", "_open_named")

    def __init__(
        self, source: ByteSource, budget: int | None = None, *,
        open_named: Callable[[str], ByteSource] | None = None,
    ) -> None:
        self._source = source
        self.size = source.size()
        self._budget = budget
        self._left = max(MIN_READ_BUDGET, READ_FACTOR * self.size) if budget is None else budget
        self._open_named = open_named

    @property
    def image(self) -> Image:
        """The file being checked, for a row's header callbacks (its reads are the probe's, not the check's)."""
        return Image(self._source)

    def open_named(self, name: str) -> CheckReader:
        """A reader of the file ``name`` the image records for its own data (a
        VMDK descriptor's extent), with a budget of its own, opened only as the
        check's policy allows (``verify(named_files=...)``; the data path's rules:
        a local name, and inside its directory when it has one); a named error
        otherwise. The file is closed when the check ends."""
        if self._open_named is None:
            raise DataPathError(f"the image names the file {name!r} for its data, which the check's policy refuses "
                                "(verify opens such files with named_files=LOCAL or a directory)",
                                code="datapath.named-file-refused")
        return CheckReader(self._open_named(name), self._budget)

    def read(self, offset: int, length: int) -> bytes:
        """``length`` bytes at ``offset``, zeros where the file has none."""
        if not readable(offset, length):
            raise CheckFailed(f"Check failed: Input/output error (a read of {length} bytes at offset {offset})")
        self._left -= length
        if self._left < 0:
            raise ReadLimitExceeded(
                f"reading {length} bytes of metadata at offset {offset} exceeds the check's read budget",
                code="verify.read-limit",
            )
        if offset >= self.size or length <= 0:
            return bytes(max(length, 0))
        data = self._source.read_at(offset, min(length, self.size - offset))
        return data + bytes(length - len(data)) if len(data) < length else data


def readable(offset: int, length: int) -> bool:
    """Whether QEMU's block layer reads this range at all (bdrv_check_request)."""
    return 0 <= offset and 0 <= length <= QEMU_MAX_LENGTH - offset


def verify(
    target: Target, *, format: str | None = None, table: FormatTable | None = None, budget: int | None = None,
    max_size: int | None = None, named_files: BackingPolicy | str | os.PathLike[str] | None = None,
) -> Report:
    """Check ``target`` as ``qemu-img check [-f FORMAT]`` does, read-only.

    ``max_size``: the largest virtual size checked (default: the data path's
    bound, :data:`~storprobe.safety.DEFAULT_MAX_VIRTUAL_SIZE`, 64 TiB); a larger
    image is refused (``datapath.too-large``) before any table is read.
    ``named_files``: which files the image names for its own data (a VMDK
    descriptor's extents) are opened, a :class:`~storprobe.datapath.BackingPolicy`
    as :func:`~storprobe.datapath.open_image` takes it (``LOCAL``, or a
    directory); default none (``REFUSE``): such an image is a named error.

    Raises NoCheck (exit 63) when the row has no check (a row whose QEMU driver
    has ``bdrv_co_check`` must have one: tests/test_verify.py holds the built-ins
    to it), CheckNotImplemented from a row's check for an image it cannot check
    yet, CheckFailed or another ProbeError when the image cannot be opened or
    checked (exit 1).
    """
    from .datapath import check_size
    from .safety import DEFAULT_MAX_VIRTUAL_SIZE

    table = table or format_table()
    source = open_source(target)
    opened: list[ByteSource] = []
    try:
        info = probe(source, format=format, table=table)  # what QEMU's open refuses
        if info.file_type == "directory":  # QEMU's file driver opens regular files and devices only
            raise CheckFailed("Could not open: a directory is not an image")
        check_size(info, DEFAULT_MAX_VIRTUAL_SIZE if max_size is None else max_size)
        spec = table[info.format]
        driver = spec.driver(info.version)
        if spec.check is None or driver != spec.name:  # QEMU's driver for it is another row's (raw)
            raise NoCheck("This image format does not support checks")
        reader = CheckReader(source, budget, open_named=_named_files(target, named_files, opened))
        result = spec.check(Image(source), reader)
    finally:
        for named in opened:
            named.close()
        if source is not target:
            source.close()
    name = os.fspath(target) if isinstance(target, (str, os.PathLike)) else source.name
    return Report(str(name), driver, result)


def _named_files(
    target: Target, policy: BackingPolicy | str | os.PathLike[str] | None, opened: list[ByteSource]
) -> Callable[[str], ByteSource] | None:
    """How a check opens the files the image at ``target`` names for its own
    data: by the data path's rules under ``policy`` (each file kept in
    ``opened``, to be closed); None when the policy refuses them all or the
    target has no path for their names to be relative to."""
    if policy is None or not isinstance(target, (str, os.PathLike)):
        return None
    from .blockmap import TableCache
    from .datapath import BackingPolicy, backing_inside, named_opener

    chosen = policy if isinstance(policy, BackingPolicy) else backing_inside(policy)
    opener = named_opener(os.fspath(target), chosen, TableCache(0))
    if opener is None:
        return None

    def open_named(name: str) -> ByteSource:
        named = opener(name)
        opened.append(named)
        return named

    return open_named


def to_json(report: Report) -> str:
    """``qemu-img check --output=json``'s text (newline included): counts that
    are zero are left out, except check-errors, as qemu-img does; strings are
    escaped as QEMU's JSON writer escapes them."""
    result = report.result
    values = {
        "filename": qemu_json_string(report.filename),
        "format": qemu_json_string(report.format),
        "check-errors": result.check_errors,
        "image-end-offset": result.image_end_offset,
        "corruptions": result.corruptions,
        "leaks": result.leaks,
        "total-clusters": result.total_clusters,
        "allocated-clusters": result.allocated_clusters,
        "fragmented-clusters": result.fragmented_clusters,
        "compressed-clusters": result.compressed_clusters,
    }
    members = [f'    "{key}": {values[key]}' for key in JSON_KEYS if values.get(key) or key == "check-errors"]
    return "{\n" + ",\n".join(members) + "\n}\n"


#: What QEMU's JSON writer writes for these characters instead of a \u escape.
_SHORT_ESCAPES = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\f": "\\f", "\n": "\\n", "\r": "\\r", "\t": "\\t"}
#: The least code point a UTF-8 sequence of 2, 3, 4, 5, 6 bytes may encode (shorter ones are overlong).
_SHORTEST = (0x80, 0x800, 0x10000, 0x200000, 0x4000000)


def qemu_json_string(text: str) -> str:
    """``text`` (a file name: bytes that are not UTF-8 arrive as surrogate
    escapes) as QEMU's JSON writer quotes it: printable ASCII as it is, the
    usual short escapes, every other code point as ``\\uXXXX`` in upper case
    (beyond the BMP a surrogate pair), and each byte sequence QEMU's modified
    UTF-8 reader refuses as one U+FFFD."""
    data = os.fsencode(text)
    out = ['"']
    position = 0
    while position < len(data):
        point, position = _codepoint(data, position)
        char = chr(point)
        if char in _SHORT_ESCAPES:
            out.append(_SHORT_ESCAPES[char])
        elif point > 0xFFFF:
            point -= 0x10000
            out.append(f"\\u{0xD800 + (point >> 10):04X}\\u{0xDC00 + (point & 0x3FF):04X}")
        elif point < 0x20 or point >= 0x7F:
            out.append(f"\\u{point:04X}")
        else:
            out.append(char)
    return "".join(out) + '"'


def _codepoint(data: bytes, position: int) -> tuple[int, int]:
    """QEMU's mod_utf8_codepoint: the code point at ``position`` (U+FFFD for a
    sequence it refuses) and where the next one starts."""
    first = data[position]
    position += 1
    if first < 0x80:
        return first, position
    if first >= 0xFE or not first & 0x40:  # impossible byte, or a continuation byte first
        return 0xFFFD, position
    length = _sequence_length(first)
    point = first & ((0x80 >> length) - 1)
    for _ in range(1, length):
        if position >= len(data) or data[position] & 0xC0 != 0x80:
            return 0xFFFD, position  # a continuation byte missing
        point = point << 6 | data[position] & 0x3F
        position += 1
    valid = (
        point <= 0x10FFFF
        and not 0xFDD0 <= point <= 0xFDEF
        and point & 0xFFFE != 0xFFFE
        and not 0xD800 <= point <= 0xDFFF
        and (point >= _SHORTEST[length - 2] or (point == 0 and length == 2))
    )
    return (point if valid else 0xFFFD), position


def _sequence_length(first: int) -> int:
    """How many bytes a sequence starting with ``first`` says it has (its leading one bits)."""
    return 8 - (first ^ 0xFF).bit_length()


def to_human(report: Report) -> str:
    """``qemu-img check``'s human text (newline included)."""
    result = report.result
    lines: list[str] = []
    if not (result.corruptions or result.leaks or result.check_errors):
        lines.append("No errors were found on the image.")
    if result.corruptions:
        lines += ["", f"{result.corruptions} errors were found on the image.",
                  "Data may be corrupted, or further writes to the image may corrupt it."]
    if result.leaks:
        lines += ["", f"{result.leaks} leaked clusters were found on the image.",
                  "This means waste of disk space, but no harm to data."]
    if result.check_errors:
        lines += ["", f"{result.check_errors} internal errors have occurred during the check."]
    if result.total_clusters and result.allocated_clusters:
        allocated = result.allocated_clusters
        lines.append(
            f"{allocated}/{result.total_clusters} = {allocated * 100.0 / result.total_clusters:.2f}% allocated, "
            f"{result.fragmented_clusters * 100.0 / allocated:.2f}% fragmented, "
            f"{result.compressed_clusters * 100.0 / allocated:.2f}% compressed clusters"
        )
    if result.image_end_offset:
        lines.append(f"Image end offset: {result.image_end_offset}")
    return "\n".join(lines) + "\n"
