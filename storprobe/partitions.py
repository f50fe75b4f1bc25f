"""Partition tables at the start of a volume: an MBR, or a GPT behind a protective MBR.

Any format whose guest disk starts at byte 0 may carry one (a raw volume, an
isohybrid ISO), and a partition table inside another format's first-sector
header makes a polyglot; the plugins that report or flag one share this reader.
"""

from __future__ import annotations

import zlib
from typing import Any

from .layout import Layout

BOOT_SIGNATURE = b"\x55\xaa"  # the last two bytes of an MBR (and of a FAT boot sector)

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
