"""Backing-store names as images record them, read as QEMU reads them.

A name whose text before the first ``/`` is ``PROTOCOL:`` selects one of QEMU's
block protocols, and not every protocol is a network: ``fat:`` shows a host
directory, ``host_device:`` a host disk, ``blkdebug:`` reads a host file,
``null-co://`` nothing at all. Each name is reported with what it ``reach``-es.
``json:{...}`` specifications are read with QEMU's flattening rules.

Parsing is pure string work: nothing here resolves a host name, opens a socket
or touches a file. A plain relative name is resolved against the directory of
the image that records it, as QEMU resolves it; a relative name after ``file:``
or inside ``json:`` stays relative, since QEMU opens it against its own working
directory, which no image can tell. A name QEMU refuses (a protocol it does
not have, an ``rbd:`` without a pool, malformed ``json:``) is a BackingNameError;
:func:`describe_backing_name` returns that error instead, for renderers.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple
from urllib.parse import unquote

from .errors import BackingNameError
from .model import EMPTY

#: What a backing name reaches (``BackingStore.reach``).
REACH_FILE = "file"  # a local file, ``path`` as QEMU resolves it (relative: QEMU's working directory)
REACH_HOST_DEVICE = "host-device"  # a host block or CD-ROM device, ``path`` the device
REACH_HOST_DIRECTORY = "host-directory"  # a host directory shown as a FAT disk, ``path`` the directory
REACH_HOST_FILE = "host-file"  # host files read by a debug driver, ``path`` the first one named
REACH_NETWORK = "network"  # a server, never contacted: ``hosts`` and ``target``
REACH_NONE = "none"  # no data at all (null-co, null-aio)
REACHES = (REACH_FILE, REACH_HOST_DEVICE, REACH_HOST_DIRECTORY, REACH_HOST_FILE, REACH_NETWORK, REACH_NONE)


class BlockProtocol(NamedTuple):
    """A block protocol: QEMU's driver name (what ``json:`` names, and
    ``BackingStore.protocol``) and what it reaches."""

    driver: str
    reach: str


_NET = REACH_NETWORK
#: QEMU 7.2's block protocols, by the ``.protocol_name`` of each driver in
#: block/*.c (the text before ``:`` that selects it). The driver name differs
#: only for vvfat (protocol ``fat``) and the nbd/gluster transports.
PROTOCOLS: Mapping[str, BlockProtocol] = {
    "file": BlockProtocol("file", REACH_FILE),  # file-posix.c
    "host_device": BlockProtocol("host_device", REACH_HOST_DEVICE),  # file-posix.c
    "host_cdrom": BlockProtocol("host_cdrom", REACH_HOST_DEVICE),  # file-posix.c
    "fat": BlockProtocol("vvfat", REACH_HOST_DIRECTORY),  # vvfat.c
    "blkdebug": BlockProtocol("blkdebug", REACH_HOST_FILE),  # blkdebug.c: a rules file, then the image
    "blkverify": BlockProtocol("blkverify", REACH_HOST_FILE),  # blkverify.c: a raw copy, then the image
    "null-co": BlockProtocol("null-co", REACH_NONE),  # null.c
    "null-aio": BlockProtocol("null-aio", REACH_NONE),  # null.c
    "nbd": BlockProtocol("nbd", _NET), "nbd+tcp": BlockProtocol("nbd", _NET),  # nbd.c
    "nbd+unix": BlockProtocol("nbd", _NET),
    "rbd": BlockProtocol("rbd", _NET),  # rbd.c
    "iscsi": BlockProtocol("iscsi", _NET), "iser": BlockProtocol("iser", _NET),  # iscsi.c
    "nfs": BlockProtocol("nfs", _NET),  # nfs.c
    "ssh": BlockProtocol("ssh", _NET),  # ssh.c
    "gluster": BlockProtocol("gluster", _NET), "gluster+tcp": BlockProtocol("gluster", _NET),  # gluster.c
    "gluster+unix": BlockProtocol("gluster", _NET), "gluster+rdma": BlockProtocol("gluster", _NET),
    "http": BlockProtocol("http", _NET), "https": BlockProtocol("https", _NET),  # curl.c
    "ftp": BlockProtocol("ftp", _NET), "ftps": BlockProtocol("ftps", _NET),
    # nvme.c: takes over a host NVMe controller by its PCI address, through VFIO: a host device
    "nvme": BlockProtocol("nvme", REACH_HOST_DEVICE),
    # blkio.c (libblkio; not in every build: Debian's 7.2 lacks it)
    "io_uring": BlockProtocol("io_uring", REACH_HOST_FILE),
    "nvme-io_uring": BlockProtocol("nvme-io_uring", REACH_HOST_DEVICE),
    "virtio-blk-vfio-pci": BlockProtocol("virtio-blk-vfio-pci", REACH_HOST_DEVICE),
    "virtio-blk-vhost-vdpa": BlockProtocol("virtio-blk-vhost-vdpa", REACH_HOST_DEVICE),
    "virtio-blk-vhost-user": BlockProtocol("virtio-blk-vhost-user", _NET),
}
#: Network protocols older QEMUs had and libvirt still parses in backing names
#: (sheepdog and vxhs were removed in QEMU 6.0, tftp from curl.c before 7.2).
LEGACY_PROTOCOLS: Mapping[str, BlockProtocol] = {
    "sheepdog": BlockProtocol("sheepdog", _NET), "sheepdog+tcp": BlockProtocol("sheepdog", _NET),
    "sheepdog+unix": BlockProtocol("sheepdog", _NET),
    "vxhs": BlockProtocol("vxhs", _NET), "tftp": BlockProtocol("tftp", _NET),
}
#: BlockProtocol drivers by the name ``json:`` gives them.
JSON_DRIVERS: Mapping[str, BlockProtocol] = {p.driver: p for p in (*PROTOCOLS.values(), *LEGACY_PROTOCOLS.values())}
#: QEMU 7.2's format and filter drivers (``qemu-img --help`` less the protocols):
#: ``json:`` layers whose ``file`` child holds the data.
LAYER_DRIVERS = frozenset({
    "blklogwrites", "bochs", "cloop", "compress", "copy-before-write", "copy-on-read", "dmg", "luks",
    "parallels", "preallocate", "qcow", "qcow2", "qed", "quorum", "raw", "replication", "snapshot-access",
    "throttle", "vdi", "vhdx", "vmdk", "vpc",
})
#: Options of a layer that open further images or files besides ``file``.
OTHER_CHILDREN = ("backing", "data-file", "log", "target", "children", "extents", "x-image", "x-raw")
#: Longest json: specification parsed; qcow2 caps backing names at 1023 bytes.
JSON_LIMIT = 65536
#: Format and filter layers above a protocol node that are followed.
JSON_LAYERS = 16
#: What QEMU takes for a protocol prefix: text before a colon that comes before any slash.
_PREFIX = re.compile(r"[^:/]*:")


class Host(NamedTuple):
    """One server of a network backing (``port`` None: the protocol's default)."""

    transport: str  # "tcp", "unix", "rdma"
    name: str | None = None
    port: int | None = None
    socket: str | None = None


class BackingStore(NamedTuple):
    """What a backing name denotes: QEMU's driver (``protocol``) and what it
    ``reach``-es (one of :data:`REACHES`). Only a ``"file"`` is followed by a
    backing chain; nothing else is ever opened."""

    name: str
    protocol: str
    reach: str
    path: str | None = None
    hosts: tuple[Host, ...] = ()
    target: str | None = None
    options: Mapping[str, str] = EMPTY

    @property
    def is_file(self) -> bool:
        return self.reach == REACH_FILE

    @property
    def relative_to_working_directory(self) -> bool:
        """A local file QEMU opens against its own working directory, not the
        image's directory: a relative name after ``file:`` or inside ``json:``."""
        return (self.is_file and self.path is not None and not os.path.isabs(self.path)
                and has_protocol_prefix(self.name))


def parse_backing_name(name: str, image_path: str | None = None) -> BackingStore:
    """Classify ``name`` as recorded by the image at ``image_path``;
    BackingNameError for a name QEMU would refuse."""
    if name.startswith("json:"):
        return _from_json(name)
    return _from_plain(name, image_path)


class RefusedName(NamedTuple):
    """A recorded name QEMU refuses, kept in a record with the reason (renderers
    show it as recorded, flagged); :meth:`error` is what parsing it raises."""

    name: str
    reason: str

    @property
    def code(self) -> str:
        return BackingNameError.code

    def error(self) -> BackingNameError:
        return BackingNameError(self.reason)


def describe_backing_name(name: str, image_path: str | None = None) -> BackingStore | RefusedName:
    """:func:`parse_backing_name`, with a name QEMU refuses returned as a :class:`RefusedName`."""
    try:
        return parse_backing_name(name, image_path)
    except BackingNameError as exc:
        return RefusedName(name, exc.reason)


def has_protocol_prefix(name: str) -> bool:
    """QEMU's path_has_protocol: a colon before any slash. QEMU joins the image's
    directory only to a relative name without one; a relative file name after
    ``file:`` or in ``json:`` is opened against QEMU's own working directory."""
    return _PREFIX.match(name) is not None


def _from_plain(name: str, image_path: str | None) -> BackingStore:
    match = _PREFIX.match(name)
    if match is None:
        return BackingStore(name, "file", REACH_FILE, path=_resolve(name, image_path))
    prefix = match.group()[:-1]
    protocol = PROTOCOLS.get(prefix) or LEGACY_PROTOCOLS.get(prefix)
    if protocol is None:
        raise BackingNameError(f"backing {name!r} names the block protocol {prefix!r}, which QEMU does not have")
    rest = name[len(prefix) + 1 :]
    if protocol.driver == "file":
        if not rest:
            raise _bad(name, "names no file")
        return BackingStore(name, "file", REACH_FILE, path=rest)  # QEMU joins no directory to a protocol name
    return _PLAIN_PARSERS.get(protocol.driver, _after_prefix)(name, prefix, rest, protocol)


def _resolve(path: str, image_path: str | None) -> str:
    if os.path.isabs(path) or image_path is None:
        return path
    return os.path.join(os.path.dirname(image_path), path)


def _store(name: str, protocol: BlockProtocol, **fields: Any) -> BackingStore:
    return BackingStore(name, protocol.driver, protocol.reach, **fields)


def _bad(name: str, why: str) -> BackingNameError:
    return BackingNameError(f"backing {name!r} {why}")


def _port(text: object, name: str) -> int | None:
    """A port number; 0 and an empty text mean the protocol's default, as in QEMU."""
    if text is None or text == "":
        return None
    if isinstance(text, bool) or not (isinstance(text, int) or (isinstance(text, str) and text.isdecimal())):
        raise _bad(name, f"has a non-numeric port {text!r}")
    port = int(text)
    if not 0 <= port <= 65535:
        raise _bad(name, f"has port {port} out of range")
    return port or None


# --- names without json: -------------------------------------------------


def _after_prefix(name: str, prefix: str, rest: str, protocol: BlockProtocol) -> BackingStore:
    """``host_device:/dev/sda``, ``io_uring:PATH``: the rest of the name is the host
    path (for vhost-user, the server's socket)."""
    if not rest:
        raise _bad(name, f"names no {protocol.driver} path")
    if protocol.reach == REACH_NETWORK:
        return _store(name, protocol, hosts=(Host("unix", socket=rest),))
    return _store(name, protocol, path=rest)


def _vvfat(name: str, prefix: str, rest: str, protocol: BlockProtocol) -> BackingStore:
    """``fat:[floppy:][rw:][12:|16:|32:]DIR``: options found anywhere as ``:opt:``,
    the directory after the last colon (vvfat_parse_filename; ``:X:`` before it is
    kept as a DOS drive)."""
    last = name.rindex(":")
    directory = name[last - 1 :] if name[last - 2] == ":" and _ascii_alpha(name[last - 1]) else name[last + 1 :]
    if not directory:
        raise _bad(name, "names no directory")
    options = {key: "on" for key in ("floppy", "rw") if f":{key}:" in name}
    fat_type = next((bits for bits in ("32", "16", "12") if f":{bits}:" in name), None)
    if fat_type:
        options["fat-type"] = fat_type
    return _store(name, protocol, path=directory, options=options)


def _ascii_alpha(char: str) -> bool:
    return char.isascii() and char.isalpha()


def _two_files(first: str, second: str) -> Callable[[str, str, str, BlockProtocol], BackingStore]:
    """``blkdebug:[RULES]:IMAGE`` and ``blkverify:RAW:IMAGE``: two host names split at
    the first colon after the prefix; the first one named is the path."""

    def parse(name: str, prefix: str, rest: str, protocol: BlockProtocol) -> BackingStore:
        head, sep, tail = rest.partition(":")
        if not sep:
            raise _bad(name, f"needs both {first} and {second} ({prefix}:{first.upper()}:{second.upper()})")
        path = head or tail
        if not path:
            raise _bad(name, f"names no {first} and no {second}")
        options = {key: value for key, value in ((first, head), (second, tail)) if value}
        return _store(name, protocol, path=path, options=options)

    return parse


def _null(name: str, prefix: str, rest: str, protocol: BlockProtocol) -> BackingStore:
    if rest != "//":
        raise _bad(name, f"is not '{prefix}://', the only name the {prefix} driver takes")
    return _store(name, protocol)


def _nbd(name: str, prefix: str, rest: str, protocol: BlockProtocol) -> BackingStore:
    """nbd_parse_filename: a URI when ``://`` appears anywhere, else
    ``nbd:HOST:PORT[:exportname=E]`` / ``nbd:unix:SOCKET[:exportname=E]`` where the
    export is everything after the first ``:exportname=`` (colons included)."""
    if "://" in name:
        return _nbd_uri(name, protocol)
    export = None
    at = name.find(":exportname=")
    text = name
    if at >= 0:
        export, text = name[at + len(":exportname=") :], name[:at]
        if not export:
            raise _bad(name, "names an empty NBD export and so no server")
    if not text.startswith("nbd:"):
        raise _bad(name, "is not an nbd: name (nbd:HOST:PORT or nbd:unix:SOCKET)")
    spec = text[len("nbd:") :]
    if spec.startswith("unix:"):
        if not spec[len("unix:") :]:
            raise _bad(name, "names no NBD socket")
        return _store(name, protocol, hosts=(Host("unix", socket=spec[len("unix:") :]),), target=export)
    if not spec:
        raise _bad(name, "names no NBD server")
    return _store(name, protocol, hosts=(_inet(spec, name),), target=export)


#: inet_parse: ``[V6]:PORT`` or ``HOST:PORT`` (host at most 64 characters, port
#: at most 32, a port required), then ``,option`` flags.
_INET = re.compile(r"(?:\[([^\]]{1,64})\]|([^:\[]{1,64})):([^,]{1,32})(?:,.*)?", re.S)


def _inet(spec: str, name: str) -> Host:
    match = _INET.fullmatch(spec)
    if match is None:
        raise _bad(name, f"has no HOST:PORT address QEMU can parse ({spec!r})")
    return Host("tcp", match.group(1) or match.group(2), _port(match.group(3), name))


class _Uri(NamedTuple):
    """A URI split as QEMU's uri_parse splits it (path and host percent-decoded)."""

    scheme: str
    user: str | None
    host: str | None
    port: int | None
    path: str
    query: tuple[tuple[str, str], ...]
    raw_query: str | None
    fragment: str | None


_URI = re.compile(r"([^:/?#]+)://([^/?#]*)([^?#]*)(?:\?([^#]*))?(?:#(.*))?", re.S)
_HOSTPORT = re.compile(r"(?:\[([^\]]*)\]|([^:\[\]]*))(?::(\d*))?", re.S)


def _split_uri(name: str) -> _Uri:
    match = _URI.fullmatch(name)
    if match is None:
        raise _bad(name, "is not a URI (SCHEME://HOST/PATH)")
    scheme, authority, path, query, fragment = match.groups()
    user, at, hostport = authority.rpartition("@")
    hp = _HOSTPORT.fullmatch(hostport)
    if hp is None:
        raise _bad(name, f"has a malformed host or port {hostport!r}")
    host = unquote(hp.group(1) if hp.group(1) is not None else hp.group(2)) or None
    pairs = tuple(_query_pair(item) for item in re.split("[&;]", query) if item) if query else ()
    return _Uri(scheme, unquote(user) if at else None, host, _port(hp.group(3), name), unquote(path), pairs,
                query, fragment)


def _query_pair(item: str) -> tuple[str, str]:
    key, _, value = item.partition("=")
    return unquote(key), unquote(value)


def _socket_query(uri: _Uri, name: str, unix: bool) -> str | None:
    """nbd and gluster URIs: ``?socket=PATH`` and nothing else over unix, no query over tcp."""
    if unix:
        if len(uri.query) != 1 or uri.query[0][0] != "socket" or uri.host or uri.port:
            raise _bad(name, "needs exactly ?socket=PATH and no host over unix")
        return uri.query[0][1]
    if uri.query:
        raise _bad(name, "has a query, which only the +unix transport takes")
    return None


def _nbd_uri(name: str, protocol: BlockProtocol) -> BackingStore:
    """nbd[+tcp]://HOST[:PORT]/EXPORT, nbd+unix:///EXPORT?socket=PATH: one leading
    ``/`` of the path is dropped, the rest is the export."""
    uri = _split_uri(name)
    if uri.scheme not in ("nbd", "nbd+tcp", "nbd+unix"):
        raise _bad(name, "is not an nbd URI")
    export = uri.path[1:] if uri.path.startswith("/") else uri.path
    socket = _socket_query(uri, name, uri.scheme == "nbd+unix")
    if socket is not None:
        host = Host("unix", socket=socket)
    elif uri.host is None:
        raise _bad(name, "names no NBD server")
    else:
        host = Host("tcp", uri.host, uri.port)
    return _store(name, protocol, hosts=(host,), target=export or None)


def _gluster(name: str, prefix: str, rest: str, protocol: BlockProtocol) -> BackingStore:
    """gluster[+tcp|+unix|+rdma]://[HOST[:PORT]]/VOLUME/PATH[?socket=...]; no host
    is localhost, and rdma falls back to tcp (qemu_gluster_parse_uri)."""
    uri = _split_uri(name)
    volume, sep, path = uri.path.lstrip("/").partition("/")
    path = path.lstrip("/")
    if not volume or not path:
        raise _bad(name, "names no gluster VOLUME/PATH")
    socket = _socket_query(uri, name, uri.scheme == "gluster+unix")
    host = Host("unix", socket=socket) if socket is not None else Host("tcp", uri.host or "localhost", uri.port)
    return _store(name, protocol, hosts=(host,), target=f"{volume}/{path}")


def _iscsi(name: str, prefix: str, rest: str, protocol: BlockProtocol) -> BackingStore:
    """iscsi://[USER[%PASSWORD]@]HOST[:PORT]/TARGET/LUN (libiscsi: a target and a
    numeric LUN are required); iser:// is iSCSI over RDMA."""
    uri = _split_uri(name)
    target, _, lun = uri.path[1:].rpartition("/")
    if uri.host is None or not target or not lun.isdecimal():
        raise _bad(name, "is not iscsi://HOST[:PORT]/TARGET/LUN")
    options = {"user": uri.user.partition("%")[0]} if uri.user else {}
    transport = "rdma" if protocol.driver == "iser" else "tcp"
    return _store(name, protocol, hosts=(Host(transport, uri.host, uri.port),), target=f"{target}/{int(lun)}",
                  options=options)


#: nfs_parse_uri: the query parameters nfs:// takes, each a number.
NFS_PARAMETERS = ("uid", "gid", "tcp-syn-count", "readahead-size", "page-cache-size", "debug")


def _nfs(name: str, prefix: str, rest: str, protocol: BlockProtocol) -> BackingStore:
    uri = _split_uri(name)
    if uri.host is None or not uri.path:
        raise _bad(name, "is not nfs://HOST/PATH")
    for key, value in uri.query:
        if key not in NFS_PARAMETERS or not re.fullmatch(r"(0[xX][0-9a-fA-F]+|\d+)", value):
            raise _bad(name, f"has an NFS parameter QEMU refuses: {key}={value}")
    return _store(name, protocol, hosts=(Host("tcp", uri.host, uri.port),), target=uri.path, options=dict(uri.query))


def _ssh(name: str, prefix: str, rest: str, protocol: BlockProtocol) -> BackingStore:
    uri = _split_uri(name)
    if uri.host is None or not uri.path:
        raise _bad(name, "is not ssh://[USER@]HOST[:PORT]/PATH")
    options = {k: v for k, v in uri.query if k == "host_key_check"}
    if uri.user:
        options["user"] = uri.user
    return _store(name, protocol, hosts=(Host("tcp", uri.host, uri.port),), target=uri.path, options=options)


def _curl(name: str, prefix: str, rest: str, protocol: BlockProtocol) -> BackingStore:
    """http(s)/ftp(s)/tftp URLs, as libvirt describes them: the path without its
    leading ``/`` is the target, the query stays apart."""
    uri = _split_uri(name)
    if uri.host is None:
        raise _bad(name, "names no host")
    options = {"query": uri.raw_query} if uri.raw_query else {}
    if uri.user:
        options["user"] = uri.user.partition(":")[0]
    return _store(name, protocol, hosts=(Host("tcp", uri.host, uri.port),), target=uri.path[1:] or None,
                  options=options)


def _nvme(name: str, prefix: str, rest: str, protocol: BlockProtocol) -> BackingStore:
    """nvme://PCI-ADDRESS/NAMESPACE (nvme_parse_filename; namespace 1 by default)."""
    device, sep, namespace = rest[2:].partition("/") if rest.startswith("//") else ("", "", "")
    if not device or not sep or not (namespace == "" or namespace.isdecimal()):
        raise _bad(name, "is not nvme://PCI-ADDRESS/NAMESPACE")
    return _store(name, protocol, target=f"{device}/{int(namespace or 1)}")


def _vxhs(name: str, prefix: str, rest: str, protocol: BlockProtocol) -> BackingStore:
    uri = _split_uri(name)
    if uri.host is None or not uri.path.strip("/"):
        raise _bad(name, "is not vxhs://HOST[:PORT]/VDISK-ID")
    return _store(name, protocol, hosts=(Host("tcp", uri.host, uri.port),), target=uri.path[1:])


def _sheepdog(name: str, prefix: str, rest: str, protocol: BlockProtocol) -> BackingStore:
    """sheepdog[+tcp|+unix]://[HOST[:PORT]]/VDI[?socket=PATH][#SNAPSHOT], or the
    old ``sheepdog:[HOST:PORT:]VDI[:SNAPSHOT]``."""
    if rest.startswith("//"):
        uri = _split_uri(name)
        socket = dict(uri.query).get("socket") if prefix == "sheepdog+unix" else None
        host = Host("unix", socket=socket) if socket else Host("tcp", uri.host, uri.port) if uri.host else None
        vdi = uri.path[1:]
        snapshot = uri.fragment
    else:
        parts = rest.split(":")
        host = Host("tcp", parts[0], _port(parts[1], name)) if len(parts) >= 3 else None
        vdi, *tag = parts[2:] if host else parts
        snapshot = tag[0] if tag else None
    if not vdi:
        raise _bad(name, "names no sheepdog VDI")
    return _store(name, protocol, hosts=(host,) if host else (), target=vdi,
                  options={"snapshot": snapshot} if snapshot else {})


def _rbd_token(text: str, delim: str) -> tuple[str, str | None]:
    """qemu_rbd_next_tok: ``text`` up to the first unescaped ``delim``, and the rest
    (None when there is no ``delim``)."""
    i = 0
    while i < len(text):
        if text[i] == delim:
            return text[:i], text[i + 1 :]
        i += 2 if text[i] == "\\" and i + 1 < len(text) else 1
    return text, None


def _rbd_unescape(text: str) -> str:
    return re.sub(r"\\(.)", r"\1", text, flags=re.S)


def _rbd(name: str, prefix: str, rest: str, protocol: BlockProtocol) -> BackingStore:
    """qemu_rbd_parse_filename: ``rbd:POOL/[NAMESPACE/]IMAGE[@SNAP][:KEY=VALUE...]``,
    the pool required and split off at the first ``/``; ``\\`` escapes a character."""
    pool, tail = _rbd_token(rest, "/")
    if tail is None:
        raise _bad(name, "names no rbd pool (rbd:POOL/IMAGE)")
    options: dict[str, str] = {}
    if "@" in tail:  # QEMU looks for '@' anywhere in the rest, options included
        image, tail = _rbd_token(tail, "@")
        if tail is not None:
            snapshot, tail = _rbd_token(tail, ":")
            options["snapshot"] = _rbd_unescape(snapshot)
    else:
        image, tail = _rbd_token(tail, ":")
    namespace = None
    if "/" in image:
        namespace, after = _rbd_token(image, "/")
        image = after or ""
    pool, image = _rbd_unescape(pool), _rbd_unescape(image)
    if not pool or not image:
        raise _bad(name, "names no rbd pool or image")
    keys = {"id": "user"}
    while tail is not None:
        key, tail = _rbd_token(tail, "=")
        if tail is None:
            raise _bad(name, f"has an rbd option without a value: {key!r}")
        value, tail = _rbd_token(tail, ":")
        options[keys.get(_rbd_unescape(key), _rbd_unescape(key))] = _rbd_unescape(value)
    hosts = tuple(_mon_host(h, name) for h in re.split("[;, ]", options.pop("mon_host", "")) if h)
    target = "/".join(part for part in (pool, namespace and _rbd_unescape(namespace), image) if part)
    return _store(name, protocol, hosts=hosts, target=target, options=options)


def _mon_host(text: str, name: str) -> Host:
    if text.startswith("["):
        host, _, port = text[1:].partition("]")
        return Host("tcp", host, _port(port.removeprefix(":"), name))
    host, sep, port = text.rpartition(":")
    return Host("tcp", host, _port(port, name)) if sep else Host("tcp", text)


_PLAIN_PARSERS: Mapping[str, Callable[[str, str, str, BlockProtocol], BackingStore]] = {
    "vvfat": _vvfat,
    "blkdebug": _two_files("config", "image"),
    "blkverify": _two_files("raw", "test"),
    "null-co": _null, "null-aio": _null,
    "nbd": _nbd, "rbd": _rbd, "gluster": _gluster, "iscsi": _iscsi, "iser": _iscsi, "nfs": _nfs, "ssh": _ssh,
    "http": _curl, "https": _curl, "ftp": _curl, "ftps": _curl, "tftp": _curl,
    "nvme": _nvme, "vxhs": _vxhs, "sheepdog": _sheepdog,
}


# --- json: ----------------------------------------------------------------


def _from_json(name: str) -> BackingStore:
    if len(name) > JSON_LIMIT:
        raise BackingNameError(f"json: backing specification is longer than {JSON_LIMIT} bytes")
    try:
        root = json.loads(name[len("json:") :], object_pairs_hook=_unique_keys)
        if not isinstance(root, dict):
            raise BackingNameError("json: backing is not a JSON object")
        node = _crumple(_flatten(root))
    except (ValueError, RecursionError) as exc:
        raise BackingNameError(f"json: backing is not valid JSON: {exc}") from None
    return _json_node(name, node)


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """QEMU's JSON parser refuses an object that has a key twice."""
    obj: dict[str, Any] = {}
    for key, value in pairs:
        if key in obj:
            raise BackingNameError(f"json: backing has the key {key!r} twice")
        obj[key] = value
    return obj


def _is_container(value: object) -> bool:
    return isinstance(value, (dict, list)) and bool(value)


def _flatten(root: dict[str, Any]) -> dict[str, Any]:
    """qdict_flatten: nested objects and arrays become dotted keys
    (``{"file": {"server": [{"host": h}]}}`` is ``file.server.0.host``). A dotted
    key written at the top yields to the same key reached through nesting, as in
    QEMU; the same key reached twice through nesting is ambiguous, so refused."""
    flat = {key: value for key, value in root.items() if not _is_container(value)}
    nested: dict[str, Any] = {}
    for key, value in root.items():
        if _is_container(value):
            _flatten_into(nested, value, key)
    flat.update(nested)
    return flat


def _flatten_into(out: dict[str, Any], value: dict[str, Any] | list[Any], prefix: str) -> None:
    items = value.items() if isinstance(value, dict) else enumerate(value)
    for key, item in items:
        dotted = f"{prefix}.{key}"
        if _is_container(item):
            _flatten_into(out, item, dotted)
        elif dotted in out:
            raise BackingNameError(f"json: backing gives {dotted!r} twice")
        else:
            out[dotted] = item


def _crumple(flat: dict[str, Any]) -> dict[str, Any]:
    """qdict_crumple: dotted keys back into objects; an object whose keys are
    exactly 0..n-1 is an array."""
    root: dict[str, Any] = {}
    for key, value in flat.items():
        node = root
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise BackingNameError(f"json: backing key {key!r} conflicts with a plain value")
        if leaf in node:
            raise BackingNameError(f"json: backing key {key!r} conflicts with an object")
        node[leaf] = value
    listed = _listed(root)
    if not isinstance(listed, dict):
        raise BackingNameError("json: backing's options are array indices, not names")
    return listed


def _listed(node: Any) -> Any:
    if not isinstance(node, dict) or not node:
        return node
    items = {key: _listed(value) for key, value in node.items()}
    indices = [key for key in items if key.isdecimal()]
    if not indices:
        return items
    if len(indices) != len(items):
        raise BackingNameError("json: backing mixes array indices and names in one object")
    if sorted(indices, key=int) != [str(i) for i in range(len(items))]:
        raise BackingNameError("json: backing has an array with an index missing")
    return [items[str(i)] for i in range(len(items))]


def _json_node(name: str, node: dict[str, Any]) -> BackingStore:
    """Follow format and filter layers down their ``file`` child to the protocol node."""
    for _ in range(JSON_LAYERS):
        driver = node.get("driver")
        if isinstance(driver, str) and driver in JSON_DRIVERS:
            protocol = JSON_DRIVERS[driver]
            return _JSON_PARSERS.get(protocol.driver, _json_path("path"))(name, node, protocol)
        if driver is not None and (not isinstance(driver, str) or driver not in LAYER_DRIVERS):
            raise BackingNameError(f"json: backing names the driver {driver!r}, which QEMU does not have")
        others = [key for key in OTHER_CHILDREN if node.get(key) is not None]
        if others:
            raise BackingNameError(f"json: backing layer {driver or '(probed)'} also opens {', '.join(others)}, "
                                   "which storprobe does not describe")
        child, filename = node.get("file"), node.get("filename")
        if child is not None and filename is not None:
            raise BackingNameError("json: backing gives both file and filename")
        if isinstance(child, dict):
            node = child
        elif isinstance(filename, str) and not filename.startswith("json:"):
            return _from_plain(filename, None)._replace(name=name)  # the protocol from the filename
        else:
            raise BackingNameError("json: backing names no protocol driver and no filename")
    raise BackingNameError(f"json: backing nests more than {JSON_LAYERS} layers")


def _text(node: dict[str, Any], key: str, name: str, required: bool = True) -> str | None:
    value = node.get(key)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)
    if value is None or value == "":
        if required:
            raise BackingNameError(f"json: {node.get('driver')} backing has no {key}")
        return None
    if not isinstance(value, str):
        raise BackingNameError(f"json: {node.get('driver')} backing has a {key} that is not text")
    return value


def _scalars(node: dict[str, Any], *used: str) -> dict[str, str]:
    """The node's other plain options, as text (the secrets left out)."""
    skip = {"driver", "password", *used}
    return {
        key: ("on" if value else "off") if isinstance(value, bool) else str(value)
        for key, value in node.items()
        if key not in skip and isinstance(value, (str, int, float, bool))
    }


def _servers(value: object, name: str, many: bool = False) -> tuple[Host, ...]:
    """A ``server`` object, or for ``many`` (gluster, rbd) an array of them
    (SocketAddress: inet, with "tcp" as QEMU's old spelling, or unix, whose path
    libvirt also reads as "socket")."""
    if value is None:
        return ()
    if isinstance(value, list) != many:
        raise BackingNameError(f"json: backing's server is {'not ' if many else ''}an array")
    return tuple(_server(item, name) for item in (value if isinstance(value, list) else [value]))


def _server(server: object, name: str) -> Host:
    if not isinstance(server, dict):
        raise BackingNameError("json: backing has a server that is not an object")
    kind = server.get("type", "inet")
    if kind == "unix":
        socket = _text(server, "path", name, required=False) or _text(server, "socket", name, required=False)
        if socket is None:
            raise BackingNameError("json: backing has a unix server without a path")
        return Host("unix", socket=socket)
    if kind not in ("inet", "tcp"):
        raise BackingNameError(f"json: backing has a server of type {kind!r}, which storprobe does not describe")
    host = _text(server, "host", name, required=False)
    if host is None:
        raise BackingNameError("json: backing has an inet server without a host")
    return Host("tcp", host, _port(server.get("port"), name))


JsonParser = Callable[[str, dict[str, Any], BlockProtocol], BackingStore]


def _json_path(key: str) -> JsonParser:
    """Drivers whose one option ``key`` is the host path (host_device's filename,
    blkio's path, vvfat's dir)."""

    def parse(name: str, node: dict[str, Any], protocol: BlockProtocol) -> BackingStore:
        path = _text(node, key, name)
        assert path is not None
        if protocol.reach == REACH_FILE:
            return _store(name, protocol, path=path)
        if protocol.reach == REACH_NETWORK:
            return _store(name, protocol, hosts=(Host("unix", socket=path),), options=_scalars(node, key))
        return _store(name, protocol, path=path, options=_scalars(node, key))

    return parse


def _json_filename_store(name: str, node: dict[str, Any], protocol: BlockProtocol
                         ) -> BackingStore | None:
    """A protocol node that gives its name as a ``filename`` (rbd, gluster): that name,
    parsed, which must select the same driver."""
    filename = node.get("filename")
    if filename is None:
        return None
    if not isinstance(filename, str) or filename.startswith("json:"):
        raise BackingNameError(f"json: {protocol.driver} backing has a filename that is not a name")
    store = _from_plain(filename, None)
    if store.protocol != protocol.driver:
        raise BackingNameError(f"json: {protocol.driver} backing has a filename for {store.protocol}")
    return store._replace(name=name)


def _json_two_files(first: str, second: str) -> JsonParser:
    """blkdebug (``config`` file, ``image`` child) and blkverify (``raw`` and
    ``test`` children): the first host file named is the path; a debug driver
    over a non-file store reaches what that store reaches."""

    def parse(name: str, node: dict[str, Any], protocol: BlockProtocol) -> BackingStore:
        paths: list[str] = []
        for key in (first, second):
            value = node.get(key)
            if isinstance(value, str) and key == "config":
                paths.append(value)
            elif isinstance(value, dict):
                inner = _json_node(name, value)
                if not inner.is_file:
                    return inner
                assert inner.path is not None
                paths.append(inner.path)
            elif value is not None:
                raise BackingNameError(f"json: {protocol.driver} backing names its {key} by reference")
        if not paths:
            raise BackingNameError(f"json: {protocol.driver} backing names no {first} and no {second}")
        return _store(name, protocol, path=paths[0], options=_scalars(node))

    return parse


def _json_none(name: str, node: dict[str, Any], protocol: BlockProtocol) -> BackingStore:
    return _store(name, protocol, options=_scalars(node))


def _json_nbd(name: str, node: dict[str, Any], protocol: BlockProtocol) -> BackingStore:
    """``server``, or the old flat ``host``/``port`` (inet) or ``path`` (unix) keys."""
    hosts = _servers(node.get("server"), name)
    if not hosts and isinstance(node.get("path"), str):
        hosts = (Host("unix", socket=node["path"]),)
    elif not hosts and node.get("host") is not None:
        hosts = (Host("tcp", _text(node, "host", name), _port(node.get("port"), name)),)
    if len(hosts) != 1:
        raise BackingNameError("json: nbd backing needs one server")
    return _store(name, protocol, hosts=hosts, target=_text(node, "export", name, required=False),
                  options=_scalars(node, "export", "host", "port", "path"))


def _json_rbd(name: str, node: dict[str, Any], protocol: BlockProtocol) -> BackingStore:
    from_filename = _json_filename_store(name, node, protocol)
    if from_filename is not None:
        return from_filename
    pool, image = _text(node, "pool", name), _text(node, "image", name)
    namespace = _text(node, "namespace", name, required=False)
    target = "/".join(part for part in (pool, namespace, image) if part)
    return _store(name, protocol, hosts=_servers(node.get("server"), name, many=True), target=target,
                  options=_scalars(node, "pool", "image", "namespace"))


def _json_iscsi(name: str, node: dict[str, Any], protocol: BlockProtocol) -> BackingStore:
    """``portal`` HOST[:PORT] (an IPv6 host in brackets), ``target``, ``lun`` (0 by
    default); ``transport`` iser is RDMA."""
    portal, target = _text(node, "portal", name), _text(node, "target", name)
    assert portal is not None
    match = re.fullmatch(r"(?:\[([^\]]+)\]|([^:\[\]]+))(?::(\d*))?", portal)
    if match is None:
        raise BackingNameError(f"json: iscsi backing has a portal QEMU cannot use: {portal!r}")
    lun = node.get("lun", 0)
    if isinstance(lun, bool) or not (isinstance(lun, int) or (isinstance(lun, str) and lun.isdecimal())):
        raise BackingNameError(f"json: iscsi backing has a LUN that is not a number: {lun!r}")
    transport = "rdma" if protocol.driver == "iser" or node.get("transport") == "iser" else "tcp"
    host = Host(transport, match.group(1) or match.group(2), _port(match.group(3), name))
    return _store(name, protocol, hosts=(host,), target=f"{target}/{int(lun)}",
                  options=_scalars(node, "portal", "target", "lun", "transport"))


def _json_gluster(name: str, node: dict[str, Any], protocol: BlockProtocol) -> BackingStore:
    from_filename = _json_filename_store(name, node, protocol)
    if from_filename is not None:
        return from_filename
    volume, path = _text(node, "volume", name), _text(node, "path", name)
    hosts = _servers(node.get("server"), name, many=True)
    if not hosts:
        raise BackingNameError("json: gluster backing names no server")
    return _store(name, protocol, hosts=hosts, target=f"{volume}/{path}", options=_scalars(node, "volume", "path"))


def _json_ssh(name: str, node: dict[str, Any], protocol: BlockProtocol) -> BackingStore:
    hosts = _servers(node.get("server"), name)
    if not hosts and node.get("host") is not None:
        hosts = (Host("tcp", _text(node, "host", name), _port(node.get("port"), name)),)
    if len(hosts) != 1:
        raise BackingNameError(f"json: {protocol.driver} backing needs one server")
    return _store(name, protocol, hosts=hosts, target=_text(node, "path", name),
                  options=_scalars(node, "path", "host", "port"))


def _json_curl(name: str, node: dict[str, Any], protocol: BlockProtocol) -> BackingStore:
    """curl drivers: the ``url`` must be of the driver's own scheme."""
    url = _text(node, "url", name)
    assert url is not None
    store = _from_plain(url, None)
    if store.protocol != protocol.driver:
        raise BackingNameError(f"json: {protocol.driver} backing has a url that is not {protocol.driver}://")
    return store._replace(name=name, options={**store.options, **_scalars(node, "url")})


def _json_target(key: str) -> JsonParser:
    """Drivers that name one thing (``key``) on their servers: sheepdog's vdi, vxhs's vdisk-id."""

    def parse(name: str, node: dict[str, Any], protocol: BlockProtocol) -> BackingStore:
        return _store(name, protocol, hosts=_servers(node.get("server"), name), target=_text(node, key, name),
                      options=_scalars(node, key))

    return parse


def _json_nvme(name: str, node: dict[str, Any], protocol: BlockProtocol) -> BackingStore:
    device, namespace = _text(node, "device", name), _text(node, "namespace", name, required=False) or "1"
    return _store(name, protocol, target=f"{device}/{namespace}", options=_scalars(node, "device", "namespace"))


_JSON_PARSERS: Mapping[str, JsonParser] = {
    "file": _json_path("filename"), "host_device": _json_path("filename"), "host_cdrom": _json_path("filename"),
    "vvfat": _json_path("dir"),
    "blkdebug": _json_two_files("config", "image"), "blkverify": _json_two_files("raw", "test"),
    "null-co": _json_none, "null-aio": _json_none,
    "nbd": _json_nbd, "rbd": _json_rbd, "iscsi": _json_iscsi, "iser": _json_iscsi, "gluster": _json_gluster,
    "ssh": _json_ssh, "nfs": _json_ssh,
    "http": _json_curl, "https": _json_curl, "ftp": _json_curl, "ftps": _json_curl, "tftp": _json_curl,
    "sheepdog": _json_target("vdi"), "vxhs": _json_target("vdisk-id"), "nvme": _json_nvme,
    "io_uring": _json_path("filename"), "nvme-io_uring": _json_path("filename"),  # other blkio drivers: path
}
