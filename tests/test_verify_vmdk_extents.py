"""storprobe verify of a VMDK made of several files, against qemu-img check.

qemu-img check (QEMU 7.2's vmdk_co_check) opens every extent file a
descriptor names, then walks the guest disk a grain of the extent at hand at
a time (a flat extent in one step), and fails at the first grain whose entry
it cannot look up or that points at or past the end of its file. Images are
made by ``qemu-img create -f vmdk -o subformat=twoGbMaxExtentSparse`` (and
Flat, monolithicFlat), written by qemu-io, then broken with struct patches of
their grain tables, truncated or missing extent files. Our report (parsed
JSON, and the command's text) and exit status must be qemu-img check's.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
from pathlib import Path

import pytest

from storprobe import ProbeError
from storprobe.datapath import LOCAL, REFUSE, backing_inside, open_image
from storprobe.verify import EXIT_FAILED, NoCheck, to_json, verify

from builders import cowd, descriptor
from oracle import qemu_img_create, qemu_io, require, run

SECTOR = 512
MIB = 1 << 20
GIB = 1 << 30


def qemu_check(path: Path) -> tuple[dict | None, int, str]:
    """qemu-img check --output=json: the parsed report (None when it printed none), status, stdout, stderr."""
    proc = subprocess.run([require("qemu-img"), "check", "--output=json", str(path)],
                          capture_output=True, text=True, check=False)
    return (json.loads(proc.stdout) if proc.stdout.strip() else None), proc.returncode, proc.stderr


def storprobe(*args: str | Path) -> subprocess.CompletedProcess:
    return subprocess.run([require("storprobe"), *map(str, args)], capture_output=True, text=True, check=False)


def ours(path: Path) -> tuple[dict | None, int]:
    """verify() with the extent files opened as qemu-img opens them: the report as JSON parses it, and the status."""
    try:
        report = verify(path, named_files=LOCAL)
    except NoCheck:
        return None, 63
    except ProbeError:
        return None, EXIT_FAILED
    return json.loads(to_json(report)), report.exit_status


def assert_as_qemu(path: Path) -> int:
    """verify() and ``storprobe verify --output json`` say what qemu-img check says, with its status;
    a failed check names the sector qemu-img names."""
    theirs, status, errors = qemu_check(path)
    assert ours(path) == (theirs, status)
    proc = storprobe("verify", "--output", "json", path)
    assert (json.loads(proc.stdout) if proc.stdout.strip() else None, proc.returncode) == (theirs, status)
    for word in ("points after EOF", "could not get cluster_offset"):
        if word in errors:
            sector = errors.split("for sector ", 1)[1].split()[0]
            assert f"for sector {sector} " in proc.stderr or f"for sector {sector})" in proc.stderr, proc.stderr
    return status


def split(tmp_path: Path, subformat: str = "twoGbMaxExtentSparse", size: str = "5G") -> Path:
    """A disk of three extent files (2 GiB, 2 GiB, 1 GiB), written across the first boundary and in the last."""
    image = qemu_img_create(tmp_path / "disk.vmdk", "vmdk", size, f"subformat={subformat}")
    qemu_io(image, "write -P 0x11 0 64k", "write -P 0x22 2047M 2M", "write -z 3G 64k", "write -P 0x33 4G 1k",
            fmt="vmdk")
    return image


def entry_at(extent: Path, guest: int) -> int:
    """Where in a hosted sparse extent's file the grain table entry of its byte ``guest`` lies
    (by the header QEMU uses: a streamOptimized file's footer when the one at the start says so)."""
    data = extent.read_bytes()
    header = len(data) - 1024 if struct.unpack_from("<Q", data, 56)[0] == 2**64 - 1 else 0
    grain = struct.unpack_from("<Q", data, header + 20)[0] * SECTOR
    gtes = struct.unpack_from("<I", data, header + 44)[0]
    gd = struct.unpack_from("<Q", data, header + 56)[0] * SECTOR
    table = struct.unpack_from("<I", data, gd + 4 * (guest // (grain * gtes)))[0] * SECTOR
    return table + 4 * (guest // grain % gtes)


def directory_at(extent: Path, guest: int) -> int:
    """Where in a hosted sparse extent's file the grain directory entry of its byte ``guest`` lies."""
    data = extent.read_bytes()
    grain = struct.unpack_from("<Q", data, 20)[0] * SECTOR
    gtes = struct.unpack_from("<I", data, 44)[0]
    return struct.unpack_from("<Q", data, 56)[0] * SECTOR + 4 * (guest // (grain * gtes))


def put(path: Path, offset: int, value: int) -> None:
    data = bytearray(path.read_bytes())
    struct.pack_into("<I", data, offset, value)
    path.write_bytes(bytes(data))


# ---- clean images ------------------------------------------------------------------------------------


@pytest.mark.parametrize("subformat", ["twoGbMaxExtentSparse", "twoGbMaxExtentFlat", "monolithicFlat"])
def test_clean_disks_of_several_files(tmp_path, subformat):
    image = split(tmp_path, subformat)
    assert len(list(tmp_path.iterdir())) == (2 if subformat == "monolithicFlat" else 4)
    assert assert_as_qemu(image) == 0
    assert ours(image)[0] == {"check-errors": 0, "filename": str(image), "format": "vmdk"}


def test_the_text_is_qemu_img_checks(tmp_path):
    """Byte for byte, through the command (human and JSON)."""
    image = split(tmp_path)
    for output, flag in (("json", "--output=json"), ("human", "--output=human")):
        theirs = subprocess.run([require("qemu-img"), "check", flag, str(image)], capture_output=True, text=True)
        mine = storprobe("verify", "--output", output, image)
        assert (mine.stdout, mine.returncode) == (theirs.stdout, theirs.returncode) == (mine.stdout, 0)


# ---- broken grain tables, directories and extent files -------------------------------------------------


@pytest.mark.parametrize("guest", [0, 2047 * MIB, 2 * GIB + 64 * 1024, 4 * GIB])
def test_a_grain_past_the_end_of_its_extent_file(tmp_path, guest):
    """The sector named is the disk's, not the extent's: the same as qemu-img's."""
    image = split(tmp_path)
    index = guest // (2 * GIB)
    extent = tmp_path / f"disk-s00{index + 1}.vmdk"
    put(extent, entry_at(extent, guest - index * 2 * GIB), extent.stat().st_size // SECTOR + 8)
    assert assert_as_qemu(image) == EXIT_FAILED
    assert f"cluster offset for sector {guest // SECTOR} points after EOF" in storprobe("verify", image).stderr


def test_the_first_broken_grain_of_the_disk_is_reported(tmp_path):
    """Broken grains in the second and third files: the walk stops at the first."""
    image = split(tmp_path)
    second, third = tmp_path / "disk-s002.vmdk", tmp_path / "disk-s003.vmdk"
    put(third, entry_at(third, 0), third.stat().st_size // SECTOR)
    put(second, entry_at(second, 1024 * MIB), second.stat().st_size // SECTOR + 1)
    assert assert_as_qemu(image) == EXIT_FAILED
    assert f"sector {(3 * GIB) // SECTOR} points" in storprobe("verify", image).stderr


def test_a_grain_just_inside_its_file_is_clean(tmp_path):
    """An entry naming the last sector of the file is no corruption (QEMU compares with the file's length)."""
    image = split(tmp_path)
    extent = tmp_path / "disk-s002.vmdk"
    put(extent, entry_at(extent, 1024 * MIB), extent.stat().st_size // SECTOR - 1)
    assert assert_as_qemu(image) == 0


def test_a_grain_table_past_the_end_of_its_file_reads_as_zeros(tmp_path):
    """A grain directory entry pointing past the end: QEMU reads a table of zeros, every grain unallocated."""
    image = split(tmp_path)
    extent = tmp_path / "disk-s003.vmdk"
    put(extent, directory_at(extent, 0), extent.stat().st_size // SECTOR + 1000)
    assert assert_as_qemu(image) == 0


def test_a_missing_extent_file(tmp_path):
    """QEMU cannot open the disk: exit 1, no report; ours is a named error."""
    image = split(tmp_path)
    (tmp_path / "disk-s003.vmdk").unlink()
    assert assert_as_qemu(image) == EXIT_FAILED
    with pytest.raises(ProbeError) as missing:
        verify(image, named_files=LOCAL)
    assert missing.value.code == "datapath.named-file-missing"
    assert "disk-s003.vmdk" in storprobe("verify", image).stderr


def test_a_flat_extent_file_cut_short(tmp_path):
    """QEMU's check of a flat extent is one look: its offset must lie inside the
    file. An empty file fails (offset 0 is its end); a file shorter than the
    extent but longer than the offset does not."""
    image = split(tmp_path, "twoGbMaxExtentFlat")
    os.truncate(tmp_path / "disk-f002.vmdk", SECTOR)
    assert assert_as_qemu(image) == 0
    os.truncate(tmp_path / "disk-f002.vmdk", 0)
    assert assert_as_qemu(image) == EXIT_FAILED
    assert f"sector {2 * GIB // SECTOR} points after EOF" in storprobe("verify", image).stderr


def test_a_flat_extent_at_an_offset_past_its_file(tmp_path):
    (tmp_path / "data.raw").write_bytes(b"\x44" * 8 * SECTOR)
    image = tmp_path / "d.vmdk"
    for offset, status in ((7, 0), (8, EXIT_FAILED)):
        image.write_bytes(descriptor("monolithicFlat", 'RW 4 FLAT "data.raw" 0', f'RW 16 FLAT "data.raw" {offset}'))
        assert assert_as_qemu(image) == status


def test_extents_whose_sizes_are_not_whole_grains(tmp_path):
    """QEMU steps a grain of the extent at hand from where it is: past an extent
    of 1000 sectors (7 grains and 104 sectors), the next is looked at 24 sectors
    into each of its grains, and a flat extent between them moves the walk by its
    length. The corrupt grain is found at the sector qemu-img names."""
    qemu_img_create(tmp_path / "a.vmdk", "vmdk", str(1000 * SECTOR))
    qemu_img_create(tmp_path / "c.vmdk", "vmdk", "4M")
    (tmp_path / "b.raw").write_bytes(bytes(100 * SECTOR))
    image = tmp_path / "d.vmdk"
    image.write_bytes(descriptor("twoGbMaxExtentSparse", 'RW 1000 SPARSE "a.vmdk"', 'RW 100 FLAT "b.raw" 0',
                                 'RW 8192 SPARSE "c.vmdk"'))
    qemu_io(image, "write -P 0x55 0 600k", "write -P 0x66 600k 2M", fmt="vmdk")
    assert assert_as_qemu(image) == 0
    extent = tmp_path / "c.vmdk"
    put(extent, entry_at(extent, 128 * 1024), extent.stat().st_size // SECTOR + 1)
    assert assert_as_qemu(image) == EXIT_FAILED


def test_zeroed_grains_are_no_offsets(tmp_path):
    """A zeroed grain's entry (1) points nowhere; with the zeroed-grain flag
    off, QEMU takes the same entry as sector 1 of the file, which is inside it."""
    image = qemu_img_create(tmp_path / "disk.vmdk", "vmdk", "3G", "subformat=twoGbMaxExtentSparse",
                            "zeroed_grain=on")
    qemu_io(image, "write -P 0x11 0 64k", "write -z 2G 1M", "write -z 64k 64k", fmt="vmdk")
    second = tmp_path / "disk-s002.vmdk"
    assert struct.unpack_from("<I", second.read_bytes(), entry_at(second, 0))[0] == 1
    assert assert_as_qemu(image) == 0
    flags = struct.unpack_from("<I", second.read_bytes(), 8)[0]
    put(second, 8, flags & ~(1 << 2))
    assert assert_as_qemu(image) == 0


def test_a_stream_optimized_extent_file(tmp_path):
    """A compressed grain's entry is checked as any other: past the end of its file, the check fails."""
    source = qemu_img_create(tmp_path / "src.vmdk", "vmdk", "4M")
    qemu_io(source, "write -P 0x11 0 64k", "write -P 0x22 3M 64k", fmt="vmdk")
    extent = tmp_path / "so.vmdk"
    run("qemu-img", "convert", "-O", "vmdk", "-o", "subformat=streamOptimized", source, extent)
    (tmp_path / "flat.raw").write_bytes(bytes(8 * SECTOR))
    image = tmp_path / "d.vmdk"
    image.write_bytes(descriptor("twoGbMaxExtentSparse", 'RW 8 FLAT "flat.raw" 0', 'RW 8192 SPARSE "so.vmdk"'))
    assert assert_as_qemu(image) == 0
    put(extent, entry_at(extent, 3 * MIB), extent.stat().st_size // SECTOR + 1)
    assert assert_as_qemu(image) == EXIT_FAILED
    assert f"sector {8 + 3 * MIB // SECTOR} points after EOF" in storprobe("verify", image).stderr


def test_vmfs_extents_are_flat(tmp_path):
    """A VMFS line names a flat extent from the start of its file (no offset on the line)."""
    data = tmp_path / "data.raw"
    data.write_bytes(bytes(16 * SECTOR))
    image = tmp_path / "d.vmdk"
    image.write_bytes(descriptor("vmfs", 'RW 16 VMFS "data.raw"'))
    assert assert_as_qemu(image) == 0
    data.write_bytes(b"")
    assert assert_as_qemu(image) == EXIT_FAILED


def test_an_esx_extent_with_a_short_directory(tmp_path):
    """A COWD extent file whose directory maps less than its capacity, after a
    flat extent: QEMU cannot look up the first grain past the directory."""
    (tmp_path / "flat.raw").write_bytes(bytes(16 * SECTOR))
    (tmp_path / "esx.vmdk").write_bytes(cowd(capacity=131072, grain=8, gd_entries=2,
                                             text=b"CID=12345678\nparentCID=ffffffff\n"))
    image = tmp_path / "d.vmdk"
    image.write_bytes(descriptor("vmfsSparse", 'RW 16 FLAT "flat.raw" 0', 'RW 131072 VMFSSPARSE "esx.vmdk"'))
    assert assert_as_qemu(image) == EXIT_FAILED
    assert f"cluster_offset for sector {16 + 65536}" in storprobe("verify", image).stderr


# ---- the policy the extent files are opened under ----------------------------------------------------


def test_extent_files_are_opened_only_under_a_policy(tmp_path):
    """verify() opens no file an image names unless told to, and then under the
    data path's rules: inside a directory given, never a network name."""
    image = split(tmp_path)
    with pytest.raises(ProbeError) as refused:
        verify(image)
    assert refused.value.code == "datapath.named-file-refused"
    with pytest.raises(ProbeError) as refused:
        verify(image, named_files=REFUSE)
    assert refused.value.code == "datapath.named-file-refused"
    assert verify(image, named_files=tmp_path).exit_status == 0
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    with pytest.raises(ProbeError) as outside:
        verify(image, named_files=backing_inside(elsewhere))
    assert outside.value.code.startswith("datapath.named-file-")
    image.write_bytes(descriptor("monolithicFlat", 'RW 8 FLAT "nbd://127.0.0.1:1/x" 0'))
    with pytest.raises(ProbeError) as network:
        verify(image, named_files=LOCAL)
    assert network.value.code == "datapath.named-file-not-local"
    assert storprobe("verify", image).returncode == EXIT_FAILED
    image.write_bytes(descriptor("monolithicFlat", 'RW 8 FLAT "file:disk-s001.vmdk" 0'))  # QEMU's working directory
    for call in (lambda: verify(image, named_files=LOCAL), lambda: open_image(image, backing=LOCAL)):
        with pytest.raises(ProbeError) as relative:
            call()
        assert relative.value.code == "datapath.named-file-relative"


def test_a_symlink_leading_out_of_the_directory_is_refused(tmp_path):
    inside, outside = tmp_path / "in", tmp_path / "out"
    inside.mkdir(), outside.mkdir()
    (outside / "secret.raw").write_bytes(bytes(8 * SECTOR))
    (inside / "link.raw").symlink_to(outside / "secret.raw")
    image = inside / "d.vmdk"
    image.write_bytes(descriptor("monolithicFlat", 'RW 8 FLAT "link.raw" 0'))
    with pytest.raises(ProbeError) as refused:
        verify(image, named_files=inside)
    assert refused.value.code.startswith("datapath.named-file-")
    assert assert_as_qemu(image) == 0  # as qemu-img, for an image you trust
