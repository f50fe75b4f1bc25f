"""The data path on VMDK and VPC images against QEMU 7.2.

Images are made by qemu-img (create, convert) and written by qemu-io; a
multi-extent VMDK is a descriptor, written here, over extent files qemu-img
made (sparse, stream-optimized, raw flat at an offset), which QEMU opens as it
is. ``storprobe map --output json`` must be qemu-img map's text byte for byte
(the human table too), the guest bytes ``qemu-img convert -O raw``'s, and
``storprobe convert``/``compare`` must agree with them; ``storprobe verify``
prints what ``qemu-img check`` prints and exits as it does. Tables and grains
are then broken with struct patches: where QEMU fails a read, ours is a named
error; where QEMU reads on (zeros past the end of the file), so do we.
"""

from __future__ import annotations

import os
import struct
import subprocess
import zlib
from pathlib import Path

import pytest

from storprobe import ProbeError
from storprobe.blockmap import DataPathError
from storprobe.datapath import ALONE, IGNORE, LOCAL, REFUSE, backing_inside, open_image

from builders import cowd, descriptor
from oracle import qemu_guest_bytes, qemu_img_create, qemu_io, qemu_map, require, run

MIB = 1024 * 1024
SECTOR = 512
WRITES = (
    "write -P 0x11 0 64k",
    "write -P 0x22 200k 3k",
    "write -z 1M 64k",
    "write -P 0x33 1535k 2k",
    "write -P 0x44 3M 512",
)


def storprobe(*args: str | Path) -> subprocess.CompletedProcess:
    return subprocess.run([require("storprobe"), *map(str, args)], capture_output=True, text=True, check=False)


def assert_same_map(image: Path, fmt: str) -> str:
    """Our JSON map and human table of ``image`` are qemu-img map's text."""
    theirs = qemu_map(image, fmt)
    assert theirs.returncode == 0, theirs.stderr
    mine = storprobe("map", "-f", fmt, "--output", "json", image)
    assert (mine.returncode, mine.stderr) == (0, "")
    assert mine.stdout == theirs.stdout.decode()
    human, table = qemu_map(image, fmt, output="human"), storprobe("map", "-f", fmt, image)
    assert table.stdout == human.stdout.decode()
    assert table.returncode == (0 if human.returncode == 0 else 1)
    return mine.stdout


def assert_same_data(image: Path, fmt: str, tmp_path: Path) -> None:
    """open_image reads qemu-img convert's bytes; storprobe convert writes them;
    compare finds the image and that raw file identical, as qemu-img compare does."""
    expected = qemu_guest_bytes(image, tmp_path, fmt)
    with open_image(image, fmt, backing=LOCAL) as disk:
        assert disk.read() == expected
    ours = tmp_path / f"{image.name}.ours.raw"
    converted = storprobe("convert", "-f", fmt, "-O", "raw", image, ours)
    assert (converted.returncode, converted.stderr) == (0, "")
    assert ours.read_bytes() == expected
    theirs = subprocess.run([require("qemu-img"), "compare", "-f", fmt, "-F", "raw", str(image), str(ours)],
                            capture_output=True, text=True, check=False)
    mine = storprobe("compare", "-f", fmt, "-F", "raw", image, ours)
    assert (mine.returncode, mine.stdout) == (theirs.returncode, theirs.stdout) == (0, "Images are identical.\n")
    ours.write_bytes(expected[:-1] + bytes([expected[-1] ^ 1]))
    changed = storprobe("compare", "-f", fmt, "-F", "raw", image, ours)
    theirs = subprocess.run([require("qemu-img"), "compare", "-f", fmt, "-F", "raw", str(image), str(ours)],
                            capture_output=True, text=True, check=False)
    assert (changed.returncode, changed.stdout) == (theirs.returncode, theirs.stdout)
    assert changed.returncode == 1 and "Content mismatch" in changed.stdout
    ours.unlink()


def assert_same_measure(image: Path, fmt: str) -> None:
    """storprobe measure -O qcow2 of the image (its allocation, read through the map) is qemu-img measure's."""
    theirs = subprocess.run([require("qemu-img"), "measure", "-f", fmt, "-O", "qcow2", "--output=json", str(image)],
                            capture_output=True, text=True, check=True)
    mine = storprobe("measure", "-f", fmt, "-O", "qcow2", "--output", "json", image)
    assert (mine.returncode, mine.stdout) == (0, theirs.stdout)


def qemu_check(image: Path) -> tuple[int, str]:
    proc = subprocess.run([require("qemu-img"), "check", "--output=json", str(image)],
                          capture_output=True, text=True, check=False)
    return proc.returncode, proc.stdout


def assert_same_check(image: Path) -> int:
    status, text = qemu_check(image)
    mine = storprobe("verify", "--output", "json", image)
    assert (mine.returncode, mine.stdout) == (status, text)
    return status


# ---- images ------------------------------------------------------------------------------------------


def vmdk(path: Path, subformat: str, *options: str, size: str = "4M", writes: tuple[str, ...] = WRITES) -> Path:
    qemu_img_create(path, "vmdk", size, f"subformat={subformat}", *options)
    qemu_io(path, *writes, fmt="vmdk")
    return path


def stream_optimized(path: Path) -> Path:
    """A streamOptimized VMDK converted from a written sparse one (qemu-img
    cannot write one in place): its grains are compressed, its header in the footer."""
    source = vmdk(path.with_suffix(".src.vmdk"), "monolithicSparse")
    run("qemu-img", "convert", "-O", "vmdk", "-o", "subformat=streamOptimized", source, path)
    source.unlink()
    return path


def vpc(path: Path, subformat: str) -> Path:
    qemu_img_create(path, "vpc", "8M", f"subformat={subformat}")
    qemu_io(path, "write -P 0x11 4k 1k", "write -z 4M 64k", "write -P 0x22 6M 2M", "discard 6M 64k", fmt="vpc")
    return path


def multi_extent(d: Path) -> Path:
    """A descriptor over a sparse extent, a raw flat extent at an offset and a
    stream-optimized sparse extent, then written through the descriptor."""
    qemu_img_create(d / "a-s001.vmdk", "vmdk", "1M")
    (d / "b-f001.vmdk").write_bytes(b"\xee" * 4096)
    os.truncate(d / "b-f001.vmdk", 4096 + 2 * MIB)
    stream_optimized(d / "c-s002.vmdk")
    image = d / "multi.vmdk"
    image.write_bytes(descriptor("twoGbMaxExtentSparse", 'RW 2048 SPARSE "a-s001.vmdk"',
                                 'RW 4096 FLAT "b-f001.vmdk" 8', 'RW 8192 SPARSE "c-s002.vmdk"'))
    qemu_io(image, "write -P 0x55 4k 8k", "write -P 0x66 1020k 8k", "write -P 0x77 2M 4k", fmt="vmdk")
    return image


# ---- the oracle --------------------------------------------------------------------------------------


@pytest.mark.parametrize("subformat, options", [
    ("monolithicSparse", ()),
    ("monolithicSparse", ("zeroed_grain=on",)),
    ("monolithicFlat", ()),
    ("twoGbMaxExtentSparse", ()),
    ("twoGbMaxExtentFlat", ()),
])
def test_vmdk_subformats(tmp_path, subformat, options):
    image = vmdk(tmp_path / "disk.vmdk", subformat, *options)
    text = assert_same_map(image, "vmdk")
    assert '"data": true' in text and ('"present": false' in text) == ("Sparse" in subformat)
    if options:
        assert '"present": true, "zero": true, "data": false' in text  # write -z made a zeroed grain
    assert_same_data(image, "vmdk", tmp_path)
    assert_same_measure(image, "vmdk")
    if subformat == "monolithicSparse":
        assert assert_same_check(image) == 0


def test_stream_optimized(tmp_path):
    image = stream_optimized(tmp_path / "so.vmdk")
    text = assert_same_map(image, "vmdk")
    assert '"zero": false, "data": true}' in text  # compressed grains: data without an offset
    assert_same_data(image, "vmdk", tmp_path)
    assert_same_measure(image, "vmdk")
    assert assert_same_check(image) == 0
    mine = storprobe("map", "--output", "json", "--compressed", image)
    assert '"compressed": true' in mine.stdout


def test_stream_footer(tmp_path):
    """A stream-optimized file as VMware writes it: the header at the start says
    its grain directory is at the end (GD_AT_END), the footer holds the header
    QEMU reads (after a footer marker, before the end-of-stream marker)."""
    image = stream_optimized(tmp_path / "so.vmdk")
    expected_map = assert_same_map(image, "vmdk")
    data = bytearray(image.read_bytes())
    assert len(data) % SECTOR == 0
    footer = struct.pack("<QII", 1, 0, 3).ljust(SECTOR, b"\0") + bytes(data[:SECTOR])
    struct.pack_into("<Q", data, 56, 2**64 - 1)
    image.write_bytes(bytes(data) + footer + bytes(SECTOR))
    assert assert_same_map(image, "vmdk") == expected_map
    assert_same_data(image, "vmdk", tmp_path)
    assert assert_same_check(image) == 0
    # the footer's grain directory moved to the end-of-stream marker's zeros: nothing is allocated
    data = bytearray(image.read_bytes())
    struct.pack_into("<Q", data, len(data) - 1024 + 56, len(data) // SECTOR - 1)
    image.write_bytes(bytes(data))
    assert '"present": true' not in assert_same_map(image, "vmdk")


def test_multi_extent_descriptor(tmp_path):
    image = multi_extent(tmp_path)
    text = assert_same_map(image, "vmdk")
    assert '"offset": 4096' in text  # the flat extent's sector offset, where its file has data
    assert_same_data(image, "vmdk", tmp_path)
    assert_same_measure(image, "vmdk")
    human = storprobe("map", image).stdout
    assert str(tmp_path / "b-f001.vmdk") in human and str(tmp_path / "a-s001.vmdk") in human


def test_an_extent_type_the_data_path_does_not_read_is_named(tmp_path):
    """SESPARSE (vSphere's space-efficient extents): QEMU 7.2 reads them; the data
    path does not yet, and says so by name instead of guessing at their layout."""
    (tmp_path / "x-sesparse.vmdk").write_bytes(bytes(1 << 20))
    (tmp_path / "x.vmdk").write_bytes(descriptor("seSparse", 'RW 2048 SESPARSE "x-sesparse.vmdk"'))
    with pytest.raises(DataPathError) as exc:
        open_image(tmp_path / "x.vmdk", backing=LOCAL)
    assert exc.value.code == "vmdk.extent-type-unsupported"


def test_a_flat_extent_file_shorter_than_its_extent(tmp_path):
    """Past the end of a flat extent's file QEMU asks the file, which has ended: data reading as zeros."""
    image = vmdk(tmp_path / "f.vmdk", "monolithicFlat", writes=("write -P 0x11 0 64k", "write -P 0x22 96k 4k"))
    os.truncate(tmp_path / "f-flat.vmdk", 98 * 1024)
    assert '"zero": true, "data": true' in assert_same_map(image, "vmdk")
    assert_same_data(image, "vmdk", tmp_path)


def test_two_gb_extents_of_a_larger_disk(tmp_path):
    """A 5 GiB disk is three extent files; writes across the first boundary."""
    for subformat in ("twoGbMaxExtentSparse", "twoGbMaxExtentFlat"):
        image = vmdk(tmp_path / f"{subformat}.vmdk", subformat, size="5G",
                     writes=("write -P 0x11 0 64k", "write -P 0x22 2047M 2M", "write -z 3G 64k", "write -P 0x33 4G 1k"))
        assert_same_map(image, "vmdk")
        with open_image(image, backing=LOCAL) as disk:
            assert disk.pread(2047 * MIB - 1, 2 * MIB + 2) == b"\0" + b"\x22" * 2 * MIB + b"\0"


@pytest.mark.parametrize("subformat", ["dynamic", "fixed"])
def test_vpc(tmp_path, subformat):
    """A dynamic VHD's unallocated blocks are zeros (QEMU says zero, not
    unallocated); a fixed one is its file, holes reading as zeros."""
    image = vpc(tmp_path / "disk.vhd", subformat)
    text = assert_same_map(image, "vpc")
    assert '"present": true, "zero": true' in text and '"present": false' not in text
    assert_same_data(image, "vpc", tmp_path)
    assert_same_measure(image, "vpc")
    mine = storprobe("verify", "--output", "json", image)
    theirs = subprocess.run([require("qemu-img"), "check", "-f", "vpc", str(image)], capture_output=True, text=True)
    assert (mine.returncode, theirs.returncode) == (63, 63)
    assert "does not support checks" in mine.stderr and "does not support checks" in theirs.stderr


def test_vpc_block_bitmap_is_not_read(tmp_path):
    """QEMU reads an allocated block whole, never its sector bitmap: with the
    bitmap cleared, the block is still data, and so it is here."""
    image = vpc(tmp_path / "d.vhd", "dynamic")
    data = bytearray(image.read_bytes())
    table_offset = struct.unpack_from(">Q", data, 512 + 16)[0]
    first = struct.unpack_from(">I", data, table_offset)[0]
    data[first * SECTOR : first * SECTOR + SECTOR] = bytes(SECTOR)
    image.write_bytes(bytes(data))
    assert '"offset"' in assert_same_map(image, "vpc")
    assert_same_data(image, "vpc", tmp_path)


# ---- the extent files a descriptor names: opened only under a policy ----------------------------------


@pytest.mark.parametrize("subformat", ["monolithicFlat", "twoGbMaxExtentSparse"])
def test_no_backing_still_opens_the_extent_files(tmp_path, subformat):
    """``--no-backing`` is qemu-img's ``backing: null``: the parent is ignored,
    the files the descriptor names for the disk's own data are still read."""
    image = vmdk(tmp_path / "disk.vmdk", subformat)
    spec = f'json:{{"driver": "vmdk", "backing": null, "file": {{"driver": "file", "filename": "{image}"}}}}'
    theirs = subprocess.run([require("qemu-img"), "map", "--output=json", spec], capture_output=True, text=True)
    assert theirs.returncode == 0, theirs.stderr
    mine = storprobe("map", "--no-backing", "--output", "json", image)
    assert (mine.returncode, mine.stderr, mine.stdout) == (0, "", theirs.stdout.replace(spec, str(image)))
    out = tmp_path / "alone.raw"
    converted = storprobe("convert", "--no-backing", "-O", "raw", image, out)
    assert (converted.returncode, converted.stderr) == (0, "")
    assert out.read_bytes() == qemu_guest_bytes(image, tmp_path, "vmdk")
    with open_image(image, backing=ALONE) as disk:
        assert disk.read() == out.read_bytes()


def test_extent_files_follow_the_backing_policy(tmp_path):
    image = vmdk(tmp_path / "flat.vmdk", "monolithicFlat", writes=("write -P 0x11 0 4k",))
    for policy in (REFUSE, IGNORE):
        with pytest.raises(DataPathError) as refused:
            open_image(image, backing=policy)
        assert refused.value.code == "datapath.named-file-refused"
    with open_image(image, backing=tmp_path) as disk:
        assert disk.pread(0, 4) == b"\x11" * 4
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    with pytest.raises(ProbeError) as outside:
        open_image(image, backing=backing_inside(elsewhere))
    assert outside.value.code.startswith("datapath.named-file-")


def test_extent_names_that_lead_out_are_refused(tmp_path):
    inside, outside = tmp_path / "in", tmp_path / "out"
    inside.mkdir(), outside.mkdir()
    (outside / "secret").write_bytes(b"secret" * 100)
    (inside / "link").symlink_to(outside / "secret")
    for name in (str(outside / "secret"), "../out/secret", "link"):
        image = inside / "d.vmdk"
        image.write_bytes(descriptor("monolithicFlat", f'RW 1 FLAT "{name}" 0'))
        with pytest.raises(ProbeError) as refused:
            open_image(image, backing=inside)
        assert refused.value.code.startswith("datapath.named-file-"), name
        with open_image(image, backing=LOCAL) as disk:  # what QEMU opens, for an image you trust
            assert disk.read(6) == b"secret"
    image.write_bytes(descriptor("monolithicFlat", 'RW 1 FLAT "nbd://example.com/x" 0'))
    with pytest.raises(ProbeError) as network:
        open_image(image, backing=LOCAL)
    assert network.value.code == "datapath.named-file-not-local"
    image.write_bytes(descriptor("monolithicFlat", 'RW 1 FLAT "missing" 0'))
    with pytest.raises(ProbeError) as missing:
        open_image(image, backing=LOCAL)
    assert missing.value.code == "datapath.named-file-missing"


def test_extent_count_is_bounded(tmp_path):
    (tmp_path / "x.raw").write_bytes(bytes(SECTOR))
    image = tmp_path / "many.vmdk"
    image.write_bytes(descriptor("monolithicFlat", *['RW 1 FLAT "x.raw" 0'] * 1025))
    with pytest.raises(DataPathError) as many:
        open_image(image, backing=LOCAL)
    assert many.value.code == "vmdk.extent-count"
    image.write_bytes(descriptor("monolithicFlat", *['RW 1 FLAT "x.raw" 0'] * 1024))
    with open_image(image, backing=LOCAL) as disk:
        assert disk.read() == bytes(1024 * SECTOR)


def test_sparse_extent_files_are_checked(tmp_path):
    """A SPARSE line names a hosted sparse extent of the capacity it records.
    QEMU reads a raw file there as no VMDK; a sparse extent of another capacity
    it takes at the file's capacity, while the probe (which opens no extent)
    sizes the disk by the line: the data path refuses to read a disk whose size
    it does not know."""
    qemu_img_create(tmp_path / "s.vmdk", "vmdk", "1M")
    (tmp_path / "r.raw").write_bytes(bytes(MIB))
    image = tmp_path / "d.vmdk"
    for line, code in (('RW 4096 SPARSE "s.vmdk"', "vmdk.extent-capacity"),
                       ('RW 2048 SPARSE "r.raw"', "vmdk.extent-not-sparse")):
        image.write_bytes(descriptor("twoGbMaxExtentSparse", line))
        with pytest.raises(DataPathError) as refused:
            open_image(image, backing=LOCAL)
        assert refused.value.code == code
        theirs = qemu_map(image, "vmdk")
        if code == "vmdk.extent-not-sparse":
            assert theirs.returncode != 0
        else:
            assert b'"length": 1048576' in theirs.stdout  # the file's capacity, not the line's 2 MiB


def esx_sparse(path: Path, directory_entries: int) -> Path:
    """A hand-built ESX sparse extent (COWD; qemu-img makes none) of 64 MiB in 4 KiB
    grains: directory entries 0 and 2 share one grain table holding two grains."""
    data = bytearray(cowd(capacity=131072, grain=8, gd_entries=directory_entries, text=CID_TEXT))
    data += bytes(6 * 4096 - len(data))
    struct.pack_into("<II", data, 4 * SECTOR, 8, 0)
    struct.pack_into("<I", data, 4 * SECTOR + 8, 8)
    struct.pack_into("<I", data, 8 * SECTOR + 4, 40)
    struct.pack_into("<I", data, 8 * SECTOR + 20, 48)
    data[40 * SECTOR : 48 * SECTOR] = b"\x5a" * 4096
    path.write_bytes(bytes(data) + b"\x6b" * 4096)
    return path


CID_TEXT = b"CID=12345678\nparentCID=ffffffff\n"  # QEMU opens no VMDK without both


@pytest.mark.parametrize("directory_entries", [4, 9])
def test_esx_sparse_extent(tmp_path, directory_entries):
    """QEMU reads a COWD extent by tables of 4096 entries and as many directory entries as its header says."""
    image = esx_sparse(tmp_path / "esx.vmdk", directory_entries)
    text = assert_same_map(image, "vmdk")
    assert text.count('"data": true') == 4
    assert_same_data(image, "vmdk", tmp_path)
    assert assert_same_check(image) == 0


def test_esx_sparse_extent_with_a_short_directory(tmp_path):
    """Two directory entries map 32 MiB of a 64 MiB disk: QEMU's block status
    and check fail past them (an I/O error), ours with a named error."""
    image = esx_sparse(tmp_path / "esx.vmdk", 2)
    assert qemu_map(image, "vmdk").returncode == 1
    mine = storprobe("map", "--output", "json", image)
    assert mine.returncode == 1 and "grain directory entry 2 is past its 2 entries" in mine.stderr
    with open_image(image) as disk, pytest.raises(DataPathError) as short:
        disk.pread(32 * MIB, 1)
    assert short.value.code == "vmdk.gd-index"
    assert assert_same_check(image) == 1
    assert "could not get cluster_offset for sector 65536" in storprobe("verify", image).stderr


def test_backing_chain(tmp_path):
    """A VMDK over a VMDK (parentFileNameHint): unallocated grains are the parent's."""
    base = vmdk(tmp_path / "base.vmdk", "monolithicSparse", writes=("write -P 0x11 0 1M",))
    top = tmp_path / "top.vmdk"
    qemu_img_create(top, "vmdk", "4M", f"backing_file={base.name}", "backing_fmt=vmdk")
    qemu_io(top, "write -P 0x22 64k 64k", "write -P 0x33 2M 4k", fmt="vmdk")
    text = assert_same_map(top, "vmdk")
    assert '"depth": 1' in text
    assert_same_data(top, "vmdk", tmp_path)


def test_a_parent_of_another_cid_is_not_read(tmp_path):
    """QEMU reads through to the parent only when its CID is the child's
    parentCID (the map does not ask): the reads that need it fail, as here."""
    base = vmdk(tmp_path / "base.vmdk", "monolithicSparse", writes=("write -P 0x11 0 1M",))
    top = tmp_path / "top.vmdk"
    qemu_img_create(top, "vmdk", "4M", f"backing_file={base.name}", "backing_fmt=vmdk")
    qemu_io(top, "write -P 0x22 64k 64k", fmt="vmdk")
    data = bytearray(base.read_bytes())
    at = data.index(b"\nCID=", SECTOR) + 5
    data[at : at + 8] = b"%08x" % (int(data[at : at + 8], 16) ^ 1)
    base.write_bytes(bytes(data))
    assert_same_map(top, "vmdk")
    assert subprocess.run([require("qemu-img"), "convert", "-O", "raw", str(top), str(tmp_path / "q.raw")],
                          capture_output=True).returncode == 1
    with open_image(top, backing=LOCAL) as disk:
        assert disk.pread(64 * 1024, 4) == b"\x22" * 4  # the child's own grain
        with pytest.raises(DataPathError) as refused:
            disk.pread(0, 4)
        assert refused.value.code == "vmdk.parent-cid"
    mine = storprobe("convert", "-O", "raw", top, tmp_path / "o.raw")
    assert mine.returncode == 1 and "parentCID" in mine.stderr


def test_descriptor_files_are_verified(tmp_path):
    """qemu-img check opens the extent files; so does verify, as the data path
    opens them (tests/test_verify_vmdk_extents.py goes further)."""
    image = vmdk(tmp_path / "flat.vmdk", "monolithicFlat", writes=())
    assert assert_same_check(image) == 0
    assert assert_same_check(multi_extent(tmp_path)) == 0


# ---- broken tables and grains ------------------------------------------------------------------------


def grain_entry_offset(data: bytes, guest: int, header_at: int = 0) -> int:
    """Where the grain table entry of guest byte ``guest`` lies in a sparse extent's file."""
    grain, gtes, gd = (struct.unpack_from("<Q", data, header_at + 20)[0] * SECTOR,
                       struct.unpack_from("<I", data, header_at + 44)[0],
                       struct.unpack_from("<Q", data, header_at + 56)[0] * SECTOR)
    table = struct.unpack_from("<I", data, gd + 4 * (guest // (grain * gtes)))[0] * SECTOR
    return table + 4 * (guest // grain % gtes)


def used_header(data: bytes) -> int:
    """Where the header QEMU reads lies: at the start, or in the footer when that one says so."""
    return len(data) - 1024 if struct.unpack_from("<Q", data, 56)[0] == 2**64 - 1 else 0


def test_a_grain_past_the_end_of_the_file(tmp_path):
    """QEMU maps it, reads it as zeros, and its check fails: so do we."""
    image = vmdk(tmp_path / "s.vmdk", "monolithicSparse")
    data = bytearray(image.read_bytes())
    struct.pack_into("<I", data, grain_entry_offset(data, 200 * 1024), len(data) // SECTOR + 100)
    image.write_bytes(bytes(data))
    assert_same_map(image, "vmdk")
    assert_same_data(image, "vmdk", tmp_path)
    assert assert_same_check(image) == 1
    assert "points after EOF" in storprobe("verify", image).stderr


def test_a_grain_table_past_the_end_of_the_file(tmp_path):
    """A grain table QEMU reads past the end is zeros: every grain unallocated."""
    image = vmdk(tmp_path / "s.vmdk", "monolithicSparse")
    data = bytearray(image.read_bytes())
    gd = struct.unpack_from("<Q", data, 56)[0] * SECTOR
    struct.pack_into("<I", data, gd, len(data) // SECTOR + 100)
    image.write_bytes(bytes(data))
    text = assert_same_map(image, "vmdk")
    assert not text.startswith('[{ "start": 0, "length": 65536, "depth": 0, "present": true')
    assert_same_data(image, "vmdk", tmp_path)
    assert assert_same_check(image) == 0


def broken_grain(tmp_path: Path, how: str) -> Path:
    """A stream-optimized VMDK whose first compressed grain (guest 0) is broken ``how``."""
    image = stream_optimized(tmp_path / "so.vmdk")
    data = bytearray(image.read_bytes())
    marker = struct.unpack_from("<I", data, grain_entry_offset(data, 0, used_header(data)))[0] * SECTOR
    size = struct.unpack_from("<I", data, marker + 8)[0]
    grain = 65536
    if how == "size-zero":
        struct.pack_into("<I", data, marker + 8, 0)
    elif how == "size-huge":
        struct.pack_into("<I", data, marker + 8, 2 * grain + 1)
    elif how == "corrupt":
        data[marker + 12 : marker + 12 + size] = bytes(range(256)) * (size // 256) + bytes(size % 256)
    else:  # a valid stream of another length, in the grain's place
        stream = zlib.compress(b"\x11" * (grain // 2 if how == "short" else 2 * grain))
        data[marker + 12 : marker + 12 + len(stream)] = stream  # a longer one runs into the next grain's sectors
        struct.pack_into("<I", data, marker + 8, len(stream))
    image.write_bytes(bytes(data))
    return image


@pytest.mark.parametrize("how, code", [
    ("size-zero", "vmdk.compressed-size"),
    ("size-huge", "vmdk.compressed-size"),
    ("corrupt", "vmdk.compressed-corrupt"),
    ("short", "vmdk.compressed-short"),
    ("long", "vmdk.compressed-corrupt"),
])
def test_broken_compressed_grains(tmp_path, how, code):
    """Each is an I/O error in QEMU (convert fails) and a named error here,
    never a shifted or padded grain; the map, which reads no grain, agrees."""
    image = broken_grain(tmp_path, how)
    assert_same_map(image, "vmdk")
    with open_image(image) as disk, pytest.raises(DataPathError) as broken:
        disk.read(4096)
    assert broken.value.code == code
    qemu = subprocess.run([require("qemu-img"), "convert", "-O", "raw", str(image), str(tmp_path / "q.raw")],
                          capture_output=True, check=False)
    assert qemu.returncode != 0
    mine = storprobe("convert", "-O", "raw", image, tmp_path / "o.raw")
    assert mine.returncode != 0 and "grain" in mine.stderr


def test_table_cache_is_bounded(tmp_path):
    """Many grain tables through a cache of one: the bytes are the same, the cache holds at most its bound."""
    image = vmdk(tmp_path / "big.vmdk", "monolithicSparse", size="64M",
                 writes=tuple(f"write -P {i + 1} {i * 2}M 4k" for i in range(32)))
    expected = qemu_guest_bytes(image, tmp_path, "vmdk")
    with open_image(image, cache_bytes=4096) as disk:
        assert disk.read() == expected
        assert disk.layers[0].host.cache.held <= 4096
