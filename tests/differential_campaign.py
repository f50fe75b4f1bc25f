"""Differential campaign: mutate real images and compare storprobe with qemu-img.

    python3 tests/differential_campaign.py [--count 5000] [--seed 1] [--keep DIR]

Each round takes a real image of a format qemu-img opens (made by the pytest
fuzz tests' ``real_images``), overwrites one to three fields (in its first
sector, its last sector or anywhere in the first MiB) with boundary or random
values, and asks both sides about the file, as that format:

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

from oracle import ours
from test_fuzz import INTERESTING, real_images

from storprobe import ProbeError, probe

#: Formats left out: qemu-img reads iso and LUKS2 as raw, has no cow driver, and raw is any bytes.
SKIPPED = {"iso", "cow", "raw", "dir"}
_QUOTED = re.compile(r"'[^']*'")
_NUMBER = re.compile(r"\b(?=\w*\d)(0x)?[0-9a-fA-F]+\b")
#: Names qemu-img needs to pick a format by.
SUFFIXES = {"dmg": ".dmg"}
#: Divergences on purpose: (kind, format, part of our code or of qemu-img's reason) -> why.
KNOWN = {
    ("we-refuse", "cloop", "wrong-format"): "-f cloop skips QEMU's magic check; a row needs its signature",
    ("we-refuse", "cloop", "cloop.offsets-beyond-eof"): "the offsets table must lie in the file (test_cloop)",
    ("we-refuse", "vdi", ""): "stricter than QEMU: image types, tables past the end of the file (test_vdi)",
    ("we-refuse", "bochs", "bochs.catalog-beyond-eof"): "stricter than QEMU (test_bochs)",
    ("we-refuse", "parallels", ""): "stricter than QEMU on tables past the end of the file (test_parallels)",
    ("we-refuse", "qcow", "qcow.backing-name-offset"): "a backing name outside the file (test_qcow)",
    ("we-refuse", "qcow2", "qcow2.snapshot-table-beyond-file"): "stricter than QEMU (test_qcow2)",
    ("we-refuse", "qcow2", "qcow2.data-file-raw-without-data-file"): "stricter than QEMU (test_qcow2)",
    ("we-refuse", "luks", "luks.slot-overlaps-payload"): "QEMU's 32-bit sum wraps (test_luks)",
    ("we-refuse", "dmg", ""): "trailer fields QEMU ignores or checks less: size, version, data fork end (test_dmg)",
    ("we-refuse", "vmdk", ""): "descriptor bounds and grains QEMU does not check; sizes QEMU wraps (test_vmdk)",
    ("qemu-refuses", "qcow2", "Unsupported qcow2 feature"): "unknown incompatible bits are reported (test_qcow2)",
    ("qemu-refuses", "vmdk", "No such file"): "QEMU opens extent files; we never do",
    ("qemu-refuses", "qed", "QED table offset is invalid"): "table_size 1, which QEMU's bounds check refuses (test_qed)",
    ("qemu-refuses", "vmdk", "Invalid argument"): "an extent with no CID is still described (test_vmdk)",
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
    return next((why for (k, f, part), why in KNOWN.items() if (k, f) == kind[:2] and part in kind[2]), None)


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
