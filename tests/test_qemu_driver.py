"""The qemu-img-shaped JSON's ``format`` names a driver QEMU 7.2 opens the image
with: orchestration passes it straight to ``qemu-img -f`` / ``-drive format=``.

One real image per row of the format table (a new row without one fails
``test_every_row_has_an_image``). Where QEMU has no driver of the format's own
(an ISO, a cow file, LUKS2), it reads the bytes as raw, and the JSON is then
qemu-img's, key for key; storprobe's reading stays under ``storprobe``.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from pathlib import Path

import pytest

from storprobe import probe
from storprobe.qemu_json import EXTRA_KEY, to_qemu_json
from storprobe.registry import format_table

from builders import PREAMBLE, build_dmg, qemu_v2, uml_v3
from oracle import qemu_img_create, qemu_info, require, run


def _xorriso(path: Path) -> Path:
    tree = path.parent / "tree"
    tree.mkdir()
    (tree / "a.txt").write_text("a\n")
    run("xorriso", "-as", "mkisofs", "-quiet", "-o", path, tree)
    return path


def _luks(path: Path, version: int) -> Path:
    if version == 1:
        run("qemu-img", "create", "-q", "-f", "luks", "--object", "secret,id=s0,data=pw",
            "-o", "key-secret=s0,iter-time=10", path, "1M")
        return path
    path.write_bytes(bytes(2 << 20))
    run("cryptsetup", "luksFormat", "--type", "luks2", "--batch-mode", "--key-file", "-", "--pbkdf", "pbkdf2",
        "--pbkdf-force-iterations", "1000", "--luks2-keyslots-size", "512k", "--luks2-metadata-size", "16k",
        path, input=b"pw")
    return path


def _bytes(data: bytes) -> Callable[[Path], Path]:
    def write(path: Path) -> Path:
        path.write_bytes(data)
        return path

    return write


def _hand_built() -> dict[str, tuple[str, Callable[[Path], Path]]]:
    """Rows no tool here writes: bytes as their writers laid them out (see each test module)."""

    cloop = PREAMBLE.ljust(128, b"\0") + struct.pack(">II", 65536, 4) + bytes(5 * 8) + bytes(4096)
    return {
        "cloop": ("cloop", _bytes(cloop)),
        "cow-v2": ("cow", _bytes(qemu_v2(1 << 20, b"/base.img"))),
        "cow-v3": ("cow", _bytes(uml_v3(1 << 20))),
        "dmg": ("dmg", _bytes(build_dmg(bytes(range(256)) * 64))),
    }


#: case -> (row, maker of the image at a path)
CASES: dict[str, tuple[str, Callable[[Path], Path]]] = {
    "raw": ("raw", lambda p: qemu_img_create(p, "raw", "1M")),
    "dir": ("dir", lambda p: (p.mkdir(), p)[1]),
    "iso": ("iso", _xorriso),
    "qcow": ("qcow", lambda p: qemu_img_create(p, "qcow", "16M")),
    "qcow2-v2": ("qcow2", lambda p: qemu_img_create(p, "qcow2", "16M", "compat=0.10")),
    "qcow2-v3": ("qcow2", lambda p: qemu_img_create(p, "qcow2", "16M", "lazy_refcounts=on")),
    "qed": ("qed", lambda p: qemu_img_create(p, "qed", "16M")),
    "vmdk-sparse": ("vmdk", lambda p: qemu_img_create(p, "vmdk", "16M")),
    "vmdk-stream": ("vmdk", lambda p: qemu_img_create(p, "vmdk", "16M", "subformat=streamOptimized")),
    "vmdk-descriptor": ("vmdk", lambda p: qemu_img_create(p, "vmdk", "16M", "subformat=monolithicFlat")),
    "vpc-dynamic": ("vpc", lambda p: qemu_img_create(p, "vpc", "16M")),
    "vpc-fixed": ("vpc", lambda p: qemu_img_create(p, "vpc", "1M", "subformat=fixed")),
    "vhdx": ("vhdx", lambda p: qemu_img_create(p, "vhdx", "16M")),
    "vdi": ("vdi", lambda p: qemu_img_create(p, "vdi", "16M")),
    "parallels": ("parallels", lambda p: qemu_img_create(p, "parallels", "16M")),
    "luks1": ("luks", lambda p: _luks(p, 1)),
    "luks2": ("luks", lambda p: _luks(p, 2)),
    "bochs": ("bochs", lambda p: (run("bximage", "-q", "-func=create", "-hd=10M", "-imgmode=growing", p), p)[1]),
    **_hand_built(),
}
#: Rows QEMU 7.2 has no driver for (or, LUKS2, no driver for that version): qemu-img reads them raw.
READ_AS_RAW = {"iso", "cow-v2", "cow-v3", "luks2"}


def test_every_row_has_an_image():
    assert {row for row, _ in CASES.values()} == set(format_table().names())


@pytest.mark.parametrize("case", sorted(CASES))
def test_format_is_a_driver_qemu_opens_the_image_with(tmp_path, case):
    row, make = CASES[case]
    path = make(tmp_path / f"image.{case}")
    info = probe(path)
    mine = to_qemu_json(info)
    extra = mine.pop(EXTRA_KEY)
    assert (info.format, extra["format"]) == (row, row)
    driver = mine["format"]
    if row == "dir":  # QEMU reaches a directory only through vvfat, by a fat: name; qemu-img refuses the plain path
        assert driver == "vvfat" and qemu_info(f"fat:{path}", driver)["format"] == driver
        return
    theirs = qemu_info(path, driver)  # fails the test when qemu-img cannot open it so
    assert (theirs["format"], theirs["virtual-size"]) == (driver, mine["virtual-size"])
    if case in READ_AS_RAW:
        assert driver == "raw"
        assert mine == qemu_info(path)  # what qemu-img says, probing, key for key
        assert extra.get("virtual-size", info.virtual_size) == info.virtual_size
    else:
        assert driver == row


def test_a_caller_format_qemu_has_no_driver_for_is_still_opened_raw(tmp_path):
    """``-f luks`` on a LUKS2 volume: the caller's format is trusted, the driver is still QEMU's."""
    require("cryptsetup")
    path = _luks(tmp_path / "v.luks2", 2)
    mine = to_qemu_json(probe(path, format="luks"))
    assert (mine["format"], mine[EXTRA_KEY]["format"]) == ("raw", "luks")
    assert mine["virtual-size"] == path.stat().st_size


def test_formats_lists_each_rows_driver(tmp_path):
    """``storprobe formats`` shows the driver the JSON names, per row and version."""
    listed = {row["name"]: row for row in json.loads(run("storprobe", "formats", "--output", "json").stdout)}
    for case, (row, make) in CASES.items():
        path = make(tmp_path / f"image.{case}")
        info = probe(path)
        entry = listed[row]
        expected = entry["qemu-version-drivers"].get(str(info.version), entry["qemu-driver"])
        assert to_qemu_json(info)["format"] == expected, case
    human = run("storprobe", "formats").stdout.decode()
    assert any(line.split()[0] == "luks" and "luks,v2:raw" in line.split() for line in human.splitlines())


@pytest.mark.parametrize("case", sorted(READ_AS_RAW))
def test_human_output_names_the_driver_as_qemu_img_does(tmp_path, case):
    """The human summary follows the JSON: what qemu-img prints of the volume
    read raw, line for line, then storprobe's reading (its own format and size)."""
    _, make = CASES[case]
    path = make(tmp_path / f"image.{case}")
    theirs = run("qemu-img", "info", path).stdout.decode()
    ours, _, extra = run("storprobe", "info", path).stdout.decode().partition("storprobe:\n")
    assert ours == theirs
    assert f"    format: {probe(path).format}\n" in extra
