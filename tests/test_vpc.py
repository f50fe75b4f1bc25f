"""vpc (VHD): real images from qemu-img, hand-edited footers for every rule."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from storprobe import Backing, probe

from builders import CHECKSUM, FOOTER, checksum, edit, on_both_footers
from oracle import (
    assert_same_as_qemu,
    code_of,
    ours,
    probe_or_named_error,
    qemu_img_create,
    qemu_info,
    qemu_refuses,
    run,
)


@pytest.fixture
def dynamic(tmp_path: Path) -> Path:
    return qemu_img_create(tmp_path / "dyn.vhd", "vpc", "64M")


# --- real images against qemu-img -------------------------------------------------


@pytest.mark.parametrize("force_size", ["off", "on"])
@pytest.mark.parametrize("size", ["1M", "10M", "64M", "127M", "1000M", "3G", "130G", "1234567K"])
def test_dynamic_matches_qemu(tmp_path: Path, size: str, force_size: str):
    """Without force_size QEMU rounds the size up to a CHS geometry (creator
    'qemu', size from CHS); with it the exact size is kept (creator 'qem2',
    current_size). 130G exceeds the CHS maximum, so current_size wins anyway."""
    path = qemu_img_create(tmp_path / "d.vhd", "vpc", size, f"force_size={force_size}")
    mine = assert_same_as_qemu(path)
    assert mine["cluster-size"] == 2 * 1024 * 1024
    assert probe(path).details["disk-type"] == "dynamic"


@pytest.mark.parametrize("force_size", ["off", "on"])
@pytest.mark.parametrize("size", ["1M", "10M", "33M", "1234567K"])
def test_fixed_matches_qemu_with_format_vpc(tmp_path: Path, size: str, force_size: str):
    """A fixed VHD's only signature is its trailer: qemu-img probes it as raw
    (with the file size), while the VHD spec makes it a vpc image. We follow
    the spec, so the oracle is ``qemu-img info -f vpc``; probing and naming the
    format give the same answer."""
    path = qemu_img_create(tmp_path / "f.vhd", "vpc", size, "subformat=fixed", f"force_size={force_size}")
    assert_same_as_qemu(path, "vpc")
    assert ours(path) == ours(path, "vpc")
    assert qemu_info(path)["format"] == "raw"
    info = probe(path)
    assert (info.format, info.cluster_size, info.details["disk-type"]) == ("vpc", None, "fixed")


def test_odd_size_rounds_up_to_chs(tmp_path: Path):
    path = qemu_img_create(tmp_path / "odd.vhd", "vpc", "1000001K")
    info = probe(path)
    assert info.virtual_size > 1000001 * 1024
    assert info.details["size-from"] == "chs"
    assert_same_as_qemu(path)


def test_image_with_data_matches_qemu(tmp_path: Path):
    raw = tmp_path / "data.raw"
    raw.write_bytes(bytes(range(256)) * 12288)  # 3 MiB: two allocated 2 MiB blocks
    run("qemu-img", "convert", "-O", "vpc", raw, tmp_path / "data.vhd")
    assert_same_as_qemu(tmp_path / "data.vhd")


@pytest.mark.parametrize(
    "creator, trusted",
    [
        (b"win ", True),
        (b"qem2", True),
        (b"d2v ", True),
        (b"CTXS", True),
        (b"tap\0", True),
        (b"vpc ", False),
        (b"qemu", False),
        (b"tap ", False),
        (b"wa\0\0", False),  # Azure: QEMU 7.2 uses CHS; QEMU 10 trusts current_size
    ],
)
def test_creator_app_decides_size_field(tmp_path: Path, creator: bytes, trusted: bool):
    """current_size (here 66 MiB, all the 33-entry table holds) differs from
    the CHS size; QEMU 7.2 trusts current_size only for the creators it lists."""
    path = qemu_img_create(tmp_path / "c.vhd", "vpc", "64M")
    edit(path, *on_both_footers(28, "4s", creator), *on_both_footers(48, ">Q", 66 * 1024 * 1024))
    mine = assert_same_as_qemu(path)
    assert (mine["virtual-size"] == 66 * 1024 * 1024) is trusted


def test_maximum_geometry_uses_current_size(tmp_path: Path):
    path = qemu_img_create(tmp_path / "m.vhd", "vpc", "200G", "force_size=on")
    edit(
        path,
        *on_both_footers(28, "4s", b"qemu"),
        *on_both_footers(56, ">H", 65535),
        *on_both_footers(58, "B", 16),
        *on_both_footers(59, "B", 255),
    )
    assert assert_same_as_qemu(path)["virtual-size"] == 200 * 1024**3


def test_differencing_disk_reports_parent(tmp_path: Path):
    """qemu-img cannot make a differencing VHD: turn a dynamic one into one
    (disk type 4, Parent Unicode Name in UTF-16BE). QEMU opens it as a plain
    dynamic disk and shows no backing file; we report the parent (a VHD, as
    the spec requires). Everything else matches qemu-img."""
    path = qemu_img_create(tmp_path / "child.vhd", "vpc", "64M")
    name = "parent disk.vhd".encode("utf-16-be")
    edit(path, *on_both_footers(60, ">I", 4), (512 + 64, f"{len(name)}s", name), dynamic_header=True)
    info = probe(path)
    assert info.backing == Backing("parent disk.vhd", "vpc")
    assert info.details["disk-type"] == "differencing"
    assert "dynamic-header-checksum" not in info.details
    assert_same_as_qemu(path, ignore=("backing-filename", "full-backing-filename", "backing-filename-format"))
    assert "backing-filename" not in qemu_info(path)


def test_dynamic_header_checksum_is_reported_not_refused(tmp_path: Path, dynamic: Path):
    """QEMU ignores the dynamic header's checksum; so do we, but we say so."""
    edit(dynamic, (512 + 36, ">I", 12345))
    assert probe(dynamic).details["dynamic-header-checksum"] == "mismatch"
    assert_same_as_qemu(dynamic)


def test_huge_table_is_not_scanned(tmp_path: Path):
    """A 2040 GiB disk has a 4 MiB table: scanned. Grow the table past the
    scan limit and the table is checked only for fitting in the file."""
    path = qemu_img_create(tmp_path / "big.vhd", "vpc", "2040G", "force_size=on")
    assert "table-not-scanned" not in probe(path).details
    entries = 0x1FFFFF
    with path.open("r+b") as f:
        f.truncate(1536 + entries * 4 + 512)
    edit(path, (512 + 28, ">I", entries))
    assert probe(path).details["table-not-scanned"] == "larger than 4194304 bytes"


# --- every validation rule --------------------------------------------------------


def test_bad_footer_checksum(dynamic: Path):
    data = bytearray(dynamic.read_bytes())
    data[64:68] = b"\0\0\0\1"
    dynamic.write_bytes(bytes(data))
    assert code_of(dynamic) == "vpc.checksum"
    qemu_refuses(dynamic, "vpc")  # QEMU 7.2 refuses it too ("Incorrect header checksum")


@pytest.mark.parametrize("disk_type", [0, 1, 5, 0xFFFFFFFF])
def test_bad_disk_type(dynamic: Path, disk_type: int):
    edit(dynamic, *on_both_footers(60, ">I", disk_type))
    assert code_of(dynamic) == "vpc.disk-type"


def test_fixed_footer_at_start(dynamic: Path):
    """QEMU reads a footer at 0 as dynamic and fails on its data offset; a
    fixed disk never has a copy there."""
    edit(dynamic, (60, ">I", 2), (8 + 8, ">Q", 0xFFFFFFFFFFFFFFFF))
    assert code_of(dynamic) == "vpc.fixed-copy"
    qemu_refuses(dynamic, "vpc")


def test_dynamic_disk_without_its_head_copy(dynamic: Path):
    """A dynamic disk whose copy at offset 0 is damaged: only its trailer
    matches. QEMU then takes the file for a fixed disk and, finding a dynamic
    trailer, refuses it; so do we, by name (found by a differential campaign)."""
    edit(dynamic, (0, ">8s", b"\x1b\x83nectix"))
    assert code_of(dynamic) == "vpc.missing-copy"
    assert "invalid VPC image" in qemu_refuses(dynamic, "vpc")


def test_too_large(tmp_path: Path):
    path = qemu_img_create(tmp_path / "big.vhd", "vpc", "64M", "force_size=on")
    edit(path, *on_both_footers(48, ">Q", (0xFF000000 + 1) * 512))
    assert code_of(path) == "vpc.too-large"
    qemu_refuses(path, "vpc")


def test_data_offset_beyond_file(dynamic: Path):
    edit(dynamic, *on_both_footers(16, ">Q", 1 << 40))
    assert code_of(dynamic) == "vpc.data-offset"
    qemu_refuses(dynamic, "vpc")


def test_dynamic_header_magic(dynamic: Path):
    edit(dynamic, (512, "8s", b"cxspars3"))
    assert code_of(dynamic) == "vpc.dynamic-magic"
    qemu_refuses(dynamic, "vpc")


@pytest.mark.parametrize("block_size", [0, 256, 3 * 1024 * 1024])
def test_block_size(dynamic: Path, block_size: int):
    edit(dynamic, (512 + 32, ">I", block_size))
    assert code_of(dynamic) == "vpc.block-size"
    qemu_refuses(dynamic, "vpc")


def test_table_entries_cap(dynamic: Path):
    edit(dynamic, (512 + 28, ">I", 0x20000000))
    assert code_of(dynamic) == "vpc.table-entries"
    qemu_refuses(dynamic, "vpc")


def test_table_too_small(dynamic: Path):
    edit(dynamic, (512 + 28, ">I", 10))  # 10 x 2 MiB < 64 MiB
    assert code_of(dynamic) == "vpc.table-too-small"
    qemu_refuses(dynamic, "vpc")


def test_table_beyond_file(dynamic: Path):
    edit(dynamic, (512 + 16, ">Q", dynamic.stat().st_size))
    assert code_of(dynamic) == "vpc.table-offset"
    qemu_refuses(dynamic, "vpc")


def test_truncated_image(tmp_path: Path):
    raw = tmp_path / "data.raw"
    raw.write_bytes(b"\x5a" * 3 * 1024 * 1024)
    path = tmp_path / "data.vhd"
    run("qemu-img", "convert", "-O", "vpc", raw, path)
    with path.open("r+b") as f:
        f.truncate(path.stat().st_size - 600 * 1024)
    assert code_of(path) == "vpc.truncated"
    qemu_refuses(path, "vpc")


def test_differencing_without_parent_name(dynamic: Path):
    edit(dynamic, *on_both_footers(60, ">I", 4))
    assert code_of(dynamic) == "vpc.parent-name"


def test_short_file_is_truncated(dynamic: Path):
    dynamic.write_bytes(dynamic.read_bytes()[:300])
    assert code_of(dynamic) == "truncated"


def test_fixed_without_footer_is_raw(tmp_path: Path):
    path = qemu_img_create(tmp_path / "f.vhd", "vpc", "1M", "subformat=fixed")
    path.write_bytes(path.read_bytes()[:-512])
    assert probe(path).format == "raw"


# --- hostile bytes ----------------------------------------------------------------


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> bytes:
    raw = tmp_path_factory.mktemp("vpc") / "data.raw"
    raw.write_bytes(b"\xa5" * 3 * 1024 * 1024)
    path = raw.with_suffix(".vhd")
    run("qemu-img", "convert", "-O", "vpc", raw, path)
    return path.read_bytes()


@settings(suppress_health_check=[*settings.default.suppress_health_check, HealthCheck.function_scoped_fixture])
@given(
    st.lists(st.tuples(st.integers(0, 2047), st.integers(0, 255)), min_size=1, max_size=8),
    st.booleans(),
    st.booleans(),
)
def test_mutated_headers_never_crash(pristine: bytes, mutations, at_end: bool, fix_checksums: bool):
    """Random bytes in the footer copy, the dynamic header and the table (or
    the trailer), checksums repaired or not: an answer or a named error."""
    data = bytearray(pristine)
    base = len(data) - 2048 if at_end else 0
    for offset, value in mutations:
        data[base + offset] = value
    if fix_checksums:
        for start in (0, len(data) - FOOTER):
            struct.pack_into(">I", data, start + CHECKSUM, checksum(data[start : start + FOOTER]))
    probe_or_named_error(bytes(data))
