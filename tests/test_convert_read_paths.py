"""The fast paths of ``storprobe convert`` and the data path under it, each against
qemu-img: zero blocks found from sampled bytes (a block whose only non-zero byte
is one no sample looks at is still data), data read straight into the chunk
buffer (clusters past the end of the file read as zeros), and compressed clusters
inflated in batches read ahead on a pool of threads (across L2 tables, with
uncompressed and unallocated clusters between; an error in a batch read ahead
belongs to its own cluster)."""

from __future__ import annotations

import os
import random
import struct
import zlib
from pathlib import Path

import pytest

from storprobe.convert import SPARSE, convert_to_raw
from storprobe.datapath import open_image
from storprobe.errors import ProbeError

from builders import l2_entry_at
from oracle import qemu_img_create, qemu_io, run

KiB, MiB = 1 << 10, 1 << 20


def allocated_blocks(path: Path) -> list[int]:
    """The 4 KiB blocks of ``path`` the file system holds, from SEEK_DATA/SEEK_HOLE."""
    blocks, size = [], path.stat().st_size
    with open(path, "rb") as f:
        at = 0
        while at < size:
            try:
                at = os.lseek(f.fileno(), at, os.SEEK_DATA)
            except OSError:
                break
            hole = os.lseek(f.fileno(), at, os.SEEK_HOLE)
            blocks += range(at // SPARSE, -(-hole // SPARSE))
            at = hole
    return blocks


def converted(source: Path, tmp: Path, fmt: str | None = None) -> tuple[Path, Path]:
    """``source`` converted by qemu-img and by storprobe: (theirs, ours), equal by cmp."""
    theirs, mine = tmp / f"{source.stem}.qemu.raw", tmp / f"{source.stem}.ours.raw"
    run("qemu-img", "convert", *(("-f", fmt) if fmt else ()), "-O", "raw", source, theirs)
    with open_image(source, fmt) as disk:
        convert_to_raw(disk, mine)
    run("cmp", theirs, mine)
    return theirs, mine


def test_a_block_is_a_hole_only_when_every_byte_is_zero(tmp_path):
    """One non-zero byte at each offset of a block, sampled or not, keeps the block;
    blocks of zeros between them, alone and in runs, become holes (as qemu-img's)."""
    offsets = [0, 1, 100, 511, 512, 513, 2047, 2048, 3000, 4094, 4095]
    data = bytearray(SPARSE * (3 * len(offsets) + 8))
    for n, offset in enumerate(offsets):
        data[3 * n * SPARSE + offset] = 0x5A  # block 3n holds one byte; 3n+1 and 3n+2 are zeros
    data[-4 * SPARSE :] = os.urandom(4 * SPARSE)
    source = tmp_path / "bytes.raw"
    source.write_bytes(bytes(data))
    theirs, mine = converted(source, tmp_path, "raw")
    expected = [at // SPARSE for at in range(0, len(data), SPARSE) if any(data[at : at + SPARSE])]
    assert allocated_blocks(mine) == expected == allocated_blocks(theirs)


def test_data_not_aligned_on_4k_keeps_qemu_img_holes(tmp_path):
    """512-byte clusters: data runs start and end between 4 KiB boundaries, with
    zero sectors and blocks inside them; the same bytes, no block more than qemu-img's."""
    image = qemu_img_create(tmp_path / "small.qcow2", "qcow2", "4M", "cluster_size=512")
    qemu_io(image, "write -P 0x61 1536 5120", "write -P 0 6656 8192", "write -P 0x62 14848 512",
            "write -P 0x63 65024 1024", "write -z 70000 4096", "write -P 0x64 1048064 9216")
    theirs, mine = converted(image, tmp_path)
    assert set(allocated_blocks(mine)) <= set(allocated_blocks(theirs))


def test_data_clusters_past_the_end_of_the_file_read_as_zeros(tmp_path):
    """Read straight into the chunk buffer, a data cluster the file ends inside
    gives its bytes up to the end of the file and zeros after, as QEMU reads it."""
    image = qemu_img_create(tmp_path / "cut.qcow2", "qcow2", "4M")
    qemu_io(image, "write -P 0x71 0 1M", "write -P 0x72 3M 1M")
    with open(image, "r+b") as f:
        f.truncate(image.stat().st_size - 65536 - 1000)  # the last cluster gone, the one before it cut short
    theirs, mine = converted(image, tmp_path)
    tail = mine.read_bytes()[3 * MiB :]
    assert tail.count(b"\x72") == MiB - 65536 - 1000 and tail.strip(b"\x72") == bytes(65536 + 1000)
    buffer = bytearray(b"\xee" * MiB)  # what was in a reused buffer is overwritten, zeros included
    with open_image(image) as disk:
        disk.seek(3 * MiB)
        assert disk.readinto(buffer) == MiB
    assert buffer == tail


def compressible(seed: int, size: int) -> bytes:
    """Bytes that deflate to about half: each 4 KiB block half random, half one repeated byte."""
    rng = random.Random(seed)
    return b"".join(rng.randbytes(2 * KiB) + bytes([n % 251 + 1]) * (2 * KiB) for n in range(size // (4 * KiB)))


@pytest.fixture(scope="module")
def guest(tmp_path_factory) -> Path:
    """18 MiB of guest data: compressible runs (several inflate batches of 64 KiB
    clusters, two L2 tables of 4 KiB ones), an incompressible cluster qemu-img keeps
    uncompressed, and ranges of zeros it leaves unallocated."""
    rng = random.Random(7)
    data = bytearray(compressible(1, 18 * MiB))
    data[11 * MiB : 11 * MiB + 64 * KiB] = rng.randbytes(64 * KiB)  # stored as it is, between compressed ones
    data[9 * MiB : 10 * MiB] = bytes(MiB)
    data[13 * MiB + 12 * KiB : 13 * MiB + 20 * KiB] = bytes(8 * KiB)
    path = tmp_path_factory.mktemp("guest") / "guest.raw"
    path.write_bytes(bytes(data))
    return path


@pytest.mark.parametrize("cluster", [4096, 65536])
@pytest.mark.parametrize("compression", ["zlib", "zstd"])
def test_compressed_images_convert_as_qemu_img(guest, tmp_path, cluster, compression):
    if compression == "zstd":
        pytest.importorskip("zstandard")
    image = tmp_path / f"{compression}-{cluster}.qcow2"
    run("qemu-img", "convert", "-c", "-O", "qcow2", "-o", f"cluster_size={cluster},compression_type={compression}",
        guest, image)
    theirs, mine = converted(image, tmp_path)
    assert set(allocated_blocks(mine)) <= set(allocated_blocks(theirs))


def test_an_error_in_a_batch_read_ahead_belongs_to_its_cluster(guest, tmp_path):
    """Cluster 100 (in the second batch of 64, 64-127, inflated ahead while the
    first is read) is corrupt: clusters 0-99 and those after it read as the guest
    wrote them, it alone fails, as QEMU fails that read only."""
    image = tmp_path / "broken.qcow2"
    run("qemu-img", "convert", "-c", "-O", "qcow2", guest, image)
    raw = image.read_bytes()
    entry = struct.unpack_from(">Q", raw, l2_entry_at(raw, 100 * 65536))[0]
    assert entry & 1 << 62
    host = entry & ((1 << 54) - 1)
    broken = bytearray(raw)
    broken[host : host + 8] = b"\xff" * 8
    image.write_bytes(bytes(broken))
    expected = guest.read_bytes()
    with open_image(image) as disk:
        for n in range(200):
            if n == 100:
                with pytest.raises(ProbeError) as caught:
                    disk.pread(n * 65536, 65536)
                assert caught.value.code == "qcow2.compressed-corrupt"
            else:
                assert disk.pread(n * 65536, 65536) == expected[n * 65536 : (n + 1) * 65536], n
    with pytest.raises(zlib.error):  # the stream itself is broken, not only our reading of it
        zlib.decompressobj(-12).decompress(bytes(broken[host : host + 1024]), 65536)


def test_compressed_clusters_read_in_any_order(guest, tmp_path):
    """Batches read ahead, dropped by a jump elsewhere and their buffers reused by
    later batches: reads in order, backwards, shuffled and across cluster
    boundaries all give the guest's bytes."""
    image = tmp_path / "order.qcow2"
    run("qemu-img", "convert", "-c", "-O", "qcow2", guest, image)
    expected = guest.read_bytes()
    clusters = list(range(len(expected) // 65536))
    order = clusters + clusters[::-1] + random.Random(3).sample(clusters, len(clusters))
    with open_image(image) as disk:
        for n in order:
            assert disk.pread(n * 65536, 65536) == expected[n * 65536 : (n + 1) * 65536], n
        for at in (65530, 64 * 65536 - 7, 128 * 65536 - 1, 11 * MiB - 3):
            assert disk.pread(at, 100) == expected[at : at + 100], at
