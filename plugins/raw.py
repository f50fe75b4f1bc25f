"""raw: the fallback for bytes no other format claims.

The virtual size is the file size rounded up to whole 512-byte sectors, as
QEMU's block layer counts it (the guest reads zeros past the end of the file);
:func:`sector_rounded_size` is shared with formats sized by their file.

A raw volume may still carry a partition table or a file system at its start;
those are reported as details, never as a different format and never as an
error (any bytes are a valid raw volume):

- ``partition-table``: ``"mbr"`` or ``"gpt"`` (an MBR with a protective 0xEE
  entry), with ``partitions``: the used entries of the MBR's four primary slots,
  or of the GPT entry array when it lies in the head buffer and its CRCs hold;
- ``boot-sector``: ``"fat"`` with ``fat-type`` ``fat12``, ``fat16`` or ``fat32``
  for a volume that starts with a FAT boot sector (no partition table).

:func:`partition_details` is shared with formats that may also be partitioned
(an isohybrid ISO). For ``storprobe check``, the row flags a partition table
or boot sector inside another format's first-sector header (a polyglot).
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator
from typing import Any

from storprobe import (
    Features,
    FormatSpec,
    Hazard,
    Image,
    ImageInfo,
    Layout,
    format_table,
    hookimpl,
)

SECTOR = 512
BOOT_SIGNATURE = b"\x55\xaa"  # the last two bytes of an MBR or a FAT boot sector

MBR_ENTRY = Layout(
    "<",
    "mbr partition entry",
    ("status", "B"),  # 0x80 bootable, 0x00 not; anything else: not an MBR
    ("chs_first", "3s"),
    ("type", "B"),
    ("chs_last", "3s"),
    ("lba_first", "I"),
    ("sectors", "I"),
)
MBR_ENTRIES_OFFSET = 446
GPT_PROTECTIVE = 0xEE

GPT_HEADER = Layout(
    "<",
    "gpt header",
    ("signature", "8s"),  # "EFI PART"
    ("revision", "I"),
    ("header_size", "I"),
    ("header_crc32", "I"),  # CRC-32 of header_size bytes, this field zeroed
    (None, "4x"),
    ("my_lba", "Q"),
    ("alternate_lba", "Q"),
    ("first_usable_lba", "Q"),
    ("last_usable_lba", "Q"),
    ("disk_guid", "16s"),
    ("entries_lba", "Q"),
    ("entry_count", "I"),
    ("entry_size", "I"),
    ("entries_crc32", "I"),
)
GPT_SIGNATURE = b"EFI PART"
GPT_SECTOR_SIZES = (512, 4096)  # the header is at LBA 1

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


def partition_details(head: bytes) -> dict[str, Any]:
    """``partition-table`` (and ``partitions`` when countable) for an MBR or GPT
    at the start of ``head``; empty when there is none."""
    if len(head) < 512 or head[510:512] != BOOT_SIGNATURE:
        return {}
    entries = [MBR_ENTRY.unpack(head, MBR_ENTRIES_OFFSET + i * MBR_ENTRY.size) for i in range(4)]
    if any(e.status not in (0x00, 0x80) for e in entries):
        return {}
    if any(e.type == GPT_PROTECTIVE for e in entries):
        return {"partition-table": "gpt", **_gpt_partitions(head)}
    return {"partition-table": "mbr", "partitions": sum(e.sectors != 0 for e in entries)}


def _gpt_partitions(head: bytes) -> dict[str, int]:
    """``partitions``: used entries of the GPT entry array, if header and array
    are in ``head`` and their CRCs match; empty otherwise."""
    for sector in GPT_SECTOR_SIZES:
        if head[sector : sector + 8] != GPT_SIGNATURE or len(head) < sector + GPT_HEADER.size:
            continue
        hdr = GPT_HEADER.unpack(head, sector)
        if not GPT_HEADER.size <= hdr.header_size <= sector:
            return {}
        raw = bytearray(head[sector : sector + hdr.header_size])
        raw[16:20] = bytes(4)
        start, length = hdr.entries_lba * sector, hdr.entry_count * hdr.entry_size
        if zlib.crc32(raw) != hdr.header_crc32 or hdr.entry_size < 128 or start + length > len(head):
            return {}
        array = head[start : start + length]
        if zlib.crc32(array) != hdr.entries_crc32:
            return {}
        used = sum(
            any(array[i : i + 16]) for i in range(0, length, hdr.entry_size)
        )  # a zero type GUID = unused
        return {"partitions": used}
    return {}


def fat_details(head: bytes) -> dict[str, str]:
    """``boot-sector`` and ``fat-type`` when ``head`` starts with a FAT boot sector."""
    if len(head) < 512 or head[510:512] != BOOT_SIGNATURE:
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


def sector_rounded_size(img: Image) -> int:
    """The file size in whole 512-byte sectors, rounded up, as qemu-img reports it."""
    return -(-img.size // SECTOR) * SECTOR


def features(img: Image) -> Features:
    return Features(details=fat_details(img.head) or partition_details(img.head))


def hazards(img: Image, info: ImageInfo) -> Iterator[Hazard]:
    """A partition table or FAT boot sector in the first sector of another
    format's header: the volume is one thing to a hypervisor and a bootable,
    partitioned disk to anything that reads it as raw (firmware, partition
    scanners, a raw-declared consumer). Only images whose header occupies the
    first sector are judged, which for a format with a header or a trailer
    (VHD) means its magic is there (a dynamic VHD's footer copy): an ISO's
    system area, a fixed VHD's or a DMG's first sector are the guest's disk and
    may hold a partition table."""
    table = format_table()
    if info.format not in table:
        return
    spec = table[info.format]
    if spec.catch_all or spec.magic_offset >= SECTOR or not _header_at_start(img, spec):
        return
    found = fat_details(img.head) or partition_details(img.head)
    if "partition-table" in found:
        yield Hazard(
            "raw.partition-table",
            f"the first sector of the {info.format} header also holds a partition table "
            f"({found['partition-table'].upper()})",
        )
    elif found:
        yield Hazard("raw.boot-sector", f"the first sector of the {info.format} header is also a FAT boot sector")


def _header_at_start(img: Image, spec: FormatSpec) -> bool:
    if spec.header_offsets == (0,):
        return True
    return 0 in spec.header_offsets and any(img.head.startswith(m, spec.magic_offset) for m in spec.magics)


@hookimpl
def storprobe_formats() -> list[FormatSpec]:
    return [
        FormatSpec(
            name="raw",
            description="raw disk image",
            size=sector_rounded_size,
            features=features,
            hazards=hazards,
            libvirt_capacity_is_file_size=True,
        )
    ]
