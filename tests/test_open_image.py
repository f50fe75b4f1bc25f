"""``storprobe.open_image``: the guest disk, read-only, through the backing chain.

Reads are compared with ``qemu-img convert -O raw`` of the same image (and of
the image read alone with ``backing: null``); backing policies, loops and depth
are named errors; tables QEMU refuses (struct patches on real images) are named
errors here and I/O errors there; nothing in an image's tables raises anything
but a named error.
"""

from __future__ import annotations

import io
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

import storprobe
from storprobe import ProbeError
from storprobe.blockmap import Extent, TableCache
from storprobe.datapath import IGNORE, LOCAL, REFUSE, GuestDisk, backing_inside, open_image, open_layers

from builders import (
    INCOMPAT,
    L2_COMPRESSED,
    L2_ZERO,
    build_dmg,
    get,
    guest_writes,
    l1_entry_at,
    l2_entry_at,
    written_qcow2,
)
from oracle import qemu_guest_bytes, qemu_img_create, qemu_io, rebase_unsafe, require, run

CLUSTERS = (512, 4096, 65536, 2 * 1024 * 1024)


def read_all(path: Path, fmt: str | None = None, **options) -> bytes:
    with open_image(path, fmt, **options) as disk:
        return disk.read()


def assert_reads_as_qemu(path: Path, tmp: Path, fmt: str | None = None, **options) -> bytes:
    expected = qemu_guest_bytes(path, tmp, fmt)
    assert read_all(path, fmt, **options) == expected
    return expected


def qemu_fails_to_read(path: Path) -> str:
    """QEMU's side of an agreement on a broken table: reading the guest disk fails."""
    proc = subprocess.run([require("qemu-img"), "convert", "-O", "raw", str(path), os.devnull], capture_output=True,
                          text=True, check=False)
    assert proc.returncode != 0, f"qemu-img read {path}"
    return proc.stderr


# ---- reads against qemu-img convert -------------------------------------------------------------------------


@pytest.mark.parametrize("cluster", CLUSTERS)
@pytest.mark.parametrize("compat", ["1.1", "0.10"])
def test_reads_equal_qemu_img_convert(tmp_path, cluster, compat):
    image = written_qcow2(tmp_path / "a.qcow2", cluster, f"compat={compat}")
    data = assert_reads_as_qemu(image, tmp_path)
    assert data[:cluster] == b"\x11" * cluster and data[6 * cluster : 7 * cluster] == b"\x33" * cluster


@pytest.mark.parametrize("options", [
    ("compression_type=zstd",),
    ("extended_l2=on",),
    ("preallocation=metadata",),
    ("refcount_bits=1",),
    ("refcount_bits=64", "lazy_refcounts=on"),
])
def test_reads_across_image_options(tmp_path, options):
    if "compression_type=zstd" in options:
        pytest.importorskip("zstandard")
    writes = guest_writes(65536, compressed="preallocation=metadata" not in options)
    image = written_qcow2(tmp_path / "o.qcow2", 65536, *options, script=writes)
    assert_reads_as_qemu(image, tmp_path)


def test_subclusters_read_through_to_the_backing(tmp_path):
    base = written_qcow2(tmp_path / "base.qcow2", 65536, size=1024 * 1024)
    top = written_qcow2(tmp_path / "top.qcow2", 65536, "extended_l2=on", f"backing_file={base}", "backing_fmt=qcow2",
                        size=1024 * 1024, script=("write -P 0x77 2k 2k", "write -z 8k 2k", "write -P 0x78 70k 3k"))
    data = assert_reads_as_qemu(top, tmp_path, backing=LOCAL)
    assert data[:2048] == b"\x11" * 2048 and data[2048:4096] == b"\x77" * 2048


def layered(tmp_path: Path, depth: int) -> Path:
    """A chain of ``depth`` backing files under a top image, of different sizes."""
    below = None
    for level, size in zip(range(depth + 1), (1_048_576, 3_145_728, 1_572_864, 2_097_152), strict=False):
        path = tmp_path / f"l{level}.qcow2"
        options = [f"backing_file={below.name}", "backing_fmt=qcow2"] if below else []
        qemu_img_create(path, "qcow2", str(size), *options)
        qemu_io(path, f"write -P {0x20 + level} {level * 131072 + 512} 131072", f"write -zu {level * 65536} 4096",
                f"write -c -P 0x6{level} {(level + 10) * 65536} 65536")
        below = path
    assert below is not None
    return below


@pytest.mark.parametrize("depth", [1, 2, 3])
def test_backing_chains_read_as_qemu_reads_them(tmp_path, depth):
    top = layered(tmp_path, depth)
    assert_reads_as_qemu(top, tmp_path, backing=LOCAL)
    assert_reads_as_qemu(top, tmp_path, backing=backing_inside(tmp_path))


def test_ignore_reads_the_top_alone_as_backing_null(tmp_path):
    top = layered(tmp_path, 2)
    spec = json.dumps({"driver": "qcow2", "file": {"driver": "file", "filename": str(top)}, "backing": None})
    out = tmp_path / "alone.raw"
    run("qemu-img", "convert", "-O", "raw", f"json:{spec}", out)
    assert read_all(top, backing=IGNORE) == out.read_bytes()


def test_raw_and_qcow2_over_raw(tmp_path):
    raw = tmp_path / "base.raw"
    with open(raw, "wb") as f:
        f.truncate(1_000_000)  # not whole sectors: the guest reads zeros up to the next one
        f.seek(300_000)
        f.write(os.urandom(100_000))
    assert_reads_as_qemu(raw, tmp_path, "raw")
    top = qemu_img_create(tmp_path / "top.qcow2", "qcow2", "2M", f"backing_file={raw}", "backing_fmt=raw")
    qemu_io(top, "write -P 1 256k 64k", "write -zu 320k 64k")
    assert_reads_as_qemu(top, tmp_path, backing=LOCAL)


def test_random_access_reads(tmp_path):
    top = layered(tmp_path, 2)
    expected = qemu_guest_bytes(top, tmp_path)
    with open_image(top, backing=LOCAL) as disk:
        for offset, length in ((0, 1), (511, 2), (65535, 70000), (327_000, 200_000), (len(expected) - 3, 100)):
            disk.seek(offset)
            assert disk.read(length) == expected[offset : offset + length]
            assert disk.tell() == min(offset + length, len(expected))
            assert disk.pread(offset, length) == expected[offset : offset + length]


# ---- the file object ------------------------------------------------------------------------------------------


def test_a_seekable_read_only_raw_file(tmp_path):
    image = written_qcow2(tmp_path / "a.qcow2", 4096)
    expected = qemu_guest_bytes(image, tmp_path)
    disk = storprobe.open_image(image)
    assert isinstance(disk, io.RawIOBase) and isinstance(disk, GuestDisk)
    assert disk.readable() and disk.seekable() and not disk.writable()
    assert disk.seek(-10, io.SEEK_END) == len(expected) - 10
    assert disk.read() == expected[-10:] and disk.read(5) == b""
    disk.seek(100)
    assert disk.seek(50, io.SEEK_CUR) == 150
    buffer = bytearray(4096)
    assert disk.readinto(buffer) == 4096 and bytes(buffer) == expected[150:4246]
    with pytest.raises(ValueError):
        disk.seek(-1)
    with pytest.raises(io.UnsupportedOperation):
        disk.write(b"x")
    assert io.BufferedReader(disk, 65536).read() == expected[4246:]
    assert disk.info.format == "qcow2" and disk.size == len(expected)
    disk.close()
    with pytest.raises(ValueError):
        disk.read(1)


def test_the_table_cache_stays_within_its_bytes(tmp_path):
    """512-byte clusters: an L2 table per 32 KiB of guest data, read through a 4 KiB cache."""
    image = written_qcow2(tmp_path / "small.qcow2", 512, size=4 * 1024 * 1024,
                          script=tuple(f"write -P {i} {i * 40960} 1024" for i in range(1, 100)))
    cache = TableCache(4096)
    layers = open_layers(image, cache=cache)
    disk = GuestDisk(layers)
    expected = qemu_guest_bytes(image, tmp_path)
    for offset in range(0, len(expected), 65536):
        assert disk.pread(offset, 65536) == expected[offset : offset + 65536]
        assert cache.held <= 4096
    disk.close()
    assert cache.held == 0


# ---- backing policies ------------------------------------------------------------------------------------------


def code(call) -> str:
    with pytest.raises(ProbeError) as caught:
        call()
    return caught.value.code


def test_backing_files_are_refused_by_default(tmp_path):
    top = layered(tmp_path, 1)
    assert code(lambda: open_image(top)) == "backing.refused"
    assert code(lambda: open_image(top, backing=REFUSE)) == "backing.refused"


def test_backing_inside_a_directory_only(tmp_path):
    inner = tmp_path / "inner"
    inner.mkdir()
    top = layered(inner, 1)
    assert read_all(top, backing=inner) == read_all(top, backing=LOCAL)  # a path means inside it
    other = tmp_path / "other"
    other.mkdir()
    assert code(lambda: open_image(top, backing=other)) == "backing.backing-outside"
    # a name inside the directory whose symlink leads out of it
    (other / "l0.qcow2").write_bytes((inner / "l0.qcow2").read_bytes())
    (inner / "l0.qcow2").unlink()
    (inner / "l0.qcow2").symlink_to(other / "l0.qcow2")
    assert code(lambda: open_image(top, backing=inner)) == "backing.backing-symlink"
    assert read_all(top, backing=LOCAL)  # qemu-img's rule follows it


def test_loops_also_through_symlinks_and_depth(tmp_path):
    a = qemu_img_create(tmp_path / "a.qcow2", "qcow2", "1M")
    b = qemu_img_create(tmp_path / "b.qcow2", "qcow2", "1M", f"backing_file={a}", "backing_fmt=qcow2")
    (tmp_path / "link.qcow2").symlink_to(b)
    rebase_unsafe(a, "link.qcow2", "qcow2")
    assert code(lambda: open_image(b, backing=LOCAL)) == "backing.loop"
    top = layered(tmp_path / ".", 3)
    assert code(lambda: open_image(top, backing=LOCAL, max_depth=2)) == "backing.too-deep"
    assert read_all(top, backing=LOCAL, max_depth=3)


@pytest.mark.parametrize("name, expected", [
    ("nbd://example.invalid/disk", "backing.not-local"),
    ("json:{\"driver\": \"file\", \"filename\": \"rel.qcow2\"}", "backing.relative"),
    ("missing.qcow2", "backing.missing"),
    ("ftp:", "backing.name"),
])
def test_backing_names_the_chain_rules_refuse(tmp_path, no_network, name, expected):
    top = qemu_img_create(tmp_path / "top.qcow2", "qcow2", "1M")
    rebase_unsafe(top, name, "qcow2")
    assert code(lambda: open_image(top, backing=LOCAL)) == expected


def test_a_probed_backing_with_its_own_backing_is_not_followed(tmp_path):
    base = qemu_img_create(tmp_path / "base.qcow2", "qcow2", "1M")
    mid = qemu_img_create(tmp_path / "mid.qcow2", "qcow2", "1M", f"backing_file={base}", "backing_fmt=qcow2")
    top = qemu_img_create(tmp_path / "top.qcow2", "qcow2", "1M")
    data = bytearray(top.read_bytes())  # the backing name written by hand, with no format extension
    name = str(mid).encode()
    data[0x1000 - len(name) : 0x1000] = name  # in the header cluster, past the header's extensions
    struct.pack_into(">QI", data, 8, 0x1000 - len(name), len(name))
    top.write_bytes(bytes(data))
    assert code(lambda: open_image(top, backing=LOCAL)) == "backing.format-not-specified"


# ---- images the data path does not read ---------------------------------------------------------------------


def test_encrypted_images_and_external_data_files_are_refused(tmp_path):
    enc = tmp_path / "enc.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", "--object", "secret,id=s0,data=secret", "-o",
        "encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=10", enc, "1M")
    assert code(lambda: open_image(enc)) == "datapath.encrypted"
    ext = qemu_img_create(tmp_path / "ext.qcow2", "qcow2", "1M", f"data_file={tmp_path / 'ext.data'}")
    assert code(lambda: open_image(ext)) == "datapath.data-file"
    dmg = tmp_path / "d.dmg"
    dmg.write_bytes(build_dmg(bytes(range(256)) * 64))
    assert code(lambda: open_image(dmg)) == "datapath.unsupported-format"


def test_zstd_without_its_extra_is_a_named_error(tmp_path, monkeypatch):
    pytest.importorskip("zstandard")
    image = written_qcow2(tmp_path / "z.qcow2", 65536, "compression_type=zstd")
    monkeypatch.setitem(sys.modules, "zstandard", None)  # as if not installed: importing it fails
    with pytest.raises(ProbeError) as caught:
        read_all(image)
    assert caught.value.code == "datapath.missing-extra" and "storprobe[zstd]" in str(caught.value)


# ---- tables QEMU refuses: named errors here, I/O errors there -----------------------------------------------


def patched(image: Path, at: int, value: int, fmt: str = ">Q") -> Path:
    data = bytearray(image.read_bytes())
    struct.pack_into(fmt, data, at, value)
    image.write_bytes(bytes(data))
    return image


def entry(image: Path, at: int) -> int:
    return get(image.read_bytes(), at, "Q")


def assert_named_and_qemu_fails(image: Path, expected: str, *, status_too: bool = True) -> None:
    """Reading ``image`` is the named error ``expected`` here and an error in QEMU;
    with ``status_too`` its block status is that error as well (else only its read is)."""
    assert code(lambda: read_all(image)) == expected
    if status_too:
        with open_image(image) as disk:
            assert code(lambda: list(disk.block_status())) == expected
    qemu_fails_to_read(image)


def test_unaligned_l2_table(tmp_path):
    image = written_qcow2(tmp_path / "a.qcow2", 65536)
    at = l1_entry_at(image.read_bytes(), 0)
    patched(image, at, entry(image, at) + 512)
    assert_named_and_qemu_fails(image, "qcow2.l2-offset-unaligned")


def test_unaligned_data_cluster(tmp_path):
    image = written_qcow2(tmp_path / "a.qcow2", 65536)
    at = l2_entry_at(image.read_bytes(), 0)
    patched(image, at, entry(image, at) + 4096)
    assert_named_and_qemu_fails(image, "qcow2.cluster-offset-unaligned")


def test_zero_flag_in_a_version_2_image(tmp_path):
    image = written_qcow2(tmp_path / "a.qcow2", 65536, "compat=0.10")
    at = l2_entry_at(image.read_bytes(), 0)
    patched(image, at, entry(image, at) | L2_ZERO)
    assert_named_and_qemu_fails(image, "qcow2.zero-cluster-in-v2")


@pytest.mark.parametrize("allocated", [True, False])
def test_invalid_subcluster_bitmaps(tmp_path, allocated):
    """An allocated cluster with a subcluster both allocated and zero; an
    unallocated one with allocated subclusters."""
    image = written_qcow2(tmp_path / "e.qcow2", 65536, "extended_l2=on", size=1024 * 1024,
                          script=("write -P 1 0 64k",))
    at = l2_entry_at(image.read_bytes(), 0 if allocated else 65536)
    patched(image, at + 8, 0x1_0000_0001 if allocated else 0x1)
    assert_named_and_qemu_fails(image, "qcow2.invalid-subclusters")


def compressed_entry(image: Path, cluster: int, guest: int) -> tuple[int, int, int]:
    """(L2 entry position, host offset, sectors) of the compressed cluster at ``guest``."""
    at = l2_entry_at(image.read_bytes(), guest)
    value = entry(image, at)
    assert value & L2_COMPRESSED
    shift = 62 - (cluster.bit_length() - 1 - 8)
    return at, value & ((1 << shift) - 1), ((value >> shift) & ((1 << (cluster.bit_length() - 9)) - 1)) + 1


def test_corrupt_compressed_data(tmp_path):
    image = written_qcow2(tmp_path / "a.qcow2", 65536)
    _, host, _ = compressed_entry(image, 65536, 6 * 65536)
    patched(image, host, 0xFFFFFFFFFFFFFFFF)
    assert code(lambda: read_all(image)) == "qcow2.compressed-corrupt"
    qemu_fails_to_read(image)


def test_short_inflate_is_an_error_never_a_shift(tmp_path):
    """The compressed stream ends before a whole cluster: QEMU's EIO, our named error."""
    image = written_qcow2(tmp_path / "a.qcow2", 65536, script=("write -c -P 0x33 0 64k",))
    at, host, sectors = compressed_entry(image, 65536, 0)
    stream = image.read_bytes()[host : host + sectors * 512]
    import zlib

    half = zlib.decompressobj(-12).decompress(stream, 65536)[:30000]
    short = zlib.compressobj(9, zlib.DEFLATED, -12)
    patched(image, host, 0, ">B")
    data = bytearray(image.read_bytes())
    body = short.compress(half) + short.flush()
    data[host : host + len(body)] = body
    image.write_bytes(bytes(data))
    assert code(lambda: read_all(image)) == "qcow2.compressed-short"
    qemu_fails_to_read(image)
    del at


def test_zstd_frame_longer_than_a_cluster(tmp_path):
    zstandard = pytest.importorskip("zstandard")
    image = written_qcow2(tmp_path / "z.qcow2", 65536, "compression_type=zstd", script=("write -c -P 0x33 0 64k",))
    _, host, sectors = compressed_entry(image, 65536, 0)
    frame = zstandard.ZstdCompressor().compress(b"\x33" * 65536 + b"\x34" * 100)
    assert len(frame) <= sectors * 512
    data = bytearray(image.read_bytes())
    data[host : host + len(frame)] = frame
    image.write_bytes(bytes(data))
    assert code(lambda: read_all(image)) == "qcow2.compressed-too-long"
    qemu_fails_to_read(image)


def test_unknown_incompatible_feature(tmp_path):
    image = written_qcow2(tmp_path / "a.qcow2", 65536)
    patched(image, INCOMPAT, get(image.read_bytes(), INCOMPAT, "Q") | 1 << 40)
    assert code(lambda: read_all(image)) == "qcow2.unknown-feature"
    qemu_fails_to_read(image)


# ---- past the end of the file: zeros, as QEMU reads them ----------------------------------------------------


def test_tables_and_clusters_past_the_end_read_as_zeros(tmp_path):
    image = written_qcow2(tmp_path / "a.qcow2", 65536)
    size = image.stat().st_size
    at = l2_entry_at(image.read_bytes(), 0)
    patched(image, at, (size + 10 * 65536) | 1 << 63)  # a data cluster past the end
    l1 = l1_entry_at(image.read_bytes(), 0)
    moved = tmp_path / "b.qcow2"
    moved.write_bytes(image.read_bytes())
    patched(moved, l1, (size + 20 * 65536) | 1 << 63)  # an L2 table past the end
    for path in (image, moved):
        assert_reads_as_qemu(path, tmp_path)


# ---- any bytes in the tables: a named error or a read, never another exception --------------------------------


@pytest.fixture(scope="module")
def small_image(tmp_path_factory) -> bytes:
    path = written_qcow2(tmp_path_factory.mktemp("fuzz") / "s.qcow2", 512, size=256 * 1024)
    return path.read_bytes()


@given(edits=st.lists(st.tuples(st.integers(0, 1 << 16), st.integers(0, 2**64 - 1)), min_size=1, max_size=4))
def test_broken_tables_raise_named_errors_only(small_image, tmp_path_factory, edits):
    data = bytearray(small_image)
    l1 = get(small_image, 40, "Q")
    tables = range(l1, len(data) - 8)
    for position, value in edits:
        at = tables[position % len(tables)] & ~7
        struct.pack_into(">Q", data, at, value)
    path = tmp_path_factory.mktemp("case") / "m.qcow2"
    path.write_bytes(bytes(data))
    try:
        with open_image(path) as disk:
            statuses = list(disk.block_status())
            assert sum(s.length for s in statuses) == disk.size
            assert len(disk.read()) == disk.size
    except ProbeError:
        pass


# ---- qcow (version 1) ------------------------------------------------------------------------------------------

QCOW_WRITES = ("write -P 1 0 64k", "write -P 2 200k 5k", "write -c -P 3 1M 4k", "write -c -P 4 1028k 4k",
               "write -P 5 3M 512")


def qcow_v1(path: Path, *options: str) -> Path:
    qemu_img_create(path, "qcow", "4M", *options)
    qemu_io(path, *QCOW_WRITES)
    return path


def qcow_l2_entry(image: Path, guest: int) -> int:
    """Where the L2 entry of ``guest`` lies in a qcow image of 4 KiB clusters and 512-entry L2 tables."""
    data = image.read_bytes()
    l1 = get(data, 40, "Q") + 8 * (guest >> 21)
    return get(data, l1, "Q") + 8 * (guest >> 12 & 511)


def test_qcow_reads_and_chains(tmp_path):
    base = qcow_v1(tmp_path / "base.qcow")
    assert_reads_as_qemu(base, tmp_path)
    top = qemu_img_create(tmp_path / "top.qcow", "qcow", "5M", f"backing_file={base}", "backing_fmt=qcow")
    qemu_io(top, "write -P 7 60k 8k", "write -P 8 2M 4k")  # qcow takes no compressed write over a backing
    assert_reads_as_qemu(top, tmp_path, backing=LOCAL)
    assert code(lambda: open_image(top)) == "backing.refused"


def test_qcow_data_cluster_off_a_sector_boundary(tmp_path):
    image = qcow_v1(tmp_path / "v1.qcow")
    at = qcow_l2_entry(image, 4096)
    patched(image, at, entry(image, at) + 0x100)
    assert_named_and_qemu_fails(image, "qcow.cluster-offset-unaligned", status_too=False)


def test_qcow_corrupt_compressed_cluster(tmp_path):
    image = qcow_v1(tmp_path / "v1.qcow")
    value = entry(image, qcow_l2_entry(image, 1 << 20))
    assert value & 1 << 63
    patched(image, value & ((1 << 51) - 1), 0xFFFFFFFFFFFFFFFF)
    assert_named_and_qemu_fails(image, "qcow.compressed-corrupt", status_too=False)


def test_the_largest_compressed_input_is_two_clusters(tmp_path):
    """A compressed descriptor's sector count at its maximum makes QEMU read two
    clusters of input; the stream ends inside, so both read the same cluster."""
    image = written_qcow2(tmp_path / "a.qcow2", 65536, script=("write -c -P 0x33 0 64k",))
    at, _, _ = compressed_entry(image, 65536, 0)
    shift = 62 - (16 - 8)
    patched(image, at, entry(image, at) | ((1 << (16 - 8)) - 1) << shift)
    assert compressed_entry(image, 65536, 0)[2] * 512 == 2 * 65536
    assert assert_reads_as_qemu(image, tmp_path)[:65536] == b"\x33" * 65536


def test_a_zstd_frame_shorter_than_a_cluster(tmp_path):
    zstandard = pytest.importorskip("zstandard")
    image = written_qcow2(tmp_path / "z.qcow2", 65536, "compression_type=zstd", script=("write -c -P 0x33 0 64k",))
    _, host, _ = compressed_entry(image, 65536, 0)
    frame = zstandard.ZstdCompressor().compress(b"\x33" * 60000)
    data = bytearray(image.read_bytes())
    data[host : host + len(frame)] = frame
    image.write_bytes(bytes(data))
    assert code(lambda: read_all(image)) == "qcow2.compressed-short"
    qemu_fails_to_read(image)


class Stuck:
    """A block map that breaks the contract: an extent that does not move on."""

    def extents(self, start, length, *, want_zero=True):
        while True:
            yield Extent(start, 0, True, False, 0)

    def read(self, extent, offset, length):
        return bytes(length)


def test_a_map_that_does_not_progress_is_a_named_error(tmp_path):
    """The core checks every extent a row's map gives: each non-empty and where
    the last one ended, so no map can loop forever or skip bytes."""
    image = written_qcow2(tmp_path / "a.qcow2", 65536)
    layers = open_layers(image)
    disk = GuestDisk([layers[0]._replace(map=Stuck())])
    assert code(lambda: disk.read(10)) == "plugin-error"
    assert code(lambda: list(disk.block_status())) == "plugin-error"
    disk.close()


def test_a_backing_file_that_cannot_be_read_is_a_backing_error(tmp_path):
    """As in chains: the backing's own error, prefixed (``backing.CODE``), whatever the rule."""
    base = qemu_img_create(tmp_path / "base.qcow2", "qcow2", "1M")
    top = qemu_img_create(tmp_path / "top.qcow2", "qcow2", "1M", f"backing_file={base}", "backing_fmt=qcow2")
    patched(base, 20, 30, ">I")  # cluster_bits
    assert code(lambda: open_image(top, backing=LOCAL)) == "backing.qcow2.cluster-bits"
    enc = tmp_path / "enc.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", "--object", "secret,id=s0,data=secret", "-o",
        "encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=10", enc, "1M")
    rebase_unsafe(top, str(enc), "qcow2")
    assert code(lambda: open_image(top, backing=LOCAL)) == "backing.datapath.encrypted"
    assert code(lambda: open_image(enc, backing=LOCAL)) == "datapath.encrypted"  # the top's own, unprefixed


def test_a_corrupt_compressed_cluster_fails_only_its_own_read(tmp_path):
    """Compressed clusters are inflated in batches; an error belongs to its cluster:
    the one before it still reads, as QEMU reads it."""
    image = written_qcow2(tmp_path / "a.qcow2", 65536, script=("write -c -P 0x33 0 64k", "write -c -P 0x34 64k 64k"))
    _, host, _ = compressed_entry(image, 65536, 65536)
    patched(image, host, 0xFFFFFFFFFFFFFFFF)
    with open_image(image) as disk:
        assert disk.pread(0, 65536) == b"\x33" * 65536
        assert code(lambda: disk.pread(65536, 10)) == "qcow2.compressed-corrupt"
        assert code(lambda: disk.pread(65530, 10)) == "qcow2.compressed-corrupt"
    qemu_io(image, "read -P 0x33 0 64k")
    qemu_fails_to_read(image)
