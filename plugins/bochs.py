"""bochs: Bochs growing disk images (little-endian).

A 512-byte header (magic, type ``Redolog``, subtype, version, then the
redolog fields), a catalog of 32-bit extent indexes at ``header`` bytes, then
the extents. Version 1 headers lack the reserved word, so the disk size sits
at 84 instead of 88. QEMU reads only the ``Growing`` subtype (``Undoable``
and ``Volatile`` redologs belong to a separate base image); validation
follows its block/bochs.c open (``bochs.<rule>``), plus the catalog lying
inside the file. The virtual size is the disk size rounded down to whole
512-byte sectors. qemu-img prints no cluster size for bochs; the extent size
is a detail. libvirt 9.0 does not detect bochs at all (it calls it raw).
"""

from __future__ import annotations

from storprobe import Features, FormatSpec, Image, InvalidHeader, Layout, hookimpl
from storprobe.layout import Header, cstring, read_uint

HEADER = Layout(
    "<",
    "bochs header",
    ("magic", "32s"),
    ("type", "16s"),
    ("subtype", "16s"),
    ("version", "I"),
    ("header", "I"),  # bytes; the catalog starts here
    ("catalog", "I"),  # entries
    ("bitmap", "I"),  # bytes per extent bitmap
    ("extent", "I"),  # bytes per extent
)
DISK_SIZE_OFFSET = {0x00010000: 84, 0x00020000: 88}  # by version

REDOLOG = b"Redolog\0"
GROWING = b"Growing\0"
SECTOR = 512
MAX_CATALOG = 0x100000  # enough for the largest image bximage makes (~8 TiB)
MAX_EXTENT = 0x800000


def _disk_size(img: Image, hdr: Header) -> int:
    return read_uint(img.header, DISK_SIZE_OFFSET[hdr.version], 8, "<")


def _header(img: Image) -> Header:
    """The header, checked as QEMU's bochs open checks it."""
    hdr = HEADER.unpack(img.header)
    if hdr.type[: len(REDOLOG)] != REDOLOG:
        raise InvalidHeader(f"bochs image type {cstring(hdr.type)!r} is not Redolog", code="bochs.type")
    if hdr.subtype[: len(GROWING)] != GROWING:
        raise InvalidHeader(
            f"bochs redolog subtype {cstring(hdr.subtype)!r} is not Growing (only growing images stand alone)",
            code="bochs.subtype",
        )
    if hdr.catalog > MAX_CATALOG:
        raise InvalidHeader(f"bochs catalog of {hdr.catalog} entries is too large", code="bochs.catalog-size")
    if hdr.extent < SECTOR:
        raise InvalidHeader(f"bochs extent size {hdr.extent} is below 512", code="bochs.extent-too-small")
    if hdr.extent & (hdr.extent - 1):
        raise InvalidHeader(
            f"bochs extent size {hdr.extent} is not a power of two", code="bochs.extent-not-power-of-two"
        )
    if hdr.extent > MAX_EXTENT:
        raise InvalidHeader(f"bochs extent size {hdr.extent} is above 8 MiB", code="bochs.extent-too-large")
    sectors = _disk_size(img, hdr) // SECTOR
    if hdr.catalog < -(-sectors // (hdr.extent // SECTOR)):
        raise InvalidHeader(
            f"bochs catalog of {hdr.catalog} extents cannot cover {sectors} sectors", code="bochs.catalog-too-small"
        )
    if hdr.header + 4 * hdr.catalog > img.size:
        raise InvalidHeader(
            f"bochs catalog ({hdr.catalog} entries at {hdr.header}) runs past the end of the file",
            code="bochs.catalog-beyond-eof",
        )
    return hdr


def features(img: Image) -> Features:
    hdr = _header(img)
    return Features(
        dirty=None,
        details={
            "extent-size": hdr.extent,
            "catalog-entries": hdr.catalog,
            "bitmap-size": hdr.bitmap,
            "header-size": hdr.header,
        }
    )


def size(img: Image) -> int:
    return _disk_size(img, _header(img)) // SECTOR * SECTOR


@hookimpl
def storprobe_formats() -> list[FormatSpec]:
    return [
        FormatSpec(
            name="bochs",
            description="Bochs disk image",
            magic=b"Bochs Virtual HD Image\0",
            version_offset=64,
            versions=tuple(DISK_SIZE_OFFSET),
            size=size,
            features=features,
        )
    ]
