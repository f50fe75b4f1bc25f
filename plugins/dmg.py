"""dmg: Apple disk images, UDIF (big-endian ``koly`` trailer in the last 512
bytes; QEMU block/dmg.c, Apple's UDIF trailer layout).

The trailer locates the data fork, the resource fork and the XML property
list that hold the block tables; the virtual size is its sector count x 512.
storprobe checks the trailer's version and size and that every fork it names
lies before it, as QEMU does on open (QEMU ignores the version; storprobe
knows only version 4, the one UDIF defines). qemu-img finds dmg files only by
their ``.dmg`` name; storprobe finds them by the trailer.
"""

from __future__ import annotations

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
        block_map = "resource-fork"
    elif koly.xml_length:
        if koly.xml_length > MAX_XML_LENGTH:
            raise InvalidHeader(f"XML property list of {koly.xml_length} bytes is too large", code="dmg.xml-size")
        block_map = "xml-plist"
    else:
        raise InvalidHeader("neither a resource fork nor an XML property list", code="dmg.no-block-map")
    # QEMU's dmg driver has no get_info, so qemu-img prints no dirty-flag for it
    return Features(dirty=None, details={"block-map": block_map, "segment-count": koly.segment_count})


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
