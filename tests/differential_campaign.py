"""Differential campaign: mutate real images and compare storprobe with qemu-img.

    python3 tests/differential_campaign.py [--tables] [--count 5000] [--seed 1] [--keep DIR]

Each round takes a real image of a format qemu-img opens (the seeds the pytest
fuzz tests mutate: ``builders.real_images``), overwrites one to three fields (in
its first sector, its last sector or anywhere in the first MiB) with boundary or
random values, and asks both sides about the file, as that format:

- both describe it: the qemu-img JSON must be equal (else ``differ``);
- only qemu-img opens it: ``we-refuse`` with our error code;
- only storprobe describes it: ``qemu-refuses`` with qemu-img's reason.

It prints each new kind of outcome as it appears, with the file kept in
``--keep``, then how often each kind occurred. Kinds listed in ``KNOWN`` are
divergences on purpose (each with where the tests pin it); any other kind is a
finding: a missing rule, a rule QEMU does not have, or a difference in output.

``--tables`` mutates the block tables of images holding data instead (qcow2 v2,
v3, extended L2 and compressed clusters; qcow; VMDK sparse and
streamOptimized; VDI; QED; VHDX; VPC; parallels), found by parsing each
header: L1 and L2 tables, refcount table and blocks, grain directory and
tables, block allocation tables. One to three entries get boundary values,
another entry's value, a bit flipped or random bits; then ``qemu-img map
--output=json`` is compared with ``storprobe map`` (the text) and ``qemu-img
check --output=json`` with ``storprobe verify`` (the parsed report and exit
status). They agree when equal, or when QEMU fails (an I/O error, a refusal to
open or check) where we raise a named error; otherwise the kind is ``map-`` or
``check-`` ``differ``, ``we-refuse`` or ``qemu-refuses``. Any exception that
is not a named error is a ``crash``, never known.
"""

from __future__ import annotations

import argparse
import collections
import json
import random
import re
import struct
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

from storprobe import ProbeError, probe
from storprobe.datapath import LOCAL, open_image
from storprobe.qemu_map import json_lines
from storprobe.verify import NoCheck, to_json, verify

from builders import (
    BAT,
    INTERESTING,
    Vhdx,
    bitmap_dir,
    differencing_vhd,
    guest_writes,
    real_images,
    written_qcow2,
)
from oracle import ours, qemu_img_create, qemu_io, run

#: Formats left out: qemu-img reads iso and LUKS2 as raw, has no cow driver, and raw is any bytes.
SKIPPED = {"iso", "cow", "raw", "dir"}
_QUOTED = re.compile(r"'[^']*'")
_NUMBER = re.compile(r"\b(?=\w*\d)(0x)?[0-9a-fA-F]+\b")
#: Names qemu-img needs to pick a format by.
SUFFIXES = {"dmg": ".dmg"}
#: Divergences on purpose: (kind, format, our exact error code, or a part of
#: qemu-img's generalized reason) -> (why, the test that pins it). A
#: ``we-refuse`` kind matches only its own code, so a new rule that refuses
#: what QEMU opens is a finding until it is pinned and listed here.
KNOWN: dict[tuple[str, str, str], tuple[str, str]] = {
    ("we-refuse", "cloop", "wrong-format"): (
        "-f cloop skips QEMU's magic check; a row needs its signature",
        "test_cloop.py::test_forced_format_still_needs_the_signature",
    ),
    ("we-refuse", "cloop", "cloop.offsets-beyond-eof"): (
        "the offsets table must lie in the file", "test_cloop.py::test_offsets_table_past_end_of_file"
    ),
    ("we-refuse", "vdi", "vdi.image-type"): ("an image type VirtualBox does not define", "test_vdi.py::test_rule"),
    ("we-refuse", "vdi", "vdi.blocks-allocated"): (
        "more blocks allocated than the image has", "test_vdi.py::test_rule"
    ),
    ("we-refuse", "vdi", "vdi.bmap-beyond-file"): ("a block map past the end of the file", "test_vdi.py::test_rule"),
    ("we-refuse", "vdi", "vdi.data-beyond-file"): (
        "allocated blocks past the end of the file", "test_vdi.py::test_rule"
    ),
    ("we-refuse", "bochs", "bochs.catalog-beyond-eof"): (
        "a catalog past the end of the file", "test_bochs.py::test_catalog_past_end_of_file"
    ),
    ("we-refuse", "parallels", "parallels.bat-beyond-eof"): (
        "a BAT past the end of the file", "test_parallels.py::test_layout_outside_the_file"
    ),
    ("we-refuse", "parallels", "parallels.data-off-overlaps-bat"): (
        "a data area over the BAT", "test_parallels.py::test_layout_outside_the_file"
    ),
    ("we-refuse", "parallels", "parallels.data-off-beyond-eof"): (
        "a data area past the end of the file", "test_parallels.py::test_layout_outside_the_file"
    ),
    ("we-refuse", "qcow", "qcow.backing-name-offset"): (
        "a backing name outside the file", "test_qcow.py::test_backing_name_past_end_of_file"
    ),
    ("we-refuse", "qcow2", "qcow2.snapshot-table-beyond-file"): (
        "a snapshot table past the end of the file", "test_qcow2.py::test_broken_header"
    ),
    ("we-refuse", "qcow2", "qcow2.data-file-raw-without-data-file"): (
        "the spec forbids the bit alone", "test_qcow2.py::test_data_file_raw_bit_alone_is_refused"
    ),
    ("we-refuse", "luks", "luks.slot-overlaps-payload"): (
        "QEMU's 32-bit sum wraps", "test_luks.py::test_slot_far_past_the_payload_is_refused_where_qemu_wraps"
    ),
    ("we-refuse", "dmg", "dmg.header-size"): ("a trailer size QEMU does not check", "test_dmg.py::test_rule"),
    ("we-refuse", "dmg", "dmg.data-fork"): ("a data fork that ends past the trailer", "test_dmg.py::test_rule"),
    ("we-refuse", "dmg", "unsupported-version"): ("a trailer version QEMU ignores", "test_dmg.py::test_rule"),
    ("we-refuse", "vmdk", "unsupported-version"): (
        "version 0, which QEMU takes", "test_vmdk.py::test_bad_sparse_header"
    ),
    ("we-refuse", "vmdk", "vmdk.descriptor-offset"): (
        "an embedded descriptor QEMU never reads", "test_vmdk.py::test_bad_sparse_header"
    ),
    ("we-refuse", "vmdk", "vmdk.descriptor-size"): (
        "an embedded descriptor over 1 MiB", "test_vmdk.py::test_bad_sparse_header"
    ),
    ("we-refuse", "vmdk", "vmdk.descriptor-range"): (
        "an embedded descriptor past the end of the file", "test_vmdk.py::test_bad_sparse_header"
    ),
    ("we-refuse", "vmdk", "vmdk.grain-size"): (
        "a grain that is no power of two", "test_vmdk.py::test_bad_sparse_header"
    ),
    ("we-refuse", "vmdk", "vmdk.l1-size"): (
        "a directory size QEMU counts in 32 bits", "test_vmdk.py::test_bad_sparse_header"
    ),
    ("we-refuse", "vmdk", "vmdk.gd-offset"): (
        "a grain directory offset QEMU wraps", "test_vmdk.py::test_bad_sparse_header"
    ),
    ("we-refuse", "vmdk", "vmdk.rgd-offset"): (
        "a redundant directory offset QEMU wraps", "test_vmdk.py::test_bad_sparse_header"
    ),
    ("map-we-refuse", "vhdx", "vhdx.block-overlap"): (
        "a payload block inside the header section's first MiB, which QEMU reads from the headers",
        "test_differential.py::test_a_vhdx_block_in_the_header_section_is_refused_where_qemu_reads_it",
    ),
    ("check-we-refuse", "vhdx", "vhdx.block-overlap"): (
        "the same block, which QEMU's check does not look at",
        "test_differential.py::test_a_vhdx_block_in_the_header_section_is_refused_where_qemu_reads_it",
    ),
    ("check-we-refuse", "vhdx", "vhdx.truncated"): (
        "a BAT entry past the end of the file, which QEMU's check-only open reports as a corruption",
        "test_map_vdi_qed_vhdx.py::test_vhdx_truncated_bat_entry_is_refused_by_the_probe",
    ),
    ("qemu-refuses", "qcow2", "Unknown incompatible feature"): (
        "unknown incompatible bits are reported",
        "test_qcow2.py::test_unknown_incompatible_bits_are_reported_not_raised",
    ),
    ("qemu-refuses", "vmdk", "No such file or directory"): (
        "QEMU opens extent files; we never do", "test_vmdk.py::test_missing_extent_file_is_still_described"
    ),
    ("qemu-refuses", "qed", "QED table offset is invalid"): (
        "table_size 1, which QEMU's bounds check refuses", "test_qed.py::test_table_size_one_is_accepted"
    ),
    ("qemu-refuses", "vmdk", "Invalid argument"): (
        "an extent with no CID is still described", "test_vmdk.py::test_sparse_extent_of_a_split_disk"
    ),
}


def mutated(rng: random.Random, data: bytes) -> bytes:
    """``data`` with one to three fields overwritten."""
    buf = bytearray(data)
    for _ in range(rng.randint(1, 3)):
        width = rng.choice([1, 2, 4, 8])
        where = rng.random()
        if where < 0.7:
            at = rng.randrange(0, min(512, len(buf)))
        elif where < 0.85:
            at = len(buf) - rng.randrange(1, min(513, len(buf) + 1))
        else:
            at = rng.randrange(0, min(len(buf), 1 << 20))
        value = rng.choice(INTERESTING) if rng.random() < 0.5 else rng.getrandbits(8 * width)
        field = (value % (1 << 8 * width)).to_bytes(width, rng.choice(["big", "little"]))
        buf[at : at + width] = field[: len(buf) - at]
    return bytes(buf)


def outcome(path: Path, fmt: str) -> tuple[str, str, str] | None:
    """The kind of divergence between the two on ``path``, None when they agree."""
    qemu = subprocess.run(["qemu-img", "info", "--output=json", "-U", "-f", fmt, str(path)],
                          capture_output=True, text=True, errors="replace", check=False)
    try:
        mine: dict | None = ours(path, fmt)
        code = ""
    except ProbeError as exc:
        mine, code = None, exc.code
    if qemu.returncode == 0 and mine is not None:
        theirs = json.loads(qemu.stdout)
        differing = sorted(k for k in theirs.keys() | mine.keys() if theirs.get(k) != mine.get(k))
        return ("differ", fmt, ",".join(differing)) if differing else None
    if qemu.returncode == 0:
        return ("we-refuse", fmt, code)
    if mine is not None:
        reason = qemu.stderr.strip().splitlines()[-1] if qemu.stderr.strip() else "?"
        return ("qemu-refuses", fmt, _general(reason.split(f"'{path}': ", 1)[-1]))
    return None


def _general(reason: str) -> str:
    """qemu-img's reason without what varies from file to file: quoted names, numbers."""
    return _NUMBER.sub("N", _QUOTED.sub("'...'", reason))[:100]


def known(kind: tuple[str, str, str]) -> str | None:
    """Why ``kind`` diverges on purpose, None for a finding: our codes match
    exactly, qemu-img's reasons and differing keys (text) by a part of them."""
    for (k, fmt, part), (why, _) in KNOWN.items():
        if (k, fmt) == kind[:2] and (part == kind[2] if k.endswith("we-refuse") else part in kind[2]):
            return why
    return None


def qemu_formats(images: list[bytes]) -> list[tuple[str, bytes]]:
    """(format, bytes) of the images whose format qemu-img reads as we do."""
    seeds = []
    for data in images:
        try:
            fmt = probe(data).format
        except ProbeError:
            continue
        if fmt not in SKIPPED and not (fmt == "luks" and data[6:8] == b"\0\2"):
            seeds.append((fmt, data))
    return seeds


def divergences(
    seeds: list[tuple[str, bytes]], count: int, seed: int, scratch: Path
) -> Iterator[tuple[tuple[str, str, str], bytes]]:
    """Each divergence of ``count`` mutated images (reproducible from ``seed``), with the image."""
    rng = random.Random(seed)
    for number in range(count):
        fmt, data = rng.choice(seeds)
        path = scratch / f"m{number}{SUFFIXES.get(fmt, '')}"
        image = mutated(rng, data)
        path.write_bytes(image)
        kind = outcome(path, fmt)
        path.unlink()
        if kind is not None:
            yield kind, image


# ---- --tables: the block tables of images holding data -----------------------------------------------------

#: A table entry: (file offset, width in bytes, byte order).
Entry = tuple[int, int, str]
QCOW_WRITES = ("write -P 1 0 64k", "write -P 2 200k 5k", "write -c -P 3 1M 4k", "write -c -P 4 1028k 4k",
               "write -P 5 3M 512", "write -P 6 3076k 8k")
BLOCK_WRITES = ("write -P 0x11 0 64k", "write -P 0x22 3M 4k", "write -z 2M 64k", "write -P 0x33 1500k 8k",
                "discard 3M 1M", "write -P 0x44 5M 1M")
SUBCLUSTER_WRITES = ("write -P 0x11 0 4k", "write -P 0x22 66k 2k", "write -z 128k 64k", "write -zu 200k 8k",
                     "write -c -P 0x33 320k 64k", "write -P 0x44 512k 96k", "discard 540k 4k")


def table_seeds(d: Path) -> list[tuple[str, str, bytes]]:
    """(name, format, bytes) of small images with data in every kind of block, made by qemu-img and qemu-io."""
    raw = d / "pattern.raw"
    raw.write_bytes(b"".join(bytes([n % 251 + 1]) * 4096 if n % 3 else bytes(4096) for n in range(1024)))
    stream = d / "stream.vmdk"
    run("qemu-img", "convert", "-f", "raw", "-O", "vmdk", "-o", "subformat=streamOptimized", raw, stream)
    made = [
        ("qcow2-v3", "qcow2", written_qcow2(d / "v3.qcow2", 4096, "compat=1.1")),
        ("qcow2-v2", "qcow2", written_qcow2(d / "v2.qcow2", 4096, "compat=0.10")),
        ("qcow2-64k", "qcow2", written_qcow2(d / "64k.qcow2", 65536, "refcount_bits=1",
                                             script=guest_writes(65536))),
        ("qcow2-extended-l2", "qcow2", written_qcow2(d / "x.qcow2", 65536, "extended_l2=on", size=1 << 20,
                                                     script=SUBCLUSTER_WRITES)),
        ("vmdk-stream", "vmdk", stream),
    ]
    snapshots = written_qcow2(d / "snap.qcow2", 4096)
    run("qemu-img", "snapshot", "-c", "s1", snapshots)
    run("qemu-img", "bitmap", "--add", snapshots, "b0")
    qemu_io(snapshots, "write -P 0x77 0 8k", "write -P 0x78 40k 4k")  # through the enabled bitmap: dirty bits
    made.append(("qcow2-snapshot-bitmap", "qcow2", snapshots))
    for name, fmt, size, options in (("qcow", "qcow", "4M", ()), ("vmdk", "vmdk", "6M", ()),
                                     ("vdi", "vdi", "6M", ()), ("qed", "qed", "20M", ("cluster_size=4096",)),
                                     ("vhdx", "vhdx", "10M", ("block_size=1M",)), ("vpc", "vpc", "8M", ()),
                                     ("parallels", "parallels", "12M", ("cluster_size=64k",))):
        image = qemu_img_create(d / f"seed.{name}", fmt, size, *options)
        qemu_io(image, *(QCOW_WRITES if fmt == "qcow" else BLOCK_WRITES), fmt=fmt)
        made.append((name, fmt, image))
    parent = made[-2][2]  # the vpc seed
    child = qemu_img_create(d / "child.vhd", "vpc", "8M")
    qemu_io(child, "write -P 0x55 2M 4k", "write -P 0x66 6M 1M", fmt="vpc")
    made.append(("vpc-differencing", "vpc", differencing_vhd(child, parent)))
    return [(name, fmt, path.read_bytes()) for name, fmt, path in made]


def _u(data: bytes, offset: int, fmt: str) -> int:
    return struct.unpack_from(fmt, data, offset)[0] if offset + struct.calcsize(fmt) <= len(data) else 0


def _run(table: int, count: int, width: int, order: str) -> list[Entry]:
    return [(table + width * i, width, order) for i in range(count)]


def qcow2_tables(data: bytes) -> list[Entry]:
    """L1, the snapshots' L1 tables, the L2 tables they name (16-byte entries with
    extended L2: both words), the refcount table and the refcount blocks it names
    (entries of the image's width), the bitmaps' tables."""
    cluster = 1 << _u(data, 20, ">I")
    l1, l1_size, reftable, ref_clusters = (_u(data, 40, ">Q"), _u(data, 36, ">I"), _u(data, 48, ">Q"),
                                           _u(data, 56, ">I"))
    order = _u(data, 96, ">I") if _u(data, 4, ">I") >= 3 else 4
    mask = 0x00FFFFFFFFFFFE00
    l1s = [(l1, l1_size)]
    at = _u(data, 64, ">Q")
    for _ in range(min(_u(data, 60, ">I"), 16)):  # the snapshot table: each entry's L1 table, then the next entry
        l1s.append((_u(data, at, ">Q"), min(_u(data, at + 8, ">I"), 4096)))
        at += -(-(40 + _u(data, at + 36, ">I") + _u(data, at + 12, ">H") + _u(data, at + 14, ">H")) // 8) * 8
    places = _run(reftable, min(ref_clusters * cluster // 8, 64), 8, "big")
    l2s = set()
    for table, entries in l1s:
        places += _run(table, entries, 8, "big")
        l2s |= {_u(data, at, ">Q") & mask for at in range(table, table + 8 * entries, 8)} - {0}
    for l2 in sorted(l2s):
        places += _run(l2, cluster // 8, 8, "big")
    if _u(data, 88, ">Q") & 1:  # autoclear "bitmaps": each directory entry's bitmap table
        count, _, directory = bitmap_dir(data)
        for _ in range(min(count, 16)):
            places += _run(_u(data, directory, ">Q"), min(_u(data, directory + 8, ">I"), 4096), 8, "big")
            directory += -(-(24 + _u(data, directory + 20, ">I") + _u(data, directory + 18, ">H")) // 8) * 8
    width = max(1, (1 << order) // 8)
    for at in range(reftable, reftable + 8 * min(ref_clusters * cluster // 8, 64), 8):
        if _u(data, at, ">Q") & mask:
            places += _run(_u(data, at, ">Q") & mask, min(cluster // width, len(data) // cluster + 8), width, "big")
    return places


def qcow_tables(data: bytes) -> list[Entry]:
    cluster_bits, l2_bits = data[32], data[33]
    l1, size = _u(data, 40, ">Q"), _u(data, 24, ">Q")
    places = _run(l1, -(-size // (1 << (cluster_bits + l2_bits))), 8, "big")
    for at, _, _ in list(places):
        if _u(data, at, ">Q"):
            places += _run(_u(data, at, ">Q"), 1 << l2_bits, 8, "big")
    return places


def vmdk_tables(data: bytes) -> list[Entry]:
    """The grain directory (the footer's for streamOptimized) and the grain tables it names."""
    header = data[:512]
    if _u(header, 56, "<Q") == 0xFFFFFFFFFFFFFFFF:  # streamOptimized: the footer holds the directory's place
        header = data[-1024:-512]
    capacity, granularity, per_table, gd = (_u(header, 12, "<Q"), _u(header, 20, "<Q"), _u(header, 44, "<I"),
                                            _u(header, 56, "<Q"))
    places = _run(512 * gd, -(-capacity // (granularity * per_table)), 4, "little")
    for at, _, _ in list(places):
        if _u(data, at, "<I"):
            places += _run(512 * _u(data, at, "<I"), per_table, 4, "little")
    return places


def vdi_tables(data: bytes) -> list[Entry]:
    return _run(_u(data, 0x154, "<I"), _u(data, 0x180, "<I"), 4, "little")


def qed_tables(data: bytes) -> list[Entry]:
    cluster, table_size, l1 = _u(data, 4, "<I"), _u(data, 8, "<I"), _u(data, 40, "<Q")
    entries = table_size * cluster // 8
    places = _run(l1, entries, 8, "little")
    for at, _, _ in list(places):
        if _u(data, at, "<Q"):
            places += _run(_u(data, at, "<Q"), entries, 8, "little")
    return places


def vhdx_tables(data: bytes) -> list[Entry]:
    v = Vhdx(Path("/nonexistent"), data)
    return _run(v.region_offset(BAT), min(_u(data, v.region_entry(BAT) + 24, "<I") // 8, 256), 8, "little")


def vpc_tables(data: bytes) -> list[Entry]:
    dynamic = _u(data, 16, ">Q")
    return _run(_u(data, dynamic + 16, ">Q"), _u(data, dynamic + 28, ">I"), 4, "big")


def parallels_tables(data: bytes) -> list[Entry]:
    return _run(64, _u(data, 32, "<I"), 4, "little")


TABLES = {"qcow2": qcow2_tables, "qcow": qcow_tables, "vmdk": vmdk_tables, "vdi": vdi_tables, "qed": qed_tables,
          "vhdx": vhdx_tables, "vpc": vpc_tables, "parallels": parallels_tables}


def mutated_tables(rng: random.Random, data: bytes, places: list[Entry]) -> bytes:
    """``data`` with one to three table entries overwritten: a boundary value (the file's
    size in bytes, sectors or clusters; the largest values), another entry's value, where
    another table lies (in bytes, its flag bits kept, or in sectors), the entry itself near
    by or with a bit flipped, or random bits."""
    buf = bytearray(data)
    for _ in range(rng.randint(1, 3)):
        at, width, order = rng.choice(places)
        top = 1 << 8 * width
        current = int.from_bytes(data[at : at + width], order)
        other = int.from_bytes(data[(o := rng.choice(places))[0] : o[0] + width], order)
        choice = rng.random()
        if choice < 0.3:
            value = rng.choice([0, 1, 2, 0x200, 0x201, 0x1000, len(data), len(data) // 512, len(data) + 0x10000,
                                top - 1, top - 2, top >> 1, (top >> 1) | 1, top >> 2] + INTERESTING)
        elif choice < 0.45:
            value = other
        elif choice < 0.6:  # a table's place: metadata shared, or data read from a table
            table = rng.choice(places)[0] // 512 * 512
            value = table // 512 if width == 4 else table | (current & 0xFF00_0000_0000_01FF)
        elif choice < 0.75:
            value = current ^ (1 << rng.randrange(8 * width))
        elif choice < 0.9:
            value = current + rng.choice([-0x10000, -512, -1, 1, 512, 4096, 0x10000])
        else:
            value = rng.getrandbits(8 * width)
        buf[at : at + width] = (value % top).to_bytes(width, order)
    return bytes(buf)


def _their_reason(proc: subprocess.CompletedProcess, path: Path) -> str:
    lines = proc.stderr.strip().splitlines()
    return _general(lines[-1].split(f"'{path}': ", 1)[-1]) if lines else "?"


def table_outcomes(path: Path, fmt: str, *, read: bool = False) -> list[tuple[str, str, str]]:
    """The kinds of divergence of map and check on ``path`` (none when both agree);
    ``read``: of the guest bytes too (``qemu-img convert -O raw`` against ``open_image``)."""
    kinds = read_outcomes(path, fmt) if read else []
    qemu = subprocess.run(["qemu-img", "map", "--output=json", "-f", fmt, str(path)],
                          capture_output=True, text=True, errors="replace", check=False)
    mine, code = None, ""
    try:
        with open_image(path, fmt, backing=LOCAL) as disk:
            mine = "".join(json_lines(disk.block_status()))
    except ProbeError as exc:
        code = exc.code
    except Exception as exc:  # noqa: BLE001 - a defect, reported as a kind
        kinds.append(("crash", fmt, f"map: {type(exc).__name__}: {exc}"[:100]))
        code = "crash"
    if qemu.returncode == 0 and mine is not None and mine != qemu.stdout:
        kinds.append(("map-differ", fmt, ""))
    elif qemu.returncode == 0 and mine is None and code != "crash":
        kinds.append(("map-we-refuse", fmt, code))
    elif qemu.returncode != 0 and mine is not None:
        kinds.append(("map-qemu-refuses", fmt, _their_reason(qemu, path)))
    qemu = subprocess.run(["qemu-img", "check", "--output=json", "-f", fmt, str(path)],
                          capture_output=True, text=True, errors="replace", check=False)
    theirs = (json.loads(qemu.stdout) if qemu.stdout.strip() else None, qemu.returncode)
    try:
        report = verify(path, format=fmt)
        checked: tuple[dict | None, int] = (json.loads(to_json(report)), report.exit_status)
    except NoCheck:
        checked = (None, 63)
    except ProbeError as exc:
        checked, code = (None, 1), exc.code
    except Exception as exc:  # noqa: BLE001 - a defect, reported as a kind
        kinds.append(("crash", fmt, f"check: {type(exc).__name__}: {exc}"[:100]))
        return kinds
    if checked == theirs or (checked == (None, 1) and theirs == (None, 1)):
        return kinds
    if checked == (None, 1):
        kinds.append(("check-we-refuse", fmt, code))
    elif theirs == (None, 1):
        kinds.append(("check-qemu-refuses", fmt, _their_reason(qemu, path)))
    else:
        ours_, qemus = checked[0] or {}, theirs[0] or {}
        keys = sorted(k for k in ours_.keys() | qemus.keys() if ours_.get(k) != qemus.get(k))
        kinds.append(("check-differ", fmt, ",".join(keys) + f" status {checked[1]}/{theirs[1]}"))
    return kinds


def read_outcomes(path: Path, fmt: str) -> list[tuple[str, str, str]]:
    """The kind of divergence between the guest bytes qemu-img converts and those we read, if any."""
    raw = path.with_suffix(".raw")
    qemu = subprocess.run(["qemu-img", "convert", "-f", fmt, "-O", "raw", str(path), str(raw)],
                          capture_output=True, text=True, errors="replace", check=False)
    try:
        with open_image(path, fmt, backing=LOCAL) as disk:
            mine: bytes | None = disk.read()
        code = ""
    except ProbeError as exc:
        mine, code = None, exc.code
    except Exception as exc:  # noqa: BLE001 - a defect, reported as a kind
        raw.unlink(missing_ok=True)
        return [("crash", fmt, f"read: {type(exc).__name__}: {exc}"[:100])]
    theirs = raw.read_bytes() if qemu.returncode == 0 else None
    raw.unlink(missing_ok=True)
    if qemu.returncode == 0 and mine is None:
        return [("read-we-refuse", fmt, code)]
    if qemu.returncode != 0 and mine is not None:
        return [("read-qemu-refuses", fmt, _their_reason(qemu, path))]
    return [("read-differ", fmt, "")] if mine != theirs else []


def table_divergences(
    seeds: list[tuple[str, str, bytes]], count: int, seed: int, scratch: Path, *, read: bool = False
) -> Iterator[tuple[tuple[str, str, str], bytes]]:
    """Each divergence of ``count`` images with mutated tables (reproducible from ``seed``), with the image."""
    rng = random.Random(seed)
    located = [(fmt, data, TABLES[fmt](data)) for _, fmt, data in seeds]
    for number in range(count):
        fmt, data, places = rng.choice(located)
        image = mutated_tables(rng, data, places)
        path = scratch / f"t{number}.{fmt}"
        path.write_bytes(image)
        kinds = table_outcomes(path, fmt, read=read)
        path.unlink()
        for kind in kinds:
            yield kind, image


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=5000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--keep", type=Path, default=None, help="where to keep one file of each kind")
    parser.add_argument("--tables", action="store_true", help="mutate block tables of images with data, not headers")
    parser.add_argument("--read", action="store_true", help="with --tables: compare the guest bytes too (convert)")
    args = parser.parse_args()
    keep = args.keep or Path(tempfile.mkdtemp(prefix="storprobe-differential-"))
    keep.mkdir(parents=True, exist_ok=True)
    seen: collections.Counter[tuple[str, str, str]] = collections.Counter()
    with tempfile.TemporaryDirectory() as made, tempfile.TemporaryDirectory() as scratch:
        if args.tables:
            found = table_divergences(table_seeds(Path(made)), args.count, args.seed, Path(scratch), read=args.read)
        else:
            found = divergences(qemu_formats(real_images(Path(made))), args.count, args.seed, Path(scratch))
        for kind, image in found:
            if not seen[kind]:
                kept = keep / f"{len(seen)}-{kind[1]}{SUFFIXES.get(kind[1], '')}"
                kept.write_bytes(image)
                print(kind, kept, "(known)" if known(kind) else "(NEW)", flush=True)
            seen[kind] += 1
    print(f"\n{args.count} mutated images; kinds of divergence, most frequent first:")
    for kind, times in seen.most_common():
        print(f"{times:6} {kind} {known(kind) or 'NEW'}")


if __name__ == "__main__":
    main()
