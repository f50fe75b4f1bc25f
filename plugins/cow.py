"""cow: User-Mode Linux copy-on-write files (big-endian).

``OOOM`` then a version. Three version-2 layouts exist in the wild, told
apart by where the sector size (always 512) sits:

- ``qemu``: QEMU's old cow driver on 64-bit hosts: a 1024-byte name at 8,
  mtime at 1032, 4 bytes of padding, size at 1040, sector size at 1048;
- ``qemu-packed``: the same without the padding (QEMU on 32-bit hosts, and
  the offsets libvirt reads): size at 1036, sector size at 1044;
- ``uml``: the UML kernel's own (arch/um/drivers/cow_user.c): a 4096-byte
  name at 8, mtime at 4104, size at 4108, sector size at 4116.

Version 3 (what UML has written since 2005) puts mtime, size, sector size,
alignment and the bitmap format first and the 4096-byte name at 32; 64-bit
UML binaries before Dec 2005 wrote it unpacked (an 8-byte mtime, so every
later field 4 bytes on), which shows as zeros where the name should start.

The backing file name is reported, never opened; cow records no backing
format. The virtual size is ``size`` rounded down to whole 512-byte sectors.
"""

from __future__ import annotations

from typing import Any

from storprobe import Backing, Features, FormatSpec, Image, InvalidHeader, Layout, TruncatedHeader, hookimpl
from storprobe.layout import cstring, read_uint

V2_LAYOUTS = {
    "qemu": Layout(
        ">", "cow v2 header (qemu)",
        ("magic", "4s"), ("version", "I"), ("backing_file", "1024s"), ("mtime", "I"),
        (None, "4x"), ("size", "Q"), ("sectorsize", "I"),
    ),
    "qemu-packed": Layout(
        ">", "cow v2 header (qemu packed)",
        ("magic", "4s"), ("version", "I"), ("backing_file", "1024s"), ("mtime", "I"),
        ("size", "Q"), ("sectorsize", "I"),
    ),
    "uml": Layout(
        ">", "cow v2 header (uml)",
        ("magic", "4s"), ("version", "I"), ("backing_file", "4096s"), ("mtime", "I"),
        ("size", "Q"), ("sectorsize", "I"),
    ),
}
V3_HEADER = Layout(
    ">", "cow v3 header",
    ("magic", "4s"), ("version", "I"), ("mtime", "I"), ("size", "Q"), ("sectorsize", "I"),
    ("alignment", "I"), ("cow_format", "I"), ("backing_file", "4096s"),
)
V3_UNPACKED_HEADER = Layout(
    ">", "cow v3 header (unpacked)",
    ("magic", "4s"), ("version", "I"), ("mtime", "I"), (None, "4x"), ("size", "Q"), ("sectorsize", "I"),
    ("alignment", "I"), ("cow_format", "I"), ("backing_file", "4096s"),
)

SECTOR = 512
MIN_V2_SIZE = min(layout.size for layout in V2_LAYOUTS.values())
COW_BITMAP = 0  # the only v3 bitmap format


def _v2(img: Image) -> tuple[object, dict]:
    """The v2 layout whose sector-size field holds 512, with its name."""
    fitting = [(name, layout) for name, layout in V2_LAYOUTS.items() if layout.size <= len(img.header)]
    if not fitting:
        raise TruncatedHeader(f"cow v2 header needs {MIN_V2_SIZE} bytes, the file has {len(img.header)}")
    for name, layout in fitting:
        hdr = layout.unpack(img.header)
        if hdr.sectorsize == SECTOR:
            return hdr, {"layout": name}
    raise InvalidHeader(
        "cow v2 header has no 512-byte sector size at any known layout's offset (1048, 1044, 4116)",
        code="cow.v2-layout",
    )


def _v3(img: Image) -> tuple[object, dict]:
    """The v3 header, packed or the old unpacked 64-bit one, checked as UML reads it."""
    name, hdr = "uml", V3_HEADER.unpack(img.header)
    if hdr.backing_file[:4] == bytes(4):
        name, hdr = "uml-unpacked", V3_UNPACKED_HEADER.unpack(img.header)
    if hdr.sectorsize == 0:
        raise InvalidHeader("cow v3 sector size is 0", code="cow.sector-size")
    if hdr.alignment == 0:
        raise InvalidHeader("cow v3 alignment is 0", code="cow.alignment")
    if hdr.cow_format != COW_BITMAP:
        raise InvalidHeader(f"cow v3 bitmap format {hdr.cow_format} is unknown", code="cow.bitmap-format")
    return hdr, {"layout": name, "alignment": hdr.alignment}


def _header(img: Image) -> tuple[Any, dict[str, Any]]:
    """The header and the facts that depend on its layout."""
    return _v3(img) if read_uint(img.header, 4, 4, ">") == 3 else _v2(img)


def features(img: Image) -> Features:
    hdr, details = _header(img)
    return Features(details={**details, "mtime": hdr.mtime, "sector-size": hdr.sectorsize})


def size(img: Image) -> int:
    return _header(img)[0].size // SECTOR * SECTOR


def backing(img: Image) -> Backing | None:
    name = cstring(_header(img)[0].backing_file)
    return Backing(name) if name else None


@hookimpl
def storprobe_formats() -> list[FormatSpec]:
    return [
        FormatSpec(
            name="cow",
            description="User-Mode Linux COW",
            magic=b"OOOM",
            endian=">",
            version_offset=4,
            versions=(2, 3),
            qemu_driver="raw",  # QEMU dropped its cow driver (2.2); 7.2 reads cow files as raw
            size=size,
            backing=backing,
            features=features,
        )
    ]
