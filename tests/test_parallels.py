"""parallels: real images from qemu-img compared with qemu-img info; hand-built
old-magic and Format Extension images; a malformed header for every rule;
random header mutations.

qemu-img 7.2 prints neither cluster-size nor dirty-flag for parallels (the
driver has no get-info); neither do we (the cluster size is in our details)."""

from __future__ import annotations

import hashlib
import struct
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from storprobe import format_table, probe

from oracle import (
    assert_same_as_qemu,
    code_of,
    libvirt_volumes,
    patched,
    probe_or_named_error,
    qemu_img_create,
    qemu_img_error,
    qemu_info,
    qemu_refuses,
)

EXT_MAGIC = 0xAB234CEF23DCEA87
DIRTY_BITMAP = 0x20385FAE252CB34A




def same_as_qemu(path: Path) -> dict:
    assert "dirty-flag" not in qemu_info(path) and "cluster-size" not in qemu_info(path)
    return assert_same_as_qemu(path)


def extension(cluster: int, *features: tuple[int, int, bytes], end: bool = True) -> bytes:
    """A Format Extension cluster: magic, MD5 of the rest, feature sections."""
    body = b"".join(struct.pack("<QQII", m, f, len(d), 0) + d + bytes(-len(d) % 8) for m, f, d in features)
    body += bytes(24) if end else b""
    body = body.ljust(cluster - 24, b"\0")
    return struct.pack("<Q", EXT_MAGIC) + hashlib.md5(body, usedforsecurity=False).digest() + body


def bitmap(sectors: int = 204800, granularity: int = 128, l1_size: int = 1) -> bytes:
    """A dirty bitmap feature; the defaults fit the 100 MiB image below: 204800
    sectors at 128-sector granularity is 1600 bits, so one L1 entry (0 = clear)."""
    return struct.pack("<Q16sII", sectors, bytes(range(16)), granularity, l1_size) + bytes(8)


@pytest.fixture
def small(tmp_path: Path) -> Path:
    """100 MiB in 64 KiB clusters: 1600 BAT entries, data at 64 KiB, a 64 KiB file."""
    return qemu_img_create(tmp_path / "small.hds", "parallels", "100M", "cluster_size=64k")


@pytest.mark.parametrize(
    "size, options", [("64M", ()), ("100M", ("cluster_size=64k",)), ("10G", ("cluster_size=4k",)), ("1000", ())]
)
def test_images_match_qemu(tmp_path, size, options):
    image = qemu_img_create(tmp_path / "a.hds", "parallels", size, *options)
    assert same_as_qemu(image)["format"] == "parallels"
    info = probe(image)
    assert info.evidence == "magic" and format_table()["parallels"].libvirt_format == "ploop"


def test_cluster_size_is_a_detail(small):
    assert probe(small).details["cluster-size"] == 65536 and probe(small).cluster_size is None


def test_old_magic_uses_only_the_low_32_bits_of_the_size(small, tmp_path):
    image = patched(small, tmp_path / "old.hds", (0, "16s", b"WithoutFreeSpace"), (36, "Q", (7 << 32) | 204800))
    assert same_as_qemu(image)["virtual-size"] == 100 * 1024 * 1024
    assert probe(image).details["magic"] == "WithoutFreeSpace"


def test_ext_magic_uses_all_64_bits(small, tmp_path):
    image = patched(small, tmp_path / "big.hds", (36, "Q", (1 << 32) | 8))
    assert same_as_qemu(image)["virtual-size"] == ((1 << 32) | 8) * 512


def test_inuse_is_dirty(small, tmp_path):
    image = patched(small, tmp_path / "unclean.hds", (44, "I", 0x746F6E59))
    same_as_qemu(image)
    assert probe(image).details["in-use"] is True


def test_format_extension_with_a_dirty_bitmap_matches_qemu(small, tmp_path):
    image = patched(small, tmp_path / "ext.hds", (56, "Q", 128), append=extension(65536, (DIRTY_BITMAP, 0, bitmap())))
    same_as_qemu(image)
    assert probe(image).details["dirty-bitmaps"] == 1


def test_empty_format_extension_matches_qemu(small, tmp_path):
    image = patched(small, tmp_path / "ext.hds", (56, "Q", 128), append=extension(65536))
    same_as_qemu(image)
    assert probe(image).details["dirty-bitmaps"] == 0


def ext_image(small: Path, tmp_path: Path, cluster_bytes: bytes) -> Path:
    return patched(small, tmp_path / "bad.hds", (56, "Q", 128), append=cluster_bytes)


# (edits, appended bytes, code): each breaks one rule QEMU's parallels open enforces.
QEMU_RULES = [
    ([(28, "I", 0)], b"", "parallels.tracks"),
    ([(28, "I", (2**31 - 1) // 513 + 1)], b"", "parallels.cluster-size"),
    ([(32, "I", (2**31 - 1) // 4 + 1)], b"", "parallels.bat-entries"),
    ([(36, "Q", 2**54)], b"", "parallels.size-too-large"),
    ([(56, "Q", 128)], bytes(65536), "parallels.ext-magic"),
    ([(56, "Q", 128)], extension(65536)[:30] + b"x" + extension(65536)[31:], "parallels.ext-checksum"),
    ([(56, "Q", 128)], extension(65536, (DIRTY_BITMAP, 1, bytes(40))), "parallels.ext-feature-flags"),
    ([(56, "Q", 128)], extension(65536, (0x1234, 0, bytes(8))), "parallels.ext-feature-unknown"),
    ([(56, "Q", 128)], extension(65536, (DIRTY_BITMAP, 0, bytes(16))), "parallels.ext-bitmap-short"),
    ([(56, "Q", 128)], extension(65536, (DIRTY_BITMAP, 0, bitmap(l1_size=2))), "parallels.ext-bitmap-l1-size"),
    ([(56, "Q", 128)], extension(65536, (DIRTY_BITMAP, 0, bitmap(sectors=1))), "parallels.ext-bitmap-size"),
    ([(56, "Q", 128)], extension(65536, (DIRTY_BITMAP, 0, bitmap(granularity=3))), "parallels.ext-bitmap-granularity"),
    ([(56, "Q", 128)], extension(65536, (DIRTY_BITMAP, 0, bitmap().ljust(65536 - 48, b"\0")), end=False),
     "parallels.ext-unterminated"),
    ([(56, "Q", 1024)], b"", "parallels.ext-beyond-eof"),
]


@pytest.mark.parametrize("edits, tail, code", QEMU_RULES, ids=[c for *_, c in QEMU_RULES])
def test_malformed_header_is_refused_like_qemu(small, tmp_path, edits, tail, code):
    image = patched(small, tmp_path / "bad.hds", *edits, append=tail)
    assert code_of(image) == code
    qemu_refuses(image)


def test_feature_larger_than_its_cluster(small, tmp_path):
    cluster = bytearray(extension(65536, (DIRTY_BITMAP, 0, bytes(40))))
    struct.pack_into("<I", cluster, 24 + 16, 70000)  # the feature's data_size
    cluster[8:24] = hashlib.md5(bytes(cluster[24:]), usedforsecurity=False).digest()
    image = ext_image(small, tmp_path, bytes(cluster))
    assert code_of(image) == "parallels.ext-feature-size"
    assert "exceedes" in qemu_refuses(image)


# Bounds QEMU 7.2 does not check on open (it reads zeros past the end of the
# file); a table or data area outside the file is malformed here.
OWN_RULES = [
    ([(32, "I", 20000)], "parallels.bat-beyond-eof"),
    ([(48, "I", 1)], "parallels.data-off-overlaps-bat"),
    ([(48, "I", 129)], "parallels.data-off-beyond-eof"),
]


@pytest.mark.parametrize("edits, code", OWN_RULES, ids=[c for _, c in OWN_RULES])
def test_layout_outside_the_file(small, tmp_path, edits, code):
    """QEMU opens each of these: the campaign's known divergences (tests/differential_campaign.py)."""
    image = patched(small, tmp_path / "bad.hds", *edits)
    assert code_of(image) == code
    assert qemu_img_error(image, "parallels") is None


def test_wrong_version_is_reported(small, tmp_path):
    assert code_of(patched(small, tmp_path / "v3.hds", (16, "I", 3))) == "unsupported-version"


@pytest.fixture(scope="module")
def real_bytes(tmp_path_factory) -> bytes:
    image = qemu_img_create(tmp_path_factory.mktemp("parallels") / "a.hds", "parallels", "1M", "cluster_size=4k")
    return image.read_bytes() + extension(4096)


@given(
    edits=st.lists(
        st.tuples(st.one_of(st.integers(0, 63), st.integers(4096, 4160)), st.integers(0, 255)), min_size=1, max_size=8
    ),
    ext=st.booleans(),
    cut=st.one_of(st.none(), st.integers(0, 8192)),
)
def test_random_header_mutations_never_crash(real_bytes, edits, ext, cut):
    data = bytearray(real_bytes)
    if ext:
        struct.pack_into("<Q", data, 56, 8)  # the extension cluster at 4096
    for offset, value in edits:
        data[offset] = value
    data = bytes(data if cut is None else data[:cut])
    probe_or_named_error(data, None, "parallels")



def test_libvirt_calls_only_the_ext_magic_ploop(small, tmp_path):
    """libvirt 9.0 also gives a ploop file's own length as its capacity."""
    patched(small, tmp_path / "old.hds", (0, "16s", b"WithoutFreeSpace"))
    theirs = libvirt_volumes(tmp_path, "parallels")
    assert theirs["small.hds"] == ("ploop", small.stat().st_size)
    assert probe(small).virtual_size == 100 * 1024 * 1024
    assert theirs["old.hds"][0] == "raw"
    assert probe(tmp_path / "old.hds").format == "parallels"
