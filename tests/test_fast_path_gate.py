"""The differential gate of the scan's fast path (storprobe.plain and qcow2's
``plain``): tens of thousands of mutated qcow2 headers, scanned by the general
path and by the fast path, must come out byte for byte the same, every qcow2
rule the fast path's decision rests on being hit along the way; and the fast
path switches itself off when a third-party plugin adds a format.

The mutants: real images from qemu-img (plain ones of every shape the header
allows, and ones with a backing file, bitmaps, a snapshot, LUKS encryption, a
data file, so that a mutation can make a plain-looking header of them), each
header field set to each boundary value, each feature bit flipped, header
extensions edited, signatures of other formats planted, and as many again of
differential_campaign's random mutations. They are scanned in directories of a
few thousand, so each template the fast path makes from one volume writes many
others.
"""

from __future__ import annotations

import inspect
import json
import random
import re
import struct
from collections import Counter
from json.encoder import encode_basestring_ascii
from pathlib import Path

import pytest

import storprobe
from storprobe import Features, FormatSpec, hookimpl
from storprobe.jsontext import indented
from storprobe.plain import _ALLOCATION, _VIRTUAL_SIZE, PlainVolumes
from storprobe.qemu_json import scan_record
from storprobe.registry import format_table
from storprobe.scan import scan_map
from storprobe_plugins import qcow2

from builders import (
    AUTOCLEAR,
    BACKING_OFFSET,
    BACKING_SIZE,
    CLUSTER_BITS,
    COMPAT,
    COMPRESSION,
    CRYPT,
    EXT_BACKING_FORMAT,
    EXT_BITMAPS,
    EXT_CRYPTO,
    EXT_FEATURES,
    HEADER_LENGTH,
    INCOMPAT,
    INTERESTING,
    L1_OFFSET,
    L1_SIZE,
    NB_SNAPSHOTS,
    REFCOUNT_ORDER,
    REFTABLE_CLUSTERS,
    REFTABLE_OFFSET,
    SIZE,
    SNAPSHOTS_OFFSET,
    Edit,
    get,
    in_ext,
    u8,
    u32,
    u64,
)
from differential_campaign import mutated
from oracle import require, run

#: Volumes per scanned directory.
ROUND = 3000
#: Random mutants, beside the systematic edits (about 13,000).
RANDOM_MUTANTS = 20_000
#: Values each header field takes: the boundaries, and every small number (versions,
#: cluster bits, refcount orders, encryption methods, compression types).
VALUES = sorted(set(INTERESTING) | set(range(24)))
#: Values the extensions' fields take: the boundaries, and lengths just past QEMU's limits.
EXTENSION_VALUES = sorted(set(INTERESTING) | {16, 25, 512})
#: Bytes of a seed kept: the header cluster, the extensions, the LUKS header.
KEEP = 16 * 1024
#: Header fields: (offset, struct code), the version's included.
FIELDS = [
    (4, "I"), (BACKING_OFFSET, "Q"), (BACKING_SIZE, "I"), (CLUSTER_BITS, "I"), (SIZE, "Q"), (CRYPT, "I"),
    (L1_SIZE, "I"), (L1_OFFSET, "Q"), (REFTABLE_OFFSET, "Q"), (REFTABLE_CLUSTERS, "I"), (NB_SNAPSHOTS, "I"),
    (SNAPSHOTS_OFFSET, "Q"), (INCOMPAT, "Q"), (COMPAT, "Q"), (AUTOCLEAR, "Q"), (REFCOUNT_ORDER, "I"),
    (HEADER_LENGTH, "I"), (COMPRESSION, "B"),
]
#: Names the volumes take in turn: quoting, escapes, non-ASCII, bytes that are no UTF-8.
NAMES = ["v{}.qcow2", "a b \"q\" \\{}", "é-☃-{}.img", "tab\t{}\n", "{}.\udcff\udcfe"]


def json_text(record) -> str:
    return indented(scan_record(record), 1)


def json_line(record) -> str:
    return json.dumps(scan_record(record)) + "\n"


@pytest.fixture(scope="module")
def seeds(tmp_path_factory) -> dict[str, bytes]:
    """qcow2 images of every shape, cut to their first KEEP bytes (a probe reads
    no table the header points to, but for the snapshot table, the bitmap
    directory and the LUKS header, which lie there in these images)."""
    require("qemu-img")
    d = tmp_path_factory.mktemp("gate-seeds")
    options = {
        "v2": "compat=0.10", "v3": "compat=1.1", "lazy": "lazy_refcounts=on",
        "l2": "extended_l2=on,cluster_size=64k", "zstd": "compression_type=zstd", "c512": "cluster_size=512",
        "c2m": "cluster_size=2M", "r1": "refcount_bits=1", "r64": "refcount_bits=64",
        "v2c4k": "compat=0.10,cluster_size=4k",
        "data": f"data_file={d / 'data.raw'},cluster_size=512",
        "backing": "backing_file=v3.qcow2,backing_fmt=qcow2,cluster_size=512",
    }
    for name, opts in options.items():
        run("qemu-img", "create", "-q", "-f", "qcow2", "-o", opts, d / f"{name}.qcow2", "16M")
    run("qemu-img", "bitmap", "--add", d / "backing.qcow2", "b0")
    run("qemu-img", "snapshot", "-c", "s1", d / "backing.qcow2")
    run("qemu-img", "create", "-q", "-f", "qcow2", "--object", "secret,id=s0,data=pw", "-o",
        "encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=10,cluster_size=512", d / "luks.qcow2", "1M")
    made = {p.stem: p.read_bytes()[:KEEP] for p in d.glob("*.qcow2")}
    for name, data in made.items():
        assert storprobe.probe(data).format == "qcow2", name  # each seed describable as cut
    return made


def systematic(seeds: dict[str, bytes]) -> list[bytes]:
    """Every header field at every boundary value, every feature bit flipped,
    the extensions' fields edited, other formats' signatures planted."""
    out: list[bytes] = []

    def apply(data: bytes, *edits: Edit) -> None:
        buf = bytearray(data)
        try:
            for edit in edits:
                edit(buf)
        except (AssertionError, struct.error):  # an extension this seed lacks
            return
        out.append(bytes(buf))

    setters = {"B": u8, "I": u32, "Q": u64}
    for data in seeds.values():
        for offset, code in FIELDS:
            for value in VALUES:
                apply(data, setters[code](offset, value % (1 << 8 * struct.calcsize(code))))
        for offset in (INCOMPAT, COMPAT, AUTOCLEAR):
            for bit in range(64):
                apply(data, u64(offset, get(data, offset, "Q") ^ 1 << bit))
        for kind in (EXT_FEATURES, EXT_BACKING_FORMAT, EXT_CRYPTO, EXT_BITMAPS):
            for delta, code in ((-8, "I"), (-4, "I"), (0, "I"), (0, "Q"), (4, "I"), (8, "Q"), (16, "Q")):
                for value in EXTENSION_VALUES:
                    apply(data, in_ext(kind, delta, code, value % (1 << 8 * struct.calcsize(code))))
        for value in (_VIRTUAL_SIZE, _ALLOCATION):  # a stand-in of the templates, shown by the record
            apply(data, u64(COMPAT, value))
        apply(data, lambda b: b.extend(bytes(32769 - len(b)) + b"CD001\x01" + bytes(4096)))  # an ISO 9660 too
        apply(data, lambda b: b.extend(b"conectix" + bytes(504)))  # a VHD footer
        apply(data, lambda b: b.extend(b"koly" + bytes(508)))  # a DMG trailer
        apply(data, u32(4, 1))  # a qcow (version 1) header instead
    return out


def corpus(seeds: dict[str, bytes]) -> list[bytes]:
    rng = random.Random(13)
    images = list(seeds.values())
    return systematic(seeds) + [mutated(rng, rng.choice(images)) for _ in range(RANDOM_MUTANTS)]


def scan_both_ways(directory: Path, render) -> tuple[list[str], list[str]]:
    general = list(scan_map(directory, render, jobs=1))
    fast = list(scan_map(directory, render, jobs=1, quote=encode_basestring_ascii))
    return general, fast


def probe_rules() -> set[str]:
    """The qcow2 rules the fast path's decision rests on: every code the header
    checks, the extension walk and the extensions' own checks can raise."""
    functions = (qcow2._check_header, qcow2._check_table_offset, qcow2._extensions, qcow2._parse_extensions,
                 qcow2._crypto_extension, qcow2._bitmaps_extension, qcow2.features, qcow2.backing)
    source = "".join(inspect.getsource(f) for f in functions)
    called = re.findall(r'(?:_invalid|_check_table_offset)\(\s*(?:\w+,\s*)?"([\w-]+)"', source)
    return {f"qcow2.{rule}" for rule in called}


def test_fast_path_writes_what_the_general_path_writes(tmp_path, seeds):
    assert PlainVolumes.applies(format_table())
    images = corpus(seeds)
    assert len(images) >= 30_000, len(images)
    codes: Counter[str] = Counter()
    plain_keys: Counter[object] = Counter()
    for start in range(0, len(images), ROUND):
        directory = tmp_path / f"round{start}"
        directory.mkdir()
        for number, image in enumerate(images[start : start + ROUND], start):
            (directory / NAMES[number % len(NAMES)].format(number)).write_bytes(image)
            found = qcow2.plain(image[:0x8200])
            if found is not None:
                plain_keys[found[0]] += 1
        general, fast = scan_both_ways(directory, json_text)
        assert fast == general
        if start % (4 * ROUND) == 0:
            general_lines, fast_lines = scan_both_ways(directory, json_line)
            assert fast_lines == general_lines
        for text in general:
            error = json.loads(text).get("error")
            codes[error["code"] if error else "described"] += 1
        for path in directory.iterdir():
            path.unlink()
    missing = probe_rules() - set(codes)
    assert not missing, f"rules the corpus never hit: {sorted(missing)}"
    plain_volumes = sum(plain_keys.values())
    assert plain_volumes >= len(images) // 5  # the fast path wrote a good share ...
    assert plain_volumes - len(plain_keys) >= plain_volumes // 2  # ... mostly from templates another volume made


def test_fast_path_switches_off_for_a_third_party_format(tmp_path):
    """A third-party row with a ``plain`` callback the gate never tested, and a
    wrong one: its key leaves out the dirty byte its ``features`` reads. Were the
    fast path on, the second volume would be written from the first one's template."""

    def features(img):
        return Features(dirty=bool(img.header[16]))

    def plain(head):
        return (), int.from_bytes(head[8:16], "little")

    class Odd:
        @hookimpl
        def storprobe_formats(self):
            return [FormatSpec("oddfmt", magic=b"ODDFMT\0\0", size_offset=8, features=features, plain=plain)]

    for name, dirty in (("a", 0), ("b", 1)):
        (tmp_path / name).write_bytes(b"ODDFMT\0\0" + (1 << 20).to_bytes(8, "little") + bytes([dirty]) + bytes(4096))
    with storprobe.registered(Odd()):
        assert not PlainVolumes.applies(format_table())
        general, fast = scan_both_ways(tmp_path, json_text)
    assert fast == general
    assert [json.loads(text)["dirty-flag"] for text in fast] == [False, True]


def test_a_table_with_a_third_party_row_is_not_built_in_only():
    class Other:
        @hookimpl
        def storprobe_formats(self):
            return [FormatSpec("other-format", magic=b"OTHERFMT")]

    assert format_table().builtin_only
    with storprobe.registered(Other()):
        assert not format_table().builtin_only
    assert format_table().builtin_only
