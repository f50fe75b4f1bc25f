"""A fixed sample of the differential campaign (tests/differential_campaign.py):
mutated real images on which storprobe and ``qemu-img info -f FORMAT`` may
differ only in the ways listed as known, each pinned by a format's tests."""

from __future__ import annotations

from differential_campaign import divergences, known, qemu_formats
from oracle import require
from test_fuzz import real_images

#: Mutated images per run: enough to meet the common divergences, about 5 s.
SAMPLE = 400


def test_a_fixed_sample_diverges_only_in_known_ways(tmp_path):
    require("qemu-img")
    (tmp_path / "seeds").mkdir()
    (tmp_path / "scratch").mkdir()
    seeds = qemu_formats(real_images(tmp_path / "seeds"))
    found = {kind for kind, _ in divergences(seeds, SAMPLE, seed=1, scratch=tmp_path / "scratch")}
    assert found, "the sample should meet at least the known divergences"
    assert [kind for kind in sorted(found) if not known(kind)] == []
