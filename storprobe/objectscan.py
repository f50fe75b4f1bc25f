"""Scans of objects: a store's prefix listed, every object probed by range
reads, many at once, one record each (an object that cannot be probed is a
record with its error and never stops the scan), in key order.

The listing streams (a page at a time) and carries each object's size, ETag
and modification time, so a probe needs no request to learn the size: its
first round asks for the head and the tail at once. At most ``concurrency``
objects are probed at a time and at most :data:`WINDOW_FACTOR` times that
many records are held waiting for an earlier one, so memory stays flat
however many objects the prefix holds. :func:`probe_objects` takes URLs or
:class:`Listed` objects (a listing already split into batches, say) and is
the building block of a fleet scan.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator, Iterable, Iterator
from datetime import datetime
from typing import TYPE_CHECKING, Any, NamedTuple

import obstore

from .errors import ProbeError
from .objectstore import _CLIENT_ERRORS, ObjectName, Stores, named_error, object_reader, probe_machine

if TYPE_CHECKING:
    from .model import ImageInfo
    from .registry import FormatTable

#: Objects probed at once unless told: enough to hide a store's latency of
#: tens of milliseconds, few enough for one process's CPU to keep up.
DEFAULT_CONCURRENCY = 64
#: Records held waiting for an earlier one, per object probed at once.
WINDOW_FACTOR = 4
#: Objects a listing request asks for (S3 gives at most 1000 a page).
LIST_PAGE = 1000


class Listed(NamedTuple):
    """An object as its store's listing gives it."""

    url: str
    size: int | None = None
    etag: str | None = None
    mtime: datetime | None = None


class ObjectRecord(NamedTuple):
    """One object: its probe result or the error that stopped it, what the
    listing said of it, and what probing it cost (requests, bytes fetched).
    ``path`` is its URL (a :class:`~storprobe.scan.ScanRecord`'s first fields)."""

    path: str
    info: ImageInfo | None = None
    error: ProbeError | None = None
    size: int | None = None
    etag: str | None = None
    mtime: datetime | None = None
    requests: int = 0
    fetched: int = 0


def list_objects(prefix_url: str, *, endpoint_url: str | None = None) -> Iterator[Listed]:
    """The objects under ``prefix_url`` (``s3://bucket/some/prefix/``), in key
    order, a page at a time. Raises RemoteError when the prefix cannot be listed."""
    name = ObjectName.parse(prefix_url)
    store = Stores(endpoint_url)(name)
    try:
        for page in obstore.list(store, name.key.rstrip("/") or None, chunk_size=LIST_PAGE):
            for meta in page:
                yield _listed(name, meta)
    except _CLIENT_ERRORS as exc:
        raise named_error(exc, prefix_url) from None


async def _alist_objects(name: ObjectName, store: obstore.store.ObjectStore) -> AsyncIterator[Listed]:
    try:
        async for page in obstore.list(store, name.key.rstrip("/") or None, chunk_size=LIST_PAGE):
            for meta in page:
                yield _listed(name, meta)
    except _CLIENT_ERRORS as exc:
        raise named_error(exc, f"{name.root}/{name.key}") from None


def _listed(name: ObjectName, meta: obstore.ObjectMeta) -> Listed:
    return Listed(f"{name.root}/{meta['path']}", meta["size"], meta["e_tag"], meta["last_modified"])


def scan_objects(
    prefix_url: str,
    *,
    concurrency: int = DEFAULT_CONCURRENCY,
    endpoint_url: str | None = None,
    format: str | None = None,
    table: FormatTable | None = None,
) -> Iterator[ObjectRecord]:
    """Probe every object under ``prefix_url``, yielding records in key order.
    Raises RemoteError at once when the prefix cannot be listed."""
    name = ObjectName.parse(prefix_url)
    stores = Stores(endpoint_url)
    return _blocking(_probed(_alist_objects(name, stores(name)), stores, concurrency, format, table))


def probe_objects(
    objects: Iterable[str | Listed],
    *,
    concurrency: int = DEFAULT_CONCURRENCY,
    endpoint_url: str | None = None,
    format: str | None = None,
    table: FormatTable | None = None,
) -> Iterator[ObjectRecord]:
    """Probe each object (a URL, or a :class:`Listed` whose size saves
    nothing but a suffix range and whose ETag and mtime the record carries),
    ``concurrency`` at a time, yielding one record each in the order given.
    ``objects`` is consumed as records are taken (not in an event loop: a
    plain iterable)."""
    stores = Stores(endpoint_url)
    return _blocking(_probed(_from(objects), stores, concurrency, format, table))


async def aprobe_objects(
    objects: Iterable[str | Listed] | AsyncIterator[Listed],
    *,
    concurrency: int = DEFAULT_CONCURRENCY,
    endpoint_url: str | None = None,
    format: str | None = None,
    table: FormatTable | None = None,
) -> AsyncIterator[ObjectRecord]:
    """:func:`probe_objects` in a running event loop."""
    source = objects if isinstance(objects, AsyncIterator) else _from(objects)
    async for record in _probed(source, Stores(endpoint_url), concurrency, format, table):
        yield record


async def _from(objects: Iterable[str | Listed]) -> AsyncIterator[Listed]:
    for item in objects:
        yield Listed(item) if isinstance(item, str) else item


def _blocking(records: AsyncIterator[ObjectRecord]) -> Iterator[ObjectRecord]:
    """An async generator's items, taken from blocking code (an event loop of its own)."""
    loop = asyncio.new_event_loop()
    try:
        while True:
            try:
                record = loop.run_until_complete(anext(records))
            except StopAsyncIteration:
                return
            yield record
    finally:
        loop.run_until_complete(records.aclose())  # type: ignore[attr-defined]
        loop.close()


async def _probed(
    objects: AsyncIterator[Listed],
    stores: Stores,
    concurrency: int,
    format: str | None,
    table: FormatTable | None,
) -> AsyncIterator[ObjectRecord]:
    """Records in the order of ``objects``: at most ``concurrency`` probes at
    once, at most :data:`WINDOW_FACTOR` times as many records waiting."""
    if concurrency < 1:
        raise ValueError(f"concurrency must be at least 1, not {concurrency}")
    machine = probe_machine(format, table)
    slots = asyncio.Semaphore(concurrency)
    window: deque[asyncio.Task[ObjectRecord]] = deque()

    async def record(listed: Listed) -> ObjectRecord:
        info, error, reader = None, None, None
        async with slots:
            try:
                reader = object_reader(listed.url, stores)
                info = await reader.run(machine, listed.size)
            except ProbeError as exc:
                error = exc
        costs = (reader.requests, reader.fetched) if reader is not None else (0, 0)
        return ObjectRecord(listed.url, info, error, listed.size, listed.etag, listed.mtime, *costs)

    try:
        async for listed in objects:
            window.append(asyncio.create_task(record(listed)))
            if len(window) >= concurrency * WINDOW_FACTOR:
                yield await window.popleft()
        while window:
            yield await window.popleft()
    finally:
        for task in window:
            task.cancel()
        if window:
            await asyncio.gather(*window, return_exceptions=True)


def object_json(record: ObjectRecord) -> dict[str, Any]:
    """A scan record's JSON (:func:`storprobe.qemu_json.scan_record`) with what
    the listing said of the object under ``"object"``."""
    from .qemu_json import scan_record

    shaped = scan_record(record)  # type: ignore[arg-type]
    shaped["object"] = {
        "size": record.size,
        "etag": record.etag,
        "mtime": record.mtime.isoformat() if record.mtime is not None else None,
    }
    return shaped
