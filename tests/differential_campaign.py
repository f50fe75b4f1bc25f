"""Differential campaign: mutate real images and compare storprobe with qemu-img.

    python3 tests/differential_campaign.py [--count 5000] [--seed 1] [--keep DIR]

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
"""

from __future__ import annotations

import argparse
import collections
import json
import random
import re
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

from storprobe import ProbeError, probe

from builders import INTERESTING, real_images
from oracle import ours

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
    exactly, qemu-img's reasons (text) by a part of them."""
    for (k, fmt, part), (why, _) in KNOWN.items():
        if (k, fmt) == kind[:2] and (part in kind[2] if k == "qemu-refuses" else part == kind[2]):
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=5000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--keep", type=Path, default=None, help="where to keep one file of each kind")
    args = parser.parse_args()
    keep = args.keep or Path(tempfile.mkdtemp(prefix="storprobe-differential-"))
    keep.mkdir(parents=True, exist_ok=True)
    seen: collections.Counter[tuple[str, str, str]] = collections.Counter()
    with tempfile.TemporaryDirectory() as made, tempfile.TemporaryDirectory() as scratch:
        seeds = qemu_formats(real_images(Path(made)))
        for kind, image in divergences(seeds, args.count, args.seed, Path(scratch)):
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
