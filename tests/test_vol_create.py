"""The volume XML is input too: ``virsh vol-create POOL FILE.xml`` given our
document (with a new name and path) must make a like volume.

libvirt 9.0 hands ``<compat>``, ``<features>`` and ``<clusterSize>`` to
``qemu-img create -o`` (storage_util.c): compat and features for qcow2 only
(it refuses them elsewhere), the cluster size for any format, and vmdk, vdi,
vpc and qcow refuse that option. So the document carries ``<clusterSize>``
only for the rows that take it back (qcow2, qed); the JSON keeps it for all.

Left out, as libvirt 9.0 cannot make them: iso (it creates a raw file), vhdx
(a format name it does not know), ploop (it runs the ploop tools, absent
here), bochs, cloop, dmg and cow (qemu-img 7.2 creates none of them).
"""

from __future__ import annotations

import itertools
import os
import subprocess
from pathlib import Path

import pytest
from lxml import etree

from storprobe import Backing, probe
from storprobe.qemu_json import to_qemu_json
from storprobe.volume_xml import to_volume_xml

from oracle import qemu_img_create, require, run

URI = "qemu:///system"
_pools = itertools.count()

#: name -> qemu-img create arguments (format, size, options...): every format
#: libvirt 9.0 creates in a dir pool with qemu-img 7.2, with the options each has.
SOURCES = {
    "v3.qcow2": ("qcow2", "64M"),
    "lazy.qcow2": ("qcow2", "64M", "lazy_refcounts=on"),
    "l2.qcow2": ("qcow2", "64M", "extended_l2=on", "cluster_size=128k"),
    "both.qcow2": ("qcow2", "64M", "lazy_refcounts=on", "extended_l2=on"),
    "v2.qcow2": ("qcow2", "64M", "compat=0.10", "cluster_size=32k"),
    "a.qed": ("qed", "64M", "cluster_size=128k"),
    "a.raw": ("raw", "3M"),
    "a.vmdk": ("vmdk", "32M"),
    "stream.vmdk": ("vmdk", "32M", "subformat=streamOptimized"),
    "a.vdi": ("vdi", "32M"),
    "a.vhd": ("vpc", "32M"),
    "fixed.vhd": ("vpc", "8M", "subformat=fixed"),
    "a.qcow": ("qcow", "32M"),
}
#: What a like volume has the same as its source.
FACTS = ("format", "virtual_size", "compat", "flags", "cluster_size", "encryption", "backing")


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("sources")
    for name, (fmt, size, *options) in SOURCES.items():
        qemu_img_create(directory / name, fmt, size, *options)
    run("qemu-img", "create", "-q", "-f", "qcow2", "-b", "v3.qcow2", "-F", "qcow2", directory / "child.qcow2")
    (directory / "subdir").mkdir()
    return directory


def virsh(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([require("virsh"), "-c", URI, *args], capture_output=True, text=True, check=False)


@pytest.fixture
def pool(tmp_path):
    """A transient libvirt dir pool over an empty directory, destroyed afterwards."""
    require("virsh")
    directory = tmp_path / "pool"
    directory.mkdir()
    name = f"storprobe-volcreate-{os.getpid()}-{next(_pools)}"
    created = virsh("pool-create-as", name, "dir", "--target", str(directory))
    assert created.returncode == 0, created.stderr
    try:
        yield name, directory
    finally:
        virsh("pool-destroy", name)


def renamed(document: str, path: Path, secret: str | None = None) -> str:
    """Our document for another volume: its name, key and path changed to
    ``path``'s; with ``secret``, the libvirt secret of its ``<encryption>``."""
    volume = etree.fromstring(document)
    volume.find("name").text = path.name
    volume.find("key").text = str(path)
    volume.find("target/path").text = str(path)
    if secret is not None:
        etree.SubElement(volume.find("target/encryption"), "secret", type="passphrase", uuid=secret)
    return etree.tostring(volume, encoding="unicode")


def like_volume(source: Path, name: str, directory: Path, document: Path, secret: str | None = None) -> dict:
    """``virsh vol-create`` of our document for ``source`` as ``copy-NAME`` in the
    pool: the facts that differ from the source's (mine, theirs), or the refusal."""
    info = probe(source)
    copy = directory / f"copy-{source.name}"
    document.write_text(renamed(to_volume_xml(info), copy, secret))
    created = virsh("vol-create", name, str(document))
    if created.returncode != 0:
        return {"refused": created.stderr.strip()}
    made = probe(copy)
    mine = {fact: getattr(info, fact) for fact in FACTS}
    if info.backing is not None:  # the document names the backing file by its absolute path
        mine["backing"] = Backing(str(source.parent / info.backing.name), info.backing.format)
    if info.cluster_size is None:  # a fixed VHD comes back dynamic, with that form's block size
        mine["cluster_size"] = made.cluster_size
    return {fact: (mine[fact], getattr(made, fact)) for fact in FACTS if mine[fact] != getattr(made, fact)}


def test_virsh_vol_create_makes_a_like_volume_of_every_format(sources, pool, tmp_path):
    """A fixed VHD comes back dynamic (the document has no subformat), of the same size."""
    name, directory = pool
    unlike = {s.name: like_volume(s, name, directory, tmp_path / f"{s.name}.xml") for s in sorted(sources.iterdir())}
    assert {source: differences for source, differences in unlike.items() if differences} == {}


@pytest.fixture
def secret(tmp_path):
    """An ephemeral libvirt secret holding the passphrase ``pw``, undefined afterwards."""
    document = tmp_path / "secret.xml"
    document.write_text("<secret ephemeral='yes' private='yes'><description>storprobe test</description></secret>")
    defined = virsh("secret-define", str(document))
    assert defined.returncode == 0, defined.stderr
    uuid = defined.stdout.split()[1]
    try:
        (tmp_path / "pw").write_text("pw")
        stored = virsh("secret-set-value", uuid, "--file", str(tmp_path / "pw"), "--plain")
        assert stored.returncode == 0, stored.stderr
        yield uuid
    finally:
        virsh("secret-undefine", uuid)


def test_an_encrypted_volume_needs_only_its_secret(pool, secret, tmp_path):
    """An image names no libvirt secret (virsh vol-dumpxml prints none either):
    given one, libvirt makes a like LUKS volume or LUKS-encrypted qcow2 from our document."""
    name, directory = pool
    (tmp_path / "sources").mkdir()
    key = ("--object", "secret,id=s0,data=pw")
    run("qemu-img", "create", "-q", "-f", "luks", *key, "-o", "key-secret=s0,iter-time=10",
        tmp_path / "sources" / "vol.luks", "16M")
    run("qemu-img", "create", "-q", "-f", "qcow2", *key, "-o", "encrypt.format=luks,encrypt.key-secret=s0",
        "-o", "encrypt.iter-time=10", tmp_path / "sources" / "enc.qcow2", "16M")
    for source in sorted((tmp_path / "sources").iterdir()):
        assert like_volume(source, name, directory, tmp_path / f"{source.name}.xml", secret) == {}, source.name


@pytest.mark.parametrize("name", ["a.vmdk", "a.vdi", "a.vhd", "a.qcow"])
def test_cluster_size_stays_out_of_documents_libvirt_cannot_take_back(sources, name):
    """The fact stays in the JSON (qemu-img prints it); the XML, like libvirt's, has none."""
    info = probe(sources / name)
    assert to_qemu_json(info)["cluster-size"] == info.cluster_size is not None
    assert etree.fromstring(to_volume_xml(info)).find("target/clusterSize") is None
