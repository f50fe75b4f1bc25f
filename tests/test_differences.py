"""Pins for the README's table of differences from ``qemu-img info`` and
``virsh vol-dumpxml`` that no format's own tests pin: each either matches the
tool now (it was an accident) or differs on purpose, as the table says."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
from lxml import etree

from storprobe import probe
from storprobe.qemu_json import EXTRA_KEY, to_qemu_json
from storprobe.volume_xml import to_volume_xml

from builders import build_dmg
from oracle import LibvirtPool, canonical_xml, qemu_img_create, qemu_info, qemu_refuses, run


def _virsh_documents(directory: Path) -> dict[str, etree._Element]:
    pool = LibvirtPool(directory, "storprobe-differences")
    try:
        return {name: etree.fromstring(pool.dumpxml(name)) for name in pool.volumes()}
    finally:
        pool.destroy()


@pytest.mark.parametrize("mode", [0o000, 0o644, 0o4755, 0o1777])
def test_mode_is_written_as_libvirt_writes_it(tmp_path, mode):
    """libvirt writes ``0%o`` of the permission bits alone: ``00`` for mode 0,
    ``0755`` for a setuid file."""
    path = qemu_img_create(tmp_path / "a.qcow2", "qcow2", "1M")
    os.chmod(path, mode)
    theirs = _virsh_documents(tmp_path)["a.qcow2"]
    ours = etree.fromstring(to_volume_xml(probe(path)))
    assert ours.findtext("target/permissions/mode") == theirs.findtext("target/permissions/mode")
    assert canonical_xml(ours) == canonical_xml(theirs)


def test_an_empty_file_has_no_physical_size_as_in_libvirt(tmp_path):
    (tmp_path / "empty.img").write_bytes(b"")
    theirs = _virsh_documents(tmp_path)["empty.img"]
    ours = etree.fromstring(to_volume_xml(probe(tmp_path / "empty.img")))
    assert theirs.find("physical") is None and ours.find("physical") is None
    assert canonical_xml(ours) == canonical_xml(theirs)


def test_a_directory_is_vvfat_where_qemu_img_refuses_it(tmp_path):
    """qemu-img refuses a directory's path; QEMU reaches a directory only as
    vvfat's FAT disk (``fat:DIR``, 504 MiB of emulated geometry). We print the
    driver and libvirt's capacity of a directory, 0."""
    directory = tmp_path / "dir"
    directory.mkdir()
    assert "regular file" in qemu_refuses(directory)
    mine = to_qemu_json(probe(directory))
    assert (mine["format"], mine["virtual-size"], mine[EXTRA_KEY]["format"]) == ("vvfat", 0, "dir")
    assert qemu_info(f"fat:{directory}", "vvfat")["virtual-size"] != mine["virtual-size"]
    theirs = _virsh_documents(tmp_path)["dir"]
    assert (theirs.get("type"), theirs.findtext("capacity")) == ("dir", "0")


def test_vmdk_descriptor_actual_size_is_its_own(tmp_path):
    """qemu-img adds up the allocation of every extent file; we never open or stat one."""
    path = qemu_img_create(tmp_path / "d.vmdk", "vmdk", "8M", "subformat=monolithicFlat")
    run("qemu-io", "-f", "vmdk", "-c", "write -P 1 0 4M", path)
    mine, theirs = to_qemu_json(probe(path)), qemu_info(path)
    assert mine["actual-size"] == path.stat().st_blocks * 512 < theirs["actual-size"]
    mine.pop(EXTRA_KEY)
    assert {k: v for k, v in mine.items() if k != "actual-size"} == {
        k: v for k, v in theirs.items() if k != "actual-size"}


@pytest.fixture
def luks2(tmp_path) -> Path:
    path = tmp_path / "v.luks2"
    path.write_bytes(bytes(4 << 20))
    run("cryptsetup", "luksFormat", "--type", "luks2", "--batch-mode", "--key-file", "-", "--pbkdf", "pbkdf2",
        "--pbkdf-force-iterations", "1000", "--luks2-keyslots-size", "512k", "--luks2-metadata-size", "16k",
        path, input=b"pw")
    return path


def test_luks2_xml_says_what_libvirt_9_does_not_know(luks2):
    """libvirt 9.0 probes LUKS1 only: a LUKS2 volume is raw to it, sized by the
    file, unencrypted. We say raw with ``<encryption format='luks2'>`` (its
    schema's name) and the payload's size."""
    theirs = _virsh_documents(luks2.parent)[luks2.name]
    ours = etree.fromstring(to_volume_xml(probe(luks2)))
    assert theirs.find("target/encryption") is None and theirs.findtext("capacity") == str(4 << 20)
    assert ours.find("target/encryption").get("format") == "luks2"
    assert int(ours.findtext("capacity")) == probe(luks2).virtual_size < 4 << 20
    assert ours.find("target/format").get("type") == theirs.find("target/format").get("type") == "raw"


def test_a_parallels_file_is_a_file_volume(tmp_path):
    """libvirt calls a parallels file a ``ploop`` volume (its type for a ploop
    bundle: a directory with DiskDescriptor.xml); this volume is one file."""
    qemu_img_create(tmp_path / "disk.hds", "parallels", "32M")
    theirs = _virsh_documents(tmp_path)["disk.hds"]
    ours = etree.fromstring(to_volume_xml(probe(tmp_path / "disk.hds")))
    assert (theirs.get("type"), ours.get("type")) == ("ploop", "file")
    assert ours.find("target/format").get("type") == theirs.find("target/format").get("type") == "ploop"


def test_libvirt_calls_dmg_raw(tmp_path):
    """libvirt 9.0 looks for no ``koly`` trailer: raw, sized by the file."""

    disk = bytes(range(256)) * 64
    (tmp_path / "a.dmg").write_bytes(build_dmg(disk))
    theirs = _virsh_documents(tmp_path)["a.dmg"]
    ours = etree.fromstring(to_volume_xml(probe(tmp_path / "a.dmg")))
    assert (theirs.find("target/format").get("type"), theirs.findtext("capacity")) == (
        "raw", str((tmp_path / "a.dmg").stat().st_size))
    assert (ours.find("target/format").get("type"), ours.findtext("capacity")) == ("dmg", str(len(disk)))


def test_every_test_the_readme_table_names_exists():
    """The README's table of differences names the test pinning each row: those tests exist."""
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = readme.split("## Differences from qemu-img and virsh", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| **")]
    assert len(rows) >= 20
    named = 0
    for row in rows:
        module = None
        for reference in re.findall(r"`((?:test_\w+\.py)?::\w+|test_\w+\.py(?:::\w+)?)`", row.split(" | ")[-1]):
            file, _, test = reference.partition("::")
            module = file or module
            assert module is not None, row
            source = (Path(__file__).parent / module).read_text()
            if test:
                assert re.search(rf"^def {test}\(", source, re.M), reference
                named += 1
        assert module is not None, f"no test named for: {row[:80]}"
    assert named >= len(rows)
