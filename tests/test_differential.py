"""A fixed sample of the differential campaign (tests/differential_campaign.py):
mutated real images on which storprobe and ``qemu-img info -f FORMAT`` may
differ only in the ways listed as known, each pinned by a format's tests; and
a fixed sample of its table mode, on which ``storprobe map`` and ``verify``
agree with ``qemu-img map`` and ``check`` but in known ways."""

from __future__ import annotations

import ast
import struct
import subprocess
from pathlib import Path

import pytest

from storprobe import ProbeError
from storprobe.datapath import open_image

from differential_campaign import (
    KNOWN,
    TABLES,
    divergences,
    known,
    qemu_formats,
    table_divergences,
    table_outcomes,
    table_seeds,
)
from oracle import require

#: Mutated images per run: enough to meet the common divergences, about 5 s.
SAMPLE = 400
#: Images with mutated tables per run, mapped, checked and read by both: about 8 s of CPU.
TABLE_SAMPLE = 150
TESTS = Path(__file__).resolve().parent


def test_a_fixed_sample_diverges_only_in_known_ways(tmp_path, real_image_seeds):
    require("qemu-img")
    seeds = qemu_formats(real_image_seeds)
    found = {kind for kind, _ in divergences(seeds, SAMPLE, seed=1, scratch=tmp_path)}
    assert found, "the sample should meet at least the known divergences"
    assert [kind for kind in sorted(found) if not known(kind)] == []


@pytest.mark.parametrize("kind", sorted(KNOWN), ids="-".join)
def test_each_known_divergence_is_pinned_by_a_test(kind):
    """The pinning test exists, and a refusal's pin names the exact code
    (test_qcow2's rule table leaves out the ``qcow2.`` prefix)."""
    file, name = KNOWN[kind][1].split("::")
    source = (TESTS / file).read_text()
    assert name in {node.name for node in ast.walk(ast.parse(source)) if isinstance(node, ast.FunctionDef)}
    if kind[0].endswith("we-refuse"):
        code = kind[2]
        assert f'"{code}"' in source or f'"{code.removeprefix(kind[1] + ".")}"' in source


def test_our_codes_match_exactly():
    """A new code in a format with known refusals is a finding, not a known kind."""
    for kind, fmt, code in KNOWN:
        if kind.endswith("we-refuse"):
            assert known((kind, fmt, code))
            assert not known((kind, fmt, code + "-new")) and not known((kind, fmt, code[:-1]))
            assert not known((kind, fmt, ""))
    assert known(("qemu-refuses", "vmdk", "Could not open '...': No such file or directory"))


@pytest.fixture(scope="module")
def table_images(tmp_path_factory) -> list[tuple[str, str, bytes]]:
    require("qemu-img")
    return table_seeds(tmp_path_factory.mktemp("table-seeds"))


def test_every_table_seed_agrees_before_it_is_mutated(tmp_path, table_images):
    """The seeds are real images with tables to mutate, which both sides map, check and read alike."""
    assert {fmt for _, fmt, _ in table_images} == set(TABLES)
    for name, fmt, data in table_images:
        assert len(TABLES[fmt](data)) > 4, name
        image = tmp_path / f"{name}.{fmt}"
        image.write_bytes(data)
        assert table_outcomes(image, fmt, read=True) == [], name


def test_a_fixed_table_sample_diverges_only_in_known_ways(tmp_path, table_images):
    found = {kind for kind, _ in table_divergences(table_images, TABLE_SAMPLE, seed=1, scratch=tmp_path, read=True)}
    assert [kind for kind in sorted(found) if not known(kind)] == []


def test_a_vhdx_block_in_the_header_section_is_refused_where_qemu_reads_it(tmp_path, table_images):
    """A known table divergence, found as the campaign finds it: a BAT entry
    placing block 0 at offset 0 (fully present), over the file's identifier and
    headers. MS-VHDX puts payload blocks past the first MiB; QEMU 7.2 maps and
    checks the image (it reads the block from the headers), storprobe refuses
    it (``vhdx.block-overlap``) in map and verify alike."""
    name, fmt, data = next(seed for seed in table_images if seed[0] == "vhdx")
    image = bytearray(data)
    struct.pack_into("<Q", image, TABLES[fmt](data)[0][0], 6)
    path = tmp_path / "overlap.vhdx"
    path.write_bytes(bytes(image))
    kinds = table_outcomes(path, fmt)
    assert kinds == [("map-we-refuse", "vhdx", "vhdx.block-overlap"), ("check-we-refuse", "vhdx", "vhdx.block-overlap")]
    assert all(known(kind) for kind in kinds)


@pytest.mark.parametrize("table", ["l1", "l2"])
def test_qcow_offsets_past_qemus_length_limit_fail_as_qemus_reads_do(tmp_path, table_images, table):
    """Found by the table campaign: an L2 table (L1 entry) or a data cluster (L2
    entry) of a qcow image placed past QEMU's length limit. QEMU's block layer
    fails those reads (an I/O error: the map for an L2 table, the data for a
    cluster), where zeros past the end of the file would be read below it; ours
    are named errors (``qcow.l2-offset``, ``qcow.cluster-offset``), and the
    campaign counts the pair as agreement."""
    name, fmt, data = next(seed for seed in table_images if seed[0] == "qcow")
    image = bytearray(data)
    l1 = struct.unpack_from(">Q", data, 40)[0]
    at = l1 + 8 if table == "l1" else struct.unpack_from(">Q", data, l1)[0]  # guest 2 MiB's L2 table; cluster 0
    struct.pack_into(">Q", image, at, 0x7FFF_FFFF_FFFF_F000)
    path = tmp_path / f"far-{table}.qcow"
    path.write_bytes(bytes(image))
    assert table_outcomes(path, fmt, read=True) == []
    theirs = subprocess.run([require("qemu-img"), "convert", "-O", "raw", str(path), str(tmp_path / "out.raw")],
                            capture_output=True, text=True, check=False)
    assert theirs.returncode == 1 and "Input/output error" in theirs.stderr
    with pytest.raises(ProbeError) as refused, open_image(path, fmt) as disk:
        disk.read()
    assert refused.value.code == {"l1": "qcow.l2-offset", "l2": "qcow.cluster-offset"}[table]
