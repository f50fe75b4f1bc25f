"""cloop: real images from create_compressed_fs compared with qemu-img info; a
malformed header for every rule; random header mutations.

qemu-img 7.2 prints neither cluster-size nor dirty-flag for cloop (the driver
has no get-info); neither do we (the block size is in our details). libvirt 9.0 calls cloop raw; the
format's own header wins here."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from storprobe import ProbeError, probe

from builders import PREAMBLE, cloop_bytes
from oracle import (
    assert_same_as_qemu,
    code_of,
    libvirt_volumes,
    probe_or_named_error,
    qemu_img_error,
    qemu_info,
    qemu_refuses,
    run,
)


def create_compressed_fs(tmp_path: Path, payload: bytes, block_size: int) -> Path:
    source, image = tmp_path / "payload.bin", tmp_path / f"disk-{block_size}.cloop"
    source.write_bytes(payload)
    run("create_compressed_fs", "-q", "-B", str(block_size), source, image)
    return image


def hand_built(path: Path, *args, **kwargs) -> Path:
    """``cloop_bytes(*args, **kwargs)`` written to ``path``."""
    path.write_bytes(cloop_bytes(*args, **kwargs))
    return path


def same_as_qemu(path: Path) -> dict:
    assert "dirty-flag" not in qemu_info(path) and "cluster-size" not in qemu_info(path)
    return assert_same_as_qemu(path)


@pytest.mark.parametrize(
    "length, block_size",
    [(2 * 1024 * 1024, 65536), (1_000_000, 65536), (300_000, 512), (5 * 1024 * 1024, 256 * 1024), (65537, 65536)],
)
def test_images_match_qemu(tmp_path, length, block_size):
    payload = os.urandom(length // 2) + bytes(length - length // 2)
    image = create_compressed_fs(tmp_path, payload, block_size)
    mine = same_as_qemu(image)
    info = probe(image)
    assert (mine["format"], info.evidence) == ("cloop", "magic")
    assert info.details["block-size"] == block_size
    assert mine["virtual-size"] == -(-length // block_size) * block_size


def test_size_beyond_qemus_32_bit_sector_count(tmp_path):
    """QEMU multiplies n_blocks by the sectors per block in 32 bits: 32769
    blocks of 64 MiB (2 TiB + 64 MiB) wrap to 64 MiB there."""
    image = hand_built(tmp_path / "huge.cloop", 64 * 1024 * 1024, 32769)
    assert qemu_info(image)["virtual-size"] == 64 * 1024 * 1024
    assert probe(image).virtual_size == 32769 * 64 * 1024 * 1024


# (block size, block count, code): each breaks one rule QEMU's cloop open enforces.
QEMU_RULES = [
    (1000, 4, "cloop.block-size"),
    (0, 4, "cloop.block-size-zero"),
    (128 * 1024 * 1024, 4, "cloop.block-size-too-large"),
    (65536, (2**32 - 2) // 8 + 1, "cloop.n-blocks"),
    (65536, 512 * 1024 * 1024 // 8, "cloop.offsets-too-large"),
]


@pytest.mark.parametrize("block_size, n_blocks, code", QEMU_RULES, ids=[c for *_, c in QEMU_RULES])
def test_malformed_header_is_refused_like_qemu(tmp_path, block_size, n_blocks, code):
    image = hand_built(tmp_path / "bad.cloop", block_size, n_blocks, table_entries=5)
    assert code_of(image) == code
    qemu_refuses(image)


MiB = 1024 * 1024
# (offsets, code, what qemu-img says): QEMU's walk of the table stops at the first bad entry.
TABLE_RULES = [
    ((200, 300, 250, 400), "cloop.offsets-order", "offsets not monotonically increasing at index 2"),
    ((200, 200 + 128 * MiB + 1, 0, 0), "cloop.compressed-block-size", "invalid compressed block size at index 1"),
    ((200, 300, 300 + 128 * MiB + 1), "cloop.compressed-block-size", "invalid compressed block size at index 2"),
]


@pytest.mark.parametrize("offsets, code, qemu_says", TABLE_RULES, ids=[c for _, c, _ in TABLE_RULES])
def test_offsets_table_is_walked_like_qemu(tmp_path, offsets, code, qemu_says):
    image = hand_built(tmp_path / "bad.cloop", 65536, 3, offsets=offsets)
    assert code_of(image) == code
    assert qemu_says in qemu_refuses(image)


def test_largest_compressed_block_qemu_takes(tmp_path):
    image = hand_built(tmp_path / "edge.cloop", 65536, 3, offsets=(200, 300, 300 + 128 * MiB, 300 + 128 * MiB))
    assert same_as_qemu(image)["format"] == "cloop"


def test_offsets_table_too_large_to_walk_is_noted(tmp_path):
    """A table above 4 MiB (512k blocks) is checked for position only, and the
    details say so: QEMU would still refuse this one (offset 2 below offset 1)."""
    n_blocks = 4 * MiB // 8
    image = hand_built(tmp_path / "big.cloop", 65536, n_blocks, offsets=(200, 300, 250))
    info = probe(image)
    assert info.details["offsets-not-scanned"] == "table larger than 4194304 bytes"
    assert "offsets not monotonically increasing at index 2" in qemu_refuses(image)


def test_offsets_table_past_end_of_file(tmp_path):
    """QEMU reads zeros past the end of the file; a table outside it is malformed here."""
    image = hand_built(tmp_path / "short.cloop", 65536, 100, table_entries=50)
    assert code_of(image) == "cloop.offsets-beyond-eof"
    assert qemu_img_error(image, "cloop") is None


def test_forced_format_still_needs_the_signature(tmp_path):
    """``qemu-img -f cloop`` skips the magic check (cloop_open never reads the
    preamble); a row here needs its signature, even when the format is forced."""
    image = tmp_path / "unsigned.cloop"
    image.write_bytes(b"X" + cloop_bytes(65536, 4)[1:] + bytes(4096))
    with pytest.raises(ProbeError) as exc:
        probe(image, format="cloop")
    assert exc.value.code == "wrong-format"
    assert qemu_img_error(image, "cloop") is None


def test_truncated_header(tmp_path):
    image = tmp_path / "short.cloop"
    image.write_bytes(PREAMBLE.ljust(130, b"\0"))
    assert code_of(image) == "truncated"


@pytest.fixture(scope="module")
def real_bytes(tmp_path_factory) -> bytes:
    return create_compressed_fs(tmp_path_factory.mktemp("cloop"), os.urandom(300_000), 65536).read_bytes()


@given(
    edits=st.lists(st.tuples(st.integers(0, 200), st.integers(0, 255)), min_size=1, max_size=8),
    cut=st.one_of(st.none(), st.integers(0, 400)),
)
def test_random_header_mutations_never_crash(real_bytes, edits, cut):
    data = bytearray(real_bytes)
    for offset, value in edits:
        data[offset] = value
    data = bytes(data if cut is None else data[:cut])
    probe_or_named_error(data, None, "cloop")


def test_libvirt_calls_cloop_raw(tmp_path):
    image = create_compressed_fs(tmp_path, os.urandom(100_000), 65536)
    assert libvirt_volumes(tmp_path, "cloop")[image.name][0] == "raw"
    assert probe(image).format == "cloop"
