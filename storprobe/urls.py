"""Which targets are objects in a store, named by URL, and the errors of reading one.

Kept free of imports beyond the core's errors: ``import storprobe`` and every
local probe pay nothing for object stores. The client
(:mod:`storprobe.objectstore`, the ``remote`` extra) is loaded by
:func:`object_client` only when a URL is probed.
"""

from __future__ import annotations

from types import ModuleType
from typing import TypeGuard

from .errors import SourceError

#: URL schemes read by ranges from an object store or a web server.
REMOTE_SCHEMES = frozenset({"s3", "gs", "az", "http", "https"})


def is_url(target: object) -> TypeGuard[str]:
    """Whether ``target`` names an object: a ``str`` that starts with a scheme
    of :data:`REMOTE_SCHEMES` and ``://``. A ``pathlib.Path`` is always local,
    and so is any other name, ``:`` in it or not (``a:b.img``, ``s3:x``)."""
    if not isinstance(target, str):
        return False
    scheme, sep, _ = target.partition("://")
    return bool(sep) and scheme.lower() in REMOTE_SCHEMES


class RemoteError(SourceError):
    """An object cannot be read: not found, access denied, the server
    unreachable or too slow; ``code`` says which (``source.not-found`` ...)."""

    code = "source.remote"


class NoRangeSupport(RemoteError):
    """The server answered a range request with the whole object (status 200):
    it ignores ``Range``. Refused from the status, before the body is read:
    storprobe never downloads a whole object to probe it."""

    code = "source.no-range"


class RemoteExtraMissing(SourceError):
    """A URL was given, and the object-store client is not installed."""

    code = "source.remote-missing"


def object_client() -> ModuleType:
    """:mod:`storprobe.objectstore`, imported now; RemoteExtraMissing when its
    client library (obstore) is not installed."""
    try:
        from . import objectstore
    except ImportError as exc:
        if exc.name is None or not exc.name.startswith("obstore"):
            raise
        raise RemoteExtraMissing(
            "reading objects by URL needs the remote extra: pip install 'storprobe[remote]'"
        ) from None
    return objectstore

