"""vpc: Microsoft Virtual PC / VHD (big-endian, "Virtual Hard Disk Image Format
Specification" v1.0; QEMU block/vpc.c).

Every VHD ends with a 512-byte footer (``conectix``). Dynamic and differencing
disks also keep a copy of it at offset 0 and a dynamic-disk header
(``cxsparse``) at the footer's ``data_offset``. qemu-img probes a fixed VHD as
raw (its only signature is the trailer); storprobe follows the spec and calls
it vpc, with the size ``qemu-img info -f vpc`` gives.

The virtual size follows QEMU 7.2: the CHS geometry (cylinders x heads x
sectors x 512), except for creators known to store the real size in
``current_size`` (Hyper-V, disk2vhd, XenServer, XenConverter, QEMU's
``force_size``) or when the geometry is the CHS maximum; then ``current_size``.
A differencing disk's parent is reported as its backing file (QEMU opens such
a disk as a plain dynamic one and shows no backing).

The data path reads a fixed disk as its file and a dynamic one by its block
allocation table, as QEMU 7.2 does: an allocated block is data throughout
(its sector bitmap unread), an unallocated one zeros. A differencing disk is
read so too, its parent never opened: what ``qemu-img map`` and ``convert``
give, not the spec's reading (the parent's bytes wherever a block is
unallocated or its sector bitmap leaves a sector unmarked). QEMU has no vpc check.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from typing import TYPE_CHECKING

from storprobe import Backing, Features, FormatSpec, Image, ImageInfo, InvalidHeader, Layout, hookimpl
from storprobe.layout import Header

if TYPE_CHECKING:  # the data path loads when first used, not for a probe
    from storprobe.blockmap import Extent, FileAsDisk, HostFile

FOOTER = Layout(
    ">",
    "vhd footer",
    ("cookie", "8s"),
    ("features", "I"),
    ("version", "I"),
    ("data_offset", "Q"),
    ("timestamp", "I"),
    ("creator_app", "4s"),
    ("creator_version", "I"),
    ("creator_os", "4s"),
    ("original_size", "Q"),
    ("current_size", "Q"),
    ("cylinders", "H"),
    ("heads", "B"),
    ("sectors_per_track", "B"),
    ("disk_type", "I"),
    ("checksum", "I"),
    ("unique_id", "16s"),
    ("saved_state", "B"),
)
FOOTER_SIZE = 512
MAGIC = b"conectix"
CHECKSUM_OFFSET = 64

DYNAMIC_HEADER = Layout(
    ">",
    "vhd dynamic disk header",
    ("cookie", "8s"),
    ("data_offset", "Q"),
    ("table_offset", "Q"),
    ("header_version", "I"),
    ("max_table_entries", "I"),
    ("block_size", "I"),
    ("checksum", "I"),
    ("parent_unique_id", "16s"),
    ("parent_timestamp", "I"),
    (None, "4x"),
    ("parent_unicode_name", "512s"),
)
DYNAMIC_HEADER_SIZE = 1024  # the fields above, then 8 parent locators of 24 bytes, then padding
DYNAMIC_COOKIE = b"cxsparse"
DYNAMIC_CHECKSUM_OFFSET = 36

FIXED, DYNAMIC, DIFFERENCING = 2, 3, 4
DISK_TYPES = {FIXED: "fixed", DYNAMIC: "dynamic", DIFFERENCING: "differencing"}

#: Creator applications whose ``current_size`` QEMU 7.2 trusts over the geometry.
CURRENT_SIZE_CREATORS = frozenset({b"win ", b"qem2", b"d2v ", b"CTXS", b"tap\0"})
MAX_CHS_SECTORS = 65535 * 16 * 255  # the largest geometry; its disks use current_size
MAX_SECTORS = 0xFF000000  # QEMU's limit: 2040 GiB
MAX_TABLE_ENTRIES = 0x7FFFFFFF // 4  # QEMU: the BAT's byte size must fit an int
UNUSED_BAT_ENTRY = 0xFFFFFFFF
UNUSED_BYTES = UNUSED_BAT_ENTRY.to_bytes(4, "big")
#: Largest block allocation table read to find blocks past the end of the file
#: (a 2040 GiB disk with the usual 2 MiB blocks needs 4 MiB); a larger one is not checked.
BAT_SCAN_LIMIT = 4 * 1024 * 1024


def checksum(block: bytes, offset: int) -> int:
    """The VHD checksum: one's complement of the byte sum, the field itself taken as zero."""
    return ~(sum(block) - sum(block[offset : offset + 4])) & 0xFFFFFFFF


def footer(img: Image) -> Header:
    """The footer the row matched (the copy at 0 or the trailer), checked
    (once per probe: size, features and backing all start from it)."""
    return img.memo(footer, _read_footer)


def _read_footer(img: Image) -> Header:
    block = img.read(img.header_offset, FOOTER_SIZE)
    foot = FOOTER.unpack(block)
    if checksum(block, CHECKSUM_OFFSET) != foot.checksum:
        raise InvalidHeader("VHD footer checksum is incorrect", code="vpc.checksum")
    if foot.disk_type not in DISK_TYPES:
        raise InvalidHeader(f"VHD disk type {foot.disk_type} is not 2, 3 or 4", code="vpc.disk-type")
    if img.header_offset == 0 and foot.disk_type == FIXED:
        raise InvalidHeader(
            "footer copy at offset 0 claims a fixed disk, which keeps its footer only at the end",
            code="vpc.fixed-copy",
        )
    if img.header_offset != 0 and foot.disk_type != FIXED:
        raise InvalidHeader(
            f"{DISK_TYPES[foot.disk_type]} disk without its footer copy at offset 0 (QEMU: invalid VPC image)",
            code="vpc.missing-copy",
        )
    return foot


def uses_current_size(foot: Header) -> bool:
    """QEMU's rule for which size field to trust."""
    chs = foot.cylinders * foot.heads * foot.sectors_per_track
    return foot.creator_app in CURRENT_SIZE_CREATORS or chs == MAX_CHS_SECTORS


def size(img: Image) -> int:
    foot = footer(img)
    if uses_current_size(foot):
        sectors = foot.current_size // 512
    else:
        sectors = foot.cylinders * foot.heads * foot.sectors_per_track
    if sectors > MAX_SECTORS:
        raise InvalidHeader(f"VHD of {sectors} sectors exceeds the 2040 GiB limit", code="vpc.too-large")
    return sectors * 512


def dynamic_header(img: Image, foot: Header) -> tuple[Header, bytes]:
    """The ``cxsparse`` header of a dynamic or differencing disk and its raw bytes."""
    if foot.data_offset > img.size - DYNAMIC_HEADER_SIZE:
        raise InvalidHeader(
            f"dynamic disk header offset {foot.data_offset} lies beyond the end of the file",
            code="vpc.data-offset",
        )
    raw = img.read(foot.data_offset, DYNAMIC_HEADER_SIZE)
    dyn = DYNAMIC_HEADER.unpack(raw)
    if dyn.cookie != DYNAMIC_COOKIE:
        raise InvalidHeader("dynamic disk header lacks its cxsparse cookie", code="vpc.dynamic-magic")
    return dyn, raw


def check_table(img: Image, dyn: Header, virtual_size: int) -> bool:
    """Check the block allocation table as QEMU does on open; False when it
    was too large to scan for blocks past the end of the file."""
    block = dyn.block_size
    if block < 512 or block & (block - 1):
        raise InvalidHeader(f"block size {block} is not a power of two of at least 512", code="vpc.block-size")
    if dyn.max_table_entries > MAX_TABLE_ENTRIES:
        raise InvalidHeader(f"{dyn.max_table_entries} table entries is too many", code="vpc.table-entries")
    if dyn.max_table_entries * block < virtual_size:
        raise InvalidHeader(
            f"{dyn.max_table_entries} blocks of {block} bytes cannot hold {virtual_size} bytes",
            code="vpc.table-too-small",
        )
    table_bytes = dyn.max_table_entries * 4
    table_end = -(-(dyn.table_offset + table_bytes) // 512) * 512
    if table_end > img.size:
        raise InvalidHeader("block allocation table runs past the end of the file", code="vpc.table-offset")
    if table_bytes > BAT_SCAN_LIMIT:
        return False
    table = img.read(dyn.table_offset, table_bytes)
    if table.count(UNUSED_BYTES) * 4 == table_bytes:  # no block allocated (a new disk): skip the walk
        return True
    entries = set(struct.unpack(f">{dyn.max_table_entries}I", table))
    entries.discard(UNUSED_BAT_ENTRY)
    last = max(entries, default=None)
    if last is not None:
        bitmap = -(-(block // (8 * 512)) // 512) * 512
        if last * 512 + bitmap + block > img.size:
            raise InvalidHeader(
                "a data block lies past the end of the file (the image is truncated)", code="vpc.truncated"
            )
    return True


def features(img: Image) -> Features:
    foot = footer(img)
    virtual_size = size(img)
    details: dict[str, object] = {
        "disk-type": DISK_TYPES[foot.disk_type],
        "creator-app": foot.creator_app.decode("latin-1"),
        "size-from": "current-size" if uses_current_size(foot) else "chs",
    }
    if foot.disk_type == FIXED:
        return Features(details=details)
    dyn, raw = dynamic_header(img, foot)
    if not check_table(img, dyn, virtual_size):
        details["table-not-scanned"] = f"larger than {BAT_SCAN_LIMIT} bytes"
    if checksum(raw, DYNAMIC_CHECKSUM_OFFSET) != dyn.checksum:
        details["dynamic-header-checksum"] = "mismatch"  # QEMU does not check it either
    return Features(cluster_size=dyn.block_size, details=details)


def backing(img: Image) -> Backing | None:
    """A differencing disk's parent, by the Parent Unicode Name (UTF-16BE)."""
    foot = footer(img)
    if foot.disk_type != DIFFERENCING:
        return None
    dyn, _ = dynamic_header(img, foot)
    raw = dyn.parent_unicode_name
    end = next((i for i in range(0, len(raw), 2) if raw[i : i + 2] == b"\0\0"), len(raw))
    name = raw[:end].decode("utf-16-be", "replace")
    if not name:
        raise InvalidHeader("differencing disk has no parent name", code="vpc.parent-name")
    return Backing(name, "vpc")  # the spec makes a differencing disk's parent a VHD


# ---- data path: QEMU 7.2's block/vpc.c (get_image_offset, vpc_co_block_status, vpc_co_preadv) -----------

#: Bytes of the block allocation table read (and cached) at once.
BAT_PIECE = 64 * 1024


class DynamicMap:
    """A dynamic (or differencing, which QEMU reads as dynamic) VHD: a block
    the allocation table names is data throughout, after its sector bitmap
    (QEMU never reads the bitmap); one it does not name reads as zeros (QEMU
    says zero, never unallocated, so no backing file is asked)."""

    #: A differencing disk's parent is never opened: QEMU reads nothing of it.
    reads_no_backing = True

    def __init__(self, img: Image, foot: Header, host: HostFile) -> None:
        dyn, _ = dynamic_header(img, foot)
        check_table(img, dyn, size(img))
        self.host = host
        self.block = dyn.block_size
        self.entries = dyn.max_table_entries
        self.table_offset = dyn.table_offset
        self.bitmap = -(-(self.block // (8 * 512)) // 512) * 512

    def _entries(self, index: int) -> bytes:
        """The table's entries from block ``index`` to the end of the piece of it that holds it."""
        at = index * 4
        piece = at - at % BAT_PIECE
        return self.host.table(self.table_offset + piece, min(BAT_PIECE, self.entries * 4 - piece))[at - piece :]

    def _entry(self, index: int) -> int:
        """The table's entry for block ``index`` (UNUSED_BAT_ENTRY when past the table)."""
        return UNUSED_BAT_ENTRY if index >= self.entries else int.from_bytes(self._entries(index)[:4], "big")

    def _unused_run(self, index: int) -> int:
        """How many blocks from ``index`` (unused) on are unused, found at once within a piece of the table."""
        if index >= self.entries:
            return 1
        run = self._entries(index)
        return max(1, (len(run) - len(run.lstrip(b"\xff"))) // 4)

    def _host_offset(self, offset: int) -> int | None:
        entry = self._entry(offset // self.block)
        return None if entry == UNUSED_BAT_ENTRY else 512 * entry + self.bitmap + offset % self.block

    def extents(self, start: int, length: int, *, want_zero: bool = True) -> Iterator[Extent]:
        from storprobe.blockmap import Extent

        end = start + length
        while start < end:
            stop = min(end, start - start % self.block + self.block)
            host_offset = self._host_offset(start)
            if host_offset is None:
                stop = min(end, start - start % self.block + self._unused_run(start // self.block) * self.block)
                yield Extent(start, stop - start, False, True)
            else:
                yield Extent(start, stop - start, True, False, host_offset)
            start = stop

    def read(self, extent: Extent, offset: int, length: int) -> bytes:
        host_offset = self._host_offset(offset)
        assert host_offset is not None  # a data extent is one block
        return self.host.read(host_offset, length)


def block_map(img: Image, info: ImageInfo, host: HostFile) -> FileAsDisk | DynamicMap:
    from storprobe.blockmap import FileAsDisk

    if not img.head.startswith(MAGIC):  # the footer the probe found: the copy at 0, else the trailer
        img.at_header(-FOOTER_SIZE)
    foot = footer(img)
    if foot.disk_type == FIXED:  # the file before its footer; QEMU passes block status to the file (BDRV_BLOCK_RAW)
        return FileAsDisk(host, holes_are_data=True)
    return DynamicMap(img, foot, host)


@hookimpl
def storprobe_formats() -> list[FormatSpec]:
    return [
        FormatSpec(
            name="vpc",
            description="Virtual PC / VHD",
            magic=MAGIC,
            header_offsets=(0, -FOOTER_SIZE),
            endian=">",
            version_offset=12,
            versions=(0x00010000,),
            size=size,
            backing=backing,
            features=features,
            block_map=block_map,
        )
    ]
