"""A fixed sample of the differential campaign (tests/differential_campaign.py):
mutated real images on which storprobe and ``qemu-img info -f FORMAT`` may
differ only in the ways listed as known, each pinned by a format's tests."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from differential_campaign import KNOWN, divergences, known, qemu_formats
from oracle import require

#: Mutated images per run: enough to meet the common divergences, about 5 s.
SAMPLE = 400
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
    if kind[0] == "we-refuse":
        code = kind[2]
        assert f'"{code}"' in source or f'"{code.removeprefix(kind[1] + ".")}"' in source


def test_our_codes_match_exactly():
    """A new code in a format with known refusals is a finding, not a known kind."""
    for kind, fmt, code in KNOWN:
        if kind == "we-refuse":
            assert known((kind, fmt, code))
            assert not known((kind, fmt, code + "-new")) and not known((kind, fmt, code[:-1]))
            assert not known((kind, fmt, ""))
    assert known(("qemu-refuses", "vmdk", "Could not open '...': No such file or directory"))
