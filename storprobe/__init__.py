"""storprobe: tell what a disk image is from its bytes alone, without trusting it."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from .detect import open_source, probe
from .errors import (
    InvalidFormatSpec,
    InvalidHeader,
    PluginConflict,
    PluginError,
    ProbeError,
    ReadLimitExceeded,
    SourceError,
    TruncatedHeader,
    UnknownFormat,
    UnsupportedVersion,
)
from .hookspecs import hookimpl
from .layout import Layout
from .model import Backing, DataFile, ImageInfo, LibvirtFacts, Snapshot
from .registry import format_table, register, registered, unregister
from .source import BytesSource, FileSource, Image, PathSource
from .spec import INT64_MAX, QEMU_MAX_LENGTH, Features, FormatSpec, Hazard
from .urls import NoRangeSupport, RemoteError, RemoteExtraMissing

if TYPE_CHECKING:
    from . import chain as chain
    from . import datapath as datapath
    from . import human as human
    from . import measure as measure
    from . import qemu_json as qemu_json
    from . import safety as safety
    from . import scan as scan
    from . import stream as stream
    from . import upload as upload
    from . import validate as validate
    from . import verify as verify
    from . import volume_xml as volume_xml
    from .datapath import open_image as open_image

    __version__: str

#: Modules of the API that ``import storprobe`` does not load (they cost
#: start-up time a probe does not need); naming one loads it, so
#: ``storprobe.qemu_json.to_qemu_json(info)`` works after a bare import.
_LAZY_MODULES = frozenset(
    {"chain", "datapath", "human", "measure", "qemu_json", "safety", "scan", "stream", "upload", "validate", "verify",
     "volume_xml"}
)


def __getattr__(name: str) -> object:
    if name in _LAZY_MODULES:
        return importlib.import_module(f"{__name__}.{name}")
    if name == "open_image":  # the data path, loaded when first used
        from .datapath import open_image

        return open_image
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
    "InvalidFormatSpec",
    "InvalidHeader",
    "Layout",
    "LibvirtFacts",
    "NoRangeSupport",
    "PathSource",
    "PluginConflict",
    "PluginError",
    "ProbeError",
    "ReadLimitExceeded",
    "RemoteError",
    "RemoteExtraMissing",
    "Snapshot",
    "SourceError",
    "TruncatedHeader",
    "UnknownFormat",
    "UnsupportedVersion",
    "format_table",
    "open_image",
    "hookimpl",
    "open_source",
    "probe",
    "register",
    "registered",
    "unregister",
]
