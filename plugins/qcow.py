"""qcow: QEMU copy-on-write version 1 (big-endian).

The 48-byte header of QEMU's block/qcow.c. Validation follows what QEMU's
open refuses (``qcow.<rule>``); the backing file name is reported, never
opened, and must lie inside the file (QEMU would read zeros past the end).
qcow records no backing format. The virtual size is ``size`` rounded down to
whole 512-byte sectors, as QEMU keeps it.
"""

from __future__ import annotations

from storprobe import QEMU_MAX_LENGTH, Backing, Features, FormatSpec, Image, InvalidHeader, Layout, hookimpl
from storprobe.layout import Header, cstring

HEADER = Layout(
    ">",
    "qcow header",
    ("magic", "4s"),
    ("version", "I"),
    ("backing_file_offset", "Q"),
    ("backing_file_size", "I"),
    ("mtime", "I"),
    ("size", "Q"),  # bytes
    ("cluster_bits", "B"),
    ("l2_bits", "B"),  # log2 of the entries (8 bytes each) of an L2 table
    (None, "2x"),
    ("crypt_method", "I"),  # 0 none, 1 AES
    ("l1_table_offset", "Q"),
)

CLUSTER_BITS = range(9, 17)  # 512 B .. 64 KiB clusters
L2_BITS = range(6, 14)  # 512 B .. 64 KiB L2 tables
CRYPT_METHODS = {1: "aes"}
MAX_BACKING_NAME = 1023
MAX_L1_ENTRIES = (2**31 - 1) // 8  # QEMU sizes the L1 table in an int
SECTOR = 512


def _header(img: Image) -> Header:
    """The header, checked as QEMU's qcow open checks it."""
    hdr = HEADER.unpack(img.header)
    if hdr.size <= 1:
        raise InvalidHeader(f"qcow image size {hdr.size} is below 2 bytes", code="qcow.size-too-small")
    if hdr.cluster_bits not in CLUSTER_BITS:
        raise InvalidHeader(
            f"qcow cluster_bits {hdr.cluster_bits} is outside 9..16 (512 B to 64 KiB)", code="qcow.cluster-bits"
        )
    if hdr.l2_bits not in L2_BITS:
        raise InvalidHeader(
            f"qcow l2_bits {hdr.l2_bits} is outside 6..13 (L2 tables of 512 B to 64 KiB)", code="qcow.l2-bits"
        )
    if hdr.crypt_method not in (0, *CRYPT_METHODS):
        raise InvalidHeader(f"qcow crypt_method {hdr.crypt_method} is unknown", code="qcow.crypt-method")
    span = 1 << (hdr.cluster_bits + hdr.l2_bits)  # bytes one L1 entry maps
    if hdr.size > 2**64 - 1 - span:
        raise InvalidHeader(f"qcow image size {hdr.size} overflows its L1 table", code="qcow.size-too-large")
    l1_entries = -(-hdr.size // span)
    if l1_entries > MAX_L1_ENTRIES:
        raise InvalidHeader(
            f"qcow image of {hdr.size} bytes needs {l1_entries} L1 entries (at most {MAX_L1_ENTRIES})",
            code="qcow.l1-size",
        )
    if hdr.l1_table_offset + l1_entries * 8 > QEMU_MAX_LENGTH:  # QEMU reads it on open; past this it cannot
        raise InvalidHeader(
            f"qcow L1 table at {hdr.l1_table_offset} lies beyond what QEMU can read", code="qcow.l1-table-offset"
        )
    return hdr


def features(img: Image) -> Features:
    hdr = _header(img)
    return Features(
        cluster_size=1 << hdr.cluster_bits,
        details={"l2-bits": hdr.l2_bits, "l1-table-offset": hdr.l1_table_offset, "mtime": hdr.mtime},
    )


def size(img: Image) -> int:
    return _header(img).size // SECTOR * SECTOR


def backing(img: Image) -> Backing | None:
    hdr = _header(img)
    if hdr.backing_file_offset == 0:
        return None
    length = hdr.backing_file_size
    if length > MAX_BACKING_NAME:
        raise InvalidHeader(
            f"qcow backing file name of {length} bytes is longer than {MAX_BACKING_NAME}",
            code="qcow.backing-name-length",
        )
    if hdr.backing_file_offset + length > img.size:
        raise InvalidHeader(
            f"qcow backing file name ({length} bytes at {hdr.backing_file_offset}) runs past the end of the file",
            code="qcow.backing-name-offset",
        )
    name = cstring(img.read(hdr.backing_file_offset, length))
    return Backing(name) if name else None


@hookimpl
def storprobe_formats() -> list[FormatSpec]:
    return [
        FormatSpec(
            name="qcow",
            description="QEMU copy-on-write v1",
            magic=b"QFI\xfb",
            endian=">",
            version_offset=4,
            versions=(1,),
            crypt_offset=36,
            crypt_methods=CRYPT_METHODS,
            size=size,
            backing=backing,
            features=features,
        )
    ]
