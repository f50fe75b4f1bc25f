"""raw: the fallback for bytes no other format claims.

A raw volume may still carry a partition table or a file system; those are
reported as details (``partition-table``: ``gpt`` or ``mbr``; ``boot-sector``:
``fat``), never as a different format.
"""

from __future__ import annotations

from storprobe import Features, FormatSpec, Image, hookimpl

MBR_SIGNATURE = b"\x55\xaa"  # at byte 510 of the first sector
GPT_SIGNATURE = b"EFI PART"  # at the start of LBA 1 (512-byte sectors)
FAT_TYPES = (  # (offset, text) of the file-system type label in a FAT boot sector
    (54, b"FAT12   "),
    (54, b"FAT16   "),
    (54, b"FAT     "),
    (82, b"FAT32   "),
)


def features(img: Image) -> Features:
    head = img.head
    details: dict[str, str] = {}
    if head[510:512] == MBR_SIGNATURE:
        if head[512:520] == GPT_SIGNATURE:
            details["partition-table"] = "gpt"
        elif any(head[o : o + len(t)] == t for o, t in FAT_TYPES):
            details["boot-sector"] = "fat"
        else:
            details["partition-table"] = "mbr"
    return Features(details=details)


@hookimpl
def storprobe_formats() -> list[FormatSpec]:
    return [FormatSpec(name="raw", description="raw disk image", features=features)]
