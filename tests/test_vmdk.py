"""vmdk: real images from qemu-img 7.2 compared with ``qemu-img info``, hand-built
images for what qemu-img cannot create (COWD, vmfs, vmfsSparse, seSparse, a
streamOptimized footer, a KDMV header carrying a descriptor file), and one
malformed header per validation rule.

Keys qemu-img prints that we leave out, everywhere below:
- ``actual-size`` of a descriptor file: qemu-img adds up the allocation of every
  extent file; we never open or stat an extent.
- ``cluster-size`` (top level and per extent) of SPARSE, VMFSSPARSE and
  SESPARSE extents named by a descriptor file: it is the grain size in the
  extent file's own header, which we never read.
"""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from storprobe import BytesSource, ProbeError, probe
from storprobe.qemu_json import to_qemu_json
from storprobe.safety import check

from builders import cowd, descriptor, patch, with_cid
from oracle import (
    assert_same_as_qemu,
    code_of,
    ours,
    probe_or_named_error,
    qemu_img_create,
    qemu_img_error,
    qemu_info,
    qemu_refuses,
    require,
    run,
)

GD_AT_END = 0xFFFF_FFFF_FFFF_FFFF


@pytest.fixture(autouse=True)
def _qemu_img():
    require("qemu-img")


def sesparse(capacity: int = 131072) -> bytes:
    """An ESXi seSparse extent QEMU opens: the const header (magic, version 2.1,
    capacity, 8-sector grains, 64-sector grain tables, volatile header at sector 1,
    a one-sector grain directory at sector 2), the volatile header, zeros."""
    const = [0xCAFEBABE, 0x200000001, capacity, 8, 64, 0, 0, 0, 0, 0, 1, 1]
    const += [0, 0, 0, 0, 2, 1, 3, 1, 0, 0, 0, 0, 4, 0]
    volatile = struct.pack("<4Q", 0xCAFECAFE, 0, 0, 0)
    return struct.pack("<26Q", *const).ljust(512, b"\0") + volatile.ljust(512, b"\0") + bytes(4096)


def with_footer(image: bytes, between: bytes = b"") -> bytes:
    """A streamOptimized image as VMware writes it: the header's gdOffset is
    GD_AT_END, and after the stream (and ``between``, whole sectors) come a
    footer marker (type 3; one sector of header follows), the header with the
    real gdOffset and the end-of-stream marker (qemu-img 7.2 writes no footer)."""
    footer_marker = struct.pack("<QII", 1, 0, 3).ljust(512, b"\0")
    eos_marker = bytes(512)
    return patch(image, gd_offset=GD_AT_END) + between + footer_marker + image[:512] + eos_marker


def patch_footer(data: bytes, **fields: int) -> bytes:
    """``data`` (ending in a footer) with fields of the footer's header replaced."""
    at = len(data) - 1024
    return data[:at] + patch(data[at : at + 512], **fields) + data[at + 512 :]


def same_as_qemu(path: Path | str, *, sparse_extents: bool = False, descriptor_file: bool = True) -> dict:
    """Our JSON equals qemu-img's, minus the keys the module docstring explains."""
    theirs, mine = qemu_info(path), ours(path)
    if descriptor_file:
        theirs.pop("actual-size")
        mine.pop("actual-size")
    if sparse_extents:
        theirs.pop("cluster-size")
        for extent in theirs["format-specific"]["data"]["extents"]:
            extent.pop("cluster-size")
    assert mine == theirs
    return mine


def qemu_img_info(path: Path) -> subprocess.CompletedProcess:
    """``qemu-img info`` of ``path``, success or failure."""
    return subprocess.run(
        ["qemu-img", "info", "--output=json", "-U", str(path)], check=False, capture_output=True, text=True
    )


def details(target) -> dict:
    return to_qemu_json(probe(target))["storprobe"]["details"]


# --- real images from qemu-img ---------------------------------------------


@pytest.mark.parametrize("size", ["64M", "1G", "3000M"])
def test_monolithic_sparse(tmp_path, size):
    path = qemu_img_create(tmp_path / "disk.vmdk", "vmdk", size)
    mine = assert_same_as_qemu(path)
    assert mine["format-specific"]["data"]["create-type"] == "monolithicSparse"
    assert details(path)["extents"] == [
        {"access": "RW", "sectors": mine["virtual-size"] // 512, "type": "SPARSE", "filename": "disk.vmdk"}
    ]


def test_stream_optimized(tmp_path):
    path = qemu_img_create(tmp_path / "disk.vmdk", "vmdk", "1G", "subformat=streamOptimized")
    mine = assert_same_as_qemu(path)
    assert mine["format-specific"]["data"]["extents"][0]["compressed"] is True


# --- streamOptimized footers ------------------------------------------------


@pytest.fixture
def stream(tmp_path) -> tuple[Path, bytes]:
    """A raw disk with data, and the streamOptimized image qemu-img converts it to."""
    raw = tmp_path / "disk.raw"
    raw.write_bytes(bytes(range(256)) * 4096 + bytes(3 << 20))  # 4 MiB, its first MiB data
    path = tmp_path / "plain.vmdk"
    run("qemu-img", "convert", "-f", "raw", "-O", "vmdk", "-o", "subformat=streamOptimized", raw, path)
    return raw, path.read_bytes()


def read_like_qemu(path: Path, raw: Path) -> dict:
    """qemu-img opens ``path``, reads the disk ``raw`` holds (so it used the
    footer's grain directory), and describes it as storprobe does."""
    run("qemu-img", "compare", "-f", "raw", "-F", "vmdk", raw, path)
    return assert_same_as_qemu(path)


def hazards_of(path: Path) -> list[str]:
    return [hazard.check for hazard in check(path).hazards]


def test_stream_optimized_footer_agrees(tmp_path, stream):
    """A footer that copies the header (gdOffset filled in) is safe, and both
    headers are in the details; qemu-img reads the disk through the footer."""
    raw, plain = stream
    path = tmp_path / "footer.vmdk"
    path.write_bytes(with_footer(plain))
    mine = read_like_qemu(path, raw)
    assert mine["format-specific"]["data"]["create-type"] == "streamOptimized"
    assert hazards_of(path) == []
    facts = details(path)
    header, footer = facts["header"], facts["footer"]
    assert (header["gd-offset"], footer["gd-offset"]) == (GD_AT_END, struct.unpack_from("<Q", plain, 56)[0])
    assert footer.pop("agrees") is True
    assert footer.pop("marker-sectors") == 1
    footer.pop("gd-offset"), header.pop("gd-offset")
    assert footer == header
    assert (footer["capacity"] * 512, footer["grain-size"] * 512) == (mine["virtual-size"], mine["cluster-size"])
    assert (footer["version"], footer["compress-algorithm"]) == (3, 1)


def cut_short(data: bytes) -> bytes:
    return data[:-100]  # the end-of-stream marker's last 100 zeros, which QEMU reads as zeros


@pytest.mark.parametrize(
    ("edit", "difference"),
    [
        pytest.param(lambda d: patch_footer(d, desc_offset=2), "descriptor-offset 1 in the header", id="desc-offset"),
        pytest.param(lambda d: patch_footer(d, desc_size=1), "descriptor-size 20 in the header, 1", id="desc-size"),
        pytest.param(lambda d: patch(d, version=1), "version 1 in the header, 3", id="version"),
        pytest.param(lambda d: patch(d, version=9), "version 9 in the header, 3", id="header-version-qemu-ignores"),
        pytest.param(lambda d: patch(d, capacity=7, grain_size=3), "capacity 7 in the header", id="capacity"),
        pytest.param(lambda d: patch(d, flags=0), "flags 0 in the header", id="flags"),
        pytest.param(
            lambda d: d[:-1536] + struct.pack("<Q", 0) + d[-1528:], "footer marker of 0 sectors, not 1", id="marker"
        ),
        pytest.param(cut_short, "end-of-stream marker cut short", id="end-of-stream"),
    ],
)
def test_footer_that_disagrees_with_its_header(tmp_path, stream, edit, difference):
    """QEMU opens each (through the footer: same disk, same answer as ours);
    storprobe describes it, says how the two differ, and calls it unsafe."""
    raw, plain = stream
    path = tmp_path / "footer.vmdk"
    path.write_bytes(edit(with_footer(plain)))
    read_like_qemu(path, raw)
    footer = details(path)["footer"]
    assert footer["agrees"] is False
    assert [d for d in footer["differences"] if d.startswith(difference)]
    assert hazards_of(path) == ["vmdk.footer-mismatch"]


def test_footer_pointing_at_another_descriptor(tmp_path, stream):
    """The footer's descriptor fields name a second descriptor whose flat
    extent is /etc/passwd. QEMU 7.2 reads the one at sector 1 and opens the
    disk; a reader that trusts the footer would open the host file, so
    ``storprobe check`` says UNSAFE and names it."""
    raw, plain = stream
    second = descriptor("monolithicFlat", 'RW 8192 FLAT "/etc/passwd" 0').ljust(1024, b"\0")
    sector = len(plain) // 512
    path = tmp_path / "footer.vmdk"
    path.write_bytes(patch_footer(with_footer(plain, between=second), desc_offset=sector, desc_size=2))
    read_like_qemu(path, raw)
    footer = details(path)["footer"]
    assert footer["descriptor-extents"] == [
        {"access": "RW", "sectors": 8192, "type": "FLAT", "filename": "/etc/passwd", "offset": 0}
    ]
    assert details(path)["extents"] == [{"access": "RW", "sectors": 8192, "type": "SPARSE", "filename": "plain.vmdk"}]
    assert hazards_of(path) == ["vmdk.footer-mismatch", "vmdk.external-extent", "vmdk.extent-path"]
    cli = subprocess.run(
        [sys.executable, "-m", "storprobe", "check", str(path)], check=False, capture_output=True, text=True
    )
    assert (cli.returncode, cli.stdout.splitlines()[0]) == (3, f"{path}: UNSAFE (vmdk)")
    assert "/etc/passwd" in cli.stdout


#: QEMU's rules on the header it uses: fields that break one, and its code.
HEADER_RULES = [
    pytest.param({"version": 4}, "unsupported-version", id="version"),
    pytest.param({"num_gtes_per_gt": 0}, "vmdk.gtes-per-gt", id="no-gtes"),
    pytest.param({"num_gtes_per_gt": 513}, "vmdk.gtes-per-gt", id="too-many-gtes"),
    pytest.param({"grain_size": 0}, "vmdk.grain-size", id="no-grain"),
    pytest.param({"grain_size": 0x400000}, "vmdk.grain-size", id="huge-grain"),
    pytest.param({"capacity": 1 << 26, "grain_size": 1, "num_gtes_per_gt": 1}, "vmdk.l1-size", id="l1-size"),
    pytest.param({"overhead": 10**6}, "vmdk.overhead", id="overhead"),
    pytest.param({"rgd_offset": 2**54 - 1}, "vmdk.rgd-offset", id="rgd-offset"),
]


@pytest.mark.parametrize(("fields", "code"), HEADER_RULES)
def test_rules_run_on_the_header_qemu_uses(tmp_path, stream, fields, code):
    """With GD_AT_END, QEMU checks the footer's header, not the one at the
    start: a footer breaking a rule is refused by both; a header at the start
    breaking it is opened by both, and flagged as a footer that disagrees."""
    raw, plain = stream
    path = tmp_path / "footer.vmdk"
    path.write_bytes(patch_footer(with_footer(plain), **fields))
    assert code_of(path) == code
    qemu_refuses(path)
    path.write_bytes(patch(with_footer(plain), **fields))
    read_like_qemu(path, raw)
    assert hazards_of(path) == ["vmdk.footer-mismatch"]


@pytest.mark.parametrize("subformat", ["monolithicFlat", "twoGbMaxExtentFlat"])
@pytest.mark.parametrize("size", ["64M", "5G"])
def test_flat_descriptor_files(tmp_path, subformat, size):
    path = qemu_img_create(tmp_path / "disk.vmdk", "vmdk", size, f"subformat={subformat}")
    mine = same_as_qemu(path)
    extents = mine["format-specific"]["data"]["extents"]
    assert all(e["filename"].startswith(str(tmp_path) + "/") for e in extents)
    if subformat == "twoGbMaxExtentFlat" and size == "5G":
        assert len(extents) == 3


@pytest.mark.parametrize("size", ["64M", "5G"])
def test_two_gb_max_extent_sparse(tmp_path, size):
    path = qemu_img_create(tmp_path / "disk.vmdk", "vmdk", size, "subformat=twoGbMaxExtentSparse")
    mine = same_as_qemu(path, sparse_extents=True)
    assert "cluster-size" not in mine


def test_relative_names_resolve_like_qemu(tmp_path, monkeypatch):
    """qemu-img appends an extent's name to the descriptor's directory as given."""
    (tmp_path / "sub").mkdir()
    monkeypatch.chdir(tmp_path)
    for name in ("sub/flat.vmdk", "sub//flat2.vmdk", "./sub/flat3.vmdk", "flat4.vmdk"):
        run("qemu-img", "create", "-q", "-f", "vmdk", "-o", "subformat=twoGbMaxExtentFlat", name, "64M")
        mine = same_as_qemu(name)  # a str: pathlib would normalise the name
        assert mine["format-specific"]["data"]["extents"][0]["filename"].startswith(name[: name.rfind("/") + 1])


@pytest.mark.parametrize("adapter", ["ide", "lsilogic", "buslogic", "legacyESX"])
def test_adapter_types(tmp_path, adapter):
    path = qemu_img_create(tmp_path / "disk.vmdk", "vmdk", "2G", f"adapter_type={adapter}")
    assert_same_as_qemu(path)


@pytest.mark.parametrize(
    "options",
    [("compat6=on",), ("zeroed_grain=on",), ("hwversion=10",), ("compat6=on", "subformat=monolithicFlat")],
)
def test_options(tmp_path, options):
    path = qemu_img_create(tmp_path / "disk.vmdk", "vmdk", "1G", *options)
    if "subformat=monolithicFlat" in options:
        same_as_qemu(path)
    else:
        assert_same_as_qemu(path)
    if "zeroed_grain=on" in options:
        assert details(path)["version"] == 2


@pytest.mark.parametrize("subformat", ["monolithicSparse", "streamOptimized", "twoGbMaxExtentSparse"])
def test_child_with_backing_file(tmp_path, subformat):
    """qemu-img refuses a backing file for flat subformats."""
    qemu_img_create(tmp_path / "parent.vmdk", "vmdk", "1G")
    child = tmp_path / "child.vmdk"
    run("qemu-img", "create", "-q", "-f", "vmdk", "-o", f"subformat={subformat}",
        "-b", "parent.vmdk", "-F", "vmdk", child)
    assert b'parentFileNameHint="parent.vmdk"' in child.read_bytes()
    split = subformat.startswith("twoGb")
    mine = same_as_qemu(child, descriptor_file=split, sparse_extents=split)
    assert mine["backing-filename"] == "parent.vmdk"
    assert mine["backing-filename-format"] == "vmdk"
    assert mine["format-specific"]["data"]["parent-cid"] != 0xFFFFFFFF


def test_sparse_extent_of_a_split_disk(tmp_path):
    """A twoGbMaxExtentSparse extent has a header but no descriptor text, so no
    CID: qemu-img refuses to open it; we still report the sparse extent itself,
    without format-specific data."""
    qemu_img_create(tmp_path / "disk.vmdk", "vmdk", "64M", "subformat=twoGbMaxExtentSparse")
    extent = tmp_path / "disk-s001.vmdk"
    assert "Invalid argument" in qemu_refuses(extent)
    mine = ours(extent)
    assert (mine["virtual-size"], mine["cluster-size"]) == (64 << 20, 65536)
    assert "format-specific" not in mine


# --- hand-built images qemu-img 7.2 cannot create ---------------------------


def test_vmfs(tmp_path):
    (tmp_path / "disk-flat.vmdk").write_bytes(bytes(4096))
    path = tmp_path / "disk.vmdk"
    path.write_bytes(descriptor("vmfs", 'RW 131072 VMFS "disk-flat.vmdk"'))
    mine = same_as_qemu(path)
    assert mine["format-specific"]["data"]["extents"][0]["format"] == "VMFS"
    assert details(path)["extents"] == [
        {"access": "RW", "sectors": 131072, "type": "VMFS", "filename": "disk-flat.vmdk"}
    ]


def test_vmfs_sparse(tmp_path):
    (tmp_path / "base-flat.vmdk").write_bytes(bytes(4096))
    (tmp_path / "base.vmdk").write_bytes(descriptor("vmfs", 'RW 131072 VMFS "base-flat.vmdk"'))
    (tmp_path / "disk-delta.vmdk").write_bytes(cowd())
    path = tmp_path / "disk.vmdk"
    path.write_bytes(
        descriptor("vmfsSparse", 'RW 131072 VMFSSPARSE "disk-delta.vmdk"', 'parentFileNameHint="base.vmdk"')
    )
    mine = same_as_qemu(path, sparse_extents=True)
    assert mine["backing-filename"] == "base.vmdk"


def test_sesparse(tmp_path):
    (tmp_path / "disk-sesparse.vmdk").write_bytes(sesparse())
    path = tmp_path / "disk.vmdk"
    path.write_bytes(descriptor("seSparse", 'RW 131072 SESPARSE "disk-sesparse.vmdk"'))
    same_as_qemu(path, sparse_extents=True)


def test_cowd_with_descriptor_keys(tmp_path):
    """QEMU reads CID at sector 1 even of a COWD file; with one there it opens it
    with an empty create-type and the COWD header's capacity and grain."""
    path = tmp_path / "disk.vmdk"
    path.write_bytes(cowd(text=b'CID=deadbeef\nparentCID=ffffffff\nparentFileNameHint="base.vmdk"\n'))
    qemu_img_create(tmp_path / "base.vmdk", "vmdk", "64M")
    mine = assert_same_as_qemu(path)
    assert mine["format-specific"]["data"]["create-type"] == ""
    assert mine["cluster-size"] == 4096
    assert details(path) == {"kind": "COWD", "version": 1, "extents": []}


def test_cowd_without_descriptor(tmp_path):
    """A plain COWD file: qemu-img cannot open it (no CID); we report its size."""
    path = tmp_path / "disk.vmdk"
    path.write_bytes(cowd(capacity=4096 * 8 * 3, gd_entries=3))
    qemu_refuses(path)
    mine = ours(path)
    assert (mine["format"], mine["virtual-size"], mine["cluster-size"]) == ("vmdk", 3 * 4096 * 8 * 512, 4096)
    assert "format-specific" not in mine


def test_kdmv_header_carrying_a_descriptor_file(tmp_path):
    """A KDMV header with capacity 0 and a descriptor: QEMU opens the descriptor's
    extents as if the file were a descriptor file, so do we."""
    sparse = qemu_img_create(tmp_path / "sparse.vmdk", "vmdk", "64M").read_bytes()
    (tmp_path / "data.raw").write_bytes(bytes(4096))
    (tmp_path / "abs.raw").write_bytes(bytes(4096))
    text = descriptor("monolithicFlat", 'RW 8 FLAT "data.raw" 0', f'RW 16 FLAT "{tmp_path}/abs.raw" 0')
    path = tmp_path / "disk.vmdk"
    path.write_bytes(patch(sparse, capacity=0)[:512] + text.ljust(20 * 512, b"\0") + sparse[21 * 512 :])
    mine = same_as_qemu(path)
    assert mine["virtual-size"] == 24 * 512
    assert [e["filename"] for e in mine["format-specific"]["data"]["extents"]] == [
        str(tmp_path / "data.raw"),
        str(tmp_path / "abs.raw"),
    ]


# --- the descriptor read QEMU's way -----------------------------------------


@pytest.fixture
def flat(tmp_path):
    (tmp_path / "flat.raw").write_bytes(bytes(4096))
    return tmp_path


@pytest.mark.parametrize(
    "text",
    [
        pytest.param(
            descriptor("monolithicFlat", 'parentFileNameHint="base.vmdk"', 'RW 100 FLAT "flat.raw" 0'),
            id="hint-followed-whatever-parentCID-says",
        ),
        pytest.param(
            b'# parentFileNameHint="base.vmdk"\n' + descriptor("monolithicFlat", 'RW 100 FLAT "flat.raw" 0'),
            id="hint-found-even-in-a-comment",
        ),
        pytest.param(
            descriptor("monolithicFlat", 'parentFileNameHint=""', 'RW 100 FLAT "flat.raw" 0'),
            id="empty-hint-is-no-backing-file",
        ),
        pytest.param(
            descriptor(
                "monolithicFlat",
                'RW 100 FLAT "flat.raw" 0',
                'RDONLY 50 FLAT "flat.raw" 0',
                'NOACCESS 50 FLAT "flat.raw" 0',
                "RW 50 ZERO",
                'RW 50 VMFSRDM "flat.raw"',
                'RW 0 FLAT "flat.raw" 0',
                'RW -5 FLAT "flat.raw" 0',
            ),
            id="readonly-zero-unknown-and-empty-extents-skipped",
        ),
        pytest.param(
            descriptor("twoGbMaxExtentFlat", "", 'RW 100 FLAT "flat.raw" 0', "", "", 'RW 7 FLAT "flat.raw" 9'),
            id="blank-line-before-an-extent-reads-it-twice",
        ),
        pytest.param(
            descriptor("monolithicFlat", 'RW 100 FLAT\n  "flat.raw"\n 3'),
            id="extent-line-goes-on-over-line-ends",
        ),
        pytest.param(
            descriptor("monolithicFlat", 'RW\n\n 100\nFLAT\n"flat.raw"\n\n3'),
            id="every-field-on-its-own-line",
        ),
        pytest.param(
            b'version=1\r\nparentCID=0000002a\r\nCID=1\r\ncreateType="vmfs"\r\nRW 100 VMFS "flat.raw"\r\n',
            id="crlf-and-CID-found-inside-parentCID",
        ),
        pytest.param(
            b"# Disk DescriptorFile\n   \n  \r\n" + descriptor("monolithicFlat", 'RW 100 FLAT "flat.raw" 0'),
            id="lines-of-spaces-before-the-version-line",
        ),
    ],
)
def test_descriptor_quirks_match_qemu(flat, text):
    qemu_img_create(flat / "base.vmdk", "vmdk", "64M")
    path = flat / "disk.vmdk"
    path.write_bytes(text)
    same_as_qemu(path)


def test_missing_extent_file_is_still_described(flat):
    """qemu-img opens every extent file and refuses the image when one is
    missing; storprobe never opens an extent, so it describes the descriptor."""
    path = flat / "disk.vmdk"
    path.write_bytes(descriptor("monolithicFlat", 'RW 100 FLAT "gone.raw" 0'))
    assert "No such file or directory" in qemu_refuses(path)
    mine = ours(path)
    assert mine["virtual-size"] == 100 * 512
    assert [e["filename"] for e in mine["format-specific"]["data"]["extents"]] == [str(flat / "gone.raw")]


def test_extents_recorded_faithfully(flat):
    path = flat / "disk.vmdk"
    path.write_bytes(
        descriptor(
            "monolithicFlat",
            'RW 100 FLAT "flat.raw" 0',
            'RDONLY 200 FLAT "/dev/sda" 2048',
            'NOACCESS 300 VMFSRAW "/vmfs/devices/disks/naa.1"',
            'RW 8 FLAT "nbd:localhost:10809" 0',
        )
    )
    assert details(path)["extents"] == [
        {"access": "RW", "sectors": 100, "type": "FLAT", "filename": "flat.raw", "offset": 0},
        {"access": "RDONLY", "sectors": 200, "type": "FLAT", "filename": "/dev/sda", "offset": 2048},
        {"access": "NOACCESS", "sectors": 300, "type": "VMFSRAW", "filename": "/vmfs/devices/disks/naa.1"},
        {"access": "RW", "sectors": 8, "type": "FLAT", "filename": "nbd:localhost:10809", "offset": 0},
    ]
    # never run qemu-img on this one: it would open the nbd extent
    mine = ours(path)
    assert mine["virtual-size"] == 108 * 512
    assert [e["filename"] for e in mine["format-specific"]["data"]["extents"]] == [
        str(flat / "flat.raw"),
        str(flat / "nbd:localhost:10809"),
    ]


@pytest.mark.parametrize(
    "text",
    [
        pytest.param(b'\nversion=1\ncreateType="vmfs"\n', id="empty-line-first"),
        pytest.param(b"#" + b"x" * 600 + b"\nversion=1\n", id="version-beyond-the-512-byte-probe"),
        pytest.param(b"  version=1\n", id="spaces-then-text"),
        pytest.param(b"version=4\n", id="version-4"),
        pytest.param(b'# Disk DescriptorFile\ncreateType="vmfs"\n', id="no-version-line"),
    ],
)
def test_text_that_qemu_does_not_probe_as_vmdk(tmp_path, text):
    path = tmp_path / "disk.vmdk"
    path.write_bytes(text)
    assert qemu_info(path)["format"] == "raw"
    assert ours(path)["format"] == "raw"


# --- one malformed header per rule ------------------------------------------


@pytest.fixture(scope="module")
def sparse_image(tmp_path_factory) -> bytes:
    require("qemu-img")
    path = tmp_path_factory.mktemp("vmdk") / "disk.vmdk"
    return qemu_img_create(path, "vmdk", "1G").read_bytes()


@pytest.mark.parametrize(
    ("fields", "code", "qemu_too"),
    [
        ({"version": 4}, "unsupported-version", True),
        ({"version": 0}, "unsupported-version", False),
        ({"desc_offset": 2}, "vmdk.descriptor-offset", False),
        ({"desc_size": 2048}, "vmdk.descriptor-size", False),
        ({"desc_size": 1000}, "vmdk.descriptor-range", False),
        ({"gd_offset": GD_AT_END}, "vmdk.footer", True),
        ({"num_gtes_per_gt": 0}, "vmdk.gtes-per-gt", True),
        ({"num_gtes_per_gt": 513}, "vmdk.gtes-per-gt", True),
        ({"grain_size": 0}, "vmdk.grain-size", True),
        ({"grain_size": 24}, "vmdk.grain-size", False),  # QEMU takes grains that are no power of two
        ({"grain_size": 0x400000}, "vmdk.grain-size", True),
        ({"capacity": (1 << 54) + 1, "grain_size": 0x200000}, "vmdk.capacity", True),  # QEMU: "File too large"
        ({"capacity": 1 << 26, "grain_size": 1, "num_gtes_per_gt": 1}, "vmdk.l1-size", True),
        ({"capacity": 55 << 48}, "vmdk.l1-size", False),  # QEMU counts 55 * 2**32 entries in 32 bits: 0
        ({"overhead": 10**6}, "vmdk.overhead", True),
        ({"gd_offset": 2**54 - 1}, "vmdk.gd-offset", True),  # QEMU: "Could not read l1 table"
        ({"gd_offset": 2**55}, "vmdk.gd-offset", False),  # QEMU's byte offset wraps to 0
        ({"rgd_offset": 2**54 - 1}, "vmdk.rgd-offset", True),  # flags has the redundant-directory bit
        ({"rgd_offset": 2**64 - 1}, "vmdk.rgd-offset", True),
        ({"rgd_offset": 2**55 + 0x15}, "vmdk.rgd-offset", False),  # QEMU's byte offset wraps to 0x2A00
    ],
)
def test_bad_sparse_header(tmp_path, sparse_image, fields, code, qemu_too):
    """Each rule, and whether QEMU has it too: the ones it lacks are the
    campaign's known divergences (tests/differential_campaign.py)."""
    data = patch(sparse_image, **fields)
    assert code_of(data) == code
    path = tmp_path / "bad.vmdk"
    path.write_bytes(data)
    assert (qemu_img_error(path, "vmdk") is not None) is qemu_too


def test_directories_past_the_end_of_the_file_read_as_zeros(tmp_path, sparse_image):
    """QEMU reads zeros for a grain directory past the end of the file (every
    grain unallocated) and opens the image; so does storprobe. The redundant
    one counts only when the header's flags say it is in use."""
    for fields in ({"gd_offset": 1 << 30}, {"rgd_offset": 1 << 30}, {"rgd_offset": 2**60, "flags": 1}):
        path = tmp_path / "far.vmdk"
        path.write_bytes(patch(sparse_image, **fields))
        assert assert_same_as_qemu(path)["format"] == "vmdk"


def test_bad_footer_version(sparse_image):
    """Version 1 at the start, version 9 in the footer QEMU reads instead."""
    assert code_of(patch(with_footer(patch(sparse_image, version=9)), version=1)) == "unsupported-version"


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(b"KDMV\1\0\0\0" + bytes(40), id="shorter-than-the-header"),
        pytest.param(patch(b"KDMV" + bytes(1020), version=1, gd_offset=GD_AT_END), id="no-room-for-a-footer"),
    ],
)
def test_truncated(data):
    assert code_of(data) == "truncated"


@pytest.mark.parametrize(
    ("offset", "value"),
    [
        pytest.param(12, 2, id="footer-marker-type"),  # type 2: a grain directory marker
        pytest.param(8, 1, id="footer-marker-size"),
        pytest.param(512, 0, id="footer-magic"),
        pytest.param(1024, 1, id="end-of-stream-value"),
        pytest.param(1036, 3, id="end-of-stream-type"),
    ],
)
def test_bad_footer_marker(tmp_path, sparse_image, offset, value):
    """The footer's structure QEMU checks: it refuses the file ("Invalid
    footer"), storprobe names the error and ``check`` calls it unsafe."""
    image = bytearray(with_footer(sparse_image))
    struct.pack_into("<I", image, len(image) - 1536 + offset, value)
    path = tmp_path / "bad.vmdk"
    path.write_bytes(image)
    assert code_of(path) == "vmdk.footer"
    assert "Invalid footer" in qemu_refuses(path)
    assert hazards_of(path) == ["malformed"]


def bad(text: bytes, code: str, qemu_says: str | None, id: str):
    """A malformed descriptor, its code, and what qemu-img says of it (None: qemu-img takes it)."""
    return pytest.param(text, code, qemu_says, id=id)


def test_descriptor_bytes_that_are_not_utf8_read_as_qemu_shows_them(tmp_path):
    """An extent name in Latin-1: QEMU opens the file by its bytes and shows
    the name with a U+FFFD; so do we (we once refused such a descriptor)."""
    with (tmp_path / "f\udce9-flat.vmdk").open("wb") as extent:
        extent.truncate(4096)  # sparse: qemu-img adds an extent's allocation to the disk size
    path = tmp_path / "disk.vmdk"
    path.write_bytes(descriptor("monolithicFlat", 'RW 8 FLAT "f\xe9-flat.vmdk" 0').replace(b"\xc3\xa9", b"\xe9"))
    extents = assert_same_as_qemu(path)["format-specific"]["data"]["extents"]
    assert extents[0]["filename"] == str(tmp_path / "f\ufffd-flat.vmdk")


@pytest.mark.parametrize(
    ("text", "code", "qemu_says"),
    [
        bad(b"version=1\n" + b"#" * (1 << 20), "vmdk.descriptor-size", None, "longer-than-1MiB"),
        bad(descriptor("custom", 'RW 8 FLAT "f" 0'), "vmdk.create-type", "Unsupported image type", "custom"),
        bad(descriptor("fullDevice", 'RW 8 FLAT "/dev/sda" 0'), "vmdk.create-type", "Unsupported", "fullDevice"),
        bad(descriptor("monolithicSparse", 'RW 8 SPARSE "f"'), "vmdk.create-type", "Unsupported", "sparse-as-text"),
        bad(b'version=1\nCID=1\nparentCID=1\nRW 8 FLAT "f" 0\n', "vmdk.create-type-missing",
            "invalid VMDK image descriptor", "no-createType"),
        bad(b'version=1\ncreateType="monolithicFlat\nRW 8 FLAT f 0\n', "vmdk.create-type-missing",
            "invalid VMDK image descriptor", "unterminated-createType"),
        bad(b'version=1\ncreateType="' + b"x" * 128 + b'"\n', "vmdk.create-type-missing",
            "invalid VMDK image descriptor", "createType-too-long"),
        bad(descriptor("monolithicFlat"), "vmdk.no-extents", "Assertion", "no-extent-lines"),
        bad(descriptor("monolithicFlat", 'RDONLY 8 FLAT "f" 0'), "vmdk.no-extents", "Assertion", "only-readonly"),
        bad(descriptor("monolithicFlat", 'RW 8 FLAT "f"'), "vmdk.extent-line", "Invalid extent line", "flat-no-offset"),
        bad(descriptor("monolithicFlat", 'RW 8 FLAT "f" -1'), "vmdk.extent-line", "Invalid extent", "negative-offset"),
        bad(descriptor("vmfs", 'RW 8 VMFS "f" 0'), "vmdk.extent-line", "Invalid extent line", "vmfs-offset"),
        bad(descriptor("twoGbMaxExtentSparse", 'RW 8 SPARSE "f" 0'), "vmdk.extent-line", "Invalid extent line",
            "sparse-offset"),
        bad(descriptor("monolithicFlat", 'RW 8 VMFSRDM "f" 0'), "vmdk.extent-line", "Invalid extent line",
            "unknown-type-with-offset"),
        # QEMU reads 511 bytes of a name, then misses the closing quote and the offset
        bad(descriptor("monolithicFlat", f'RW 8 FLAT "{"n" * 600}" 0'), "vmdk.extent-line", "Invalid extent line",
            "name-longer-than-511"),
        # QEMU clamps the count to INT64_MAX; we refuse it
        bad(descriptor("monolithicFlat", 'RW 99999999999999999999 FLAT "f" 0'), "vmdk.extent-line", None,
            "sectors-out-of-range"),
        bad(descriptor("monolithicFlat", *['RW 1 FLAT "f" 0'] * 32769), "vmdk.extent-count", None, "32769-extents"),
        bad(descriptor("monolithicFlat", 'RW 9223372036854775807 FLAT "f" 0'), "vmdk.capacity", None,
            "bytes-overflow"),
        bad(descriptor("vmfs\xe9").replace(b"\xc3\xa9", b"\xe9"), "vmdk.create-type", "Unsupported",
            "latin1-createType"),
        bad(descriptor("monolithicFlat", 'RW 8 FLAT "f" 0', head=with_cid("zz")), "vmdk.cid", "Invalid argument",
            "CID-not-hex"),
        bad(descriptor("monolithicFlat", 'RW 8 FLAT "f" 0', head=with_cid("123456789")), "vmdk.cid", None,
            "CID-over-32-bits"),
        bad(descriptor("monolithicFlat", 'RW 8 FLAT "f" 0', 'parentFileNameHint="base.vmdk'), "vmdk.parent-hint",
            "Invalid argument", "unterminated-hint"),
        bad(descriptor("monolithicFlat", 'RW 8 FLAT "f" 0', f'parentFileNameHint="{"p" * 4096}"'),
            "vmdk.parent-hint", "Invalid argument", "hint-longer-than-PATH_MAX"),
    ],
)
def test_bad_descriptor(tmp_path, text, code, qemu_says):
    assert code_of(text) == code
    if qemu_says:
        (tmp_path / "f").write_bytes(bytes(4096))
        path = tmp_path / "disk.vmdk"
        path.write_bytes(text)
        assert qemu_says in qemu_refuses(path)


def test_bad_embedded_descriptor(sparse_image):
    """A KDMV file carrying a descriptor file is held to the same rules."""
    text = descriptor("streamOptimized", 'RW 8 FLAT "f" 0')
    image = patch(sparse_image, capacity=0)[:512] + text.ljust(10240, b"\0") + sparse_image[21 * 512 :]
    assert code_of(image) == "vmdk.create-type"


@pytest.mark.parametrize(
    ("data", "code"),
    [
        pytest.param(cowd(grain=0), "vmdk.grain-size", id="grain-0"),
        pytest.param(cowd(grain=6), "vmdk.grain-size", id="grain-6"),
        pytest.param(cowd(grain=0x400000), "vmdk.grain-size", id="grain-2GiB"),
        pytest.param(cowd(gd_entries=32 * 1024 * 1024 + 1), "vmdk.l1-size", id="32Mi+1-directory-entries"),
        pytest.param(b"COWD" + bytes(20), "truncated", id="shorter-than-the-header"),
    ],
)
def test_bad_cowd(data, code):
    assert code_of(data) == code


# --- random input -----------------------------------------------------------


@pytest.fixture(scope="module")
def seeds(tmp_path_factory) -> list[bytes]:
    require("qemu-img")
    tmp = tmp_path_factory.mktemp("seeds")
    sparse = qemu_img_create(tmp / "sparse.vmdk", "vmdk", "1G").read_bytes()
    stream = qemu_img_create(tmp / "stream.vmdk", "vmdk", "1G", "subformat=streamOptimized").read_bytes()
    flat = qemu_img_create(tmp / "flat.vmdk", "vmdk", "1G", "subformat=twoGbMaxExtentFlat").read_bytes()
    kdmv_descriptor = patch(sparse, capacity=0)[:512] + flat.ljust(10240, b"\0") + sparse[21 * 512 :]
    return [sparse, with_footer(stream), flat, cowd(text=b"CID=1\nparentCID=2\n"), kdmv_descriptor]


@given(
    seed=st.integers(0, 4),
    edits=st.lists(st.tuples(st.integers(-2048, 2047), st.integers(0, 255)), min_size=1, max_size=12),
    cut=st.none() | st.integers(0, 70000),
)
def test_mutated_headers_never_crash(seeds, seed, edits, cut):
    data = bytearray(seeds[seed])
    for offset, value in edits:
        if -len(data) <= offset < len(data):
            data[offset] = value
    probe_or_named_error(BytesSource(bytes(data[:cut]), "dir/disk.vmdk"))


def weighted(*choices: tuple[int, str]) -> st.SearchStrategy[str]:
    return st.sampled_from([text for weight, text in choices for _ in range(weight)])


SPACE = weighted((6, " "), (1, "  "), (1, "\t"), (1, "\n"), (1, " \n "))
EXTENT_LINE = st.tuples(
    weighted((6, "RW"), (1, "RDONLY"), (1, "NOACCESS"), (1, "rw"), (1, "#"), (1, "")),
    SPACE,
    weighted((3, "7"), (2, "131072"), (1, "0"), (1, "-1"), (1, "+3"), (1, "00012"), (1, "x")),
    SPACE,
    weighted((4, 'FLAT {} 0'), (3, "VMFS {}"), (1, "FLAT {}"), (1, "VMFS {} 0"), (1, "FLAT {} -1"),
             (1, "FLAT {} +2"), (1, "ZERO"), (1, "VMFSRDM {}"), (1, "FLAT {}\n3")),
    weighted((6, '"e.raw"'), (1, '"e.raw'), (1, "e.raw")),
    weighted((4, "\n"), (1, "\r\n"), (1, "\n\n"), (1, "\n  \n"), (1, "")),
).map(lambda p: p[0] + p[1] + p[2] + p[3] + p[4].format(p[5]) + p[6])


@settings(max_examples=100, deadline=None)
@given(lines=st.lists(EXTENT_LINE, max_size=5))
def test_extent_lines_read_as_qemu_reads_them(tmp_path_factory, lines):
    """Random extent lines, read by qemu-img and by us: the same extents and
    size, or both refuse them."""
    tmp = tmp_path_factory.mktemp("lines")
    (tmp / "e.raw").write_bytes(bytes(512))
    path = tmp / "disk.vmdk"
    path.write_bytes(descriptor("monolithicFlat") + "".join(lines).encode())
    proc = qemu_img_info(path)
    try:
        mine = ours(path)
    except ProbeError as exc:
        assert exc.code != "plugin-error"
        assert proc.returncode != 0, (exc, proc.stdout)
        return
    if "No such file or directory" in proc.stderr:  # a quote left open named another file
        names = {e["filename"] for e in mine["format-specific"]["data"]["extents"]}
        assert names - {str(tmp / "e.raw")}, proc.stderr
        return
    assert proc.returncode == 0, (mine, proc.stderr)
    theirs = json.loads(proc.stdout)
    assert mine["virtual-size"] == theirs["virtual-size"]
    assert mine["format-specific"] == theirs["format-specific"]
