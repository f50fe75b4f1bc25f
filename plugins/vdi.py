"""vdi: VirtualBox disk image, header version 1.1 (little-endian; VirtualBox
VDICore.h, QEMU block/vdi.c).

The header follows 64 bytes of free text. storprobe refuses what QEMU refuses
on open (sector size, block size, block count, parent links ...) and also an
image type outside VirtualBox's four and block map or data areas that lie past
the end of the file. The virtual size is ``disk_size`` rounded up to a whole
sector, as QEMU reads the odd sizes ``VBoxManage convertfromraw`` can write.

The data path and ``verify`` read the block map as QEMU 7.2's block/vdi.c does
(vdi_co_block_status, vdi_co_preadv, vdi_co_check): an entry below
0xfffffffe names the data block holding a 1 MiB guest block, anything else
reads as zeros.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from typing import TYPE_CHECKING

from storprobe import Features, FormatSpec, Image, ImageInfo, InvalidHeader, Layout, hookimpl
from storprobe.layout import Header

if TYPE_CHECKING:  # the data path loads when first used, not for a probe
    from storprobe.blockmap import Extent, HostFile
    from storprobe.verify import CheckReader, CheckResult

HEADER = Layout(
    "<",
    "vdi header",
    ("text", "64s"),
    ("signature", "I"),
    ("version", "I"),
    ("header_size", "I"),
    ("image_type", "I"),
    ("image_flags", "I"),
    ("description", "256s"),
    ("offset_bmap", "I"),
    ("offset_data", "I"),
    ("cylinders", "I"),
    ("heads", "I"),
    ("sectors", "I"),
    ("sector_size", "I"),
    (None, "4x"),
    ("disk_size", "Q"),
    ("block_size", "I"),
    ("block_extra", "I"),
    ("blocks_in_image", "I"),
    ("blocks_allocated", "I"),
    ("uuid_image", "16s"),
    ("uuid_last_snap", "16s"),
    ("uuid_link", "16s"),
    ("uuid_parent", "16s"),
)

SECTOR_SIZE = 512
BLOCK_SIZE = 1024 * 1024  # the only block size QEMU reads
IMAGE_TYPES = {1: "dynamic", 2: "static", 3: "undo", 4: "differencing"}
#: QEMU's caps: the block map (4 bytes a block, rounded up to a sector) must fit an int.
MAX_BLOCKS = (0x80000000 - SECTOR_SIZE) // 4
MAX_DISK_SIZE = MAX_BLOCKS * BLOCK_SIZE
NULL_UUID = bytes(16)


def header(img: Image) -> Header:
    """The header, checked in QEMU's order, then storprobe's own file checks."""
    hdr = HEADER.unpack(img.header)
    if hdr.disk_size > MAX_DISK_SIZE:
        raise InvalidHeader(f"disk size {hdr.disk_size} exceeds {MAX_DISK_SIZE}", code="vdi.disk-size")
    if hdr.offset_bmap % SECTOR_SIZE:
        raise InvalidHeader(f"block map offset {hdr.offset_bmap} is not sector-aligned", code="vdi.bmap-alignment")
    if hdr.offset_data % SECTOR_SIZE:
        raise InvalidHeader(f"data offset {hdr.offset_data} is not sector-aligned", code="vdi.data-alignment")
    if hdr.sector_size != SECTOR_SIZE:
        raise InvalidHeader(f"sector size {hdr.sector_size} is not 512", code="vdi.sector-size")
    if hdr.block_size != BLOCK_SIZE:
        raise InvalidHeader(f"block size {hdr.block_size} is not 1 MiB", code="vdi.block-size")
    if hdr.disk_size > hdr.blocks_in_image * hdr.block_size:
        raise InvalidHeader(
            f"{hdr.blocks_in_image} blocks cannot hold a disk of {hdr.disk_size} bytes", code="vdi.blocks-in-image"
        )
    if hdr.uuid_link != NULL_UUID:
        raise InvalidHeader("image links to a parent (differencing images are not readable)", code="vdi.link-uuid")
    if hdr.uuid_parent != NULL_UUID:
        raise InvalidHeader("image names a parent modification (differencing image)", code="vdi.parent-uuid")
    if hdr.blocks_in_image > MAX_BLOCKS:
        raise InvalidHeader(f"{hdr.blocks_in_image} blocks exceed {MAX_BLOCKS}", code="vdi.blocks-max")
    if hdr.image_type not in IMAGE_TYPES:
        raise InvalidHeader(f"unknown image type {hdr.image_type}", code="vdi.image-type")
    if hdr.blocks_allocated > hdr.blocks_in_image:
        raise InvalidHeader(
            f"{hdr.blocks_allocated} blocks allocated of {hdr.blocks_in_image}", code="vdi.blocks-allocated"
        )
    if hdr.offset_bmap + 4 * hdr.blocks_in_image > img.size:
        raise InvalidHeader("block map runs past the end of the file", code="vdi.bmap-beyond-file")
    if hdr.offset_data + hdr.blocks_allocated * hdr.block_size > img.size:
        raise InvalidHeader(
            "allocated data blocks run past the end of the file (the image is truncated)",
            code="vdi.data-beyond-file",
        )
    return hdr


def size(img: Image) -> int:
    return -(-header(img).disk_size // SECTOR_SIZE) * SECTOR_SIZE


def features(img: Image) -> Features:
    hdr = header(img)
    return Features(cluster_size=hdr.block_size, details={"image-type": IMAGE_TYPES[hdr.image_type]})


# ---- data path and check: the block map (QEMU 7.2 block/vdi.c) ------------------------------------------

#: Block map entries at or above this are no block: 0xfffffffe discarded, 0xffffffff unallocated (zeros).
FIRST_UNALLOCATED = 0xFFFFFFFE
TYPE_STATIC = 2
#: Bytes of the block map read (and cached) at once.
BMAP_PIECE = 64 * 1024
_UNALLOCATED = b"\xff" * 4
_UINT32 = struct.Struct("<I")


class VdiMap:
    """The block map of a VDI image. An unallocated or discarded block is
    zeros (allocated, to QEMU: there is no backing file); an allocated one
    lies at ``offset_data`` plus its entry times the block size, wherever that
    is (QEMU checks nothing; past the end of the file it reads zeros). A
    static image's blocks are split where the file has holes, as QEMU's block
    status recurses into the file for them."""

    def __init__(self, img: Image, info: ImageInfo, host: HostFile) -> None:
        hdr = header(img)
        self.host = host
        self.bmap_offset, self.data_offset = hdr.offset_bmap, hdr.offset_data
        self.blocks = hdr.blocks_in_image
        self.static = hdr.image_type == TYPE_STATIC

    def _entries(self, first: int, count: int) -> Iterator[tuple[int, int]]:
        """(entry, how many blocks it stands for) for block map entries ``first`` ..
        ``first + count - 1`` (one piece of the map at most): a run of
        unallocated entries comes as one, found at once."""
        at = first * 4
        piece = at - at % BMAP_PIECE
        table = self.host.table(self.bmap_offset + piece, min(BMAP_PIECE, self.blocks * 4 - piece))
        raw = table[at - piece : at - piece + 4 * count]
        position = 0
        while position < len(raw):
            if raw[position : position + 4] == _UNALLOCATED:
                run = (len(raw) - position - len(raw[position:].lstrip(b"\xff"))) // 4
                yield FIRST_UNALLOCATED + 1, run
                position += 4 * run
            else:
                yield _UINT32.unpack_from(raw, position)[0], 1
                position += 4

    def extents(self, start: int, length: int, *, want_zero: bool = True) -> Iterator[Extent]:
        """Runs of zero blocks, and of blocks that follow one another in the file, one extent each."""
        from storprobe.blockmap import Extent

        end = start + length
        run: Extent | None = None
        while start < end:
            block = start // BLOCK_SIZE
            in_piece = BMAP_PIECE // 4 - block % (BMAP_PIECE // 4)
            count = min(in_piece, -(-end // BLOCK_SIZE) - block)
            for entry, blocks in self._entries(block, count):
                stop = min(end, (block + blocks) * BLOCK_SIZE)
                if entry >= FIRST_UNALLOCATED:
                    extent = Extent(start, stop - start, False, True)
                else:
                    extent = Extent(start, stop - start, True, False,
                                    self.data_offset + entry * BLOCK_SIZE + start % BLOCK_SIZE)
                if run is not None and _continues(run, extent):
                    run = run._replace(length=run.length + extent.length)
                else:
                    if run is not None:
                        yield from self._finished(run, want_zero)
                    run = extent
                start, block = stop, block + blocks
        if run is not None:
            yield from self._finished(run, want_zero)

    def _finished(self, run: Extent, want_zero: bool) -> Iterator[Extent]:
        if run.data and want_zero and self.static:
            yield from _split_by_holes(self.host, run)
        else:
            yield run

    def read(self, extent: Extent, offset: int, length: int) -> bytes:
        assert extent.host_offset is not None
        return self.host.read(extent.host_offset + offset - extent.start, length)


def _continues(run: Extent, extent: Extent) -> bool:
    """Whether ``extent`` is of ``run``'s kind and, for data, follows it in the file."""
    if run.data != extent.data:
        return False
    return run.host_offset is None or run.host_offset + run.length == extent.host_offset


def _split_by_holes(host: HostFile, extent: Extent) -> Iterator[Extent]:
    """A data extent marked as reading zeros where the file has holes or has ended."""
    from storprobe.blockmap import Extent

    assert extent.host_offset is not None
    delta = extent.start - extent.host_offset
    for offset, length, is_data in host.holes(extent.host_offset, extent.length):
        yield Extent(offset + delta, length, True, not is_data, offset)


def block_map(img: Image, info: ImageInfo, host: HostFile) -> VdiMap:
    return VdiMap(img, info, host)


def check(img: Image, reader: CheckReader) -> CheckResult:
    """qemu-img check of a VDI image (vdi_co_check): every allocated entry
    must name a data block below ``blocks_in_image`` that no other entry names
    (a corruption each), and their count must be ``blocks_allocated`` (one
    more corruption). QEMU reports no cluster counts for VDI."""
    from storprobe.verify import CheckResult

    hdr = header(img)
    used = bytearray(-(-hdr.blocks_in_image // 8))  # one bit per data block: sized by the map, inside the file
    corruptions = allocated = 0
    for first in range(0, hdr.blocks_in_image, BMAP_PIECE // 4):
        count = min(BMAP_PIECE // 4, hdr.blocks_in_image - first)
        raw = reader.read(hdr.offset_bmap + 4 * first, 4 * count)
        for (entry,) in _UINT32.iter_unpack(raw):
            if entry >= FIRST_UNALLOCATED:
                continue
            if entry >= hdr.blocks_in_image:
                corruptions += 1  # "block index too large"
                continue
            allocated += 1
            byte, bit = entry >> 3, 1 << (entry & 7)
            if used[byte] & bit:
                corruptions += 1  # "block index also used"
            used[byte] |= bit
    if allocated != hdr.blocks_allocated:
        corruptions += 1  # "allocated blocks mismatch"
    return CheckResult(corruptions=corruptions)




@hookimpl
def storprobe_formats() -> list[FormatSpec]:
    return [
        FormatSpec(
            name="vdi",
            description="VirtualBox disk image",
            magic=b"\x7f\x10\xda\xbe",
            magic_offset=0x40,
            version_offset=0x44,
            versions=(0x00010001,),
            size=size,
            features=features,
            block_map=block_map,
            check=check,
        )
    ]
