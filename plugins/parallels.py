"""parallels: Parallels expandable disk images (little-endian).

Header per QEMU's docs/interop/parallels.txt: magic ``WithoutFreeSpace``
(sizes in sectors, only the low 32 bits of ``nb_sectors`` count) or
``WithouFreSpacExt`` (64-bit ``nb_sectors``), then a BAT of 32-bit entries
and the data area. libvirt calls the format ``ploop`` (and knows only the
``Ext`` magic); the name here stays ``parallels``, as qemu-img has it.

Validation follows QEMU's block/parallels.c open (``parallels.<rule>``),
including the Format Extension cluster QEMU reads on a read-only open, plus
bounds QEMU leaves to later reads: the BAT and the data area must lie inside
the file. ``in_use`` set to ``Ynot`` means the image was not closed cleanly:
the dirty flag.

The data path and ``verify`` read the BAT as QEMU 7.2's block/parallels.c
does (block_status, parallels_co_readv, parallels_co_check): an entry of 0 is
an unallocated cluster (zeros: parallels has no backing file), any other the
cluster's place in the file, in sectors times ``tracks`` with the ``Ext`` magic
(times 1 with the old one), wherever that is (zeros past the end of the file).
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from typing import TYPE_CHECKING

from storprobe import (
    QEMU_MAX_LENGTH,
    Features,
    FormatSpec,
    Image,
    ImageInfo,
    InvalidHeader,
    Layout,
    LibvirtFacts,
    hookimpl,
)
from storprobe.layout import Header

if TYPE_CHECKING:  # the data path loads when first used, not for a probe
    from storprobe.blockmap import Extent, HostFile
    from storprobe.verify import CheckReader, CheckResult

MAGIC = b"WithoutFreeSpace"
MAGIC_EXT = b"WithouFreSpacExt"

HEADER = Layout(
    "<",
    "parallels header",
    ("magic", "16s"),
    ("version", "I"),
    ("heads", "I"),
    ("cylinders", "I"),
    ("tracks", "I"),  # sectors per cluster
    ("bat_entries", "I"),
    ("nb_sectors", "Q"),
    ("inuse", "I"),
    ("data_off", "I"),  # sectors
    ("flags", "I"),
    ("ext_off", "Q"),  # sectors
)
EXT_HEADER = Layout("<", "parallels format extension header", ("magic", "Q"), ("check_sum", "16s"))
FEATURE_HEADER = Layout(
    "<", "parallels extension feature header", ("magic", "Q"), ("flags", "Q"), ("data_size", "I"), (None, "4x")
)
BITMAP_FEATURE = Layout(
    "<", "parallels dirty bitmap feature", ("size", "Q"), ("id", "16s"), ("granularity", "I"), ("l1_size", "I")
)

SECTOR = 512
INUSE_DIRTY = 0x746F6E59  # "Ynot": open for writing, or not closed cleanly
MAX_TRACKS = (2**31 - 1) // 513
MAX_BAT_ENTRIES = (2**31 - 1) // 4
EXT_MAGIC = 0xAB234CEF23DCEA87
FEATURE_END = 0
FEATURE_DIRTY_BITMAP = 0x20385FAE252CB34A


def _header(img: Image) -> Header:
    """The header, checked as QEMU's parallels open checks it."""
    hdr = HEADER.unpack(img.header)
    if hdr.tracks == 0:
        raise InvalidHeader("parallels image has zero sectors per cluster (tracks)", code="parallels.tracks")
    if hdr.tracks > MAX_TRACKS:
        raise InvalidHeader(f"parallels cluster of {hdr.tracks} sectors is too big", code="parallels.cluster-size")
    if hdr.bat_entries > MAX_BAT_ENTRIES:
        raise InvalidHeader(f"parallels BAT of {hdr.bat_entries} entries is too large", code="parallels.bat-entries")
    bat_end = HEADER.size + 4 * hdr.bat_entries
    if bat_end > img.size:
        raise InvalidHeader(
            f"parallels BAT of {hdr.bat_entries} entries runs past the end of the file",
            code="parallels.bat-beyond-eof",
        )
    data_start = hdr.data_off * SECTOR
    if hdr.data_off and data_start < bat_end:
        raise InvalidHeader(
            f"parallels data area at {data_start} overlaps the BAT (which ends at {bat_end})",
            code="parallels.data-off-overlaps-bat",
        )
    if data_start > img.size:
        raise InvalidHeader(
            f"parallels data area at {data_start} starts past the end of the file",
            code="parallels.data-off-beyond-eof",
        )
    sectors = _sectors(img, hdr)
    if sectors > QEMU_MAX_LENGTH // SECTOR:
        raise InvalidHeader(f"parallels disk of {sectors} sectors is too large", code="parallels.size-too-large")
    return hdr


def _sectors(img: Image, hdr: Header) -> int:
    """Sectors in the disk: 64-bit with the Ext magic, 32-bit with the old one."""
    return hdr.nb_sectors if hdr.magic == MAGIC_EXT else hdr.nb_sectors & 0xFFFFFFFF


def _extension(img: Image, hdr: Header) -> int:
    """Check the Format Extension cluster as QEMU does; the number of dirty bitmaps in it."""
    cluster = hdr.tracks * SECTOR
    offset = hdr.ext_off * SECTOR
    if offset + cluster > img.size:
        raise InvalidHeader(
            f"parallels format extension cluster at {offset} runs past the end of the file",
            code="parallels.ext-beyond-eof",
        )
    data = img.read(offset, cluster)
    ext = EXT_HEADER.unpack(data)
    if ext.magic != EXT_MAGIC:
        raise InvalidHeader(f"parallels format extension magic is {ext.magic:#x}", code="parallels.ext-magic")
    import hashlib  # here, not at import: loading OpenSSL is a cost every process would pay

    if hashlib.md5(data[EXT_HEADER.size :], usedforsecurity=False).digest() != ext.check_sum:
        raise InvalidHeader("parallels format extension checksum does not match", code="parallels.ext-checksum")
    pos, bitmaps = EXT_HEADER.size, 0
    while True:  # each pass consumes at least one feature header: bounded by the cluster
        if pos + FEATURE_HEADER.size > cluster:
            raise InvalidHeader(
                "parallels format extension has no end-of-features marker", code="parallels.ext-unterminated"
            )
        feature = FEATURE_HEADER.unpack(data, pos)
        pos += FEATURE_HEADER.size
        if feature.flags:
            raise InvalidHeader(
                f"parallels extension feature {feature.magic:#x} has flags {feature.flags:#x}",
                code="parallels.ext-feature-flags",
            )
        padded = -(-feature.data_size // 8) * 8
        if pos + padded > cluster:
            raise InvalidHeader(
                f"parallels extension feature {feature.magic:#x} runs past its cluster",
                code="parallels.ext-feature-size",
            )
        if feature.magic == FEATURE_END:
            return bitmaps
        if feature.magic != FEATURE_DIRTY_BITMAP:
            raise InvalidHeader(
                f"parallels extension feature {feature.magic:#x} is unknown", code="parallels.ext-feature-unknown"
            )
        _check_bitmap(data, pos, feature.data_size, _sectors(img, hdr))
        bitmaps += 1
        pos += padded


def _check_bitmap(data: bytes, pos: int, data_size: int, sectors: int) -> None:
    """A dirty bitmap feature's own header, checked as QEMU checks it before loading."""
    if data_size < BITMAP_FEATURE.size:
        raise InvalidHeader(
            f"parallels dirty bitmap feature of {data_size} bytes is too short", code="parallels.ext-bitmap-short"
        )
    bitmap = BITMAP_FEATURE.unpack(data, pos)
    if bitmap.size != sectors:
        raise InvalidHeader(
            f"parallels dirty bitmap covers {bitmap.size} sectors, the disk has {sectors}",
            code="parallels.ext-bitmap-size",
        )
    granularity = bitmap.granularity * SECTOR
    if not (SECTOR <= granularity <= 2**32 - 1 and granularity & (granularity - 1) == 0):
        raise InvalidHeader(
            f"parallels dirty bitmap granularity {granularity} is not a power of two of 512 bytes or more",
            code="parallels.ext-bitmap-granularity",
        )
    if bitmap.l1_size * 8 > data_size - BITMAP_FEATURE.size:
        raise InvalidHeader(
            f"parallels dirty bitmap L1 table of {bitmap.l1_size} entries exceeds its feature",
            code="parallels.ext-bitmap-l1-size",
        )


def features(img: Image) -> Features:
    hdr = _header(img)
    data_off = hdr.data_off * SECTOR or -(-(HEADER.size + 4 * hdr.bat_entries) // SECTOR) * SECTOR
    details = {
        "magic": hdr.magic.decode("ascii", "replace"),
        "cluster-size": hdr.tracks * SECTOR,
        "heads": hdr.heads,
        "cylinders": hdr.cylinders,
        "bat-entries": hdr.bat_entries,
        "data-offset": data_off,
    }
    if hdr.ext_off:
        details["dirty-bitmaps"] = _extension(img, hdr)
    details["in-use"] = hdr.inuse == INUSE_DIRTY  # qemu-img reports no dirty flag for parallels
    return Features(dirty=None, details=details)


def size(img: Image) -> int:
    return _sectors(img, _header(img)) * SECTOR


# ---- data path and check: the BAT (QEMU 7.2 block/parallels.c) -----------------------------------------

#: Bytes of the BAT read (and cached) at once: 16384 entries.
BAT_PIECE = 64 * 1024
_UINT32 = struct.Struct("<I")


class Geometry:
    """The cluster size, the BAT's place and size, and how an entry becomes an offset."""

    def __init__(self, img: Image) -> None:
        hdr = _header(img)
        self.cluster = hdr.tracks * SECTOR
        self.entries = hdr.bat_entries
        self.multiplier = hdr.tracks if hdr.magic == MAGIC_EXT else 1  # QEMU's off_multiplier
        self.unclean = hdr.inuse == INUSE_DIRTY

    def host_offset(self, entry: int) -> int:
        return entry * self.multiplier * SECTOR


class ParallelsMap:
    """The block map of a parallels image: runs of clusters that continue one
    another in the file (or are all unallocated), as QEMU's block_status
    merges them; a cluster's bytes are read wherever its entry puts them."""

    def __init__(self, img: Image, info: ImageInfo, host: HostFile) -> None:
        self.geometry = Geometry(img)
        self.host = host

    def _entries(self, first: int, end: int) -> Iterator[tuple[int, int, int]]:
        """(index, entry, count) for BAT entries ``first`` .. ``end - 1``: a run of
        unallocated entries (0, and every one past the BAT's end) comes as one."""
        index = first
        while index < min(end, self.geometry.entries):
            at = index * 4
            piece = at - at % BAT_PIECE
            table = self.host.table(HEADER.size + piece, min(BAT_PIECE, self.geometry.entries * 4 - piece))
            raw = table[at - piece : at - piece + 4 * min(end - index, (len(table) - (at - piece)) // 4)]
            position = 0
            while position < len(raw):
                if raw[position : position + 4] == bytes(4):
                    count = (len(raw) - position - len(raw[position:].lstrip(b"\0"))) // 4
                    yield index, 0, count
                else:
                    count = 1
                    yield index, _UINT32.unpack_from(raw, position)[0], 1
                index, position = index + count, position + 4 * count
        if index < end:
            yield index, 0, end - index

    def extents(self, start: int, length: int, *, want_zero: bool = True) -> Iterator[Extent]:
        end = start + length
        cs = self.geometry.cluster
        run: tuple[int, int, int] | None = None  # (guest start, host offset of the start or -1, guest end)
        for index, entry, count in self._entries(start // cs, -(-end // cs)):
            begin, stop = max(start, index * cs), min(end, (index + count) * cs)
            host = self.geometry.host_offset(entry) + begin - index * cs if entry else -1
            if run is not None:
                if (host == -1 and run[1] == -1) or (host != -1 and run[1] != -1 and host == run[1] + begin - run[0]):
                    run = (run[0], run[1], stop)
                    continue
                yield _extent(run)
            run = (begin, host, stop)
        if run is not None:
            yield _extent(run)

    def read(self, extent: Extent, offset: int, length: int) -> bytes:
        assert extent.host_offset is not None  # below QEMU_MAX_LENGTH: entries are 32-bit, tracks at most MAX_TRACKS
        return self.host.read(extent.host_offset + offset - extent.start, length)


def _extent(run: tuple[int, int, int]) -> Extent:
    from storprobe.blockmap import Extent

    begin, host, stop = run
    return Extent(begin, stop - begin, False, False) if host == -1 else Extent(begin, stop - begin, True, False, host)


def block_map(img: Image, info: ImageInfo, host: HostFile) -> ParallelsMap:
    return ParallelsMap(img, info, host)


def check(img: Image, reader: CheckReader) -> CheckResult:
    """qemu-img check of a parallels image, read-only (parallels_co_check): an
    image not closed cleanly is a corruption, so is each cluster past the end
    of the file; the clusters past the last one allocated are leaks; the BAT's
    size is the total, its non-zero entries are allocated, and fragmented
    where one does not follow the one before."""
    from storprobe.verify import CheckResult

    g = Geometry(img)
    size = reader.size
    corruptions = int(g.unclean)
    allocated = fragmented = high = previous = 0
    for first in range(0, g.entries, BAT_PIECE // 4):
        raw = reader.read(HEADER.size + 4 * first, 4 * min(BAT_PIECE // 4, g.entries - first))
        for (entry,) in _UINT32.iter_unpack(raw):
            offset = g.host_offset(entry)
            if offset == 0:
                previous = 0
                continue
            corruptions += offset > size
            allocated += 1
            high = max(high, offset)
            fragmented += previous != 0 and previous + g.cluster != offset
            previous = offset
    end = high + g.cluster
    leaks = -(-(size - end) // g.cluster) if size > end else 0
    return CheckResult(corruptions=corruptions, leaks=leaks, image_end_offset=end, total_clusters=g.entries,
                       allocated_clusters=allocated, fragmented_clusters=fragmented)


@hookimpl
def storprobe_formats() -> list[FormatSpec]:
    return [
        FormatSpec(
            name="parallels",
            description="Parallels disk image",
            libvirt=LibvirtFacts(name="ploop"),
            magic=(MAGIC, MAGIC_EXT),
            version_offset=16,
            versions=(2,),
            size=size,
            features=features,
            block_map=block_map,
            check=check,
        )
    ]
