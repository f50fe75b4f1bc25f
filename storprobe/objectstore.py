"""Objects probed by range reads through obstore (Rust's object_store): S3 and
S3-compatible stores, Google Cloud Storage, Azure Blob and plain HTTP(S)
servers, many small reads at once over one connection pool per store.

The first round asks for the head (the first :data:`~storprobe.source.HEAD_SIZE`
bytes) and the tail together, concurrently, the tail as a suffix range
(``bytes=-4096``): no HEAD request, the object's size comes from the answers'
``Content-Range``. Azure takes no suffix range (object_store refuses to send
one), so there the head goes first and the tail, when the probe needs it, in
the next round. A size already known from a listing asks for exact ranges.
Later rounds fetch what the probe stopped at, at least :data:`REMOTE_MIN_FETCH`
bytes a range: a round trip to a store costs more than the bytes.

A server that ignores ``Range`` answers 200 with the whole object;
object_store tells that from the status, before the body is read, and it is
:class:`~storprobe.urls.NoRangeSupport`. Timeouts and retries are bounded, and
so are the bytes one probe fetches (:data:`OBJECT_BUDGET`). Credentials and
endpoints come the standard way: the ``AWS_*``, ``GOOGLE_*`` and ``AZURE_*``
environment, an AWS profile from the shared config files (through boto3, when
it is installed), or ``endpoint_url`` for an S3-compatible store.
"""

from __future__ import annotations

import asyncio
import importlib
import os
from collections.abc import Awaitable, Callable, Sequence
from datetime import timedelta
from typing import TYPE_CHECKING, Any, NamedTuple, TypeVar
from urllib.parse import unquote, urlsplit

import obstore
from obstore.exceptions import NotFoundError, NotSupportedError, PermissionDeniedError, UnauthenticatedError

from .detect import probing
from .engine import KnownBytes, Piece, Range, Rounds, drive_async, first_ranges
from .errors import ReadLimitExceeded
from .registry import FormatTable, format_table
from .source import HEAD_SIZE, READ_BUDGET, TAIL_SIZE
from .urls import NoRangeSupport, RemoteError

if TYPE_CHECKING:
    from obstore.store import ObjectStore

    from .model import ImageInfo
    from .safety import Policy, Verdict

T = TypeVar("T")

#: Fewest bytes a later round fetches for one range (clipped to the object).
REMOTE_MIN_FETCH = 256 * 1024
#: Most bytes one probe of an object fetches in all: the probe's own read
#: budget, the first round and one widened range more.
OBJECT_BUDGET = READ_BUDGET + HEAD_SIZE + TAIL_SIZE + REMOTE_MIN_FETCH
#: Longest one request may take, connecting included, and the connect alone.
REQUEST_TIMEOUT = timedelta(seconds=30)
CONNECT_TIMEOUT = timedelta(seconds=5)
#: Retries of a request that failed with a 5xx status, a dropped connection or a timeout.
MAX_RETRIES = 2
#: Schemes whose stores take a suffix range (Azure's does not).
SUFFIX_SCHEMES = frozenset({"s3", "gs", "http", "https"})


class ObjectName(NamedTuple):
    """An object's URL split into its store (``scheme://bucket``) and its key."""

    scheme: str
    root: str
    key: str

    @classmethod
    def parse(cls, url: str) -> ObjectName:
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        if not parts.netloc:
            raise RemoteError(f"{url}: no bucket or host in the URL", code="source.bad-url")
        key = parts.path.lstrip("/")
        if scheme in ("http", "https"):
            key = unquote(key)  # the store quotes the path again
        return cls(scheme, f"{scheme}://{parts.netloc}", key)


class Stores:
    """One store (one connection pool) per bucket or host, made when first used."""

    def __init__(self, endpoint_url: str | None = None) -> None:
        self.endpoint_url = endpoint_url
        self._stores: dict[str, ObjectStore] = {}

    def __call__(self, name: ObjectName) -> ObjectStore:
        store = self._stores.get(name.root)
        if store is None:
            store = self._stores[name.root] = self._made(name)
        return store

    def _made(self, name: ObjectName) -> ObjectStore:
        endpoint = self.endpoint_url
        if endpoint is None and name.scheme == "s3":
            endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        client: dict[str, Any] = {"timeout": REQUEST_TIMEOUT, "connect_timeout": CONNECT_TIMEOUT}
        if name.scheme == "http" or (endpoint or "").startswith("http://"):
            client["allow_http"] = True
        options: dict[str, Any] = {
            "client_options": client,
            "retry_config": {"max_retries": MAX_RETRIES, "retry_timeout": REQUEST_TIMEOUT},
        }
        if endpoint is not None and name.scheme in ("s3", "az"):
            options["endpoint"] = endpoint
        elif endpoint is not None and name.scheme == "gs":
            options["base_url"] = endpoint
        if name.scheme == "s3":
            options.update(_aws_profile())
        try:
            return obstore.store.from_url(name.root, **options)
        except (obstore.exceptions.BaseError, ValueError) as exc:
            raise RemoteError(f"{name.root}: {_first_line(exc)}", code="source.bad-url") from None


def _aws_profile() -> dict[str, Any]:
    """Credentials from the AWS shared config files (a profile), read by boto3,
    when the environment names no key and boto3 is installed; object_store
    reads the ``AWS_*`` environment, web identity and instance roles itself."""
    if "AWS_ACCESS_KEY_ID" in os.environ:
        return {}
    files = (os.environ.get("AWS_SHARED_CREDENTIALS_FILE"), os.environ.get("AWS_CONFIG_FILE"), "~/.aws/credentials")
    if "AWS_PROFILE" not in os.environ and not any(f and os.path.exists(os.path.expanduser(f)) for f in files):
        return {}
    try:
        boto3 = importlib.import_module("boto3")  # untyped: imported by name
        from obstore.auth.boto3 import Boto3CredentialProvider
    except ImportError:
        return {}
    return {"credential_provider": Boto3CredentialProvider(boto3.Session())}


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def named_error(exc: Exception, url: str) -> RemoteError:
    """The named error for a client's failure to read ``url``."""
    text = str(exc)
    if isinstance(exc, NotSupportedError) and "Range" in text or "NotPartial" in text or "non-partial" in text:
        return NoRangeSupport(f"{url}: the server ignores Range (it answered with the whole object); not downloaded")
    if isinstance(exc, (NotFoundError, FileNotFoundError)) or " 404 " in text:
        return RemoteError(f"{url}: no such object", code="source.not-found")
    if isinstance(exc, (PermissionDeniedError, UnauthenticatedError, PermissionError)) or " 403 " in text:
        return RemoteError(f"{url}: access denied", code="source.denied")
    if any(f" {status} " in text for status in (500, 502, 503, 504)):
        return RemoteError(f"{url}: the server failed ({_first_line(exc)})", code="source.server-error")
    if "TimedOut" in text or "timed out" in text or "operation timed out" in text.lower():
        return RemoteError(f"{url}: the server did not answer in time", code="source.timeout")
    if "Connect" in text or "error sending request" in text:
        return RemoteError(f"{url}: cannot reach the server ({_first_line(exc)})", code="source.unreachable")
    return RemoteError(f"{url}: {_first_line(exc)}")


_CLIENT_ERRORS = (obstore.exceptions.BaseError, OSError)


class ObjectReader:
    """Range reads of one object; counts what it fetched."""

    def __init__(self, store: ObjectStore, name: ObjectName, url: str) -> None:
        self.store, self.name, self.url = store, name, url
        self.requests = 0
        self.fetched = 0

    async def _call(self, request: Awaitable[T]) -> T:
        self.requests += 1
        try:
            return await request
        except _CLIENT_ERRORS as exc:
            raise named_error(exc, self.url) from None

    async def first_round(self, size: int | None) -> KnownBytes:
        """The object's head and tail, and its size (from the answers, unless given)."""
        if size is not None:
            known = KnownBytes(self.url, size)
            for offset, data in await self.fetch(first_ranges(size)):
                known.add(offset, data)
            return known
        asks: list[dict[str, Any]] = [{"range": (0, HEAD_SIZE)}]
        if self.name.scheme in SUFFIX_SCHEMES:
            asks.append({"range": {"suffix": TAIL_SIZE}})
        try:
            answers = await asyncio.gather(*(self._get(options) for options in asks))
        except RemoteError as exc:
            if exc.code not in ("source.no-range", "source.range-not-satisfiable"):
                raise
            return await self._empty_or(exc)
        known = KnownBytes(self.url, answers[0][0])
        for _, offset, data in answers:
            known.add(offset, data)
        return known

    async def _get(self, options: dict[str, Any]) -> tuple[int, int, bytes]:
        """(object size, offset, bytes) of one range request."""
        self.requests += 1
        try:
            result = await obstore.get_async(self.store, self.name.key, options=options)  # type: ignore[arg-type]
            data = bytes(await result.bytes_async())
        except _CLIENT_ERRORS as exc:
            if " 416 " in str(exc):  # an empty object has no byte to range over
                raise RemoteError(str(exc), code="source.range-not-satisfiable") from None
            raise named_error(exc, self.url) from None
        self._count(len(data), HEAD_SIZE)
        return result.meta["size"], result.range[0], data

    async def _empty_or(self, refusal: RemoteError) -> KnownBytes:
        """An empty object answers a range request with 200 or 416, as a server
        that ignores Range does with 200: its size, asked for without a body, tells them apart."""
        meta = await self._call(obstore.head_async(self.store, self.name.key))
        if meta["size"] == 0:
            return KnownBytes(self.url, 0)
        if refusal.code == "source.no-range":
            raise refusal
        raise RemoteError(f"{self.url}: the server refused the first range ({_first_line(refusal)})")

    async def fetch(self, ranges: Sequence[Range]) -> list[Piece]:
        """The ranges' bytes, fetched concurrently."""
        if self.fetched + sum(length for _, length in ranges) > OBJECT_BUDGET:
            raise ReadLimitExceeded(f"{self.url}: a probe may fetch at most {OBJECT_BUDGET} bytes of an object")
        if not ranges:
            return []
        starts, lengths = [offset for offset, _ in ranges], [length for _, length in ranges]
        self.requests += len(ranges) - 1  # one each: coalescing off, fetched concurrently by the client
        buffers = await self._call(
            obstore.get_ranges_async(self.store, self.name.key, starts=starts, lengths=lengths, coalesce=0)
        )
        pieces = []
        for offset, length, buffer in zip(starts, lengths, buffers, strict=True):
            data = bytes(buffer)
            self._count(len(data), length)
            pieces.append((offset, data))
        return pieces

    def _count(self, got: int, asked: int) -> None:
        if got > asked:
            raise RemoteError(f"{self.url}: the server sent {got} bytes for {asked} asked", code="source.bad-range")
        self.fetched += got

    async def run(self, machine: Callable[[KnownBytes], Rounds[T]], size: int | None = None) -> T:
        """Run ``machine`` (``detect.probing``, ``safety.judging``) over the
        object: its first round, then the rounds it asks for."""
        known = await self.first_round(size)

        async def fetch(ranges: list[Range]) -> list[Piece]:
            widened = [(o, max(n, min(REMOTE_MIN_FETCH, known.size() - o))) for o, n in ranges]
            return await self.fetch(widened)

        return await drive_async(machine(known), fetch)


def object_reader(url: str, stores: Stores) -> ObjectReader:
    """A reader of the object at ``url``, through its store in ``stores``."""
    name = ObjectName.parse(url)
    return ObjectReader(stores(name), name, url)


def probe_machine(format: str | None, table: FormatTable | None) -> Callable[[KnownBytes], Rounds[ImageInfo]]:
    table = table or format_table()
    return lambda known: probing(known, format=format, table=table)


def check_machine(
    policy: Policy, format: str | None, table: FormatTable | None
) -> Callable[[KnownBytes], Rounds[Verdict]]:
    from .safety import judging

    table = table or format_table()
    return lambda known: judging(known, policy=policy, format=format, table=table)


def run(coroutine: Awaitable[T]) -> T:
    """Run ``coroutine`` to its end from blocking code (in a thread of its own
    when this thread already runs an event loop)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coroutine)  # type: ignore[arg-type]
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coroutine).result()  # type: ignore[arg-type]


def probe_url(
    url: str, *, format: str | None = None, table: FormatTable | None = None, endpoint_url: str | None = None
) -> ImageInfo:
    """:func:`storprobe.probe` of the object at ``url``."""
    return run(object_reader(url, Stores(endpoint_url)).run(probe_machine(format, table)))


def check_url(
    url: str,
    *,
    policy: Policy,
    format: str | None = None,
    table: FormatTable | None = None,
    endpoint_url: str | None = None,
) -> Verdict:
    """:func:`storprobe.safety.check` of the object at ``url``."""
    return run(object_reader(url, Stores(endpoint_url)).run(check_machine(policy, format, table)))
