"""vdi: real images from qemu-img, hand-edited headers for every rule."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from storprobe import probe

from oracle import (
    assert_same_as_qemu,
    code_of,
    probe_or_named_error,
    qemu_img_create,
    qemu_img_error,
    qemu_refuses,
    run,
)

MAX_BLOCKS = 0x1FFFFF80  # QEMU: (INT_MAX + 1 - 512) / 4


def edit(path: Path, *changes: tuple[int, str, object]) -> Path:
    """Write ``(offset, struct format, value)`` changes into the header."""
    data = bytearray(path.read_bytes())
    for offset, fmt, value in changes:
        struct.pack_into(fmt, data, offset, value)
    path.write_bytes(bytes(data))
    return path




@pytest.fixture
def vdi(tmp_path: Path) -> Path:
    return qemu_img_create(tmp_path / "d.vdi", "vdi", "64M")


# --- real images against qemu-img -------------------------------------------------


@pytest.mark.parametrize("static", ["off", "on"])
@pytest.mark.parametrize("size", ["1M", "3M", "64M", "1000000", "1234567K"])
def test_matches_qemu(tmp_path: Path, size: str, static: str):
    path = qemu_img_create(tmp_path / "x.vdi", "vdi", size, f"static={static}")
    mine = assert_same_as_qemu(path)
    assert mine["cluster-size"] == 1024 * 1024
    assert probe(path).details["image-type"] == ("static" if static == "on" else "dynamic")


def test_large_dynamic_matches_qemu(tmp_path: Path):
    assert_same_as_qemu(qemu_img_create(tmp_path / "big.vdi", "vdi", "3T"))


def test_image_with_data_matches_qemu(tmp_path: Path):
    raw = tmp_path / "data.raw"
    raw.write_bytes(bytes(range(256)) * 12288)  # 3 MiB
    run("qemu-img", "convert", "-O", "vdi", raw, tmp_path / "data.vdi")
    assert_same_as_qemu(tmp_path / "data.vdi")


@pytest.mark.parametrize("disk_size", [999_999, 1_000_001, 1_048_575])
def test_odd_disk_size_rounds_up_like_qemu(vdi: Path, disk_size: int):
    """VBoxManage convertfromraw can write sizes that are not whole sectors;
    QEMU rounds them up, and so do we."""
    edit(vdi, (0x170, "<Q", disk_size))
    assert assert_same_as_qemu(vdi)["virtual-size"] == -(-disk_size // 512) * 512


# --- every validation rule --------------------------------------------------------


@pytest.mark.parametrize(
    "changes, code, qemu_too",
    [
        ([(0x170, "<Q", MAX_BLOCKS * 1024 * 1024 + 1)], "vdi.disk-size", True),
        ([(0x154, "<I", 0x201)], "vdi.bmap-alignment", True),
        ([(0x158, "<I", 0x401)], "vdi.data-alignment", True),
        ([(0x168, "<I", 4096)], "vdi.sector-size", True),
        ([(0x178, "<I", 2 * 1024 * 1024)], "vdi.block-size", True),
        ([(0x180, "<I", 63)], "vdi.blocks-in-image", True),
        ([(0x1A8, "16s", b"\1" * 16)], "vdi.link-uuid", True),
        ([(0x1B8, "16s", b"\1" * 16)], "vdi.parent-uuid", True),
        ([(0x180, "<I", MAX_BLOCKS + 1)], "vdi.blocks-max", True),
        # Rules QEMU does not have: it opens these and reads garbage or zeros.
        ([(0x4C, "<I", 0)], "vdi.image-type", False),
        ([(0x4C, "<I", 5)], "vdi.image-type", False),
        ([(0x184, "<I", 65)], "vdi.blocks-allocated", False),
        ([(0x154, "<I", 0x10000)], "vdi.bmap-beyond-file", False),
        ([(0x158, "<I", 0x10000)], "vdi.data-beyond-file", False),
        ([(0x184, "<I", 1)], "vdi.data-beyond-file", False),
    ],
)
def test_rule(vdi: Path, changes, code: str, qemu_too: bool):
    edit(vdi, *changes)
    assert code_of(vdi) == code
    assert (qemu_img_error(vdi, "vdi") is not None) is qemu_too


def test_unknown_version(vdi: Path):
    edit(vdi, (0x44, "<I", 0x00010002))
    assert code_of(vdi) == "unsupported-version"
    qemu_refuses(vdi, "vdi")


def test_truncated_image(tmp_path: Path):
    """QEMU opens a truncated VDI and reads zeros for the missing blocks; we
    refuse it, since its header promises data the file no longer has."""
    raw = tmp_path / "data.raw"
    raw.write_bytes(b"\x5a" * 3 * 1024 * 1024)
    path = tmp_path / "data.vdi"
    run("qemu-img", "convert", "-O", "vdi", raw, path)
    with path.open("r+b") as f:
        f.truncate(path.stat().st_size - 600 * 1024)
    assert code_of(path) == "vdi.data-beyond-file"
    assert qemu_img_error(path, "vdi") is None


def test_short_header_is_truncated(vdi: Path):
    vdi.write_bytes(vdi.read_bytes()[:0x100])
    assert code_of(vdi) == "truncated"


# --- hostile bytes ----------------------------------------------------------------


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> bytes:
    raw = tmp_path_factory.mktemp("vdi") / "data.raw"
    raw.write_bytes(b"\xa5" * 2 * 1024 * 1024)
    path = raw.with_suffix(".vdi")
    run("qemu-img", "convert", "-O", "vdi", raw, path)
    return path.read_bytes()


@settings(suppress_health_check=[*settings.default.suppress_health_check, HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.integers(0x40, 0x1FF), st.integers(0, 255)), min_size=1, max_size=8))
def test_mutated_headers_never_crash(pristine: bytes, mutations):
    data = bytearray(pristine)
    for offset, value in mutations:
        data[offset] = value
    probe_or_named_error(bytes(data))
