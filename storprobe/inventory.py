"""An inventory row: one scanned object as a flat record of named, typed
columns, for a fleet scan's Parquet parts (or JSON lines) and the tools that read them.

The schema is data: :data:`COLUMNS` declares each column once (name, type,
meaning), in order; :func:`arrow_schema` builds the Parquet schema from it,
with each meaning as the field's ``doc`` metadata. A row's image columns are
``qemu-img info --output=json``'s keys as :func:`~storprobe.qemu_json.to_qemu_json`
renders them (renamed with underscores; nested values as JSON text; a name's
bytes that are not UTF-8 as ``\\xNN``), so an
inventory says what ``storprobe scan --jsonl`` says; the object columns are
what the listing said of the object, which decide whether a later scan may
carry the row over (:func:`unchanged`) instead of reading the object again.

Columns are only ever added at the end, with :data:`SCHEMA_VERSION` raised;
one is never renamed, retyped or moved (tests/test_fleet.py pins them).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, NamedTuple

from .qemu_json import EXTRA_KEY, to_qemu_json

if TYPE_CHECKING:
    import pyarrow

    from .errors import ProbeError
    from .model import ImageInfo

#: Raised whenever a column is added; an inventory of another version is never carried over from.
SCHEMA_VERSION = 1


class Column(NamedTuple):
    """One column: its name, its type (``string``, ``int64``, ``uint64``, ``bool``,
    ``strings``: a list of strings, ``json``: JSON text, ``timestamp``:
    nanoseconds since the epoch, UTC), and what it holds."""

    name: str
    type: str
    doc: str


#: qemu-img's key for each image column taken from its JSON as it is.
_QEMU_KEYS = {
    "filename": "filename", "format": "format", "virtual_size": "virtual-size", "actual_size": "actual-size",
    "cluster_size": "cluster-size", "dirty_flag": "dirty-flag", "backing_filename": "backing-filename",
    "full_backing_filename": "full-backing-filename", "backing_filename_format": "backing-filename-format",
}

COLUMNS: tuple[Column, ...] = (
    Column("filename", "string", "the object: its path, or its URL (qemu-img: filename); every row has one"),
    Column("format", "string", "the driver QEMU opens the volume with (qemu-img: format)"),
    Column("virtual_size", "int64", "the guest-visible size in bytes (qemu-img: virtual-size)"),
    Column(
        "actual_size", "int64",
        "bytes the volume occupies on its file system (qemu-img: actual-size); null for an object in a store",
    ),
    Column("cluster_size", "int64", "the format's allocation unit in bytes (qemu-img: cluster-size)"),
    Column("encrypted", "bool", "whether the volume is encrypted (qemu-img: encrypted, absent there when false)"),
    Column("dirty_flag", "bool", "whether the format marks the volume as not cleanly closed (qemu-img: dirty-flag)"),
    Column("backing_filename", "string", "the backing file's name as recorded (qemu-img: backing-filename)"),
    Column(
        "full_backing_filename", "string",
        "the backing name joined to the volume's directory (qemu-img: full-backing-filename); never opened",
    ),
    Column(
        "backing_filename_format", "string", "the backing file's recorded format (qemu-img: backing-filename-format)"
    ),
    Column("format_specific", "json", "qemu-img's format-specific object ({type, data}), as JSON text"),
    Column("snapshots", "json", "qemu-img's snapshots array (internal snapshots), as JSON text"),
    Column("storprobe_format", "string", "storprobe's format row (differs from format where QEMU reads it as raw)"),
    Column("evidence", "string", "why that format: magic, extension, fallback or caller"),
    Column("matches", "strings", "every format whose signature the bytes carry (polyglots show here)"),
    Column("version", "int64", "the format's version field, where it has one"),
    Column("encryption", "string", "the encryption method (aes, luks ...), null when not encrypted"),
    Column("compat", "string", "the qcow2 compatibility level (0.10, 1.1)"),
    Column("features", "strings", "the format's feature flags set in the header"),
    Column(
        "storprobe", "json",
        "storprobe's whole extra object of the JSON (backing-store, data-file, details ...), as JSON text",
    ),
    Column("error_code", "string", "why the object could not be probed: a named error code; null on success"),
    Column("error_message", "string", "the error's message; null on success"),
    Column("object_size", "int64", "the object's size in bytes, as the listing said"),
    Column("object_etag", "string", "the object's ETag, as the listing said (null for a local file)"),
    Column("object_mtime", "timestamp", "when the object was last modified, as the listing said"),
    Column("file_ctime", "timestamp", "a local file's status change time (null for an object in a store)"),
    Column("file_device", "uint64", "a local file's device number (null for an object in a store)"),
    Column("file_inode", "uint64", "a local file's inode number (null for an object in a store)"),
    Column("storprobe_version", "string", "the storprobe that made the row"),
)

#: Names in order.
NAMES = tuple(column.name for column in COLUMNS)


class ObjectFacts(NamedTuple):
    """What a listing says of one object, taken before it is read: a later
    listing that says the same lets its row be carried over."""

    size: int | None = None
    etag: str | None = None
    mtime_ns: int | None = None
    ctime_ns: int | None = None
    device: int | None = None
    inode: int | None = None

    @property
    def identifies(self) -> bool:
        """Whether these facts change whenever the object does: an ETag (a store
        makes a new one on each write), or a local file's device, inode, modification
        and status change times (the last cannot be set back by a writer)."""
        if self.size is None:
            return False
        if self.etag is not None:
            return True
        return None not in (self.mtime_ns, self.ctime_ns, self.device, self.inode)


def arrow_schema() -> pyarrow.Schema:
    """The Parquet schema of :data:`COLUMNS` (needs pyarrow, the ``fleet`` extra)."""
    import pyarrow as pa

    types = {
        "string": pa.string(), "json": pa.string(), "int64": pa.int64(), "uint64": pa.uint64(),
        "bool": pa.bool_(), "strings": pa.list_(pa.string()), "timestamp": pa.timestamp("ns", tz="UTC"),
    }
    fields = [
        pa.field(c.name, types[c.type], metadata={"doc": c.doc, "storprobe.type": c.type}) for c in COLUMNS
    ]
    return pa.schema(fields, metadata={"storprobe.schema": str(SCHEMA_VERSION)})


def row(
    filename: str, info: ImageInfo | None, error: ProbeError | None, facts: ObjectFacts, version: str
) -> dict[str, Any]:
    """The row of one object: its probe result (``info``) or the ``error`` that
    stopped it, what the listing said of it, and the storprobe ``version`` that probed it."""
    out: dict[str, Any] = dict.fromkeys(NAMES)
    if info is not None:
        shown = to_qemu_json(info)
        for name, key in _QEMU_KEYS.items():
            out[name] = shown.get(key)
        out["encrypted"] = shown.get("encrypted", False)
        out["format_specific"] = _json(shown.get("format-specific"))
        out["snapshots"] = _json(shown.get("snapshots"))
        extra = shown[EXTRA_KEY]
        out["storprobe_format"] = extra["format"]
        out["evidence"] = extra["evidence"]
        out["matches"] = extra["matches"]
        out["version"] = extra.get("version")
        out["encryption"] = extra.get("encryption")
        out["compat"] = extra.get("compat")
        out["features"] = extra.get("features")
        out["storprobe"] = _json(extra)
    else:
        assert error is not None
        out["filename"] = filename
        out["error_code"] = error.code
        out["error_message"] = error.reason
    out["object_size"], out["object_etag"], out["object_mtime"] = facts.size, facts.etag, facts.mtime_ns
    out["file_ctime"], out["file_device"], out["file_inode"] = facts.ctime_ns, facts.device, facts.inode
    out["storprobe_version"] = version
    return {name: utf8(value) if isinstance(value, str) else value for name, value in out.items()}


def utf8(text: str) -> str:
    """``text`` as a Parquet string holds it: bytes of a name that are not
    UTF-8 (held by Python as lone surrogates) written as ``\\xNN``."""
    try:
        text.encode()
    except UnicodeEncodeError:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    return text


def _json(value: Any) -> str | None:
    return None if value is None else json.dumps(value)


def unchanged(previous: Mapping[str, Any], facts: ObjectFacts, version: str) -> bool:
    """Whether ``previous``, a row of an earlier inventory for the same object,
    still describes it: the listing's facts identify the object and are the
    row's (an object's size and ETag: a store gives a rewritten object a new
    ETag, and a copy of its metadata in place a new time only; a file's size,
    times, device and inode), the row was made by this storprobe ``version``,
    and its error, if any, was not that the object could not be read (a
    ``source`` error may pass)."""
    code = previous["error_code"]
    compared = _OBJECT_FACTS if facts.etag is not None else _FILE_FACTS
    return (
        facts.identifies
        and previous["storprobe_version"] == version
        and not (code is not None and (code == "source" or code.startswith("source.")))
        and all(previous[column] == getattr(facts, fact) for column, fact in compared)
    )


#: The columns that hold each fact a listing gives, for an object and for a file.
_OBJECT_FACTS = (("object_size", "size"), ("object_etag", "etag"))
_FILE_FACTS = (
    *_OBJECT_FACTS, ("object_mtime", "mtime_ns"), ("file_ctime", "ctime_ns"), ("file_device", "device"),
    ("file_inode", "inode"),
)
