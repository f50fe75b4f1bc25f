"""qed: real images from qemu-img compared with qemu-img info; a malformed
header for every rule; random header mutations."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from storprobe import Backing, probe

from oracle import assert_same_as_qemu, code_of, patched, probe_or_named_error, qemu_img_create, qemu_refuses, run


@pytest.fixture
def plain(tmp_path: Path) -> Path:
    return qemu_img_create(tmp_path / "plain.qed", "qed", "64M")


@pytest.mark.parametrize(
    "size, options",
    [
        ("64M", ()),
        ("1000", ()),
        ("10G", ("cluster_size=4096",)),
        ("1G", ("cluster_size=1M", "table_size=16")),
        ("100M", ("table_size=2",)),
    ],
)
def test_images_match_qemu(tmp_path, size, options):
    image = qemu_img_create(tmp_path / "a.qed", "qed", size, *options)
    assert assert_same_as_qemu(image)["format"] == "qed"


@pytest.mark.parametrize("backing_fmt, recorded", [("raw", "raw"), ("qed", None)])
def test_backing_file_matches_qemu(tmp_path, backing_fmt, recorded):
    """-F raw sets the no-probe bit (backing format raw); any other format is not recorded."""
    base = qemu_img_create(tmp_path / "base.img", backing_fmt, "16M")
    image = tmp_path / "top.qed"
    run("qemu-img", "create", "-q", "-f", "qed", "-b", base.name, "-F", backing_fmt, image)
    mine = assert_same_as_qemu(image)
    assert mine["backing-filename"] == "base.img"
    assert probe(image).backing == Backing("base.img", recorded)


def test_table_size_one_is_accepted(tmp_path):
    """qemu-img writes table_size=1 images but its L1 check then refuses every
    one of them (its overflow test is off by one); the spec allows them."""
    image = qemu_img_create(tmp_path / "t1.qed", "qed", "1M", "cluster_size=4096", "table_size=1")
    assert "table offset" in qemu_refuses(image)
    info = probe(image)
    assert (info.virtual_size, info.cluster_size) == (1024 * 1024, 4096)


def test_need_check_is_dirty(plain, tmp_path):
    """qemu-img 7.2 prints dirty-flag false here: the driver clears need-check
    in memory when qemu-img drains the read-only image. The bit is on disk."""
    image = patched(plain, tmp_path / "dirty.qed", (16, "Q", 2))
    assert assert_same_as_qemu(image, ignore=("dirty-flag",))
    assert probe(image).dirty is True


def test_unknown_compat_and_autoclear_bits_are_accepted_like_qemu(plain, tmp_path):
    image = patched(plain, tmp_path / "compat.qed", (24, "Q", 1 << 5), (32, "Q", 1 << 7))
    assert_same_as_qemu(image)
    assert probe(image).details["compat-features"] == 1 << 5


def test_size_limit_past_qemus_arithmetic(tmp_path):
    """With 8 MiB clusters and 2-cluster tables the spec's maximum exceeds
    2^64 and QEMU's 64-bit product wraps to 0, so QEMU refuses any size; we
    apply the spec (capped at QEMU's block-layer limit)."""
    cluster = 8 * 1024 * 1024
    header = struct.pack("<4sIIIQQQQQII", b"QED\0", cluster, 2, 1, 0, 0, 0, cluster, 2**30, 0, 0)
    image = tmp_path / "big.qed"
    with image.open("wb") as f:
        f.write(header)
        f.truncate(3 * cluster)
    assert "size is invalid" in qemu_refuses(image)
    assert probe(image).virtual_size == 2**30


# (edits, code): each breaks one rule QEMU's qed open enforces.
QEMU_RULES = [
    ([(16, "Q", 8)], "qed.features"),
    ([(4, "I", 2048)], "qed.cluster-size"),
    ([(4, "I", 3 * 65536)], "qed.cluster-size"),
    ([(4, "I", 128 * 1024 * 1024)], "qed.cluster-size"),
    ([(8, "I", 0)], "qed.table-size"),
    ([(8, "I", 3)], "qed.table-size"),
    ([(8, "I", 32)], "qed.table-size"),
    ([(48, "Q", 1000)], "qed.image-size-unaligned"),
    ([(48, "Q", 2**46 + 512)], "qed.image-size-too-large"),
    ([(40, "Q", 65536 + 512)], "qed.l1-table-alignment"),
    ([(12, "I", 2)], "qed.l1-table-in-header"),
    ([(40, "Q", 2 * 65536)], "qed.l1-table-beyond-eof"),
    ([(40, "Q", 2**64 - 65536)], "qed.l1-table-beyond-eof"),
    ([(16, "Q", 1), (56, "I", 65530), (60, "I", 10)], "qed.backing-name-offset"),
]


@pytest.mark.parametrize("edits, code", QEMU_RULES, ids=[f"{c}-{i}" for i, (_, c) in enumerate(QEMU_RULES)])
def test_malformed_header_is_refused_like_qemu(plain, tmp_path, edits, code):
    image = patched(plain, tmp_path / "bad.qed", *edits)
    assert code_of(image) == code
    qemu_refuses(image)


def test_header_size_overflow(tmp_path):
    """header_size x cluster_size must fit in 32 bits; the L1 table is moved
    past the (4 GiB) header of a sparse file so that only this rule fails."""
    cluster, header_clusters = 64 * 1024 * 1024, 64
    l1 = header_clusters * cluster
    image = tmp_path / "huge-header.qed"
    with image.open("wb") as f:
        f.write(struct.pack("<4sIIIQQQQQII", b"QED\0", cluster, 2, header_clusters, 0, 0, 0, l1, 0, 0, 0))
        f.truncate(l1 + 2 * cluster)
    assert code_of(image) == "qed.header-size"
    assert "header size is too large" in qemu_refuses(image)


def test_backing_name_too_long(tmp_path):
    """QEMU reads the name into a PATH_MAX buffer: 4096 bytes or more fail."""
    cluster = 64 * 1024
    header = struct.pack("<4sIIIQQQQQII", b"QED\0", cluster, 2, 1, 1, 0, 0, cluster, 2**20, 64, 4096)
    image = tmp_path / "long-name.qed"
    image.write_bytes(header + b"b" * 4096 + bytes(3 * cluster - len(header) - 4096))
    assert code_of(image) == "qed.backing-name-length"
    assert "backing filename" in qemu_refuses(image)


@pytest.fixture(scope="module")
def real_bytes(tmp_path_factory) -> bytes:
    base = tmp_path_factory.mktemp("qed")
    qemu_img_create(base / "base.raw", "raw", "1M")
    image = base / "top.qed"
    run("qemu-img", "create", "-q", "-f", "qed", "-o", "cluster_size=4096", "-b", "base.raw", "-F", "raw", image, "8M")
    return image.read_bytes()


@given(
    edits=st.lists(st.tuples(st.integers(0, 79), st.integers(0, 255)), min_size=1, max_size=8),
    cut=st.one_of(st.none(), st.integers(0, 20000)),
)
def test_random_header_mutations_never_crash(real_bytes, edits, cut):
    data = bytearray(real_bytes)
    for offset, value in edits:
        data[offset] = value
    data = bytes(data if cut is None else data[:cut])
    probe_or_named_error(data, None, "qed")
