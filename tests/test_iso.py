"""iso: ISO 9660 images made by xorriso, against qemu-img, isosize, blkid and sfdisk.

QEMU has no iso driver: qemu-img opens an ISO as "raw", and so does our
qemu-img-shaped JSON, key for key; "iso" (libvirt's name for it, in our XML) is
under our own key, ``storprobe.format``.
"""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from storprobe import probe

from oracle import assert_same_as_qemu, code_of, probe_or_named_error, run

SECTOR = 2048
PVD = 16 * SECTOR


def xorriso(path: Path, tree: Path, *options: str) -> Path:
    """``xorriso -as mkisofs -o path [options] tree``."""
    run("xorriso", "-as", "mkisofs", "-quiet", "-o", path, *options, tree)
    return path


@pytest.fixture
def tree(tmp_path) -> Path:
    root = tmp_path / "tree"
    (root / "boot").mkdir(parents=True)
    (root / "hello.txt").write_text("hello\n")
    (root / "boot" / "boot.img").write_bytes(bytes(range(256)) * 8)
    return root


@pytest.fixture
def mbr_template(tmp_path) -> Path:
    """An isohybrid MBR template: the 432 bytes of boot code xorriso copies in
    (syslinux's isohdpfx.bin in real life; the code does not matter here)."""
    path = tmp_path / "isohdpfx.bin"
    path.write_bytes(bytes(432))
    return path


def blkid(path: Path) -> dict[str, str]:
    out = run("blkid", "-p", "-o", "export", path).stdout.decode()
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def check_against_tools(path: Path) -> dict:
    """Same as qemu-img; volume facts as isosize and blkid see them."""
    mine = assert_same_as_qemu(path)
    info = probe(path)
    assert (mine["format"], info.format) == ("raw", "iso")
    out = run("isosize", "-x", path).stdout.decode()  # "<path>: sector count: 185, sector size: 2048"
    count, size = map(int, re.findall(r"sector (?:count|size): (\d+)", out))
    assert info.details["volume-size"] == count * size
    tags = blkid(path)
    assert tags["TYPE"] == "iso9660"
    assert info.details["volume-id"] == tags.get("LABEL", "")
    assert info.details["system-id"] == tags.get("SYSTEM_ID", "")
    assert mine["virtual-size"] == -(-path.stat().st_size // 512) * 512
    return info.details


def test_plain_iso(tmp_path, tree):
    path = xorriso(tmp_path / "a.iso", tree, "-V", "MYVOL", "-sysid", "MYSYS")
    details = check_against_tools(path)
    assert (details["volume-id"], details["system-id"]) == ("MYVOL", "MYSYS")
    assert "el-torito" not in details and "partition-table" not in details


def test_odd_sized_iso(tmp_path, tree):
    """Bytes after the volume that are not a whole sector: qemu-img rounds the size up."""
    path = xorriso(tmp_path / "odd.iso", tree)
    with open(path, "ab") as f:
        f.write(bytes(100))
    check_against_tools(path)


def test_el_torito_iso(tmp_path, tree):
    path = xorriso(tmp_path / "b.iso", tree, "-V", "BOOT", "-b", "boot/boot.img", "-no-emul-boot")
    details = check_against_tools(path)
    assert details["el-torito"] is True
    assert "partition-table" not in details


def sfdisk_partitions(path: Path) -> list[dict]:
    table = json.loads(run("sfdisk", "--json", path).stdout)["partitiontable"]
    assert table["label"] == "dos"
    return table["partitions"]


@pytest.mark.parametrize(
    "extra",
    [(), ("-eltorito-alt-boot", "-e", "boot/boot.img", "-no-emul-boot", "-isohybrid-gpt-basdat")],
    ids=["isohybrid", "isohybrid-efi"],
)
def test_isohybrid_iso_reports_both(tmp_path, tree, mbr_template, extra):
    """An isohybrid ISO is an ISO with El Torito and, for USB sticks, an MBR too."""
    path = xorriso(
        tmp_path / "h.iso",
        tree,
        "-V",
        "HYB",
        "-isohybrid-mbr",
        mbr_template,
        "-b",
        "boot/boot.img",
        "-no-emul-boot",
        *extra,
    )
    details = check_against_tools(path)
    assert details["el-torito"] is True
    assert details["partition-table"] == "mbr"
    assert details["partitions"] == len(sfdisk_partitions(path))


# ---- rules ------------------------------------------------------------------


def descriptor(kind: int, body: bytes = b"") -> bytes:
    return (bytes([kind]) + b"CD001\x01" + body).ljust(SECTOR, b"\0")


def primary(
    block_size: int = 2048,
    blocks: int = 20,
    *,
    block_size_be: int | None = None,
    blocks_be: int | None = None,
) -> bytes:
    """A primary volume descriptor with both-endian fields (big-endian copies overridable)."""
    body = bytearray(SECTOR - 7)
    struct.pack_into("<I", body, 80 - 7, blocks)
    struct.pack_into(">I", body, 84 - 7, blocks if blocks_be is None else blocks_be)
    struct.pack_into("<H", body, 128 - 7, block_size)
    struct.pack_into(">H", body, 130 - 7, block_size if block_size_be is None else block_size_be)
    body[40 - 7 : 72 - 7] = b"HANDMADE".ljust(32)
    return descriptor(1, bytes(body))


def iso(*descriptors: bytes) -> bytes:
    """A hand-built image: an empty system area, then the descriptors, padded to 20 sectors."""
    return (bytes(PVD) + b"".join(descriptors)).ljust(20 * SECTOR, b"\0")


def test_hand_built_iso_is_valid():
    info = probe(iso(primary(), descriptor(255)))
    assert info.format == "iso"
    assert (info.details["volume-id"], info.details["volume-size"]) == ("HANDMADE", 20 * SECTOR)


RULES = {
    "unterminated": [iso(primary(), b"\0" * SECTOR), iso(primary(), *[descriptor(2)] * 70)],
    "descriptor-type": [iso(primary(), descriptor(7), descriptor(255))],
    "no-primary": [iso(descriptor(2), descriptor(255))],
    "both-endian": [
        iso(primary(block_size_be=512), descriptor(255)),
        iso(primary(blocks_be=21), descriptor(255)),
    ],
    "block-size": [
        iso(primary(block_size=4096), descriptor(255)),
        iso(primary(block_size=0), descriptor(255)),
    ],
}


CASES = [(rule, data) for rule, datas in RULES.items() for data in datas]


@pytest.mark.parametrize("rule, data", CASES, ids=[f"{rule}-{i}" for i, (rule, _) in enumerate(CASES)])
def test_rule(rule, data):
    assert code_of(data) == f"iso.{rule}"


def test_truncated_descriptor_set():
    assert code_of(iso(primary(), descriptor(255))[: PVD + SECTOR + 3]) == "truncated"


@pytest.fixture(scope="module")
def real_iso(tmp_path_factory) -> bytes:
    root = tmp_path_factory.mktemp("iso")
    (root / "t" / "boot").mkdir(parents=True)
    (root / "t" / "boot" / "boot.img").write_bytes(bytes(2048))
    path = xorriso(root / "m.iso", root / "t", "-V", "M", "-b", "boot/boot.img", "-no-emul-boot")
    return path.read_bytes()


@given(
    edits=st.lists(
        st.tuples(st.integers(PVD, PVD + 4 * SECTOR - 1), st.integers(0, 255)), min_size=1, max_size=12
    )
)
def test_descriptor_mutations(real_iso, edits):
    data = bytearray(real_iso)
    for at, value in edits:
        data[at] = value
    probe_or_named_error(bytes(data))
