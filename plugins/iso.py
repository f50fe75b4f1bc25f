"""iso: ISO 9660 CD/DVD images (ECMA-119; El Torito boot records).

The volume descriptor set starts at byte 32768 (sector 16 of 2048 bytes); each
descriptor is a type byte, ``CD001`` and a version, and the set ends with a
terminator (type 255). The virtual size is the file size, in whole 512-byte
sectors as qemu-img (which calls an ISO ``raw``) reports it; the primary
volume descriptor's own idea of the size is the ``volume-size`` detail. An
ISO made bootable from USB sticks (isohybrid) also carries an MBR or GPT,
reported with the ``partition-table`` details raw volumes also get.
"""

from __future__ import annotations

from typing import Any

from storprobe import Features, FormatSpec, Image, InvalidHeader, Layout, hookimpl
from storprobe.layout import BOOT_SIGNATURE
from storprobe.source import sector_rounded_size

DESCRIPTORS_OFFSET = 16 * 2048
DESCRIPTOR_SIZE = 2048
MAX_DESCRIPTORS = 64  # descriptors read at most; a real set has a handful
STANDARD_ID = b"CD001"

BOOT_RECORD, PRIMARY, SUPPLEMENTARY, PARTITION, TERMINATOR = 0, 1, 2, 3, 255
EL_TORITO_ID = b"EL TORITO SPECIFICATION"  # boot system identifier of an El Torito boot record

VOLUME_DESCRIPTOR = Layout(
    "<",
    "iso9660 volume descriptor",
    ("type", "B"),
    ("standard_id", "5s"),  # CD001
    ("version", "B"),
    ("boot_system_id", "32s"),  # boot records only
)
# Both-endian fields are stored little-endian, then big-endian; the copies must agree.
PRIMARY_VOLUME_DESCRIPTOR = Layout(
    "<",
    "iso9660 primary volume descriptor",
    ("type", "B"),
    ("standard_id", "5s"),
    ("version", "B"),
    (None, "x"),
    ("system_id", "32s"),
    ("volume_id", "32s"),
    (None, "8x"),
    ("volume_space_size", "I"),  # in logical blocks
    ("volume_space_size_be", "4s"),
    (None, "40x"),  # escape sequences, volume set size, volume sequence number
    ("logical_block_size", "H"),
    ("logical_block_size_be", "2s"),
)
LOGICAL_BLOCK_SIZES = (512, 1024, 2048)


def _descriptors(img: Image) -> list[tuple[int, Any]]:
    """(offset, descriptor) of every descriptor before the set terminator."""
    found: list[tuple[int, Any]] = []
    for index in range(MAX_DESCRIPTORS):
        offset = DESCRIPTORS_OFFSET + index * DESCRIPTOR_SIZE
        desc = VOLUME_DESCRIPTOR.unpack(img.read(offset, VOLUME_DESCRIPTOR.size))
        if desc.standard_id != STANDARD_ID:
            raise InvalidHeader(
                f"descriptor set ends at byte {offset} without a terminator", code="iso.unterminated"
            )
        if desc.type == TERMINATOR:
            return found
        if desc.type not in (BOOT_RECORD, PRIMARY, SUPPLEMENTARY, PARTITION):
            raise InvalidHeader(
                f"unknown volume descriptor type {desc.type} at byte {offset}", code="iso.descriptor-type"
            )
        found.append((offset, desc))
    raise InvalidHeader(
        f"no set terminator among the first {MAX_DESCRIPTORS} descriptors", code="iso.unterminated"
    )


def _both_endian(little: int, big: bytes, what: str) -> int:
    if little != int.from_bytes(big, "big"):
        raise InvalidHeader(
            f"{what}: little-endian {little} and big-endian copies differ", code="iso.both-endian"
        )
    return little


def _text(raw: bytes) -> str:
    return raw.decode("ascii", "replace").rstrip(" \0")


def features(img: Image) -> Features:
    descriptors = _descriptors(img)
    primary = next((offset for offset, d in descriptors if d.type == PRIMARY), None)
    if primary is None:
        raise InvalidHeader("no primary volume descriptor", code="iso.no-primary")
    pvd = PRIMARY_VOLUME_DESCRIPTOR.unpack(img.read(primary, PRIMARY_VOLUME_DESCRIPTOR.size))
    block_size = _both_endian(pvd.logical_block_size, pvd.logical_block_size_be, "logical block size")
    if block_size not in LOGICAL_BLOCK_SIZES:
        raise InvalidHeader(
            f"logical block size {block_size} is not 512, 1024 or 2048", code="iso.block-size"
        )
    blocks = _both_endian(pvd.volume_space_size, pvd.volume_space_size_be, "volume space size")
    details: dict[str, Any] = {
        "volume-id": _text(pvd.volume_id),
        "system-id": _text(pvd.system_id),
        "volume-size": blocks * block_size,
    }
    if any(d.type == BOOT_RECORD and d.boot_system_id.rstrip(b"\0") == EL_TORITO_ID for _, d in descriptors):
        details["el-torito"] = True
    if img.head[510:512] == BOOT_SIGNATURE:  # a hybrid image's MBR: the partition tables load for it alone
        from storprobe.partitions import partition_details

        details.update(partition_details(img.head))
    return Features(details=details)


@hookimpl
def storprobe_formats() -> list[FormatSpec]:
    return [
        FormatSpec(
            name="iso",
            description="ISO 9660 CD/DVD image",
            magic=STANDARD_ID,
            magic_offset=DESCRIPTORS_OFFSET + 1,
            qemu_driver="raw",  # QEMU has no iso driver
            size=sector_rounded_size,
            features=features,
        )
    ]
