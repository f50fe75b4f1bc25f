"""qcow2: QEMU copy-on-write, versions 2 and 3 (big-endian; QEMU docs/interop/qcow2.txt).

Everything ``qemu-img info`` shows is read from the header, its extensions, the
snapshot table, the bitmap directory and an embedded LUKS1 header, and checked
the way QEMU 7.2 checks it when it opens the image. Each broken rule raises
InvalidHeader with code ``qcow2.<rule>`` (``luks.<rule>`` for the LUKS header,
which the core's storprobe.luks1 reads). Unknown incompatible feature bits
(QEMU refuses such images) are reported in ``details``, not raised; they and
the corrupt bit are the row's hazards for ``storprobe check``. Names
(backing file, data file) are reported, never opened.
"""

import functools
import os
import struct
import sys
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, NamedTuple

from storprobe import (
    INT64_MAX,
    QEMU_MAX_LENGTH,
    Backing,
    DataFile,
    Features,
    FormatSpec,
    Hazard,
    Image,
    ImageInfo,
    InvalidHeader,
    Layout,
    LibvirtFacts,
    ProbeError,
    Snapshot,
    SourceError,
    hookimpl,
)
from storprobe.layout import cstring
from storprobe.luks1 import CREATE_STRINGS as LUKS_CREATE_STRINGS
from storprobe.luks1 import LUKS1_HEADER_SIZE, CreateRefused, created_payload_offset, luks_specific
from storprobe.source import TableWalker

if TYPE_CHECKING:
    from array import array
    from concurrent.futures import Future, ThreadPoolExecutor

    from storprobe.blockmap import DataPathError, Extent, HostFile
    from storprobe.measure import CreateOption, Measurement, MeasureRequest
    from storprobe.verify import CheckReader, CheckResult

    #: Compressed clusters being inflated into a buffer, one after another: the buffer, and for each guest
    #: cluster the task inflating it and others (its errors by place) and its place in the buffer.
    Batch = tuple[bytearray, dict[int, tuple[Future[dict[int, DataPathError]], int]]]

HEADER = Layout(
    ">",
    "qcow2 header",
    ("magic", "4s"),
    ("version", "I"),
    ("backing_file_offset", "Q"),
    ("backing_file_size", "I"),
    ("cluster_bits", "I"),
    ("size", "Q"),
    ("crypt_method", "I"),
    ("l1_size", "I"),
    ("l1_table_offset", "Q"),
    ("refcount_table_offset", "Q"),
    ("refcount_table_clusters", "I"),
    ("nb_snapshots", "I"),
    ("snapshots_offset", "Q"),
    # version 3 and later; a version 2 header ends here, at byte 72
    ("incompatible_features", "Q"),
    ("compatible_features", "Q"),
    ("autoclear_features", "Q"),
    ("refcount_order", "I"),
    ("header_length", "I"),
    # additional field, present only when header_length > 104
    ("compression_type", "B"),
)
V2_VERSION = (2).to_bytes(4, "big")
V2_HEADER_LENGTH = 72
COMPRESSION_TYPE_OFFSET = 104
#: What a version 2 header implies for the later fields (QEMU's defaults).
V2_IMPLIED = struct.pack(">QQQIIB", 0, 0, 0, 4, V2_HEADER_LENGTH, 0)

EXTENSION = Layout(">", "qcow2 header extension", ("type", "I"), ("length", "I"))
EXT_END = 0x00000000
EXT_BACKING_FORMAT = 0xE2792ACA
EXT_FEATURE_NAMES = 0x6803F857
EXT_BITMAPS = 0x23852875
EXT_CRYPTO = 0x0537BE77
EXT_DATA_FILE = 0x44415441

FEATURE_NAME = Layout(">", "qcow2 feature name", ("type", "B"), ("bit", "B"), ("name", "46s"))
BITMAPS_EXT = Layout(
    ">",
    "qcow2 bitmaps extension",
    ("nb_bitmaps", "I"),
    ("reserved", "I"),
    ("directory_size", "Q"),
    ("directory_offset", "Q"),
)
CRYPTO_EXT = Layout(">", "qcow2 encryption header pointer", ("offset", "Q"), ("length", "Q"))
SNAPSHOT = Layout(
    ">",
    "qcow2 snapshot table entry",
    ("l1_table_offset", "Q"),
    ("l1_size", "I"),
    ("id_str_size", "H"),
    ("name_size", "H"),
    ("date_sec", "I"),
    ("date_nsec", "I"),
    ("vm_clock_nsec", "Q"),
    ("vm_state_size", "I"),
    ("extra_data_size", "I"),
)
SNAPSHOT_EXTRA = Layout(
    ">",
    "qcow2 snapshot extra data",
    ("vm_state_size_large", "Q"),
    ("disk_size", "Q"),
    ("icount", "Q"),
)
BITMAP_ENTRY = Layout(
    ">",
    "qcow2 bitmap directory entry",
    ("bitmap_table_offset", "Q"),
    ("bitmap_table_size", "I"),
    ("flags", "I"),
    ("type", "B"),
    ("granularity_bits", "B"),
    ("name_size", "H"),
    ("extra_data_size", "I"),
)
# feature bits
INCOMPAT_DIRTY, INCOMPAT_CORRUPT, INCOMPAT_DATA_FILE = 1 << 0, 1 << 1, 1 << 2
INCOMPAT_COMPRESSION, INCOMPAT_EXTENDED_L2 = 1 << 3, 1 << 4
INCOMPAT_KNOWN = (1 << 5) - 1
#: Incompatible bits a plain image may set: they change values in its record, not how it is read.
INCOMPAT_PLAIN = INCOMPAT_DIRTY | INCOMPAT_CORRUPT | INCOMPAT_COMPRESSION | INCOMPAT_EXTENDED_L2
COMPAT_LAZY_REFCOUNTS = 1 << 0
AUTOCLEAR_BITMAPS, AUTOCLEAR_DATA_FILE_RAW = 1 << 0, 1 << 1
COMPRESSION_TYPES = {0: "zlib", 1: "zstd"}
CRYPT_AES, CRYPT_LUKS = 1, 2

# QEMU's limits (block/qcow2.h, block/qcow2-bitmap.c, block.c)
MIN_CLUSTER_BITS, MAX_CLUSTER_BITS = 9, 21
MAX_REFCOUNT_ORDER = 6
MAX_BACKING_NAME = 1023
MAX_BACKING_FORMAT = 15  # QEMU's 16-byte buffer, NUL included
MAX_L1_BYTES = 32 * 1024 * 1024
MAX_REFTABLE_BYTES = 8 * 1024 * 1024
MAX_SNAPSHOTS = 65536
MAX_SNAPSHOT_EXTRA_DATA = 1024
MAX_SNAPSHOTS_SIZE = 1024 * MAX_SNAPSHOTS
MAX_BITMAPS = 65535
MAX_BITMAP_DIRECTORY_SIZE = 1024 * MAX_BITMAPS
BITMAP_MAX_TABLE_SIZE = 0x8000000
BITMAP_MAX_PHYS_SIZE = 0x20000000
BITMAP_GRANULARITY_BITS = range(9, 32)
BITMAP_MAX_NAME = 1023
BITMAP_DIRTY_TRACKING = 1
BITMAP_IN_USE, BITMAP_AUTO = 1 << 0, 1 << 1
BITMAP_RESERVED_FLAGS = 0xFFFFFFFC
BITMAP_TABLE_RESERVED = 0xFF000000000001FE  # bits 1-8 and 56-63 of a bitmap table entry
BITMAP_TABLE_OFFSET = 0x00FFFFFFFFFFFE00
BITMAP_TABLE_ALL_ONES = 1 << 0
SUBCLUSTERS = 32  # per cluster with extended L2 entries
INT_MAX = 2**31 - 1
UINT64 = 2**64
SECTOR = 512
NO_ICOUNT = UINT64 - 1

LUKS_KEYS = (
    "ivgen-alg",
    "hash-alg",
    "cipher-alg",
    "uuid",
    "ivgen-hash-alg",
    "format",
    "cipher-mode",
    "slots",
    "payload-offset",
    "master-key-iters",
)


class Extensions(NamedTuple):
    """What the header extensions say (the last of a repeated type wins, as in QEMU)."""

    backing_format: str | None = None
    data_file: str | None = None
    feature_table: bytes = b""  # the feature name table, parsed only when a name is needed
    crypto: Any = None  # CRYPTO_EXT fields
    bitmaps: Any = None  # BITMAPS_EXT fields, None when absent or to be ignored

    @property
    def feature_names(self) -> dict[int, str]:
        """Incompatible-feature bit -> name, from the feature name table."""
        return _feature_names(self.feature_table)


def _invalid(rule: str, message: str) -> InvalidHeader:
    return InvalidHeader(message, code=f"qcow2.{rule}")


def _align8(n: int) -> int:
    return (n + 7) & ~7


def _int64(value: int) -> int:
    """qemu-img prints these unsigned 64-bit fields as signed JSON integers."""
    return value - UINT64 if value > INT64_MAX else value


def _header(img: Image) -> Any:
    """The header, checked (once per probe); fields a version 2 header lacks take QEMU's defaults."""
    return img.memo(_header, _parse_header)


def _parse_header(img: Image) -> Any:
    return _header_of(img.header)


def _header_of(head: bytes) -> Any:
    """The header at the start of ``head``, checked."""
    if head[4:8] == V2_VERSION:
        head = head[:V2_HEADER_LENGTH] + V2_IMPLIED
    elif len(head) >= COMPRESSION_TYPE_OFFSET and int.from_bytes(head[100:104], "big") <= COMPRESSION_TYPE_OFFSET:
        head = head[:COMPRESSION_TYPE_OFFSET] + b"\0"
    hdr = HEADER.unpack(head)  # TruncatedHeader when it is shorter than its version's fields
    _check_header(hdr)
    return hdr


def _check_header(hdr: Any) -> None:
    """QEMU's checks on the fixed header, in the order qcow2_do_open makes them
    (its fields read once, into names: every probe and scan runs this)."""
    (_, version, backing_file_offset, _, cluster_bits, size, crypt_method, l1_size, l1_table_offset,
     refcount_table_offset, refcount_table_clusters, nb_snapshots, snapshots_offset, incompatible_features,
     _, _, refcount_order, header_length, compression_type) = hdr
    if not MIN_CLUSTER_BITS <= cluster_bits <= MAX_CLUSTER_BITS:
        raise _invalid("cluster-bits", f"cluster_bits {cluster_bits} is outside 9..21")
    cluster_size = 1 << cluster_bits
    if version == 3 and header_length < COMPRESSION_TYPE_OFFSET:
        raise _invalid("header-too-short", f"v3 header_length {header_length} is below 104")
    if header_length > cluster_size:
        raise _invalid("header-too-large", f"header_length {header_length} exceeds the cluster size")
    if backing_file_offset > cluster_size:
        raise _invalid("backing-offset", f"backing file offset {backing_file_offset} is beyond the first cluster")
    if compression_type not in COMPRESSION_TYPES:
        raise _invalid("compression-type", f"unknown compression type {compression_type}")
    if bool(compression_type) != bool(incompatible_features & INCOMPAT_COMPRESSION):
        raise _invalid("compression-type-bit", "compression type and its incompatible feature bit disagree")
    if incompatible_features & INCOMPAT_EXTENDED_L2 and cluster_size // SUBCLUSTERS < SECTOR:
        raise _invalid("extended-l2-cluster-size", "extended L2 entries need clusters of at least 16 KiB")
    if refcount_order > MAX_REFCOUNT_ORDER:
        raise _invalid("refcount-order", f"refcount_order {refcount_order} exceeds 6")
    if refcount_table_clusters == 0:
        raise _invalid("no-refcount-table", "the image has no refcount table")
    if refcount_table_clusters > MAX_REFTABLE_BYTES // cluster_size:
        raise _invalid("refcount-table-too-large", f"refcount table of {refcount_table_clusters} clusters")
    _check_table_offset(
        cluster_size, "refcount-table-offset", refcount_table_offset, refcount_table_clusters * cluster_size
    )
    if nb_snapshots > MAX_SNAPSHOTS:
        raise _invalid("too-many-snapshots", f"{nb_snapshots} snapshots exceed QEMU's {MAX_SNAPSHOTS}")
    _check_table_offset(cluster_size, "snapshot-table-offset", snapshots_offset, nb_snapshots * SNAPSHOT.size)
    if l1_size > MAX_L1_BYTES // 8:
        raise _invalid("l1-too-large", f"L1 table of {l1_size} entries exceeds {MAX_L1_BYTES} bytes")
    _check_table_offset(cluster_size, "l1-offset", l1_table_offset, l1_size * 8)
    l2_entry_size = 16 if incompatible_features & INCOMPAT_EXTENDED_L2 else 8
    shift = 2 * cluster_bits - (l2_entry_size.bit_length() - 1)  # bytes one L1 entry maps
    l1_needed = ((size + (1 << shift) - 1) % UINT64) >> shift  # QEMU's 64-bit arithmetic
    if l1_needed > INT_MAX:
        raise _invalid("image-too-big", f"virtual size {size} needs {l1_needed} L1 entries")
    if l1_size < l1_needed:
        raise _invalid("l1-too-small", f"L1 table has {l1_size} entries, virtual size needs {l1_needed}")
    if crypt_method > CRYPT_LUKS:
        raise _invalid("crypt-method", f"unsupported encryption method {crypt_method}")
    if size // SECTOR * SECTOR > QEMU_MAX_LENGTH:
        raise _invalid("size-too-large", f"virtual size {size} exceeds QEMU's limit {QEMU_MAX_LENGTH}")


def _check_table_offset(cluster_size: int, rule: str, offset: int, table_bytes: int) -> None:
    """QEMU's qcow2_validate_table: the table starts on a cluster and ends below 2**63."""
    if INT64_MAX - table_bytes < offset or offset % cluster_size:
        raise _invalid(rule, f"table offset {offset} is not cluster-aligned or out of range")


def _extensions(img: Image, hdr: Any) -> Iterator[tuple[int, int, int]]:
    """(type, data offset, length) of each header extension, as QEMU walks them: from
    header_length up to the backing name (or the end of the first cluster)."""
    end = hdr.backing_file_offset or 1 << hdr.cluster_bits
    offset = hdr.header_length
    while offset < end:  # each step advances by at least 8 bytes within one cluster
        kind, length = EXTENSION.values(img.read(offset, EXTENSION.size))
        offset += EXTENSION.size
        if offset > end or length > end - offset:
            raise _invalid("extension-too-large", f"header extension {kind:#x} runs past its area")
        if kind == EXT_END:
            return
        yield kind, offset, length
        offset += _align8(length)


def _read_extensions(img: Image, hdr: Any) -> Extensions:
    """The header extensions of ``hdr`` (``_header(img)``), read once per probe."""
    return img.memo(_read_extensions, lambda img: _parse_extensions(img, hdr))


def _parse_extensions(img: Image, hdr: Any) -> Extensions:
    backing_format = data_file = crypto = bitmaps = None
    feature_table = b""
    for kind, offset, length in _extensions(img, hdr):
        if kind == EXT_BACKING_FORMAT:
            if length > MAX_BACKING_FORMAT:
                raise _invalid("backing-format-too-long", f"backing format name of {length} bytes")
            backing_format = cstring(img.read(offset, length))
        elif kind == EXT_FEATURE_NAMES:
            feature_table = img.read(offset, length)
        elif kind == EXT_CRYPTO:
            crypto = _crypto_extension(img, hdr, offset, length)
        elif kind == EXT_BITMAPS:
            if length != BITMAPS_EXT.size:
                raise _invalid("bitmaps-extension-size", f"bitmaps extension of {length} bytes")
            if hdr.autoclear_features & AUTOCLEAR_BITMAPS:  # else QEMU ignores it as inconsistent
                bitmaps = _bitmaps_extension(img, hdr, offset)
        elif kind == EXT_DATA_FILE:
            data_file = cstring(img.read(offset, length))
    return Extensions(backing_format, data_file, feature_table, crypto, bitmaps)


def _feature_names(table: bytes) -> dict[int, str]:
    """Incompatible-feature bit -> name; like QEMU, the list ends at the first empty
    name and the first name given for a bit wins."""
    names: dict[int, str] = {}
    table += bytes(-len(table) % FEATURE_NAME.size)
    for start in range(0, len(table), FEATURE_NAME.size):
        entry = FEATURE_NAME.unpack(table, start)
        if entry.name[0] == 0:
            break
        if entry.type == 0 and entry.bit < 64:
            names.setdefault(entry.bit, cstring(entry.name))
    return names


def _crypto_extension(img: Image, hdr: Any, offset: int, length: int) -> Any:
    if hdr.crypt_method != CRYPT_LUKS:
        raise _invalid("crypto-header-unexpected", "encryption header pointer without LUKS encryption")
    if length != CRYPTO_EXT.size:
        raise _invalid("crypto-header-size", f"encryption header pointer of {length} bytes")
    crypto = CRYPTO_EXT.unpack(img.read(offset, length))
    if crypto.offset % (1 << hdr.cluster_bits):
        raise _invalid("crypto-header-offset", f"encryption header offset {crypto.offset} is not cluster-aligned")
    return crypto


def _bitmaps_extension(img: Image, hdr: Any, offset: int) -> Any:
    ext = BITMAPS_EXT.unpack(img.read(offset, BITMAPS_EXT.size))
    if ext.reserved:
        raise _invalid("bitmaps-reserved", "reserved field of the bitmaps extension is not zero")
    if ext.nb_bitmaps > MAX_BITMAPS:
        raise _invalid("too-many-bitmaps", f"{ext.nb_bitmaps} bitmaps exceed QEMU's {MAX_BITMAPS}")
    if ext.nb_bitmaps == 0:
        raise _invalid("no-bitmaps", "bitmaps extension with zero bitmaps")
    if ext.directory_offset % (1 << hdr.cluster_bits):
        raise _invalid(
            "bitmap-directory-offset", f"bitmap directory offset {ext.directory_offset} is not cluster-aligned"
        )
    if ext.directory_size > MAX_BITMAP_DIRECTORY_SIZE:
        raise _invalid("bitmap-directory-too-large", f"bitmap directory of {ext.directory_size} bytes")
    return ext


def _read_within_file(img: Image | TableWalker, offset: int, length: int, rule: str) -> bytes:
    if offset + length > img.size:
        raise _invalid(rule, f"{length} bytes at offset {offset} lie beyond the end of the file")
    return img.read(offset, length)


class SnapshotEntry(NamedTuple):
    """One snapshot table entry as QEMU reads it: the fixed fields, the extra data
    fields QEMU knows (zeros for those the entry lacks), their length, the names,
    and where the entry ends (the table's size is the last one's end)."""

    entry: Any  # SNAPSHOT fields
    extra: Any  # SNAPSHOT_EXTRA fields
    known: int  # bytes of extra data QEMU reads: up to SNAPSHOT_EXTRA.size
    id: str
    name: str
    end: int


def _snapshot_entries(img: Image, hdr: Any) -> Iterator[SnapshotEntry]:
    """The snapshot table's entries (nb_snapshots is capped by _check_header).
    Entries are 8-byte aligned; each is sized before its variable part is read,
    and of its extra data only the fields QEMU knows are read."""
    offset, table_length = hdr.snapshots_offset, 0
    table = img.walker()

    def read(offset: int, length: int) -> bytes:
        return _read_within_file(table, offset, length, "snapshot-table-beyond-file")

    for _ in range(hdr.nb_snapshots):
        offset, table_length = _align8(offset), _align8(table_length)
        entry = SNAPSHOT.unpack(read(offset, SNAPSHOT.size))
        offset += SNAPSHOT.size
        if entry.extra_data_size > MAX_SNAPSHOT_EXTRA_DATA:
            raise _invalid("snapshot-extra-data-too-large", f"snapshot extra data of {entry.extra_data_size} bytes")
        table_length += SNAPSHOT.size + entry.extra_data_size + entry.id_str_size + entry.name_size
        if table_length > MAX_SNAPSHOTS_SIZE:
            raise _invalid("snapshot-table-too-large", f"snapshot table exceeds {MAX_SNAPSHOTS_SIZE} bytes")
        known = min(entry.extra_data_size, SNAPSHOT_EXTRA.size)
        extra = SNAPSHOT_EXTRA.unpack(read(offset, known).ljust(SNAPSHOT_EXTRA.size, b"\0"))
        offset += entry.extra_data_size
        names = read(offset, entry.id_str_size + entry.name_size)
        offset += len(names)
        yield SnapshotEntry(
            entry, extra, known, cstring(names[: entry.id_str_size]), cstring(names[entry.id_str_size :]), offset
        )


def _snapshots(img: Image, hdr: Any) -> tuple[Snapshot, ...]:
    """The snapshot table, as qemu-img info lists it."""
    return tuple(
        Snapshot(
            id=sn.id,
            name=sn.name,
            vm_state_size=_int64(sn.extra.vm_state_size_large if sn.known >= 8 else sn.entry.vm_state_size),
            date_sec=sn.entry.date_sec,
            date_nsec=sn.entry.date_nsec,
            vm_clock_nsec=sn.entry.vm_clock_nsec,
            icount=_int64(sn.extra.icount)
            if sn.known == SNAPSHOT_EXTRA.size and sn.extra.icount != NO_ICOUNT
            else None,
        )
        for sn in _snapshot_entries(img, hdr)
    )


def _bitmaps(img: Image, hdr: Any, ext: Any) -> list[dict[str, Any]]:
    """qemu-img's bitmap list, checked as QEMU loads it: the whole directory first,
    then each bitmap (unique name; unless in use, its table)."""
    bitmaps: list[dict[str, Any]] = []
    names: set[str] = set()  # up to 65535 bitmaps: no pairwise comparison
    for entry, name in _bitmap_directory(img, hdr, ext):
        if name in names:
            raise _invalid("bitmap-duplicate-name", f"two bitmaps are named {name!r}")
        names.add(name)
        if not entry.flags & BITMAP_IN_USE:
            _check_bitmap_table(img, hdr, entry)
        flags = [flag for bit, flag in ((BITMAP_IN_USE, "in-use"), (BITMAP_AUTO, "auto")) if entry.flags & bit]
        bitmaps.append({"flags": flags, "name": name, "granularity": 1 << entry.granularity_bits})
    return bitmaps


def _bitmap_directory(img: Image, hdr: Any, ext: Any) -> list[tuple[Any, str]]:
    """(entry, name) of each bitmap directory entry, with QEMU's checks on each."""
    if ext.directory_size == 0:
        raise _invalid("bitmap-directory-empty", "bitmap directory size is zero")
    directory = _read_within_file(img, ext.directory_offset, ext.directory_size, "bitmap-directory-beyond-file")
    entries: list[tuple[Any, str]] = []
    position = 0
    while position < len(directory):  # at most nb_bitmaps (<= 65535) rounds
        if position + BITMAP_ENTRY.size > len(directory):
            raise _invalid("bitmap-directory-broken", "bitmap directory ends inside an entry")
        if len(entries) == ext.nb_bitmaps:
            raise _invalid("bitmap-count", "more bitmaps in the directory than the extension says")
        entry = BITMAP_ENTRY.unpack(directory, position)
        entry_size = _align8(BITMAP_ENTRY.size + entry.name_size + entry.extra_data_size)
        if position + entry_size > len(directory):
            raise _invalid("bitmap-directory-broken", "bitmap directory ends inside an entry")
        if entry.extra_data_size:
            raise _invalid("bitmap-extra-data", "bitmap extra data is not supported")
        _check_bitmap(hdr, entry)
        name_start = position + BITMAP_ENTRY.size
        entries.append((entry, cstring(directory[name_start : name_start + entry.name_size])))
        position += entry_size
    if len(entries) != ext.nb_bitmaps:
        raise _invalid("bitmap-count", "fewer bitmaps in the directory than the extension says")
    return entries


def _check_bitmap_table(img: Image, hdr: Any, entry: Any) -> None:
    """QEMU loads a bitmap that is not in use: its table must have one entry per
    cluster of the bitmap serialized in 64-bit words, each entry a valid cluster
    pointer (QEMU reads zeros past the end of the file, so a short table is not
    an error). The size is checked first, so a bogus table is never read."""
    cluster_size = 1 << hdr.cluster_bits
    length = hdr.size // SECTOR * SECTOR
    words = ((length - 1) >> entry.granularity_bits >> 6) + 1 if length else 0
    if -(-words * 8 // cluster_size) != entry.bitmap_table_size:
        raise _invalid("bitmap-table-size", f"bitmap table of {entry.bitmap_table_size} clusters does not fit the disk")
    table = img.read(entry.bitmap_table_offset, entry.bitmap_table_size * 8, exact=False)
    for (value,) in struct.iter_unpack(">Q", table + bytes(-len(table) % 8)):
        if not _valid_bitmap_table_entry(value, cluster_size):
            raise _invalid("bitmap-table-entry", f"bitmap table entry {value:#x} is invalid")


def _valid_bitmap_table_entry(value: int, cluster_size: int) -> bool:
    """QEMU's check_table_entry: no reserved bits; a cluster offset, when there is
    one, aligned and without the all-ones flag."""
    offset = value & BITMAP_TABLE_OFFSET
    return not (value & BITMAP_TABLE_RESERVED or (offset and (value & BITMAP_TABLE_ALL_ONES or offset % cluster_size)))


def _check_bitmap(hdr: Any, entry: Any) -> None:
    """QEMU's constraints on one bitmap directory entry (check_dir_entry)."""
    cluster_size = 1 << hdr.cluster_bits
    table_bytes = entry.bitmap_table_size * cluster_size
    broken = (
        entry.bitmap_table_size == 0
        or entry.bitmap_table_offset == 0
        or entry.bitmap_table_offset % cluster_size
        or entry.bitmap_table_size > BITMAP_MAX_TABLE_SIZE
        or entry.granularity_bits not in BITMAP_GRANULARITY_BITS
        or entry.flags & BITMAP_RESERVED_FLAGS
        or entry.name_size > BITMAP_MAX_NAME
        or entry.type != BITMAP_DIRTY_TRACKING
        or table_bytes > BITMAP_MAX_PHYS_SIZE
        or (not entry.flags & BITMAP_IN_USE and hdr.size // SECTOR * SECTOR > table_bytes * 8 << entry.granularity_bits)
    )
    if broken:
        raise _invalid("bitmap-entry", "a bitmap directory entry breaks QEMU's constraints")


def _luks(img: Image, crypto: Any) -> dict[str, Any]:
    """qemu-img's ``encrypt`` object: the LUKS1 header the extension points to,
    checked and described by storprobe.luks1, in qemu-img's key order."""
    if crypto.length < LUKS1_HEADER_SIZE:
        raise _invalid("luks-outside-extension", f"LUKS header does not fit the {crypto.length} bytes reserved")
    info = luks_specific(img.read(crypto.offset, LUKS1_HEADER_SIZE)) | {"format": "luks"}
    return {key: info[key] for key in LUKS_KEYS if key in info}


def features(img: Image) -> Features:
    hdr = _header(img)
    ext = _read_extensions(img, hdr)
    incompat, v3 = hdr.incompatible_features, hdr.version == 3
    data_file = None
    if incompat & INCOMPAT_DATA_FILE:
        data_file = DataFile(ext.data_file, bool(hdr.autoclear_features & AUTOCLEAR_DATA_FILE_RAW))
    elif hdr.autoclear_features & AUTOCLEAR_DATA_FILE_RAW:
        raise _invalid("data-file-raw-without-data-file", "data-file-raw is set but the image has no data file")
    encrypt = None
    if hdr.crypt_method == CRYPT_AES:
        encrypt = {"format": "aes"}
    elif ext.crypto is not None:
        encrypt = _luks(img, ext.crypto)
    elif hdr.crypt_method == CRYPT_LUKS:  # qemu-img 7.2 info crashes on such an image
        raise _invalid("crypto-header-missing", "LUKS encryption without the header extension locating its header")
    # qemu-img 7.2's key order (its dictionaries iterate in hash order); absent values are left out
    specific: dict[str, Any] = {
        "compat": "1.1" if v3 else "0.10",
        "compression-type": COMPRESSION_TYPES[hdr.compression_type],
    }
    flags = None  # libvirt's <features>: none for v2
    if v3:
        lazy_refcounts = bool(hdr.compatible_features & COMPAT_LAZY_REFCOUNTS)
        extended_l2 = bool(incompat & INCOMPAT_EXTENDED_L2)
        specific["lazy-refcounts"] = lazy_refcounts
        if ext.bitmaps:
            specific["bitmaps"] = _bitmaps(img, hdr, ext.bitmaps)
        flags = tuple([flag for flag, on in (("lazy_refcounts", lazy_refcounts), ("extended_l2", extended_l2)) if on])
    specific["refcount-bits"] = 1 << hdr.refcount_order
    if v3 and ext.data_file is not None:
        specific["data-file"] = ext.data_file
    if encrypt is not None:
        specific["encrypt"] = encrypt
    if v3:
        if data_file is not None:
            specific["data-file-raw"] = data_file.raw
        specific["corrupt"] = bool(incompat & INCOMPAT_CORRUPT)
        specific["extended-l2"] = extended_l2
    snapshots = _snapshots(img, hdr) if hdr.nb_snapshots else ()  # read and checked, as QEMU's open does
    details = _details(hdr, ext)
    if data_file is not None and snapshots:  # the spec rules snapshots out here; qemu-img lists none
        details["snapshots-ignored"] = len(snapshots)
        snapshots = ()
    return Features(
        cluster_size=1 << hdr.cluster_bits,
        dirty=bool(incompat & INCOMPAT_DIRTY),
        compat="1.1" if v3 else None,  # libvirt writes <compat> for v3 images only
        flags=flags,
        snapshots=snapshots,
        data_file=data_file,
        specific=specific,
        details=details,
    )


def _details(hdr: Any, ext: Extensions) -> dict[str, Any]:
    """storprobe's extras: raw feature bits, unknown incompatible features by name
    (QEMU refuses to open such images), where the backing name and LUKS header are."""
    details: dict[str, Any] = {"header-length": hdr.header_length}
    if hdr.version == 3:
        details["incompatible-features"] = hdr.incompatible_features
        details["compatible-features"] = hdr.compatible_features
        details["autoclear-features"] = hdr.autoclear_features
    unknown = hdr.incompatible_features & ~INCOMPAT_KNOWN
    if unknown:
        names = ext.feature_names
        bits = [bit for bit in range(64) if unknown & 1 << bit]
        details["unknown-incompatible-features"] = [names.get(bit, f"bit {bit}") for bit in bits]
    if hdr.backing_file_offset:
        details["backing-file-offset"] = hdr.backing_file_offset
    if ext.crypto is not None:
        details["encryption-header"] = {"offset": ext.crypto.offset, "length": ext.crypto.length}
    return details


def size(img: Image) -> int:
    """QEMU keeps the size in whole 512-byte sectors, rounding down."""
    return _header(img).size // SECTOR * SECTOR


def backing(img: Image) -> Backing | None:
    hdr = _header(img)
    if not hdr.backing_file_offset:
        return None
    cluster_size = 1 << hdr.cluster_bits
    if hdr.backing_file_size > min(MAX_BACKING_NAME, cluster_size - hdr.backing_file_offset):
        raise _invalid("backing-name-too-long", f"backing file name of {hdr.backing_file_size} bytes")
    name = cstring(img.read(hdr.backing_file_offset, hdr.backing_file_size))
    return Backing(name, _read_extensions(img, hdr).backing_format or None) if name else None


def hazards(img: Image, info: ImageInfo) -> Iterator[Hazard]:
    """What QEMU itself refuses or distrusts in a qcow2 image: incompatible
    feature bits it does not know (the image may mean something it cannot
    read), and the corrupt bit (its metadata is known to be inconsistent)."""
    if info.format != "qcow2":
        return
    unknown = info.details.get("unknown-incompatible-features")
    if unknown:
        yield Hazard(
            "qcow2.unknown-feature",
            f"unknown incompatible feature(s) {', '.join(map(repr, unknown))}: QEMU refuses such an image",
        )
    if info.details.get("incompatible-features", 0) & INCOMPAT_CORRUPT:
        yield Hazard(
            "qcow2.corrupt",
            "the corrupt bit is set: its metadata is known to be inconsistent (QEMU opens it read-only)",
        )


def plain(head: bytes) -> tuple[tuple[int, ...], int] | None:
    """A scan's fast path (the row's ``plain``): the key and virtual size of a
    plain image, told from its head by the same rules the callbacks above apply:
    no backing file, encryption, snapshots, data file or bitmaps to load, no
    unknown incompatible feature, every check passing, every extension it reads
    inside ``head``. Its record then follows from the header fields in the key;
    None for any other image (the general path describes it, or names its error)."""
    try:
        hdr = _header_of(head)
    except ProbeError:
        return None
    if (
        hdr.backing_file_offset
        or hdr.crypt_method
        or hdr.nb_snapshots
        or hdr.incompatible_features & ~INCOMPAT_PLAIN
        or hdr.autoclear_features & AUTOCLEAR_DATA_FILE_RAW
        or not _plain_extensions(head, hdr)
    ):
        return None
    key = (
        hdr.version,
        hdr.cluster_bits,
        hdr.refcount_order,
        hdr.compression_type,
        hdr.incompatible_features,
        hdr.compatible_features,
        hdr.autoclear_features,
        hdr.header_length,
    )
    return key, hdr.size // SECTOR * SECTOR


#: Header extensions a plain image may carry: the feature name table, and types QEMU ignores.
_NOT_PLAIN_EXTENSIONS = frozenset({EXT_BACKING_FORMAT, EXT_CRYPTO, EXT_BITMAPS, EXT_DATA_FILE})
_EXTENSION_HEAD = struct.Struct(">II")


def _plain_extensions(head: bytes, hdr: Any) -> bool:
    """Whether the extensions of a header with no backing file are walked, as
    :func:`_extensions` walks them, inside ``head`` and hold none that a plain image lacks."""
    end = 1 << hdr.cluster_bits
    offset = hdr.header_length
    available = len(head)
    while offset < end:
        if offset + 8 > available:
            return False
        kind, length = _EXTENSION_HEAD.unpack_from(head, offset)
        offset += 8
        if offset > end or length > end - offset or kind in _NOT_PLAIN_EXTENSIONS:
            return False  # extension-too-large, or one a plain image lacks
        if kind == EXT_END:
            return True
        if kind == EXT_FEATURE_NAMES and offset + length > available:
            return False  # read whole by the general path
        offset += length + 7 & ~7  # _align8, inline: every scanned volume walks this
    return True


# --------------------------------------------------------------------------------------
# Data path: the guest-to-host map (L1 and L2 tables), read as QEMU 7.2 reads it
# (block/qcow2-cluster.c qcow2_get_host_offset, qcow2.h qcow2_get_subcluster_type,
# qcow2_co_block_status, block/qcow2-threads.c for compressed clusters).
# --------------------------------------------------------------------------------------

L1E_OFFSET_MASK = 0x00FFFFFFFFFFFE00
L2E_OFFSET_MASK = 0x00FFFFFFFFFFFE00
REFT_OFFSET_MASK = 0xFFFFFFFFFFFFFE00
OFLAG_COMPRESSED = 1 << 62
OFLAG_ZERO = 1 << 0  # standard L2 entries only; extended ones keep zero bits in the bitmap
#: Bytes of the L1 table read (and cached) at once.
L1_PIECE = 64 * 1024
#: Compressed data is located in 512-byte sectors (QEMU's QCOW2_COMPRESSED_SECTOR_SIZE).
COMPRESSED_SECTOR = 512
#: Most bytes of compressed clusters inflated together (and kept until the next batch), and
#: the threads that inflate them (QEMU's qemu-img convert inflates on its thread pool too).
INFLATE_BATCH_BYTES = 4 * 1024 * 1024
INFLATE_THREADS = 4
#: zlib's window for qcow2's raw deflate streams (QEMU inflates with windowBits -12).
ZLIB_WBITS = -12
#: Bits a plain data cluster's standard L2 entry may have besides its offset: COPIED only.
PLAIN_DATA_FLAGS = ~((1 << 63) | L2E_OFFSET_MASK) % 2**64
#: Each byte value -> 1 when non-zero (for counting non-zero refcounts a table at a time).
_NONZERO = bytes([0] + [1] * 255)


@functools.cache  # made when a check first needs it, not at import
def _nonzero_fields(bits: int) -> bytes:
    """For refcounts of ``bits`` (1, 2 or 4) bits: each byte value -> how many of its refcounts are non-zero."""
    return bytes(sum(1 for k in range(8 // bits) if value >> (bits * k) & ((1 << bits) - 1)) for value in range(256))


def _map_error(rule: str, message: str) -> "DataPathError":
    from storprobe.blockmap import DataPathError

    return DataPathError(message, code=f"qcow2.{rule}")


class Qcow2Map:
    """The block map of a qcow2 image: cluster types, host offsets, and the
    bytes of compressed clusters. Every table is read through the chain's
    bounded cache; offsets QEMU refuses (unaligned tables and clusters, zero
    clusters in a version 2 image, invalid subcluster bitmaps) are named
    errors; reserved bits QEMU's reader ignores are ignored here too."""

    def __init__(self, img: Image, info: ImageInfo, host: "HostFile") -> None:
        hdr = _header(img)
        if hdr.incompatible_features & ~INCOMPAT_KNOWN:
            raise _map_error("unknown-feature", "unknown incompatible features: QEMU does not read this image")
        self.host, self.size = host, info.virtual_size
        self.v2 = hdr.version == 2
        self.cluster_bits = hdr.cluster_bits
        self.cluster_size = 1 << hdr.cluster_bits
        self.extended = bool(hdr.incompatible_features & INCOMPAT_EXTENDED_L2)
        self.entry_size = 16 if self.extended else 8
        self.l2_entries = self.cluster_size // self.entry_size
        self.l1_span = self.l2_entries * self.cluster_size  # guest bytes one L1 entry maps
        self.subcluster_size = self.cluster_size // SUBCLUSTERS if self.extended else self.cluster_size
        self.l1_offset, self.l1_size = hdr.l1_table_offset, hdr.l1_size
        self.compression = hdr.compression_type
        self.csize_shift = 62 - (hdr.cluster_bits - 8)
        self.csize_mask = (1 << (hdr.cluster_bits - 8)) - 1
        self.refcount = (hdr.refcount_order, hdr.refcount_table_offset, hdr.refcount_table_clusters)
        self._preallocated: bool | None = None
        self._batch: Batch = _NO_BATCH  # the compressed clusters being read
        self._next_batch: Batch | None = None  # the batch after them, once started
        self._spare: list[bytearray] = []  # a batch's buffer its tasks are done with, for the next batch
        self._runs: tuple[int, int] | None = None  # the repunit and steps of a table of consecutive clusters
        self._zeros = bytes(self.cluster_size)

    # -- tables ------------------------------------------------------------------------

    def _l1_piece(self, l1_index: int) -> tuple[bytes, int]:
        """The piece of the L1 table (read and cached at once) that holds entry
        ``l1_index`` (below ``l1_size``), and that entry's byte in it."""
        at = l1_index * 8
        piece = at - at % L1_PIECE
        return self.host.table(self.l1_offset + piece, min(L1_PIECE, self.l1_size * 8 - piece)), at - piece

    def _l2_table(self, l1_index: int) -> bytes | None:
        """The L2 table of L1 entry ``l1_index``, None when it has none."""
        if l1_index >= self.l1_size:
            return None
        table, at = self._l1_piece(l1_index)
        l2_offset = int.from_bytes(table[at : at + 8], "big") & L1E_OFFSET_MASK
        if not l2_offset:
            return None
        if l2_offset % self.cluster_size:
            raise _map_error(
                "l2-offset-unaligned", f"L2 table offset {l2_offset:#x} unaligned (L1 index {l1_index:#x})"
            )
        return self.host.table(l2_offset, self.cluster_size)

    def _zero_l1_entries(self, l1_index: int) -> int:
        """How many L1 entries from ``l1_index`` on are zero (at least 1), within
        the piece of the table that holds it."""
        if l1_index >= self.l1_size:
            return 1
        table, at = self._l1_piece(l1_index)
        rest = table[at:]
        return max(1, (len(rest) - len(rest.lstrip(b"\0"))) // 8)

    def _entry(self, table: bytes, index: int) -> tuple[int, int]:
        at = index * self.entry_size
        bitmap = int.from_bytes(table[at + 8 : at + 16], "big") if self.extended else 0
        return int.from_bytes(table[at : at + 8], "big"), bitmap

    # -- extents -----------------------------------------------------------------------

    def extents(self, start: int, length: int, *, want_zero: bool = True) -> "Iterator[Extent]":
        from storprobe.blockmap import Extent

        end = start + length
        while start < end:
            l1_index = start // self.l1_span
            stop = min(end, (l1_index + 1) * self.l1_span)
            table = self._l2_table(l1_index)
            if table is None:  # and so for every zero L1 entry after it: one extent (a sparse 64 TiB disk is 2**21)
                stop = min(end, (l1_index + self._zero_l1_entries(l1_index)) * self.l1_span)
                yield Extent(start, stop - start, False, False)
            else:
                for extent in self._merged(self._clusters(table, l1_index, start, stop)):
                    if want_zero and extent.data and extent.host_offset is not None and self.preallocated():
                        yield from self._split_by_holes(extent)
                    else:
                        yield extent
            start = stop

    def _clusters(self, table: bytes, l1_index: int, start: int, stop: int) -> "Iterator[Extent]":
        """One extent per cluster (per run of like subclusters) of ``[start, stop)``."""
        from storprobe.blockmap import Extent

        first = l1_index * self.l1_span
        cs = self.cluster_size
        index = (start - first) // cs
        last = (stop - 1 - first) // cs
        first_byte, end_byte = index * self.entry_size, (last + 1) * self.entry_size
        if table[first_byte:end_byte] == bytes(end_byte - first_byte):
            yield Extent(start, stop - start, False, False)  # an L2 range with nothing allocated
            return
        if not self.extended:
            yield from self._standard_runs(table, l1_index, start, stop)
            return
        for i in range(index, last + 1):
            yield from self._one_cluster(table, l1_index, i, start, stop)

    def _consecutive(self, table: bytes, at: int, most: int, entry: int) -> int:
        """How many entries from byte ``at`` (at most ``most``) continue ``entry``
        cluster by cluster. ``m`` entries do when, read as one big-endian
        integer, they are ``entry`` times the m-word repunit plus the steps 0,
        cs, 2cs ...: the longest such prefix is found by doubling, then bisection."""
        from array import array

        if self._runs is None:
            n = self.l2_entries
            words = array("Q", range(0, n * self.cluster_size, self.cluster_size))
            if sys.byteorder == "little":
                words.byteswap()
            self._runs = (int.from_bytes((1).to_bytes(8, "big") * n, "big"), int.from_bytes(words.tobytes(), "big"))
        repunit, steps = self._runs

        def continues(m: int) -> bool:
            shift = 64 * (self.l2_entries - m)
            return int.from_bytes(table[at : at + 8 * m], "big") == entry * (repunit >> shift) + (steps >> shift)

        last = int.from_bytes(table[at + 8 * most - 8 : at + 8 * most], "big")
        if last == entry + (most - 1) * self.cluster_size and continues(most):  # preallocated, sequential writes
            return most
        low, high = 1, 2  # else by doubling, so that a short run costs little
        while high < most and continues(high):
            low, high = high, 2 * high
        high = min(high, most)
        while high - low > 1:  # continues(low), not continues(high)
            middle = (low + high) // 2
            low, high = (middle, high) if continues(middle) else (low, middle)
        return low

    def _empty_entries(self, entries: bytes) -> int:
        """How many 8-byte entries at the start of ``entries`` are zero (at least one is):
        whole prefixes compared with zeros (memcmp), the first non-zero byte bisected."""
        if entries == self._zeros[: len(entries)]:
            return len(entries) // 8
        low, high = 8, len(entries)  # the first ``low`` bytes are zero, the first ``high`` are not
        while high - low > 1:
            middle = (low + high) // 2
            low, high = (middle, high) if entries[:middle] == self._zeros[:middle] else (low, middle)
        return low // 8

    def _one_cluster(self, table: bytes, l1_index: int, i: int, start: int, stop: int) -> "Iterator[Extent]":
        """The extents of cluster ``i`` of an L2 table, within ``[start, stop)``."""
        from storprobe.blockmap import Extent

        entry, bitmap = self._entry(table, i)
        c_start = l1_index * self.l1_span + i * self.cluster_size
        lo, hi = max(start, c_start) - c_start, min(stop, c_start + self.cluster_size) - c_start
        for s, e, data, zero, host, compressed in self._cluster(entry, bitmap, l1_index, i, lo, hi):
            yield Extent(c_start + s, e - s, data, zero, None if host is None else host + s, compressed)

    def _standard_runs(self, table: bytes, l1_index: int, start: int, stop: int) -> "Iterator[Extent]":
        """:meth:`_clusters` for standard (8-byte) entries, a run at a time: a run
        of empty entries is found by one search, a run of plain data clusters at
        consecutive host offsets by comparing entries; any other entry (zero,
        compressed, flagged, unaligned) goes through :meth:`_one_cluster`."""
        from array import array

        from storprobe.blockmap import Extent

        cs, first = self.cluster_size, l1_index * self.l1_span
        index, end = (start - first) // cs, (stop - 1 - first) // cs + 1
        words = array("Q", table[index * 8 : end * 8])
        if sys.byteorder == "little":
            words.byteswap()
        i, count = 0, len(words)
        while i < count:
            entry = words[i]
            at = first + (index + i) * cs
            if entry == 0:
                j = i + self._empty_entries(table[(index + i) * 8 : end * 8])
                yield _clipped(Extent(at, (j - i) * cs, False, False), start, stop)
            elif entry & PLAIN_DATA_FLAGS == 0 and entry % cs == 0 and entry & L2E_OFFSET_MASK:
                j = i + self._consecutive(table, (index + i) * 8, count - i, entry)
                host = entry & L2E_OFFSET_MASK
                yield _clipped(Extent(at, (j - i) * cs, True, False, host), start, stop)
            elif entry & OFLAG_COMPRESSED:  # what _one_cluster gives, without its per-cluster generators
                j = i + 1
                yield _clipped(Extent(at, cs, True, False, None, True), start, stop)
            else:
                j = i + 1
                yield from self._one_cluster(table, l1_index, index + i, start, stop)
            i = j

    def _cluster(
        self, entry: int, bitmap: int, l1_index: int, index: int, lo: int, hi: int
    ) -> Iterator[tuple[int, int, bool, bool, int | None, bool]]:
        """(start, end, data, zero, host cluster offset, compressed) runs of one
        cluster's bytes ``[lo, hi)`` (offsets into the cluster)."""
        if entry & OFLAG_COMPRESSED:
            yield lo, hi, True, False, None, True
            return
        host = entry & L2E_OFFSET_MASK
        if not self.extended:
            zero = bool(entry & OFLAG_ZERO)
            if zero and self.v2:
                raise _map_error(
                    "zero-cluster-in-v2", f"zero cluster entry in a version 2 image (L1 index {l1_index:#x}, "
                    f"L2 index {index:#x})"
                )
            if host:
                self._check_aligned(host, l1_index, index)
            yield lo, hi, bool(host) and not zero, zero, host or None, False
            return
        alloc, zeros = bitmap & 0xFFFFFFFF, bitmap >> 32
        if (host and alloc & zeros) or (not host and alloc):
            raise _map_error(
                "invalid-subclusters", f"invalid subcluster bitmap {bitmap:#018x} (L1 index {l1_index:#x}, "
                f"L2 index {index:#x})"
            )
        if host:
            self._check_aligned(host, l1_index, index)
        sc = self.subcluster_size
        s = lo
        while s < hi:
            k = s // sc
            state = (alloc >> k & 1, zeros >> k & 1)
            e = (k + 1) * sc
            while e < hi and (alloc >> (e // sc) & 1, zeros >> (e // sc) & 1) == state:
                e += sc
            e = min(e, hi)
            is_alloc, is_zero = state
            yield s, e, bool(is_alloc and not is_zero), bool(is_zero), host or None, False
            s = e

    def _check_aligned(self, host: int, l1_index: int, index: int) -> None:
        if host % self.cluster_size:
            raise _map_error(
                "cluster-offset-unaligned", f"cluster offset {host:#x} unaligned (L1 index {l1_index:#x}, "
                f"L2 index {index:#x})"
            )

    @staticmethod
    def _merged(extents: "Iterator[Extent]") -> "Iterator[Extent]":
        """Adjacent extents of one status and contiguous host offsets, as one."""
        pending: Extent | None = None
        for extent in extents:
            if (
                pending is not None
                and not extent.compressed
                and not pending.compressed
                and (extent.data, extent.zero) == (pending.data, pending.zero)
                and (extent.host_offset is None) == (pending.host_offset is None)
                and (pending.host_offset is None or extent.host_offset == pending.host_offset + pending.length)
            ):
                pending = pending._replace(length=pending.length + extent.length)
                continue
            if pending is not None:
                yield pending
            pending = extent
        if pending is not None:
            yield pending

    def _split_by_holes(self, extent: "Extent") -> "Iterator[Extent]":
        """A data extent of a preallocated image, where the file has holes (or
        has ended) marked as reading zeros, as QEMU's block status recurses."""
        from storprobe.blockmap import Extent

        assert extent.host_offset is not None
        delta = extent.start - extent.host_offset
        for offset, length, is_data in self.host.holes(extent.host_offset, extent.length):
            yield Extent(offset + delta, length, True, not is_data, offset)

    def preallocated(self) -> bool:
        """QEMU's qcow2_detect_metadata_preallocation: more clusters have a
        refcount than the file system holds (with a margin), so the file is
        sparse under allocated clusters; an unreadable refcount says no."""
        if self._preallocated is None:
            self._preallocated = self._count_refcounted() >= self._threshold()
        return self._preallocated

    def _threshold(self) -> int:
        real_clusters = self.host.allocated_bytes // self.cluster_size
        return max(real_clusters * 10 // 9, real_clusters + 2)

    def _count_refcounted(self) -> int:
        """Clusters of the file with a non-zero refcount, counted up to the
        threshold; 0 when a refcount block QEMU would need is unaligned."""
        order, table_offset, table_clusters = self.refcount
        threshold, cs = self._threshold(), self.cluster_size
        end_cluster = -(-self.host.size() // cs)
        per_block = 1 << (self.cluster_bits - order + 3)
        table_entries = table_clusters * cs // 8
        count = 0
        for block in range(-(-end_cluster // per_block)):
            if count >= threshold:
                break
            if block >= table_entries:
                break
            at = table_offset + block * 8
            piece = at - at % L1_PIECE
            reftable = self.host.table(piece, L1_PIECE)
            offset = int.from_bytes(reftable[at - piece : at - piece + 8], "big") & REFT_OFFSET_MASK
            if not offset:
                continue
            if offset % cs:
                return 0
            entries = min(per_block, end_cluster - block * per_block)
            count += _nonzero_refcounts(self.host.table(offset, cs), 1 << order, entries)
        return count

    # -- reads -------------------------------------------------------------------------

    def read(self, extent: "Extent", offset: int, length: int) -> bytes:
        if not extent.compressed:
            assert extent.host_offset is not None
            return self.host.read(extent.host_offset + offset - extent.start, length)
        cluster = offset - offset % self.cluster_size
        within = offset - cluster
        return bytes(self._inflate(cluster)[within : within + length])

    def read_into(self, extent: "Extent", offset: int, out: memoryview) -> None:
        """:meth:`read` into ``out``: a data cluster's bytes straight from the file, a compressed one's copied
        once from its inflated cluster."""
        if not extent.compressed:
            assert extent.host_offset is not None
            self.host.read_into(extent.host_offset + offset - extent.start, out)
            return
        cluster = offset - offset % self.cluster_size
        within = offset - cluster
        out[:] = self._inflate(cluster)[within : within + len(out)]

    def _inflate(self, cluster: int) -> memoryview:
        """The bytes of the compressed guest cluster at ``cluster``. It is inflated
        with the compressed clusters that follow it in its L2 table (a batch of up
        to :data:`INFLATE_BATCH_BYTES` of output), read and inflated on a few
        threads (pread, zlib and zstd let go of the interpreter while they work);
        an error reading or inflating is raised for the clusters it concerns only.
        Once a second cluster of a batch is asked for (the disk is read in order),
        the batch after it in the table is started too, so that the threads inflate
        while the caller copies: two batches at most are held. A batch is inflated
        into a buffer of its own, reused by a later batch once its tasks are done
        (fresh memory for every cluster cost a page fault every 4 KiB, as the
        allocator gave it back to the system and took it again)."""
        if cluster in self._batch[1]:
            if self._next_batch is None:
                self._next_batch = self._batch_after(self._batch)
        elif self._next_batch is not None and cluster in self._next_batch[1]:
            self._retire(self._batch)
            self._batch = self._next_batch
            self._next_batch = self._batch_after(self._batch)
        else:
            self._retire(self._batch)
            if self._next_batch is not None:
                self._retire(self._next_batch)
            self._batch, self._next_batch = self._start_batch(cluster), None
            if cluster not in self._batch[1]:  # its entry, read again, is no longer a compressed one
                raise SourceError(f"{self.host.name}: an L2 table changed while it was read")
        buffer, clusters = self._batch
        task, place = clusters[cluster]
        error = task.result().get(place)
        if error is not None:  # raised for the cluster it concerns only, as QEMU fails that read
            raise type(error)(str(error), code=error.code)
        return memoryview(buffer)[place * self.cluster_size : (place + 1) * self.cluster_size]

    def _retire(self, batch: "Batch") -> None:
        """``batch`` is no longer read: its buffer is kept for the next batch when
        its tasks are done with it (else it goes once they are)."""
        buffer, clusters = batch
        if clusters and not self._spare and all(task.done() for task, _ in clusters.values()):
            self._spare.append(buffer)

    def _batch_after(self, batch: "Batch") -> "Batch":
        """The batch that follows ``batch`` in its L2 table, started; none at the
        end of the table, nor when reading it fails (the read that needs it says why)."""
        after = max(batch[1]) + self.cluster_size
        if after // self.l1_span != (after - 1) // self.l1_span:
            return _NO_BATCH
        try:
            return self._start_batch(after)
        except ProbeError:
            return _NO_BATCH

    def _start_batch(self, cluster: int) -> "Batch":
        """The compressed clusters from ``cluster`` on (none when its entry is not
        one), being inflated one after another into a buffer in
        :data:`INFLATE_THREADS` tasks of clusters that follow one another."""
        l1_index = cluster // self.l1_span
        table = self._l2_table(l1_index)
        if table is None:
            return _NO_BATCH
        cs = self.cluster_size
        first = (cluster - l1_index * self.l1_span) // cs
        most = min(self.l2_entries - first, max(1, INFLATE_BATCH_BYTES // cs))
        batch: list[tuple[int, int, int]] = []  # (guest cluster, host offset, input bytes)
        for i in range(first, first + most):
            entry, _ = self._entry(table, i)
            if not entry & OFLAG_COMPRESSED:
                break
            offset = entry & ((1 << self.csize_shift) - 1)
            sectors = ((entry >> self.csize_shift) & self.csize_mask) + 1
            size = sectors * COMPRESSED_SECTOR - offset % COMPRESSED_SECTOR  # at most two clusters
            batch.append((cluster + (i - first) * self.cluster_size, offset, size))
        if not batch:
            return _NO_BATCH
        buffer = self._spare.pop() if self._spare else bytearray(max(1, INFLATE_BATCH_BYTES // cs) * cs)
        out, pool, step = memoryview(buffer), _inflate_pool(), -(-len(batch) // INFLATE_THREADS)
        clusters: dict[int, tuple[Future[dict[int, DataPathError]], int]] = {}
        for lo in range(0, len(batch), step):
            parts = batch[lo : lo + step]
            task = pool.submit(self._inflate_many, parts, out[lo * cs : (lo + len(parts)) * cs], lo)
            clusters.update((guest, (task, lo + k)) for k, (guest, _, _) in enumerate(parts))
        return buffer, clusters

    def _inflate_many(
        self, parts: list[tuple[int, int, int]], out: memoryview, place: int
    ) -> "dict[int, DataPathError]":
        """The clusters ``(guest cluster, host offset, input bytes)`` of ``parts``
        inflated into ``out`` one after another, on a thread of the pool; the
        errors, by place in the batch (the first is ``place``). Their input is
        read at once where it lies together (as QEMU writes it), into the
        thread's own buffer; each cluster's alone otherwise."""
        low = min(offset for _, offset, _ in parts)
        high = max(offset + size for _, offset, size in parts)
        if high - low <= 2 * sum(size for _, _, size in parts):
            whole = _input_buffer(high - low)
            self.host.read_into(low, whole)
            inputs = [whole[offset - low : offset - low + size] for _, offset, size in parts]
        else:
            inputs = [memoryview(self.host.read(offset, size)) for _, offset, size in parts]
        cs, errors = self.cluster_size, {}
        for k, data in enumerate(inputs):
            inflated = self._inflate_one(data)
            if isinstance(inflated, bytes):
                out[k * cs : (k + 1) * cs] = inflated
            else:
                errors[place + k] = inflated
        return errors

    def _inflate_one(self, data: bytes | memoryview) -> "bytes | DataPathError":
        """One compressed cluster's bytes, or why they cannot be had."""
        from storprobe.blockmap import DataPathError, inflate_cluster

        try:
            if self.compression:
                out = _zstd(data, self.cluster_size)
            else:
                out = inflate_cluster(data, self.cluster_size, "qcow2", window_bits=ZLIB_WBITS)
        except DataPathError as exc:
            return exc
        if len(out) != self.cluster_size:
            return _map_error("compressed-short", f"a compressed cluster inflates to {len(out)} bytes, "
                                                  f"not a cluster of {self.cluster_size}")
        return out


#: What no compressed cluster is being read from.
_NO_BATCH: "Batch" = (bytearray(), {})
_pool: "tuple[int, ThreadPoolExecutor] | None" = None


def _inflate_pool() -> "ThreadPoolExecutor":
    """The :data:`INFLATE_THREADS` threads every image's compressed clusters are
    inflated on, started when first needed (again in a forked child, which has
    none of its parent's threads)."""
    global _pool
    if _pool is None or _pool[0] != os.getpid():
        from concurrent.futures import ThreadPoolExecutor  # 10 ms to import: only a read of compressed data pays

        _pool = (os.getpid(), ThreadPoolExecutor(INFLATE_THREADS, thread_name_prefix="storprobe-inflate"))
    return _pool[1]


def _clipped(extent: "Extent", start: int, stop: int) -> "Extent":
    """``extent`` (whole clusters) cut to ``[start, stop)``."""
    lo, hi = max(extent.start, start), min(extent.end, stop)
    if (lo, hi) == (extent.start, extent.end):
        return extent
    host = None if extent.host_offset is None else extent.host_offset + lo - extent.start
    return extent._replace(start=lo, length=hi - lo, host_offset=host)


def _zstd(data: bytes | memoryview, cluster_size: int) -> bytes:
    """A zstd frame decompressed to one cluster. A frame that holds more is
    refused, as QEMU refuses it (its frame must end with the cluster); one that
    holds less too (QEMU would read on into whatever frame follows: it writes
    one frame per cluster). Output never exceeds a cluster: a declared content
    size is checked before anything is decompressed."""
    from storprobe.blockmap import MissingExtra

    try:
        import zstandard
    except ImportError:
        raise MissingExtra(
            "the image's compressed clusters are zstd: install storprobe[zstd] (the zstandard package)"
        ) from None
    try:
        declared = zstandard.get_frame_parameters(data).content_size
        if declared != zstandard.CONTENTSIZE_UNKNOWN and declared > cluster_size:
            raise _map_error("compressed-too-long", f"a zstd frame of {declared} bytes, a cluster of {cluster_size}")
        if declared != zstandard.CONTENTSIZE_UNKNOWN and declared < cluster_size:
            raise _map_error("compressed-short", f"a zstd frame of {declared} bytes in a {cluster_size}-byte cluster")
        return _zstd_decompressor(zstandard).decompress(data, max_output_size=cluster_size)
    except zstandard.ZstdError as exc:
        if "full frame" in str(exc):  # more output than max_output_size
            raise _map_error("compressed-too-long", "a zstd frame holds more than one cluster") from None
        raise _map_error("compressed-corrupt", f"compressed cluster does not decompress: {exc}") from None


_threads: Any = None  # a threading.local: what each thread that inflates keeps


def _thread_state() -> Any:
    """This thread's state for inflating: its zstd decompressor, its input buffer."""
    global _threads
    if _threads is None:
        import threading

        _threads = threading.local()
    return _threads


def _zstd_decompressor(zstandard: Any) -> Any:
    """This thread's zstd decompressor, made once (making one costs a fifth of
    decompressing a 64 KiB cluster; each decompress starts afresh)."""
    state = _thread_state()
    decompressor = getattr(state, "decompressor", None)
    if decompressor is None:
        decompressor = state.decompressor = zstandard.ZstdDecompressor()
    return decompressor


def _input_buffer(size: int) -> memoryview:
    """``size`` bytes of this thread's buffer for compressed input, reused from
    one batch to the next (made anew only when a larger one is needed)."""
    state = _thread_state()
    buffer = getattr(state, "input", None)
    if buffer is None or len(buffer) < size:
        buffer = state.input = bytearray(size)
    return memoryview(buffer)[:size]


def _nonzero_refcounts(block: bytes, bits: int, entries: int) -> int:
    """How many of the first ``entries`` refcounts of ``bits`` bits in ``block`` are not zero."""
    if bits >= 8:
        width = bits // 8
        used = block[: entries * width]
        combined = 0
        for byte in range(width):
            combined |= int.from_bytes(used[byte::width].translate(_NONZERO), "big")
        return combined.bit_count()
    per_byte = 8 // bits  # sub-byte refcounts, the low bits of a byte first (as QEMU stores them)
    whole, rest = divmod(entries, per_byte)
    count = sum(block[:whole].translate(_nonzero_fields(bits)))
    if rest:
        count += _nonzero_fields(bits)[block[whole] & ((1 << bits * rest) - 1)]
    return count


def block_map(img: Image, info: ImageInfo, host: "HostFile") -> Qcow2Map:
    return Qcow2Map(img, info, host)


@hookimpl
def storprobe_formats() -> list[FormatSpec]:
    return [
        FormatSpec(
            name="qcow2",
            description="QEMU copy-on-write v2/v3",
            magic=b"QFI\xfb",
            endian=">",
            version_offset=4,
            versions=(2, 3),
            crypt_offset=32,
            crypt_methods={CRYPT_AES: "aes", CRYPT_LUKS: "luks"},
            libvirt=LibvirtFacts(cluster_size=True),
            size=size,
            backing=backing,
            features=features,
            hazards=hazards,
            plain=plain,
            measure=measure,
            block_map=block_map,
            check=check,
        )
    ]


# ===========================================================================
# verify: the refcount walk of ``qemu-img check`` (QEMU 7.2's qcow2_co_check
# without repair). References to every cluster are counted from the header,
# the active and snapshot L1/L2 tables, the snapshot table, the refcount table
# and blocks, the LUKS header and the bitmaps, then compared with the refcounts
# the image records; each rule counts a corruption, a leak or a check error
# exactly where QEMU counts one. Memory: one array with an entry per cluster of
# the file (its size, never a pointer in it, decides), at the image's refcount
# width rounded up to a byte; reads go through the check's bounded reader.
# ===========================================================================

# (the offset masks, OFLAG_COMPRESSED, OFLAG_ZERO and COMPRESSED_SECTOR are the data path's, above)
L1E_RESERVED_MASK, L2E_STD_RESERVED_MASK, REFT_RESERVED_MASK = 0x7F000000000001FF, 0x3F000000000001FE, 0x1FF
OFLAG_COPIED = 1 << 63
SUBCLUSTER_ALLOC_BITS = (1 << SUBCLUSTERS) - 1  # an extended L2 bitmap's allocation half
#: Clusters in the file from which the L2 walk is vectorised with numpy, when it is installed.
NUMPY_MIN_CLUSTERS = 1 << 17
FAST_RUN_FLAGS = ~(OFLAG_COPIED | L2E_OFFSET_MASK) % UINT64  # bits a plain data cluster entry leaves clear
#: Array type codes holding a refcount of 2**refcount_order bits (narrower ones take a byte each).
REFCOUNT_TYPECODES = {0: "B", 1: "B", 2: "B", 3: "B", 4: "H", 5: "I", 6: "Q"}


@functools.cache  # made when a check first needs it, not at import
def _sub_byte_expansion(order: int) -> list[bytes]:
    """Each byte value of a sub-byte refcount block (refcount_order 0..2) as one byte
    per refcount: QEMU packs them from each byte's low bits up."""
    return [bytes((value >> shift) & ((1 << (1 << order)) - 1) for shift in range(0, 8, 1 << order))
            for value in range(256)]


@functools.cache
def _numpy() -> Any:
    """numpy, when installed (the ``fast`` extra), for whole L2 tables at once;
    None without it. Imported on the first check, never at start-up."""
    try:
        import numpy
    except ImportError:
        return None
    return numpy


def _words(data: bytes, typecode: str = "Q") -> "array":
    """``data`` as big-endian unsigned integers of ``typecode``'s width."""
    from array import array

    words = array(typecode, data)
    if words.itemsize > 1 and sys.byteorder == "little":
        words.byteswap()
    return words


class _RefcountWalk:
    """One check of one image: the in-memory refcounts (QEMU's IMRT) and the counts of the result."""

    def __init__(self, hdr: Any, ext: Extensions, reader: "CheckReader") -> None:
        from array import array

        from storprobe.verify import CheckFailed

        self.hdr, self.ext, self.reader = hdr, ext, reader
        self.cluster_bits = hdr.cluster_bits
        self.cluster_size = 1 << hdr.cluster_bits
        self.file_length = reader.size
        self.nb_clusters = -(-self.file_length // self.cluster_size)
        if self.nb_clusters > INT_MAX:
            raise CheckFailed(f"Check failed: File too large ({self.nb_clusters} clusters)")
        self.extended = bool(hdr.incompatible_features & INCOMPAT_EXTENDED_L2)
        self.data_file = bool(hdr.incompatible_features & INCOMPAT_DATA_FILE)
        self.order = hdr.refcount_order
        self.refcount_max = (1 << (1 << self.order)) - 1
        self.typecode = REFCOUNT_TYPECODES[self.order]
        # a reference may reach less than a cluster past the end: one spare entry
        self.counts = array(self.typecode, [0]) * (self.nb_clusters + 1)
        self.size = self.nb_clusters  # entries in use, QEMU's refcount_table_size of the IMRT
        self.l2_entries = self.cluster_size // (16 if self.extended else 8)
        # what sends an L2 entry to the rule-by-rule path: compressed, reserved bits, unaligned, a data file
        unaligned = (self.cluster_size - 1) & L2E_OFFSET_MASK
        self.unusual_bits = OFLAG_COMPRESSED | L2E_STD_RESERVED_MASK | unaligned | (UINT64 - 1 if self.data_file else 0)
        self.zero_cluster = bytes(self.cluster_size)
        self.zero_run = array(self.typecode, [0]) * self.l2_entries
        self.one_run = array(self.typecode, [1]) * self.l2_entries
        # a table of consecutive clusters from entry E, read as one big-endian integer, is E * repunit + steps
        self.run_repunit = int.from_bytes((1).to_bytes(8, "big") * self.l2_entries, "big")
        steps = array("Q", range(0, self.l2_entries * self.cluster_size, self.cluster_size))
        if sys.byteorder == "little":
            steps.byteswap()
        self.run_steps = int.from_bytes(steps.tobytes(), "big")
        self.csize_shift = 62 - (self.cluster_bits - 8)
        self.csize_mask = (1 << (self.cluster_bits - 8)) - 1
        self.coffset_mask = (1 << self.csize_shift) - 1
        self.refblock_bits = self.cluster_bits + 3 - self.order  # clusters one refcount block covers
        self.reftable = _words(reader.read(hdr.refcount_table_offset, hdr.refcount_table_clusters * self.cluster_size))
        self.bad_refblocks: set[int] = set()  # reftable indices whose refcounts cannot be read
        # with numpy, tables of standard entries are counted a table at a time through a view of
        # ``counts``; only where the walk costs more than importing numpy does, imported by the
        # first table that is not one run (see _vectorised)
        self.vectorise = not self.extended and not self.data_file and self.nb_clusters >= NUMPY_MIN_CLUSTERS
        self.np: Any = None
        self.view: Any = None
        self.refblock_cache: tuple[int, array] | None = None
        self.check_errors = self.corruptions = self.leaks = 0
        self.allocated = self.fragmented = self.compressed = 0

    # --- counting references (qcow2_inc_refcounts_imrt) ---------------------------------

    def reference(self, offset: int, size: int) -> None:
        """Count a reference to each cluster of ``size`` bytes at ``offset``."""
        from storprobe.verify import CheckFailed

        if size <= 0:
            return
        offset = _int64(offset)  # QEMU takes the offset as a signed 64-bit value
        if offset + size - self.file_length >= self.cluster_size:
            self.corruptions += 1  # "region exceeding the end of the file by one cluster or more"
            return
        if offset < 0:  # QEMU would grow its array to 2**64 bytes and fail
            raise CheckFailed("Check failed: Cannot allocate memory (a reference at a negative offset)")
        counts, refcount_max = self.counts, self.refcount_max
        for cluster in range(offset >> self.cluster_bits, ((offset + size - 1) >> self.cluster_bits) + 1):
            if cluster >= self.size:
                self.size = cluster + 1
            if counts[cluster] == refcount_max:
                self.corruptions += 1  # the refcount would overflow its width
            else:
                counts[cluster] += 1

    def l1_table(self, offset: int, entries: int, active: bool) -> None:
        """check_refcounts_l1: the L1 table, its L2 tables and their clusters."""
        if not entries:
            return
        self.reference(offset, entries * 8)
        for entry in filter(None, _words(self.reader.read(offset, entries * 8))):
            if entry & L1E_RESERVED_MASK:
                self.corruptions += 1
            l2_offset = entry & L1E_OFFSET_MASK
            self.reference(l2_offset, self.cluster_size)
            if l2_offset % self.cluster_size:
                self.corruptions += 1
            self.l2_table(l2_offset, active)

    def l2_table(self, offset: int, active: bool) -> None:
        """check_refcounts_l2; ``active``: the active table's clusters also count as
        allocated. A plain data cluster (aligned, no flag but COPIED and ZERO, no
        bitmap, no data file) is counted inline; any other entry by :meth:`entry`."""
        data = self.reader.read(offset, self.cluster_size)
        if data == self.zero_cluster or self._contiguous_run(data, active) or self._vector_table(data, active):
            return
        words = _words(data)
        entries, bitmaps = (words[0::2], words[1::2]) if self.extended else (words, None)
        counts, refcount_max, unusual = self.counts, self.refcount_max, self.unusual_bits
        nb_clusters, cluster_bits = self.nb_clusters, self.cluster_bits
        next_contiguous = allocated = fragmented = overflows = 0
        for index, entry in enumerate(entries):
            if not entry and bitmaps is None:
                continue
            bitmap = bitmaps[index] if bitmaps is not None else 0
            data_offset = entry & L2E_OFFSET_MASK
            if entry & unusual or bitmap or not data_offset:
                if entry or bitmap:
                    next_contiguous = self.entry(entry, bitmap, active, next_contiguous)
                continue
            if active:
                allocated += 1
                if next_contiguous and data_offset != next_contiguous:
                    fragmented += 1
                next_contiguous = data_offset + self.cluster_size
            cluster = data_offset >> cluster_bits
            if cluster >= nb_clusters or counts[cluster] == refcount_max:
                overflows += 1  # past the end of the file, or the refcount would overflow
            else:
                counts[cluster] += 1
        self.allocated += allocated
        self.fragmented += fragmented
        self.corruptions += overflows

    def entry(self, entry: int, bitmap: int, active: bool, next_contiguous: int) -> int:
        """One L2 entry, every rule of check_refcounts_l2; the next contiguous host
        offset for the fragmentation count."""
        if entry & OFLAG_COMPRESSED:
            self.compressed_cluster(entry, bitmap, active)
            return next_contiguous
        if entry & L2E_STD_RESERVED_MASK:
            self.corruptions += 1
        data_offset = entry & L2E_OFFSET_MASK
        if entry & OFLAG_ZERO and not self.extended and not data_offset:
            return next_contiguous  # a zero cluster with no allocation
        if not data_offset and not (self.data_file and entry & OFLAG_COPIED):
            if bitmap & SUBCLUSTER_ALLOC_BITS:
                self.corruptions += 1  # unallocated, yet subclusters are allocated
            return next_contiguous
        if (bitmap >> 32) & bitmap:
            self.corruptions += 1  # subclusters both allocated and zero
        if data_offset % self.cluster_size:
            self.corruptions += 1
        if active:
            self.allocated += 1
            if next_contiguous and data_offset != next_contiguous:
                self.fragmented += 1
            next_contiguous = data_offset + self.cluster_size
        if not self.data_file:
            self.reference(data_offset, self.cluster_size)
        return next_contiguous

    def compressed_cluster(self, entry: int, bitmap: int, active: bool) -> None:
        if entry & OFLAG_COPIED:
            self.corruptions += 1  # compressed clusters never have the COPIED flag
        if self.data_file or bitmap:
            self.corruptions += 1  # with a data file, or with a subcluster bitmap
            return
        offset = entry & self.coffset_mask
        sectors = ((entry >> self.csize_shift) & self.csize_mask) + 1
        self.reference(offset, sectors * COMPRESSED_SECTOR - offset % COMPRESSED_SECTOR)
        if active:
            self.allocated += 1
            self.compressed += 1
            self.fragmented += 1  # compressed clusters are fragmented by nature

    def _vectorised(self) -> Any:
        """numpy, imported on first use, when this walk is vectorised; else None."""
        if self.vectorise and self.np is None:
            self.np = _numpy()
            self.vectorise = self.np is not None
            if self.vectorise:
                self.view = self.np.frombuffer(self.counts, dtype=self.typecode)
        return self.np

    def _vector_table(self, data: bytes, active: bool) -> bool:
        """With numpy: count a table of standard entries whose every entry is
        unallocated, a zero cluster or a plain data cluster, at once (the inline
        rules of :meth:`l2_table`, vectorised). False, having counted nothing, for
        a table with any other entry, or without numpy."""
        np = self._vectorised()
        if np is None:
            return False
        entries = np.frombuffer(data, dtype=">u8")
        entries = entries[entries != 0]
        if (entries & np.uint64(self.unusual_bits)).any():
            return False
        offsets = entries & np.uint64(L2E_OFFSET_MASK)
        offsets = offsets[offsets != 0]  # the rest: unallocated, or zero clusters without an allocation
        if active:
            self.allocated += len(offsets)
            self.fragmented += int(np.count_nonzero(offsets[1:] != offsets[:-1] + np.uint64(self.cluster_size)))
        clusters = offsets >> np.uint64(self.cluster_bits)
        inside = clusters[clusters < self.nb_clusters]
        self.corruptions += len(clusters) - len(inside)  # past the end of the file
        used, times = np.unique(inside, return_counts=True)
        current = self.view[used].astype(np.uint64)
        added = np.minimum(times.astype(np.uint64), np.uint64(self.refcount_max) - current)
        self.corruptions += int((times - added.astype(np.int64)).sum())  # increments that would overflow
        self.view[used] = current + added
        return True

    def _vector_copied(self, data: bytes) -> int | None:
        """With numpy: how many data clusters of a table of standard entries have
        the COPIED flag where the recorded refcount is not 1, or lack it where it
        is; None when a cluster lies past the recorded refcounts, or without numpy."""
        np = self._vectorised()
        if np is None or self.bad_refblocks:
            return None
        entries = np.frombuffer(data, dtype=">u8")
        offsets = entries & np.uint64(L2E_OFFSET_MASK)
        data_clusters = (offsets != 0) & ((entries & np.uint64(OFLAG_COMPRESSED)) == 0)
        clusters = offsets[data_clusters] >> np.uint64(self.cluster_bits)
        if len(clusters) and int(clusters.max()) >= self.size:
            return None
        copied = (entries[data_clusters] >> np.uint64(63)) != 0
        return int(np.count_nonzero((self.view[clusters] == 1) != copied))

    def _run_start(self, data: bytes) -> int | None:
        """The host offset of the first cluster of an L2 table (standard entries)
        that maps consecutive plain data clusters, all inside the file; None for
        any other table."""
        first = int.from_bytes(data[:8], "big")
        start = first & L2E_OFFSET_MASK
        if self.extended or self.data_file or first & FAST_RUN_FLAGS or not start or start % self.cluster_size:
            return None
        if start + self.l2_entries * self.cluster_size > self.file_length:
            return None
        if int.from_bytes(data, "big") != first * self.run_repunit + self.run_steps:
            return None
        return start

    def _contiguous_run(self, data: bytes, active: bool) -> bool:
        """Count a table of consecutive data clusters, each referenced for the
        first time, at once (what preallocated metadata and sequential writes
        make). False, having counted nothing, for any other table."""
        start = self._run_start(data)
        if start is None:
            return False
        low = start >> self.cluster_bits
        high = low + self.l2_entries
        if self.counts[low:high] != self.zero_run:
            return False
        self.counts[low:high] = self.one_run
        if active:
            self.allocated += self.l2_entries
        return True

    # --- what the image records (qcow2_get_refcount) -------------------------------------

    def refcount_block(self, index: int) -> "array | None":
        """The refcounts reftable entry ``index`` covers (zeros where it points
        nowhere), or None when its block cannot be read (an unaligned offset, or
        one past what QEMU reads)."""
        from array import array

        from storprobe.verify import readable

        if index >= len(self.reftable):
            return None if index < 0 else array(self.typecode, [0]) * (1 << self.refblock_bits)
        offset = self.reftable[index] & REFT_OFFSET_MASK
        if not offset:
            return array(self.typecode, [0]) * (1 << self.refblock_bits)
        if offset % self.cluster_size or not readable(offset, self.cluster_size):
            return None
        data = self.reader.read(offset, self.cluster_size)
        if self.order < 3:
            return array("B", b"".join(map(_sub_byte_expansion(self.order).__getitem__, data)))
        return _words(data, self.typecode)

    def recorded_refcount(self, cluster: int) -> int | None:
        """The refcount the image records for ``cluster``; None when it cannot be read.
        After :meth:`compare`, ``counts`` holds the recorded refcounts of the file's clusters."""
        index = cluster >> self.refblock_bits
        if index in self.bad_refblocks:
            return None
        if cluster < self.size:
            return self.counts[cluster]
        if self.refblock_cache is None or self.refblock_cache[0] != index:
            block = self.refcount_block(index)
            if block is None:
                return None
            self.refblock_cache = (index, block)
        return self.refblock_cache[1][cluster & ((1 << self.refblock_bits) - 1)]

    # --- the checks after the walk ----------------------------------------------------

    def refcount_blocks(self) -> None:
        """check_refblocks: each refcount block is referenced once, inside the file."""
        for entry in self.reftable:
            if not entry:
                continue
            offset = entry & REFT_OFFSET_MASK
            if entry & REFT_RESERVED_MASK or offset % self.cluster_size or offset >> self.cluster_bits >= self.size:
                self.corruptions += 1
                continue
            if offset:
                self.reference(offset, self.cluster_size)
                if self.counts[offset >> self.cluster_bits] != 1:
                    self.corruptions += 1

    def compare(self) -> int:
        """compare_refcounts: recorded against counted, block by block; leaves the
        recorded refcounts in ``counts``. The highest cluster either says is used."""
        highest = 0
        span = 1 << self.refblock_bits
        for low in range(0, self.size, span):
            high = min(low + span, self.size)
            block = self.refcount_block(low >> self.refblock_bits)
            if block is None:
                self.check_errors += high - low  # "Can't get refcount for cluster"
                self.bad_refblocks.add(low >> self.refblock_bits)
                continue
            recorded, counted = block[: high - low], self.counts[low:high]
            if recorded != counted:
                for recorded_count, counted_count in zip(recorded, counted, strict=True):
                    if recorded_count < counted_count:
                        self.corruptions += 1
                    elif recorded_count > counted_count:
                        self.leaks += 1
                self.counts[low:high] = recorded
            used = max(_last_nonzero(recorded), _last_nonzero(counted))
            if used >= 0:
                highest = low + used
        return highest

    def copied_flags(self) -> None:
        """check_oflag_copied: an active L2 table, and each cluster it allocates,
        has the COPIED flag exactly when its recorded refcount is 1."""
        hdr = self.hdr
        for entry in filter(None, _words(self.reader.read(hdr.l1_table_offset, hdr.l1_size * 8))):
            l2_offset = entry & L1E_OFFSET_MASK
            if not l2_offset:
                continue
            refcount = self.recorded_refcount(l2_offset >> self.cluster_bits)
            if refcount is None:
                continue
            if (refcount == 1) != bool(entry & OFLAG_COPIED):
                self.corruptions += 1
            data = self.reader.read(l2_offset, self.cluster_size)
            if data == self.zero_cluster or self._copied_run(data):
                continue
            vector = self._vector_copied(data)
            if vector is not None:
                self.corruptions += vector
                continue
            words = _words(data)
            entries = words[0::2] if self.extended else words
            counts, size, cluster_bits = self.counts, self.size, self.cluster_bits
            direct = not self.data_file and not self.bad_refblocks  # the recorded refcount is counts[cluster]
            mismatches = 0
            for l2_entry in entries:
                if not l2_entry or l2_entry & OFLAG_COMPRESSED:
                    continue
                data_offset = l2_entry & L2E_OFFSET_MASK
                if direct and data_offset and data_offset >> cluster_bits < size:
                    if (counts[data_offset >> cluster_bits] == 1) != (l2_entry >= OFLAG_COPIED):  # the top bit
                        mismatches += 1
                    continue
                if not data_offset and not (self.data_file and l2_entry & OFLAG_COPIED):
                    continue  # unallocated, or a zero cluster without an allocation
                if l2_entry & OFLAG_ZERO and not self.extended and not data_offset:
                    continue
                recorded = 1 if self.data_file else self.recorded_refcount(data_offset >> self.cluster_bits)
                if recorded is not None and (recorded == 1) != bool(l2_entry & OFLAG_COPIED):
                    mismatches += 1
            self.corruptions += mismatches

    def _copied_run(self, data: bytes) -> bool:
        """A table of consecutive data clusters, each with COPIED and a recorded refcount of 1."""
        if not data[0] & 0x80 or self.bad_refblocks:  # COPIED is the first entry's top bit
            return False
        start = self._run_start(data)
        if start is None:
            return False
        low = start >> self.cluster_bits
        return self.counts[low : low + self.l2_entries] == self.one_run


def _last_nonzero(values: "array") -> int:
    """The index of the last non-zero value, -1 when all are zero."""
    used = len(values.tobytes().rstrip(b"\0"))
    return (used - 1) // values.itemsize if used else -1


def check(img: Image, reader: "CheckReader") -> "CheckResult":
    """qemu-img check of a qcow2 image, read-only (QEMU 7.2: qcow2_co_check_locked)."""
    from storprobe.verify import CheckFailed, CheckResult

    hdr = _header(img)
    if hdr.incompatible_features & ~INCOMPAT_KNOWN:
        raise CheckFailed("Could not open: Unsupported qcow2 feature(s) (unknown incompatible features)")
    ext = _read_extensions(img, hdr)
    walk = _RefcountWalk(hdr, ext, reader)
    walk.reference(0, walk.cluster_size)  # the header
    walk.l1_table(hdr.l1_table_offset, hdr.l1_size, active=True)
    snapshots = list(_snapshot_entries(img, hdr)) if hdr.nb_snapshots else []
    if walk.data_file and snapshots:
        walk.corruptions += 1
    for snapshot in snapshots:
        if hdr.version >= 3 and snapshot.entry.extra_data_size < 16:
            walk.corruptions += 1  # "snapshot table entry is incomplete"
        l1_offset, l1_size = snapshot.entry.l1_table_offset, snapshot.entry.l1_size
        if l1_offset % walk.cluster_size or l1_size > MAX_L1_BYTES // 8:
            walk.corruptions += 1
            continue
        walk.l1_table(l1_offset, l1_size, active=False)
    walk.reference(hdr.snapshots_offset, snapshots[-1].end - hdr.snapshots_offset if snapshots else 0)
    walk.reference(hdr.refcount_table_offset, len(walk.reftable) * 8)
    if ext.crypto is not None:
        walk.reference(ext.crypto.offset, ext.crypto.length)
    if ext.bitmaps is not None:
        _bitmap_references(img, hdr, ext.bitmaps, walk)
    walk.refcount_blocks()
    highest = walk.compare()
    walk.copied_flags()
    return CheckResult(
        check_errors=walk.check_errors,
        corruptions=walk.corruptions,
        leaks=walk.leaks,
        image_end_offset=(highest + 1) * walk.cluster_size,
        total_clusters=-(-(hdr.size // SECTOR * SECTOR) // walk.cluster_size),
        allocated_clusters=walk.allocated,
        fragmented_clusters=walk.fragmented,
        compressed_clusters=walk.compressed,
    )


def _bitmap_references(img: Image, hdr: Any, ext: Any, walk: _RefcountWalk) -> None:
    """qcow2_check_bitmaps_refcounts: the directory, each bitmap's table and the
    clusters it names. A table with an invalid entry does not load, and then the
    check fails (QEMU counts a corruption and stops: "Check failed: Invalid argument")."""
    from storprobe.verify import CheckFailed

    walk.reference(ext.directory_offset, ext.directory_size)
    for entry, name in _bitmap_directory(img, hdr, ext):
        table_bytes = entry.bitmap_table_size * 8
        walk.reference(entry.bitmap_table_offset, table_bytes)
        table = _words(walk.reader.read(entry.bitmap_table_offset, table_bytes))
        if not all(_valid_bitmap_table_entry(value, walk.cluster_size) for value in table):
            raise CheckFailed(f"Check failed: Invalid argument (bitmap {name!r} has an invalid table entry)")
        for value in table:
            if value & BITMAP_TABLE_OFFSET:
                walk.reference(value & BITMAP_TABLE_OFFSET, walk.cluster_size)


# ===========================================================================
# measure: the size of a new qcow2 image, as QEMU 7.2's qcow2_measure counts it
# (block/qcow2.c: qcow2_measure, qcow2_calc_prealloc_size,
# qcow2_refcount_metadata_size; block/qcow2-bitmap.c:
# qcow2_get_persistent_dirty_bitmap_size). Metadata is counted for a fully
# allocated image; "required" keeps of the data only the clusters the source's
# data touches (all of them with preallocation=full/falloc or a backing file).
# ===========================================================================

def _create_options() -> "tuple[CreateOption, ...]":
    """qcow2's creation options as qemu-img 7.2 accepts them (qcow2_create_opts)."""
    from storprobe.measure import CreateOption

    return (
        CreateOption("size", "size"),
        CreateOption("compat", "string"),
        CreateOption("backing_file", "string"),
        CreateOption("backing_fmt", "string"),
        CreateOption("data_file", "string"),
        CreateOption("data_file_raw", "bool"),
        CreateOption("lazy_refcounts", "bool"),
        CreateOption("refcount_bits", "number"),
        CreateOption("encryption", "bool"),
        CreateOption("encrypt.format", "string"),
        *(CreateOption(f"encrypt.{name}", "string") for name in LUKS_CREATE_STRINGS),
        CreateOption("encrypt.iter-time", "number"),
        CreateOption("cluster_size", "size"),
        CreateOption("extended_l2", "bool"),
        CreateOption("preallocation", "string"),
        CreateOption("compression_type", "string"),
    )


DEFAULT_CLUSTER_SIZE = 65536
PREALLOCATION_MODES = ("off", "metadata", "falloc", "full")
L1E_SIZE, L2E_SIZE, L2E_SIZE_EXTENDED, REFTABLE_ENTRY_SIZE = 8, 8, 16, 8
BITMAP_DIR_ENTRY_SIZE = 24  # a bitmap directory entry before its name


def measure(request: "MeasureRequest") -> "Measurement":
    """``qemu-img measure -O qcow2``: metadata of a fully allocated image, plus
    the data clusters required, plus the source's persistent bitmaps (v3)."""
    from storprobe.measure import MeasureError, Measurement

    options = request.options(_create_options())
    extended_l2 = options.flag("extended_l2")
    cluster_size = _measured_cluster_size(options.number("cluster_size", DEFAULT_CLUSTER_SIZE), extended_l2)
    compat = options.string("compat")
    if compat not in (None, "0.10", "1.1"):
        raise MeasureError(f"Invalid compatibility level: '{compat}'")
    version = 2 if compat == "0.10" else 3
    refcount_bits = options.number("refcount_bits", 16)
    if refcount_bits > 64 or refcount_bits & (refcount_bits - 1) or not refcount_bits:
        raise MeasureError("Refcount width must be a power of two and may not exceed 64 bits")
    if version < 3 and refcount_bits != 16:
        raise MeasureError("Different refcount widths than 16 bits require compatibility level 1.1 or above "
                           "(use compat=1.1 or greater)")
    preallocation = options.string("preallocation") or "off"
    if preallocation not in PREALLOCATION_MODES:
        raise MeasureError(f"invalid parameter value: {preallocation}")
    luks_payload = 0
    if options.string("encrypt.format") == "luks":  # any other value QEMU ignores here
        given = {name: options.string(f"encrypt.{name}") for name in LUKS_CREATE_STRINGS}
        try:
            header = created_payload_offset(_present(given), request.secrets, "encrypt.")
            luks_payload = _round_up(header, cluster_size)
        except CreateRefused as refused:
            raise MeasureError(str(refused)) from None
    virtual_size = _round_up(options.number("size", 0), cluster_size)
    l2e_size = L2E_SIZE_EXTENDED if extended_l2 else L2E_SIZE
    l2_tables = -(-(virtual_size // cluster_size) // (cluster_size // l2e_size))
    if l2_tables * L1E_SIZE > MAX_L1_BYTES:  # checked on -o size, before a source's size replaces it
        raise MeasureError("The image size is too large (try using a larger cluster size)")
    required = 0
    source = request.source
    if source is not None:
        virtual_size = _round_up(source.virtual_size, cluster_size)
        if options.given("backing_file"):  # the new backing may share nothing: every cluster counts
            required = virtual_size
        else:
            required = _data_clusters(source.data_ranges(), cluster_size) * cluster_size
    if preallocation in ("full", "falloc"):
        required = virtual_size
    refcount_order = refcount_bits.bit_length() - 1
    fully_allocated = luks_payload + _prealloc_size(virtual_size, cluster_size, refcount_order, l2e_size)
    bitmaps = None
    if version >= 3 and source is not None and _keeps_persistent_bitmaps(source.info):
        bitmaps = _bitmaps_size(source.info, source.virtual_size, cluster_size)
    return Measurement(fully_allocated - virtual_size + required, fully_allocated, bitmaps)


def _measured_cluster_size(cluster_size: int, extended_l2: bool) -> int:
    """The cluster size, checked as QEMU's validate_cluster_size checks it."""
    from storprobe.measure import MeasureError

    if not MIN_CLUSTER_BITS <= (cluster_size & -cluster_size).bit_length() - 1 <= MAX_CLUSTER_BITS or (
        cluster_size & (cluster_size - 1)
    ):
        raise MeasureError(
            f"Cluster size must be a power of two between {1 << MIN_CLUSTER_BITS} and {1 << (MAX_CLUSTER_BITS - 10)}k"
        )
    smallest = (1 << MIN_CLUSTER_BITS) * SUBCLUSTERS
    if extended_l2 and cluster_size < smallest:
        raise MeasureError(f"Extended L2 entries are only supported with cluster sizes of at least {smallest} bytes")
    return cluster_size


def _present(values: dict[str, str | None]) -> dict[str, str]:
    return {name: value for name, value in values.items() if value is not None}


def _round_up(n: int, to: int) -> int:
    return -(-n // to) * to


def _data_clusters(ranges: Iterator[tuple[int, int]], cluster_size: int) -> int:
    """How many clusters of ``cluster_size`` the data ranges touch (each counted once)."""
    clusters, counted_to = 0, 0  # clusters before counted_to (a cluster boundary) are counted
    for start, length in ranges:
        first = max(start // cluster_size * cluster_size, counted_to)
        end = _round_up(start + length, cluster_size)
        if end > first:
            clusters += (end - first) // cluster_size
            counted_to = end
    return clusters


def _prealloc_size(virtual_size: int, cluster_size: int, refcount_order: int, l2e_size: int) -> int:
    """A fully allocated image's bytes: header, L2 and L1 tables, refcount
    metadata, data (qcow2_calc_prealloc_size)."""
    aligned = _round_up(virtual_size, cluster_size)
    l2_entries = _round_up(aligned // cluster_size, cluster_size // l2e_size)
    l1_entries = _round_up(l2_entries * l2e_size // cluster_size, cluster_size // L1E_SIZE)
    meta = cluster_size + l2_entries * l2e_size + l1_entries * L1E_SIZE
    meta += _refcount_metadata_size((meta + aligned) // cluster_size, cluster_size, refcount_order)
    return meta + aligned


def _refcount_metadata_size(clusters: int, cluster_size: int, refcount_order: int) -> int:
    """Bytes of refcount blocks and table that count ``clusters`` and themselves:
    the fixed point qcow2_refcount_metadata_size finds (a few rounds)."""
    per_table_cluster = cluster_size // REFTABLE_ENTRY_SIZE
    per_block = cluster_size * 8 >> refcount_order
    table = blocks = 0
    total, last = 0, -1
    while total != last:
        last = total
        blocks = -(-(clusters + table + blocks) // per_block)
        table = -(-blocks // per_table_cluster)
        total = clusters + blocks + table
    return (blocks + table) * cluster_size


def _keeps_persistent_bitmaps(info: ImageInfo) -> bool:
    """Whether the source is a qcow2 v3 image opened by QEMU's qcow2 driver
    (bdrv_supports_persistent_dirty_bitmap): only then is ``bitmaps`` counted."""
    return info.format == "qcow2" and not info.read_through_other_driver and info.version == 3


def _bitmaps_size(info: ImageInfo, virtual_size: int, cluster_size: int) -> int:
    """Bytes the source's persistent bitmaps take in a new image: each bitmap
    whole (one bit per granule of the disk) and its table, then the directory."""
    total = directory = 0
    for bitmap in (info.specific or {}).get("bitmaps", ()):
        granules = -(-virtual_size // bitmap["granularity"])
        clusters = -(-_round_up(granules, 8) // 8 // cluster_size)  # a bit per granule
        total += clusters * cluster_size + _round_up(clusters * 8, cluster_size)
        directory += _align8(BITMAP_DIR_ENTRY_SIZE + len(bitmap["name"].encode()))
    return total + _round_up(directory, cluster_size)
