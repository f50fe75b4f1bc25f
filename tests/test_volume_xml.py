"""Volume XML: element for element as virsh vol-dumpxml prints it, valid against
our schema and libvirt's, and readable back into the data model."""

from __future__ import annotations

import ast
import itertools
import os
import subprocess
import sys
from pathlib import Path

import pytest
from lxml import etree

from storprobe import ProbeError, probe
from storprobe.chain import probe_chain
from storprobe.registry import format_table
from storprobe.validate import schema_errors
from storprobe.volume_xml import parse_volume_xml, to_volume_xml

from oracle import LibvirtPool, canonical_xml, qemu_img_create, rebase_unsafe, run

LIBVIRT_SCHEMA = Path("/usr/share/libvirt/schemas/storagevol.rng")
_pool_names = itertools.count()

#: name -> qemu-img create arguments (format, size, options...)
QEMU_IMAGES = {
    "v3.qcow2": ("qcow2", "64M"),
    "v2.qcow2": ("qcow2", "64M", "compat=0.10"),
    "lazy.qcow2": ("qcow2", "64M", "lazy_refcounts=on"),
    "l2.qcow2": ("qcow2", "64M", "extended_l2=on"),
    "both.qcow2": ("qcow2", "64M", "lazy_refcounts=on", "extended_l2=on", "cluster_size=128k"),
    "plain.raw": ("raw", "3M"),
    "a.qed": ("qed", "32M"),
    "a.vdi": ("vdi", "32M"),
    "dyn.vhd": ("vpc", "32M"),
    "sparse.vmdk": ("vmdk", "32M"),
    "stream.vmdk": ("vmdk", "32M", "subformat=streamOptimized"),
    "old.qcow": ("qcow", "32M"),
}
#: Where libvirt 9.0 is wrong and the spec wins: name -> why our document differs.
LIBVIRT_WRONG = {
    "a.vhdx": "libvirt has no vhdx prober and calls it raw with the file size as capacity",
    "disk.hds": "libvirt reads the parallels sector count from the wrong header field",
    "flat.vmdk": "libvirt calls a VMDK text descriptor raw, with the descriptor's size as capacity",
    "fixed.vhd": "libvirt does not look for a VHD footer at the end of the file and calls it raw",
}


def as_libvirt_shows_it(ours: etree._Element) -> etree._Element:
    """libvirt 9.0 reads a cluster size only from qcow2 headers; we also write
    qed's, which ``virsh vol-create`` takes back (test_vol_create). Drop it for
    the element-by-element comparison."""
    if ours.find("target/format").get("type") != "qcow2":
        for element in ours.findall("target/clusterSize"):
            element.getparent().remove(element)
    return ours


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("pool")
    for name, (fmt, size, *options) in QEMU_IMAGES.items():
        qemu_img_create(directory / name, fmt, size, *options)
    run("qemu-img", "create", "-q", "-f", "qcow2", "--object", "secret,id=s0,data=pw",
        "-o", "encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=10", directory / "enc.qcow2", "64M")
    run("qemu-img", "create", "-q", "-f", "luks", "--object", "secret,id=s0,data=pw",
        "-o", "key-secret=s0,iter-time=10", directory / "vol.luks", "16M")
    run("qemu-img", "create", "-q", "-f", "qcow2", "-b", "v3.qcow2", "-F", "qcow2", directory / "child.qcow2")
    run("qemu-img", "create", "-q", "-f", "qcow2", "-b", "plain.raw", "-F", "raw", directory / "onraw.qcow2")
    qemu_img_create(directory / "a.vhdx", "vhdx", "32M")
    qemu_img_create(directory / "disk.hds", "parallels", "32M")
    qemu_img_create(directory / "flat.vmdk", "vmdk", "8M", "subformat=monolithicFlat")
    qemu_img_create(directory / "fixed.vhd", "vpc", "8M", "subformat=fixed")
    (directory / "subdir").mkdir()
    (directory / "odd.img").write_bytes(bytes(1000))  # not whole sectors: qemu-img says 1024, libvirt 1000
    return directory


@pytest.fixture(scope="module")
def pool(images):
    pool = LibvirtPool(images, f"storprobe-test-{next(_pool_names)}")
    yield pool
    pool.destroy()


def volume_names(images: Path) -> list[str]:
    return sorted(p.name for p in images.iterdir() if not p.name.endswith("-flat.vmdk"))


def test_every_volume_matches_virsh_or_the_spec(images, pool):
    """Compared as a followed chain: libvirt stats the backing file for its
    permissions and timestamps, which storprobe does only when asked to follow
    (see test_single_image_backing_is_not_statted). No image here is more than
    one level deep, so the chain document has virsh's shape."""
    compared = 0
    for name in volume_names(images):
        chain = probe_chain(images / name)
        ours = as_libvirt_shows_it(etree.fromstring(to_volume_xml(chain.top, chain)))
        theirs = etree.fromstring(pool.dumpxml(name))
        if name in LIBVIRT_WRONG:
            assert canonical_xml(ours) != canonical_xml(theirs), f"{name}: libvirt is right now; drop the exception"
            assert ours.find("target/format").get("type") != "raw" or name == "fixed.vhd"
            continue
        assert canonical_xml(ours) == canonical_xml(theirs), name
        compared += 1
    assert compared >= len(QEMU_IMAGES)


def test_encryption_and_luks_are_modelled_as_libvirt_does(images):
    enc = etree.fromstring(to_volume_xml(probe(images / "enc.qcow2")))
    assert enc.find("target/encryption").get("format") == "luks"
    luks = etree.fromstring(to_volume_xml(probe(images / "vol.luks")))
    assert luks.find("target/format").get("type") == "raw"
    assert luks.find("target/encryption").get("format") == "luks"


def test_v2_has_no_compat_and_v3_has_features(images):
    v2 = etree.fromstring(to_volume_xml(probe(images / "v2.qcow2")))
    assert v2.find("target/compat") is None and v2.find("target/features") is None
    v3 = etree.fromstring(to_volume_xml(probe(images / "v3.qcow2")))
    assert v3.find("target/compat").text == "1.1" and len(v3.find("target/features")) == 0
    both = etree.fromstring(to_volume_xml(probe(images / "both.qcow2")))
    assert [f.tag for f in both.find("target/features")] == ["lazy_refcounts", "extended_l2"]


def test_every_document_validates_against_our_schema_and_libvirts(images):
    libvirt = etree.RelaxNG(etree.parse(str(LIBVIRT_SCHEMA))) if LIBVIRT_SCHEMA.exists() else None
    for name in volume_names(images):
        document = to_volume_xml(probe(images / name))
        assert schema_errors(document) == [], name
        if libvirt is not None and name != "a.vhdx":  # vhdx is our extension of libvirt's format list
            assert schema_errors(document, libvirt) == [], name
    if libvirt is None:
        pytest.skip(f"{LIBVIRT_SCHEMA} not installed: checked our schema only")


def test_round_trip(images):
    for name in volume_names(images):
        info = probe(images / name)
        back = parse_volume_xml(to_volume_xml(info))
        facts = ["virtual_size", "file_type", "encryption", "compat", "cluster_size", "flags"]
        if info.file_type != "directory":  # libvirt, and so our XML, gives a directory no allocation
            facts.append("actual_size")
        if format_table()[info.format].libvirt.capacity_is_file_size and info.file_type == "file":
            facts.remove("virtual_size")  # libvirt's capacity is the file's size, qemu-img's sector-rounded
            assert back.virtual_size == info.stat.st_size, name
        expected = {f: getattr(info, f) for f in facts}
        if not format_table()[info.format].libvirt.cluster_size:  # vol-create would refuse it: JSON only
            expected["cluster_size"] = None
        assert {f: getattr(back, f) for f in facts} == expected, name
        assert back.format in (info.format, "raw"), name  # a LUKS volume is raw + encryption in libvirt's model
        if info.backing is not None:
            assert back.backing.format == info.backing.format


def test_single_image_backing_is_not_statted(images, tmp_path):
    """The recorded path and format only: an untrusted image must not make us
    report the owner or times of a host file it names."""
    qemu_img_create(tmp_path / "evil.qcow2", "qcow2", "16M")
    rebase_unsafe(tmp_path / "evil.qcow2", "/etc/shadow", "raw")
    doc = etree.fromstring(to_volume_xml(probe(tmp_path / "evil.qcow2")))
    backing = doc.find("backingStore")
    assert backing.findtext("path") == "/etc/shadow"
    assert backing.find("permissions") is None and backing.find("timestamps") is None


def test_chain_nests_backing_stores(images):
    chain = probe_chain(images / "child.qcow2")
    doc = to_volume_xml(chain.top, chain)
    tree = etree.fromstring(doc)
    assert tree.findtext("backingStore/path") == str(images / "v3.qcow2")
    assert tree.find("backingStore/permissions/mode") is not None
    assert schema_errors(doc) == []


def test_cli_xml_and_validate(images, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "storprobe", "info", "--output=xml", str(images / "lazy.qcow2")],
                          capture_output=True, text=True, check=True)
    (tmp_path / "v.xml").write_text(proc.stdout)
    (tmp_path / "bad.xml").write_text(
        proc.stdout.replace("<capacity", "<capacityy").replace("</capacity>", "</capacityy>")
    )
    validate = [sys.executable, "-m", "storprobe", "validate"]
    ok = subprocess.run([*validate, str(tmp_path / "v.xml")], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    bad = subprocess.run([*validate, str(tmp_path / "bad.xml")], capture_output=True, text=True)
    assert bad.returncode == 1 and bad.stdout == f"{tmp_path / 'bad.xml'}: invalid\n"
    assert bad.stderr.startswith(f"storprobe: {tmp_path / 'bad.xml'}:")  # test_cli_validate.py pins the reasons


def test_names_xml_cannot_carry_are_named_errors_not_changed_paths(tmp_path):
    """XML 1.0 cannot carry control characters or bytes that are not UTF-8,
    even escaped. libvirt 9.0 leaves such a volume out of the pool and drops
    the control characters from a backing path (``/tmp/a\\x01b`` becomes
    ``/tmp/ab``, another file); we refuse with a named error instead: the
    single-image XML fails, and a scan's record becomes an ``<error>`` whose
    path is escaped as virsh prints such names."""
    from storprobe.scan import scan
    from storprobe.volume_xml import scan_document

    image = tmp_path / "ctl.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", "-u", "-b", "/tmp/a\x01b", "-F", "raw", image, "1M")
    with pytest.raises(ProbeError) as caught:
        to_volume_xml(probe(image))
    assert caught.value.code == "xml.unrepresentable"
    cli = subprocess.run(
        [sys.executable, "-m", "storprobe", "info", "--output", "xml", str(image)],
        capture_output=True, text=True, check=False,
    )
    assert (cli.returncode, cli.stdout) == (1, "")
    assert cli.stderr == (
        f"storprobe: {image}: '/tmp/a\\x01b' cannot be written in XML "
        "(control characters or bytes that are not UTF-8)\n"
    )

    pool = tmp_path / "pool"
    pool.mkdir()
    (pool / "ctl\x01name").write_bytes(bytes(1024))
    with open(bytes(pool) + b"/bad\xffname", "wb") as f:
        f.write(bytes(1024))
    (pool / "fine").write_bytes(bytes(1024))
    document = scan_document(scan(pool))
    assert schema_errors(document.encode()) == []
    root = etree.fromstring(document.encode())
    assert [(e.tag, e.get("path"), e.get("code")) for e in root] == [
        ("error", f"{pool}/bad\\xffname", "xml.unrepresentable"),
        ("error", f"{pool}/ctl\\x01name", "xml.unrepresentable"),
        ("volume", None, None),
    ]


@pytest.mark.parametrize(("name", "expected"), [(b"foo", "foo"), (b" cow2", None), (b"QCOW", None)])
def test_backing_format_is_the_images_text_and_must_be_a_format_name(tmp_path, name, expected):
    """A qcow2 backing-format extension holds whatever text the image's author
    wrote. A lowercase name no plugin knows is reported as written (libvirt 9.0
    says ``raw`` for any unknown backing format, which names a format the image
    never claimed); text the schema cannot take as a format type is a named
    error, never a document that fails validation (found by the fuzz tests)."""
    image = tmp_path / "b.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", "-u", "-b", "/tmp/base.img", "-F", "raw", image, "1M")
    data = bytearray(image.read_bytes())
    at = data.index(b"raw\0\0\0\0\0")  # the extension's payload, padded to 8 bytes; its length stays 3
    data[at : at + len(name)] = name
    data[at - 1] = len(name)
    image.write_bytes(data)
    info = probe(image)
    assert info.backing.format == name.decode()
    if expected is None:
        with pytest.raises(ProbeError) as caught:
            to_volume_xml(info)
        assert caught.value.code == "xml.unrepresentable"
    else:
        document = to_volume_xml(info)
        assert schema_errors(document.encode()) == []
        assert etree.fromstring(document.encode()).find("backingStore/format").get("type") == expected


def test_a_backing_name_qemu_refuses_is_shown_as_recorded(tmp_path):
    """A ``json:`` name that is not JSON is described as virsh vol-dumpxml
    describes it: the name as recorded in ``<path>``, the rest of the volume as
    usual, in ``info --output xml`` and in a scan, which goes on (such a name
    once stopped the whole scan with a traceback, found by the atheris fuzzer,
    then made the volume an ``<error>``)."""
    from storprobe.scan import scan
    from storprobe.volume_xml import scan_document

    run("qemu-img", "create", "-q", "-f", "qcow2", "-u", "-b", 'json:{"file":', "-F", "raw", tmp_path / "a.qcow2", "1M")
    qemu_img_create(tmp_path / "b.qcow2", "qcow2", "1M")
    backing = etree.fromstring(to_volume_xml(probe(tmp_path / "a.qcow2")).encode()).find("backingStore")
    assert (backing.findtext("path"), backing.find("format").get("type")) == ('json:{"file":', "raw")
    document = scan_document(scan(tmp_path))
    assert schema_errors(document.encode()) == []
    assert [(e.tag, e.findtext("backingStore/path")) for e in etree.fromstring(document.encode())] == [
        ("volume", 'json:{"file":'),
        ("volume", None),
    ]
    cli = subprocess.run([sys.executable, "-m", "storprobe", "scan", "--output", "xml", str(tmp_path)],
                         capture_output=True, text=True, check=False)
    assert (cli.returncode, cli.stderr) == (0, "")
    assert [e.tag for e in etree.fromstring(cli.stdout.encode())] == ["volume", "volume"]


HOSTILE_DOCUMENTS = {
    "external entity": '<!DOCTYPE volume [<!ENTITY x SYSTEM "file:///dev/zero">]><volume><name>&x;</name></volume>',
    "entity expansion": "<!DOCTYPE volume [" + '<!ENTITY a0 "xxxxxxxxxx">' + "".join(
        f'<!ENTITY a{i} "{f"&a{i - 1};" * 10}">' for i in range(1, 10)) + "]><volume><name>&a9;</name></volume>",
    "not XML": "<volume>",
}


@pytest.mark.parametrize("document", HOSTILE_DOCUMENTS.values(), ids=HOSTILE_DOCUMENTS.keys())
def test_xml_we_are_given_is_read_without_entities(tmp_path, document):
    """``validate`` and ``parse_volume_xml`` read XML from elsewhere: a document
    type declaration (entities that name files, or expand a billion-fold) is
    refused outright, never expanded or fetched, as is XML that is not well-formed."""
    assert schema_errors(document) != []
    with pytest.raises(ProbeError) as caught:
        parse_volume_xml(document)
    assert caught.value.code == "xml.invalid"
    path = tmp_path / "hostile.xml"
    path.write_text(document)
    cli = subprocess.run([sys.executable, "-m", "storprobe", "validate", str(path)],
                         capture_output=True, text=True, check=False, timeout=60)
    assert cli.returncode == 1 and cli.stderr.startswith(f"storprobe: {path}: "), cli.stderr


def test_parse_volume_xml_needs_a_valid_volume(images):
    valid = to_volume_xml(probe(images / "v3.qcow2"))
    for broken in (valid.replace("<capacity", "<capacityy").replace("</capacity>", "</capacityy>"),
                   "<volumes/>", valid.replace('<capacity unit="bytes">67108864</capacity>', ""),
                   valid.replace('<format type="qcow2"/>', "")):
        with pytest.raises(ProbeError) as caught:
            parse_volume_xml(broken)
        assert caught.value.code == "xml.invalid"


def test_validate_reads_a_bounded_document(tmp_path, monkeypatch):
    """``validate /dev/zero`` (or any huge file) stops at the size cap."""
    import storprobe.validate

    monkeypatch.setattr(storprobe.validate, "MAX_DOCUMENT", 1000)
    path = tmp_path / "big.xml"
    path.write_text("<volumes>" + "<!-- padding -->" * 100 + "</volumes>")
    assert schema_errors(path.read_bytes()) == ["document is larger than 1000 bytes"]
    cli = subprocess.run([sys.executable, "-m", "storprobe", "validate", "/dev/zero"],
                         capture_output=True, text=True, check=False, timeout=60)
    assert cli.returncode == 1 and "larger than" in cli.stderr


def test_the_label_is_read_with_the_stat_not_when_rendering(tmp_path):
    """libvirt's <label> is the volume's security.selinux, read when the volume is
    opened (with its stat); rendering the record later reads no file, so a label
    changed since, or a file gone since, does not change the document."""
    image = qemu_img_create(tmp_path / "labelled.qcow2", "qcow2", "1M")
    label = "system_u:object_r:virt_image_t:s0"
    try:
        os.setxattr(image, "security.selinux", label.encode() + b"\0")
    except OSError as exc:
        pytest.skip(f"this file system or user cannot set security.selinux: {exc}")
    info = probe(image)
    assert info.security_label == label
    os.setxattr(image, "security.selinux", b"other_u:object_r:other_t:s0\0")
    image.unlink()
    document = etree.fromstring(to_volume_xml(info))
    assert document.findtext("target/permissions/label") == label


class Custom:
    """A row libvirt calls by another name and sizes by the file, in no global table."""

    @staticmethod
    def row():
        from storprobe import FormatSpec, LibvirtFacts

        return FormatSpec(name="customfmt", magic=b"CUSTOMFMT", size_offset=16, size_width=4,
                          libvirt=LibvirtFacts(name="raw", capacity_is_file_size=True))


def test_a_record_of_a_table_given_to_probe_renders_without_that_table(tmp_path):
    """probe(table=...) is honoured by the renderers: they read the row's libvirt
    facts and the parsed backing name from the record, not from the plugins'
    table, which here has no such format."""
    from storprobe.qemu_json import to_qemu_json
    from storprobe.registry import FormatTable, Row

    table = FormatTable([Row(Custom.row(), "custom"), *format_table().rows])
    image = tmp_path / "one.custom"
    image.write_bytes(b"CUSTOMFMT".ljust(16, b"\0") + (1 << 20).to_bytes(4, "little") + bytes(1000))
    info = probe(image, table=table)
    assert "customfmt" not in format_table() and info.format == "customfmt"
    document = etree.fromstring(to_volume_xml(info))
    assert document.find("target/format").get("type") == "raw"  # libvirt's name, from the record
    assert document.findtext("capacity") == str(image.stat().st_size)  # sized by the file, from the record
    assert to_qemu_json(info)["virtual-size"] == 1 << 20


RENDERERS = ("qemu_json.py", "volume_xml.py", "human.py")
#: What a renderer must not call: the global table, the file system, the backing-name parser.
LOOKUPS = {"format_table", "getxattr", "stat", "lstat", "describe_backing_name", "parse_backing_name", "open"}
#: Functions of a renderer module that read a document rather than render a record.
READERS = {"parse_volume_xml", "_our_name"}


def test_renderers_call_no_lookup_and_import_no_engine():
    """Renderers are pure functions of the record: no function of theirs (but the
    XML reader) calls a lookup, and none imports the scan, chain or detect
    engine when it runs (their names are for the type checker only)."""
    root = Path(__file__).resolve().parent.parent / "storprobe"
    for name in RENDERERS:
        tree = ast.parse((root / name).read_text())
        for function in [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name not in READERS]:
            called = {
                node.func.id if isinstance(node.func, ast.Name) else node.func.attr
                for node in ast.walk(function) if isinstance(node, ast.Call)
                and isinstance(node.func, (ast.Name, ast.Attribute))
            }
            assert not called & LOOKUPS, f"{name}: {function.name} calls {called & LOOKUPS}"
        runtime = [node for node in tree.body if isinstance(node, (ast.Import, ast.ImportFrom))]
        modules = {node.module for node in runtime if isinstance(node, ast.ImportFrom) and node.module}
        assert not modules & {"scan", "chain", "detect", "registry"}, f"{name} imports {modules}"
