"""Fuzzing: the regression corpus, and mutations of real images of every format.

Whatever the bytes, ``probe`` gives a result or a named ProbeError and
``check`` a verdict, and a result renders (``oracle.renders``: JSON, text,
volume XML that validates or a named error, a scan entry); a "plugin-error"
(a stray exception inside a plugin) is a bug. Inputs that once crashed or hung
a probe live in tests/corpus (see its README); example counts come from the
hypothesis profile (tests/conftest.py):
``STORPROBE_FUZZ=long python -m pytest tests/test_fuzz.py`` runs a long campaign.
"""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from storprobe.safety import check

from builders import CORPUS, INTERESTING, corpus_files, load
from oracle import probe_and_check

#: What each corpus file is (or fails as) and its hazards; files not listed
#: are only required to give a result or a named error.
EXPECTED = {
    "dmg-trailer-only.dmg.xz": ("dmg.rsrc-fork", ["malformed"]),
    "luks2-deep-json.luks.xz": ("luks.json", ["malformed"]),
    "polyglot-iso-mbr-qcow2.img.xz": ("qcow2", ["polyglot", "raw.partition-table", "backing-file"]),
    "qcow2-2MiB-of-empty-extensions.qcow2.xz": ("qcow2", []),
    "qcow2-65535-bitmaps.qcow2.xz": ("qcow2", []),
    "qcow2-backing-format-not-a-name.qcow2.xz": ("qcow2", ["backing-file"]),
    "qcow2-hostile-feature-names.qcow2.xz": ("qcow2", ["qcow2.unknown-feature", "qcow2.corrupt"]),
    "qcow2-luks-without-crypto-header.qcow2.xz": ("qcow2.crypto-header-missing", ["malformed"]),
    "vmdk-blank-lines.vmdk.xz": ("vmdk.extent-count", ["malformed"]),
    "vmdk-hostile-extents.vmdk.xz": ("vmdk.extent-line", ["malformed"]),
    "vmdk-stream-footer-odd-size.vmdk.xz": ("vmdk.footer", ["malformed"]),
    "vmdk-unparseable-json-parent.vmdk.xz": ("vmdk", ["vmdk.external-extent", "vmdk.extent-path", "backing-invalid"]),
    "vpc-differencing-surrogate-parent.vhd.xz": ("vpc", ["backing-file"]),
}


@pytest.mark.parametrize("path", corpus_files(), ids=lambda p: p.name)
def test_corpus(path):
    data = load(path)
    outcome = probe_and_check(data)
    if path.name in EXPECTED:
        assert (outcome, [h.check for h in check(data).hazards]) == EXPECTED[path.name]


def test_corpus_is_documented():
    readme = (CORPUS / "README.md").read_text()
    assert [p.name for p in corpus_files() if p.name not in readme] == []


# ---- mutations of real images ----------------------------------------------------------


edits = st.lists(
    st.tuples(
        st.one_of(st.integers(0, 1023), st.integers(0, 70_000), st.integers(-1024, -1)),  # where
        st.sampled_from([1, 2, 4, 8]),  # width
        st.one_of(st.sampled_from(INTERESTING), st.integers(0, 2**64 - 1)),  # value
        st.sampled_from(["little", "big"]),
    ),
    min_size=1,
    max_size=8,
)


@given(index=st.integers(0, 10_000), changes=edits, cut=st.one_of(st.none(), st.integers(0, 70_000)))
def test_mutated_real_images(real_image_seeds, index, changes, cut):
    """Fields of a real header (and the structures near it, or at the end of
    the file) overwritten with boundary values or random ones, the file
    perhaps cut short."""
    data = bytearray(real_image_seeds[index % len(real_image_seeds)])
    for where, width, value, order in changes:
        at = where % len(data)
        data[at : at + width] = (value % (1 << 8 * width)).to_bytes(width, order)
    probe_and_check(bytes(data if cut is None else data[:cut]))
