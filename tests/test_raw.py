"""raw: the fallback, against qemu-img; partition tables against sfdisk, FAT
boot sectors against mkfs.fat and blkid. Raw has no failure rules (any bytes
are a raw volume), so malformed tables and boot sectors must simply not be
reported."""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from storprobe import probe

from oracle import assert_same_as_qemu, run


def sized(path: Path, size: int) -> Path:
    with open(path, "wb") as f:
        f.truncate(size)
    return path


def details(path_or_bytes) -> dict:
    info = probe(path_or_bytes)
    assert info.format == "raw"
    return dict(info.details)


# ---- against qemu-img -------------------------------------------------------


def test_empty_file(tmp_path):
    path = sized(tmp_path / "empty.img", 0)
    mine = assert_same_as_qemu(path)
    assert (mine["format"], mine["virtual-size"]) == ("raw", 0)
    assert details(path) == {}


def test_sparse_file(tmp_path):
    path = sized(tmp_path / "sparse.img", 1 << 30)
    assert assert_same_as_qemu(path)["virtual-size"] == 1 << 30


def test_size_in_whole_sectors(tmp_path):
    """A file that is not a whole number of 512-byte sectors: qemu-img rounds its size up."""
    path = tmp_path / "data.img"
    path.write_bytes(bytes(range(256)) * 4099)
    assert assert_same_as_qemu(path)["virtual-size"] == 512 * 2050


# ---- partition tables against sfdisk -----------------------------------------


def sfdisk(path: Path, script: str) -> dict:
    run("sfdisk", "-q", path, input=script.encode())
    return json.loads(run("sfdisk", "--json", path).stdout)["partitiontable"]


@pytest.mark.parametrize(
    "label, script",
    [
        ("dos", "label: dos\n,10M\n,10M,L,*\n,5M,7\n"),
        ("dos", "label: dos\n,1M\n"),
        ("gpt", "label: gpt\n,10M\n,10M\n,\n"),
        ("gpt", "label: gpt\n"),  # a table with no partitions
    ],
)
def test_partition_table_matches_sfdisk(tmp_path, label, script):
    path = sized(tmp_path / "disk.img", 64 << 20)
    table = sfdisk(path, script)
    assert table["label"] == label
    assert assert_same_as_qemu(path)["format"] == "raw"
    assert details(path) == {
        "partition-table": {"dos": "mbr", "gpt": "gpt"}[label],
        "partitions": len(table.get("partitions", [])),
    }


def test_logical_partitions_are_not_counted(tmp_path):
    """``partitions`` counts the MBR's four primary slots (an extended partition
    is one); logical partitions live in EBRs outside the head and are not read."""
    path = sized(tmp_path / "ext.img", 64 << 20)
    table = sfdisk(path, "label: dos\n1: size=10M\n2: size=40M, type=E\n5: size=5M\n6: size=5M\n")
    numbers = [int(p["node"][len(str(path)) :].lstrip("p")) for p in table["partitions"]]
    assert numbers == [1, 2, 5, 6]
    assert details(path)["partitions"] == 2


def mbr(*entries: tuple[int, int, int, int]) -> bytearray:
    """A first sector with MBR entries (status, type, first LBA, sectors) and the 0x55AA signature."""
    sector = bytearray(512)
    for i, (status, kind, first, count) in enumerate(entries):
        struct.pack_into("<B3sB3sII", sector, 446 + 16 * i, status, b"", kind, b"", first, count)
    sector[510:512] = b"\x55\xaa"
    return sector


def gpt(sector_size: int, used: int, *, corrupt_array: bool = False) -> bytes:
    """A GPT with ``used`` partitions of 128 entries at LBA 2 (sizes are ``sector_size`` bytes)."""
    array = bytearray(128 * 128)
    for i in range(used):
        array[i * 128 : i * 128 + 16] = b"\x0f\xc6\x3d\xaf\x84\x83\x47\x72\x8e\x79\x3d\x69\xd8\x47\x7d\xe4"
    # signature, revision, header size, header CRC (set below), reserved, this LBA, backup LBA,
    # first and last usable LBA, disk GUID, entries LBA, entry count, entry size, entries CRC
    fields = (b"EFI PART", 0x10000, 92, 0, 0, 1, 99999, 34, 99966, bytes(16), 2, 128, 128, zlib.crc32(array))
    header = bytearray(struct.pack("<8sIIIIQQQQ16sQIII", *fields))
    struct.pack_into("<I", header, 16, zlib.crc32(header))
    if corrupt_array:
        array[5000] ^= 1
    data = bytearray(sector_size * 2 + len(array))
    data[:512] = mbr((0, 0xEE, 1, 0xFFFFFFFF))
    data[sector_size : sector_size + 92] = header
    data[2 * sector_size :] = array
    return bytes(data) + bytes(1 << 16)


def test_gpt_with_4k_sectors():
    """sfdisk here cannot make 4 KiB-sector tables; the layout is the 512-byte one scaled."""
    assert details(gpt(4096, 3)) == {"partition-table": "gpt", "partitions": 3}
    assert details(gpt(512, 2)) == {"partition-table": "gpt", "partitions": 2}


def test_protective_mbr_alone_means_gpt():
    assert details(bytes(mbr((0, 0xEE, 1, 1000))) + bytes(4096)) == {"partition-table": "gpt"}


def test_gpt_with_bad_crc_has_no_count():
    assert details(gpt(512, 2, corrupt_array=True)) == {"partition-table": "gpt"}


def test_not_an_mbr():
    """A bad status byte (libblkid and the kernel require 0x00 or 0x80) or no signature."""
    assert details(bytes(mbr((0x81, 0x83, 2048, 100))) + bytes(512)) == {}
    unsigned = mbr((0x80, 0x83, 2048, 100))
    unsigned[510] = 0
    assert details(bytes(unsigned) + bytes(512)) == {}


# ---- FAT boot sectors against mkfs.fat and blkid -------------------------------


@pytest.mark.parametrize(
    "bits, size", [(12, 4 << 20), (12, 40 << 20), (16, 40 << 20), (32, 40 << 20), (32, 300 << 20)]
)
def test_fat_matches_mkfs_and_blkid(tmp_path, bits, size):
    path = sized(tmp_path / "fat.img", size)
    run("mkfs.fat", "-F", str(bits), path)
    assert details(path) == {"boot-sector": "fat", "fat-type": f"fat{bits}"}
    tags = run("blkid", "-p", "-o", "export", path).stdout.decode()
    assert f"VERSION=FAT{bits}\n" in tags
    assert assert_same_as_qemu(path)["format"] == "raw"


@pytest.fixture(scope="module")
def fat16(tmp_path_factory) -> bytes:
    path = sized(tmp_path_factory.mktemp("raw") / "fat16.img", 40 << 20)
    run("mkfs.fat", "-F", "16", path)
    with open(path, "rb") as f:
        return f.read(64 << 10)


@pytest.mark.parametrize(
    "offset, value",
    [
        (0, b"\x00"),  # no jump instruction
        (11, struct.pack("<H", 500)),  # bytes per sector
        (13, b"\x03"),  # sectors per cluster not a power of two
        (14, b"\0\0"),  # no reserved sectors
        (16, b"\0"),  # no FAT
        (21, b"\x12"),  # media descriptor
        (22, b"\0\0"),  # no FAT16 FAT size: read as FAT32, whose size field holds other data
        (19, b"\x01\x00"),  # total sectors smaller than the metadata
        (510, b"\0"),  # no boot signature
    ],
)
def test_not_a_fat_boot_sector(fat16, offset, value):
    data = bytearray(fat16)
    data[offset : offset + len(value)] = value
    assert "boot-sector" not in details(bytes(data))


PARTITIONED = bytes(mbr((0x80, 0x83, 2048, 100), (0, 0xEE, 1, 10))) + gpt(512, 4)[512:]


@given(
    base=st.sampled_from(["fat", "gpt"]),
    edits=st.lists(st.tuples(st.integers(0, 17 * 1024), st.integers(0, 255)), min_size=1, max_size=12),
)
def test_mutations_stay_raw(fat16, base, edits):
    """Raw never fails: any mutation of a boot sector or partition table is still raw."""
    data = bytearray(fat16 if base == "fat" else PARTITIONED)
    for at, value in edits:
        data[at % len(data)] = value
    details(bytes(data))
