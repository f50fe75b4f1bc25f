"""Backing-store names as images record them: local paths, network URIs,
QEMU's legacy ``proto:`` strings and ``json:{...}`` specifications.

Parsing is pure string work: nothing here resolves a host name, opens a socket
or touches a file. A name that denotes a local file is resolved against the
directory of the image that records it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import NamedTuple
from urllib.parse import parse_qs, unquote, urlsplit

from .errors import BackingNameError
from .spec import EMPTY

#: URI schemes QEMU and libvirt accept for network backings, by protocol.
URI_SCHEMES = {
    "nbd": "nbd", "nbd+tcp": "nbd", "nbd+unix": "nbd",
    "iscsi": "iscsi", "iser": "iscsi",
    "http": "http", "https": "https", "ftp": "ftp", "ftps": "ftps", "tftp": "tftp",
    "gluster": "gluster", "gluster+tcp": "gluster", "gluster+unix": "gluster", "gluster+rdma": "gluster",
    "ssh": "ssh", "vxhs": "vxhs", "nvme": "nvme",
}
#: Legacy ``proto:rest`` forms (no ``//``).
COLON_PROTOCOLS = ("nbd", "rbd")
#: json: drivers that name a local file through ``filename``.
FILE_DRIVERS = ("file", "host_device", "host_cdrom")
#: Longest json: specification parsed; qcow2 caps backing names at 1023 bytes.
JSON_LIMIT = 65536


class Host(NamedTuple):
    """One server of a network backing."""

    transport: str  # "tcp", "unix", "rdma"
    name: str | None = None
    port: int | None = None
    socket: str | None = None


class BackingStore(NamedTuple):
    """What a backing name denotes. ``protocol`` is ``"file"`` for a local file,
    whose ``path`` is then resolved; otherwise a network protocol, never opened."""

    name: str
    protocol: str
    path: str | None = None
    hosts: tuple[Host, ...] = ()
    target: str | None = None
    options: Mapping[str, str] = EMPTY

    @property
    def is_file(self) -> bool:
        return self.protocol == "file"


def parse_backing_name(name: str, image_path: str | None = None) -> BackingStore:
    """Classify ``name`` as recorded by the image at ``image_path``."""
    if name.startswith("json:"):
        return _from_json(name, image_path)
    scheme, sep, _ = name.partition("://")
    if sep and scheme.lower() in URI_SCHEMES:
        return _from_uri(name)
    prefix, sep, rest = name.partition(":")
    if sep and prefix in COLON_PROTOCOLS:
        return _LEGACY[prefix](name, rest)
    if sep and prefix == "file":
        return BackingStore(name, "file", path=_resolve(rest, image_path))
    return BackingStore(name, "file", path=_resolve(name, image_path))


def _resolve(path: str, image_path: str | None) -> str:
    if os.path.isabs(path) or image_path is None:
        return path
    return os.path.join(os.path.dirname(image_path), path)


def _port(text: str | int | None, name: str) -> int | None:
    if text is None or text == "":
        return None
    try:
        port = int(text)
    except (TypeError, ValueError):
        raise BackingNameError(f"backing {name!r} has a non-numeric port {text!r}") from None
    if not 0 <= port <= 65535:
        raise BackingNameError(f"backing {name!r} has port {port} out of range")
    return port


def _from_uri(name: str) -> BackingStore:
    try:
        uri = urlsplit(name)
        port = uri.port
    except ValueError as exc:
        raise BackingNameError(f"backing {name!r} is not a valid URI: {exc}") from None
    scheme = uri.scheme.lower()
    protocol = URI_SCHEMES[scheme]
    query = {k: v[-1] for k, v in parse_qs(uri.query).items()}
    path = unquote(uri.path)
    if scheme.endswith("+unix"):
        hosts = (Host("unix", socket=query.pop("socket", None)),)
    elif uri.hostname:
        hosts = (Host("rdma" if scheme.endswith("+rdma") else "tcp", uri.hostname, port),)
    else:
        hosts = ()
    if uri.username:
        query["user"] = unquote(uri.username)
    target = path.lstrip("/") if protocol in ("nbd", "iscsi", "gluster") else path
    if protocol in ("http", "https", "ftp", "ftps", "tftp"):
        target = path + (f"?{uri.query}" if uri.query else "")
        query = {}
    return BackingStore(name, protocol, hosts=hosts, target=target or None, options=query)


def _legacy_nbd(name: str, rest: str) -> BackingStore:
    """``nbd:HOST:PORT[:exportname=E]`` or ``nbd:unix:SOCKET[:exportname=E]``."""
    parts = rest.split(":")
    export = None
    if parts and parts[-1].startswith("exportname="):
        export = parts.pop()[len("exportname="):]
    if len(parts) == 2 and parts[0] == "unix":
        return BackingStore(name, "nbd", hosts=(Host("unix", socket=parts[1]),), target=export)
    if len(parts) in (1, 2) and parts[0]:
        return BackingStore(
            name, "nbd", hosts=(Host("tcp", parts[0], _port(parts[1] if len(parts) == 2 else None, name)),),
            target=export,
        )
    raise BackingNameError(f"backing {name!r} is not a valid nbd: specification")


def _legacy_rbd(name: str, rest: str) -> BackingStore:
    """``rbd:POOL/IMAGE[@SNAP][:key=value...]`` (``\\:`` escapes a colon)."""
    fields, current, escaped = [], [], False
    for ch in rest:
        if escaped:
            current.append(ch)
            escaped = False
        elif ch == "\\":
            escaped = True
        elif ch == ":":
            fields.append("".join(current))
            current = []
        else:
            current.append(ch)
    fields.append("".join(current))
    image, options = fields[0], {}
    for item in fields[1:]:
        key, sep, value = item.partition("=")
        if not sep:
            raise BackingNameError(f"backing {name!r} has an rbd option without '=': {item!r}")
        options[key] = value
    if "/" not in image:
        raise BackingNameError(f"backing {name!r} names no rbd pool/image")
    hosts = tuple(_host_port(h, name) for h in options.pop("mon_host", "").split(";") if h)
    return BackingStore(name, "rbd", hosts=hosts, target=image, options=options)


def _host_port(text: str, name: str) -> Host:
    host, sep, port = text.rpartition(":")
    return Host("tcp", host, _port(port, name)) if sep else Host("tcp", text)


_LEGACY = {"nbd": _legacy_nbd, "rbd": _legacy_rbd}


def _unflatten(obj: dict) -> dict:
    """QEMU's flattened keys (``"file.server.host": "h"``) into nested objects."""
    out: dict = {}
    for key, value in obj.items():
        node = out
        *parents, leaf = str(key).split(".")
        for part in parents:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise BackingNameError(f"json: backing key {key!r} conflicts with a plain value")
            node = child
        if isinstance(value, dict):
            value = _unflatten(value)
        if isinstance(node.get(leaf), dict) and isinstance(value, dict):
            node[leaf].update(value)
        else:
            node[leaf] = value
    return out


def _json_server(server: object, name: str) -> Host:
    if not isinstance(server, dict):
        raise BackingNameError(f"json: backing {name!r} has a malformed server entry")
    kind = server.get("type", "inet")
    if kind == "unix":
        return Host("unix", socket=str(server.get("path") or server.get("socket") or ""))
    return Host("tcp", str(server.get("host", "")) or None, _port(server.get("port"), name))


def _from_json(name: str, image_path: str | None) -> BackingStore:
    if len(name) > JSON_LIMIT:
        raise BackingNameError(f"json: backing specification is longer than {JSON_LIMIT} bytes")
    try:
        root = json.loads(name[len("json:"):])
    except (ValueError, RecursionError) as exc:
        raise BackingNameError(f"json: backing is not valid JSON: {exc}") from None
    if not isinstance(root, dict):
        raise BackingNameError("json: backing is not a JSON object")
    node = _unflatten(root)
    # Format layers ({"driver": "raw", "file": {...}}) wrap the protocol node.
    for _ in range(8):
        if isinstance(node.get("file"), dict) and node.get("driver") not in FILE_DRIVERS:
            node = node["file"]
        else:
            break
    driver = node.get("driver")
    if not isinstance(driver, str):
        raise BackingNameError("json: backing names no driver")
    if driver in FILE_DRIVERS:
        filename = node.get("filename")
        if not isinstance(filename, str) or not filename:
            raise BackingNameError(f"json: {driver} backing has no filename")
        return BackingStore(name, "file", path=_resolve(filename, image_path))
    if driver in ("http", "https", "ftp", "ftps", "tftp") and isinstance(node.get("url"), str):
        return BackingStore(name, driver, **_uri_parts(node["url"]))
    if isinstance(node.get("filename"), str) and "://" in node["filename"]:
        parsed = _from_uri(node["filename"])
        return BackingStore(name, parsed.protocol, hosts=parsed.hosts, target=parsed.target, options=parsed.options)
    return _json_protocol(name, driver, node)


def _uri_parts(url: str) -> dict:
    parsed = _from_uri(url) if url.partition("://")[0].lower() in URI_SCHEMES else None
    if parsed is None:
        raise BackingNameError(f"json: backing url {url!r} is not a supported URI")
    return {"hosts": parsed.hosts, "target": parsed.target, "options": parsed.options}


def _json_protocol(name: str, driver: str, node: dict) -> BackingStore:
    servers = node.get("server")
    if isinstance(servers, dict):
        servers = [servers]
    hosts = tuple(_json_server(s, name) for s in servers) if isinstance(servers, list) else ()
    if not hosts and isinstance(node.get("host"), str):  # legacy flat nbd/ssh keys
        hosts = (Host("tcp", node["host"], _port(node.get("port"), name)),)
    if not hosts and isinstance(node.get("path"), str) and driver == "nbd":
        hosts = (Host("unix", socket=node["path"]),)
    target_keys = {
        "nbd": ("export",), "rbd": ("pool", "image"), "iscsi": ("target", "lun"),
        "gluster": ("volume", "path"), "ssh": ("path",), "nvme": ("device", "namespace"),
    }.get(driver, ("path",))
    target = "/".join(str(node[k]) for k in target_keys if node.get(k) not in (None, "")) or None
    options = {k: str(v) for k, v in node.items() if isinstance(v, (str, int)) and k not in (*target_keys, "driver", "host", "port")}
    return BackingStore(name, driver, hosts=hosts, target=target, options=options)
