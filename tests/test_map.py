"""``storprobe map`` against ``qemu-img map`` (QEMU 7.2), byte for byte.

Images are made here by qemu-img and written by qemu-io (data, partial writes,
``write -z``/``-zu``, compressed writes, discards) across cluster sizes, both
qcow2 versions, extended L2, zlib and zstd, preallocated metadata, backing
chains and sparse raw files; the JSON (and the human table) must be the text
qemu-img prints.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
from pathlib import Path

import pytest

from storprobe.cli import main
from storprobe.datapath import IGNORE, LOCAL, open_image

from builders import guest_writes, l2_entry_at, written_qcow2
from oracle import qemu_guest_bytes, qemu_img_create, qemu_io, qemu_map, reads_as_qemu, rebase_unsafe, require

CLUSTERS = (512, 4096, 65536, 2 * 1024 * 1024)


def ours(capsys: pytest.CaptureFixture[str], *args: str | Path) -> tuple[int, str, str]:
    """``storprobe map ARGS``: its status, stdout and stderr."""
    status = main(["map", *map(str, args)])
    out, err = capsys.readouterr()
    return status, out, err


def assert_same_map(capsys: pytest.CaptureFixture[str], image: Path, fmt: str | None = None) -> str:
    """Our JSON map of ``image`` is qemu-img's text; and the human table too,
    or both fail at the same line when the image holds compressed clusters."""
    theirs = qemu_map(image, fmt)
    assert theirs.returncode == 0, theirs.stderr
    status, out, err = ours(capsys, *(["-f", fmt] if fmt else []), "--output", "json", image)
    assert (status, err) == (0, "")
    assert out == theirs.stdout.decode()
    human = qemu_map(image, fmt, output="human")
    status, out, err = ours(capsys, *(["-f", fmt] if fmt else []), image)
    assert out == human.stdout.decode()
    assert status == (0 if human.returncode == 0 else 1)
    if status:
        assert b"compressed clusters" in human.stderr and "compressed clusters" in err
    return theirs.stdout.decode()


@pytest.mark.parametrize("cluster", CLUSTERS)
@pytest.mark.parametrize("compat", ["1.1", "0.10"])
def test_qcow2_cluster_sizes_and_versions(tmp_path, capsys, cluster, compat):
    image = written_qcow2(tmp_path / "a.qcow2", cluster, f"compat={compat}")
    text = assert_same_map(capsys, image)
    assert '"data": true' in text and '"present": false' in text  # the script left both kinds


@pytest.mark.parametrize("compression", ["zlib", "zstd"])
def test_compressed_clusters(tmp_path, capsys, compression):
    pytest.importorskip("zstandard") if compression == "zstd" else None
    image = written_qcow2(tmp_path / "c.qcow2", 65536, f"compression_type={compression}")
    text = assert_same_map(capsys, image)
    assert '"zero": false, "data": true}' in text  # compressed: data with no offset


def test_compressed_key_as_qemu_8_2_prints_it(tmp_path, capsys):
    image = written_qcow2(tmp_path / "c.qcow2", 65536)
    status, out, _ = ours(capsys, "--output", "json", "--compressed", image)
    plain = qemu_map(image).stdout.decode()
    assert status == 0
    assert out.count('"compressed": true') == 1  # the two adjacent compressed clusters are one range
    assert out.replace(', "compressed": true', "").replace(', "compressed": false', "") == plain
    status, _, err = ours(capsys, "--compressed", image)
    assert status == 2 and "--compressed" in err


SUBCLUSTER_WRITES = (
    "write -P 0x11 0 4k",
    "write -z 8k 2k",
    "write -P 0x22 14k 1k",
    "write -P 0x33 64k 64k",
    "write -zu 128k 64k",
    "write -z 196k 6k",
    "discard 66k 2k",
    "write -c -P 0x44 256k 64k",
    "write -P 0x55 1022k 2k",
)


@pytest.mark.parametrize("with_backing", [False, True])
def test_extended_l2_subclusters(tmp_path, capsys, with_backing):
    options = ["extended_l2=on"]
    if with_backing:
        base = written_qcow2(tmp_path / "base.qcow2", 65536, size=1024 * 1024)
        options += [f"backing_file={base}", "backing_fmt=qcow2"]
    image = written_qcow2(tmp_path / "ext.qcow2", 65536, *options, size=1024 * 1024, script=SUBCLUSTER_WRITES)
    assert_same_map(capsys, image)


@pytest.mark.parametrize("cluster", [512, 65536, 2 * 1024 * 1024])
@pytest.mark.parametrize("preallocation", ["metadata", "falloc", "full"])
def test_preallocation(tmp_path, capsys, cluster, preallocation):
    """Preallocated metadata: every cluster allocated over a sparse file, whose
    holes QEMU (having counted refcounts against the file's blocks) reports as zeros."""
    image = written_qcow2(tmp_path / "p.qcow2", cluster, f"preallocation={preallocation}",
                          script=guest_writes(cluster, compressed=False))
    assert_same_map(capsys, image)


def test_preallocated_metadata_without_writes(tmp_path, capsys):
    image = qemu_img_create(tmp_path / "p.qcow2", "qcow2", "64M", "preallocation=metadata")
    text = assert_same_map(capsys, image)
    assert '"zero": true, "data": true' in text


def chain(tmp_path: Path, depth: int) -> Path:
    """A chain of ``depth`` images below the top one, each written over the one
    below and of another size (a backing shorter and longer than its child)."""
    sizes = [3 * 65536 * 16, 65536 * 16, 5 * 65536 * 16, 2 * 65536 * 16]
    below: Path | None = None
    for level in range(depth + 1):
        path = tmp_path / f"layer{level}.qcow2"
        options = [f"backing_file={below.name}", "backing_fmt=qcow2"] if below else []
        script = (f"write -P {0x10 + level} {level * 65536 + 4096} 65536", f"write -z {(level + 3) * 65536} 65536",
                  f"discard {(level + 6) * 65536} 65536", f"write -c -P 0x7{level} {(level + 9) * 65536} 65536")
        qemu_img_create(path, "qcow2", str(sizes[level]), *options)
        qemu_io(path, *script)
        below = path
    assert below is not None
    return below


@pytest.mark.parametrize("depth", [1, 2, 3])
def test_backing_chains(tmp_path, capsys, depth):
    top = chain(tmp_path, depth)
    text = assert_same_map(capsys, top)
    assert f'"depth": {depth}' in text


def test_relative_backing_names_resolve_against_the_image(tmp_path, capsys, monkeypatch):
    top = chain(tmp_path, 2)
    monkeypatch.chdir(tmp_path)
    assert_same_map(capsys, Path(top.name))


def test_no_backing_reads_the_top_alone(tmp_path, capsys):
    """--no-backing is QEMU's ``backing: null``: unallocated ranges are zeros at depth 0."""
    top = chain(tmp_path, 2)
    spec = json.dumps({"driver": "qcow2", "file": {"driver": "file", "filename": str(top)}, "backing": None})
    theirs = subprocess.run([require("qemu-img"), "map", "--output=json", f"json:{spec}"], capture_output=True,
                            check=True)
    status, out, _ = ours(capsys, "--output", "json", "--no-backing", top)
    assert status == 0 and out == theirs.stdout.decode()
    assert '"depth": 1' not in out


def test_raw_holes_and_a_partial_last_sector(tmp_path, capsys):
    raw = tmp_path / "sparse.raw"
    with open(raw, "wb") as f:
        f.truncate(10 * 1024 * 1024 + 1000)
        for offset in (0, 3 * 1024 * 1024, 10 * 1024 * 1024 + 200):
            f.seek(offset)
            f.write(b"x" * 5000)
    assert_same_map(capsys, raw, "raw")
    empty = tmp_path / "empty.raw"
    empty.write_bytes(b"")
    assert_same_map(capsys, empty, "raw")


def test_qcow2_over_a_raw_backing(tmp_path, capsys):
    raw = tmp_path / "base.raw"
    with open(raw, "wb") as f:
        f.truncate(1024 * 1024)
        f.seek(300 * 1024)
        f.write(b"y" * 100 * 1024)
    top = qemu_img_create(tmp_path / "top.qcow2", "qcow2", "2M", f"backing_file={raw}", "backing_fmt=raw")
    qemu_io(top, "write -P 1 256k 64k", "write -zu 320k 64k")
    assert_same_map(capsys, top)


def test_an_error_is_one_line_and_status_1(tmp_path, capsys):
    top = chain(tmp_path, 1)
    rebase_unsafe(top, "nbd://example.invalid/disk", "qcow2")
    status, out, err = ours(capsys, "--output", "json", top)
    assert status == 1 and err.count("\n") == 1 and err.startswith(f"storprobe: {top}: ")
    assert "only local files" in err


def test_block_status_covers_the_disk_in_order(tmp_path):
    top = chain(tmp_path, 2)
    with open_image(top, backing=LOCAL) as disk:
        statuses = list(disk.block_status())
        assert statuses[0].start == 0 and sum(s.length for s in statuses) == disk.size
        assert all(a.start + a.length == b.start for a, b in zip(statuses, statuses[1:], strict=False))
        assert {s.depth for s in statuses} == {0, 1, 2}
        assert any(s.compressed and s.offset is None and s.data for s in statuses)
        middle = list(disk.block_status(65536 + 100, 3 * 65536))
        assert middle[0].start == 65536 + 100 and sum(s.length for s in middle) == 3 * 65536
    with open_image(top, backing=IGNORE) as alone:
        assert {s.depth for s in alone.block_status()} == {0}


def test_storprobe_command_prints_the_same(tmp_path):
    """The installed command, end to end, on one image."""
    image = written_qcow2(tmp_path / "a.qcow2", 65536)
    proc = subprocess.run([require("storprobe"), "map", "--output=json", str(image)], capture_output=True,
                          env={**os.environ, "STORPROBE_DISABLE_PLUGIN_AUTOLOAD": "1"}, check=False)
    assert proc.returncode == 0 and proc.stdout == qemu_map(image).stdout


def test_entries_qemu_reads_despite_their_flags(tmp_path, capsys):
    """A data cluster without COPIED (a snapshot shares it) and one with a reserved
    bit set: QEMU's reader masks both, and so does ours (verify reports them)."""
    image = written_qcow2(tmp_path / "a.qcow2", 4096, script=("write -P 1 0 64k",))
    data = bytearray(image.read_bytes())
    for cluster, clear, add in ((3, 1 << 63, 0), (7, 0, 1 << 5), (8, 0, 1 << 58)):
        at = l2_entry_at(bytes(data), cluster * 4096)
        value = struct.unpack_from(">Q", data, at)[0]
        struct.pack_into(">Q", data, at, (value & ~clear) | add)
    image.write_bytes(bytes(data))
    assert_same_map(capsys, image)
    with open_image(image) as disk:
        assert disk.read() == qemu_guest_bytes(image, tmp_path)


QCOW_WRITES = ("write -P 1 0 64k", "write -P 2 200k 5k", "write -c -P 3 1M 4k", "write -c -P 4 1028k 4k",
               "write -P 5 3M 512", "write -P 6 3076k 8k")


def test_qcow_version_1(tmp_path, capsys):
    image = qemu_img_create(tmp_path / "v1.qcow", "qcow", "4M")
    qemu_io(image, *QCOW_WRITES)
    assert_same_map(capsys, image)
    top = qemu_img_create(tmp_path / "top.qcow", "qcow", "5M", f"backing_file={image}", "backing_fmt=qcow")
    qemu_io(top, "write -P 7 60k 8k", "write -P 8 2M 4k")  # qcow takes no compressed write over a backing
    text = assert_same_map(capsys, top)
    assert '"depth": 1' in text


def test_qcow_cluster_off_its_boundary_is_mapped_as_qemu_maps_it(tmp_path, capsys):
    """QEMU's qcow map offset is the cluster's OR the offset into it, even for a
    cluster that does not start on one (its read fails; see test_open_image)."""
    image = qemu_img_create(tmp_path / "v1.qcow", "qcow", "4M")
    qemu_io(image, *QCOW_WRITES)
    data = bytearray(image.read_bytes())
    l1 = struct.unpack_from(">Q", data, 40)[0]
    l2 = struct.unpack_from(">Q", data, l1)[0]
    entry = struct.unpack_from(">Q", data, l2 + 8)[0]  # the second cluster, guest offset 4 KiB
    struct.pack_into(">Q", data, l2 + 8, entry + 0xA00)
    image.write_bytes(bytes(data))
    status, out, _ = ours(capsys, "--output", "json", image)
    assert status == 0 and out == qemu_map(image).stdout.decode()


@pytest.mark.parametrize("kind", ["v3", "v2", "extended"])
def test_mutated_tables_agree_with_qemu(tmp_path, capsys, kind):
    """A seeded campaign over the L1, L2 and refcount tables of a small image:
    where qemu-img maps and reads the result, the text and the bytes are the same;
    where it fails, ours is a named error (QEMU's I/O error and ours agree)."""
    import random

    if kind == "extended":
        source = written_qcow2(tmp_path / "seed.qcow2", 65536, "extended_l2=on", size=1024 * 1024,
                               script=SUBCLUSTER_WRITES)
    else:
        source = written_qcow2(tmp_path / "seed.qcow2", 4096, f"compat={'1.1' if kind == 'v3' else '0.10'}")
    seed = source.read_bytes()
    l1, reftable = struct.unpack_from(">Q", seed, 40)[0], struct.unpack_from(">Q", seed, 48)[0]
    tables = sorted({l1, reftable} | {struct.unpack_from(">Q", seed, l1 + 8 * i)[0] & 0x00FFFFFFFFFFFE00
                                      for i in range(struct.unpack_from(">I", seed, 36)[0])} - {0})
    rng = random.Random(f"{kind}12")
    values = (0, 1, 1 << 62, 1 << 63, 0x200, 0x201, 0x1000, 0xFFFFFFFFFFFFFFFF, len(seed), 10 * len(seed))
    agreed = {"both read": 0, "both refuse to read": 0, "both refuse to map": 0}
    for case in range(40):
        data = bytearray(seed)
        for _ in range(rng.randint(1, 3)):
            at = rng.choice(tables) + 8 * rng.randrange(16)
            value = rng.choice(values) | (rng.getrandbits(64) & (0x0000_00FF_FFFF_FE00 if rng.random() < 0.3 else 0))
            if rng.random() < 0.2:  # flip bits of the entry there instead
                value ^= struct.unpack_from(">Q", seed, at)[0]
            struct.pack_into(">Q", data, at, value)
        image = tmp_path / f"m{case}.qcow2"
        image.write_bytes(bytes(data))
        theirs = qemu_map(image)
        status, out, err = ours(capsys, "--output", "json", image)
        if theirs.returncode == 0:
            assert (status, out) == (0, theirs.stdout.decode()), f"case {case}: {err}"
            agreed["both read" if reads_as_qemu(image, tmp_path, case) else "both refuse to read"] += 1
        else:
            assert status == 1 and err.startswith("storprobe: "), f"case {case}: QEMU refuses, we map"
            agreed["both refuse to map"] += 1
    assert all(agreed.values()), agreed  # the campaign reached both outcomes


def test_unreadable_paths_are_one_line_naming_them_once(tmp_path, capsys):
    missing = tmp_path / "missing.qcow2"
    status, out, err = ours(capsys, missing)
    assert (status, out, err) == (1, "", f"storprobe: {missing}: No such file or directory\n")
    status, _, err = ours(capsys, tmp_path)
    assert status == 1
    assert err == f"storprobe: {tmp_path}: is not a regular file or a block device: no guest data to read\n"
    top = qemu_img_create(tmp_path / "top.qcow2", "qcow2", "1M")
    rebase_unsafe(top, "gone.qcow2", "qcow2")
    status, _, err = ours(capsys, top)
    assert status == 1 and f"backing file {tmp_path / 'gone.qcow2'} of {top}: No such file or directory" in err
