"""The shortcuts the probing loop takes for speed decide exactly what the plain
path decides: the magic index, the per-probe memo, the bounded reads, the
entry-point pre-check. (Speed itself is measured by benchmarks/bench_scan.py,
never asserted here.)"""

from __future__ import annotations

import ast
import copy
import os
import subprocess
import sys
import zipfile

import pytest
from hypothesis import given
from hypothesis import strategies as st

from storprobe import BytesSource, Image, PathSource, ProbeError, probe
from storprobe.detect import _signatures
from storprobe.registry import (
    BUILTIN_PLUGINS,
    ENTRY_POINT_GROUP,
    _declared_names,
    _group_names,
    format_table,
)

from oracle import CountingSource, qemu_img_create

TABLE = format_table()
SIGNED = [spec for spec, _, _ in TABLE.signed if spec.magic is not None]


def _unindexed(table):
    """The same table with the magic index off: every row takes the plain path."""
    plain = copy.copy(table)
    plain.windows = ()
    plain.signed = tuple((spec, magics, False) for spec, magics, _ in table.signed)
    plain.unindexed = frozenset(range(len(plain.signed)))
    return plain


def _plant(data: bytearray, spec, choice: int) -> None:
    offset = spec.header_offsets[choice % len(spec.header_offsets)]
    base = len(data) + offset if offset < 0 else offset
    magic = spec.magics[choice % len(spec.magics)]
    at = base + spec.magic_offset
    if at >= 0:
        data[at : at + len(magic)] = magic
        if spec.version_offset is not None and spec.versions and choice % 3:
            version = spec.versions[choice % len(spec.versions)]
            field = base + spec.version_offset
            data[field : field + spec.version_width] = version.to_bytes(
                spec.version_width, "big" if spec.endian == ">" else "little"
            )


def _outcome(table, data: bytes):
    matched, rejected = _signatures(Image(BytesSource(data)), table)
    refused = {name: (type(err := make()), err.code, str(err)) for name, make in rejected.items()}
    return list(matched.items()), refused


@given(
    body=st.binary(max_size=1024),
    size=st.sampled_from([0, 100, 600, 4096, 33280, 40000, 70000]),
    planted=st.lists(st.tuples(st.sampled_from(SIGNED), st.integers(0, 11)), max_size=3),
)
def test_magic_index_decides_as_the_plain_path(body, size, planted):
    data = bytearray(body.ljust(size, b"\0"))
    for spec, choice in planted:
        _plant(data, spec, choice)
    assert _outcome(TABLE, bytes(data)) == _outcome(_unindexed(TABLE), bytes(data))


def test_memo_computes_once_per_header_and_keeps_no_error():
    img = Image(BytesSource(bytes(range(256)) * 200))
    calls = []

    def parse(image):
        calls.append(image.header_offset)
        return len(calls)

    assert img.memo(parse, parse) == img.memo(parse, parse) == 1
    img.at_header(-512)  # another header: what was parsed for the first is forgotten
    assert img.memo(parse, parse) == 2
    assert calls == [0, img.size - 512]

    def broken(image):
        calls.append("broken")
        raise ProbeError("bad", code="x")

    for _ in range(2):
        with pytest.raises(ProbeError):
            img.memo(broken, broken)
    assert calls.count("broken") == 2


class Counting:
    """A path source that counts read calls."""

    def __init__(self, path) -> None:
        self.source, self.reads = PathSource(path), 0
        self.name, self.file_type, self.stat = self.source.name, self.source.file_type, self.source.stat

    def size(self) -> int:
        return self.source.size()

    def read_at(self, offset: int, length: int) -> bytes:
        self.reads += 1
        return self.source.read_at(offset, length)

    def close(self) -> None:
        self.source.close()


@pytest.mark.parametrize("fmt", ["qcow2", "qcow", "qed", "vmdk", "vpc", "vdi", "parallels", "raw"])
def test_at_most_two_reads_per_probe(tmp_path, fmt):
    """The head in one read, the tail in one more when the file is longer."""
    source = Counting(qemu_img_create(tmp_path / f"disk.{fmt}", fmt, "1G"))
    try:
        assert probe(source).format == fmt
    finally:
        source.close()
    assert source.reads <= 2


def test_entry_point_precheck_reads_the_group_section():
    text = (f"[console_scripts]\nx = y:z\n\n[{ENTRY_POINT_GROUP}]\n# a comment\nmine = pkg.mod\n other =pkg.o\n"
            "[next]\nz = q")
    assert _group_names(text) == {"mine", "other"}
    # in a fresh interpreter: a worker that ran other tests may hold finders or path entries
    # (imported by dask, setuptools ...) for which the precheck rightly defers to importlib.metadata
    code = "from storprobe.registry import _declared_names; print(sorted(_declared_names()))"
    declared = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert {name for name, _ in BUILTIN_PLUGINS} <= set(ast.literal_eval(declared))


def test_entry_point_precheck_defers_to_importlib_metadata_for_zips(tmp_path, monkeypatch):
    archive = tmp_path / "plugins.zip"
    zipfile.ZipFile(archive, "w").close()
    monkeypatch.setattr(sys, "path", [*sys.path, str(archive)])
    assert _declared_names() is None
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p != str(archive)] + [os.fspath(tmp_path / "x.egg")])
    assert _declared_names() is None


@given(
    size=st.integers(0, 300_000),
    steps=st.lists(st.tuples(st.integers(0, 5000), st.integers(0, 3000)), max_size=60),
)
def test_table_walker_reads_what_image_read_does_and_at_most_twice_what_it_uses(size, steps):
    data = bytes(range(256)) * (size // 256 + 1)
    source = CountingSource(data[:size])
    img = Image(source)
    walker, offset, used = img.walker(), 70_000, 0
    before = source.bytes_read
    for skip, length in steps:
        offset += skip
        try:
            expected = img.read(offset, length)
        except ProbeError as exc:
            with pytest.raises(type(exc)):
                walker.read(offset, length)
            break
        assert walker.read(offset, length) == expected
        used += length
        offset += length
    walked = source.bytes_read - before - used  # img.read above read ``used`` bytes itself
    assert walked <= 2 * used + walker.LAST_CHUNK


def test_table_walker_reads_a_dense_table_in_few_reads():
    source = CountingSource(bytes(4 << 20))
    walker = Image(source).walker()
    for offset in range(0, 4 << 20, 40):
        walker.read(offset, min(40, (4 << 20) - offset))
    assert source.reads <= 1 + 12  # the head, then 4 KiB, 8 KiB ... 1 MiB buffers
