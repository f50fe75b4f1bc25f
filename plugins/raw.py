"""raw: the fallback for bytes no other format claims.

The virtual size is the file size rounded up to whole 512-byte sectors, as
QEMU's block layer counts it (the guest reads zeros past the end of the file:
the core's :func:`storprobe.source.sector_rounded_size`).

A raw volume may still carry a partition table or a file system at its start;
those are reported as details, never as a different format and never as an
error (any bytes are a valid raw volume):

- ``partition-table``: ``"mbr"`` or ``"gpt"`` (an MBR with a protective 0xEE
  entry), with ``partitions``: the used entries of the MBR's four primary slots,
  or of the GPT entry array when it lies in the head buffer and its CRCs hold
  (the core's :func:`storprobe.partitions.partition_details`);
- ``boot-sector``: ``"fat"`` with ``fat-type`` ``fat12``, ``fat16`` or ``fat32``
  for a volume that starts with a FAT boot sector (no partition table).

For ``storprobe check``, the row flags a partition table or boot sector inside
another format's first-sector header (a polyglot).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from storprobe import (
    Features,
    FormatSpec,
    Hazard,
    Image,
    ImageInfo,
    Layout,
    LibvirtFacts,
    hookimpl,
)
from storprobe.layout import BOOT_SIGNATURE
from storprobe.source import SECTOR, sector_rounded_size

if TYPE_CHECKING:  # the data path, measure and the partition tables load when first used, not for a probe
    from storprobe.blockmap import FileAsDisk, HostFile
    from storprobe.measure import Measurement, MeasureRequest

FAT_BOOT_SECTOR = Layout(
    "<",
    "fat boot sector",
    ("jump", "3s"),  # EB xx 90 or E9 xx xx
    ("oem_name", "8s"),
    ("bytes_per_sector", "H"),
    ("sectors_per_cluster", "B"),
    ("reserved_sectors", "H"),
    ("fat_count", "B"),
    ("root_entries", "H"),
    ("total_sectors_16", "H"),
    ("media", "B"),
    ("fat_size_16", "H"),  # 0 on FAT32
    ("sectors_per_track", "H"),
    ("heads", "H"),
    ("hidden_sectors", "I"),
    ("total_sectors_32", "I"),
    ("fat_size_32", "I"),  # FAT32 only
)
# Microsoft's FAT spec: fewer than 4085 clusters is FAT12, else FAT16; a FAT32
# boot sector is the one without a 16-bit FAT size (as Linux decides).
FAT12_MAX_CLUSTERS = 4084


def boot_details(head: bytes) -> dict[str, str]:
    """What the first sector holds: a FAT boot sector's facts, else the partition
    table's (:mod:`storprobe.partitions`, loaded when a raw volume is first described;
    a sector without the boot signature, most volumes' first, imports nothing)."""
    if head[510:512] != BOOT_SIGNATURE:
        return {}
    from storprobe.partitions import partition_details

    return fat_details(head) or partition_details(head)


def fat_details(head: bytes) -> dict[str, str]:
    """``boot-sector`` and ``fat-type`` when ``head`` starts with a FAT boot sector
    (its signature, 0x55 0xAA at 510, already seen)."""
    if len(head) < 512:
        return {}
    bpb = FAT_BOOT_SECTOR.unpack(head)
    spc = bpb.sectors_per_cluster
    fat_size = bpb.fat_size_16 or bpb.fat_size_32
    total = bpb.total_sectors_16 or bpb.total_sectors_32
    if (
        not (bpb.jump[0] == 0xE9 or (bpb.jump[0] == 0xEB and bpb.jump[2] == 0x90))
        or bpb.bytes_per_sector not in (512, 1024, 2048, 4096)
        or spc == 0
        or spc & (spc - 1)
        or bpb.reserved_sectors == 0
        or bpb.fat_count == 0
        or not (bpb.media == 0xF0 or bpb.media >= 0xF8)
        or fat_size == 0
    ):
        return {}
    root_sectors = -(-bpb.root_entries * 32 // bpb.bytes_per_sector)
    data_sectors = total - bpb.reserved_sectors - bpb.fat_count * fat_size - root_sectors
    if data_sectors <= 0:
        return {}
    clusters = data_sectors // spc
    if bpb.fat_size_16 == 0:
        fat_type = "fat32"
    elif clusters <= FAT12_MAX_CLUSTERS:
        fat_type = "fat12"
    else:
        fat_type = "fat16"
    return {"boot-sector": "fat", "fat-type": fat_type}


def features(img: Image) -> Features:
    return Features(details=boot_details(img.head))


def hazards(img: Image, info: ImageInfo) -> Iterator[Hazard]:
    """A partition table or FAT boot sector in the first sector of another
    format's header: the volume is one thing to a hypervisor and a bootable,
    partitioned disk to anything that reads it as raw (firmware, partition
    scanners, a raw-declared consumer). Only images whose header occupies the
    first sector are judged, which for a format with a header or a trailer
    (VHD) means its magic is there (a dynamic VHD's footer copy): an ISO's
    system area, a fixed VHD's or a DMG's first sector are the guest's disk and
    may hold a partition table."""
    if not info.header_at_start:
        return
    found = boot_details(img.head)
    if "partition-table" in found:
        yield Hazard(
            "raw.partition-table",
            f"the first sector of the {info.format} header also holds a partition table "
            f"({found['partition-table'].upper()})",
        )
    elif found:
        yield Hazard("raw.boot-sector", f"the first sector of the {info.format} header is also a FAT boot sector")


def block_map(img: Image, info: ImageInfo, host: HostFile) -> FileAsDisk:
    """The guest disk is the file, its holes unallocated as QEMU's file driver says."""
    from storprobe.blockmap import FileAsDisk

    return FileAsDisk(host)


def measure(request: MeasureRequest) -> Measurement:
    """``qemu-img measure -O raw`` (QEMU's raw_measure): every byte of the disk,
    holes included, in whole sectors for a size; a source's virtual size."""
    from storprobe.measure import CreateOption, Measurement

    options = request.options((CreateOption("size", "size"),))
    if request.source is not None:
        size = request.source.virtual_size
    else:
        size = -(-options.number("size", 0) // SECTOR) * SECTOR
    return Measurement(size, size)


@hookimpl
def storprobe_formats() -> list[FormatSpec]:
    return [
        FormatSpec(
            name="raw",
            description="raw disk image",
            size=sector_rounded_size,
            features=features,
            hazards=hazards,
            measure=measure,
            block_map=block_map,
            libvirt=LibvirtFacts(capacity_is_file_size=True),
        )
    ]
