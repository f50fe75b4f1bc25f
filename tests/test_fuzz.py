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

import lzma
import shutil
import struct
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from oracle import CountingSource, qemu_img_create, renders, run

from storprobe import ProbeError, probe
from storprobe.safety import check
from storprobe.source import READ_BUDGET

CORPUS = Path(__file__).resolve().parent / "corpus"


def corpus_files() -> list[Path]:
    return sorted(p for p in CORPUS.iterdir() if p.name != "README.md")


def load(path: Path) -> bytes:
    data = path.read_bytes()
    return lzma.decompress(data) if path.suffix == ".xz" else data


def probe_and_check(data: bytes) -> str:
    """The probe's format or error code, after checking it read within budget
    and that ``check`` gives a verdict too; never a plugin defect."""
    source = CountingSource(data)
    try:
        info = probe(source)
    except ProbeError as exc:
        outcome = exc.code
    else:
        outcome = info.format
        renders(info)
    assert outcome != "plugin-error"
    assert source.bytes_read <= READ_BUDGET
    verdict = check(data)
    assert all("(plugin-error)" not in hazard.message for hazard in verdict.hazards), verdict.hazards
    return outcome


#: What each corpus file is (or fails as) and its hazards; files not listed
#: are only required to give a result or a named error.
EXPECTED = {
    "dmg-trailer-only.dmg.xz": ("dmg.rsrc-fork", ["malformed"]),
    "luks2-deep-json.luks.xz": ("luks.json", ["malformed"]),
    "polyglot-iso-mbr-qcow2.img.xz": ("qcow2", ["polyglot", "backing-file", "raw.partition-table"]),
    "qcow2-2MiB-of-empty-extensions.qcow2.xz": ("qcow2", []),
    "qcow2-65535-bitmaps.qcow2.xz": ("qcow2", []),
    "qcow2-backing-format-not-a-name.qcow2.xz": ("qcow2", ["backing-file"]),
    "qcow2-hostile-feature-names.qcow2.xz": ("qcow2", ["qcow2.unknown-feature", "qcow2.corrupt"]),
    "qcow2-luks-without-crypto-header.qcow2.xz": ("qcow2.crypto-header-missing", ["malformed"]),
    "vmdk-blank-lines.vmdk.xz": ("vmdk.extent-count", ["malformed"]),
    "vmdk-hostile-extents.vmdk.xz": ("vmdk.extent-line", ["malformed"]),
    "vmdk-stream-footer-odd-size.vmdk.xz": ("vmdk.footer", ["malformed"]),
    "vmdk-unparseable-json-parent.vmdk.xz": ("vmdk", ["backing-file", "vmdk.external-extent", "vmdk.extent-path"]),
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


@pytest.fixture(scope="module")
def seeds(tmp_path_factory) -> list[bytes]:
    return real_images(tmp_path_factory.mktemp("seeds"))


def real_images(d: Path) -> list[bytes]:
    """One or more real images per format, small enough to copy per example
    (made in ``d``; also the seeds of tests/fuzz_atheris.py)."""
    secret = ("--object", "secret,id=s0,data=pw")
    made = [
        qemu_img_create(d / "v2.qcow2", "qcow2", "16M", "compat=0.10"),
        qemu_img_create(d / "v3.qcow2", "qcow2", "16M", "lazy_refcounts=on,extended_l2=on,cluster_size=64k"),
        qemu_img_create(d / "df.qcow2", "qcow2", "16M", f"data_file={d / 'df.raw'},compression_type=zstd"),
        qemu_img_create(d / "a.qcow", "qcow", "16M"),
        qemu_img_create(d / "a.qed", "qed", "16M", "backing_file=v2.qcow2,backing_fmt=qcow2"),
        qemu_img_create(d / "a.vmdk", "vmdk", "16M"),
        qemu_img_create(d / "s.vmdk", "vmdk", "16M", "subformat=streamOptimized"),
        qemu_img_create(d / "f.vmdk", "vmdk", "16M", "subformat=twoGbMaxExtentFlat"),
        qemu_img_create(d / "a.vhd", "vpc", "16M"),
        qemu_img_create(d / "f.vhd", "vpc", "1M", "subformat=fixed"),
        qemu_img_create(d / "a.vhdx", "vhdx", "16M", "block_size=1M"),
        qemu_img_create(d / "a.vdi", "vdi", "16M"),
        qemu_img_create(d / "a.hdd", "parallels", "16M"),
    ]
    rich = qemu_img_create(d / "rich.qcow2", "qcow2", "16M", "backing_file=v2.qcow2,backing_fmt=qcow2")
    run("qemu-img", "bitmap", "--add", rich, "b0")
    run("qemu-img", "snapshot", "-c", "s1", rich)
    run("qemu-img", "create", "-q", "-f", "luks", *secret, "-o", "key-secret=s0,iter-time=10", d / "a.luks", "1M")
    run("qemu-img", "create", "-q", "-f", "qcow2", *secret, "-o", "encrypt.format=luks,encrypt.key-secret=s0",
        "-o", "encrypt.iter-time=10", d / "luks.qcow2", "1M")
    made += [rich, d / "a.luks", d / "luks.qcow2"]
    if shutil.which("cryptsetup") or shutil.which("cryptsetup", path="/usr/sbin:/sbin"):
        luks2 = d / "luks2.img"
        luks2.write_bytes(bytes(2 << 20))
        run("cryptsetup", "luksFormat", "--type", "luks2", "--batch-mode", "--key-file", "-", "--pbkdf", "pbkdf2",
            "--pbkdf-force-iterations", "1000", "--luks2-keyslots-size", "512k", "--luks2-metadata-size", "16k",
            luks2, input=b"pw")
        made.append(luks2)
    if shutil.which("bximage"):
        run("bximage", "-q", "-func=create", "-hd=10M", "-imgmode=growing", d / "a.bochs")
        made.append(d / "a.bochs")
    if shutil.which("xorriso"):
        (d / "tree").mkdir()
        (d / "tree" / "a.txt").write_text("a\n")
        run("xorriso", "-as", "mkisofs", "-quiet", "-o", d / "a.iso", d / "tree")
        made.append(d / "a.iso")
    from test_cloop import PREAMBLE
    from test_cow import qemu_v2, uml_v3
    from test_dmg import build_dmg

    hand_built = [
        PREAMBLE.ljust(128, b"\0") + struct.pack(">II", 65536, 4) + bytes(5 * 8) + bytes(4096),
        qemu_v2(1 << 20, b"/base.img"),
        uml_v3(1 << 20),
        build_dmg(bytes(range(256)) * 64),
        build_dmg(bytes(range(256)) * 64, block_map="rsrc"),
    ]
    return [path.read_bytes() for path in made] + hand_built


INTERESTING = [0, 1, 7, 8, 0x7F, 0x80, 0xFF, 0x100, 0x200, 0xFFFF, 0x10000, 2**31 - 1, 2**31, 2**32 - 1, 2**32,
               2**62, 2**63 - 1, 2**63, 2**64 - 1]

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
def test_mutated_real_images(seeds, index, changes, cut):
    """Fields of a real header (and the structures near it, or at the end of
    the file) overwritten with boundary values or random ones, the file
    perhaps cut short."""
    data = bytearray(seeds[index % len(seeds)])
    for where, width, value, order in changes:
        at = where % len(data)
        data[at : at + width] = (value % (1 << 8 * width)).to_bytes(width, order)
    probe_and_check(bytes(data if cut is None else data[:cut]))
