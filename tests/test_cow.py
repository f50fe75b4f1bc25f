"""cow (User-Mode Linux): hand-built images only. No tool here writes cow:
QEMU dropped its cow driver (qemu-img 7.2 lists no "cow"), and UML's
uml_mkcow is not packaged for this system. Each builder follows the writer
it names: QEMU's old block/cow.c cow_create (its unpacked C struct, as a
64-bit or a 32-bit build lays it out) and UML's arch/um/drivers/cow_user.c."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from storprobe import Backing, probe
from storprobe.qemu_json import EXTRA_KEY, to_qemu_json

from builders import MAGIC, qemu_v2, uml_v3
from oracle import code_of, libvirt_volumes, ours, probe_or_named_error, qemu_info

MIB = 1024 * 1024


def uml_v2(size: int, backing: bytes = b"/base.img", *, mtime: int = 1234) -> bytes:
    """UML's version-2 header: a 4096-byte (MAXPATHLEN) name."""
    header = MAGIC + struct.pack(">I4096sIQi", 2, backing, mtime, size, 512)
    return header + bytes(1024)


def uml_v3_unpacked(size: int, backing: bytes = b"/base.img") -> bytes:
    """A version-3 header from a 64-bit UML before Dec 2005: the struct was
    not packed, so mtime took 8 bytes (htonl'd into the low half) and every
    later field moved 4 bytes on."""
    mtime = struct.pack("<q", struct.unpack("<I", struct.pack(">I", 1234))[0])
    header = MAGIC + struct.pack(">I", 3) + mtime + struct.pack(">QIII4096s", size, 512, 512, 0, backing)
    return header + bytes(-len(header) % 512)


def write(tmp_path: Path, data: bytes, name: str = "disk.cow") -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


@pytest.mark.parametrize(
    "data, layout",
    [
        (qemu_v2(64 * MIB, b"base.raw"), "qemu"),
        (qemu_v2(64 * MIB, b"base.raw", packed=True), "qemu-packed"),
        (uml_v2(64 * MIB, b"base.raw"), "uml"),
        (uml_v3(64 * MIB, b"base.raw"), "uml"),
        (uml_v3_unpacked(64 * MIB, b"base.raw"), "uml-unpacked"),
    ],
    ids=["qemu-v2", "qemu-v2-packed", "uml-v2", "uml-v3", "uml-v3-unpacked"],
)
def test_every_layout(tmp_path, data, layout):
    image = write(tmp_path, data)
    info = probe(image)
    assert (info.format, info.evidence, info.virtual_size) == ("cow", "magic", 64 * MIB)
    assert info.backing == Backing("base.raw")  # cow records no backing format
    assert info.details["layout"] == layout and info.details["sector-size"] == 512 and info.details["mtime"] == 1234
    out = to_qemu_json(info)
    extra = out.pop(EXTRA_KEY)
    assert out == qemu_info(image)  # QEMU 7.2 has no cow driver: a cow file is raw bytes to it
    assert (extra["format"], extra["virtual-size"]) == ("cow", 64 * MIB)
    assert extra["backing-store"]["path"] == str(tmp_path / "base.raw")


def test_libvirt_misreads_qemus_64bit_layout(tmp_path):
    """libvirt reads the size at 1036, which in a cow file from a 64-bit QEMU
    is the padding and the high half of the size: 0 for any disk below 4 GiB."""
    data = qemu_v2(64 * MIB)
    assert int.from_bytes(data[1036:1044], "big") == 0
    assert probe(write(tmp_path, data)).virtual_size == 64 * MIB


def test_no_backing_file(tmp_path):
    info = probe(write(tmp_path, qemu_v2(10 * MIB)))
    assert info.backing is None and "backing-filename" not in ours(write(tmp_path, qemu_v2(10 * MIB), "b.cow"))


def test_size_rounds_down_to_sectors(tmp_path):
    assert probe(write(tmp_path, uml_v3(1000))).virtual_size == 512


def test_large_disk_and_long_name(tmp_path):
    name = b"/" + b"d" * 4000
    info = probe(write(tmp_path, uml_v3(3 * 2**40, name)))
    assert info.virtual_size == 3 * 2**40 and info.backing == Backing(name.decode())


@pytest.mark.parametrize(
    "data, code",
    [
        (uml_v3(MIB, sectorsize=0), "cow.sector-size"),
        (uml_v3(MIB, alignment=0), "cow.alignment"),
        (uml_v3(MIB, cow_format=1), "cow.bitmap-format"),
        (MAGIC + struct.pack(">I", 2) + bytes(5000), "cow.v2-layout"),
        (MAGIC + struct.pack(">I", 2) + bytes(500), "truncated"),
        (uml_v3(MIB)[:2000], "truncated"),
        (MAGIC + struct.pack(">I", 1) + bytes(300), "unsupported-version"),
        (MAGIC + struct.pack(">I", 4) + bytes(5000), "unsupported-version"),
    ],
    ids=["v3-sector-size", "v3-alignment", "v3-bitmap-format", "v2-no-layout", "v2-short", "v3-short", "v1", "v4"],
)
def test_malformed_header(tmp_path, data, code):
    assert code_of(write(tmp_path, data)) == code


@given(
    base=st.sampled_from([qemu_v2(8 * MIB, b"base"), uml_v2(8 * MIB), uml_v3(8 * MIB), uml_v3_unpacked(8 * MIB)]),
    edits=st.lists(
        st.tuples(st.one_of(st.integers(0, 48), st.integers(1028, 1056), st.integers(4100, 4130)), st.integers(0, 255)),
        min_size=1,
        max_size=8,
    ),
    cut=st.one_of(st.none(), st.integers(0, 5000)),
)
def test_random_header_mutations_never_crash(base, edits, cut):
    data = bytearray(base)
    for offset, value in edits:
        data[offset % len(data)] = value
    data = bytes(data if cut is None else data[:cut])
    probe_or_named_error(data, None, "cow")


def test_libvirt_reads_only_the_packed_qemu_layout(tmp_path):
    """libvirt 9.0 reads v2 sizes at 1036 (right only for 32-bit QEMU's
    files) and does not know v3 at all; we read every layout."""
    write(tmp_path, qemu_v2(64 * MIB, b"base.raw"), "qemu.cow")
    write(tmp_path, qemu_v2(64 * MIB, b"base.raw", packed=True), "packed.cow")
    write(tmp_path, uml_v3(64 * MIB), "uml3.cow")
    theirs = libvirt_volumes(tmp_path, "cow")
    assert theirs["packed.cow"] == ("cow", 64 * MIB)
    assert theirs["qemu.cow"][0] == "cow" and theirs["qemu.cow"][1] != 64 * MIB
    assert theirs["uml3.cow"][0] == "raw"
    for name in theirs:
        assert probe(tmp_path / name).virtual_size == 64 * MIB
