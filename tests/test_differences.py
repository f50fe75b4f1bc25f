"""Pins for the README's table of differences from ``qemu-img info`` and
``virsh vol-dumpxml`` that no format's own tests pin: each either matches the
tool now (it was an accident) or differs on purpose, as the table says."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from lxml import etree
from oracle import LibvirtPool, canonical_xml, qemu_img_create, qemu_info, qemu_refuses, rebase_unsafe, run

from storprobe import probe
from storprobe.chain import probe_chain
from storprobe.qemu_json import EXTRA_KEY, to_qemu_json
from storprobe.volume_xml import to_volume_xml


def _virsh_documents(directory: Path) -> dict[str, etree._Element]:
    pool = LibvirtPool(directory, f"storprobe-differences-{os.getpid()}")
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
