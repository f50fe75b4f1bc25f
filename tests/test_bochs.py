"""bochs: real growing images from bximage compared with qemu-img info; a
hand-built version-1 header; a malformed header for every rule; random header
mutations.

qemu-img 7.2 prints neither cluster-size nor dirty-flag for bochs (the driver
has no get-info); we print dirty-flag, so it is left out of the comparison and
its absence on qemu's side is asserted. libvirt 9.0 calls bochs raw; the
format's own header wins here."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from storprobe import probe

from oracle import (
    assert_same_as_qemu,
    code_of,
    libvirt_volumes,
    patched,
    probe_or_named_error,
    qemu_img_error,
    qemu_info,
    qemu_refuses,
    run,
)


def bximage(path: Path, size: str, mode: str = "growing") -> Path:
    run("bximage", "-q", "-func=create", f"-hd={size}", f"-imgmode={mode}", path)
    return path




def same_as_qemu(path: Path) -> dict:
    assert "dirty-flag" not in qemu_info(path) and "cluster-size" not in qemu_info(path)
    return assert_same_as_qemu(path)


@pytest.fixture
def small(tmp_path: Path) -> Path:
    """10 MiB: 1024 catalog entries of 16 KiB extents, header and catalog only."""
    return bximage(tmp_path / "small.img", "10M")


@pytest.mark.parametrize("size", ["10M", "100M", "1G", "8G"])
def test_growing_images_match_qemu(tmp_path, size):
    image = bximage(tmp_path / "disk.img", size)
    mine = same_as_qemu(image)
    info = probe(image)
    assert (mine["format"], info.evidence, info.version) == ("bochs", "magic", 0x00020000)


def test_extent_size_is_a_detail(small):
    info = probe(small)
    assert info.cluster_size is None and info.details["extent-size"] == 16384


def test_version_1_header_matches_qemu(small, tmp_path):
    """Version 1 has no reserved word: the disk size sits at 84. bximage
    writes only version 2, so this one is rewritten by hand."""
    disk = struct.unpack_from("<Q", small.read_bytes(), 88)[0]
    image = patched(small, tmp_path / "v1.img", (64, "I", 0x00010000), (84, "Q", disk), (92, "I", 0))
    assert same_as_qemu(image)["virtual-size"] == disk == probe(small).virtual_size


def test_other_bochs_modes_are_not_bochs(tmp_path):
    """bximage's sparse mode has its own magic: neither qemu nor we call it bochs."""
    image = bximage(tmp_path / "sparse.img", "10M", "sparse")
    assert probe(image).format == qemu_info(image)["format"] == "raw"


# (edits, code): each breaks one rule QEMU's bochs open enforces.
QEMU_RULES = [
    ([(32, "16s", b"Journal")], "bochs.type"),
    ([(48, "16s", b"Undoable")], "bochs.subtype"),
    ([(48, "16s", b"Growing!")], "bochs.subtype"),
    ([(72, "I", 0x100001)], "bochs.catalog-size"),
    ([(80, "I", 256)], "bochs.extent-too-small"),
    ([(80, "I", 3 * 4096)], "bochs.extent-not-power-of-two"),
    ([(80, "I", 0x1000000)], "bochs.extent-too-large"),
    ([(72, "I", 629)], "bochs.catalog-too-small"),
    ([(88, "Q", 2**62)], "bochs.catalog-too-small"),
]


@pytest.mark.parametrize("edits, code", QEMU_RULES, ids=[f"{c}-{i}" for i, (_, c) in enumerate(QEMU_RULES)])
def test_malformed_header_is_refused_like_qemu(small, tmp_path, edits, code):
    image = patched(small, tmp_path / "bad.img", *edits)
    assert code_of(image) == code
    qemu_refuses(image, "bochs")


def test_catalog_past_end_of_file(small, tmp_path):
    """QEMU reads zeros past the end of the file; a catalog outside it is malformed here."""
    image = patched(small, tmp_path / "bad.img", (72, "I", 1025))
    assert code_of(image) == "bochs.catalog-beyond-eof"
    assert qemu_img_error(image, "bochs") is None


def test_magic_must_end_in_nul_like_qemu(small, tmp_path):
    image = patched(small, tmp_path / "bad.img", (22, "c", b"!"))
    assert probe(image).format == qemu_info(image)["format"] == "raw"


def test_unknown_version(small, tmp_path):
    assert code_of(patched(small, tmp_path / "v3.img", (64, "I", 0x00030000))) == "unsupported-version"


@pytest.fixture(scope="module")
def real_bytes(tmp_path_factory) -> bytes:
    return bximage(tmp_path_factory.mktemp("bochs") / "a.img", "10M").read_bytes()


@given(
    edits=st.lists(st.tuples(st.integers(0, 99), st.integers(0, 255)), min_size=1, max_size=8),
    cut=st.one_of(st.none(), st.integers(0, 5000)),
)
def test_random_header_mutations_never_crash(real_bytes, edits, cut):
    data = bytearray(real_bytes)
    for offset, value in edits:
        data[offset] = value
    data = bytes(data if cut is None else data[:cut])
    probe_or_named_error(data, None, "bochs")



def test_libvirt_calls_bochs_raw(small):
    assert libvirt_volumes(small.parent, "bochs")["small.img"][0] == "raw"
    assert probe(small).format == "bochs"
