"""libvirt storage-volume XML (``virsh vol-dumpxml``) for probed images.

Element for element and in libvirt's order. Where libvirt is wrong about a
format (it calls vhdx, bochs, cloop and VMDK descriptors raw) the document
says what the bytes say; such documents validate against our schemas in
``xml-schemas/``, which extend libvirt's.

Safety: a single image's ``<backingStore>`` carries the recorded path and
format only. Permissions and timestamps of a backing file come from ``stat``
of that file, which is done only for a chain the caller asked to follow, so an
untrusted image cannot make us report on arbitrary host paths.

Rendering is a pure function of the records: what it needs beyond the bytes'
facts (the row's libvirt facts, the parsed backing name, the SELinux label)
was put in the record when the volume was probed.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

from lxml import etree

from .backing import BackingStore, RefusedName
from .errors import InvalidDocument, ProbeError, Unrepresentable
from .model import ImageInfo, LibvirtFacts

if TYPE_CHECKING:
    from .chain import Chain
    from .registry import FormatTable
    from .scan import ScanRecord

VOLUME_TYPES = {"file": "file", "block": "block", "directory": "dir"}
#: Our encryption method names -> libvirt's ``<encryption format=...>``.
LIBVIRT_ENCRYPTION = {"aes": "qcow"}
#: QEMU network drivers -> the ``<source protocol=...>`` of libvirt's domain schema
#: (iser is libvirt's iscsi over an rdma host). A store of any other driver or
#: reach (a host device or directory, a debug driver, null, ssh, nvme) is shown
#: as libvirt's vol-dumpxml shows it: the name as recorded in ``<path>``.
LIBVIRT_PROTOCOLS = {
    name: name for name in ("nbd", "iscsi", "rbd", "sheepdog", "gluster", "http", "https", "ftp", "ftps", "tftp",
                            "vxhs", "nfs")
} | {"iser": "iscsi"}


#: What XML 1.0 cannot carry, even escaped: control characters, lone surrogates
#: (the bytes of a file name that are not UTF-8), U+FFFE and U+FFFF.
_NOT_XML = re.compile("[^\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")


def _xml(value: object) -> str:
    """``value`` as XML text; Unrepresentable rather than a changed name."""
    text = str(value)
    if _NOT_XML.search(text):
        raise Unrepresentable(f"{text!r} cannot be written in XML (control characters or bytes that are not UTF-8)")
    return text


def _escaped(text: str) -> str:
    """``text`` with what XML cannot carry written as escapes (``\\x01``; ``\\xff``
    for a byte that is not UTF-8), as virsh shows such names; for error records only."""
    return _NOT_XML.sub(_escape, text)


def _escape(match: re.Match[str]) -> str:
    code = ord(match.group())
    if 0xDC80 <= code <= 0xDCFF:  # a byte os.fsdecode could not decode
        return f"\\x{code - 0xDC00:02x}"
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def _sub(parent: etree._Element, tag: str, text: object = None, **attrs: str) -> etree._Element:
    element = etree.SubElement(parent, tag, {name: _xml(value) for name, value in attrs.items()})
    if text is not None:
        element.text = _xml(text)
    return element


def _timestamp(ns: int) -> str:
    sec, nsec = divmod(ns, 1_000_000_000)
    return f"{sec}.{nsec:09d}" if nsec else str(sec)


def _permissions_and_times(parent: etree._Element, info: ImageInfo, st: os.stat_result) -> None:
    perms = _sub(parent, "permissions")
    _sub(perms, "mode", f"0{st.st_mode & 0o777:o}")  # as libvirt: "0%o" of the rwx bits (00 for mode 0)
    _sub(perms, "owner", st.st_uid)
    _sub(perms, "group", st.st_gid)
    if info.security_label:
        _sub(perms, "label", info.security_label)
    times = _sub(parent, "timestamps")
    _sub(times, "atime", _timestamp(st.st_atime_ns))
    _sub(times, "mtime", _timestamp(st.st_mtime_ns))
    _sub(times, "ctime", _timestamp(st.st_ctime_ns))
    _sub(times, "btime", "0")  # Linux stat has no birth time; libvirt prints 0 too


#: A format name the schema accepts for a format it does not list (xml-schemas/storagevol.rng).
_FORMAT_NAME = re.compile(r"[a-z][a-z0-9_+.\-]*")


def _format_type(name: str) -> str:
    """``name`` for libvirt's ``<format type=...>``; Unrepresentable for a name no
    format could have (an image's backing format is its own text)."""
    if not _FORMAT_NAME.fullmatch(name):
        raise Unrepresentable(f"format {name!r} is not a format name (a-z, then a-z, 0-9, _+.-)")
    return name


def _libvirt_format(info: ImageInfo) -> str:
    """The name libvirt's ``<format type=...>`` uses for the volume's format."""
    return _format_type(info.libvirt.name or info.format)


def volume_element(info: ImageInfo, chain: Chain | None = None, key: str | None = None) -> etree._Element:
    """The ``<volume>`` element for ``info``; with ``chain`` (whose top is
    ``info``) the whole chain nests as ``<backingStore>`` elements."""
    path = os.path.abspath(info.filename)
    is_dir = info.file_type == "directory"
    vol = etree.Element("volume", type=VOLUME_TYPES.get(info.file_type, "file"))
    _sub(vol, "name", os.path.basename(path.rstrip("/")) or path)
    _sub(vol, "key", key or path)
    st = info.stat
    physical = None if is_dir or st is None else info.virtual_size if info.file_type == "block" else st.st_size
    sized_by_file = info.libvirt.capacity_is_file_size
    _sub(vol, "capacity", physical if sized_by_file and physical is not None else info.virtual_size, unit="bytes")
    _sub(vol, "allocation", 0 if is_dir or st is None else st.st_blocks * 512, unit="bytes")
    if physical:  # libvirt writes no <physical> of 0 bytes (an empty file)
        _sub(vol, "physical", physical, unit="bytes")
    target = _sub(vol, "target")
    _sub(target, "path", path)
    _sub(target, "format", type=_libvirt_format(info))
    if st is not None:
        _permissions_and_times(target, info, st)
    if info.encryption is not None:
        _sub(target, "encryption", format=LIBVIRT_ENCRYPTION.get(info.encryption, info.encryption))
    if info.compat is not None:
        _sub(target, "compat", info.compat)
    if info.cluster_size is not None and info.libvirt.cluster_size:
        _sub(target, "clusterSize", info.cluster_size, unit="B")  # elsewhere vol-create would refuse it
    if info.flags is not None:
        features = _sub(target, "features")
        for flag in info.flags:
            _sub(features, flag)
    if chain is not None:
        _chain_backing(vol, chain, 0)
    elif info.backing is not None:
        _backing_element(vol, info.backing_store, info)
    return vol


def _backing_element(parent: etree._Element, store: BackingStore | RefusedName | None, info: ImageInfo) -> None:
    """``<backingStore>`` from the recorded name alone (nothing is stat'ed). A
    local file is its absolute path, a network store libvirt has a protocol for
    its ``<source>``; any other store, a file relative to QEMU's working directory
    (``file:x.img``), and a name QEMU refuses (an error or None) is the name as
    recorded, as libvirt's vol-dumpxml prints it."""
    assert info.backing is not None
    fmt = info.backing_libvirt_format
    if isinstance(store, BackingStore) and store.protocol in LIBVIRT_PROTOCOLS and store.reach == "network":
        _network_backing(parent, store, fmt)
        return
    element = _sub(parent, "backingStore")
    _sub(element, "path", _backing_path(store, info.backing.name))
    if fmt is not None:
        _sub(element, "format", type=_format_type(fmt))


def _backing_path(store: BackingStore | RefusedName | None, name: str) -> str:
    """A local file's absolute path; the recorded name for any other store and
    for a file QEMU opens against its own working directory (``file:x.img``)."""
    if isinstance(store, BackingStore) and store.is_file and store.path is not None:
        if not store.relative_to_working_directory:
            return os.path.abspath(store.path)
    return name


def _network_backing(parent: etree._Element, store: BackingStore, fmt: str | None) -> None:
    """A network backing, described the way libvirt's domain XML describes one."""
    element = _sub(parent, "backingStore", type="network")
    if fmt is not None:
        _sub(element, "format", type=_format_type(fmt))
    source = _sub(element, "source", protocol=LIBVIRT_PROTOCOLS[store.protocol])
    if store.target is not None:
        source.set("name", _xml(store.target))
    for host in store.hosts:
        attrs = {"transport": host.transport}
        if host.name is not None:
            attrs["name"] = host.name
        if host.port is not None:
            attrs["port"] = str(host.port)
        if host.socket is not None:
            attrs["socket"] = host.socket
        _sub(source, "host", **attrs)


def _chain_backing(parent: etree._Element, chain: Chain, index: int) -> None:
    """Nest the backing of ``chain.images[index]`` (and below) under ``parent``."""
    info, store = chain.images[index], chain.stores[index] if index < len(chain.stores) else None
    if info.backing is None:
        return
    if store is None or index + 1 >= len(chain.images) or not store.is_file:
        _backing_element(parent, store, info)
        return
    below = chain.images[index + 1]
    element = _sub(parent, "backingStore")
    _sub(element, "path", os.path.abspath(below.filename))
    _sub(element, "format", type=_libvirt_format(below))
    if below.stat is not None:
        _permissions_and_times(element, below, below.stat)
    _chain_backing(element, chain, index + 1)


def to_volume_xml(info: ImageInfo, chain: Chain | None = None) -> str:
    """The document ``virsh vol-dumpxml`` prints (2-space indent, no declaration)."""
    return _serialize(volume_element(info, chain))


def scan_document(records: Iterable[ScanRecord]) -> str:
    """A ``<volumes>`` document: a ``<volume>`` per probed entry, an ``<error>``
    per entry that could not be probed."""
    return "".join(scan_document_parts(map(scan_entry, records)))


def scan_entry(record: ScanRecord) -> str:
    """One record's element of a ``<volumes>`` document, as indented text. A
    volume the XML cannot describe (a name XML cannot carry) is an ``<error>``,
    its path escaped."""
    error = record.error
    if record.info is not None:
        try:
            element = volume_element(record.info)
        except ProbeError as exc:
            error = exc
    if error is not None:
        element = etree.Element("error", path=_escaped(record.path), code=error.code)
        element.text = _escaped(error.reason)
    etree.indent(element, space="  ", level=1)
    return "  " + etree.tostring(element, encoding="unicode") + "\n"


def scan_document_parts(entries: Iterable[str]) -> Iterator[str]:
    """The text of a ``<volumes>`` document around entries from :func:`scan_entry`, piece by piece."""
    opened = False
    for entry in entries:
        if not opened:
            yield "<volumes>\n"
            opened = True
        yield entry
    yield "</volumes>\n" if opened else "<volumes/>\n"


def _serialize(element: etree._Element) -> str:
    etree.indent(element, space="  ")
    return etree.tostring(element, encoding="unicode") + "\n"


def parse_volume_xml(text: str | bytes, table: FormatTable | None = None) -> ImageInfo:
    """Read a ``<volume>`` document back into the data model (the facts it
    carries, with ``table``'s row for its format: default, the plugins' table);
    InvalidDocument for anything else, or one without a capacity or a format."""
    from .backing import describe_backing_name
    from .model import Backing
    from .registry import format_table
    from .validate import valid_root

    table = table or format_table()
    root = valid_root(text)
    target = root.find("target")
    capacity = root.findtext("capacity")
    format_el = target.find("format") if target is not None else None
    if root.tag != "volume" or capacity is None or format_el is None or target is None:
        raise InvalidDocument("not a <volume> document with a <capacity> and a <format>")
    fmt = _our_name(format_el.get("type", ""), table)
    path = target.findtext("path", "")
    encryption_el = target.find("encryption")
    encryption = None
    if encryption_el is not None:
        reverse = {v: k for k, v in LIBVIRT_ENCRYPTION.items()}
        recorded = encryption_el.get("format", "")
        encryption = reverse.get(recorded, recorded)
    features_el = target.find("features")
    backing_el = root.find("backingStore")
    backing = backing_format = None
    backing_path = backing_el.findtext("path") if backing_el is not None else None
    if backing_el is not None and backing_path is not None:
        bfmt = backing_el.find("format")
        backing_format = bfmt.get("type") if bfmt is not None else None
        backing = Backing(backing_path, _our_name(backing_format, table) if backing_format is not None else None)
    types = {v: k for k, v in VOLUME_TYPES.items()}
    cluster = target.findtext("clusterSize")
    allocation = root.findtext("allocation")
    return ImageInfo(
        filename=path,
        format=fmt,
        virtual_size=int(capacity),
        actual_size=int(allocation) if allocation is not None else None,
        file_type=types.get(root.get("type", ""), "file"),
        evidence="caller",
        encryption=encryption,
        compat=target.findtext("compat"),
        cluster_size=int(cluster) if cluster is not None else None,
        flags=tuple(str(child.tag) for child in features_el) if features_el is not None else None,
        backing=backing,
        libvirt=table[fmt].libvirt if fmt in table else LibvirtFacts(),
        backing_libvirt_format=backing_format,
        backing_store=describe_backing_name(backing.name, path) if backing is not None else None,
    )


def _our_name(libvirt_name: str, table: FormatTable) -> str:
    """Our format name for a libvirt one: the row of that name, else the row that maps to it."""
    if libvirt_name in table:
        return libvirt_name
    return next((s.name for s in table.specs if s.libvirt_format == libvirt_name), libvirt_name)
