"""qed: QEMU enhanced disk (little-endian).

Header per QEMU's docs/interop/qed_spec.rst; validation follows what QEMU's
block/qed.c open refuses (``qed.<rule>``). The need-check feature bit is the
dirty flag. The backing file is reported with format ``raw`` when the
no-probe bit says so, else with no recorded format.

Deliberate differences from qemu-img 7.2, where QEMU's arithmetic is wrong:
its L1-table check refuses every image with ``table_size`` 1 (which the spec
allows and ``qemu-img create`` writes), and its maximum image size is a 64-bit
product that wraps to 0 for large clusters and tables; we accept both (sizes
capped at QEMU's block-layer limit). qemu-img also shows need-check images as
clean, because the driver clears the bit in memory once the image is drained.

The data path and ``verify`` read the L1 and L2 tables as QEMU 7.2's
block/qed.c and qed-cluster.c find clusters and qed-check.c checks them: an
entry 0 is unallocated (the backing file's, or zeros), 1 a zero cluster, any
other the offset of a data cluster, which must be cluster-aligned, past the
header and inside the file's whole clusters (a named error where QEMU's read
fails). Tables are read in pieces through the bounded cache, as a table may be
up to 16 clusters of 64 MiB. Where QEMU's table-offset check wraps (every L2
table of a ``table_size`` 1 image fails it), the spec wins here too.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from typing import TYPE_CHECKING

from storprobe import (
    QEMU_MAX_LENGTH,
    Backing,
    Features,
    FormatSpec,
    Image,
    ImageInfo,
    InvalidHeader,
    Layout,
    LibvirtFacts,
    hookimpl,
)
from storprobe.layout import Header, cstring

if TYPE_CHECKING:  # the data path loads when first used, not for a probe
    from storprobe.blockmap import Extent, HostFile
    from storprobe.verify import CheckReader, CheckResult

HEADER = Layout(
    "<",
    "qed header",
    ("magic", "4s"),
    ("cluster_size", "I"),  # bytes
    ("table_size", "I"),  # clusters per L1/L2 table
    ("header_size", "I"),  # clusters
    ("features", "Q"),
    ("compat_features", "Q"),
    ("autoclear_features", "Q"),
    ("l1_table_offset", "Q"),  # bytes
    ("image_size", "Q"),  # bytes
    ("backing_filename_offset", "I"),  # bytes from the start of the file
    ("backing_filename_size", "I"),
)

F_BACKING_FILE = 0x1
F_NEED_CHECK = 0x2
F_BACKING_FORMAT_NO_PROBE = 0x4
FEATURE_NAMES = {F_BACKING_FILE: "backing-file", F_NEED_CHECK: "need-check", F_BACKING_FORMAT_NO_PROBE: "no-probe"}
KNOWN_FEATURES = F_BACKING_FILE | F_NEED_CHECK | F_BACKING_FORMAT_NO_PROBE

MIN_CLUSTER, MAX_CLUSTER = 4 * 1024, 64 * 1024 * 1024
MIN_TABLE, MAX_TABLE = 1, 16
SECTOR = 512
MAX_BACKING_NAME = 4095  # QEMU reads the name into a PATH_MAX buffer


def _power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def _header(img: Image) -> Header:
    """The header, checked as QEMU's qed open checks it."""
    hdr = HEADER.unpack(img.header)
    unknown = hdr.features & ~KNOWN_FEATURES
    if unknown:
        raise InvalidHeader(f"qed image uses unknown feature bits {unknown:#x}", code="qed.features")
    cluster = hdr.cluster_size
    if not (MIN_CLUSTER <= cluster <= MAX_CLUSTER and _power_of_two(cluster)):
        raise InvalidHeader(
            f"qed cluster size {cluster} is not a power of two from 4 KiB to 64 MiB", code="qed.cluster-size"
        )
    if not (MIN_TABLE <= hdr.table_size <= MAX_TABLE and _power_of_two(hdr.table_size)):
        raise InvalidHeader(
            f"qed table size {hdr.table_size} is not a power of two from 1 to 16 clusters", code="qed.table-size"
        )
    if hdr.image_size % SECTOR:
        raise InvalidHeader(
            f"qed image size {hdr.image_size} is not a multiple of 512", code="qed.image-size-unaligned"
        )
    entries = hdr.table_size * cluster // 8
    limit = min(entries * entries * cluster, QEMU_MAX_LENGTH)
    if hdr.image_size > limit:
        raise InvalidHeader(
            f"qed image size {hdr.image_size} exceeds {limit} bytes for this cluster and table size",
            code="qed.image-size-too-large",
        )
    _check_l1_table(img, hdr)
    if hdr.header_size > (2**32 - 1) // cluster:
        raise InvalidHeader(f"qed header of {hdr.header_size} clusters is too large", code="qed.header-size")
    return hdr


def _check_l1_table(img: Image, hdr: Header) -> None:
    """The L1 table must be cluster-aligned, after the header, and inside the file."""
    cluster = hdr.cluster_size
    offset = hdr.l1_table_offset
    if offset % cluster:
        raise InvalidHeader(f"qed L1 table offset {offset} is not cluster-aligned", code="qed.l1-table-alignment")
    if offset < hdr.header_size * cluster:
        raise InvalidHeader(f"qed L1 table offset {offset} lies inside the header", code="qed.l1-table-in-header")
    whole_clusters = img.size // cluster * cluster  # QEMU ignores a partial last cluster
    if offset + hdr.table_size * cluster > whole_clusters:
        raise InvalidHeader(
            f"qed L1 table ({hdr.table_size} clusters at {offset}) runs past the end of the file",
            code="qed.l1-table-beyond-eof",
        )


def features(img: Image) -> Features:
    hdr = _header(img)
    return Features(
        cluster_size=hdr.cluster_size,
        dirty=bool(hdr.features & F_NEED_CHECK),
        details={
            "table-size": hdr.table_size,
            "header-size": hdr.header_size,
            "features": [name for bit, name in FEATURE_NAMES.items() if hdr.features & bit],
            "compat-features": hdr.compat_features,
            "autoclear-features": hdr.autoclear_features,
        },
    )


def backing(img: Image) -> Backing | None:
    hdr = _header(img)
    if not hdr.features & F_BACKING_FILE:
        return None
    offset, length = hdr.backing_filename_offset, hdr.backing_filename_size
    if offset + length > hdr.cluster_size * hdr.header_size:
        raise InvalidHeader(
            f"qed backing file name ({length} bytes at {offset}) lies outside the header clusters",
            code="qed.backing-name-offset",
        )
    if length > MAX_BACKING_NAME:
        raise InvalidHeader(
            f"qed backing file name of {length} bytes is longer than {MAX_BACKING_NAME}",
            code="qed.backing-name-length",
        )
    name = cstring(img.read(offset, length))
    if not name:
        return None
    return Backing(name, "raw" if hdr.features & F_BACKING_FORMAT_NO_PROBE else None)


# ---- data path and check: L1/L2 tables (QEMU 7.2 block/qed.c, qed-cluster.c, qed-check.c) ---------------

UNALLOCATED, ZERO_CLUSTER = 0, 1
#: Bytes of a table read (and cached) at once: 8192 entries.
TABLE_PIECE = 64 * 1024


class Geometry:
    """The sizes and rules QEMU derives from the header and the file's size."""

    def __init__(self, hdr: Header, file_size: int) -> None:
        self.cluster = hdr.cluster_size
        self.table_bytes = hdr.table_size * hdr.cluster_size
        self.entries = self.table_bytes // 8  # per table
        self.l1_span = self.entries * self.cluster  # guest bytes one L2 table maps
        self.header_bytes = hdr.header_size * hdr.cluster_size
        self.file_end = file_size // hdr.cluster_size * hdr.cluster_size  # QEMU ignores a partial last cluster
        self.l1_offset, self.table_size = hdr.l1_table_offset, hdr.table_size

    def cluster_ok(self, offset: int) -> bool:
        """QEMU's qed_check_cluster_offset: aligned, past the header, inside the file."""
        return offset % self.cluster == 0 and self.header_bytes <= offset < self.file_end

    def table_ok(self, offset: int) -> bool:
        """QEMU's qed_check_table_offset: the table's first and last clusters valid."""
        return self.cluster_ok(offset) and self.cluster_ok(offset + (self.table_size - 1) * self.cluster)


_UINT64 = struct.Struct("<Q")


class QedMap:
    """The block map of a QED image. Runs are found as qed_find_cluster counts
    them: from an entry, the following entries of its kind (for data: each
    one cluster past the one before, in the same L2 table); a data run's first
    entry must be a valid cluster offset and an L2 table's offset a valid
    table offset, else the block status fails (``qed.cluster-offset``,
    ``qed.l2-offset``)."""

    def __init__(self, img: Image, info: ImageInfo, host: HostFile) -> None:
        self.geometry = Geometry(_header(img), host.size())
        self.host = host

    def _piece(self, table: int, index: int) -> tuple[bytes, int]:
        """The piece of the table at ``table`` holding entry ``index``, and that entry's byte in it."""
        at = index * 8
        piece = at - at % TABLE_PIECE
        return self.host.table(table + piece, min(TABLE_PIECE, self.geometry.table_bytes - piece)), at - piece

    def _l2_offset(self, l1_index: int) -> tuple[int, int]:
        """L1 entry ``l1_index``, and how many entries from it are that one (runs of 0 found at once)."""
        piece, at = self._piece(self.geometry.l1_offset, l1_index)
        entry = int.from_bytes(piece[at : at + 8], "little")
        if entry != UNALLOCATED:
            return entry, 1
        return entry, (len(piece) - at - len(piece[at:].lstrip(b"\0"))) // 8

    def extents(self, start: int, length: int, *, want_zero: bool = True) -> Iterator[Extent]:
        from storprobe.blockmap import DataPathError, Extent

        g = self.geometry
        end = start + length
        while start < end:
            l1_index = start // g.l1_span
            l2, count = self._l2_offset(l1_index)
            stop = min(end, (l1_index + count) * g.l1_span)
            if l2 == UNALLOCATED:
                yield Extent(start, stop - start, False, False)
            elif not g.table_ok(l2):
                raise DataPathError(f"qed L2 table offset {l2:#x} (L1 index {l1_index}) is invalid: QEMU's read fails",
                                    code="qed.l2-offset")
            else:
                yield from self._runs(l2, l1_index * g.l1_span, start, stop)
            start = stop

    def _runs(self, l2: int, base: int, start: int, stop: int) -> Iterator[Extent]:
        """Extents of ``[start, stop)`` in the L2 table at ``l2`` (mapping from guest ``base``)."""
        from storprobe.blockmap import DataPathError

        cs = self.geometry.cluster
        first_index = (start - base) // cs
        run: tuple[int, int, int] | None = None  # (first entry, last entry, index of the first)
        for index, entry in self._entries(l2, first_index, (stop - 1 - base) // cs + 1):
            if run is not None:
                head, last, at = run
                if entry == (last + cs if head > ZERO_CLUSTER else head):
                    run = (head, entry, at)
                    continue
                yield self._extent(run, index, base, start, stop)
            if entry > ZERO_CLUSTER and not self.geometry.cluster_ok(entry):
                raise DataPathError(
                    f"qed data cluster offset {entry:#x} (guest offset {base + index * cs:#x}) is invalid: "
                    "QEMU's read fails", code="qed.cluster-offset")
            run = (entry, entry, index)
        assert run is not None
        yield self._extent(run, (stop - 1 - base) // cs + 1, base, start, stop)

    def _entries(self, table: int, first: int, end: int) -> Iterator[tuple[int, int]]:
        """(index, entry) of the table's entries ``first`` .. ``end - 1``, a piece at a time."""
        index = first
        while index < end:
            piece, at = self._piece(table, index)
            count = min(end - index, (len(piece) - at) // 8)
            for (entry,) in _UINT64.iter_unpack(piece[at : at + 8 * count]):
                yield index, entry
                index += 1

    def _extent(self, run: tuple[int, int, int], end_index: int, base: int, start: int, stop: int) -> Extent:
        """The extent of a run of entries from its first index to ``end_index``, clipped to ``[start, stop)``."""
        from storprobe.blockmap import Extent

        head, _, first_index = run
        cs = self.geometry.cluster
        begin, end = max(start, base + first_index * cs), min(stop, base + end_index * cs)
        if head == UNALLOCATED:
            return Extent(begin, end - begin, False, False)
        if head == ZERO_CLUSTER:
            return Extent(begin, end - begin, False, True)
        return Extent(begin, end - begin, True, False, head + begin - base - first_index * cs)

    def read(self, extent: Extent, offset: int, length: int) -> bytes:
        assert extent.host_offset is not None
        return self.host.read(extent.host_offset + offset - extent.start, length)


def block_map(img: Image, info: ImageInfo, host: HostFile) -> QedMap:
    return QedMap(img, info, host)


def check(img: Image, reader: CheckReader) -> CheckResult:
    """qemu-img check of a QED image, read-only (qed_check with fix off):
    every table and data cluster marked used in a bitmap of the file's
    clusters (a cluster used twice is a corruption each time; an L2 table with
    one is not walked), invalid table and cluster offsets are corruptions, and
    when every table was read, the clusters past the header nothing uses are
    leaks. Clusters allocated and fragmented are counted as QEMU counts them."""
    from storprobe.verify import CheckResult

    hdr = _header(img)
    g = Geometry(hdr, reader.size)
    clusters = g.file_end // g.cluster
    used = bytearray(-(-clusters // 8))  # one bit per cluster of the file: sized by the file
    corruptions = allocated = fragmented = 0

    def mark(offset: int, count: int) -> bool:
        nonlocal corruptions
        first, doubled = offset // g.cluster, 0
        for cluster in range(first, first + count):
            if cluster < clusters:
                byte, bit = cluster >> 3, 1 << (cluster & 7)
                doubled += bool(used[byte] & bit)
                used[byte] |= bit
        corruptions += doubled
        return not doubled

    mark(g.l1_offset, g.table_size)
    for l2 in _nonzero_entries(reader, g.l1_offset, g.table_bytes):
        if not g.table_ok(l2):
            corruptions += 1
            continue
        if not mark(l2, g.table_size):
            continue
        last = 0
        for entry in _nonzero_entries(reader, l2, g.table_bytes):
            if entry == ZERO_CLUSTER:
                continue
            allocated += 1
            if last and last + g.cluster != entry:
                fragmented += 1
            last = entry
            if not g.cluster_ok(entry):
                corruptions += 1
                continue
            mark(entry, 1)
    leaks = max(0, clusters - hdr.header_size) - (int.from_bytes(used, "little") >> hdr.header_size).bit_count()
    return CheckResult(corruptions=corruptions, leaks=leaks, total_clusters=-(-hdr.image_size // g.cluster),
                       allocated_clusters=allocated, fragmented_clusters=fragmented)


def _nonzero_entries(reader: CheckReader, table: int, table_bytes: int) -> Iterator[int]:
    """The table's non-zero entries in order, read a piece at a time."""
    for piece_start in range(0, table_bytes, TABLE_PIECE):
        raw = reader.read(table + piece_start, min(TABLE_PIECE, table_bytes - piece_start))
        if not raw.strip(b"\0"):
            continue
        for (entry,) in _UINT64.iter_unpack(raw):
            if entry:
                yield entry


@hookimpl
def storprobe_formats() -> list[FormatSpec]:
    return [
        FormatSpec(
            name="qed",
            description="QEMU enhanced disk",
            magic=b"QED\x00",
            size_offset=48,
            libvirt=LibvirtFacts(cluster_size=True),
            backing=backing,
            features=features,
            block_map=block_map,
            check=check,
        )
    ]
