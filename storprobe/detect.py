"""The probing loop: choose a row of the format table, then run its callbacks.

Detection follows libvirt's rule and improves on it: a row whose magic and
version match wins (rows in table order); a magic match with an unknown version
is reported as such, not as raw (for the row whose known versions lie nearest,
when rows share the magic); a file-name extension counts only for rows
without a signature; a catch-all row (raw, dir) is the fallback. Every row
whose signature matches is listed in the result, so polyglots stay visible.
"""

import os
import sys
from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING, Any, BinaryIO, NamedTuple

from .engine import KnownBytes, Rounds, rounds
from .errors import InvalidHeader, ProbeError, TruncatedHeader, UnsupportedVersion
from .layout import read_uint
from .model import ImageInfo
from .registry import FormatTable, format_table
from .source import ByteSource, BytesSource, FileSource, Image, PathSource
from .spec import QEMU_MAX_LENGTH, Features, FormatSpec
from .urls import is_url, object_client

if TYPE_CHECKING:
    from .backing import BackingStore, RefusedName

Target = str | os.PathLike[str] | bytes | BinaryIO | ByteSource
#: A refused signature's error, made only when it is raised.
Refusal = Callable[[], ProbeError]


def open_source(target: Target) -> ByteSource:
    """A byte source for a path, bytes, an open binary file or a source."""
    if isinstance(target, (str, os.PathLike)):
        return PathSource(target)
    if isinstance(target, (bytes, bytearray, memoryview)):
        return BytesSource(bytes(target))
    if hasattr(target, "read_at"):
        return target  # type: ignore[return-value]
    return FileSource(target)


def probe(
    target: Target, *, format: str | None = None, table: FormatTable | None = None, endpoint_url: str | None = None
) -> ImageInfo:
    """Probe one volume. With ``format``, trust the caller and do not detect.
    A ``str`` URL (``s3://``, ``gs://``, ``az://``, ``http(s)://``) is an object
    read by ranges (the ``remote`` extra; ``endpoint_url``: an S3-compatible store's).

    Raises a :class:`~storprobe.errors.ProbeError` subclass when the volume
    cannot be probed; never another exception for any bytes in the volume.
    """
    if is_url(target):
        return object_client().probe_url(
            target, format=format, table=table, endpoint_url=endpoint_url
        )
    table = table or format_table()
    source = open_source(target)
    try:
        img = Image(source)
        return describe_image(img, table, format)
    finally:
        if source is not target:
            source.close()


def probing(known: KnownBytes, *, format: str | None = None, table: FormatTable | None = None) -> Rounds[ImageInfo]:
    """:func:`probe` of a volume whose bytes arrive in rounds: a generator that
    yields the ranges it needs and is sent them (see :mod:`storprobe.engine`)."""
    table = table or format_table()
    return rounds(lambda source: describe_image(Image(source), table, format), known)


def describe_image(img: Image, table: FormatTable, format: str | None) -> ImageInfo:
    """Choose the row for ``img`` (or take the caller's ``format``) and describe it."""
    matched, rejected = _signatures(img, table)
    matches = tuple(matched)
    if format is not None:
        spec = table[format]
        if img.file_type not in spec.file_types:  # a directory is no raw disk, a file no dir pool volume
            raise InvalidHeader(f"a {img.file_type} cannot be a {spec.name} volume", code="wrong-file-type")
        if (spec.magic or spec.match) and spec.name not in matched:
            if spec.name in rejected:
                raise rejected[spec.name]()
            article = "an" if spec.name[:1] in "aeiou" else "a"
            raise InvalidHeader(f"not {article} {spec.name} image (its signature is missing)", code="wrong-format")
        found = matched.get(spec.name, Signature(spec, spec.header_offsets[0], by_magic=False))
        return _describe(img, table, spec, found, "caller", matches)
    if matched:
        found = next(iter(matched.values()))
        return _describe(img, table, found.spec, found, "magic", matches)
    if rejected:
        raise _refusal([refuse() for refuse in rejected.values()])
    for spec in table.unsigned:
        if img.file_type in spec.file_types:
            no_signature = Signature(spec, spec.header_offsets[0], by_magic=False)
            if spec.extension and img.name.lower().endswith(spec.extension):
                return _describe(img, table, spec, no_signature, "extension", matches)
            if spec.catch_all:
                return _describe(img, table, spec, no_signature, "fallback", matches)
    raise ProbeError(f"no format applies to a {img.file_type}", code="no-format")


class Signature(NamedTuple):
    """Where a row's header was found, and whether its magic (so its declared
    version field) applies, or its ``match`` callback recognised it; the
    version its magic's row accepted, when the row declares a version field."""

    spec: FormatSpec
    offset: int
    by_magic: bool
    version: int | None = None


def _signatures(img: Image, table: FormatTable) -> tuple[dict[str, Signature], dict[str, Refusal]]:
    """Rows whose signature and version the bytes carry (in table order), and
    rows whose signature matched but whose version or header was refused."""
    matched: dict[str, Signature] = {}
    rejected: dict[str, Refusal] = {}
    found = _indexed_magics(img, table)
    for position in sorted(found.keys() | table.unindexed) if table.unindexed else sorted(found):
        spec, magics, indexed = table.signed[position]
        if img.file_type not in spec.file_types:
            continue
        if not indexed:
            signature = _first_signature(img, spec, magics)
        elif found[position][2]:
            signature = Signature(spec, found[position][1], True)
        else:  # a prefix gating the row's match callback
            signature = _matched(img, spec, found[position][1])
        if signature is None:
            continue
        if signature.by_magic and spec.version_offset is not None:
            version = _version(img, spec, signature.offset)
            if not isinstance(version, int):
                rejected[spec.name] = version
                continue
            signature = Signature(spec, signature.offset, True, version)
        matched[spec.name] = signature
    return matched, rejected


def _indexed_magics(img: Image, table: FormatTable) -> dict[int, tuple[int, int, bool]]:
    """Position in ``table.signed`` -> (rank, offset, whether by magic) of the
    first header offset whose magic (or a prefix gating the row's ``match``)
    the bytes carry, for the rows the index decides; a magic beats a prefix."""
    found: dict[int, tuple[int, int, bool]] = {}
    head, size = img.head, img.size
    for start, key, longest, candidates in table.windows:
        if start >= 0:
            data, at = head, start
            entries = candidates.get(head[start : start + key])
        elif size + start >= 0:
            data, at = img.read(size + start, longest), 0
            entries = candidates.get(data[:key])
        else:
            continue
        for signature, position, rank, offset, is_magic in entries or ():
            if data.startswith(signature, at):
                best = found.get(position)
                if best is None or (rank, not is_magic) < (best[0], not best[2]):
                    found[position] = (rank, offset, is_magic)
    return found


def _first_signature(img: Image, spec: FormatSpec, magics: tuple[bytes, ...]) -> Signature | None:
    for offset in spec.header_offsets:
        signature = _signature_at(img, spec, magics, offset)
        if signature is not None:
            return signature
    return None


def _signature_at(img: Image, spec: FormatSpec, magics: tuple[bytes, ...], offset: int) -> Signature | None:
    """The plain path: the row's magic, else its ``match`` callback, at one header offset."""
    size, head = img.size, img.head
    if offset < 0 and size + offset < 0:
        return None
    where = (size + offset if offset < 0 else offset) + spec.magic_offset
    for magic in magics:
        end = where + len(magic)
        if where < 0 or end > size:
            continue
        if head.startswith(magic, where) if end <= len(head) else img.read(where, len(magic)) == magic:
            return Signature(spec, offset, True)
    return _matched(img, spec, offset) if spec.match is not None else None


def _matched(img: Image, spec: FormatSpec, offset: int) -> Signature | None:
    """The row's ``match`` callback asked about the header at ``offset``."""
    recognised = guarded(spec, "match", lambda: spec.match(img.at_header(offset)))  # type: ignore[misc]
    return Signature(spec, offset, False) if recognised else None


def _version(img: Image, spec: FormatSpec, offset: int) -> int | Refusal:
    """The version in the row's version field, if the row accepts it; else why not."""
    try:
        header = img.at_header(offset).header
    except ProbeError as exc:
        return partial(_same, exc)
    try:
        version = read_uint(header, spec.version_offset, spec.version_width, spec.endian)  # type: ignore[arg-type]
    except TruncatedHeader:
        return partial(_same, TruncatedHeader(f"{spec.name} header is truncated before its version field"))
    if version in spec.versions:
        return version
    return partial(UnsupportedVersion, spec.name, version, spec.versions)


def _same(error: ProbeError) -> ProbeError:
    return error


def _refusal(errors: list[ProbeError]) -> ProbeError:
    """What to report when every signature found was refused: the first in
    table order, but a refused version for the row whose known versions lie
    nearest it. Rows that share a magic tell themselves apart by version, as
    QEMU's probes do: under a magic that one row reads as version 1 and
    another as versions 2 and 3, version 4 is an unsupported version of the
    second, not of the first."""
    first = errors[0]
    if not isinstance(first, UnsupportedVersion):
        return first
    return min((e for e in errors if isinstance(e, UnsupportedVersion)), key=_distance)


def _distance(error: UnsupportedVersion) -> int:
    return min((abs(error.version - known) for known in error.accepted), default=sys.maxsize)


_NO_FEATURES = Features()
#: QEMU's block layer shows every volume in whole sectors of this size.
SECTOR = 512


def _describe(
    img: Image, table: FormatTable, spec: FormatSpec, found: Signature, evidence: str, matches: tuple[str, ...]
) -> ImageInfo:
    img.at_header(found.offset)
    if spec.reads and isinstance(img.source, KnownBytes):  # by rounds: fetch what the callbacks read, at once
        img.source.ask_ahead(img.header_offset, spec.reads)
    header = img.header
    callback = "features"
    try:  # one guard for every callback: a bug in one becomes a named error, not a traceback
        features = spec.features(img) if spec.features is not None else _NO_FEATURES
        callback = "size"
        if spec.size is not None:
            virtual_size = spec.size(img)
        elif spec.size_offset is not None:
            virtual_size = read_uint(header, spec.size_offset, spec.size_width, spec.endian) * spec.size_multiplier
        else:
            virtual_size = img.size
        if virtual_size > QEMU_MAX_LENGTH:  # QEMU opens no disk this long, whatever its format
            raise InvalidHeader(
                f"virtual size {virtual_size} exceeds QEMU's limit {QEMU_MAX_LENGTH}",
                code=f"{spec.name}.size-too-large",
            )
        encryption = features.encryption
        if encryption is None and spec.crypt_offset is not None:
            method = read_uint(header, spec.crypt_offset, spec.crypt_width, spec.endian)
            if method:
                encryption = spec.crypt_methods.get(method, f"unknown-{method}")
        callback = "backing"
        backing = spec.backing(img) if spec.backing is not None else None
    except ProbeError:
        raise
    except Exception as exc:  # a plugin defect must not escape as a traceback
        raise _plugin_error(spec, callback, exc) from exc
    stat = img.source.stat
    driver = spec.driver(found.version)
    driver_size = None
    if driver != spec.name and img.file_type != "directory":  # QEMU reads the bytes as they are
        driver_size = -(-img.size // SECTOR) * SECTOR
    backing_libvirt_format: str | None = None
    backing_store: BackingStore | RefusedName | None = None
    data_file_store: BackingStore | RefusedName | None = None
    data_file = features.data_file
    if backing is not None or (data_file is not None and data_file.name is not None):
        from .backing import describe_backing_name  # only images that name one pay for its import

        if backing is not None:
            backing_store = describe_backing_name(backing.name, img.name)
            if backing.format is not None:
                recorded = backing.format
                backing_libvirt_format = table[recorded].libvirt_format if recorded in table else recorded
        if data_file is not None and data_file.name is not None:
            data_file_store = describe_backing_name(data_file.name, img.name)
    return ImageInfo(  # by position, in the field order: keywords cost 1.5 us per probe
        img.name,  # filename
        spec.name,  # format
        virtual_size,
        stat.st_blocks * 512 if stat is not None else None,  # actual_size
        img.file_type,
        evidence,
        matches,
        found.version,
        features.cluster_size,
        encryption,
        features.dirty,
        features.compat,
        features.flags,
        backing,
        features.data_file,
        features.snapshots,
        features.specific,
        features.details,
        stat,
        driver,
        driver_size,
        spec.libvirt,
        backing_libvirt_format,
        backing_store,
        data_file_store,
        getattr(img.source, "security_label", None),  # optional: see ByteSource
        _header_at_start(img, spec),
    )


def _header_at_start(img: Image, spec: FormatSpec) -> bool:
    """Whether ``spec``'s header occupies the first sector: a row with a signature
    below the sector's end whose header is at 0 (for a row that also reads one
    elsewhere, a trailer, only when its magic is at 0)."""
    if spec.catch_all or spec.magic_offset >= SECTOR or 0 not in spec.header_offsets:
        return False
    return spec.header_offsets == (0,) or any(img.head.startswith(m, spec.magic_offset) for m in spec.magics)



def guarded(spec: FormatSpec, callback: str, call: Callable[[], Any]) -> Any:
    """Run a plugin callback; a bug in it becomes a named error, not a traceback."""
    try:
        return call()
    except ProbeError:
        raise
    except Exception as exc:  # a plugin defect must not escape as a traceback
        raise _plugin_error(spec, callback, exc) from exc


def _plugin_error(spec: FormatSpec, callback: str, exc: Exception) -> ProbeError:
    return ProbeError(
        f"{spec.name} plugin's {callback} callback failed: {type(exc).__name__}: {exc}", code="plugin-error"
    )
