"""vdi: VirtualBox disk image, header version 1.1 (little-endian; VirtualBox
VDICore.h, QEMU block/vdi.c).

The header follows 64 bytes of free text. storprobe refuses what QEMU refuses
on open (sector size, block size, block count, parent links ...) and also an
image type outside VirtualBox's four and block map or data areas that lie past
the end of the file. The virtual size is ``disk_size`` rounded up to a whole
sector, as QEMU reads the odd sizes ``VBoxManage convertfromraw`` can write.
"""

from __future__ import annotations

from storprobe import Features, FormatSpec, Image, InvalidHeader, Layout, hookimpl
from storprobe.layout import Header

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
        )
    ]
