"""``storprobe info --allocated``: what each image of a chain holds itself.

The oracle is ``qemu-img map --output=json`` (QEMU 7.2) of each image opened
alone, ``json:{"driver": FMT, "backing": null, "file": ...}``: its ranges that
are present with data sum to our ``data``, those present as zeros without data
to our ``zero``. Images are made here by qemu-img and written by qemu-io (data
at different offsets in each layer, ``write -z``, ``-zu``, compressed writes,
discards), across the formats whose rows have a block map; a malformed layer,
or one whose format has no block map, is a named error for that layer alone.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
from pathlib import Path

import pytest

from storprobe.allocation import Allocation, allocation, chain_allocations
from storprobe.chain import probe_chain
from storprobe.cli import main
from storprobe.sizes import size_text

from builders import build_dmg, l1_entry_at
from oracle import qemu_img_create, qemu_info, qemu_io, rebase_unsafe, require, run

KiB, MiB = 1024, 1024 * 1024


def qemu_alone(path: Path, fmt: str) -> Allocation:
    """The sums of ``qemu-img map`` of ``path`` opened alone (its backing file ignored)."""
    spec = json.dumps({"driver": fmt, "backing": None, "file": {"driver": "file", "filename": str(path)}})
    ranges = json.loads(run("qemu-img", "map", "-U", "--output=json", f"json:{spec}").stdout)
    return Allocation(
        sum(r["length"] for r in ranges if r["present"] and r["data"]),
        sum(r["length"] for r in ranges if r["present"] and r["zero"] and not r["data"]),
    )


def info(capsys: pytest.CaptureFixture[str], *args: str | Path) -> tuple[int, str, str]:
    """``storprobe info ARGS``: its status, stdout and stderr."""
    status = main(["info", *map(str, args)])
    out, err = capsys.readouterr()
    return status, out, err


def three_layers(d: Path, cluster: int = 64 * KiB, *options: str) -> list[Path]:
    """base <- mid <- top (qcow2), each written at its own offsets: data, zero
    clusters over data below, compressed clusters, a discard; top first."""
    base, mid, top = d / "base.qcow2", d / "mid.qcow2", d / "top.qcow2"
    packed = cluster * max(1, 128 * KiB // cluster)  # compressed writes are whole clusters
    qemu_img_create(base, "qcow2", "16M", f"cluster_size={cluster}", *options)
    qemu_io(base, "write -P 0x11 0 3M", f"write -c -P 0x12 8M {packed}", "write -P 0x13 12M 100k", "discard 1M 512k")
    for image, below in ((mid, base), (top, mid)):
        qemu_img_create(image, "qcow2", "16M", f"cluster_size={cluster}", *options, f"backing_file={below.name}",
                        "backing_fmt=qcow2")
    qemu_io(mid, "write -P 0x21 4M 1M", "write -z 0 512k", "write -zu 2M 256k", "write -P 0x22 15M 64k")
    qemu_io(top, f"write -c -P 0x31 6M {packed}", "write -z 4M 64k", "write -P 0x32 10M 1536k", "write -zu 12M 128k")
    return [top, mid, base]


@pytest.mark.parametrize("cluster, options", [
    (64 * KiB, ()),
    (4 * KiB, ("compat=0.10",)),
    (512, ()),
    (2 * MiB, ()),
    (64 * KiB, ("extended_l2=on",)),
    (64 * KiB, ("compression_type=zstd",)),
])
def test_each_layer_of_a_qcow2_chain_sums_as_qemu_img_map_alone(tmp_path, cluster, options):
    layers = three_layers(tmp_path, cluster, *options)
    chain = probe_chain(layers[0])
    assert [Path(i.filename).name for i in chain.images] == [p.name for p in layers]
    held = chain_allocations(chain.images)
    assert held == [qemu_alone(layer, "qcow2") for layer in layers]
    assert all(h.data for h in held)  # every layer holds data of its own
    # zero clusters need v3 (0.10 writes data for them) and whole clusters (mid's are 512 KiB or less)
    assert (held[1].zero > 0) == ("compat=0.10" not in options and cluster <= 512 * KiB)


def test_a_layer_replaced_since_the_chain_was_probed_is_not_summed(tmp_path):
    """The chain's images are opened again to be read: another file put in one's
    place since it was probed is an error for that layer, never its figures."""
    top, mid, base = three_layers(tmp_path)
    chain = probe_chain(top)
    stand_in = tmp_path / "stand-in.qcow2"
    qemu_img_create(stand_in, "qcow2", "16M")
    os.replace(stand_in, mid)
    top_result, mid_result, base_result = chain_allocations(chain.images, "qcow2")
    assert isinstance(top_result, Allocation) and isinstance(base_result, Allocation)
    assert not isinstance(mid_result, Allocation) and mid_result.code == "source"
    assert "another file than the one probed" in mid_result.reason


def test_top_alone_needs_no_backing_file(tmp_path):
    """The top's own map, read with its backing ignored: the backing may be gone."""
    top, mid, base = three_layers(tmp_path)
    expected = qemu_alone(top, "qcow2")
    mid.unlink()
    base.unlink()
    assert allocation(top) == expected


@pytest.mark.parametrize("fmt, options, script", [
    ("vmdk", (), ("write -P 1 1M 64k", "write -P 2 5M 1M")),
    ("vmdk", ("zeroed_grain=on",), ("write -P 1 1M 64k", "write -z 3M 1M", "write -P 2 7M 4k")),
    ("vmdk", ("subformat=monolithicFlat",), ("write -P 1 1M 64k",)),  # its extent file opened as QEMU opens it
    ("vmdk", ("subformat=twoGbMaxExtentSparse",), ("write -P 1 1M 64k", "write -P 2 7M 4k")),
    ("vdi", (), ("write -P 1 1M 64k", "write -P 2 5M 1M")),
    ("qed", (), ("write -P 1 1M 64k", "write -z 3M 1M", "write -P 2 7M 4k")),
    ("vpc", (), ("write -P 1 1M 64k", "write -P 2 7M 4k")),
    ("vhdx", ("block_size=1M",), ("write -P 1 1M 64k", "write -z 3M 1M", "write -P 2 7M 4k")),
    ("qcow", (), ("write -P 1 1M 64k", "write -c -P 2 5M 4k", "write -P 3 7M 4k")),
])
def test_other_formats_sum_as_qemu_img_map_alone(tmp_path, fmt, options, script):
    image = qemu_img_create(tmp_path / f"a.{fmt}", fmt, "8M", *options)
    qemu_io(image, *script, fmt=fmt)
    held = allocation(image)
    assert held == qemu_alone(image, fmt)
    assert held.data > 0


def test_stream_optimized_vmdk_of_compressed_grains(tmp_path):
    raw = tmp_path / "src.raw"
    qemu_img_create(raw, "raw", "8M")
    qemu_io(raw, "write -P 7 0 1M", "write -P 8 6M 100k", fmt="raw")
    vmdk = tmp_path / "stream.vmdk"
    run("qemu-img", "convert", "-f", "raw", "-O", "vmdk", "-o", "subformat=streamOptimized", raw, vmdk)
    assert allocation(vmdk) == qemu_alone(vmdk, "vmdk")


def test_sparse_raw_file_holes_are_zeros_it_decides(tmp_path):
    """A raw file's holes read as zeros by its own decision (qemu-img: present, zero)."""
    raw = tmp_path / "sparse.raw"
    with open(raw, "wb") as f:
        f.truncate(32 * MiB + 1000)
        for offset in (0, 5 * MiB, 32 * MiB + 100):
            f.seek(offset)
            f.write(b"x" * 70000)
    held = allocation(raw, "raw")
    assert held == qemu_alone(raw, "raw")
    assert held.zero and held.data + held.zero == qemu_info(raw, "raw")["virtual-size"]  # whole sectors


def test_a_large_sparse_image_is_summed_by_runs(tmp_path):
    """The walk takes the map's runs, as ``storprobe map``: 64 TiB of virtual
    size with three written clusters is summed at once, as qemu-img's is."""
    image = qemu_img_create(tmp_path / "big.qcow2", "qcow2", "64T")
    qemu_io(image, "write -P 1 0 64k", "write -z 20T 64k", "write -P 2 63T 64k")
    assert allocation(image) == qemu_alone(image, "qcow2") == Allocation(128 * KiB, 64 * KiB)


def test_cli_json_puts_each_layers_bytes_under_its_storprobe_key(tmp_path, capsys):
    layers = three_layers(tmp_path)
    status, out, err = info(capsys, "--allocated", "--backing-chain", "--output", "json", layers[0])
    assert (status, err) == (0, "")
    images = json.loads(out)
    assert [i["storprobe"]["allocated"] for i in images] == [qemu_alone(p, "qcow2")._asdict() for p in layers]
    assert [i["actual-size"] for i in images] == [os.stat(p).st_blocks * 512 for p in layers]
    status, out, _ = info(capsys, "--allocated", "--output", "json", layers[1])
    assert status == 0 and json.loads(out)["storprobe"]["allocated"] == qemu_alone(layers[1], "qcow2")._asdict()
    status, out, _ = info(capsys, "--backing-chain", "--output", "json", layers[0])
    assert status == 0 and all("allocated" not in i["storprobe"] for i in json.loads(out))


def test_cli_human_ends_each_images_storprobe_section_with_its_bytes(tmp_path, capsys):
    layers = three_layers(tmp_path)
    status, out, err = info(capsys, "--allocated", "--backing-chain", layers[0])
    assert (status, err) == (0, "")
    expected = [qemu_alone(p, "qcow2") for p in layers]
    sections = out.rstrip("\n").split("\n\n")
    assert len(sections) == 3
    for section, held in zip(sections, expected, strict=True):
        assert section.endswith(f"\n    allocated: data {size_text(held.data)}, zeros {size_text(held.zero)}")
        assert "storprobe:" in section.split("    allocated:")[0]
    status, out, _ = info(capsys, layers[0])
    assert status == 0 and "allocated:" not in out
    without = info(capsys, "--backing-chain", layers[0])[1]
    assert out != without and [s.rsplit("\n", 1)[0] for s in sections] == without.rstrip("\n").split("\n\n")


def corrupt_l1(image: Path, guest_offset: int) -> None:
    """Point the L1 entry that maps ``guest_offset`` at an L2 table off its cluster boundary."""
    data = bytearray(image.read_bytes())
    at = l1_entry_at(bytes(data), guest_offset)
    (entry,) = struct.unpack_from(">Q", data, at)
    assert entry & 0x00FFFFFFFFFFFE00, "the layer has an L2 table there"
    struct.pack_into(">Q", data, at, entry + 512)
    image.write_bytes(data)


def test_a_malformed_layer_is_its_named_error_and_the_others_still_report(tmp_path, capsys):
    top, mid, base = three_layers(tmp_path)
    corrupt_l1(mid, 4 * MiB)
    spec = json.dumps({"driver": "qcow2", "backing": None, "file": {"driver": "file", "filename": str(mid)}})
    refused = subprocess.run([require("qemu-img"), "map", "-U", "--output=json", f"json:{spec}"],
                             capture_output=True, check=False)
    assert refused.returncode != 0 and b"unaligned" in refused.stderr  # QEMU refuses the layer too

    status, out, err = info(capsys, "--allocated", "--backing-chain", "--output", "json", top)
    assert status == 1
    held = [i["storprobe"]["allocated"] for i in json.loads(out)]
    assert held[0] == qemu_alone(top, "qcow2")._asdict() and held[2] == qemu_alone(base, "qcow2")._asdict()
    assert held[1]["error"]["code"] == "qcow2.l2-offset-unaligned"
    assert err == f"storprobe: {mid}: allocated bytes: {held[1]['error']['message']}\n"

    status, out, err = info(capsys, "--allocated", "--backing-chain", top)
    assert status == 1 and out.count("    allocated: data ") == 2
    assert f"    allocated: unknown: qcow2.l2-offset-unaligned: {held[1]['error']['message']}\n" in out


def test_an_l2_table_past_the_end_of_the_file_reads_as_unallocated_as_in_qemu(tmp_path):
    """QEMU reads a table past the end of the file as zeros: no error, nothing held there."""
    top = three_layers(tmp_path)[0]
    data = bytearray(top.read_bytes())
    at = l1_entry_at(bytes(data), 10 * MiB)
    struct.pack_into(">Q", data, at, (1 << 63) | (1 << 40))
    top.write_bytes(data)
    held = allocation(top)
    assert held == qemu_alone(top, "qcow2")
    assert held.data < 1536 * KiB  # the data at 10M is no longer mapped


def test_a_format_without_a_block_map_cannot_say_for_that_layer_alone(tmp_path, capsys):
    """An ISO (read by QEMU as raw) and a DMG have no block map in storprobe:
    alone, or as a chain's base, each is reported unknown, and the layer above
    the DMG still reports."""
    (tmp_path / "tree").mkdir()
    (tmp_path / "tree" / "a.txt").write_text("a\n")
    iso = tmp_path / "a.iso"
    run("xorriso", "-as", "mkisofs", "-quiet", "-o", iso, tmp_path / "tree")
    status, out, err = info(capsys, "--allocated", "--output", "json", iso)
    assert status == 1
    assert json.loads(out)["storprobe"]["allocated"]["error"]["code"] == "datapath.unsupported-format"
    assert err.startswith(f"storprobe: {iso}: allocated bytes: ")

    dmg = tmp_path / "base.dmg"
    dmg.write_bytes(build_dmg(bytes(range(256)) * 4096))
    top = qemu_img_create(tmp_path / "top.qcow2", "qcow2", "1M")
    qemu_io(top, "write -P 5 0 64k")
    rebase_unsafe(top, dmg.name, "dmg")
    status, out, err = info(capsys, "--allocated", "--backing-chain", "--output", "json", top)
    assert status == 1
    top_json, dmg_json = json.loads(out)
    assert dmg_json["format"] == "dmg"
    assert top_json["storprobe"]["allocated"] == {"data": 64 * KiB, "zero": 0} == qemu_alone(top, "qcow2")._asdict()
    assert dmg_json["storprobe"]["allocated"]["error"]["code"] == "datapath.unsupported-format"
    assert err == f"storprobe: {dmg}: allocated bytes: {dmg_json['storprobe']['allocated']['error']['message']}\n"


def test_an_encrypted_layer_is_not_read(tmp_path, capsys):
    image = qemu_img_create(tmp_path / "enc.qcow2", "qcow2", "1M")
    run("qemu-img", "create", "-q", "-f", "qcow2", "--object", "secret,id=s,data=pw", "-o",
        "encrypt.format=luks,encrypt.key-secret=s,encrypt.iter-time=10", image, "1M")
    status, out, _ = info(capsys, "--allocated", "--output", "json", image)
    assert status == 1 and json.loads(out)["storprobe"]["allocated"]["error"]["code"] == "datapath.encrypted"


@pytest.mark.parametrize("args, complaint", [
    (("--output", "xml"), "--allocated applies to --output human and json, not xml"),
    (("s3://bucket/a.qcow2",), "--allocated reads local files, not objects at a URL"),
])
def test_allocated_where_it_cannot_apply_is_a_usage_error(tmp_path, capsys, args, complaint):
    image = qemu_img_create(tmp_path / "a.qcow2", "qcow2", "1M")
    target = () if args[0].startswith("s3:") else (image,)
    assert main(["info", "--allocated", *args, *map(str, target)]) == 2
    assert complaint in capsys.readouterr().err
