"""vmdk: VMware virtual disks, read the way QEMU's vmdk driver opens them.

Three kinds of file are a VMDK:

- a hosted sparse extent, magic ``KDMV`` (VMware Virtual Disk Format 1.1,
  section 4.1), with its descriptor embedded at sector 1: monolithicSparse, or
  streamOptimized when its grains are deflate-compressed (then the header may
  sit in a footer near the end of the file, which QEMU uses in place of the
  one at the start; both are reported, and a footer that is no faithful copy
  of the header is flagged);
- an ESX sparse extent, magic ``COWD`` (QEMU's "VMDK3");
- a text descriptor file naming the extents that hold the data (monolithicFlat,
  twoGbMaxExtentSparse/Flat, vmfs, vmfsSparse, seSparse), recognised as QEMU's
  probe recognises it.

The probe reports extents and parents, never opens or looks at them; for
``storprobe check`` the row flags extents other than the file itself, outside
its directory, or devices (CVE-2022-47951). The data path (``block_map``)
reads the grains as QEMU 7.2 does, and opens a descriptor's extent files only
through the policy the image was opened with (``HostFile.open_named``).

QEMU reads a descriptor in its own way (a sparse file's descriptor always at
sector 1, keys found as substrings anywhere in the text, extent lines scanned
with sscanf); this plugin reads it the same way, so that what it reports is
what QEMU opens.
"""

import bisect
import functools
import re
import struct
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple, NoReturn

from storprobe import (
    INT64_MAX,
    QEMU_MAX_LENGTH,
    Backing,
    Features,
    FormatSpec,
    Hazard,
    Image,
    ImageInfo,
    InvalidHeader,
    Layout,
    TruncatedHeader,
    UnsupportedVersion,
    hookimpl,
)
from storprobe.layout import qemu_utf8

if TYPE_CHECKING:  # the data path loads when first used, not for a probe
    from storprobe.blockmap import Extent as BlockExtent
    from storprobe.blockmap import HostFile
    from storprobe.verify import CheckReader, CheckResult

SECTOR = 512
SPARSE_MAGIC = b"KDMV"
COWD_MAGIC = b"COWD"
VERSIONS = (1, 2, 3)
GD_AT_END = 0xFFFF_FFFF_FFFF_FFFF  # gdOffset of a streamOptimized header whose footer holds the real one
DEFLATE = 1  # compressAlgorithm
REDUNDANT_GD = 1 << 1  # flags: the redundant grain directory at rgdOffset is in use
MARKER_EOS, MARKER_FOOTER = 0, 3  # stream marker types
FOOTER_SIZE = 3 * SECTOR  # footer marker, footer header, end-of-stream marker
FOOTER_MARKER_SECTORS = 1  # a footer marker's value: the one sector of header after it
FOOTER_FILLS = "gd-offset"  # the one header field a footer does not copy

# QEMU's bounds (block/vmdk.c); a header beyond one is refused, not trusted.
PROBE_SIZE = 512  # bytes QEMU's format probe sees (BLOCK_PROBE_BUF_SIZE)
DESC_SIZE = 20 * SECTOR  # bytes QEMU searches for CID, parentCID, parentFileNameHint
DESC_MAX = (1 << 20) - 1  # most descriptor bytes QEMU reads at all
MAX_GRAIN_SECTORS = 0x200000  # 1 GiB grains
MAX_GTES_PER_GT = 512
MAX_L1_ENTRIES = 32 * 1024 * 1024
MAX_CREATE_TYPE = 127
MAX_HINT = 4095  # PATH_MAX - 1
# Our own cap: 64 TiB (the largest disk QEMU's vmdk driver allows for, seSparse)
# in the 2 GiB extents qemu-img splits a twoGbMaxExtent disk into.
MAX_EXTENTS = 32768

# createType values QEMU opens from a descriptor file.
DESCRIPTOR_TYPES = frozenset(
    {"monolithicFlat", "vmfs", "vmfsSparse", "seSparse", "twoGbMaxExtentSparse", "twoGbMaxExtentFlat"}
)
EXTENT_TYPES = frozenset({"FLAT", "SPARSE", "VMFS", "VMFSSPARSE", "SESPARSE"})
#: Extent types of a file that is one sparse extent, which its embedded descriptor may name.
SPARSE_EXTENT_TYPES = frozenset({"SPARSE", "VMFSSPARSE", "SESPARSE"})
#: Extents that are devices: raw device mappings, and names of device nodes
#: (Linux, ESXi) or of Windows device namespaces.
DEVICE_EXTENT_TYPES = frozenset({"VMFSRDM", "VMFSRAW", "VMFSPASSTHROUGHRAW"})
DEVICE_PREFIXES = ("/dev/", "/vmfs/devices/", "\\\\.\\", "\\\\?\\")
MAX_NAMED = 4  # extent names a hazard message lists
TEXT_VERSIONS = tuple(b"version=%d%s" % (v, end) for v in VERSIONS for end in (b"\n", b"\r\n"))

SPARSE_HEADER = Layout(
    "<",
    "vmdk sparse header",
    ("magic", "4s"),
    ("version", "I"),
    ("flags", "I"),
    ("capacity", "Q"),  # sectors
    ("grain_size", "Q"),  # sectors
    ("desc_offset", "Q"),  # sectors
    ("desc_size", "Q"),  # sectors
    ("num_gtes_per_gt", "I"),
    ("rgd_offset", "Q"),
    ("gd_offset", "Q"),
    ("overhead", "Q"),  # sectors before the first grain
    ("unclean_shutdown", "B"),
    (None, "4x"),  # '\n', ' ', '\r', '\n' line-ending check bytes
    ("compress_algorithm", "H"),
)
STREAM_MARKER = Layout("<", "vmdk stream marker", ("value", "Q"), ("size", "I"), ("type", "I"))
COWD_HEADER = Layout(
    "<",
    "vmdk COWD header",
    ("magic", "4s"),
    ("version", "I"),
    ("flags", "I"),
    ("capacity", "I"),  # sectors
    ("grain_size", "I"),  # sectors
    ("gd_offset", "I"),  # sectors
    ("gd_entries", "I"),
    ("free_sector", "I"),
)

# An extent line as QEMU's sscanf("%10s %ld %10s \"%511[^\n\r\"]\" %ld") reads it,
# anchored on the last newline before the line's first non-space byte. The
# possessive quantifiers take what scanf takes and never give it back. (These
# patterns compile when a VMDK is first read (_pattern), not at import.)
_EXTENT_LINE = (
    rb"\n[ \t\r\f\v]*+(?="
    rb"(\S{1,10}+)\s*+([+-]?+[0-9]++)\s*+(\S{1,10}+)\s*+\"([^\n\r\"]{1,511}+)"
    rb"(?:\"\s*+([+-]?+[0-9]++))?)"
)
_HEX = rb"\s*(?:0[xX])?([0-9a-fA-F]+)"
_PATH_SEPARATOR = r"[/\\]"
WHITESPACE = frozenset(b" \t\n\r\f\v")


@functools.cache
def _pattern(source: bytes) -> re.Pattern[bytes]:
    """A pattern of this module, compiled once, when first used."""
    return re.compile(source)


@functools.cache
def _path_separator() -> re.Pattern[str]:
    return re.compile(_PATH_SEPARATOR)


class Extent(NamedTuple):
    """One extent line as recorded; ``offset`` is None when the line has none."""

    access: str
    sectors: int
    type: str
    filename: str
    offset: int | None

    def as_dict(self) -> dict:
        entry = {"access": self.access, "sectors": self.sectors, "type": self.type, "filename": self.filename}
        if self.offset is not None:
            entry["offset"] = self.offset
        return entry


class Footer(NamedTuple):
    """A streamOptimized footer: the header QEMU uses in place of the one at the
    start, and what of it disagrees with that one (which other readers use)."""

    start: Any  # the header at the start of the file
    header: Any  # the footer's header
    marker_sectors: int  # the footer marker's value
    differences: tuple[str, ...]  # "version 1 in the header, 3 in the footer" ...
    extents: tuple[Extent, ...]  # extent lines of another descriptor the footer points at


class Disk(NamedTuple):
    """What QEMU opens: this file's own sparse extent, or a descriptor's extents."""

    kind: str  # "KDMV", "COWD" or "descriptor"
    sectors: int  # virtual size
    version: int | None = None
    grain: int | None = None  # sectors per grain of this file's own sparse extent
    compressed: bool = False
    footer: Footer | None = None
    create_type: str = ""
    recorded: tuple[Extent, ...] = ()  # every extent line of the descriptor text
    extents: tuple[Extent, ...] = ()  # the descriptor's extents QEMU opens


def match(img: Image) -> bool:
    """COWD, or a text descriptor: after '#' comment lines and lines of spaces,
    a ``version=1|2|3`` line within the first 512 bytes (QEMU's probe)."""
    head = img.head[:PROBE_SIZE]
    if head.startswith(COWD_MAGIC):
        return True
    pos = 0
    while pos < len(head):
        if head[pos] == ord("#"):
            end = head.find(b"\n", pos)
            pos = len(head) if end < 0 else end + 1
        elif head[pos] == ord(" "):
            end = len(head) - len(head[pos:].lstrip(b" "))
            end += head.startswith(b"\r", end)
            if not head.startswith(b"\n", end):
                return False
            pos = end + 1
        else:
            return head.startswith(TEXT_VERSIONS, pos)
    return False


def size(img: Image) -> int:
    """The sparse header's capacity, or the sum of the extents QEMU opens."""
    return _disk(img).sectors * SECTOR


def backing(img: Image) -> Backing | None:
    """parentFileNameHint, whatever parentCID says: QEMU opens the hint regardless."""
    hint = _value(_keys(img), b"parentFileNameHint", MAX_HINT, "vmdk.parent-hint")
    return Backing(qemu_utf8(hint), "vmdk") if hint else None


def features(img: Image) -> Features:
    """Grain size, qemu-img's format-specific data (only when QEMU can open the
    file, which needs a CID and a parentCID) and the extent lines as recorded."""
    disk = _disk(img)
    keys = _keys(img)
    details: dict = {"kind": disk.kind}
    if disk.version is not None:
        details["version"] = disk.version
    if disk.footer is not None:
        details["header"] = _header_facts(disk.footer.start)
        details["footer"] = _footer_facts(disk.footer)
    details["extents"] = [extent.as_dict() for extent in disk.recorded]
    cid, parent_cid = _cid(keys, b"CID"), _cid(keys, b"parentCID")
    specific = None
    if cid is not None and parent_cid is not None:  # else QEMU cannot open the file
        specific = {
            "cid": cid,
            "parent-cid": parent_cid,
            "create-type": disk.create_type,
            "extents": _extent_info(img, disk),
        }
    return Features(
        cluster_size=disk.grain * SECTOR if disk.grain else None,
        specific=specific,
        details=details,
    )


def _disk(img: Image) -> Disk:
    """What QEMU opens, read once per probe (the size and features callbacks share it)."""
    return img.memo(_disk, _read_disk)


def _read_disk(img: Image) -> Disk:
    magic = img.head[:4]
    if magic == SPARSE_MAGIC:
        return _sparse(img)
    if magic == COWD_MAGIC:
        return _cowd(img)
    return _descriptor(img, "descriptor", 0)


def _sparse(img: Image) -> Disk:
    """The sparse header QEMU uses (the footer's when the one at the start says
    GD_AT_END), every rule QEMU applies checked on it."""
    hdr = SPARSE_HEADER.unpack(img.head)
    footer = None
    if hdr.gd_offset != GD_AT_END:  # else QEMU checks the footer's version only
        _check_version(hdr.version)
    _check_embedded_descriptor(img, hdr)
    if hdr.capacity == 0 and hdr.desc_offset:  # QEMU then reads the descriptor as a descriptor file
        return _descriptor(img, "KDMV", hdr.desc_offset * SECTOR, hdr.version)
    if hdr.gd_offset == GD_AT_END:
        footer = _footer(img, hdr)
        hdr = footer.header
        _check_version(hdr.version)
    if not 1 <= hdr.num_gtes_per_gt <= MAX_GTES_PER_GT:
        raise InvalidHeader(
            f"{hdr.num_gtes_per_gt} grain table entries per grain table (1..{MAX_GTES_PER_GT})",
            code="vmdk.gtes-per-gt",
        )
    _check_grain(hdr.grain_size)
    _check_capacity(hdr.capacity)
    gd_entries = -(-hdr.capacity // (hdr.num_gtes_per_gt * hdr.grain_size))
    _check_l1_entries(gd_entries)
    _check_directory_offset(hdr.gd_offset, gd_entries, "grain directory", "vmdk.gd-offset")
    if hdr.flags & REDUNDANT_GD and hdr.rgd_offset:
        _check_directory_offset(hdr.rgd_offset, gd_entries, "redundant grain directory", "vmdk.rgd-offset")
    if hdr.overhead > -(-img.size // SECTOR):
        raise InvalidHeader(
            f"file truncated: grains start at sector {hdr.overhead}, the file has {img.size} bytes",
            code="vmdk.overhead",
        )
    compressed = hdr.compress_algorithm == DEFLATE
    return Disk(
        kind="KDMV",
        sectors=hdr.capacity,
        version=hdr.version,
        grain=hdr.grain_size,
        compressed=compressed,
        footer=footer,
        create_type="streamOptimized" if compressed else "monolithicSparse",
        recorded=_recorded(img),
    )


def _cowd(img: Image) -> Disk:
    hdr = COWD_HEADER.unpack(img.head)
    _check_grain(hdr.grain_size)
    _check_l1_entries(hdr.gd_entries)
    return Disk(
        kind="COWD",
        sectors=hdr.capacity,
        version=hdr.version,
        grain=hdr.grain_size,
        recorded=_recorded(img),
    )


def _recorded(img: Image) -> tuple[Extent, ...]:
    """The extent lines of a sparse file's embedded descriptor (QEMU opens none)."""
    return tuple(extent for _, extent in _scan_extents(_keys(img)))


def _descriptor(img: Image, kind: str, start: int, version: int | None = None) -> Disk:
    """A descriptor QEMU opens as a descriptor file: its createType and extents."""
    text = _text(img, start, DESC_MAX)
    if len(text) == DESC_MAX and img.size > start + DESC_MAX:
        raise InvalidHeader(
            f"descriptor text runs past the {DESC_MAX} bytes QEMU reads", code="vmdk.descriptor-size"
        )
    raw_type = _value(text, b"createType", MAX_CREATE_TYPE, "vmdk.create-type-missing")
    if raw_type is None:
        raise InvalidHeader("descriptor has no createType", code="vmdk.create-type-missing")
    create_type = qemu_utf8(raw_type)
    if create_type not in DESCRIPTOR_TYPES:
        raise InvalidHeader(f"unsupported createType {create_type!r}", code="vmdk.create-type")
    scanned = _scan_extents(text)
    extents = _opened_extents(text, scanned)
    if not extents:
        raise InvalidHeader("descriptor names no extent QEMU can open", code="vmdk.no-extents")
    sectors = sum(extent.sectors for extent in extents)
    _check_capacity(sectors)
    return Disk(
        kind=kind,
        sectors=sectors,
        version=version,
        create_type=create_type,
        recorded=tuple(extent for _, extent in scanned),
        extents=extents,
    )


def _footer(img: Image, start: Any) -> Footer:
    """The streamOptimized footer, which QEMU reads 1536 bytes before the end of
    the file rounded up to a sector (zeros past the end), checked as QEMU checks
    it (magic, the footer marker's size and type, the end-of-stream marker), and
    compared with the header at the start: QEMU 7.2 takes the footer's grain
    directory, capacity and grain but reads the descriptor at sector 1, while
    other readers may take the header at the start, or the footer's descriptor."""
    at = -(-img.size // SECTOR) * SECTOR - FOOTER_SIZE
    if at < 0:
        raise TruncatedHeader(f"file of {img.size} bytes is too short for a streamOptimized footer")
    data = img.read(at, FOOTER_SIZE, exact=False).ljust(FOOTER_SIZE, b"\0")
    marker = STREAM_MARKER.unpack(data)
    hdr = SPARSE_HEADER.unpack(data, SECTOR)
    eos = STREAM_MARKER.unpack(data, 2 * SECTOR)
    if (
        hdr.magic != SPARSE_MAGIC
        or (marker.size, marker.type) != (0, MARKER_FOOTER)
        or tuple(eos) != (0, 0, MARKER_EOS)
        or hdr.gd_offset == GD_AT_END
    ):
        raise InvalidHeader("header says the footer holds it, but there is no valid footer", code="vmdk.footer")
    ours, theirs = _header_facts(start), _header_facts(hdr)
    differences = [
        f"{name} {ours[name]} in the header, {theirs[name]} in the footer"
        for name in ours
        if name != FOOTER_FILLS and ours[name] != theirs[name]
    ]
    if marker.value != FOOTER_MARKER_SECTORS:
        differences.append(f"footer marker of {marker.value} sectors, not {FOOTER_MARKER_SECTORS}")
    if img.size % SECTOR:
        differences.append(f"end-of-stream marker cut short: the file ends {img.size % SECTOR} bytes into a sector")
    return Footer(start, hdr, marker.value, tuple(differences), _footer_extents(img, start, hdr))


def _footer_extents(img: Image, start: Any, hdr: Any) -> tuple[Extent, ...]:
    """The extent lines of the descriptor the footer points at, when it is not the
    one the header at the start points at (QEMU 7.2 never reads it; a reader
    that trusts the footer opens these). A text that cannot be scanned names none."""
    if (hdr.desc_offset, hdr.desc_size) == (start.desc_offset, start.desc_size) or not hdr.desc_offset:
        return ()
    if hdr.desc_offset * SECTOR >= img.size:
        return ()
    text = _text(img, hdr.desc_offset * SECTOR, min(hdr.desc_size * SECTOR, DESC_MAX))
    try:
        return tuple(dict.fromkeys(extent for _, extent in _scan_extents(text)))
    except InvalidHeader:
        return ()


def _header_facts(hdr: Any) -> dict:
    """A sparse header's fields as the details show them (sectors where the spec counts sectors)."""
    return {
        "version": hdr.version,
        "flags": hdr.flags,
        "capacity": hdr.capacity,
        "grain-size": hdr.grain_size,
        "descriptor-offset": hdr.desc_offset,
        "descriptor-size": hdr.desc_size,
        "gtes-per-gt": hdr.num_gtes_per_gt,
        "rgd-offset": hdr.rgd_offset,
        "gd-offset": hdr.gd_offset,
        "overhead": hdr.overhead,
        "compress-algorithm": hdr.compress_algorithm,
    }


def _footer_facts(footer: Footer) -> dict:
    facts = _header_facts(footer.header)
    facts["marker-sectors"] = footer.marker_sectors
    facts["agrees"] = not footer.differences
    if footer.differences:
        facts["differences"] = list(footer.differences)
    if footer.extents:
        facts["descriptor-extents"] = [extent.as_dict() for extent in footer.extents]
    return facts


def _check_version(version: int) -> None:
    if version not in VERSIONS:
        raise UnsupportedVersion("vmdk", version, VERSIONS)


def _check_embedded_descriptor(img: Image, hdr: Any) -> None:
    """QEMU reads a sparse file's descriptor at sector 1 whatever the header says,
    so a descriptor anywhere else would be read differently by QEMU and VMware."""
    if hdr.desc_offset == 0:
        return
    if hdr.desc_offset != 1:
        raise InvalidHeader(
            f"embedded descriptor at sector {hdr.desc_offset}, but QEMU reads it at sector 1",
            code="vmdk.descriptor-offset",
        )
    if hdr.desc_size * SECTOR > DESC_MAX:
        raise InvalidHeader(
            f"embedded descriptor of {hdr.desc_size} sectors exceeds the {DESC_MAX} bytes QEMU reads",
            code="vmdk.descriptor-size",
        )
    if (hdr.desc_offset + hdr.desc_size) * SECTOR > img.size:
        raise InvalidHeader(
            f"embedded descriptor (sectors {hdr.desc_offset}+{hdr.desc_size}) runs past the end of the file",
            code="vmdk.descriptor-range",
        )


def _check_grain(grain: int) -> None:
    if grain == 0 or grain & (grain - 1) or grain > MAX_GRAIN_SECTORS:
        raise InvalidHeader(
            f"grain of {grain} sectors (a power of two up to {MAX_GRAIN_SECTORS})", code="vmdk.grain-size"
        )


def _check_capacity(sectors: int) -> None:
    if sectors * SECTOR > INT64_MAX:
        raise InvalidHeader(f"capacity of {sectors} sectors overflows a 64-bit byte count", code="vmdk.capacity")


def _check_l1_entries(entries: int) -> None:
    if entries > MAX_L1_ENTRIES:
        raise InvalidHeader(f"grain directory of {entries} entries (at most {MAX_L1_ENTRIES})", code="vmdk.l1-size")


def _check_directory_offset(sector: int, entries: int, what: str, code: str) -> None:
    """QEMU reads the directory on open and its block layer refuses a read
    ending past its length limit (it reads zeros past the end of the file).
    QEMU shifts the sector into bytes in 64 bits, so from sector 2**55 the
    offset wraps and it reads elsewhere; storprobe refuses those too."""
    if sector * SECTOR + entries * 4 > QEMU_MAX_LENGTH:
        raise InvalidHeader(f"{what} at sector {sector} lies beyond what QEMU can read", code=code)


def _text(img: Image, start: int, limit: int) -> bytes:
    """The descriptor text QEMU reads at ``start``: at most ``limit`` bytes, ending
    at the first NUL or the end of the file."""
    length = max(0, min(limit, img.size - start))
    data = img.head[start : start + length]
    if len(data) < length and b"\0" not in data:
        data = img.read(start, length)
    return data.split(b"\0", 1)[0]


def _keys(img: Image) -> bytes:
    """The bytes QEMU searches for CID, parentCID and parentFileNameHint: the
    first 20 sectors of a descriptor file, or from sector 1 of a sparse file
    (read once per probe)."""
    return img.memo(_keys, _read_keys)


def _read_keys(img: Image) -> bytes:
    start = SECTOR if img.head[:4] in (SPARSE_MAGIC, COWD_MAGIC) else 0
    return _text(img, start, DESC_SIZE)


def _value(text: bytes, key: bytes, most: int, code: str) -> bytes | None:
    """The quoted value QEMU reads for ``key``: from two bytes after the key's first
    occurrence anywhere (it expects ``="``) to the next double quote. None when the
    key is absent; InvalidHeader(code) when unterminated or longer than ``most``."""
    at = text.find(key)
    if at < 0:
        return None
    start = at + len(key) + 2
    end = text.find(b'"', start)
    if end < 0 or end - start > most:
        raise InvalidHeader(f"{key.decode()} value is unterminated or longer than {most} bytes", code=code)
    return text[start:end]


def _cid(text: bytes, key: bytes) -> int | None:
    """The hex number one byte after the first occurrence of ``key`` (QEMU's
    ``CID``/``parentCID`` lookup); None when the key is absent."""
    at = text.find(key)
    if at < 0:
        return None
    found = _pattern(_HEX).match(text, at + len(key) + 1)
    if found is None or len(found[1].lstrip(b"0")) > 8:
        raise InvalidHeader(f"{key.decode()} is not a 32-bit hex number", code="vmdk.cid")
    return int(found[1], 16)


def _scan_extents(text: bytes) -> list[tuple[int, Extent]]:
    """The extents QEMU's line-by-line scan reads, each with the offset it is read
    at. Like sscanf, a scan skips whitespace over line ends, so every blank line
    before an extent line reads that extent once more."""
    lines = b"\n" + text  # the first line starts after a newline too
    found: list[tuple[int, Extent]] = []
    for line in _pattern(_EXTENT_LINE).finditer(lines):
        starts = _line_starts(lines, line.start())
        if len(found) + starts > MAX_EXTENTS:
            raise InvalidHeader(f"descriptor has more than {MAX_EXTENTS} extent lines", code="vmdk.extent-count")
        at = line.end() - 1
        access, sectors, kind, name, offset = line.groups()
        extent = Extent(
            access=qemu_utf8(access),
            sectors=_int64(sectors, text, at),
            type=qemu_utf8(kind),
            filename=qemu_utf8(name),
            offset=None if offset is None else _int64(offset, text, at),
        )
        found += [(at, extent)] * starts
    return found


def _line_starts(lines: bytes, newline: int) -> int:
    """How many lines start in the whitespace that ends just after ``newline``
    (more than MAX_EXTENTS is not counted further)."""
    count = 0
    while newline >= 0 and lines[newline] in WHITESPACE and count <= MAX_EXTENTS:
        count += lines[newline] == ord("\n")
        newline -= 1
    return count


def _int64(digits: bytes, text: bytes, pos: int) -> int:
    magnitude = digits.lstrip(b"+-").lstrip(b"0")
    if len(magnitude) > 19 or abs(value := int(digits)) > INT64_MAX:
        raise InvalidHeader(f"number out of range in extent line {_line(text, pos)!r}", code="vmdk.extent-line")
    return value


def _line(text: bytes, pos: int) -> str:
    end = text.find(b"\n", pos)
    return text[pos : end if end >= 0 else len(text)][:200].decode("utf-8", "replace")


def _opened_extents(text: bytes, scanned: list[tuple[int, Extent]]) -> tuple[Extent, ...]:
    """The extents QEMU opens: RW lines of a known type with sectors > 0. An RW
    line is invalid unless a FLAT line has an offset >= 0 and others have none."""
    opened = []
    for start, extent in scanned:
        if extent.access != "RW":
            continue
        if extent.type == "FLAT":
            valid = extent.offset is not None and extent.offset >= 0
        else:
            valid = extent.offset is None
        if not valid:
            raise InvalidHeader(f"invalid extent line {_line(text, start)!r}", code="vmdk.extent-line")
        if extent.sectors > 0 and extent.type in EXTENT_TYPES:
            opened.append(extent)
    return tuple(opened)


def _extent_path(image: str, name: str) -> str:
    """An extent's name as QEMU opens and shows it: relative names are appended
    to the descriptor's directory (everything up to its last slash)."""
    return name if name.startswith("/") else image[: image.rfind("/") + 1] + name


def _extent_info(img: Image, disk: Disk) -> list[dict]:
    """qemu-img's ``extents``. Sparse extents of a descriptor file lack the
    cluster size and compression qemu-img shows: those live in the extent files,
    which are never opened here."""
    if disk.grain is not None:
        own: dict = {"compressed": True} if disk.compressed else {}
        own["virtual-size"] = disk.sectors * SECTOR
        own["filename"] = img.name
        own["cluster-size"] = disk.grain * SECTOR
        own["format"] = ""
        return [own]
    return [
        {"virtual-size": e.sectors * SECTOR, "filename": _extent_path(img.name, e.filename), "format": e.type}
        for e in disk.extents
    ]


def hazards(img: Image, info: ImageInfo) -> Iterator[Hazard]:
    """CVE-2022-47951: extents are files a hypervisor opens, so a descriptor
    can make a flat extent of any host file. Every extent of a descriptor QEMU
    opens is another file; a sparse file is safe when its embedded descriptor
    names one sparse extent by a bare file name (itself, whatever it is called
    now: QEMU opens only the file). Names outside the image's directory and
    devices are flagged on their own, in either kind. A streamOptimized footer
    that disagrees with the header is flagged, and the extents of another
    descriptor it points at count as named."""
    if info.format != "vmdk":
        return
    disk = _disk(img)
    footer = disk.footer
    if footer is not None and footer.differences:
        yield Hazard(
            "vmdk.footer-mismatch",
            "its streamOptimized footer, which QEMU reads in place of the header, is no faithful copy of it ("
            + "; ".join(footer.differences)
            + "): readers that trust one or the other see different disks",
        )
    footer_extents = footer.extents if footer is not None else ()
    named = tuple(dict.fromkeys(disk.recorded + footer_extents))  # a line read twice is one extent
    only_itself = len(named) == 1 and named[0].type in SPARSE_EXTENT_TYPES and _bare(named[0].filename)
    if disk.grain is None or (named and not only_itself):
        yield Hazard(
            "vmdk.external-extent",
            f"its descriptor names extent files {_listed(named)}, which a hypervisor would open",
        )
    if outside := [e for e in named if _outside_directory(e.filename)]:
        yield Hazard(
            "vmdk.extent-path",
            f"extent names {_listed(outside)} reach outside the image's directory (absolute, '..' or a protocol)",
        )
    if devices := [e for e in named if e.type in DEVICE_EXTENT_TYPES or e.filename.startswith(DEVICE_PREFIXES)]:
        yield Hazard("vmdk.device-extent", f"extents {_listed(devices)} are devices of the host")


def _bare(name: str) -> bool:
    """A plain file name: no directory, no protocol."""
    return _path_separator().search(name) is None and ":" not in name and name not in ("", ".", "..")


def _outside_directory(name: str) -> bool:
    """Whether QEMU would open ``name`` outside the descriptor's directory: an
    absolute path, a ``..`` component, or a protocol or drive prefix (a colon
    before the first slash, which QEMU takes as is)."""
    parts = _path_separator().split(name)
    return name.startswith(("/", "\\")) or ".." in parts or ":" in parts[0]


def _listed(extents: Sequence[Extent]) -> str:
    """The first few names, quoted: ``'a', 'b' and 3 more``."""
    names = [repr(e.filename) for e in extents[:MAX_NAMED]]
    more = f" and {len(extents) - MAX_NAMED} more" if len(extents) > MAX_NAMED else ""
    return ", ".join(names) + more


# ---- data path: QEMU 7.2's block/vmdk.c (vmdk_add_extent, get_cluster_offset, vmdk_co_block_status,
# vmdk_read_extent, vmdk_co_check) ----------------------------------------------------------------------

FLAG_ZERO_GRAIN = 1 << 2  # grain table entries of 1 mean "reads as zeros"
FLAG_MARKER = 1 << 17  # compressed grains start with a marker: lba (u64), size (u32)
GTE_ZEROED = 1
COWD_GTES_PER_GT = 4096  # an ESX sparse extent's grain tables (QEMU's vmdk_open_vmdk3)
GRAIN_MARKER = struct.Struct("<QI")
FLAT_TYPES = frozenset({"FLAT", "VMFS"})  # extents that are their file from an offset on
SPARSE_FILE_TYPES = frozenset({"SPARSE", "VMFSSPARSE"})  # extents that are a hosted or ESX sparse extent file
#: Extent files one descriptor may have open at once (a 2 TiB twoGbMaxExtent disk has 1024).
MAX_OPEN_EXTENTS = 1024
#: Bytes of a grain directory read (and cached) at once.
GD_PIECE = 64 * 1024
#: Bytes of a compressed grain read (and inflated) at once.
INFLATE_PIECE = 1024 * 1024


class SparseTables:
    """A hosted sparse extent's grain directory and grain tables, as QEMU's
    get_cluster_offset reads them: ``table(offset, length)`` reads the file
    (through the data path's bounded cache, or a check's budgeted reader)."""

    def __init__(self, table: Callable[[int, int], bytes], *, sectors: int, grain_sectors: int, l2_size: int,
                 l1_size: int, gd_sector: int, flags: int = 0, compressed: bool = False) -> None:
        self.table = table
        self.sectors = sectors
        self.grain = grain_sectors * SECTOR
        self.l2_size = l2_size
        self.l1_span = l2_size * self.grain  # guest bytes one grain directory entry maps
        self.l1_size = l1_size
        self.gd_offset = gd_sector * SECTOR
        self.compressed = compressed
        self.has_marker = bool(flags & FLAG_MARKER)
        self.zero_grain = bool(flags & FLAG_ZERO_GRAIN)
        self._directory: tuple[int, bytes] = (-1, b"")  # the piece of the directory read last

    def grain_table(self, l1_index: int) -> bytes | None:
        """The grain table of grain directory entry ``l1_index``; None when unallocated."""
        from storprobe.blockmap import DataPathError

        if l1_index >= self.l1_size:  # QEMU: VMDK_ERROR (a guest offset past the extent's capacity)
            raise DataPathError(f"vmdk grain directory entry {l1_index} is past its {self.l1_size} entries",
                                code="vmdk.gd-index")
        at = l1_index * 4
        piece = at - at % GD_PIECE
        if self._directory[0] != piece:
            self._directory = (piece, self.table(self.gd_offset + piece, min(GD_PIECE, self.l1_size * 4 - piece)))
        directory = self._directory[1]
        l2_sector = int.from_bytes(directory[at - piece : at - piece + 4], "little")
        return self.table(l2_sector * SECTOR, self.l2_size * 4) if l2_sector else None

    def entry(self, offset: int) -> int:
        """The grain table entry of the grain holding byte ``offset`` of the extent (0: unallocated)."""
        table = self.grain_table(offset // self.l1_span)
        if table is None:
            return 0
        at = 4 * (offset % self.l1_span // self.grain)
        return int.from_bytes(table[at : at + 4], "little")

    def zeroed(self, entry: int) -> bool:
        return self.zero_grain and entry == GTE_ZEROED


class _Extent(NamedTuple):
    """One extent of the disk as QEMU opens it: where it starts in the guest,
    its file, and either a flat offset into that file or its sparse tables."""

    start: int  # guest bytes
    length: int
    host: "HostFile"
    file: str | None  # the name the data path shows for the extent's file (None: the image's own)
    flat_offset: int = 0
    tables: SparseTables | None = None


class VmdkMap:
    """The block map of a VMDK: its own sparse extent, or the extents its
    descriptor names (opened through the data path's policy). A sparse
    extent's grain is unallocated, zeros (a zeroed grain), data at a host
    offset, or compressed (a stream-optimized grain: data without one); a flat
    extent is data throughout, where its file has holes reading as zeros (QEMU
    asks the file, BDRV_BLOCK_RECURSE)."""

    def __init__(self, img: Image, info: ImageInfo, host: "HostFile") -> None:
        disk = _disk(img)
        self.parts: list[_Extent] = []
        if disk.grain is not None:
            self.parts.append(_Extent(0, disk.sectors * SECTOR, host, None, 0,
                                         sparse_tables(img, host.table)))
        else:
            self._open_extents(info, disk, host)
        self.starts = [extent.start for extent in self.parts]
        self._inflated: tuple[int, int, bytes] = (-1, -1, b"")
        self.parent_cid = info.specific.get("parent-cid") if info.specific else None
        self._parent_checked = False

    def check_backing(self, below: ImageInfo) -> None:
        """QEMU's vmdk_is_cid_valid: a read that falls through to the parent
        fails unless the parent is a VMDK whose CID is this image's parentCID
        (checked once when it is)."""
        from storprobe.blockmap import DataPathError

        if self._parent_checked:
            return
        cid = below.specific.get("cid") if below.format == "vmdk" and below.specific else None
        if cid is None or cid != self.parent_cid:
            shown = "no CID" if cid is None else f"CID {cid:08x}"
            raise DataPathError(f"{below.filename} ({below.format}, {shown}) is not the parent this VMDK records "
                                f"(parentCID {self.parent_cid or 0:08x}): QEMU refuses to read through it",
                                code="vmdk.parent-cid")
        self._parent_checked = True

    def _open_extents(self, info: ImageInfo, disk: Disk, host: "HostFile") -> None:
        start = 0
        for line in opened_lines(disk):
            shown = _extent_path(info.filename, line.filename)
            named = host.open_named(line.filename)
            if line.type in FLAT_TYPES:
                extent = _Extent(start, line.sectors * SECTOR, named, shown, (line.offset or 0) * SECTOR)
            else:
                img = sparse_extent_file(Image(named), line, shown)
                extent = _Extent(start, line.sectors * SECTOR, named, shown, 0, sparse_tables(img, named.table))
            self.parts.append(extent)
            start += extent.length

    def _at(self, offset: int) -> _Extent:
        return self.parts[bisect.bisect_right(self.starts, offset) - 1]

    def extents(self, start: int, length: int, *, want_zero: bool = True) -> "Iterator[BlockExtent]":
        end = start + length
        while start < end:
            extent = self._at(start)
            stop = min(end, extent.start + extent.length)
            if extent.tables is None:
                yield from self._flat(extent, start, stop, want_zero)
            else:
                yield from self._sparse(extent, extent.tables, start, stop)
            start = stop

    @staticmethod
    def _flat(extent: _Extent, start: int, stop: int, want_zero: bool) -> "Iterator[BlockExtent]":
        from storprobe.blockmap import Extent as BlockExtent

        host_offset = extent.flat_offset + start - extent.start
        if not want_zero:
            yield BlockExtent(start, stop - start, True, False, host_offset, False, extent.file)
            return
        delta = start - host_offset
        for offset, run, is_data in extent.host.holes(host_offset, stop - start):
            yield BlockExtent(offset + delta, run, True, not is_data, offset, False, extent.file)

    @staticmethod
    def _sparse(extent: _Extent, tables: SparseTables, start: int, stop: int) -> "Iterator[BlockExtent]":
        from storprobe.blockmap import Extent as BlockExtent

        base, grain = extent.start, tables.grain
        while start < stop:
            rel = start - base
            l1_index = rel // tables.l1_span
            span_end = min(stop, base + (l1_index + 1) * tables.l1_span)
            table = tables.grain_table(l1_index)
            if table is None:
                yield BlockExtent(start, span_end - start, False, False)
                start = span_end
                continue
            while start < span_end:
                rel = start - base
                index = rel % tables.l1_span // grain
                entry = int.from_bytes(table[4 * index : 4 * index + 4], "little")
                grain_end = min(span_end, start - rel % grain + grain)
                if entry == 0:  # a run of unallocated grains, found at once
                    last = (span_end - base - 1) % tables.l1_span // grain
                    rest = table[4 * index : 4 * last + 4]
                    zeros = (len(rest) - len(rest.lstrip(b"\0"))) // 4
                    grain_end = min(span_end, start - rel % grain + zeros * grain)
                    yield BlockExtent(start, grain_end - start, False, False)
                elif tables.zeroed(entry):
                    yield BlockExtent(start, grain_end - start, False, True)
                elif tables.compressed:
                    yield BlockExtent(start, grain_end - start, True, False, None, True)
                else:
                    yield BlockExtent(start, grain_end - start, True, False, entry * SECTOR + rel % grain, False,
                                      extent.file)
                start = grain_end

    def read(self, extent: "BlockExtent", offset: int, length: int) -> bytes:
        found = self._at(offset)
        rel = offset - found.start
        tables = found.tables
        if tables is None:
            return found.host.read(found.flat_offset + rel, length)
        entry = tables.entry(rel)
        within = rel % tables.grain
        if tables.compressed:
            return self._inflate(found, tables, entry)[within : within + length]
        return found.host.read(entry * SECTOR + within, length)

    def _inflate(self, extent: _Extent, tables: SparseTables, entry: int) -> bytes:
        key = (id(extent.host), entry)
        if self._inflated[:2] != key:
            self._inflated = (*key, inflate_grain(extent.host, entry * SECTOR, tables))
        return self._inflated[2]


def inflate_grain(host: "HostFile", offset: int, tables: SparseTables) -> bytes:
    """The compressed grain at ``offset`` as QEMU's vmdk_read_extent inflates
    it: at most two grains of input (its marker included), a zlib stream that
    ends within them and inflates to exactly one grain; anything else is a
    named error. The input is read and inflated a piece at a time, so memory
    holds one grain whatever the marker says."""
    import zlib

    from storprobe.blockmap import DataPathError

    grain = tables.grain
    if tables.has_marker:
        _lba, size = GRAIN_MARKER.unpack(host.read(offset, GRAIN_MARKER.size))
        offset += GRAIN_MARKER.size
        most = 2 * grain - GRAIN_MARKER.size
    else:
        size = most = grain
    if not size or size > most:  # QEMU refuses 0 and more than its two-grain buffer
        raise DataPathError(f"compressed grain marker says {size} bytes, of {most} at most (two grains)",
                            code="vmdk.compressed-size")
    inflater, out, read = zlib.decompressobj(), bytearray(), 0
    try:
        while read < size and not inflater.eof and len(out) <= grain:
            piece = host.read(offset + read, min(INFLATE_PIECE, size - read))
            read += len(piece)
            out += inflater.decompress(piece, grain + 1 - len(out))
    except zlib.error as exc:
        raise DataPathError(f"compressed grain does not inflate: {exc}", code="vmdk.compressed-corrupt") from None
    if not inflater.eof or len(out) > grain:
        raise DataPathError("compressed grain's stream does not end within its input and one grain",
                            code="vmdk.compressed-corrupt")
    if len(out) != grain:
        raise DataPathError(f"compressed grain inflates to {len(out)} bytes, not a grain of {grain}",
                            code="vmdk.compressed-short")
    return bytes(out)


def sparse_tables(img: Image, table: Callable[[int, int], bytes]) -> SparseTables:
    """The tables of the file ``img``, a sparse extent (``_disk`` read it): a
    hosted one by the header QEMU uses (the footer's when the one at the start
    says so), an ESX one (COWD: tables of 4096 entries, as many directory
    entries as its header records, so a guest offset past them is an I/O error)."""
    if img.head[:4] == COWD_MAGIC:
        cowd = COWD_HEADER.unpack(img.head)
        return SparseTables(table, sectors=cowd.capacity, grain_sectors=cowd.grain_size, l2_size=COWD_GTES_PER_GT,
                            l1_size=cowd.gd_entries, gd_sector=cowd.gd_offset)
    hdr = SPARSE_HEADER.unpack(img.head)
    if hdr.gd_offset == GD_AT_END:
        footer = _disk(img).footer
        assert footer is not None
        hdr = footer.header
    return SparseTables(table, sectors=hdr.capacity, grain_sectors=hdr.grain_size, l2_size=hdr.num_gtes_per_gt,
                        l1_size=-(-hdr.capacity // (hdr.num_gtes_per_gt * hdr.grain_size)),
                        gd_sector=hdr.gd_offset, flags=hdr.flags, compressed=hdr.compress_algorithm == DEFLATE)


def opened_lines(disk: Disk) -> tuple[Extent, ...]:
    """The extent lines of a descriptor the data path opens, in order: at most
    MAX_OPEN_EXTENTS, each of a type it reads (flat, or a sparse extent file)."""
    from storprobe.blockmap import DataPathError

    if len(disk.extents) > MAX_OPEN_EXTENTS:
        raise DataPathError(f"descriptor names {len(disk.extents)} extents (the data path opens at most "
                            f"{MAX_OPEN_EXTENTS})", code="vmdk.extent-count")
    for line in disk.extents:
        if line.type not in FLAT_TYPES and line.type not in SPARSE_FILE_TYPES:
            raise DataPathError(f"the data path does not read {line.type} extents ({line.filename!r})",
                                code="vmdk.extent-type-unsupported")
    return disk.extents


def sparse_extent_file(img: Image, line: Extent, shown: str) -> Image:
    """``img``, the file a SPARSE line names (``shown``): a sparse extent (hosted
    or ESX) of the capacity the line records, else a named error."""
    from storprobe.blockmap import DataPathError

    if img.head[:4] not in (SPARSE_MAGIC, COWD_MAGIC):
        raise DataPathError(f"extent file {shown} is not a sparse extent (KDMV or COWD)",
                            code="vmdk.extent-not-sparse")
    disk = _disk(img)
    if disk.grain is None:
        raise DataPathError(f"extent file {shown} is another descriptor, not a sparse extent",
                            code="vmdk.extent-not-sparse")
    if disk.sectors != line.sectors:
        raise DataPathError(f"extent file {shown} holds {disk.sectors} sectors, its descriptor line "
                            f"{line.sectors}", code="vmdk.extent-capacity")
    return img


def block_map(img: Image, info: ImageInfo, host: "HostFile") -> VmdkMap:
    return VmdkMap(img, info, host)


class _Checked(NamedTuple):
    """An extent as the check walks it: its length in sectors, the reader of its
    file, and its sparse tables (None: flat, at ``flat_offset`` in the file)."""

    sectors: int
    reader: "CheckReader"
    tables: SparseTables | None
    flat_offset: int = 0


def check(img: Image, reader: "CheckReader") -> "CheckResult":
    """qemu-img check of a VMDK (QEMU 7.2's vmdk_co_check), read-only: the
    extents QEMU opens (this file's own sparse extent, or the files its
    descriptor names, opened through ``reader`` as the verify's policy allows),
    then the guest disk walked a grain of the extent at hand at a time (a flat
    extent in one step), each grain's entry looked up. The first that QEMU
    cannot look up, or that points at or past the end of its file (a flat
    extent's offset too), fails the check (no report, exit 1). A clean image
    reports nothing but its name."""
    from storprobe.verify import CheckResult

    disk = _disk(img)
    if disk.grain is not None:
        parts = [_Checked(disk.sectors, reader, sparse_tables(img, reader.read))]
    else:
        parts = []
        for line in opened_lines(disk):  # QEMU opens every extent before it checks one
            named = reader.open_named(line.filename)
            if line.type in FLAT_TYPES:
                parts.append(_Checked(line.sectors, named, None, (line.offset or 0) * SECTOR))
            else:
                extent = sparse_extent_file(named.image, line, _extent_path(img.name, line.filename))
                parts.append(_Checked(line.sectors, named, sparse_tables(extent, named.read)))
    start = sector = 0
    for part in parts:
        sector = _check_extent(part, start, sector)
        start += part.sectors
    return CheckResult()


def _check_extent(part: _Checked, start: int, sector: int) -> int:
    """Check the extent starting at guest sector ``start`` from ``sector`` on, in
    QEMU's steps (its grain; a flat extent's whole length): the sector the walk
    goes on from."""
    from storprobe.verify import CheckFailed

    if sector >= start + part.sectors:
        return sector
    past_end = -(-part.reader.size // SECTOR)  # an entry (in sectors) from here on points after EOF
    tables = part.tables
    if tables is None:
        if part.flat_offset >= past_end * SECTOR:
            _after_eof(sector)
        return sector + part.sectors
    step = tables.grain // SECTOR
    first, within = divmod(sector - start, step)  # the first grain visited, and where in it each visit falls
    stop = first + -(-(start + part.sectors - sector) // step)  # past the last grain visited
    for l1_index in range(first // tables.l2_size, -(-stop // tables.l2_size)):
        low = max(first, l1_index * tables.l2_size)
        if l1_index >= tables.l1_size:  # QEMU: VMDK_ERROR (an ESX extent's directory too short)
            raise CheckFailed(f"Check failed: Operation not permitted (could not get cluster_offset for sector "
                              f"{start + low * step + within})")
        table = tables.grain_table(l1_index)
        if table is None:
            continue
        high = min(stop, (l1_index + 1) * tables.l2_size)
        entries = struct.unpack_from(f"<{high - low}I", table, 4 * (low - l1_index * tables.l2_size))
        if max(entries) < past_end:
            continue
        for index, entry in enumerate(entries, low):
            if entry >= past_end and not tables.zeroed(entry):
                _after_eof(start + index * step + within)
    return start + stop * step + within


def _after_eof(sector: int) -> NoReturn:
    from storprobe.verify import CheckFailed

    raise CheckFailed(f"Check failed: Invalid argument (cluster offset for sector {sector} points after EOF)")


@hookimpl
def storprobe_formats() -> list[FormatSpec]:
    return [
        FormatSpec(
            name="vmdk",
            description="VMware virtual disk",
            magic=SPARSE_MAGIC,
            # No version_offset: COWD and text descriptors match too, and their
            # bytes 4..7 are no version; the callbacks check KDMV versions.
            match=match,
            match_prefixes=(COWD_MAGIC, b"#", b" ", b"version="),  # what match's text descriptors start with
            size=size,
            backing=backing,
            features=features,
            hazards=hazards,
            block_map=block_map,
            check=check,
        )
    ]
