"""qcow (v1): real images from qemu-img compared with qemu-img info; a
malformed header for every rule; random header mutations."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from storprobe import ProbeError, probe

from oracle import (
    assert_same_as_qemu,
    code_of,
    ours,
    probe_or_named_error,
    qemu_img_create,
    qemu_img_error,
    qemu_refuses,
    run,
)
from oracle import patched as _patched

patched = partial(_patched, endian=">")  # qcow headers are big-endian


@pytest.fixture
def plain(tmp_path: Path) -> Path:
    return qemu_img_create(tmp_path / "plain.qcow", "qcow", "64M")


@pytest.mark.parametrize("size", ["64M", "1000", "3G", "1T"])
def test_plain_images_match_qemu(tmp_path, size):
    image = qemu_img_create(tmp_path / "a.qcow", "qcow", size)
    mine = assert_same_as_qemu(image)
    assert mine["format"] == "qcow" and mine["cluster-size"] == 4096


def test_backing_file_matches_qemu(tmp_path):
    base = qemu_img_create(tmp_path / "base.raw", "raw", "16M")
    image = tmp_path / "top.qcow"
    run("qemu-img", "create", "-q", "-f", "qcow", "-b", base.name, "-F", "raw", image)
    mine = assert_same_as_qemu(image)
    # qcow records no backing format; with a backing file qemu-img picks 512-byte clusters.
    assert mine["backing-filename"] == "base.raw" and "backing-filename-format" not in mine
    assert mine["cluster-size"] == 512


def test_aes_encrypted_image_matches_qemu(tmp_path):
    image = tmp_path / "enc.qcow"
    run(
        "qemu-img", "create", "-q", "--object", "secret,id=sec0,data=123456", "-f", "qcow",
        "-o", "encrypt.format=aes,encrypt.key-secret=sec0", image, "16M",
    )
    mine = assert_same_as_qemu(image)
    assert mine["encrypted"] is True
    assert probe(image).encryption == "aes"


def test_size_rounds_down_to_sectors_like_qemu(plain, tmp_path):
    image = patched(plain, tmp_path / "odd.qcow", (24, "Q", 1000))
    assert assert_same_as_qemu(image)["virtual-size"] == 512


def test_detected_by_magic_and_version(plain):
    info = probe(plain)
    assert (info.format, info.evidence, info.version) == ("qcow", "magic", 1)


# (edits, code): each breaks one rule QEMU's qcow open enforces.
QEMU_RULES = [
    ([(24, "Q", 1)], "qcow.size-too-small"),
    ([(32, "B", 8)], "qcow.cluster-bits"),
    ([(32, "B", 17)], "qcow.cluster-bits"),
    ([(33, "B", 5)], "qcow.l2-bits"),
    ([(33, "B", 14)], "qcow.l2-bits"),
    ([(36, "I", 2)], "qcow.crypt-method"),
    ([(24, "Q", 2**64 - 2**20)], "qcow.size-too-large"),
    ([(32, "B", 9), (33, "B", 6), (24, "Q", 2**44)], "qcow.l1-size"),
    ([(8, "Q", 48), (16, "I", 1024)], "qcow.backing-name-length"),
    ([(40, "Q", 2**63 - 8)], "qcow.l1-table-offset"),  # QEMU: "Input/output error"
    ([(40, "Q", 2**64 - 8)], "qcow.l1-table-offset"),
]


@pytest.mark.parametrize("edits, code", QEMU_RULES, ids=[c for _, c in QEMU_RULES])
def test_malformed_header_is_refused_like_qemu(plain, tmp_path, edits, code):
    image = patched(plain, tmp_path / "bad.qcow", *edits)
    assert code_of(image) == code
    qemu_refuses(image)


def test_l1_table_past_the_end_of_the_file_reads_as_zeros(plain, tmp_path):
    """QEMU reads zeros for an L1 table past the end of the file (nothing
    allocated) and opens the image; so do we."""
    image = patched(plain, tmp_path / "far.qcow", (40, "Q", 1 << 40))
    assert assert_same_as_qemu(image)["format"] == "qcow"


def test_backing_name_past_end_of_file(plain, tmp_path):
    """QEMU reads zeros past the end of the file and shows no backing file;
    we call a name that points outside the file malformed."""
    image = patched(plain, tmp_path / "bad.qcow", (8, "Q", plain.stat().st_size - 4), (16, "I", 100))
    assert code_of(image) == "qcow.backing-name-offset"
    assert qemu_img_error(image, "qcow") is None


def test_empty_backing_name_is_no_backing_like_qemu(plain, tmp_path):
    image = patched(plain, tmp_path / "nameless.qcow", (8, "Q", 48), (16, "I", 0))
    assert "backing-filename" not in assert_same_as_qemu(image)


def test_truncated_header(plain, tmp_path):
    image = tmp_path / "short.qcow"
    image.write_bytes(plain.read_bytes()[:40])
    with pytest.raises(ProbeError) as err:
        ours(image, "qcow")
    assert err.value.code == "truncated"


@pytest.fixture(scope="module")
def real_bytes(tmp_path_factory) -> bytes:
    base = tmp_path_factory.mktemp("qcow")
    qemu_img_create(base / "base.raw", "raw", "1M")
    image = base / "top.qcow"
    run("qemu-img", "create", "-q", "-f", "qcow", "-b", "base.raw", "-F", "raw", image, "8M")
    return image.read_bytes()


@given(
    edits=st.lists(st.tuples(st.integers(0, 63), st.integers(0, 255)), min_size=1, max_size=8),
    cut=st.one_of(st.none(), st.integers(0, 4096)),
)
def test_random_header_mutations_never_crash(real_bytes, edits, cut):
    data = bytearray(real_bytes)
    for offset, value in edits:
        data[offset] = value
    data = bytes(data if cut is None else data[:cut])
    probe_or_named_error(data, None, "qcow")
