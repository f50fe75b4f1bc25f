"""vhdx: real images from qemu-img, hand-edited headers, region tables and
metadata for every rule (checksums repaired, so only the intended rule breaks)."""

from __future__ import annotations

import struct
import subprocess
import uuid
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from storprobe import Backing, probe
from storprobe.safety import check
from storprobe_plugins.vhdx import crc32c

from builders import (
    BAT,
    FILE_PARAMETERS,
    HEADERS,
    LOG_GUID,
    LOG_SECTOR,
    LOGICAL_SECTOR_SIZE,
    METADATA,
    PAGE_83,
    REGION_TABLE,
    UNKNOWN,
    VIRTUAL_DISK_SIZE,
    KiB,
    MiB,
    Vhdx,
    bad_parent_locator,
    conflicting_headers,
    corrupt_both_headers,
    endless_log_search,
    item_entry_field,
    item_value,
    log_entry,
    log_with_invalid_descriptor,
    region_entry_field,
)
from oracle import (
    assert_same_as_qemu,
    code_of,
    probe_or_named_error,
    qemu_img_create,
    qemu_img_error,
    qemu_refuses,
    run,
)


def pending_log(v: Vhdx, *entries: tuple[int, int]) -> None:
    """Set the log GUID and write a valid entry at each (log offset, sequence number)."""
    v.both_headers(48, "16s", LOG_GUID)
    for at, sequence in entries or ((0, 1),):
        v.put_log(at, log_entry(v, sequence, b"\xab" * LOG_SECTOR))


@pytest.fixture
def image(tmp_path: Path) -> Vhdx:
    return Vhdx(qemu_img_create(tmp_path / "d.vhdx", "vhdx", "64M"))


def with_data(tmp_path: Path, *options: str) -> Path:
    raw = tmp_path / "data.raw"
    raw.write_bytes(bytes(range(256)) * 12288)  # 3 MiB
    path = tmp_path / "data.vhdx"
    args = [a for option in options for a in ("-o", option)]
    run("qemu-img", "convert", "-O", "vhdx", *args, raw, path)
    return path


# --- checksums, real images against qemu-img ---------------------------------------


def test_crc32c_known_answer():
    assert crc32c(b"123456789") == 0xE3069283
    assert crc32c(b"") == 0


@pytest.mark.parametrize(
    "size, options",
    [
        ("64M", ()),
        ("0", ()),  # QEMU's empty disk: a 64 MiB BAT (an unsigned wrap), not scanned
        ("1234567K", ()),
        ("64M", ("subformat=fixed",)),
        ("24M", ("subformat=fixed", "block_size=8M")),
        ("1G", ("block_size=1M",)),
        ("1G", ("block_size=32M",)),
        ("1G", ("block_size=256M",)),
        ("100G", ()),
        ("64M", ("log_size=8M",)),
        ("64M", ("block_state_zero=off",)),
        ("64M", ("block_state_zero=on", "block_size=2M")),
    ],
)
def test_matches_qemu(tmp_path: Path, size: str, options: tuple[str, ...]):
    path = qemu_img_create(tmp_path / "x.vhdx", "vhdx", size, *options)
    assert_same_as_qemu(path)
    details = probe(path).details
    assert details["subformat"] == ("fixed" if "subformat=fixed" in options else "dynamic")
    assert details["creator"].startswith("QEMU")


@pytest.mark.parametrize("options", [(), ("block_size=1M",), ("subformat=fixed",)])
def test_image_with_data_matches_qemu(tmp_path: Path, options: tuple[str, ...]):
    assert_same_as_qemu(with_data(tmp_path, *options))


def test_empty_disk_bat_not_scanned(tmp_path: Path):
    path = qemu_img_create(tmp_path / "z.vhdx", "vhdx", "0")
    assert probe(path).details["bat-not-scanned"] == "larger than 4194304 bytes"


def test_higher_sequence_header_wins(image: Vhdx):
    """Header 2 has the higher sequence number in a fresh image: give header 1
    a bad log version and nothing notices; swap the numbers and it is refused."""
    first, second = (struct.unpack_from("<Q", image.data, h + 8)[0] for h in HEADERS)
    assert second > first
    image.header(0, 64, "<H", 1)  # log_version
    assert probe(image.save()).virtual_size == 64 * MiB
    image.header(0, 8, "<Q", second + 1)
    assert code_of(image.save()) == "vhdx.log-version"
    qemu_refuses(image.path, "vhdx")


def test_one_corrupt_header_is_enough(image: Vhdx):
    image.data[HEADERS[1] + 40] ^= 0xFF  # header 2's CRC no longer matches
    assert_same_as_qemu(image.save())


def test_identical_headers_with_equal_sequence(image: Vhdx):
    """Disk2VHD writes two identical headers; QEMU accepts them, so do we."""
    image.data[HEADERS[1] : HEADERS[1] + 4 * KiB] = image.data[HEADERS[0] : HEADERS[0] + 4 * KiB]
    assert_same_as_qemu(image.save())


def test_4k_logical_sectors(image: Vhdx):
    """The spec allows 4096-byte logical sectors; QEMU 7.2 refuses them
    (later QEMU reads them, with the same virtual size). We follow the spec."""
    image.put(image.item(LOGICAL_SECTOR_SIZE), "<I", 4096)
    info = probe(image.save())
    assert (info.virtual_size, info.details["logical-sector-size"]) == (64 * MiB, 4096)
    qemu_refuses(image.path, "vhdx")


def test_differencing_disk_reports_parent(image: Vhdx):
    """qemu-img cannot make a differencing VHDX (and QEMU refuses to open one):
    set has_parent and add a parent locator. The relative path is the backing
    name; every key/value pair is in the details."""
    pairs = {
        "parent_linkage": "{83ed7a6b-1fc8-4f9a-9b1e-3a8f2b1c4d5e}",
        "absolute_win32_path": "C:\\vms\\parent.vhdx",
        "relative_path": ".\\parent.vhdx",
    }
    image.make_differencing(pairs)
    info = probe(image.save())
    assert info.backing == Backing(".\\parent.vhdx", "vhdx")
    assert info.details["parent-locator"] == pairs
    assert info.cluster_size == 8 * MiB
    qemu_refuses(image.path, "vhdx")


def test_differencing_falls_back_to_absolute_path(image: Vhdx):
    image.make_differencing({"absolute_win32_path": "C:\\vms\\parent.vhdx"}, locator_type=UNKNOWN)
    assert probe(image.save()).backing == Backing("C:\\vms\\parent.vhdx", None)


def test_region_table_copy_difference_is_reported(image: Vhdx):
    image.data[256 * KiB + 100] ^= 1
    assert probe(image.save()).details["region-table-copy"] == "differs"


# --- the log -------------------------------------------------------------------------


def hazards_of(path: Path) -> list[str]:
    return [hazard.check for hazard in check(path).hazards]


def test_log_needing_replay(image: Vhdx):
    """qemu-img writes an empty log (log GUID zero): safe. With the log GUID
    set and a valid entry, QEMU refuses the image read-only and replays the
    log read-write (``qemu-img check -r all``), rewriting the file; storprobe
    describes it, reports the log and flags it. Replayed, it is safe again."""
    assert image.data[HEADERS[0] + 48 : HEADERS[0] + 64] == bytes(16)
    assert "log" not in probe(image.path).details
    assert hazards_of(image.path) == []
    pending_log(image)
    path = image.save()
    assert "contains a log that needs to be replayed" in qemu_refuses(path, "vhdx")
    info = probe(path)
    assert (info.format, info.virtual_size) == ("vhdx", 64 * MiB)
    offset, length = image.log
    assert info.details["log"] == {
        "guid": str(uuid.UUID(bytes_le=LOG_GUID)),
        "offset": offset,
        "length": length,
        "entries": 1,
        "replay-pending": True,
    }
    assert hazards_of(path) == ["vhdx.log-pending"]
    run("qemu-img", "check", "-r", "all", "-f", "vhdx", path)
    assert path.read_bytes()[-LOG_SECTOR:] == b"\xab" * LOG_SECTOR  # the replay wrote the entry's data
    assert_same_as_qemu(path)
    assert "log" not in probe(path).details
    assert hazards_of(path) == []


def test_log_sequences_as_qemu_finds_them(image: Vhdx):
    """A sequence of two entries (7, 8) beside an older single entry (3), and
    an entry that wraps around the end of the log: QEMU refuses each read-only;
    storprobe counts the entries of the sequence QEMU would replay."""
    pending_log(image, (0, 3), (64 * KiB, 7), (72 * KiB, 8))
    assert probe(image.save()).details["log"]["entries"] == 2
    assert "needs to be replayed" in qemu_refuses(image.path, "vhdx")
    fresh = Vhdx(image.path.with_name("wrapped.vhdx"), image.data)
    fresh.put_log(0, bytes(128 * KiB))
    pending_log(fresh, (fresh.log[1] - LOG_SECTOR, 9))  # header in the log's last sector, data in its first
    assert probe(fresh.save()).details["log"]["entries"] == 1
    assert "needs to be replayed" in qemu_refuses(fresh.path, "vhdx")
    assert hazards_of(fresh.path) == ["vhdx.log-pending"]


@pytest.mark.parametrize(
    "change",
    [
        pytest.param(lambda v: v.both_headers(48, "16s", LOG_GUID), id="log-guid-only"),
        pytest.param(lambda v: (pending_log(v), v.both_headers(68, "<I", 0)), id="log-of-length-zero"),
        pytest.param(
            lambda v: (pending_log(v), v.put_log(0, log_entry(v, 1, bytes(LOG_SECTOR), checksum=False))),
            id="wrong-checksum",
        ),
        pytest.param(
            lambda v: (pending_log(v), v.put_log(0, log_entry(v, 1, bytes(LOG_SECTOR), log_guid=UNKNOWN))),
            id="other-log-guid",
        ),
        pytest.param(lambda v: (pending_log(v), v.put_log(0, log_entry(v, 0, bytes(LOG_SECTOR)))), id="sequence-0"),
    ],
)
def test_log_without_entries_to_replay(image: Vhdx, change):
    """A log GUID with no valid entry under it: QEMU opens the image as it is,
    and it is safe; the details still report the log."""
    change(image)
    assert_same_as_qemu(image.save())
    log = probe(image.path).details["log"]
    assert (log["entries"], log["replay-pending"]) == (0, False)
    assert hazards_of(image.path) == []


def test_log_too_large_to_search(tmp_path: Path):
    """A log over storprobe's search limit under a log GUID may need replaying:
    flagged without a search (QEMU, which searches it and finds nothing here, opens it)."""
    image = Vhdx(qemu_img_create(tmp_path / "d.vhdx", "vhdx", "64M", "log_size=16M"))
    image.both_headers(48, "16s", LOG_GUID)
    assert_same_as_qemu(image.save())
    assert probe(image.path).details["log"]["entries"] == "not searched"
    assert hazards_of(image.path) == ["vhdx.log-pending"]


def test_log_qemu_cannot_search(image: Vhdx):
    """An entry with an invalid descriptor makes QEMU's search fail (it cannot
    open the image at all); an entry as long as the log with a wrong checksum
    makes QEMU 7.2's search start again where it began, for ever (qemu-img
    info hangs). storprobe names both errors."""
    original = bytes(image.data)
    log_with_invalid_descriptor(image)
    assert code_of(image.save()) == "vhdx.log-descriptor"
    assert "Invalid argument" in qemu_refuses(image.path, "vhdx")
    image.data = bytearray(original)
    endless_log_search(image)
    assert code_of(image.save()) == "vhdx.log-loop"
    with pytest.raises(subprocess.TimeoutExpired):
        subprocess.run(["qemu-img", "info", "-f", "vhdx", "-U", str(image.path)], capture_output=True, timeout=5)


# --- every validation rule --------------------------------------------------------


def bat_in_header_section(v: Vhdx) -> None:
    """QEMU does not keep the first MiB free of regions; the spec does."""
    region_entry_field(BAT, 16, "<Q", 512 * KiB)(v)
    region_entry_field(BAT, 24, "<I", 64 * KiB)(v)


def parent_locator_without_path(v: Vhdx) -> None:
    v.make_differencing({"parent_linkage": "{83ed7a6b-1fc8-4f9a-9b1e-3a8f2b1c4d5e}"})


@pytest.mark.parametrize(
    "change, code, qemu_too",
    [
        (corrupt_both_headers, "vhdx.no-valid-header", True),
        (lambda v: v.both_headers(0, "4s", b"heaD"), "vhdx.no-valid-header", True),
        (lambda v: v.both_headers(66, "<H", 2), "vhdx.no-valid-header", True),  # version 2
        (conflicting_headers, "vhdx.header-conflict", True),
        (lambda v: v.both_headers(72, "<Q", 1536 * KiB), "vhdx.log-offset", True),
        (lambda v: v.both_headers(72, "<Q", 0), "vhdx.log-offset", True),
        (lambda v: v.both_headers(64, "<H", 1), "vhdx.log-version", True),
        (
            lambda v: (v.both_headers(48, "16s", b"\1" * 16), v.both_headers(68, "<I", 1536 * KiB)),
            "vhdx.log-length",
            True,
        ),
        (lambda v: v.both_headers(72, "<Q", 64 * MiB), "vhdx.log-beyond-file", False),
        (lambda v: v.put(REGION_TABLE + 100, "B", 1), "vhdx.region-checksum", True),
        (lambda v: v.regions(0, "4s", b"reg1"), "vhdx.region-signature", True),
        (lambda v: v.regions(8, "<I", 2048), "vhdx.region-count", True),
        (region_entry_field(METADATA, 16, "<Q", 2 * MiB), "vhdx.region-overlap", True),  # onto the BAT
        (region_entry_field(BAT, 16, "<Q", 1 * MiB), "vhdx.region-overlap", True),  # onto the log
        (bat_in_header_section, "vhdx.region-overlap", False),
        (region_entry_field(METADATA, 16, "<Q", 8 * MiB), "vhdx.region-beyond-file", True),
        (region_entry_field(BAT, 0, "16s", METADATA), "vhdx.region-duplicate", True),
        (
            lambda v: (region_entry_field(BAT, 0, "16s", UNKNOWN)(v), region_entry_field(UNKNOWN, 28, "<I", 1)(v)),
            "vhdx.region-required",
            True,
        ),
        (region_entry_field(BAT, 0, "16s", UNKNOWN), "vhdx.region-missing", True),
        (lambda v: v.put(v.metadata, "8s", b"metadatA"), "vhdx.metadata-signature", True),
        (lambda v: v.put(v.metadata + 10, "<H", 2048), "vhdx.metadata-count", True),
        (
            lambda v: (item_entry_field(PAGE_83, 0, "16s", UNKNOWN)(v), item_entry_field(UNKNOWN, 24, "<I", 4)(v)),
            "vhdx.metadata-required",
            True,
        ),
        (item_entry_field(PAGE_83, 0, "16s", FILE_PARAMETERS), "vhdx.metadata-duplicate", True),
        (item_entry_field(VIRTUAL_DISK_SIZE, 16, "<I", 1 * MiB), "vhdx.metadata-item-range", True),
        (item_entry_field(VIRTUAL_DISK_SIZE, 20, "<I", 4), "vhdx.metadata-item-range", False),
        (item_entry_field(VIRTUAL_DISK_SIZE, 16, "<I", 100), "vhdx.metadata-item-range", True),  # reads garbage
        (
            lambda v: (item_entry_field(PAGE_83, 0, "16s", UNKNOWN)(v), item_entry_field(UNKNOWN, 24, "<I", 0)(v)),
            "vhdx.metadata-missing",
            True,
        ),
        (item_value(FILE_PARAMETERS, "<I", 0), "vhdx.block-size", True),
        (item_value(FILE_PARAMETERS, "<I", 512 * KiB), "vhdx.block-size", True),
        (item_value(FILE_PARAMETERS, "<I", 3 * MiB), "vhdx.block-size", True),
        (item_value(FILE_PARAMETERS, "<I", 512 * MiB), "vhdx.block-size", True),
        (lambda v: v.put(v.item(FILE_PARAMETERS) + 4, "<I", 2), "vhdx.parent-locator-missing", True),
        (item_value(LOGICAL_SECTOR_SIZE, "<I", 1024), "vhdx.logical-sector-size", True),
        (item_value(VIRTUAL_DISK_SIZE, "<Q", 64 * 1024**4 + 512), "vhdx.virtual-size", True),
        (item_value(VIRTUAL_DISK_SIZE, "<Q", 64 * MiB + 100), "vhdx.virtual-size-alignment", False),
        (item_value(VIRTUAL_DISK_SIZE, "<Q", 64 * 1024**4), "vhdx.bat-too-small", True),
        (region_entry_field(BAT, 24, "<I", 32), "vhdx.bat-too-small", True),
        (bad_parent_locator, "vhdx.parent-locator", True),
        (parent_locator_without_path, "vhdx.parent-locator", True),
    ],
)
def test_rule(image: Vhdx, change, code: str, qemu_too: bool):
    change(image)
    assert code_of(image.save()) == code
    assert (qemu_img_error(image.path, "vhdx") is not None) is qemu_too


def test_block_overlapping_metadata(tmp_path: Path):
    image = Vhdx(qemu_img_create(tmp_path / "d.vhdx", "vhdx", "64M", "block_size=1M"))
    image.put(image.region_offset(BAT), "<Q", image.metadata | 6)  # block 0 fully present, in the metadata
    assert code_of(image.save()) == "vhdx.block-overlap"
    qemu_refuses(image.path, "vhdx")


def test_truncated_image(tmp_path: Path):
    path = with_data(tmp_path)
    with path.open("r+b") as f:
        f.truncate(10 * MiB)  # the 3 MiB of data start at 8 MiB
    assert code_of(path) == "vhdx.truncated"
    qemu_refuses(path, "vhdx")


def test_short_file_is_truncated(image: Vhdx):
    image.data = image.data[: 100 * KiB]
    assert code_of(image.save()) == "truncated"


# --- hostile bytes ----------------------------------------------------------------


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> bytes:
    return with_data(tmp_path_factory.mktemp("vhdx"), "block_size=1M").read_bytes()


def areas(v: Vhdx) -> list[tuple[int, int]]:
    """(start, length) of the bytes worth mutating: headers, region table,
    metadata table and items, the start of the BAT."""
    return [
        (HEADERS[0], 80),
        (HEADERS[1], 80),
        (REGION_TABLE, 80),
        (v.metadata, 32 * 6),
        (v.metadata + 64 * KiB, 48),
        (v.region_offset(BAT), 64),
    ]


@settings(suppress_health_check=[*settings.default.suppress_health_check, HealthCheck.function_scoped_fixture])
@given(
    st.lists(st.tuples(st.integers(0, 5), st.integers(0, 191), st.integers(0, 255)), min_size=1, max_size=8),
    st.booleans(),
)
def test_mutated_headers_never_crash(pristine: bytes, mutations, fix_checksums: bool):
    """Random bytes in every structure, checksums repaired or not (repaired,
    the mutation reaches the rules behind them): an answer or a named error."""
    v = Vhdx(Path("<memory>"), pristine)
    where = areas(v)
    for area, offset, value in mutations:
        start, length = where[area]
        v.data[start + offset % length] = value
    if fix_checksums:
        for h in HEADERS:
            v.fix_crc(h, 4 * KiB)
        v.fix_crc(REGION_TABLE, 64 * KiB)
    probe_or_named_error(bytes(v.data))
