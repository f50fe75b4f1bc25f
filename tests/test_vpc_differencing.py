"""A differencing VHD (disk type 4) on the data path, against QEMU 7.2.

qemu-img cannot make one: the tests turn a dynamic VHD that qemu-io wrote into
one over a parent VHD (``builders.differencing_vhd``). QEMU 7.2 opens it as a
plain dynamic disk: a block the allocation table names is the child's data
throughout (its sector bitmap unread), any other block reads as zeros, and the
parent is never opened. ``map``, ``convert``, ``compare``, ``measure`` and
``open_image`` read it so, whatever the parent is (there, missing, refused by
the policy); the record still names the parent, as the spec says (a row of
the README's differences table).
"""

from __future__ import annotations

import filecmp
import struct
import subprocess
from pathlib import Path

import pytest

from storprobe import Backing, ProbeError, probe
from storprobe.cli import main
from storprobe.datapath import IGNORE, LOCAL, REFUSE, backing_inside, open_image

from builders import differencing_vhd, edit, on_both_footers
from oracle import qemu_guest_bytes, qemu_img_create, qemu_info, qemu_io, qemu_map, require

MiB = 1 << 20
CHILD_WRITES = ("write -P 0x22 2M 4k", "write -P 0x33 5M 1M", "write -z 7M 64k")


@pytest.fixture
def pair(tmp_path: Path) -> tuple[Path, Path]:
    """(child, parent): the parent full of 0x11, the child holding two written blocks and a zeroed one."""
    parent = qemu_img_create(tmp_path / "parent.vhd", "vpc", "8M")
    qemu_io(parent, "write -P 0x11 0 8M", fmt="vpc")
    child = qemu_img_create(tmp_path / "child.vhd", "vpc", "8M")
    qemu_io(child, *CHILD_WRITES, fmt="vpc")
    return differencing_vhd(child, parent), parent


def storprobe(*args: str | Path) -> subprocess.CompletedProcess:
    return subprocess.run([require("storprobe"), *map(str, args)], capture_output=True, text=True, check=False)


def assert_same_map(capsys: pytest.CaptureFixture[str], image: Path) -> str:
    """``storprobe map`` prints qemu-img map's text, JSON and human."""
    for output in ("json", "human"):
        theirs = qemu_map(image, output=output)
        assert theirs.returncode == 0, theirs.stderr
        status = main(["map", "--output", output, str(image)])
        assert (status, capsys.readouterr().out) == (0, theirs.stdout.decode())
    return qemu_map(image).stdout.decode()


def test_the_record_names_the_parent(pair):
    child, parent = pair
    info = probe(child)
    assert info.backing == Backing("parent.vhd", "vpc") and info.details["disk-type"] == "differencing"
    assert "backing-filename" not in qemu_info(child)  # QEMU shows none


def test_map_is_qemus_byte_for_byte(capsys, pair):
    """Unallocated blocks are zeros of the child (depth 0), as QEMU says: no range is the parent's."""
    child, parent = pair
    text = assert_same_map(capsys, child)
    assert '"depth": 1' not in text and '"present": false' not in text and '"data": true' in text
    parent.unlink()
    assert assert_same_map(capsys, child) == text


def test_convert_is_qemus_by_cmp(tmp_path, pair):
    """The guest bytes are the child's alone: zeros where the parent holds 0x11."""
    child, parent = pair
    theirs, mine = tmp_path / "theirs.raw", tmp_path / "mine.raw"
    subprocess.run([require("qemu-img"), "convert", "-O", "raw", str(child), str(theirs)], check=True)
    assert storprobe("convert", "-O", "raw", child, mine).returncode == 0
    assert filecmp.cmp(theirs, mine, shallow=False)
    data = mine.read_bytes()
    assert data[:4096] == bytes(4096) and data[2 * MiB : 2 * MiB + 4096] == b"\x22" * 4096
    assert b"\x11" not in data


@pytest.mark.parametrize("parent_is", ["there", "missing", "not a vhd", "outside the directory"])
def test_the_parent_is_never_opened(tmp_path, capsys, pair, parent_is):
    """Whatever the parent is, every policy reads the same bytes (QEMU's), and
    the commands work as qemu-img's do: nothing below the child is opened, so
    the default policy (refuse backing files) has nothing to refuse."""
    child, parent = pair
    expected = qemu_guest_bytes(child, tmp_path)
    inside = tmp_path / "allowed"
    inside.mkdir()
    if parent_is == "missing":
        parent.unlink()
    elif parent_is == "not a vhd":
        parent.write_bytes(b"QFI\xfb" + bytes(508))
    elif parent_is == "outside the directory":
        child = child.rename(inside / child.name)
    for policy in (REFUSE, IGNORE, LOCAL, backing_inside(inside)):
        with open_image(child, backing=policy) as disk:
            assert len(disk.layers) == 1 and disk.read() == expected
    assert_same_map(capsys, child)
    measured = subprocess.run([require("qemu-img"), "measure", "-O", "qcow2", str(child)], capture_output=True,
                              text=True, check=True)
    assert storprobe("measure", "-O", "qcow2", child).stdout == measured.stdout


def test_compare_exit_statuses_are_qemus(tmp_path, pair):
    child, parent = pair
    same = tmp_path / "same.raw"
    same.write_bytes(qemu_guest_bytes(child, tmp_path))
    for a, b in ((child, same), (child, parent), (parent, child)):
        theirs = subprocess.run([require("qemu-img"), "compare", str(a), str(b)], capture_output=True, text=True)
        mine = storprobe("compare", a, b)
        assert (mine.returncode, mine.stdout) == (theirs.returncode, theirs.stdout)
    assert storprobe("compare", child, same).returncode == 0


def test_the_sector_bitmap_is_not_read(tmp_path, capsys, pair):
    """A block whose sector bitmap marks none of its sectors: the spec reads them
    from the parent, QEMU 7.2 from the child's block, and so do we (on purpose:
    the commands are qemu-img's)."""
    child, _ = pair
    data = bytearray(child.read_bytes())
    table = struct.unpack_from(">Q", data, 512 + 16)[0]
    bitmap = 512 * struct.unpack_from(">I", data, table + 4 * 2)[0]  # the block at 4 MiB holds 0x33 from 5 MiB
    data[bitmap : bitmap + 512] = bytes(512)
    child.write_bytes(bytes(data))
    assert_same_map(capsys, child)
    with open_image(child, backing=LOCAL) as disk:
        assert disk.pread(5 * MiB, 4) == b"\x33" * 4 == qemu_guest_bytes(child, tmp_path)[5 * MiB : 5 * MiB + 4]


def test_verify_answers_63_as_qemu_img_check(pair):
    child, _ = pair
    theirs = subprocess.run([require("qemu-img"), "check", str(child)], capture_output=True, text=True)
    assert theirs.returncode == storprobe("verify", child).returncode == 63


def test_a_differencing_disk_without_a_parent_name_is_refused_where_qemu_maps_it(tmp_path, capsys):
    """A differencing disk names its parent (the spec); QEMU, which reads no
    parent, maps one that names none; every command here refuses it
    (``vpc.parent-name``), one line, exit 1."""
    image = qemu_img_create(tmp_path / "nameless.vhd", "vpc", "8M")
    qemu_io(image, "write -P 1 0 4k", fmt="vpc")
    edit(image, *on_both_footers(60, ">I", 4))
    assert qemu_map(image).returncode == 0
    with pytest.raises(ProbeError) as refused:
        open_image(image)
    assert refused.value.code == "vpc.parent-name"
    for command in (["map", "--output", "json"], ["convert", "-O", "raw"]):
        out = [tmp_path / "out.raw"] if command[0] == "convert" else []
        mine = storprobe(*command, image, *out)
        assert mine.returncode == 1 and mine.stderr.count("\n") == 1 and "parent" in mine.stderr
        assert "Traceback" not in mine.stderr


def test_info_backing_chain_lists_the_parent_qemu_does_not(pair):
    """``info --backing-chain``: the spec's chain (the parent below the child),
    where qemu-img lists the child alone; a missing parent is a named error
    after the child, as for any chain."""
    child, parent = pair
    theirs = subprocess.run([require("qemu-img"), "info", "--backing-chain", "--output=json", str(child)],
                            capture_output=True, text=True, check=True)
    assert theirs.stdout.count('"filename"') == 1
    mine = storprobe("info", "--backing-chain", "--output", "json", child)
    assert mine.returncode == 0 and mine.stdout.count('"filename"') == 2
    parent.unlink()
    mine = storprobe("info", "--backing-chain", "--output", "json", child)
    assert mine.returncode == 1 and mine.stdout.count('"filename"') == 1 and "parent.vhd" in mine.stderr
