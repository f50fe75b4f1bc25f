"""Backing chains built with qemu-img, compared with qemu-img --backing-chain."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from storprobe.chain import probe_chain
from storprobe.errors import (
    BackingFormatNotSpecified,
    BackingLoop,
    BackingMissing,
    ChainTooDeep,
)
from storprobe.qemu_json import EXTRA_KEY, to_qemu_json

from oracle import qemu_chain_info, qemu_img_create, rebase_unsafe, run


def overlay(path: Path, backing: str, backing_fmt: str | None, fmt: str = "qcow2", *options: str) -> Path:
    args: list[str | Path] = ["qemu-img", "create", "-q", "-f", fmt, "-b", backing]
    if backing_fmt:
        args += ["-F", backing_fmt]
    for opt in options:
        args += ["-o", opt]
    run(*args, path)
    return path


BACKING_FORMAT_EXTENSION = 0xE2792ACA


def forget_backing_format(path: Path) -> None:
    """Make a qcow2 image that records no backing format, as images made before
    QEMU 6.1 often are (qemu-img now refuses to write one): the backing-format
    header extension's type is changed to one QEMU ignores."""
    data = bytearray(path.read_bytes()[:65536])
    offset = struct.unpack_from(">I", data, 100)[0]  # header_length: extensions follow
    while True:
        kind, length = struct.unpack_from(">II", data, offset)
        if kind == 0:
            raise AssertionError("no backing-format extension to forget")
        if kind == BACKING_FORMAT_EXTENSION:
            struct.pack_into(">I", data, offset, 0x7E570000)
            break
        offset += 8 + (length + 7) // 8 * 8
    with open(path, "r+b") as f:
        f.write(data)
    assert "backing-filename-format" not in qemu_chain_info(path)[0]


def ours(chain) -> list[dict]:
    out = [to_qemu_json(info) for info in chain.images]
    for entry in out:
        entry.pop(EXTRA_KEY)
    return out


def test_raw_under_three_qcow2_matches_qemu(tmp_path):
    run("qemu-img", "create", "-q", "-f", "raw", tmp_path / "base.raw", "16M")
    overlay(tmp_path / "l1.qcow2", "base.raw", "raw")
    overlay(tmp_path / "l2.qcow2", "l1.qcow2", "qcow2")
    overlay(tmp_path / "l3.qcow2", "l2.qcow2", "qcow2")
    chain = probe_chain(tmp_path / "l3.qcow2")
    assert chain.error is None
    assert [i.format for i in chain.images] == ["qcow2", "qcow2", "qcow2", "raw"]
    assert ours(chain) == qemu_chain_info(tmp_path / "l3.qcow2")


def test_relative_names_resolve_against_the_image_directory(tmp_path, monkeypatch):
    (tmp_path / "sub" / "deeper").mkdir(parents=True)
    qemu_img_create(tmp_path / "sub" / "deeper" / "base.qcow2", "qcow2", "16M")
    overlay(tmp_path / "sub" / "mid.qcow2", "deeper/base.qcow2", "qcow2")
    overlay(tmp_path / "top.qcow2", "sub/mid.qcow2", "qcow2")
    monkeypatch.chdir("/")
    chain = probe_chain(tmp_path / "top.qcow2")
    assert chain.error is None
    assert [s.name for s in chain.stores[:2] if s] == ["sub/mid.qcow2", "deeper/base.qcow2"]
    assert [s.path for s in chain.stores[:2] if s] == [
        str(tmp_path / "sub" / "mid.qcow2"), str(tmp_path / "sub" / "deeper" / "base.qcow2")]
    assert ours(chain) == qemu_chain_info(tmp_path / "top.qcow2")


def test_absolute_names_and_v2_on_v3(tmp_path):
    qemu_img_create(tmp_path / "base.qcow2", "qcow2", "16M")
    overlay(tmp_path / "top.qcow2", str(tmp_path / "base.qcow2"), "qcow2", "qcow2", "compat=0.10")
    chain = probe_chain(tmp_path / "top.qcow2")
    assert [i.version for i in chain.images] == [2, 3]
    assert chain.stores[0].name == chain.stores[0].path == str(tmp_path / "base.qcow2")
    assert ours(chain) == qemu_chain_info(tmp_path / "top.qcow2")


def test_qed_child(tmp_path):
    qemu_img_create(tmp_path / "base.qcow2", "qcow2", "16M")
    overlay(tmp_path / "top.qed", "base.qcow2", "qcow2", "qed")
    chain = probe_chain(tmp_path / "top.qed", allow_probe=True)
    assert [i.format for i in chain.images] == ["qed", "qcow2"]
    assert ours(chain) == qemu_chain_info(tmp_path / "top.qed")


def test_qed_raw_backing_is_not_probed(tmp_path):
    """qed's 'backing is raw' bit is a recorded format: the qcow2 bytes below are taken as raw."""
    qemu_img_create(tmp_path / "base.qcow2", "qcow2", "16M")
    overlay(tmp_path / "top.qed", "base.qcow2", "raw", "qed")
    chain = probe_chain(tmp_path / "top.qed")
    assert [i.format for i in chain.images] == ["qed", "raw"]
    assert chain.images[1].matches == ("qcow2",)


def test_vmdk_child_names_its_parent_by_hint(tmp_path):
    qemu_img_create(tmp_path / "base.vmdk", "vmdk", "16M")
    overlay(tmp_path / "top.vmdk", "base.vmdk", "vmdk", "vmdk")
    chain = probe_chain(tmp_path / "top.vmdk")
    assert chain.error is None
    assert [i.format for i in chain.images] == ["vmdk", "vmdk"]
    assert chain.stores[0].name == "base.vmdk"


def test_unrecorded_backing_format_is_probed_but_not_followed_further(tmp_path):
    qemu_img_create(tmp_path / "base.qcow2", "qcow2", "16M")
    overlay(tmp_path / "mid.qcow2", "base.qcow2", "qcow2")
    overlay(tmp_path / "top.qcow2", "mid.qcow2", "qcow2")
    forget_backing_format(tmp_path / "top.qcow2")
    chain = probe_chain(tmp_path / "top.qcow2")
    assert [i.format for i in chain.images] == ["qcow2", "qcow2"]
    assert isinstance(chain.error, BackingFormatNotSpecified)
    assert "mid.qcow2" in str(chain.error)
    followed = probe_chain(tmp_path / "top.qcow2", allow_probe=True)
    assert followed.error is None and len(followed.images) == 3


def test_unrecorded_format_of_a_leaf_is_fine(tmp_path):
    qemu_img_create(tmp_path / "base.qcow2", "qcow2", "16M")
    overlay(tmp_path / "top.qcow2", "base.qcow2", "qcow2")
    forget_backing_format(tmp_path / "top.qcow2")
    chain = probe_chain(tmp_path / "top.qcow2")
    assert chain.error is None
    assert chain.images[1].evidence == "magic"


def test_missing_backing_still_reports_the_top(tmp_path):
    qemu_img_create(tmp_path / "base.qcow2", "qcow2", "16M")
    overlay(tmp_path / "top.qcow2", "base.qcow2", "qcow2")
    (tmp_path / "base.qcow2").unlink()
    chain = probe_chain(tmp_path / "top.qcow2")
    assert len(chain.images) == 1
    assert isinstance(chain.error, BackingMissing)
    proc = subprocess.run(
        [sys.executable, "-m", "storprobe", "info", "--backing-chain", "--output=json", str(tmp_path / "top.qcow2")],
        capture_output=True, text=True,
    )
    assert proc.returncode == 1
    assert json.loads(proc.stdout)[0]["backing-filename"] == "base.qcow2"
    assert proc.stderr.startswith(f"storprobe: {tmp_path / 'top.qcow2'}: backing file ")
    assert len(proc.stderr.splitlines()) == 1


def test_self_loop(tmp_path):
    qemu_img_create(tmp_path / "a.qcow2", "qcow2", "16M")
    rebase_unsafe(tmp_path / "a.qcow2", "a.qcow2", "qcow2")
    chain = probe_chain(tmp_path / "a.qcow2")
    assert isinstance(chain.error, BackingLoop) and len(chain.images) == 1


def test_two_image_loop(tmp_path):
    qemu_img_create(tmp_path / "a.qcow2", "qcow2", "16M")
    overlay(tmp_path / "b.qcow2", "a.qcow2", "qcow2")
    rebase_unsafe(tmp_path / "a.qcow2", "b.qcow2", "qcow2")
    chain = probe_chain(tmp_path / "b.qcow2")
    assert isinstance(chain.error, BackingLoop) and len(chain.images) == 2


def test_loop_through_a_symlink(tmp_path):
    qemu_img_create(tmp_path / "a.qcow2", "qcow2", "16M")
    (tmp_path / "alias.qcow2").symlink_to("a.qcow2")
    rebase_unsafe(tmp_path / "a.qcow2", "alias.qcow2", "qcow2")
    chain = probe_chain(tmp_path / "a.qcow2")
    assert isinstance(chain.error, BackingLoop)


def test_depth_limit(tmp_path):
    qemu_img_create(tmp_path / "i0.qcow2", "qcow2", "16M")
    for i in range(1, 6):
        overlay(tmp_path / f"i{i}.qcow2", f"i{i - 1}.qcow2", "qcow2")
    assert len(probe_chain(tmp_path / "i5.qcow2", max_depth=5).images) == 6
    chain = probe_chain(tmp_path / "i5.qcow2", max_depth=3)
    assert isinstance(chain.error, ChainTooDeep) and len(chain.images) == 4


@pytest.mark.parametrize(
    "backing, protocol",
    [
        ("nbd://example.invalid:10809/export", "nbd"),
        ('json:{"file":{"driver":"nbd","server":{"type":"inet","host":"example.invalid","port":"10809"},"export":"e"}}',
         "nbd"),
        ("https://example.invalid/disk.img", "https"),
    ],
)
def test_network_backing_is_reported_never_opened(tmp_path, no_network, backing, protocol):
    qemu_img_create(tmp_path / "top.qcow2", "qcow2", "16M")
    rebase_unsafe(tmp_path / "top.qcow2", backing, "raw")
    chain = probe_chain(tmp_path / "top.qcow2")
    assert chain.error is None and len(chain.images) == 1
    assert chain.stores[0].protocol == protocol and not chain.stores[0].is_file


def test_json_backing_naming_a_local_file_is_that_file(tmp_path):
    qemu_img_create(tmp_path / "base.qcow2", "qcow2", "16M")
    qemu_img_create(tmp_path / "top.qcow2", "qcow2", "16M")
    # absolute: QEMU opens a relative json: file name in its own working directory (test_backing_names.py)
    rebase_unsafe(tmp_path / "top.qcow2", f'json:{{"file":{{"driver":"file","filename":"{tmp_path}/base.qcow2"}}}}',
                  "qcow2")
    chain = probe_chain(tmp_path / "top.qcow2")
    assert chain.error is None
    assert chain.images[1].filename == str(tmp_path / "base.qcow2")


def test_data_file_is_reported_not_opened(tmp_path):
    data = tmp_path / "data.raw"
    qemu_img_create(tmp_path / "top.qcow2", "qcow2", "16M", f"data_file={data}", "data_file_raw=on")
    data.unlink()  # if we opened it, this would fail
    chain = probe_chain(tmp_path / "top.qcow2")
    assert chain.error is None
    assert chain.top.data_file is not None and chain.top.data_file.name == str(data)


def test_json_extras_describe_backing_and_data_file(tmp_path, no_network):
    qemu_img_create(tmp_path / "top.qcow2", "qcow2", "16M", f"data_file={tmp_path / 'd.raw'}")
    rebase_unsafe(tmp_path / "top.qcow2", "nbd+unix:///exp?socket=/run/nbd.sock", "raw")
    extra = to_qemu_json(probe_chain(tmp_path / "top.qcow2").top)[EXTRA_KEY]
    assert extra["backing-store"] == {
        "name": "nbd+unix:///exp?socket=/run/nbd.sock", "protocol": "nbd", "reach": "network",
        "hosts": [{"transport": "unix", "socket": "/run/nbd.sock"}], "target": "exp",
    }
    assert extra["data-file"] == {
        "raw-image": False, "name": str(tmp_path / "d.raw"), "protocol": "file", "reach": "file",
        "path": str(tmp_path / "d.raw")}


def test_malformed_backing_name_is_reported_in_json_and_stops_the_chain(tmp_path):
    qemu_img_create(tmp_path / "top.qcow2", "qcow2", "16M")
    rebase_unsafe(tmp_path / "top.qcow2", "json:{not json", "raw")
    chain = probe_chain(tmp_path / "top.qcow2")
    assert chain.error is not None and chain.error.code == "backing.name"
    assert to_qemu_json(chain.top)[EXTRA_KEY]["backing-store"]["error"]["code"] == "backing.name"
