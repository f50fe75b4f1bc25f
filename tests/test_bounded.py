"""Bounded work: whatever a header claims, a probe ends with a result or a
named error, having read at most READ_BUDGET bytes (head included).

Each extreme header is probed through a counting source that can also claim
a size far larger than its bytes (a sparse file as big as the header says),
so a probe that trusted a count or a length would read, allocate or loop
far past the budget instead of stopping.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from pathlib import Path

import pytest

from storprobe import ImageInfo, ProbeError, probe
from storprobe.chain import DEFAULT_MAX_DEPTH, probe_chain
from storprobe.safety import check
from storprobe.source import READ_BUDGET

from oracle import CountingSource, qemu_img_create, run

PiB = 1 << 50


def outcome(data: bytes, size: int | None = None, fmt: str | None = None) -> ImageInfo | str:
    """The probe's result or error code, after checking it stayed in budget."""
    source = CountingSource(data, size)
    try:
        result: ImageInfo | str = probe(source, format=fmt)
    except ProbeError as exc:
        result = exc.code
    assert result != "plugin-error"
    assert source.bytes_read <= READ_BUDGET, f"{source.bytes_read} bytes read"
    return result


def put(data: bytes | bytearray, *fields: tuple[int, str, int | bytes]) -> bytearray:
    out = bytearray(data)
    for offset, fmt, value in fields:
        end = offset + struct.calcsize(fmt)
        if end > len(out):
            out.extend(bytes(end - len(out)))
        struct.pack_into(fmt, out, offset, value)
    return out


@pytest.fixture(scope="module")
def made(tmp_path_factory) -> dict[str, bytes]:
    d = tmp_path_factory.mktemp("extreme")
    images = {
        "qcow2": qemu_img_create(d / "a.qcow2", "qcow2", "64M"),
        "vmdk": qemu_img_create(d / "a.vmdk", "vmdk", "64M"),
        "vpc": qemu_img_create(d / "a.vhd", "vpc", "64M"),
        "vdi": qemu_img_create(d / "a.vdi", "vdi", "64M"),
        "qed": qemu_img_create(d / "a.qed", "qed", "64M"),
        "parallels": qemu_img_create(d / "a.hdd", "parallels", "64M"),
    }
    return {name: path.read_bytes() for name, path in images.items()}


# qcow2 header fields (big-endian)
Q_SIZE, Q_CLUSTER_BITS, Q_L1_SIZE, Q_L1_OFFSET = 24, 20, 36, 40
Q_REFTABLE_OFFSET, Q_REFTABLE_CLUSTERS, Q_NB_SNAPSHOTS, Q_SNAPSHOTS_OFFSET = 48, 56, 60, 64
Q_AUTOCLEAR, Q_REFCOUNT_ORDER, Q_HEADER_LENGTH = 88, 96, 100
EXT_BITMAPS = 0x23852875


def qcow2_bitmaps(base: bytes, count: int, directory_size: int | None = None) -> tuple[bytes, int]:
    """``count`` in-use bitmaps with unique names in a directory at 1 MiB,
    the bitmaps extension replacing the image's extensions."""
    entries = b"".join(
        struct.pack(">QIIBBHI", 0x10000, 1, 1, 1, 16, 8, 0) + f"b{i:07d}".encode() for i in range(count)
    )
    size = len(entries) if directory_size is None else directory_size
    header_length = struct.unpack_from(">I", base, Q_HEADER_LENGTH)[0]
    ext = struct.pack(">II", EXT_BITMAPS, 24) + struct.pack(">IIQQ", count, 0, size, 1 << 20) + bytes(8)
    data = put(base[: 1 << 20], (Q_AUTOCLEAR, ">Q", 1))
    data[header_length : header_length + len(ext)] = ext
    return bytes(data).ljust(1 << 20, b"\0") + entries, size


def qcow2_case(name: str) -> Callable[[bytes], tuple[bytes, int | None]]:
    """Hand-made extreme qcow2 headers, by name: (bytes, claimed file size)."""
    cases = {
        "petabyte": lambda b: (put(b, (Q_SIZE, ">Q", PiB), (Q_L1_SIZE, ">I", PiB >> 29)), None),
        "size-2^64-1": lambda b: (put(b, (Q_SIZE, ">Q", 2**64 - 1)), None),
        "snapshots-2^32-1": lambda b: (put(b, (Q_NB_SNAPSHOTS, ">I", 2**32 - 1), (Q_SNAPSHOTS_OFFSET, ">Q", 1 << 20)),
                                       PiB),
        "snapshots-65536": lambda b: (put(b, (Q_NB_SNAPSHOTS, ">I", 65536), (Q_SNAPSHOTS_OFFSET, ">Q", 1 << 20)),
                                      PiB),
        "bitmaps-65535": lambda b: (qcow2_bitmaps(b, 65535)[0], None),
        "bitmaps-65536": lambda b: (qcow2_bitmaps(b, 65536)[0], None),
        "bitmap-directory-64MiB": lambda b: (qcow2_bitmaps(b, 1, 65535 * 1024)[0], PiB),
        "refcount-order-255": lambda b: (put(b, (Q_REFCOUNT_ORDER, ">I", 255)), None),
        "cluster-bits-255": lambda b: (put(b, (Q_CLUSTER_BITS, ">I", 255)), None),
        "l1-2^32-1": lambda b: (put(b, (Q_L1_SIZE, ">I", 2**32 - 1)), PiB),
        "reftable-2^32-1-clusters": lambda b: (put(b, (Q_REFTABLE_CLUSTERS, ">I", 2**32 - 1)), PiB),
        "2MiB-cluster-of-empty-extensions": lambda b: (
            put(b[:112], (Q_CLUSTER_BITS, ">I", 21), (Q_L1_OFFSET, ">Q", 2 << 20), (Q_REFTABLE_OFFSET, ">Q", 4 << 20))
            + struct.pack(">II", 0x0BADC0DE, 0) * ((2 << 20) // 8 - 14),
            PiB,
        ),
    }
    return cases[name]


QCOW2_EXPECTED = {
    "petabyte": PiB,
    "size-2^64-1": "qcow2.size-too-large",
    "snapshots-2^32-1": "qcow2.too-many-snapshots",
    "snapshots-65536": ("snapshots", 65536),
    "bitmaps-65535": ("bitmaps", 65535),
    "bitmaps-65536": "qcow2.too-many-bitmaps",
    "bitmap-directory-64MiB": "read-limit",
    "refcount-order-255": "qcow2.refcount-order",
    "cluster-bits-255": "qcow2.cluster-bits",
    "l1-2^32-1": "qcow2.l1-too-large",
    "reftable-2^32-1-clusters": "qcow2.refcount-table-too-large",
    "2MiB-cluster-of-empty-extensions": 64 << 20,
}


@pytest.mark.parametrize("name, expected", QCOW2_EXPECTED.items(), ids=QCOW2_EXPECTED.keys())
def test_extreme_qcow2_header(made, name, expected):
    data, size = qcow2_case(name)(made["qcow2"])
    result = outcome(bytes(data), size)
    if isinstance(expected, int):
        assert isinstance(result, ImageInfo) and result.virtual_size == expected
    elif isinstance(expected, tuple):
        what, count = expected
        assert isinstance(result, ImageInfo), result
        found = result.snapshots if what == "snapshots" else result.specific["bitmaps"]
        assert len(found) == count
    else:
        assert result == expected


def test_petabyte_image_is_unsafe_by_default(made):
    data, _ = qcow2_case("petabyte")(made["qcow2"])
    assert [h.check for h in check(bytes(data)).hazards] == ["size"]


# vmdk sparse header fields (little-endian)
V_CAPACITY, V_GRAIN, V_DESC_SIZE, V_GTES = 12, 20, 36, 44
DESCRIPTOR = '# Disk DescriptorFile\nversion=1\nCID=1\nparentCID=ffffffff\ncreateType="monolithicFlat"\n'

OTHER_CASES: dict[str, tuple[str | None, Callable[[dict[str, bytes]], tuple[bytes, int | None]], object]] = {
    "vmdk-petabyte": ("vmdk", lambda m: (put(m["vmdk"], (V_CAPACITY, "<Q", PiB // 512)), None), PiB),
    "vmdk-capacity-2^64-1": ("vmdk", lambda m: (put(m["vmdk"], (V_CAPACITY, "<Q", 2**64 - 1)), None),
                             "vmdk.capacity"),
    "vmdk-grain-2^63": ("vmdk", lambda m: (put(m["vmdk"], (V_GRAIN, "<Q", 2**63)), None), "vmdk.grain-size"),
    "vmdk-descriptor-2^64-sectors": ("vmdk", lambda m: (put(m["vmdk"], (V_DESC_SIZE, "<Q", 2**64 - 1)), None),
                                     "vmdk.descriptor-size"),
    "vmdk-40000-extents": (
        "vmdk",
        lambda m: ((DESCRIPTOR + 'RW 1 FLAT "x" 0\n' * 40000).encode(), None),
        "vmdk.extent-count",
    ),
    "vmdk-1MiB-of-blank-lines": (
        "vmdk",
        lambda m: ((DESCRIPTOR + "\n" * 1_000_000 + 'RW 1 FLAT "x" 0\n').encode(), None),
        "vmdk.extent-count",
    ),
    "vmdk-descriptor-beyond-1MiB": (
        "vmdk",
        lambda m: ((DESCRIPTOR + "#" * (1 << 20) + '\nRW 1 FLAT "x" 0\n').encode(), None),
        "vmdk.descriptor-size",
    ),
    "vpc-table-2^31-entries": (
        "vpc",
        lambda m: (put(m["vpc"], (512 + 28, ">I", 2**31)), None),  # dynamic header's max_table_entries
        "vpc.table-entries",
    ),
    "vdi-disk-size-2^63": ("vdi", lambda m: (put(m["vdi"], (0x170, "<Q", 2**63)), None), "vdi.disk-size"),
    "vdi-blocks-2^32-1": ("vdi", lambda m: (put(m["vdi"], (0x180, "<I", 2**32 - 1)), PiB), "vdi.blocks-max"),
    "qed-image-size-2^63": ("qed", lambda m: (put(m["qed"], (48, "<Q", 2**63)), None), "qed.image-size-too-large"),
    "qed-header-2^32-clusters": ("qed", lambda m: (put(m["qed"], (12, "<I", 2**32 - 1), (40, "<Q", 1 << 48)), PiB),
                                 "qed.header-size"),
    "parallels-bat-2^31": ("parallels", lambda m: (put(m["parallels"], (32, "<I", 2**31 - 1)), PiB),
                           "parallels.bat-entries"),
    "parallels-1GiB-extension-cluster": (
        "parallels",
        lambda m: (put(m["parallels"], (28, "<I", (2**31 - 1) // 513), (56, "<Q", 1 << 20)), PiB),
        "read-limit",
    ),
    "iso-64-supplementary-descriptors": (
        "iso",
        lambda m: (bytes(32768) + b"".join((bytes([2]) + b"CD001\x01").ljust(2048, b"\0") for _ in range(200)),
                   None),
        "iso.unterminated",
    ),
    "dmg-xml-2^63": (
        "dmg",
        lambda m: (bytes(4096) + put(b"koly", (4, ">I", 4), (8, ">I", 512), (0xD8, ">Q", 0), (0xE0, ">Q", 2**63),
                                     (0x1EC, ">Q", 2**60), (511, "B", 0)), None),
        "dmg.xml-plist",
    ),
    "cloop-2^32-blocks": (
        "cloop",
        lambda m: (
            b"#!/bin/sh\n#V2.0 Format\nmodprobe cloop file=$0 && mount -r -t iso9660 /dev/cloop $1\n".ljust(128, b"\0")
            + struct.pack(">II", 65536, 2**32 - 1),
            PiB,
        ),
        "cloop.n-blocks",
    ),
}


@pytest.mark.parametrize("name", OTHER_CASES, ids=OTHER_CASES.keys())
def test_extreme_header(made, name):
    fmt, build, expected = OTHER_CASES[name]
    data, size = build(made)
    result = outcome(bytes(data), size)
    if isinstance(expected, int):
        assert isinstance(result, ImageInfo) and (result.format, result.virtual_size) == (fmt, expected)
    else:
        assert result == expected


def test_budget_counts_the_head_and_every_read():
    """A source claiming a petabyte of zeros: the head, a tail, nothing more."""
    source = CountingSource(b"", PiB)
    assert probe(source).format == "raw"
    assert source.bytes_read <= 0x8200 + 4096 and source.reads <= 2


# ---- chains ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def deep_chain(tmp_path_factory) -> Path:
    """i000.qcow2 (no backing) <- i001 <- ... <- i201: 201 backing images below the top."""
    d = tmp_path_factory.mktemp("chain")
    qemu_img_create(d / "i000.qcow2", "qcow2", "1M")
    run("qemu-img", "create", "-q", "-f", "qcow2", "-u", "-b", "i000.qcow2", "-F", "qcow2", d / "template", "1M")
    template = (d / "template").read_bytes()
    at = template.index(b"i000.qcow2")
    for i in range(1, DEFAULT_MAX_DEPTH + 2):
        data = template[:at] + f"i{i - 1:03d}.qcow2".encode() + template[at + 10 :]
        (d / f"i{i:03d}.qcow2").write_bytes(data)
    return d


def test_chain_of_200_backing_images_is_followed(deep_chain):
    chain = probe_chain(deep_chain / "i200.qcow2")
    assert (len(chain.images), chain.error) == (DEFAULT_MAX_DEPTH + 1, None)


def test_chain_of_201_backing_images_stops_with_a_named_error(deep_chain):
    chain = probe_chain(deep_chain / "i201.qcow2")
    assert chain.error is not None and chain.error.code == "backing.too-deep"
    assert len(chain.images) == DEFAULT_MAX_DEPTH + 1
    assert probe_chain(deep_chain / "i201.qcow2", max_depth=5).error.code == "backing.too-deep"
