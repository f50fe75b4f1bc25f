"""qcow: QEMU copy-on-write version 1 (big-endian).

The 48-byte header of QEMU's block/qcow.c. Validation follows what QEMU's
open refuses (``qcow.<rule>``); the backing file name is reported, never
opened, and must lie inside the file (QEMU would read zeros past the end).
qcow records no backing format. The virtual size is ``size`` rounded down to
whole 512-byte sectors, as QEMU keeps it.
"""

from __future__ import annotations

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
    hookimpl,
)
from storprobe.layout import Header, cstring

if TYPE_CHECKING:  # the data path loads when it is first used, not for a probe
    from storprobe.blockmap import Extent, HostFile

HEADER = Layout(
    ">",
    "qcow header",
    ("magic", "4s"),
    ("version", "I"),
    ("backing_file_offset", "Q"),
    ("backing_file_size", "I"),
    ("mtime", "I"),
    ("size", "Q"),  # bytes
    ("cluster_bits", "B"),
    ("l2_bits", "B"),  # log2 of the entries (8 bytes each) of an L2 table
    (None, "2x"),
    ("crypt_method", "I"),  # 0 none, 1 AES
    ("l1_table_offset", "Q"),
)

CLUSTER_BITS = range(9, 17)  # 512 B .. 64 KiB clusters
L2_BITS = range(6, 14)  # 512 B .. 64 KiB L2 tables
CRYPT_METHODS = {1: "aes"}
MAX_BACKING_NAME = 1023
MAX_L1_ENTRIES = (2**31 - 1) // 8  # QEMU sizes the L1 table in an int
SECTOR = 512


def _header(img: Image) -> Header:
    """The header, checked as QEMU's qcow open checks it."""
    hdr = HEADER.unpack(img.header)
    if hdr.size <= 1:
        raise InvalidHeader(f"qcow image size {hdr.size} is below 2 bytes", code="qcow.size-too-small")
    if hdr.cluster_bits not in CLUSTER_BITS:
        raise InvalidHeader(
            f"qcow cluster_bits {hdr.cluster_bits} is outside 9..16 (512 B to 64 KiB)", code="qcow.cluster-bits"
        )
    if hdr.l2_bits not in L2_BITS:
        raise InvalidHeader(
            f"qcow l2_bits {hdr.l2_bits} is outside 6..13 (L2 tables of 512 B to 64 KiB)", code="qcow.l2-bits"
        )
    if hdr.crypt_method not in (0, *CRYPT_METHODS):
        raise InvalidHeader(f"qcow crypt_method {hdr.crypt_method} is unknown", code="qcow.crypt-method")
    span = 1 << (hdr.cluster_bits + hdr.l2_bits)  # bytes one L1 entry maps
    if hdr.size > 2**64 - 1 - span:
        raise InvalidHeader(f"qcow image size {hdr.size} overflows its L1 table", code="qcow.size-too-large")
    l1_entries = -(-hdr.size // span)
    if l1_entries > MAX_L1_ENTRIES:
        raise InvalidHeader(
            f"qcow image of {hdr.size} bytes needs {l1_entries} L1 entries (at most {MAX_L1_ENTRIES})",
            code="qcow.l1-size",
        )
    if hdr.l1_table_offset + l1_entries * 8 > QEMU_MAX_LENGTH:  # QEMU reads it on open; past this it cannot
        raise InvalidHeader(
            f"qcow L1 table at {hdr.l1_table_offset} lies beyond what QEMU can read", code="qcow.l1-table-offset"
        )
    return hdr


def features(img: Image) -> Features:
    hdr = _header(img)
    return Features(
        cluster_size=1 << hdr.cluster_bits,
        details={"l2-bits": hdr.l2_bits, "l1-table-offset": hdr.l1_table_offset, "mtime": hdr.mtime},
    )


def size(img: Image) -> int:
    return _header(img).size // SECTOR * SECTOR


def backing(img: Image) -> Backing | None:
    hdr = _header(img)
    if hdr.backing_file_offset == 0:
        return None
    length = hdr.backing_file_size
    if length > MAX_BACKING_NAME:
        raise InvalidHeader(
            f"qcow backing file name of {length} bytes is longer than {MAX_BACKING_NAME}",
            code="qcow.backing-name-length",
        )
    if hdr.backing_file_offset + length > img.size:
        raise InvalidHeader(
            f"qcow backing file name ({length} bytes at {hdr.backing_file_offset}) runs past the end of the file",
            code="qcow.backing-name-offset",
        )
    name = cstring(img.read(hdr.backing_file_offset, length))
    return Backing(name) if name else None


# ---- data path: the L1/L2 map of QEMU 7.2's block/qcow.c (get_cluster_offset, qcow_co_block_status,
# qcow_co_preadv, decompress_cluster) -------------------------------------------------------------------

OFLAG_COMPRESSED = 1 << 63
#: Bytes of the L1 table read (and cached) at once.
L1_PIECE = 64 * 1024


class QcowMap:
    """The block map of a qcow image. QEMU checks nothing in its tables: an L2
    table or a cluster may lie anywhere (zeros past the end of the file); only a
    data cluster off a 512-byte boundary fails, when it is read. Its map offset
    is QEMU's (the cluster's offset OR the offset into it), one cluster at a
    time; a compressed cluster (less than a cluster of raw deflate) has none."""

    def __init__(self, img: Image, info: ImageInfo, host: HostFile) -> None:
        hdr = _header(img)
        self.host = host
        self.cluster_bits, self.cluster_size = hdr.cluster_bits, 1 << hdr.cluster_bits
        self.l2_entries = 1 << hdr.l2_bits
        self.l1_span = self.l2_entries << hdr.cluster_bits
        self.l1_offset, self.l1_size = hdr.l1_table_offset, -(-hdr.size // self.l1_span)
        self._inflated: tuple[int, bytes] = (-1, b"")

    def _l2_table(self, l1_index: int) -> bytes | None:
        at = l1_index * 8
        if l1_index >= self.l1_size:
            return None
        piece = at - at % L1_PIECE
        table = self.host.table(self.l1_offset + piece, min(L1_PIECE, self.l1_size * 8 - piece))
        l2_offset = int.from_bytes(table[at - piece : at - piece + 8], "big")
        if l2_offset + 8 * self.l2_entries > QEMU_MAX_LENGTH:  # QEMU's block layer fails the read (EIO)
            from storprobe.blockmap import DataPathError

            raise DataPathError(f"qcow L2 table for guest offset {l1_index * self.l1_span:#x} lies at {l2_offset:#x}, "
                                "past QEMU's length limit (its read fails)", code="qcow.l2-offset")
        return self.host.table(l2_offset, 8 * self.l2_entries) if l2_offset else None

    def _entry(self, guest: int) -> int:
        table = self._l2_table(guest // self.l1_span)
        if table is None:
            return 0
        at = 8 * (guest % self.l1_span >> self.cluster_bits)
        return int.from_bytes(table[at : at + 8], "big")

    def extents(self, start: int, length: int, *, want_zero: bool = True) -> Iterator[Extent]:
        from storprobe.blockmap import Extent

        end = start + length
        cs = self.cluster_size
        while start < end:
            l1_index = start // self.l1_span
            stop = min(end, (l1_index + 1) * self.l1_span)
            table = self._l2_table(l1_index)
            if table is None:
                yield Extent(start, stop - start, False, False)
                start = stop
                continue
            while start < stop:
                index = start % self.l1_span >> self.cluster_bits
                entry = int.from_bytes(table[8 * index : 8 * index + 8], "big")
                cluster_end = min(stop, start - start % cs + cs)
                if entry == 0:  # a run of unallocated clusters, found at once
                    last = (stop - 1) % self.l1_span >> self.cluster_bits
                    rest = table[8 * index : 8 * last + 8]
                    zeros = (len(rest) - len(rest.lstrip(b"\0"))) // 8
                    cluster_end = min(stop, start - start % cs + zeros * cs)
                    yield Extent(start, cluster_end - start, False, False)
                elif entry & OFLAG_COMPRESSED:
                    yield Extent(start, cluster_end - start, True, False, None, True)
                else:
                    yield Extent(start, cluster_end - start, True, False, entry | start % cs)
                start = cluster_end

    def read(self, extent: Extent, offset: int, length: int) -> bytes:
        within = offset % self.cluster_size
        cluster = offset - within
        entry = self._entry(cluster)
        if entry & OFLAG_COMPRESSED:
            return self._inflate(entry)[within : within + length]
        if entry % 512:
            from storprobe.blockmap import DataPathError

            raise DataPathError(f"qcow data cluster at guest offset {cluster:#x} lies at host offset {entry:#x}, "
                                "off a 512-byte boundary (QEMU's read fails)", code="qcow.cluster-offset-unaligned")
        if entry + within + length > QEMU_MAX_LENGTH:
            from storprobe.blockmap import DataPathError

            raise DataPathError(f"qcow data cluster at guest offset {cluster:#x} lies at host offset {entry:#x}, "
                                "past QEMU's length limit (its read fails)", code="qcow.cluster-offset")
        return self.host.read(entry + within, length)

    def _inflate(self, entry: int) -> bytes:
        """The compressed cluster ``entry`` names: fewer than a cluster's bytes of raw deflate."""
        shift = 63 - self.cluster_bits
        offset, size = entry & ((1 << shift) - 1), (entry >> shift) & (self.cluster_size - 1)
        if self._inflated[0] != offset:
            from storprobe.blockmap import inflate_cluster

            self._inflated = (offset, inflate_cluster(self.host.read(offset, size), self.cluster_size, "qcow"))
        return self._inflated[1]


def block_map(img: Image, info: ImageInfo, host: HostFile) -> QcowMap:
    return QcowMap(img, info, host)


@hookimpl
def storprobe_formats() -> list[FormatSpec]:
    return [
        FormatSpec(
            name="qcow",
            description="QEMU copy-on-write v1",
            magic=b"QFI\xfb",
            endian=">",
            version_offset=4,
            versions=(1,),
            crypt_offset=36,
            crypt_methods=CRYPT_METHODS,
            size=size,
            backing=backing,
            features=features,
            block_map=block_map,
        )
    ]
