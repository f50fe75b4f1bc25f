"""qed: QEMU enhanced disk (little-endian).

Header per QEMU's docs/interop/qed_spec.rst; validation follows what QEMU's
block/qed.c open refuses (``qed.<rule>``). The need-check feature bit is the
dirty flag. The backing file is reported with format ``raw`` when the
no-probe bit says so, else with no recorded format.

Deliberate differences from qemu-img 7.2, where QEMU's arithmetic is wrong:
its L1-table check refuses every image with ``table_size`` 1 (which the spec
allows and ``qemu-img create`` writes), and its maximum image size is a 64-bit
product that wraps to 0 for large clusters and tables; we accept both (sizes
capped at QEMU's block-layer limit). qemu-img also shows need-check images as
clean, because the driver clears the bit in memory once the image is drained.
"""

from __future__ import annotations

from storprobe import (
    QEMU_MAX_LENGTH,
    Backing,
    Features,
    FormatSpec,
    Image,
    InvalidHeader,
    Layout,
    LibvirtFacts,
    hookimpl,
)
from storprobe.layout import Header, cstring

HEADER = Layout(
    "<",
    "qed header",
    ("magic", "4s"),
    ("cluster_size", "I"),  # bytes
    ("table_size", "I"),  # clusters per L1/L2 table
    ("header_size", "I"),  # clusters
    ("features", "Q"),
    ("compat_features", "Q"),
    ("autoclear_features", "Q"),
    ("l1_table_offset", "Q"),  # bytes
    ("image_size", "Q"),  # bytes
    ("backing_filename_offset", "I"),  # bytes from the start of the file
    ("backing_filename_size", "I"),
)

F_BACKING_FILE = 0x1
F_NEED_CHECK = 0x2
F_BACKING_FORMAT_NO_PROBE = 0x4
FEATURE_NAMES = {F_BACKING_FILE: "backing-file", F_NEED_CHECK: "need-check", F_BACKING_FORMAT_NO_PROBE: "no-probe"}
KNOWN_FEATURES = F_BACKING_FILE | F_NEED_CHECK | F_BACKING_FORMAT_NO_PROBE

MIN_CLUSTER, MAX_CLUSTER = 4 * 1024, 64 * 1024 * 1024
MIN_TABLE, MAX_TABLE = 1, 16
SECTOR = 512
MAX_BACKING_NAME = 4095  # QEMU reads the name into a PATH_MAX buffer


def _power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def _header(img: Image) -> Header:
    """The header, checked as QEMU's qed open checks it."""
    hdr = HEADER.unpack(img.header)
    unknown = hdr.features & ~KNOWN_FEATURES
    if unknown:
        raise InvalidHeader(f"qed image uses unknown feature bits {unknown:#x}", code="qed.features")
    cluster = hdr.cluster_size
    if not (MIN_CLUSTER <= cluster <= MAX_CLUSTER and _power_of_two(cluster)):
        raise InvalidHeader(
            f"qed cluster size {cluster} is not a power of two from 4 KiB to 64 MiB", code="qed.cluster-size"
        )
    if not (MIN_TABLE <= hdr.table_size <= MAX_TABLE and _power_of_two(hdr.table_size)):
        raise InvalidHeader(
            f"qed table size {hdr.table_size} is not a power of two from 1 to 16 clusters", code="qed.table-size"
        )
    if hdr.image_size % SECTOR:
        raise InvalidHeader(
            f"qed image size {hdr.image_size} is not a multiple of 512", code="qed.image-size-unaligned"
        )
    entries = hdr.table_size * cluster // 8
    limit = min(entries * entries * cluster, QEMU_MAX_LENGTH)
    if hdr.image_size > limit:
        raise InvalidHeader(
            f"qed image size {hdr.image_size} exceeds {limit} bytes for this cluster and table size",
            code="qed.image-size-too-large",
        )
    _check_l1_table(img, hdr)
    if hdr.header_size > (2**32 - 1) // cluster:
        raise InvalidHeader(f"qed header of {hdr.header_size} clusters is too large", code="qed.header-size")
    return hdr


def _check_l1_table(img: Image, hdr: Header) -> None:
    """The L1 table must be cluster-aligned, after the header, and inside the file."""
    cluster = hdr.cluster_size
    offset = hdr.l1_table_offset
    if offset % cluster:
        raise InvalidHeader(f"qed L1 table offset {offset} is not cluster-aligned", code="qed.l1-table-alignment")
    if offset < hdr.header_size * cluster:
        raise InvalidHeader(f"qed L1 table offset {offset} lies inside the header", code="qed.l1-table-in-header")
    whole_clusters = img.size // cluster * cluster  # QEMU ignores a partial last cluster
    if offset + hdr.table_size * cluster > whole_clusters:
        raise InvalidHeader(
            f"qed L1 table ({hdr.table_size} clusters at {offset}) runs past the end of the file",
            code="qed.l1-table-beyond-eof",
        )


def features(img: Image) -> Features:
    hdr = _header(img)
    return Features(
        cluster_size=hdr.cluster_size,
        dirty=bool(hdr.features & F_NEED_CHECK),
        details={
            "table-size": hdr.table_size,
            "header-size": hdr.header_size,
            "features": [name for bit, name in FEATURE_NAMES.items() if hdr.features & bit],
            "compat-features": hdr.compat_features,
            "autoclear-features": hdr.autoclear_features,
        },
    )


def backing(img: Image) -> Backing | None:
    hdr = _header(img)
    if not hdr.features & F_BACKING_FILE:
        return None
    offset, length = hdr.backing_filename_offset, hdr.backing_filename_size
    if offset + length > hdr.cluster_size * hdr.header_size:
        raise InvalidHeader(
            f"qed backing file name ({length} bytes at {offset}) lies outside the header clusters",
            code="qed.backing-name-offset",
        )
    if length > MAX_BACKING_NAME:
        raise InvalidHeader(
            f"qed backing file name of {length} bytes is longer than {MAX_BACKING_NAME}",
            code="qed.backing-name-length",
        )
    name = cstring(img.read(offset, length))
    if not name:
        return None
    return Backing(name, "raw" if hdr.features & F_BACKING_FORMAT_NO_PROBE else None)


@hookimpl
def storprobe_formats() -> list[FormatSpec]:
    return [
        FormatSpec(
            name="qed",
            description="QEMU enhanced disk",
            magic=b"QED\x00",
            size_offset=48,
            libvirt=LibvirtFacts(cluster_size=True),
            backing=backing,
            features=features,
        )
    ]
