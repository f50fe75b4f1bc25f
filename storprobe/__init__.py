"""storprobe: tell what a disk image is from its bytes alone, without trusting it."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .detect import open_source, probe
from .errors import (
    InvalidHeader,
    ProbeError,
    ReadLimitExceeded,
    SourceError,
    TruncatedHeader,
    UnknownFormat,
    UnsupportedVersion,
)
from .hookspecs import hookimpl
from .layout import Layout
from .model import ImageInfo
from .registry import format_table, register, registered, unregister
from .source import BytesSource, FileSource, Image, PathSource
from .spec import INT64_MAX, QEMU_MAX_LENGTH, Backing, DataFile, Features, FormatSpec, Hazard, Snapshot

if TYPE_CHECKING:
    __version__: str


def __getattr__(name: str) -> str:
    if name == "__version__":  # read when asked: importing importlib.metadata takes about 15 ms
        from importlib.metadata import version

        return version(__name__)  # pyproject.toml's, as installed
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "INT64_MAX",
    "QEMU_MAX_LENGTH",
    "Backing",
    "BytesSource",
    "DataFile",
    "Features",
    "FileSource",
    "FormatSpec",
    "Hazard",
    "Image",
    "ImageInfo",
    "InvalidHeader",
    "Layout",
    "PathSource",
    "ProbeError",
    "ReadLimitExceeded",
    "Snapshot",
    "SourceError",
    "TruncatedHeader",
    "UnknownFormat",
    "UnsupportedVersion",
    "format_table",
    "hookimpl",
    "open_source",
    "probe",
    "register",
    "registered",
    "unregister",
]
