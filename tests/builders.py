"""Image builders shared by the tests, one section per format: hand-built
headers (struct.pack at the offsets of each format's spec), edits of real
images' bytes that keep their checksums right, and the real images of every
format the fuzz tests and the differential campaign mutate.

Test modules import from here (and from oracle.py); a test_*.py module exports
nothing. Offsets come from the specs, not from the plugins' layouts, so a wrong
layout in a plugin cannot hide behind the builder that tests it.
"""

from __future__ import annotations

import lzma
import plistlib
import shutil
import struct
import uuid
from collections.abc import Callable
from pathlib import Path

from storprobe_plugins.vhdx import crc32c

from oracle import qemu_img_create, qemu_io, run

# ---- qcow2: header offsets (docs/interop/qcow2.txt) and edits of a real image's bytes ----------------------

BACKING_OFFSET, BACKING_SIZE, CLUSTER_BITS, SIZE, CRYPT = 8, 16, 20, 24, 32
L1_SIZE, L1_OFFSET, REFTABLE_OFFSET, REFTABLE_CLUSTERS = 36, 40, 48, 56
NB_SNAPSHOTS, SNAPSHOTS_OFFSET = 60, 64
INCOMPAT, COMPAT, AUTOCLEAR, REFCOUNT_ORDER, HEADER_LENGTH, COMPRESSION = 72, 80, 88, 96, 100, 104
EXT_BACKING_FORMAT, EXT_FEATURES, EXT_BITMAPS, EXT_CRYPTO = 0xE2792ACA, 0x6803F857, 0x23852875, 0x0537BE77

Edit = Callable[[bytearray], None]


def u8(offset: int, value: int) -> Edit:
    return lambda b: struct.pack_into(">B", b, offset, value)


def u32(offset: int, value: int) -> Edit:
    return lambda b: struct.pack_into(">I", b, offset, value)


def u64(offset: int, value: int) -> Edit:
    return lambda b: struct.pack_into(">Q", b, offset, value)


def get(b: bytes, offset: int, fmt: str) -> int:
    return struct.unpack_from(">" + fmt, b, offset)[0]


def ext_at(b: bytes, kind: int) -> int:
    """Offset of the header of the first extension of ``kind``."""
    offset = get(b, HEADER_LENGTH, "I") if get(b, 4, "I") == 3 else 72
    while True:
        ext_type, length = struct.unpack_from(">II", b, offset)
        if ext_type == kind:
            return offset
        assert ext_type, f"no extension {kind:#x}"
        offset += 8 + (length + 7) // 8 * 8


def in_ext(kind: int, delta: int, fmt: str, value: int | Callable[[bytes], int]) -> Edit:
    """Set a field ``delta`` bytes into extension ``kind`` (negative: its length field)."""

    def edit(b: bytearray) -> None:
        at = ext_at(b, kind) + 8 + delta
        struct.pack_into(">" + fmt, b, at, value(b) if callable(value) else value)

    return edit


def bitmap_dir(b: bytes) -> tuple[int, int, int]:
    """(nb_bitmaps, directory size, directory offset) from the bitmaps extension."""
    at = ext_at(b, EXT_BITMAPS) + 8
    return get(b, at, "I"), get(b, at + 8, "Q"), get(b, at + 16, "Q")


def in_bitmap_dir(delta: int, fmt: str, value: int) -> Edit:
    return lambda b: struct.pack_into(">" + fmt, b, bitmap_dir(b)[2] + delta, value)


def in_bitmap_table(value: int) -> Edit:
    """Set the first entry of the first bitmap's table."""
    return lambda b: struct.pack_into(">Q", b, get(b, bitmap_dir(b)[2], "Q"), value)


def luks_at(b: bytes) -> int:
    return get(b, ext_at(b, EXT_CRYPTO) + 8, "Q")


def in_luks(delta: int, fmt: str, value: int) -> Edit:
    return lambda b: struct.pack_into(">" + fmt, b, luks_at(b) + delta, value)


def past_end(b: bytes) -> int:
    """A cluster-aligned offset beyond the end of the file."""
    return (len(b) + 2 * 65536) // 65536 * 65536


# ---- qcow2 guest data: images written through qemu-io, and where their L1/L2 entries lie -------------------

L2_COMPRESSED, L2_ZERO, L2_COPIED = 1 << 62, 1 << 0, 1 << 63


def guest_writes(cluster: int, *, compressed: bool = True) -> tuple[str, ...]:
    """qemu-io commands touching each kind of cluster, scaled to ``cluster`` bytes:
    data, a partial write, zeros (``-z``, ``-zu``), compressed clusters, a discard,
    and data in a later L2 table when one maps little (small clusters)."""
    c = cluster
    script = [
        f"write -P 0x11 0 {2 * c}",
        f"write -P 0x22 {2 * c + c // 2} {max(512, c // 4)}",
        f"write -z {4 * c} {c}",
        f"write -zu {5 * c} {c}",
        f"discard {c} {c}",
        f"write -P 0x55 {12 * c} {3 * c}",
    ]
    if compressed:
        script += [f"write -c -P 0x33 {6 * c} {c}", f"write -c -P 0x44 {7 * c} {c}"]
    if l1_span(c) <= 8 * 1024 * 1024:
        script.append(f"write -P 0x66 {l1_span(c) + c} {c}")
    return tuple(script)


def l1_span(cluster: int, extended: bool = False) -> int:
    """Guest bytes one L1 entry maps (one L2 table of 8- or 16-byte entries)."""
    return cluster // (16 if extended else 8) * cluster


def guest_size(cluster: int) -> int:
    """A virtual size the script of :func:`guest_writes` fits in (small enough to read whole)."""
    span = l1_span(cluster)
    return 16 * cluster if span > 8 * 1024 * 1024 else span + 8 * cluster


def written_qcow2(path: Path, cluster: int, *options: str, size: int | None = None,
                  script: tuple[str, ...] | None = None) -> Path:
    """A qcow2 image of ``cluster``-byte clusters made with ``options`` and written by ``script``
    (default: :func:`guest_writes`)."""
    qemu_img_create(path, "qcow2", str(size or guest_size(cluster)), f"cluster_size={cluster}", *options)
    qemu_io(path, *(script if script is not None else guest_writes(cluster)))
    return path


def l2_entry_at(data: bytes, guest_offset: int) -> int:
    """Where in the file the L2 entry that maps ``guest_offset`` lies (its L2 table must exist)."""
    bits = get(data, CLUSTER_BITS, "I")
    extended = bool(get(data, INCOMPAT, "Q") & (1 << 4)) if get(data, 4, "I") >= 3 else False
    entry = 16 if extended else 8
    span = l1_span(1 << bits, extended)
    l2 = get(data, get(data, L1_OFFSET, "Q") + 8 * (guest_offset // span), "Q") & 0x00FFFFFFFFFFFE00
    assert l2, f"no L2 table maps guest offset {guest_offset}"
    return l2 + entry * (guest_offset % span >> bits)


def l1_entry_at(data: bytes, guest_offset: int) -> int:
    """Where in the file the L1 entry that maps ``guest_offset`` lies."""
    bits = get(data, CLUSTER_BITS, "I")
    extended = bool(get(data, INCOMPAT, "Q") & (1 << 4)) if get(data, 4, "I") >= 3 else False
    return get(data, L1_OFFSET, "Q") + 8 * (guest_offset // l1_span(1 << bits, extended))


# ---- vmdk: KDMV header fields, descriptor text, COWD extents -----------------------------------------------

HEADER_FIELDS = {  # offset, struct code of the KDMV header fields the tests edit
    "version": (4, "<I"),
    "flags": (8, "<I"),
    "capacity": (12, "<Q"),
    "grain_size": (20, "<Q"),
    "desc_offset": (28, "<Q"),
    "desc_size": (36, "<Q"),
    "num_gtes_per_gt": (44, "<I"),
    "rgd_offset": (48, "<Q"),
    "gd_offset": (56, "<Q"),
    "overhead": (64, "<Q"),
}
DESCRIPTOR_HEAD = 'version=1\nCID=12345678\nparentCID=ffffffff\ncreateType="{}"\n'


def patch(data: bytes, **fields: int) -> bytes:
    """``data`` with KDMV header fields replaced."""
    out = bytearray(data)
    for name, value in fields.items():
        offset, code = HEADER_FIELDS[name]
        struct.pack_into(code, out, offset, value)
    return bytes(out)


def descriptor(create_type: str, *lines: str, head: str = DESCRIPTOR_HEAD) -> bytes:
    return (head.format(create_type) + "".join(line + "\n" for line in lines)).encode()


def cowd(capacity: int = 131072, grain: int = 8, gd_entries: int = 4, text: bytes = b"") -> bytes:
    """An ESX COWD sparse extent: header (magic, version, flags, capacity, grain,
    grain directory offset and entries, free sector) and an empty grain directory
    at sector 4; ``text`` is put at sector 1, where QEMU looks for a descriptor."""
    header = struct.pack("<4s7I", b"COWD", 1, 3, capacity, grain, 4, gd_entries, 5)
    return (header.ljust(512, b"\0") + text).ljust(4096, b"\0")


def with_cid(cid: str) -> str:
    return f"version=1\nCID={cid}\n" + 'createType="{}"\n'


# ---- vpc (VHD): footer edits with their checksums refreshed ------------------------------------------------

FOOTER = 512
CHECKSUM = 64


def checksum(block: bytes | bytearray) -> int:
    return ~(sum(block) - sum(block[CHECKSUM : CHECKSUM + 4])) & 0xFFFFFFFF


def edit(path: Path, *changes: tuple[int, str, object], dynamic_header: bool = False) -> Path:
    """Apply ``(offset, struct format, value)`` changes (negative offsets count
    from the end), then refresh the checksum of every footer (and of the
    dynamic header at 512 when asked), so only the intended rule breaks."""
    data = bytearray(path.read_bytes())
    for offset, fmt, value in changes:
        struct.pack_into(fmt, data, offset % len(data), value)
    for start in (0, len(data) - FOOTER):
        if data[start : start + 8] == b"conectix":
            struct.pack_into(">I", data, start + CHECKSUM, checksum(data[start : start + FOOTER]))
    if dynamic_header:
        header = data[512:1536]
        struct.pack_into(">I", data, 512 + 36, ~(sum(header) - sum(header[36:40])) & 0xFFFFFFFF)
    path.write_bytes(bytes(data))
    return path


def on_both_footers(offset: int, fmt: str, value: object) -> list[tuple[int, str, object]]:
    """A footer field written in the copy at 0 and in the trailer alike."""
    return [(offset, fmt, value), (offset - FOOTER, fmt, value)]


VHD_DIFFERENCING = 4
VHD_LOCATORS = 512 + 576  # the dynamic header's eight parent locators (24 bytes each), after the footer copy


def differencing_vhd(path: Path, parent: Path) -> Path:
    """The dynamic VHD at ``path`` (qemu-img's) made a differencing disk over
    ``parent``, as Virtual PC writes one and qemu-img cannot: disk type 4 in
    both footers; the parent's unique id, timestamp and Unicode name (its file
    name, UTF-16BE) in the dynamic header; a relative-path locator (``W2ru``,
    UTF-16LE) whose sector is put before the trailing footer; every checksum
    refreshed."""
    name = parent.name
    data, above = bytearray(path.read_bytes()), parent.read_bytes()[:FOOTER]
    body, trailer = data[:-FOOTER], data[-FOOTER:]
    locator = (".\\" + name).encode("utf-16-le")
    sector = locator.ljust(-(-len(locator) // 512) * 512 or 512, b"\0")
    struct.pack_into(">16sI", body, 512 + 40, above[68:84], struct.unpack_from(">I", above, 24)[0])
    struct.pack_into("512s", body, 512 + 64, name.encode("utf-16-be"))
    struct.pack_into(">4sIIIQ", body, VHD_LOCATORS, b"W2ru", len(sector), len(locator), 0, len(body))
    path.write_bytes(bytes(body + sector + trailer))
    return edit(path, *on_both_footers(60, ">I", VHD_DIFFERENCING), dynamic_header=True)


# ---- vhdx: a file's structures named and edited in place, checksums repaired; log entries ------------------

KiB, MiB = 1024, 1024 * 1024
HEADERS = (64 * KiB, 128 * KiB)
REGION_TABLE = 192 * KiB


def guid(text: str) -> bytes:
    return uuid.UUID(text).bytes_le


BAT = guid("2DC27766-F623-4200-9D64-115E9BFD4A08")
METADATA = guid("8B7CA206-4790-4B9A-B8FE-575F050F886E")
FILE_PARAMETERS = guid("CAA16737-FA36-4D43-B3B6-33F0AA44E76B")
VIRTUAL_DISK_SIZE = guid("2FA54224-CD1B-4876-B211-5DBED83BF4B8")
PAGE_83 = guid("BECA12AB-B2E6-4523-93EF-C309E000C746")
LOGICAL_SECTOR_SIZE = guid("8141BF1D-A96F-4709-BA47-F233A8FAAB5F")
PARENT_LOCATOR = guid("A8D35F2D-B30B-454D-ABF7-D3D84834AB0C")
VHDX_PARENT = guid("B04AEFB7-D19E-4A81-B789-25B8E9445913")
UNKNOWN = guid("01234567-89AB-CDEF-0123-456789ABCDEF")
LOG_GUID = guid("6F1C7E39-5A0D-4C2B-9E4F-1D2C3B4A5968")
LOG_SECTOR = 4 * KiB


class Vhdx:
    """A VHDX file's bytes with the structures named, edited in place."""

    def __init__(self, path: Path, data: bytes | None = None) -> None:
        self.path = path
        self.data = bytearray(path.read_bytes() if data is None else data)

    def save(self) -> Path:
        self.path.write_bytes(bytes(self.data))
        return self.path

    def fix_crc(self, start: int, length: int) -> None:
        struct.pack_into("<I", self.data, start + 4, 0)
        struct.pack_into("<I", self.data, start + 4, crc32c(bytes(self.data[start : start + length])))

    def header(self, index: int, offset: int, fmt: str, value: object) -> None:
        struct.pack_into(fmt, self.data, HEADERS[index] + offset, value)
        self.fix_crc(HEADERS[index], 4 * KiB)

    def both_headers(self, offset: int, fmt: str, value: object) -> None:
        for index in (0, 1):
            self.header(index, offset, fmt, value)

    def region_entry(self, region: bytes) -> int:
        count = struct.unpack_from("<I", self.data, REGION_TABLE + 8)[0]
        for at in range(REGION_TABLE + 16, REGION_TABLE + 16 + 32 * count, 32):
            if self.data[at : at + 16] == region:
                return at
        raise KeyError(region)

    def regions(self, offset: int, fmt: str, value: object) -> None:
        struct.pack_into(fmt, self.data, REGION_TABLE + offset, value)
        self.fix_crc(REGION_TABLE, 64 * KiB)

    def region_offset(self, region: bytes) -> int:
        return struct.unpack_from("<Q", self.data, self.region_entry(region) + 16)[0]

    @property
    def metadata(self) -> int:
        return self.region_offset(METADATA)

    def item_entry(self, item: bytes) -> int:
        count = struct.unpack_from("<H", self.data, self.metadata + 10)[0]
        for at in range(self.metadata + 32, self.metadata + 32 + 32 * count, 32):
            if self.data[at : at + 16] == item:
                return at
        raise KeyError(item)

    def item(self, item: bytes) -> int:
        """Absolute offset of a metadata item's data."""
        return self.metadata + struct.unpack_from("<I", self.data, self.item_entry(item) + 16)[0]

    def put(self, offset: int, fmt: str, value: object) -> None:
        struct.pack_into(fmt, self.data, offset, value)

    def add_item(self, item: bytes, blob: bytes, flags: int = 6, at: int = 128 * KiB) -> None:
        count = struct.unpack_from("<H", self.data, self.metadata + 10)[0]
        struct.pack_into("<16sIII4x", self.data, self.metadata + 32 + 32 * count, item, at, len(blob), flags)
        self.put(self.metadata + 10, "<H", count + 1)
        self.data[self.metadata + at : self.metadata + at + len(blob)] = blob

    @property
    def log(self) -> tuple[int, int]:
        """The log's offset and length (the same in both headers)."""
        length, offset = struct.unpack_from("<IQ", self.data, HEADERS[0] + 68)
        return offset, length

    def put_log(self, at: int, data: bytes) -> None:
        """``data`` written at ``at`` in the circular log, sector by sector, around its end."""
        offset, length = self.log
        for done in range(0, len(data), LOG_SECTOR):
            start = offset + (at + done) % length
            self.data[start : start + LOG_SECTOR] = data[done : done + LOG_SECTOR]

    def make_differencing(self, pairs: dict[str, str], locator_type: bytes = VHDX_PARENT) -> None:
        params = self.item(FILE_PARAMETERS)
        self.put(params + 4, "<I", struct.unpack_from("<I", self.data, params + 4)[0] | 2)
        table_size = 20 + 12 * len(pairs)
        entries, strings = b"", b""
        for key, value in pairs.items():
            k, v = key.encode("utf-16-le"), value.encode("utf-16-le")
            key_at = table_size + len(strings)
            entries += struct.pack("<IIHH", key_at, key_at + len(k), len(k), len(v))
            strings += k + v
        self.add_item(PARENT_LOCATOR, struct.pack("<16s2xH", locator_type, len(pairs)) + entries + strings)


def log_entry(
    v: Vhdx,
    sequence: int,
    payload: bytes,
    *,
    log_guid: bytes = LOG_GUID,
    descriptor: bytes = b"desc",
    length: int = 2 * LOG_SECTOR,
    checksum: bool = True,
) -> bytes:
    """A log entry as MS-VHDX 2.3.1 lays it out: the entry header (``loge``,
    CRC-32C of the whole entry, its length, sequence number, one descriptor,
    the log GUID, the file's size as flushed and last offset), a data
    descriptor (``desc``: the sector's last 4 and first 8 bytes, its file
    offset, the sequence number) and the data sector (``data``, the sequence
    number split around its middle 4084 bytes). Replayed, it writes
    ``payload`` over the file's last 4 KiB."""
    entry = bytearray(2 * LOG_SECTOR)
    size, target = len(v.data), len(v.data) - LOG_SECTOR
    struct.pack_into("<4sIIIQI4x16sQQ", entry, 0, b"loge", 0, length, 0, sequence, 1, log_guid, size, size)
    trailing, leading = struct.unpack_from("<I", payload, 4092)[0], struct.unpack_from("<Q", payload)[0]
    struct.pack_into("<4sIQQQ", entry, 64, descriptor, trailing, leading, target, sequence)
    struct.pack_into("<4sI", entry, LOG_SECTOR, b"data", sequence >> 32)
    entry[LOG_SECTOR + 8 : -4] = payload[8:-4]
    struct.pack_into("<I", entry, 2 * LOG_SECTOR - 4, sequence & 0xFFFFFFFF)
    struct.pack_into("<I", entry, 4, crc32c(bytes(entry)) ^ (0 if checksum else 1))
    return bytes(entry)


def log_with_invalid_descriptor(v: Vhdx) -> None:
    """A valid entry header whose descriptor is neither ``desc`` nor ``zero``: QEMU's search fails."""
    v.both_headers(48, "16s", LOG_GUID)
    v.put_log(0, log_entry(v, 1, bytes(LOG_SECTOR), descriptor=b"desq"))


def endless_log_search(v: Vhdx) -> None:
    """A valid entry header and descriptor, as long as the whole log, with a
    wrong checksum: QEMU's search reads the whole log, ends where it began
    and starts again, for ever."""
    v.both_headers(48, "16s", LOG_GUID)
    v.put_log(0, log_entry(v, 1, bytes(LOG_SECTOR), length=v.log[1], checksum=False))


def corrupt_both_headers(v: Vhdx) -> None:
    for h in HEADERS:
        v.data[h] ^= 0xFF


def conflicting_headers(v: Vhdx) -> None:
    v.header(1, 8, "<Q", struct.unpack_from("<Q", v.data, HEADERS[0] + 8)[0])
    v.header(1, 32, "16s", b"\x42" * 16)  # data_write_guid


def region_entry_field(region: bytes, offset: int, fmt: str, value: object):
    def change(v: Vhdx) -> None:
        v.regions(v.region_entry(region) - REGION_TABLE + offset, fmt, value)

    return change


def item_value(item: bytes, fmt: str, value: object):
    def change(v: Vhdx) -> None:
        v.put(v.item(item), fmt, value)

    return change


def item_entry_field(item: bytes, offset: int, fmt: str, value: object):
    def change(v: Vhdx) -> None:
        v.put(v.item_entry(item) + offset, fmt, value)

    return change


def bad_parent_locator(v: Vhdx) -> None:
    v.make_differencing({"relative_path": "p.vhdx"})
    v.put(v.item(PARENT_LOCATOR) + 18, "<H", 5000)  # more entries than the item holds


# ---- cloop: the header and offsets table -------------------------------------------------------------------

PREAMBLE = b"#!/bin/sh\n#V2.0 Format\nmodprobe cloop file=$0 && mount -r -t iso9660 /dev/cloop $1\n"


def cloop_bytes(
    block_size: int, n_blocks: int, table_entries: int | None = None, offsets: tuple[int, ...] = ()
) -> bytes:
    """The preamble, the two header words and an offsets table: ``offsets``, then zeros."""
    entries = n_blocks + 1 if table_entries is None else table_entries
    table = struct.pack(f">{len(offsets)}Q", *offsets) + bytes(8 * (entries - len(offsets)))
    return PREAMBLE.ljust(128, b"\0") + struct.pack(">II", block_size, n_blocks) + table


# ---- cow: the writers' headers (QEMU's old cow_create, UML's cow_user.c) -----------------------------------

MAGIC = b"OOOM"


def qemu_v2(size: int, backing: bytes = b"", *, packed: bool = False, mtime: int = 1234) -> bytes:
    """What QEMU's cow_create wrote: a zeroed header, then the bitmap."""
    pad = b"" if packed else bytes(4)
    header = MAGIC + struct.pack(">I1024sI", 2, backing, mtime) + pad + struct.pack(">QI", size, 512)
    header += bytes(-len(header) % 8)  # the C struct's tail padding
    return header + bytes((size // 512 + 7) // 8)


def uml_v3(
    size: int, backing: bytes = b"/base.img", *, sectorsize: int = 512, alignment: int = 512, cow_format: int = 0
) -> bytes:
    """UML's version-3 header (packed), as write_cow_header makes it."""
    header = MAGIC + struct.pack(">IIQIII4096s", 3, 1234, size, sectorsize, alignment, cow_format, backing)
    return header + bytes(-len(header) % alignment if alignment else 0)


# ---- dmg: uncompressed UDIF images (qemu-img cannot write dmg) ---------------------------------------------

TRAILER = ">4sIIIQQQQQII16sII128xQQ120xII128xIQ12x"
RAW_CHUNK, TERMINATOR_CHUNK = 0x00000001, 0xFFFFFFFF


def block_table(sectors: int, data_length: int, chunk: tuple[int, int, int] | None = None) -> bytes:
    """A "mish" block table: one raw chunk covering the disk (or ``chunk``:
    type, sectors, length), then the terminator."""
    kind, chunk_sectors, chunk_length = chunk or (RAW_CHUNK, sectors, data_length)
    chunks = struct.pack(">IIQQQQ", kind, 0, 0, chunk_sectors, 0, chunk_length)
    chunks += struct.pack(">IIQQQQ", TERMINATOR_CHUNK, 0, sectors, 0, data_length, 0)
    return struct.pack(">4sIQQQII24xII128xI", b"mish", 1, 0, sectors, 0, 0, 2, 0, 0, 2) + chunks


def build_dmg(data: bytes, block_map: str = "xml", chunk: tuple[int, int, int] | None = None, **trailer: int) -> bytes:
    """An uncompressed UDIF image: data fork, block map (an XML property list
    or a resource fork), then the koly trailer; ``chunk`` replaces the block
    map's one chunk, ``trailer`` overrides fields."""
    sectors = len(data) // 512
    mish = block_table(sectors, len(data), chunk)
    if block_map == "xml":
        blkx = {"Attributes": "0x0050", "Data": mish, "ID": "0", "Name": "whole disk (Apple_HFS : 0)"}
        fork = plistlib.dumps({"resource-fork": {"blkx": [blkx]}})
    else:
        resources = struct.pack(">I", len(mish)) + mish
        fork = struct.pack(">IIII", 256, 256 + len(resources), len(resources), 0).ljust(256, b"\0") + resources
    fields = {
        "version": 4,
        "header_size": 512,
        "data_fork_offset": 0,
        "data_fork_length": len(data),
        "rsrc_fork_offset": len(data) if block_map == "rsrc" else 0,
        "rsrc_fork_length": len(fork) if block_map == "rsrc" else 0,
        "xml_offset": len(data) if block_map == "xml" else 0,
        "xml_length": len(fork) if block_map == "xml" else 0,
        "sector_count": sectors,
        **trailer,
    }
    koly = struct.pack(
        TRAILER,
        b"koly",
        fields["version"],
        fields["header_size"],
        1,  # flags: flattened
        0,  # running data fork offset
        fields["data_fork_offset"],
        fields["data_fork_length"],
        fields["rsrc_fork_offset"],
        fields["rsrc_fork_length"],
        1,  # segment number
        1,  # segment count
        bytes(16),
        0,  # data checksum type (none)
        0,
        fields["xml_offset"],
        fields["xml_length"],
        0,  # master checksum type (none)
        0,
        1,  # image variant: device image
        fields["sector_count"],
    )
    return data + fork + koly


# ---- seeds: real images of every format, and boundary values to write into them ----------------------------

def real_images(d: Path) -> list[bytes]:
    """One or more real images per format, small enough to copy per example
    (made in ``d``; also the seeds of tests/fuzz_atheris.py)."""
    secret = ("--object", "secret,id=s0,data=pw")
    made = [
        qemu_img_create(d / "v2.qcow2", "qcow2", "16M", "compat=0.10"),
        qemu_img_create(d / "v3.qcow2", "qcow2", "16M", "lazy_refcounts=on,extended_l2=on,cluster_size=64k"),
        qemu_img_create(d / "df.qcow2", "qcow2", "16M", f"data_file={d / 'df.raw'},compression_type=zstd"),
        qemu_img_create(d / "a.qcow", "qcow", "16M"),
        qemu_img_create(d / "a.qed", "qed", "16M", "backing_file=v2.qcow2,backing_fmt=qcow2"),
        qemu_img_create(d / "a.vmdk", "vmdk", "16M"),
        qemu_img_create(d / "s.vmdk", "vmdk", "16M", "subformat=streamOptimized"),
        qemu_img_create(d / "f.vmdk", "vmdk", "16M", "subformat=twoGbMaxExtentFlat"),
        qemu_img_create(d / "a.vhd", "vpc", "16M"),
        qemu_img_create(d / "f.vhd", "vpc", "1M", "subformat=fixed"),
        qemu_img_create(d / "a.vhdx", "vhdx", "16M", "block_size=1M"),
        qemu_img_create(d / "a.vdi", "vdi", "16M"),
        qemu_img_create(d / "a.hdd", "parallels", "16M"),
    ]
    rich = qemu_img_create(d / "rich.qcow2", "qcow2", "16M", "backing_file=v2.qcow2,backing_fmt=qcow2")
    run("qemu-img", "bitmap", "--add", rich, "b0")
    run("qemu-img", "snapshot", "-c", "s1", rich)
    run("qemu-img", "create", "-q", "-f", "luks", *secret, "-o", "key-secret=s0,iter-time=10", d / "a.luks", "1M")
    run("qemu-img", "create", "-q", "-f", "qcow2", *secret, "-o", "encrypt.format=luks,encrypt.key-secret=s0",
        "-o", "encrypt.iter-time=10", d / "luks.qcow2", "1M")
    made += [rich, d / "a.luks", d / "luks.qcow2"]
    if shutil.which("cryptsetup") or shutil.which("cryptsetup", path="/usr/sbin:/sbin"):
        luks2 = d / "luks2.img"
        luks2.write_bytes(bytes(2 << 20))
        run("cryptsetup", "luksFormat", "--type", "luks2", "--batch-mode", "--key-file", "-", "--pbkdf", "pbkdf2",
            "--pbkdf-force-iterations", "1000", "--luks2-keyslots-size", "512k", "--luks2-metadata-size", "16k",
            luks2, input=b"pw")
        made.append(luks2)
    if shutil.which("bximage"):
        run("bximage", "-q", "-func=create", "-hd=10M", "-imgmode=growing", d / "a.bochs")
        made.append(d / "a.bochs")
    if shutil.which("xorriso"):
        (d / "tree").mkdir()
        (d / "tree" / "a.txt").write_text("a\n")
        run("xorriso", "-as", "mkisofs", "-quiet", "-o", d / "a.iso", d / "tree")
        made.append(d / "a.iso")

    hand_built = [
        PREAMBLE.ljust(128, b"\0") + struct.pack(">II", 65536, 4) + bytes(5 * 8) + bytes(4096),
        qemu_v2(1 << 20, b"/base.img"),
        uml_v3(1 << 20),
        build_dmg(bytes(range(256)) * 64),
        build_dmg(bytes(range(256)) * 64, block_map="rsrc"),
    ]
    return [path.read_bytes() for path in made] + hand_built


CORPUS = Path(__file__).resolve().parent / "corpus"


def corpus_files() -> list[Path]:
    """The regression corpus: inputs that once crashed or hung a probe (see its README)."""
    return sorted(p for p in CORPUS.iterdir() if p.name != "README.md")


def load(path: Path) -> bytes:
    """A corpus file's bytes, decompressed."""
    data = path.read_bytes()
    return lzma.decompress(data) if path.suffix == ".xz" else data


INTERESTING = [0, 1, 7, 8, 0x7F, 0x80, 0xFF, 0x100, 0x200, 0xFFFF, 0x10000, 2**31 - 1, 2**31, 2**32 - 1, 2**32,
               2**62, 2**63 - 1, 2**63, 2**64 - 1]


# ---- qcow2 whose guest data cannot be read (the data path's read and block-status errors) ----------------


def broken_compressed_qcow2(d: Path, how: str) -> tuple[Path, Path]:
    """A one-cluster qcow2 (64 KiB of 0x5a) and its compressed copy broken:
    the compressed data garbled (``inflate``: a read fails), its L2 table's
    offset misaligned in the L1 table (``l1``) or its cluster's offset
    misaligned in the L2 table (``l2``: the block status fails). Returns
    (the intact plain image, the broken one)."""
    plain = qemu_img_create(d / "plain.qcow2", "qcow2", "1M")
    qemu_io(plain, "write -P 0x5a 0 64k")
    packed = d / "packed.qcow2"
    run("qemu-img", "convert", "-c", "-O", "qcow2", plain, packed)
    data = bytearray(packed.read_bytes())
    l1 = struct.unpack_from(">Q", data, L1_OFFSET)[0]
    l2 = struct.unpack_from(">Q", data, l1)[0] & 0x00FFFFFFFFFFFE00
    if how == "inflate":
        host = struct.unpack_from(">Q", data, l2)[0] & ((1 << 54) - 1)  # 64 KiB clusters: 62 - (16 - 8) bits
        data[host + 5 : host + 40] = b"\xff" * 35
    elif how == "l1":
        struct.pack_into(">Q", data, l1, struct.unpack_from(">Q", data, l1)[0] + 0x200)
    else:
        struct.pack_into(">Q", data, l2, 1 << 63 | 0x50200)
    broken = d / f"broken-{how}.qcow2"
    broken.write_bytes(bytes(data))
    return plain, broken
