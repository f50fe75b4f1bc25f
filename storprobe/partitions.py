"""Partition tables at the start of a volume: an MBR, or a GPT behind a protective MBR.

Any format whose guest disk starts at byte 0 may carry one (a raw volume, an
isohybrid ISO), and a partition table inside another format's first-sector
header makes a polyglot; the plugins that report or flag one share this reader.
:func:`partition_details` summarizes the table in a volume's head (the polyglot
checks); :func:`read_partition_table` reads a guest disk's table whole, as
libblkid and the kernel do (logical partitions in the extended chain, the
backup GPT) and names each problem it finds (an entry past the disk's end,
overlaps, a chain of logical partitions that loops or never ends).
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from typing import Any, NamedTuple

from .layout import BOOT_SIGNATURE, Layout

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

#: MBR type bytes of extended partitions (DOS, W95 LBA, Linux), whose first
#: sector holds the next link of the logical partitions' chain.
MBR_EXTENDED = frozenset({0x05, 0x0F, 0x85})
#: Most logical partitions followed down an extended chain (Linux numbers
#: them 5 and up; libblkid stops after 100 links without one).
MAX_LOGICAL = 128
#: Most GPT entries read (and checked against the array's CRC): 8192, 1 MiB.
#: Partitioning tools write 128, xorriso's hybrid ISOs 248; libblkid reads up to 4 GiB.
MAX_GPT_ENTRIES = 8192
#: Most used GPT entries listed (and looked into); more are a named problem.
MAX_GPT_PARTITIONS = 128
GPT_ENTRY = Layout(
    "<",
    "gpt partition entry",
    ("type_guid", "16s"),  # all zero: an unused entry
    ("unique_guid", "16s"),
    ("first_lba", "Q"),
    ("last_lba", "Q"),  # inclusive
    ("attributes", "Q"),
    ("name", "72s"),  # UTF-16LE, NUL-padded
)
#: Names of the common MBR type bytes, as ``sfdisk --label dos -T`` prints them.
MBR_TYPE_NAMES = {
    0x01: "FAT12", 0x04: "FAT16 <32M", 0x05: "Extended", 0x06: "FAT16", 0x07: "HPFS/NTFS/exFAT",
    0x0B: "W95 FAT32", 0x0C: "W95 FAT32 (LBA)", 0x0E: "W95 FAT16 (LBA)", 0x0F: "W95 Ext'd (LBA)",
    0x27: "Hidden NTFS WinRE", 0x82: "Linux swap / Solaris", 0x83: "Linux", 0x85: "Linux extended",
    0x8E: "Linux LVM", 0xA5: "FreeBSD", 0xA6: "OpenBSD", 0xA9: "NetBSD", 0xAF: "HFS / HFS+",
    0xEA: "Linux extended boot", 0xEE: "GPT", 0xEF: "EFI (FAT-12/16/32)", 0xFB: "VMware VMFS",
    0xFD: "Linux raid autodetect",
}
#: Names of the common GPT partition type GUIDs, as ``sfdisk --label gpt -T`` prints them.
GPT_TYPE_NAMES = {
    "C12A7328-F81F-11D2-BA4B-00A0C93EC93B": "EFI System",
    "21686148-6449-6E6F-744E-656564454649": "BIOS boot",
    "E3C9E316-0B5C-4DB8-817D-F92DF00215AE": "Microsoft reserved",
    "EBD0A0A2-B9E5-4433-87C0-68B6B72699C7": "Microsoft basic data",
    "5808C8AA-7E8F-42E0-85D2-E1E90434CFB3": "Microsoft LDM metadata",
    "AF9B60A0-1431-4F62-BC68-3311714A69AD": "Microsoft LDM data",
    "DE94BBA4-06D1-4D40-A16A-BFD50179D6AC": "Windows recovery environment",
    "E75CAF8F-F680-4CEE-AFA3-B001E56EFC2D": "Microsoft Storage Spaces",
    "0657FD6D-A4AB-43C4-84E5-0933C84B4F4F": "Linux swap",
    "0FC63DAF-8483-4772-8E79-3D69D8477DE4": "Linux filesystem",
    "3B8F8425-20E0-4F3B-907F-1A25A76F98E8": "Linux server data",
    "44479540-F297-41B2-9AF7-D131D5F0458A": "Linux root (x86)",
    "4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709": "Linux root (x86-64)",
    "B921B045-1DF0-41C3-AF44-4C6F280D3FAE": "Linux root (ARM-64)",
    "8DA63339-0007-60C0-C436-083AC8230908": "Linux reserved",
    "933AC7E1-2EB4-4F13-B844-0E14E2AEF915": "Linux home",
    "A19D880F-05FC-4D3B-A006-743F0F84911E": "Linux RAID",
    "E6D6D379-F507-44C2-A23C-238F2A3DF928": "Linux LVM",
    "4D21B016-B534-45C2-A9FB-5C16E091FD2D": "Linux variable data",
    "8484680C-9521-48C6-9C11-B0720656F69E": "Linux /usr (x86-64)",
    "BC13C2FF-59E6-4262-A352-B275FD6F7172": "Linux extended boot",
    "48465300-0000-11AA-AA11-00306543ECAC": "Apple HFS/HFS+",
    "7C3457EF-0000-11AA-AA11-00306543ECAC": "Apple APFS",
    "516E7CB6-6ECF-11D6-8FF8-00022D09712B": "FreeBSD UFS",
    "6A898CC3-1DD2-11B2-99A6-080020736631": "Solaris /usr & Apple ZFS",
    "AA31E02A-400F-11DB-9590-000C2911D1B8": "VMware VMFS",
}


class Partition(NamedTuple):
    """One partition of a guest disk's table, as the kernel numbers it."""

    number: int  # as Linux names it (sda1): MBR 1-4 the primary slots, 5 and up the logical ones; GPT the entry's
    start: int  # bytes from the start of the disk
    size: int  # bytes
    type: str  # MBR: the type byte in hex as sfdisk prints it ("83"); GPT: the type GUID
    type_name: str | None = None
    uuid: str | None = None  # GPT: the partition's own GUID
    name: str | None = None  # GPT: its name
    bootable: bool = False  # MBR: status 0x80
    attributes: int = 0  # GPT: the attribute bits
    extended: bool = False  # MBR: an extended partition, which holds the chain of logical ones


class Problem(NamedTuple):
    """Something wrong in what the guest disk holds: ``code`` names the rule."""

    code: str
    message: str


class PartitionTable(NamedTuple):
    """A guest disk's partition table: ``scheme`` is ``mbr``, ``gpt``, or ``pmbr``
    (a protective MBR with no valid GPT behind it); ``uuid`` the disk's id."""

    scheme: str
    uuid: str | None
    sector_size: int
    partitions: tuple[Partition, ...]
    problems: tuple[Problem, ...] = ()


def mbr_entries(sector: bytes | memoryview) -> list[Any] | None:
    """The four primary entries of an MBR in ``sector``, None when it is no MBR:
    no 0x55AA signature, or a status byte other than 0x00 and 0x80 (the
    kernel's and libblkid's rule)."""
    if len(sector) < 512 or sector[510:512] != BOOT_SIGNATURE:
        return None
    entries = [MBR_ENTRY.unpack(sector, MBR_ENTRIES_OFFSET + i * MBR_ENTRY.size) for i in range(4)]
    if any(e.status not in (0x00, 0x80) for e in entries):
        return None
    return entries


def gpt_header(raw: bytes | memoryview, sector: int) -> Any | None:
    """The GPT header at the start of ``raw`` (one sector of ``sector`` bytes),
    None unless its signature, size and CRC are right."""
    if raw[:8] != GPT_SIGNATURE or len(raw) < GPT_HEADER.size:
        return None
    hdr = GPT_HEADER.unpack(raw)
    if not GPT_HEADER.size <= hdr.header_size <= min(sector, len(raw)):
        return None
    checked = bytearray(raw[: hdr.header_size])
    checked[16:20] = bytes(4)
    return hdr if zlib.crc32(checked) == hdr.header_crc32 else None


def partition_details(head: bytes) -> dict[str, Any]:
    """``partition-table`` (and ``partitions`` when countable) for an MBR or GPT
    at the start of ``head``; empty when there is none."""
    entries = mbr_entries(head)
    if entries is None:
        return {}
    if any(e.type == GPT_PROTECTIVE for e in entries):
        return {"partition-table": "gpt", **_gpt_partitions(head)}
    return {"partition-table": "mbr", "partitions": sum(e.sectors != 0 for e in entries)}


def _gpt_partitions(head: bytes) -> dict[str, int]:
    """``partitions``: used entries of the GPT entry array, if header and array
    are in ``head`` and their CRCs match; empty otherwise."""
    for sector in GPT_SECTOR_SIZES:
        if head[sector : sector + 8] != GPT_SIGNATURE:
            continue
        hdr = gpt_header(head[sector : sector + sector], sector)
        if hdr is None:
            return {}
        start, length = hdr.entries_lba * sector, hdr.entry_count * hdr.entry_size
        if hdr.entry_size < 128 or start + length > len(head):
            return {}
        array = head[start : start + length]
        if zlib.crc32(array) != hdr.entries_crc32:
            return {}
        used = sum(
            any(array[i : i + 16]) for i in range(0, length, hdr.entry_size)
        )  # a zero type GUID = unused
        return {"partitions": used}
    return {}


# ---- a guest disk's table, read whole ----------------------------------------

#: Reads ``length`` bytes at ``offset`` of the guest disk (fewer at its end).
Reader = Callable[[int, int], bytes]


def read_partition_table(read: Reader, size: int, *, whole_disk_filesystem: bool = False) -> PartitionTable | None:
    """The partition table of a guest disk of ``size`` bytes, None when it has
    none. ``whole_disk_filesystem``: a FAT, exFAT or NTFS boot sector fills the
    first sector, whose 0x55AA is then no MBR's (libblkid's rule)."""
    first = read(0, 512)
    entries = mbr_entries(first)
    if entries is not None and any(e.type == GPT_PROTECTIVE for e in entries):
        return _read_gpt(read, size)
    if entries is None or whole_disk_filesystem:
        return None
    return _read_mbr(read, size, first, entries)


def _read_mbr(read: Reader, size: int, first: bytes, entries: list[Any]) -> PartitionTable:
    sector = 512
    problems: list[Problem] = []
    parts = [
        Partition(i + 1, e.lba_first * sector, e.sectors * sector, f"{e.type:x}", MBR_TYPE_NAMES.get(e.type),
                  bootable=e.status == 0x80, extended=e.type in MBR_EXTENDED)
        for i, e in enumerate(entries)
        if e.sectors
    ]
    extended = [p for p in parts if p.extended]
    if len(extended) > 1:
        problems.append(Problem("guest.mbr-extended", f"{len(extended)} extended partitions; the first is followed"))
    if extended:
        parts += _logical_partitions(read, extended[0], problems)
    disk_id = int.from_bytes(first[440:444], "little")
    table = PartitionTable("mbr", f"0x{disk_id:08x}" if disk_id else None, sector, tuple(parts))
    return table._replace(problems=tuple(problems + _placement_problems(table, size)))


def _logical_partitions(read: Reader, extended: Partition, problems: list[Problem]) -> list[Partition]:
    """The logical partitions down the chain of extended boot records (EBRs)
    in ``extended``: each EBR's data entry is relative to that EBR, its link
    to the next EBR relative to the extended partition. A link that does not
    move forward (a loop) or leaves the extended partition ends the chain, as
    do :data:`MAX_LOGICAL` partitions."""
    sector = 512
    found: list[Partition] = []
    ebr, ebr_size = extended.start, extended.size
    end = extended.start + extended.size
    while True:
        entries = mbr_entries(read(ebr, 512))
        if entries is None:
            if ebr != extended.start or found:
                problems.append(Problem("guest.mbr-ebr", f"no extended boot record at byte {ebr}"))
            return found
        for slot, e in enumerate(entries):
            start, length = ebr + e.lba_first * sector, e.sectors * sector
            if not e.sectors or e.type in MBR_EXTENDED:
                continue
            beyond_link = slot >= 2 and e.lba_first * sector + length > ebr_size  # slots 3, 4: checked closer
            if start < extended.start or start + length > end or beyond_link:
                problems.append(Problem(
                    "guest.mbr-logical-outside",
                    f"logical partition at byte {start} ({length} bytes) lies outside its extended partition",
                ))
                continue
            if len(found) == MAX_LOGICAL:
                problems.append(Problem("guest.mbr-chain-length", f"more than {MAX_LOGICAL} logical partitions"))
                return found
            found.append(Partition(5 + len(found), start, length, f"{e.type:x}", MBR_TYPE_NAMES.get(e.type),
                                   bootable=e.status == 0x80))
        link = next((e for e in entries if e.sectors and e.type in MBR_EXTENDED and e.lba_first), None)
        if link is None:
            return found
        following = extended.start + link.lba_first * sector
        if following + link.sectors * sector > end:
            problems.append(Problem("guest.mbr-chain-outside", f"extended boot record at byte {following} lies "
                                    "outside the extended partition"))
            return found
        if following <= ebr:
            problems.append(Problem("guest.mbr-chain-loop", f"the extended boot record at byte {ebr} links back "
                                    f"to byte {following}"))
            return found
        ebr, ebr_size = following, link.sectors * sector


def _read_gpt(read: Reader, size: int) -> PartitionTable:
    """The GPT behind a protective MBR: the primary header at LBA 1, else the
    backup at the disk's last LBA (checked as libblkid checks them); 512-byte
    sectors, then 4096-byte ones."""
    problems: list[Problem] = []
    for sector in GPT_SECTOR_SIZES:
        last_lba = size // sector - 1
        for lba in (1, last_lba):
            if lba < 1:
                continue
            found = _gpt_at(read, sector, lba, last_lba)
            if isinstance(found, tuple):
                if lba != 1:
                    problems.append(Problem("guest.gpt-primary", "the primary GPT header is invalid; read the backup"))
                return _gpt_table(*found, sector, problems, size)
            if found is not None:
                problems.append(Problem("guest.gpt-header", f"{found} (LBA {lba} of {sector}-byte sectors)"))
    problems.append(Problem("guest.gpt-missing", "a protective MBR with no valid GPT header behind it"))
    return PartitionTable("pmbr", None, 512, (), tuple(problems))


def _gpt_at(read: Reader, sector: int, lba: int, last_lba: int) -> tuple[Any, bytes] | str | None:
    """The valid GPT header at ``lba`` and its entry array; else why not (None:
    no header there at all)."""
    raw = read(lba * sector, sector)
    if raw[:8] != GPT_SIGNATURE:
        return None
    hdr = gpt_header(raw, sector)
    if hdr is None:
        return "the GPT header's size or CRC is wrong"
    if hdr.my_lba != lba:
        return f"the GPT header at LBA {lba} says it is at LBA {hdr.my_lba}"
    first, last = hdr.first_usable_lba, hdr.last_usable_lba
    if last < first or last > last_lba:
        return f"usable LBAs {first}..{last} do not fit the disk's {last_lba + 1} sectors"
    if first < lba < last:
        return "the GPT header lies inside its own usable area"
    if hdr.entry_size != GPT_ENTRY.size or not 0 < hdr.entry_count <= MAX_GPT_ENTRIES:
        return (f"{hdr.entry_count} entries of {hdr.entry_size} bytes (read: up to {MAX_GPT_ENTRIES} of "
                f"{GPT_ENTRY.size})")
    array = read(hdr.entries_lba * sector, hdr.entry_count * hdr.entry_size)
    if len(array) != hdr.entry_count * hdr.entry_size or zlib.crc32(array) != hdr.entries_crc32:
        return "the GPT entry array's CRC is wrong"
    return hdr, array


def _gpt_table(hdr: Any, array: bytes, sector: int, problems: list[Problem], size: int) -> PartitionTable:
    parts: list[Partition] = []
    outside: list[str] = []  # entries skipped for lying outside the usable LBAs
    for i in range(hdr.entry_count):
        e = GPT_ENTRY.unpack(array, i * GPT_ENTRY.size)
        if not any(e.type_guid):
            continue
        if e.first_lba < hdr.first_usable_lba or e.last_lba > hdr.last_usable_lba or e.last_lba < e.first_lba:
            outside.append(f"entry {i + 1} (LBAs {e.first_lba}..{e.last_lba})")
            continue
        if len(parts) == MAX_GPT_PARTITIONS:
            problems.append(Problem("guest.gpt-partitions", f"more than {MAX_GPT_PARTITIONS} used entries; "
                                    f"the first {MAX_GPT_PARTITIONS} are listed"))
            break
        kind = guid_text(e.type_guid)
        name = e.name.decode("utf-16-le", "replace").split("\0", 1)[0]
        parts.append(Partition(
            i + 1, e.first_lba * sector, (e.last_lba - e.first_lba + 1) * sector, kind, GPT_TYPE_NAMES.get(kind),
            uuid=guid_text(e.unique_guid), name=name or None, attributes=e.attributes,
        ))
    if outside:
        listed = ", ".join(outside[:4]) + (f" and {len(outside) - 4} more" if len(outside) > 4 else "")
        problems.append(Problem(
            "guest.gpt-entry-outside",
            f"{listed} lie outside the usable LBAs {hdr.first_usable_lba}..{hdr.last_usable_lba}; not listed",
        ))
    table = PartitionTable("gpt", guid_text(hdr.disk_guid), sector, tuple(parts))
    return table._replace(problems=tuple(problems + _placement_problems(table, size)))


def guid_text(raw: bytes) -> str:
    """A GUID as GPT stores it (the first three fields little-endian), in upper case as sfdisk prints it."""
    b = bytes(raw)  # not uuid.UUID(bytes_le=...): importing uuid costs a scan's start-up 5 ms (it imports platform)
    h = (b[3::-1] + b[5:3:-1] + b[7:5:-1] + b[8:16]).hex().upper()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def _placement_problems(table: PartitionTable, size: int) -> list[Problem]:
    """Partitions that run past the disk's end or overlap another (an extended
    partition holds its logical ones: not an overlap)."""
    problems = []
    for p in table.partitions:
        if p.start + p.size > size:
            problems.append(Problem("guest.partition-past-end", f"partition {p.number} ends at byte "
                                    f"{p.start + p.size}, past the disk's {size}"))
    spans = sorted((p for p in table.partitions if not p.extended), key=lambda p: p.start)
    reach: Partition | None = None  # of those before, the one that ends last
    for p in spans:
        if reach is not None and p.start < reach.start + reach.size:
            problems.append(Problem("guest.partition-overlap", f"partitions {reach.number} and {p.number} overlap"))
        if reach is None or p.start + p.size > reach.start + reach.size:
            reach = p
    return problems
