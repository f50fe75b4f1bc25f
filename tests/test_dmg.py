"""dmg: hand-built UDIF images (qemu-img cannot write dmg, and Debian has no
tool that makes one), checked by QEMU's own dmg driver reading them back."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from storprobe import QEMU_MAX_LENGTH, probe

from builders import RAW_CHUNK, build_dmg
from oracle import assert_same_as_qemu, code_of, probe_or_named_error, qemu_img_error, qemu_refuses, run


def disk(sectors: int) -> bytes:
    return bytes(range(256)) * 2 * sectors


# --- hand-built images against qemu-img --------------------------------------------


@pytest.mark.parametrize("block_map", ["xml", "rsrc"])
@pytest.mark.parametrize("sectors", [1, 7, 2048])
def test_matches_qemu(tmp_path: Path, block_map: str, sectors: int):
    """qemu-img finds dmg by the .dmg name (and with -f dmg); we by the
    trailer. Neither prints a dirty-flag or a cluster-size for dmg."""
    path = tmp_path / "disk.dmg"
    path.write_bytes(build_dmg(disk(sectors), block_map))
    mine = assert_same_as_qemu(path)
    assert mine["virtual-size"] == sectors * 512
    assert assert_same_as_qemu(path, "dmg") == mine
    assert "dirty-flag" not in mine
    info = probe(path)
    assert info.details["block-map"] == ("xml-plist" if block_map == "xml" else "resource-fork")
    assert info.version == 4


def test_largest_size_qemu_opens(tmp_path: Path):
    """The trailer's sector count is the size; QEMU's block layer opens a disk
    up to its length limit and no further (the row one past it is in test_rule)."""
    path = tmp_path / "huge.dmg"
    path.write_bytes(build_dmg(disk(8), sector_count=QEMU_MAX_LENGTH // 512))
    assert assert_same_as_qemu(path)["virtual-size"] == QEMU_MAX_LENGTH


@pytest.mark.parametrize("block_map", ["xml", "rsrc"])
def test_qemu_reads_the_hand_built_image(tmp_path: Path, block_map: str):
    """Proof the builder makes a real dmg: QEMU converts it back to the data."""
    path = tmp_path / "disk.dmg"
    path.write_bytes(build_dmg(disk(64), block_map))
    run("qemu-img", "convert", "-f", "dmg", "-O", "raw", path, tmp_path / "out.raw")
    assert (tmp_path / "out.raw").read_bytes() == disk(64)


def test_dmg2img_reads_the_hand_built_image(tmp_path: Path):
    path = tmp_path / "disk.dmg"
    path.write_bytes(build_dmg(disk(64)))
    run("dmg2img", "-s", "-i", path, "-o", tmp_path / "out.img")
    assert (tmp_path / "out.img").read_bytes() == disk(64)


def test_found_without_the_dmg_name(tmp_path: Path):
    path = tmp_path / "disk.img"
    path.write_bytes(build_dmg(disk(8)))
    assert probe(path).format == "dmg"


# --- every validation rule --------------------------------------------------------

DATA = disk(8)
KOLY_AT = len(build_dmg(DATA)) - 512


@pytest.mark.parametrize(
    "trailer, code, qemu_too",
    [
        ({"header_size": 0x200 + 4}, "dmg.header-size", False),
        ({"data_fork_offset": KOLY_AT + 1}, "dmg.data-fork", True),
        ({"data_fork_length": KOLY_AT + 1}, "dmg.data-fork", False),  # QEMU checks the start only
        ({"rsrc_fork_offset": KOLY_AT}, "dmg.rsrc-fork", True),
        ({"rsrc_fork_length": KOLY_AT + 1}, "dmg.rsrc-fork", True),
        ({"xml_offset": KOLY_AT}, "dmg.xml-plist", True),
        ({"xml_length": KOLY_AT + 1}, "dmg.xml-plist", True),
        ({"sector_count": 1 << 63}, "dmg.size-too-large", True),
        ({"sector_count": QEMU_MAX_LENGTH // 512 + 1}, "dmg.size-too-large", True),  # QEMU: "File too large"
        ({"xml_length": 0}, "dmg.no-block-map", True),
        ({"version": 3}, "unsupported-version", False),  # QEMU ignores the version
    ],
)
def test_rule(tmp_path: Path, trailer: dict[str, int], code: str, qemu_too: bool):
    path = tmp_path / "bad.dmg"
    path.write_bytes(build_dmg(DATA, **trailer))
    assert code_of(path) == code
    assert (qemu_img_error(path, "dmg") is not None) is qemu_too


ZERO_CHUNK, ZLIB_CHUNK, ADC_CHUNK = 0, 0x80000005, 0x80000004
# (block map, chunk or an edit of the image's bytes, code): QEMU's walk of the block map on open.
FORK_AT = len(DATA)  # the block map follows the data fork
BLOCK_MAP_RULES = [
    ("xml", (RAW_CHUNK, 131073, 512), "dmg.chunk-sectors"),
    ("xml", (ZLIB_CHUNK, 8, 64 * 1024 * 1024 + 1), "dmg.chunk-length"),
    ("rsrc", (RAW_CHUNK, 8, 64 * 1024 * 1024 + 1), "dmg.chunk-length"),
    ("xml", lambda b: b.__setitem__(slice(b.index(b"</data>"), b.index(b"</data>") + 1), b"\0"), "dmg.xml-data"),
    ("rsrc", lambda b: struct.pack_into(">I", b, FORK_AT, 1 << 20), "dmg.rsrc-data"),
    ("rsrc", lambda b: struct.pack_into(">I", b, FORK_AT + 8, 0), "dmg.rsrc-data"),
    ("rsrc", lambda b: struct.pack_into(">I", b, FORK_AT + 256, 0), "dmg.resource-size"),
    ("rsrc", lambda b: struct.pack_into(">I", b, FORK_AT + 256, 1 << 20), "dmg.resource-size"),
]


@pytest.mark.parametrize("block_map, change, code", BLOCK_MAP_RULES, ids=[f"{m}-{c}" for m, _, c in BLOCK_MAP_RULES])
def test_block_map_rule(tmp_path: Path, block_map, change, code):
    data = bytearray(build_dmg(DATA, block_map, chunk=change if isinstance(change, tuple) else None))
    if callable(change):
        change(data)
    path = tmp_path / "bad.dmg"
    path.write_bytes(bytes(data))
    assert code_of(path) == code
    qemu_refuses(path, "dmg")


@pytest.mark.parametrize(
    "chunk", [(ZERO_CHUNK, 1 << 40, 0), (ADC_CHUNK, 1 << 40, 1 << 40), (RAW_CHUNK, 131072, 1 << 26)]
)
def test_chunks_qemu_takes(tmp_path: Path, chunk):
    """A zero chunk may span any number of sectors; a chunk type QEMU cannot
    read (ADC) is skipped whatever it says; the limits themselves are allowed."""
    path = tmp_path / "edge.dmg"
    path.write_bytes(build_dmg(DATA, chunk=chunk))
    assert assert_same_as_qemu(path, "dmg")["format"] == "dmg"
    assert probe(path).details["chunks"] == (0 if chunk[0] == ADC_CHUNK else 1)


def test_xml_plist_too_large(tmp_path: Path):
    """QEMU reads at most 16 MiB of property list; a sparse file makes room."""
    big = 16 * 1024 * 1024 + 1
    path = tmp_path / "bad.dmg"
    with path.open("wb") as f:
        f.truncate(big)
        f.seek(big)
        f.write(build_dmg(b"", xml_offset=0, xml_length=big, data_fork_length=0)[-512:])
    assert code_of(path) == "dmg.xml-size"
    qemu_refuses(path, "dmg")


def test_short_file_is_not_dmg(tmp_path: Path):
    path = tmp_path / "short.dmg"
    path.write_bytes(build_dmg(DATA)[-300:])
    assert probe(path).format == "raw"


# --- hostile bytes ----------------------------------------------------------------

PRISTINE = build_dmg(disk(16))


@given(st.lists(st.tuples(st.integers(0, 511), st.integers(0, 255)), min_size=1, max_size=8))
def test_mutated_trailers_never_crash(mutations):
    data = bytearray(PRISTINE)
    for offset, value in mutations:
        data[len(data) - 512 + offset] = value
    probe_or_named_error(bytes(data))


BLOCK_MAPS = {kind: build_dmg(disk(16), kind) for kind in ("xml", "rsrc")}


@given(
    kind=st.sampled_from(sorted(BLOCK_MAPS)),
    mutations=st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), min_size=1, max_size=8),
)
def test_mutated_block_maps_never_crash(kind, mutations):
    """Bytes of the block map (the property list's text and base64, or the
    resource fork's lengths and mish tables) overwritten: a result or a named error."""
    data = bytearray(BLOCK_MAPS[kind])
    start, end = len(disk(16)), len(data) - 512  # the block map lies between the data fork and the trailer
    for offset, value in mutations:
        data[start + offset % (end - start)] = value
    probe_or_named_error(bytes(data))
