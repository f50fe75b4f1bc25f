"""vhdx: Hyper-V virtual hard disk v2 (little-endian; "VHDX Format
Specification" v1.0, QEMU block/vhdx.c).

Layout: the file identifier ``vhdxfile`` at 0; two headers at 64 and 128 KiB
(CRC-32C over 4 KiB; the valid one with the higher sequence number is
current); the region table at 192 KiB (copy at 256 KiB) pointing at the block
allocation table (BAT) and the metadata region, whose table names the items
read here: file parameters (block size, has-parent), virtual disk size,
logical and physical sector size, page 83 data, and a differencing disk's
parent locator.

storprobe differs from QEMU 7.2 where the spec is clear and QEMU lags:
4096-byte logical sectors are accepted (QEMU 7.2 refuses them; later QEMU
reads them with the same virtual size), and a differencing disk is probed with
its parent reported as the backing file (QEMU refuses to open it). It is also
stricter than QEMU where the spec says so: no region inside the first MiB,
the log and every region inside the file, metadata items inside their region,
and a virtual size that is a whole number of logical sectors.

A header with a non-zero log GUID has a log that may need replaying. The log is
searched as QEMU searches it (its entries are never applied): a valid entry
means QEMU refuses the image read-only and replays the log, rewriting the file,
when it opens it read-write; the details say so and ``check`` flags it. A log
entry QEMU's search fails on, or a search that never ends, is an error.

The data path and ``verify`` read the BAT as QEMU 7.2's block/vhdx.c does
(vhdx_block_translate, vhdx_co_preadv, vhdx_check_bat_entries). QEMU has no
block status for VHDX, so ``map`` says what its block layer says: the whole
disk is data, with no offset. A block reads as zeros unless its BAT entry is
fully present (state 6: its bytes at the entry's offset); partially present
(7, a differencing disk's) and state 4 are QEMU's I/O errors, a named error
here. An image whose log needs replaying is refused (QEMU refuses it
read-only), and so is a differencing disk (QEMU opens none). The BAT is read
in 64 KiB pieces through the bounded cache.
"""

import struct
import sys
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, NamedTuple

from storprobe import Backing, Features, FormatSpec, Hazard, Image, ImageInfo, InvalidHeader, Layout, hookimpl
from storprobe.layout import Header

if TYPE_CHECKING:  # the data path loads when first used, not for a probe
    from storprobe.blockmap import Extent, HostFile
    from storprobe.verify import CheckReader, CheckResult

KiB, MiB, TiB = 1024, 1024 * 1024, 1024**4

FILE_IDENTIFIER = Layout("<", "vhdx file identifier", ("signature", "8s"), ("creator", "512s"))
HEADER = Layout(
    "<",
    "vhdx header",
    ("signature", "4s"),
    ("checksum", "I"),
    ("sequence_number", "Q"),
    ("file_write_guid", "16s"),
    ("data_write_guid", "16s"),
    ("log_guid", "16s"),
    ("log_version", "H"),
    ("version", "H"),
    ("log_length", "I"),
    ("log_offset", "Q"),
)
REGION_TABLE_HEADER = Layout(
    "<", "vhdx region table header", ("signature", "4s"), ("checksum", "I"), ("entry_count", "I"), (None, "4x")
)
REGION_ENTRY = Layout(
    "<", "vhdx region table entry", ("guid", "16s"), ("file_offset", "Q"), ("length", "I"), ("flags", "I")
)
METADATA_TABLE_HEADER = Layout(
    "<", "vhdx metadata table header", ("signature", "8s"), (None, "2x"), ("entry_count", "H"), (None, "20x")
)
METADATA_ENTRY = Layout(
    "<",
    "vhdx metadata table entry",
    ("item_id", "16s"),
    ("offset", "I"),
    ("length", "I"),
    ("flags", "I"),
    (None, "4x"),
)
LOG_ENTRY_HEADER = Layout(
    "<",
    "vhdx log entry header",
    ("signature", "4s"),
    ("checksum", "I"),
    ("entry_length", "I"),
    ("tail", "I"),
    ("sequence_number", "Q"),
    ("descriptor_count", "I"),
    (None, "4x"),
    ("log_guid", "16s"),
    ("flushed_file_offset", "Q"),
    ("last_file_offset", "Q"),
)
LOG_DESCRIPTOR = Layout(
    "<",
    "vhdx log descriptor",
    ("signature", "4s"),
    (None, "4x"),  # a data descriptor's trailing bytes
    ("zero_length", "Q"),  # a data descriptor's leading bytes
    ("file_offset", "Q"),
    ("sequence_number", "Q"),
)
FILE_PARAMETERS = Layout("<", "vhdx file parameters", ("block_size", "I"), ("flags", "I"))
PARENT_LOCATOR_HEADER = Layout(
    "<", "vhdx parent locator header", ("locator_type", "16s"), (None, "2x"), ("key_value_count", "H")
)
PARENT_LOCATOR_ENTRY = Layout(
    "<",
    "vhdx parent locator entry",
    ("key_offset", "I"),
    ("value_offset", "I"),
    ("key_length", "H"),
    ("value_length", "H"),
)

HEADER_SECTION = 1 * MiB  # file identifier, both headers and both region tables
HEADER_OFFSETS = (64 * KiB, 128 * KiB)
HEADER_CHECKED_SIZE = 4 * KiB  # a header's CRC covers its first 4 KiB
REGION_TABLE_OFFSET, REGION_TABLE_COPY_OFFSET, REGION_TABLE_SIZE = 192 * KiB, 256 * KiB, 64 * KiB
CHECKSUM_OFFSET = 4  # in headers and region tables alike
MAX_TABLE_ENTRIES = 2047  # region and metadata tables alike
METADATA_TABLE_SIZE = 64 * KiB
MAX_METADATA_ITEM = 1 * MiB
LOG_ALIGNMENT = 1 * MiB
LOG_SECTOR = 4 * KiB
#: Largest log searched for entries (qemu-img and Hyper-V make 1 MiB logs); a larger
#: one with a non-zero log GUID is reported unsearched, and flagged.
LOG_SCAN_LIMIT = 8 * MiB
MIN_BLOCK_SIZE, MAX_BLOCK_SIZE = 1 * MiB, 256 * MiB
MAX_VIRTUAL_SIZE = 64 * TiB
LOGICAL_SECTOR_SIZES = (512, 4096)
MAX_SECTORS_PER_BLOCK = 1 << 23  # fixes how many payload blocks share a sector bitmap block
REGION_REQUIRED = 1
METADATA_REQUIRED = 4
PARAMS_LEAVE_BLOCKS_ALLOCATED, PARAMS_HAS_PARENT = 1, 2
PAYLOAD_BLOCK_FULLY_PRESENT = 6
BAT_STATE_MASK = 7
BAT_OFFSET_MASK = ~(MiB - 1) & 0xFFFFFFFFFFFFFFFF
#: Largest part of the BAT read to find blocks past the end of the file; a larger one is not checked.
BAT_SCAN_LIMIT = 4 * MiB
#: Parent locator keys holding a path, in the order storprobe prefers for the backing name.
PARENT_PATH_KEYS = ("relative_path", "absolute_win32_path", "volume_path")


def guid(text: str) -> bytes:
    """A GUID as the spec writes it, in its on-disk (mixed-endian) byte order
    (``uuid.UUID(text).bytes_le``, without importing uuid and platform)."""
    return _swap_fields(bytes.fromhex(text.replace("-", "")))


def guid_text(raw: bytes) -> str:
    """The text form of an on-disk GUID, as ``str(uuid.UUID(bytes_le=raw))``."""
    h = _swap_fields(raw).hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def _swap_fields(raw: bytes) -> bytes:
    """Big-endian <-> little-endian first three GUID fields (its own inverse)."""
    return raw[3::-1] + raw[5:3:-1] + raw[7:5:-1] + raw[8:]


BAT_REGION = guid("2DC27766-F623-4200-9D64-115E9BFD4A08")
METADATA_REGION = guid("8B7CA206-4790-4B9A-B8FE-575F050F886E")
FILE_PARAMETERS_ITEM = guid("CAA16737-FA36-4D43-B3B6-33F0AA44E76B")
VIRTUAL_DISK_SIZE_ITEM = guid("2FA54224-CD1B-4876-B211-5DBED83BF4B8")
PAGE_83_ITEM = guid("BECA12AB-B2E6-4523-93EF-C309E000C746")
LOGICAL_SECTOR_SIZE_ITEM = guid("8141BF1D-A96F-4709-BA47-F233A8FAAB5F")
PHYSICAL_SECTOR_SIZE_ITEM = guid("CDA348C7-445D-4471-9CC9-E9885251C556")
PARENT_LOCATOR_ITEM = guid("A8D35F2D-B30B-454D-ABF7-D3D84834AB0C")
VHDX_PARENT_LOCATOR = guid("B04AEFB7-D19E-4A81-B789-25B8E9445913")
#: Known metadata items: (on-disk GUID, name, bytes storprobe reads from it).
METADATA_ITEMS = {
    FILE_PARAMETERS_ITEM: ("file parameters", FILE_PARAMETERS.size),
    VIRTUAL_DISK_SIZE_ITEM: ("virtual disk size", 8),
    PAGE_83_ITEM: ("page 83 data", 16),
    LOGICAL_SECTOR_SIZE_ITEM: ("logical sector size", 4),
    PHYSICAL_SECTOR_SIZE_ITEM: ("physical sector size", 4),
    PARENT_LOCATOR_ITEM: ("parent locator", PARENT_LOCATOR_HEADER.size),
}
REQUIRED_ITEMS = frozenset(METADATA_ITEMS) - {PARENT_LOCATOR_ITEM}


def crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli) by google-crc32c's C code: the 136 KiB a probe checks
    take microseconds (a pure-Python loop took 4 ms). Imported when first needed,
    so start-up does not pay for it."""
    from google_crc32c import value

    return value(data)


def checksum_ok(block: bytes) -> bool:
    """Whether the CRC-32C stored at CHECKSUM_OFFSET matches the block with that field zeroed."""
    stored = int.from_bytes(block[CHECKSUM_OFFSET : CHECKSUM_OFFSET + 4], "little")
    return crc32c(block[:CHECKSUM_OFFSET] + bytes(4) + block[CHECKSUM_OFFSET + 4 :]) == stored


class Item(NamedTuple):
    """A metadata item: absolute file offset and length."""

    offset: int
    length: int


class Vhdx(NamedTuple):
    """What the header section and metadata say."""

    creator: str
    header: Any
    log_entries: int | None  # entries of the log sequence QEMU would replay; None: not searched
    regions: tuple[tuple[int, int], ...]  # (start, end) of the log and every region, for overlap checks
    bat_offset: int
    bat_length: int
    block_size: int
    flags: int
    virtual_size: int
    logical_sector_size: int
    physical_sector_size: int
    parent_locator: Item | None


def current_header(img: Image) -> Header:
    """The valid header with the higher sequence number (QEMU's choice)."""
    valid = []
    for offset in HEADER_OFFSETS:
        block = img.read(offset, HEADER_CHECKED_SIZE)
        hdr = HEADER.unpack(block)
        if hdr.signature == b"head" and hdr.version == 1 and checksum_ok(block):
            valid.append((hdr, block[: HEADER.size]))
    if not valid:
        raise InvalidHeader("neither VHDX header is valid", code="vhdx.no-valid-header")
    if len(valid) == 2 and valid[0][0].sequence_number == valid[1][0].sequence_number:
        if valid[0][1] != valid[1][1]:
            raise InvalidHeader(
                "both VHDX headers are valid with the same sequence number but differ",
                code="vhdx.header-conflict",
            )
        return valid[0][0]
    return max(valid, key=lambda pair: pair[0].sequence_number)[0]


def check_log(img: Image, hdr: Header) -> None:
    if hdr.log_offset < LOG_ALIGNMENT or hdr.log_offset % LOG_ALIGNMENT:
        raise InvalidHeader(f"log offset {hdr.log_offset} is not a non-zero multiple of 1 MiB", code="vhdx.log-offset")
    if hdr.log_version != 0:
        raise InvalidHeader(f"log version {hdr.log_version} is not 0", code="vhdx.log-version")
    if hdr.log_guid != bytes(16) and hdr.log_length % LOG_ALIGNMENT:
        raise InvalidHeader(f"log length {hdr.log_length} is not a multiple of 1 MiB", code="vhdx.log-length")
    if hdr.log_offset + hdr.log_length > img.size:
        raise InvalidHeader("the log runs past the end of the file", code="vhdx.log-beyond-file")


def log_entries(img: Image, hdr: Header) -> int | None:
    """How many entries the log sequence QEMU would replay holds (0: none, so
    QEMU opens the image as it is); None when the log is too large to search.
    A log GUID of zero or a log of length zero is no log to QEMU."""
    if hdr.log_guid == bytes(16) or hdr.log_length == 0:
        return 0
    if hdr.log_length > LOG_SCAN_LIMIT:
        return None
    return LogSearch(img.read(hdr.log_offset, hdr.log_length), hdr.log_guid).active_entries()


class LogSearch:
    """QEMU's search of a log for its active sequence (vhdx_log_search): a walk
    around the circular log of 4 KiB sectors, from sector 0 until the read
    position wraps below where an attempt started. An attempt at a sector
    whose entry header is invalid moves on one sector; one that reads an
    entry moves past what it read. A sequence is an entry valid from its
    header to its checksum, and the valid entries after it, each (from the
    third) numbered one past the one before; the sequence whose first entry
    has the highest number is the one QEMU replays."""

    def __init__(self, log: bytes, log_guid: bytes) -> None:
        self.log = log
        self.log_guid = log_guid
        self.read = 0

    def active_entries(self) -> int:
        best: tuple[int, int] | None = None  # (first sequence number, entries)
        while True:
            tail = self.read
            first = self.entry(0)
            if first is not None:
                entries, number = 1, 0
                while (entry := self.entry(number)) is not None:
                    entries, number = entries + 1, entry.sequence_number
                if best is None or first.sequence_number > best[0]:
                    best = (first.sequence_number, entries)
            if self.read < tail:
                return best[1] if best else 0
            if self.read == tail:  # the same walk again, for ever (QEMU 7.2 hangs here)
                raise InvalidHeader(
                    f"QEMU's search of the log never ends: an attempt at {tail} reads the whole log",
                    code="vhdx.log-loop",
                )

    def entry(self, previous: int) -> Header | None:
        """The entry header at the read position when the entry is valid (and,
        if ``previous``, numbered ``previous`` + 1), moving the position on."""
        hdr = LOG_ENTRY_HEADER.unpack(self.log, self.read)
        if not self.header_valid(hdr) or (previous and hdr.sequence_number != previous + 1):
            self.read = (self.read + LOG_SECTOR) % len(self.log)
            return None
        descriptor_sectors = -(-(hdr.descriptor_count + 2) // (LOG_SECTOR // LOG_DESCRIPTOR.size))
        entry = self.take(max(descriptor_sectors, hdr.entry_length // LOG_SECTOR) * LOG_SECTOR)
        for index in range(hdr.descriptor_count):
            desc = LOG_DESCRIPTOR.unpack(entry, LOG_ENTRY_HEADER.size + index * LOG_DESCRIPTOR.size)
            if not descriptor_valid(desc, hdr.sequence_number):
                raise InvalidHeader(
                    f"log entry {hdr.sequence_number} has an invalid descriptor {index} (QEMU cannot open the image)",
                    code="vhdx.log-descriptor",
                )
        return hdr if checksum_ok(entry) else None

    def header_valid(self, hdr: Header) -> bool:
        """QEMU's vhdx_log_hdr_is_valid."""
        return (
            hdr.signature == b"loge"
            and hdr.entry_length <= len(self.log)
            and hdr.entry_length % LOG_SECTOR == 0
            and hdr.sequence_number != 0
            and hdr.log_guid == self.log_guid
            and hdr.descriptor_count * LOG_DESCRIPTOR.size <= hdr.entry_length
        )

    def take(self, length: int) -> bytes:
        """``length`` bytes from the read position, around the end of the log, moving the position on."""
        data = b""
        while len(data) < length:
            part = self.log[self.read : self.read + length - len(data)]
            data += part
            self.read = (self.read + len(part)) % len(self.log)
        return data


def descriptor_valid(desc: Header, sequence_number: int) -> bool:
    """QEMU's vhdx_log_desc_is_valid: a zero or data descriptor of the entry's number at a 4 KiB offset."""
    if desc.sequence_number != sequence_number or desc.file_offset % LOG_SECTOR:
        return False
    return desc.signature == b"desc" or (desc.signature == b"zero" and desc.zero_length % LOG_SECTOR == 0)


def overlapping(start: int, end: int, taken: list[tuple[int, int]]) -> bool:
    return any(start < used_end and used_start < end for used_start, used_end in taken)


def _region_table_bytes(img: Image) -> bytes:
    """The region table, read once per probe (parsed here, compared with its copy in features)."""
    return img.memo(_region_table_bytes, lambda img: img.read(REGION_TABLE_OFFSET, REGION_TABLE_SIZE))


def region_table(img: Image, taken: list[tuple[int, int]]) -> tuple[Any, Any]:
    """The BAT and metadata region entries; ``taken`` gains every region."""
    table = _region_table_bytes(img)
    if not checksum_ok(table):
        raise InvalidHeader("region table checksum is incorrect", code="vhdx.region-checksum")
    head = REGION_TABLE_HEADER.unpack(table)
    if head.signature != b"regi":
        raise InvalidHeader("region table lacks its regi signature", code="vhdx.region-signature")
    if head.entry_count > MAX_TABLE_ENTRIES:
        raise InvalidHeader(f"{head.entry_count} region table entries exceed 2047", code="vhdx.region-count")
    found: dict[bytes, Any] = {}
    for index in range(head.entry_count):
        entry = REGION_ENTRY.unpack(table, REGION_TABLE_HEADER.size + index * REGION_ENTRY.size)
        start, end = entry.file_offset, entry.file_offset + entry.length
        if overlapping(start, end, taken):
            raise InvalidHeader(f"region at {start} overlaps another region", code="vhdx.region-overlap")
        if end > img.size:
            raise InvalidHeader(f"region at {start} runs past the end of the file", code="vhdx.region-beyond-file")
        taken.append((start, end))
        if entry.guid in (BAT_REGION, METADATA_REGION):
            if entry.guid in found:
                raise InvalidHeader("region table lists a region twice", code="vhdx.region-duplicate")
            found[entry.guid] = entry
        elif entry.flags & REGION_REQUIRED:
            raise InvalidHeader(
                f"unknown required region {guid_text(entry.guid)}", code="vhdx.region-required"
            )
    if len(found) != 2:
        raise InvalidHeader("region table lacks the BAT or the metadata region", code="vhdx.region-missing")
    return found[BAT_REGION], found[METADATA_REGION]


def metadata_items(img: Image, region: Header) -> dict[bytes, Item]:
    """The known items of the metadata table, each checked to lie in the region."""
    table = img.read(region.file_offset, METADATA_TABLE_SIZE)
    head = METADATA_TABLE_HEADER.unpack(table)
    if head.signature != b"metadata":
        raise InvalidHeader("metadata table lacks its signature", code="vhdx.metadata-signature")
    if head.entry_count > MAX_TABLE_ENTRIES:
        raise InvalidHeader(f"{head.entry_count} metadata entries exceed 2047", code="vhdx.metadata-count")
    items: dict[bytes, Item] = {}
    for index in range(head.entry_count):
        entry = METADATA_ENTRY.unpack(table, METADATA_TABLE_HEADER.size + index * METADATA_ENTRY.size)
        if entry.item_id not in METADATA_ITEMS:
            if entry.flags & METADATA_REQUIRED:
                raise InvalidHeader(
                    f"unknown required metadata item {guid_text(entry.item_id)}",
                    code="vhdx.metadata-required",
                )
            continue
        name, needed = METADATA_ITEMS[entry.item_id]
        if entry.item_id in items:
            raise InvalidHeader(f"metadata item {name} is listed twice", code="vhdx.metadata-duplicate")
        if (
            entry.length < needed
            or entry.length > MAX_METADATA_ITEM
            or entry.offset < METADATA_TABLE_SIZE
            or entry.offset + entry.length > region.length
        ):
            raise InvalidHeader(
                f"metadata item {name} ({entry.length} bytes at {entry.offset}) does not fit the metadata region",
                code="vhdx.metadata-item-range",
            )
        items[entry.item_id] = Item(region.file_offset + entry.offset, entry.length)
    missing = [METADATA_ITEMS[i][0] for i in METADATA_ITEMS if i in REQUIRED_ITEMS and i not in items]
    if missing:
        raise InvalidHeader(f"metadata lacks {', '.join(missing)}", code="vhdx.metadata-missing")
    return items


def read_uint(img: Image, item: Item, width: int) -> int:
    return int.from_bytes(img.read(item.offset, width), "little")


def parse(img: Image) -> Vhdx:
    """Headers, log fields, region table and metadata, checked in QEMU's order
    (once per probe: the size, features and backing callbacks share it)."""
    return img.memo(parse, _parse)


def _parse(img: Image) -> Vhdx:
    ident = FILE_IDENTIFIER.unpack(img.header)
    hdr = current_header(img)
    check_log(img, hdr)
    entries = log_entries(img, hdr)
    taken = [(0, HEADER_SECTION), (hdr.log_offset, hdr.log_offset + hdr.log_length)]
    bat, metadata = region_table(img, taken)
    items = metadata_items(img, metadata)
    params = FILE_PARAMETERS.unpack(img.read(items[FILE_PARAMETERS_ITEM].offset, FILE_PARAMETERS.size))
    if params.flags & PARAMS_HAS_PARENT and PARENT_LOCATOR_ITEM not in items:
        raise InvalidHeader("differencing disk without a parent locator", code="vhdx.parent-locator-missing")
    virtual_size = read_uint(img, items[VIRTUAL_DISK_SIZE_ITEM], 8)
    logical = read_uint(img, items[LOGICAL_SECTOR_SIZE_ITEM], 4)
    block = params.block_size
    if not MIN_BLOCK_SIZE <= block <= MAX_BLOCK_SIZE or block & (block - 1):
        raise InvalidHeader(f"block size {block} is not a power of two from 1 to 256 MiB", code="vhdx.block-size")
    if logical not in LOGICAL_SECTOR_SIZES:
        raise InvalidHeader(f"logical sector size {logical} is not 512 or 4096", code="vhdx.logical-sector-size")
    if virtual_size > MAX_VIRTUAL_SIZE:
        raise InvalidHeader(f"virtual size {virtual_size} exceeds 64 TiB", code="vhdx.virtual-size")
    if virtual_size % logical:
        raise InvalidHeader(
            f"virtual size {virtual_size} is not a multiple of the {logical}-byte sector",
            code="vhdx.virtual-size-alignment",
        )
    return Vhdx(
        creator=ident.creator.decode("utf-16-le", "replace").split("\0", 1)[0],
        header=hdr,
        log_entries=entries,
        regions=tuple(taken),
        bat_offset=bat.file_offset,
        bat_length=bat.length,
        block_size=block,
        flags=params.flags,
        virtual_size=virtual_size,
        logical_sector_size=logical,
        physical_sector_size=read_uint(img, items[PHYSICAL_SECTOR_SIZE_ITEM], 4),
        parent_locator=items.get(PARENT_LOCATOR_ITEM) if params.flags & PARAMS_HAS_PARENT else None,
    )


def bat_entry_count(vhdx: Vhdx) -> int:
    """Entries the BAT needs (payload blocks interleaved with sector bitmap
    blocks), computed as QEMU does, 32-bit wrap for an empty disk included."""
    chunk_ratio = MAX_SECTORS_PER_BLOCK * vhdx.logical_sector_size // vhdx.block_size
    data_blocks = -(-vhdx.virtual_size // vhdx.block_size)
    if vhdx.parent_locator is not None:
        return -(-data_blocks // chunk_ratio) * (chunk_ratio + 1)
    return data_blocks + (((data_blocks - 1) & 0xFFFFFFFF) // chunk_ratio)


def check_bat(img: Image, vhdx: Vhdx) -> bool:
    """QEMU's BAT checks on open; False when it was too large to scan."""
    from array import array

    count = bat_entry_count(vhdx)
    if count * 8 > vhdx.bat_length:
        raise InvalidHeader(f"BAT region is too small for {count} entries", code="vhdx.bat-too-small")
    if count * 8 > BAT_SCAN_LIMIT:
        return False
    entries = array("Q", img.read(vhdx.bat_offset, count * 8))
    if sys.byteorder == "big":
        entries.byteswap()
    chunk_ratio = MAX_SECTORS_PER_BLOCK * vhdx.logical_sector_size // vhdx.block_size
    regions = list(vhdx.regions)
    for index in (i for i, e in enumerate(entries) if e & BAT_STATE_MASK == PAYLOAD_BLOCK_FULLY_PRESENT):
        offset = entries[index] & BAT_OFFSET_MASK
        remaining = vhdx.virtual_size - index * vhdx.block_size
        length = min(vhdx.block_size, remaining) if remaining >= 0 else vhdx.block_size
        if offset >= img.size or offset + length > img.size:
            raise InvalidHeader(
                f"BAT entry {index} points past the end of the file (the image is truncated)",
                code="vhdx.truncated",
            )
        is_payload = (index + 1) % (chunk_ratio + 1) != 0
        if is_payload and overlapping(offset, offset + vhdx.block_size, regions):
            raise InvalidHeader(f"payload block {index} overlaps a region or the log", code="vhdx.block-overlap")
    return True


def parent_locator(img: Image, item: Item) -> tuple[bytes, dict[str, str]]:
    """The locator type and its key/value pairs (UTF-16LE strings)."""
    data = img.read(item.offset, item.length)
    head = PARENT_LOCATOR_HEADER.unpack(data)
    table_end = PARENT_LOCATOR_HEADER.size + head.key_value_count * PARENT_LOCATOR_ENTRY.size
    if table_end > item.length:
        raise InvalidHeader(
            f"parent locator lists {head.key_value_count} entries, more than its item holds",
            code="vhdx.parent-locator",
        )
    pairs: dict[str, str] = {}
    for index in range(head.key_value_count):
        entry = PARENT_LOCATOR_ENTRY.unpack(data, PARENT_LOCATOR_HEADER.size + index * PARENT_LOCATOR_ENTRY.size)
        if (
            entry.key_offset + entry.key_length > item.length
            or entry.value_offset + entry.value_length > item.length
        ):
            raise InvalidHeader(f"parent locator entry {index} lies outside its item", code="vhdx.parent-locator")
        key = data[entry.key_offset : entry.key_offset + entry.key_length].decode("utf-16-le", "replace")
        pairs[key] = data[entry.value_offset : entry.value_offset + entry.value_length].decode("utf-16-le", "replace")
    return head.locator_type, pairs


def size(img: Image) -> int:
    return parse(img).virtual_size


def features(img: Image) -> Features:
    vhdx = parse(img)
    details: dict[str, object] = {
        "creator": vhdx.creator,
        "subformat": "fixed" if vhdx.flags & PARAMS_LEAVE_BLOCKS_ALLOCATED else "dynamic",
        "logical-sector-size": vhdx.logical_sector_size,
        "physical-sector-size": vhdx.physical_sector_size,
    }
    if vhdx.header.log_guid != bytes(16):
        details["log"] = {
            "guid": guid_text(vhdx.header.log_guid),
            "offset": vhdx.header.log_offset,
            "length": vhdx.header.log_length,
            "entries": "not searched" if vhdx.log_entries is None else vhdx.log_entries,
            "replay-pending": vhdx.log_entries != 0,
        }
    if not check_bat(img, vhdx):
        details["bat-not-scanned"] = f"larger than {BAT_SCAN_LIMIT} bytes"
    if img.read(REGION_TABLE_COPY_OFFSET, REGION_TABLE_SIZE) != _region_table_bytes(img):
        details["region-table-copy"] = "differs"
    if vhdx.parent_locator is not None:
        details["parent-locator"] = parent_locator(img, vhdx.parent_locator)[1]
    return Features(cluster_size=vhdx.block_size, details=details)


def backing(img: Image) -> Backing | None:
    """A differencing disk's parent: the first path its parent locator holds."""
    vhdx = parse(img)
    if vhdx.parent_locator is None:
        return None
    locator_type, pairs = parent_locator(img, vhdx.parent_locator)
    name = next((pairs[key] for key in PARENT_PATH_KEYS if pairs.get(key)), None)
    if name is None:
        raise InvalidHeader("parent locator holds no path to the parent", code="vhdx.parent-locator")
    return Backing(name, "vhdx" if locator_type == VHDX_PARENT_LOCATOR else None)


def hazards(img: Image, info: ImageInfo) -> Iterator[Hazard]:
    """A log QEMU would replay: it refuses the image read-only and rewrites it
    read-write, so what was checked is not what a hypervisor uses."""
    if info.format != "vhdx":
        return
    vhdx = parse(img)
    if vhdx.log_entries is None:
        yield Hazard(
            "vhdx.log-pending",
            f"its log ({vhdx.header.log_length} bytes, too large to search) may need replaying,"
            " which rewrites the image",
        )
    elif vhdx.log_entries:
        yield Hazard(
            "vhdx.log-pending",
            f"its log has entries to replay ({vhdx.log_entries}): QEMU refuses it read-only and rewrites it read-write",
        )


# ---- data path and check: the BAT (QEMU 7.2 block/vhdx.c) --------------------------------------------------

#: BAT states whose block reads as zeros: not present, undefined, zero, unmapped (and 5, unmapped in v0.95).
ZERO_STATES = frozenset({0, 1, 2, 3, 5})
INT64_MAX = 2**63 - 1
#: Bytes of the BAT read (and cached) at once.
BAT_PIECE = 64 * KiB


class Geometry:
    """The BAT's layout as QEMU derives it, and the regions its entries must miss."""

    def __init__(self, vhdx: Vhdx) -> None:
        self.block_size, self.virtual_size = vhdx.block_size, vhdx.virtual_size
        self.chunk_ratio = MAX_SECTORS_PER_BLOCK * vhdx.logical_sector_size // vhdx.block_size
        self.bat_offset, self.entries = vhdx.bat_offset, bat_entry_count(vhdx)
        self.regions = list(vhdx.regions[1:])  # QEMU registers the log and the regions, not the header section

    def block_length(self, index: int) -> int:
        """QEMU's length of the block BAT entry ``index`` names (the last one may be short)."""
        remaining = self.virtual_size - index * self.block_size
        return min(self.block_size, remaining) if remaining >= 0 else self.block_size


def _refused(vhdx: Vhdx) -> str | None:
    """Why QEMU does not open this image read-only, if it does not."""
    if vhdx.log_entries != 0:
        return ("its log needs replaying (QEMU refuses it read-only and rewrites it read-write)" if vhdx.log_entries
                else f"its log ({vhdx.header.log_length} bytes) is too large to search for entries to replay")
    if vhdx.parent_locator is not None:
        return "it is a differencing disk (QEMU opens none; its sector bitmaps are not read)"
    return None


class VhdxMap:
    """The block map of a VHDX image: one data extent with no offset (QEMU's
    answer), read block by block through the BAT. A fully present block's
    entry must lie inside the file and miss every region, as QEMU's open
    checks every entry (here: when it is read; ``vhdx.bat-entry``)."""

    def __init__(self, img: Image, info: ImageInfo, host: "HostFile") -> None:
        from storprobe.blockmap import DataPathError

        vhdx = parse(img)
        reason = _refused(vhdx)
        if reason is not None:
            raise DataPathError(f"{info.filename}: {reason}", code="vhdx.not-opened")
        self.geometry = Geometry(vhdx)
        self.host = host

    def extents(self, start: int, length: int, *, want_zero: bool = True) -> "Iterator[Extent]":
        from storprobe.blockmap import Extent

        yield Extent(start, length, True, False)

    def _entry(self, index: int) -> int:
        at = index * 8
        piece = at - at % BAT_PIECE
        table = self.host.table(self.geometry.bat_offset + piece, min(BAT_PIECE, self.geometry.entries * 8 - piece))
        return int.from_bytes(table[at - piece : at - piece + 8], "little")

    def read(self, extent: "Extent", offset: int, length: int) -> bytes:
        from storprobe.blockmap import DataPathError

        g = self.geometry
        out = bytearray()
        end = offset + length
        while offset < end:
            block, within = divmod(offset, g.block_size)
            stop = min(end, (block + 1) * g.block_size)
            index = block + block // g.chunk_ratio
            entry = self._entry(index)
            state, file_offset = entry & BAT_STATE_MASK, entry & BAT_OFFSET_MASK
            if state in ZERO_STATES:
                out += bytes(stop - offset)
            elif state == PAYLOAD_BLOCK_FULLY_PRESENT:
                self._check_entry(index, file_offset)
                out += self.host.read(file_offset + within if file_offset else 0, stop - offset)
            else:
                raise DataPathError(f"vhdx block {block} has BAT state {state}, which QEMU does not read (I/O error)",
                                    code="vhdx.block-state")
            offset = stop
        return bytes(out)

    def _check_entry(self, index: int, file_offset: int) -> None:
        from storprobe.blockmap import DataPathError

        g = self.geometry
        size = self.host.size()
        if (file_offset > INT64_MAX - g.block_size or file_offset >= size
                or file_offset + g.block_length(index) > size
                or overlapping(file_offset, file_offset + g.block_size, g.regions)):
            raise DataPathError(f"vhdx BAT entry {index} (offset {file_offset:#x}) lies past the end of the file or "
                                "over a region: QEMU does not open the image", code="vhdx.bat-entry")


def block_map(img: Image, info: ImageInfo, host: "HostFile") -> VhdxMap:
    return VhdxMap(img, info, host)


def check(img: Image, reader: "CheckReader") -> "CheckResult":
    """qemu-img check of a VHDX image (vhdx_co_check, read-only): each fully
    present BAT entry that overflows, lies past the end of the file, or (a
    payload entry, counted as QEMU counts them: every ``chunk_ratio``-th
    fully present entry is taken for a sector bitmap) overlaps a region is a
    corruption, once per rule it breaks. QEMU reports no cluster counts."""
    from storprobe.verify import CheckFailed, CheckResult

    vhdx = parse(img)
    reason = _refused(vhdx)
    if reason is not None:
        raise CheckFailed(f"Could not open: {reason}")
    g = Geometry(vhdx)
    corruptions, payload_left = 0, g.chunk_ratio
    for first in range(0, g.entries, BAT_PIECE // 8):
        count = min(BAT_PIECE // 8, g.entries - first)
        raw = reader.read(g.bat_offset + 8 * first, 8 * count)
        for index, (entry,) in enumerate(_UINT64.iter_unpack(raw), first):
            if entry & BAT_STATE_MASK != PAYLOAD_BLOCK_FULLY_PRESENT:
                continue
            offset = entry & BAT_OFFSET_MASK
            corruptions += offset > INT64_MAX - g.block_size
            corruptions += offset >= reader.size or offset + g.block_length(index) > reader.size
            if payload_left:
                payload_left -= 1
                corruptions += overlapping(offset, offset + g.block_size, g.regions)
            else:
                payload_left = g.chunk_ratio
    return CheckResult(corruptions=corruptions)


_UINT64 = struct.Struct("<Q")


@hookimpl
def storprobe_formats() -> list[FormatSpec]:
    return [
        FormatSpec(
            name="vhdx",
            description="Hyper-V VHDX",
            magic=b"vhdxfile",
            size=size,
            backing=backing,
            features=features,
            hazards=hazards,
            block_map=block_map,
            check=check,
            reads=((HEADER_OFFSETS[0], REGION_TABLE_COPY_OFFSET + REGION_TABLE_SIZE - HEADER_OFFSETS[0]),),
        )
    ]
