"""dmg: Apple disk images, UDIF (big-endian ``koly`` trailer in the last 512
bytes; QEMU block/dmg.c, Apple's UDIF trailer layout).

The trailer locates the data fork, the resource fork and the XML property
list that hold the block tables; the virtual size is its sector count x 512.
storprobe checks the trailer's version and size and that every fork it names
lies before it, then walks the block map (the resource fork's resources, or
the property list's base64 ``<data>`` elements, each a ``mish`` block table)
with QEMU's open-time limits on every chunk (QEMU ignores the version;
storprobe knows only version 4, the one UDIF defines). qemu-img finds dmg
files only by their ``.dmg`` name; storprobe finds them by the trailer.
"""

from __future__ import annotations

import struct

from storprobe import Features, FormatSpec, Image, InvalidHeader, Layout, hookimpl

TRAILER = Layout(
    ">",
    "udif trailer",
    ("signature", "4s"),
    ("version", "I"),
    ("header_size", "I"),
    ("flags", "I"),
    ("running_data_fork_offset", "Q"),
    ("data_fork_offset", "Q"),
    ("data_fork_length", "Q"),
    ("rsrc_fork_offset", "Q"),
    ("rsrc_fork_length", "Q"),
    ("segment_number", "I"),
    ("segment_count", "I"),
    ("segment_id", "16s"),
    ("data_checksum_type", "I"),
    ("data_checksum_size", "I"),
    (None, "128x"),  # data checksum
    ("xml_offset", "Q"),
    ("xml_length", "Q"),
    (None, "120x"),
    ("master_checksum_type", "I"),
    ("master_checksum_size", "I"),
    (None, "128x"),  # master checksum
    ("image_variant", "I"),
    ("sector_count", "Q"),
    (None, "12x"),
)
TRAILER_SIZE = SECTOR = 512
MAX_XML_LENGTH = 16 * 1024 * 1024  # QEMU's cap on the property list it reads
MAX_CHUNK_LENGTH = 64 * 1024 * 1024  # QEMU's cap on a chunk's bytes in the data fork
MAX_CHUNK_SECTORS = MAX_CHUNK_LENGTH // SECTOR  # ... and on the sectors a chunk expands to
MISH, MISH_MIN_SIZE, CHUNKS_AT, CHUNK_SIZE = b"mish", 244, 204, 40
ZEROS, RAW, IGNORED = 0, 1, 2  # chunk types that QEMU opens (with the compressed ones below)
KNOWN_CHUNKS = frozenset({ZEROS, RAW, IGNORED, 0x80000005, 0x80000006, 0x80000007})  # + zlib, bzip2, lzfse
CHUNK = struct.Struct(">I4xQQQQ")  # type, (reserved), first sector, sectors, offset, length
#: The bytes outside the base64 alphabet, deleted (bytes.translate) before decoding.
_NOT_BASE64 = bytes(sorted(set(range(256)) - set(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/")))


def fork_fits(offset: int, length: int, trailer_offset: int) -> bool:
    """QEMU's rule: a fork starts before the trailer and ends by it."""
    return offset < trailer_offset and length <= trailer_offset - offset


def features(img: Image) -> Features:
    koly = TRAILER.unpack(img.header)
    end = img.header_offset  # everything the trailer names lies before it
    if koly.header_size != TRAILER_SIZE:
        raise InvalidHeader(f"trailer size {koly.header_size} is not 512", code="dmg.header-size")
    if koly.data_fork_offset + koly.data_fork_length > end:
        raise InvalidHeader("data fork runs past the trailer", code="dmg.data-fork")
    if not fork_fits(koly.rsrc_fork_offset, koly.rsrc_fork_length, end):
        raise InvalidHeader("resource fork lies outside the file before the trailer", code="dmg.rsrc-fork")
    if not fork_fits(koly.xml_offset, koly.xml_length, end):
        raise InvalidHeader("XML property list lies outside the file before the trailer", code="dmg.xml-plist")
    if koly.rsrc_fork_length:
        block_map, tables = "resource-fork", _fork_tables(img, koly.rsrc_fork_offset, koly.rsrc_fork_length)
    elif koly.xml_length:
        if koly.xml_length > MAX_XML_LENGTH:
            raise InvalidHeader(f"XML property list of {koly.xml_length} bytes is too large", code="dmg.xml-size")
        block_map, tables = "xml-plist", _plist_tables(img.read(koly.xml_offset, koly.xml_length))
    else:
        raise InvalidHeader("neither a resource fork nor an XML property list", code="dmg.no-block-map")
    chunks = sum(_check_chunks(table) for table in tables)
    # QEMU's dmg driver has no get_info, so qemu-img prints no dirty-flag for it
    details = {"block-map": block_map, "segment-count": koly.segment_count, "chunks": chunks}
    return Features(dirty=None, details=details)


def _fork_tables(img: Image, fork: int, length: int) -> list[bytes]:
    """The resources of a resource fork's data, as QEMU walks them: the data's
    offset and length (at the fork's start and at +8), then resources, each a
    32-bit length and that many bytes, filling the data exactly."""
    data_offset, data_length = struct.unpack(">I4xI", img.read(fork, 12))
    if data_offset > length or data_length == 0 or data_offset + data_length > length:
        raise InvalidHeader("resource data lies outside the resource fork", code="dmg.rsrc-data")
    data = img.read(fork + data_offset, data_length)
    tables, at = [], 0
    while at < data_length:
        size = int.from_bytes(data[at : at + 4], "big") if at + 4 <= data_length else 0
        if size == 0 or size > data_length - at:
            raise InvalidHeader(f"resource at {at} of the resource data has length {size}", code="dmg.resource-size")
        tables.append(data[at + 4 : at + 4 + size])
        at += 4 + size
    return tables


def _plist_tables(plist: bytes) -> list[bytes]:
    """The base64 ``<data>`` elements of the property list, found as QEMU
    finds them: by text search, in the text before any NUL byte."""
    text = plist.split(b"\0", 1)[0]
    tables, at = [], text.find(b"<data>")
    while at >= 0:
        end = text.find(b"</data>", at + 6)
        if end < 0:
            raise InvalidHeader("a <data> element of the property list is not closed", code="dmg.xml-data")
        tables.append(_base64(text[at + 6 : end]))
        at = text.find(b"<data>", end + 1)
    return tables


def _base64(text: bytes) -> bytes:
    """Base64 decoded leniently, as glib decodes it for QEMU: characters
    outside the alphabet (padding included) skipped, a last group of two or
    three letters giving one or two bytes, a lone last letter none."""
    import binascii  # loaded for a dmg's property list, not for every probe

    letters = text.translate(None, _NOT_BASE64)
    letters = letters[: len(letters) - 1] if len(letters) % 4 == 1 else letters
    return binascii.a2b_base64(letters + b"=" * (-len(letters) % 4))


def _check_chunks(table: bytes) -> int:
    """QEMU's limits on the chunks of one ``mish`` block table (anything else
    is skipped, as QEMU skips it): the number of chunks of a known type."""
    if table[:4] != MISH or len(table) < MISH_MIN_SIZE:
        return 0
    count = (len(table) - CHUNKS_AT) // CHUNK_SIZE
    known = 0
    for kind, _, sectors, _, length in CHUNK.iter_unpack(table[CHUNKS_AT : CHUNKS_AT + count * CHUNK_SIZE]):
        if kind not in KNOWN_CHUNKS:
            continue  # comments, the terminator, types QEMU cannot read
        if sectors > MAX_CHUNK_SECTORS and kind not in (ZEROS, IGNORED):
            raise InvalidHeader(
                f"a chunk expands to {sectors} sectors (at most {MAX_CHUNK_SECTORS})", code="dmg.chunk-sectors"
            )
        if length > MAX_CHUNK_LENGTH:
            raise InvalidHeader(f"a chunk holds {length} bytes (at most {MAX_CHUNK_LENGTH})", code="dmg.chunk-length")
        known += 1
    return known


@hookimpl
def storprobe_formats() -> list[FormatSpec]:
    return [
        FormatSpec(
            name="dmg",
            description="Apple disk image",
            magic=b"koly",
            header_offsets=(-TRAILER_SIZE,),
            endian=">",
            version_offset=4,
            versions=(4,),
            size_offset=0x1EC,
            size_multiplier=SECTOR,
            features=features,
        )
    ]
