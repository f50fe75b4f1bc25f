"""Fleet scans: a listing probed on a Dask cluster into an inventory of Parquet parts.

The listing (every entry of a directory with what ``stat`` says of it, sorted
by name, or every object under a store's prefix with its size, ETag and
modification time, in key order as the store lists it, a page at a time) is
cut into batches of :data:`BATCH` entries, taken as the cluster finishes
earlier ones (:data:`TASKS_PER_THREAD` submitted per worker thread). Each
batch is one task (:func:`run_batch`): it probes its entries (a store's
objects by range reads, :data:`CONCURRENCY` at once) and writes one part, a
Parquet file of :mod:`storprobe.inventory` rows in name order (or JSON lines),
named after the batch's number and its first name, and put in place in one
step: a task that runs again (a retry, a worker lost) overwrites its part, so
an inventory never holds a row twice. When every part is written, the driver
writes the manifest (:data:`MANIFEST`: the parts, each with its first and last
name and its counts) and removes parts a previous run left that this one did
not write. The inventory is a local directory or a store's prefix (``--to
s3://bucket/inventory/``), written through the same client that reads objects.

Refreshing: given a previous inventory, a task reads that inventory's parts
whose names overlap its batch and carries over the row of every entry the
listing says is unchanged (:func:`storprobe.inventory.unchanged`) instead of
probing it again.

Without a Dask client the batches run one after another in this process, the
same code. Dask is imported only by :func:`dask_client`.
"""

from __future__ import annotations

import functools
import hashlib
import io
import itertools
import json
import os
import re
import stat
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from types import ModuleType
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol, TypeVar

from .inventory import NAMES, SCHEMA_VERSION, ObjectFacts, arrow_schema, row, unchanged, utf8
from .urls import is_url, object_client

if TYPE_CHECKING:
    from distributed import Client, Future

T = TypeVar("T")

#: Entries a task probes and writes as one part: large enough that a task's
#: start and its part's file cost little next to its probes, small enough that
#: a part of a cluster's first round of tasks is written within seconds.
BATCH = 256
#: The inventory's manifest, written last: the parts that make the inventory.
MANIFEST = "_inventory.json"
#: The start of every part's name; other files in the destination are never touched.
PART_PREFIX = "part-"
#: The part formats and their names' endings.
FORMATS = {"parquet": ".parquet", "jsonl": ".jsonl"}
#: A part's whole name (:func:`part_name`).
_PART_NAME = re.compile(rf"{PART_PREFIX}[0-9]{{6,}}-[0-9a-f]{{12}}({'|'.join(map(re.escape, FORMATS.values()))})")
#: Most workers a LocalCluster starts unless told (one process each, one thread:
#: probing is Python, which one interpreter runs on one CPU at a time).
DEFAULT_WORKERS_CAP = 8
#: Times the scheduler runs a task again after its worker failed.
RETRIES = 2
#: Tasks submitted and not done, per worker thread: enough that no worker waits
#: for the next batch, few enough that the scheduler never holds the whole fleet.
TASKS_PER_THREAD = 2
#: Objects a task probes at once by range reads: a batch's worth of round
#: trips in flight, a few tasks per worker already keep a store busy.
CONCURRENCY = 32


class InventoryError(Exception):
    """An inventory cannot be written or read, or the cluster cannot be
    reached (no volume's fault: the scan stops); ``subject`` is what failed."""

    def __init__(self, subject: str, reason: str) -> None:
        super().__init__(subject, reason)  # as it pickles: raised on a worker, it is raised again here
        self.subject = subject
        self.reason = reason

    def __str__(self) -> str:
        return f"{self.subject}: {self.reason}"


class Entry(NamedTuple):
    """One object to probe: its name (path or URL, its row's ``filename``),
    what the listing says of it, and whether the listing says it is a regular file."""

    name: str
    facts: ObjectFacts
    listed_as_file: bool = False


class PreviousPart(NamedTuple):
    """A part of an earlier inventory: where it is, and the names it covers."""

    location: str
    first: str
    last: str


class Batch(NamedTuple):
    """One task's work: probe ``entries`` and write part ``number`` into ``to``,
    carrying rows over from ``previous`` parts where the entries are unchanged;
    objects and inventories in a store are reached at ``endpoint_url`` (None: the standard way)."""

    number: int
    entries: tuple[Entry, ...]
    to: str
    to_format: str
    previous: tuple[PreviousPart, ...] = ()
    endpoint_url: str | None = None
    concurrency: int = CONCURRENCY


class Part(NamedTuple):
    """A part as written, and as the manifest lists it: ``first`` and ``last``
    are the least and the greatest filename its rows hold."""

    name: str
    first: str
    last: str
    records: int
    probed: int
    carried: int
    errors: int


class Inventory(NamedTuple):
    """What a fleet scan wrote: its parts, in name order, and their totals."""

    to: str
    to_format: str
    parts: tuple[Part, ...]

    @property
    def records(self) -> int:
        return sum(p.records for p in self.parts)

    @property
    def probed(self) -> int:
        return sum(p.probed for p in self.parts)

    @property
    def carried(self) -> int:
        return sum(p.carried for p in self.parts)

    @property
    def errors(self) -> int:
        return sum(p.errors for p in self.parts)


def fleet_scan(
    source: str | os.PathLike[str],
    to: str | os.PathLike[str],
    *,
    client: Client | None = None,
    since: str | os.PathLike[str] | None = None,
    to_format: str = "parquet",
    batch_size: int = BATCH,
    recursive: bool = False,
    endpoint_url: str | None = None,
    concurrency: int = CONCURRENCY,
) -> Inventory:
    """Probe every entry of the directory ``source``, or every object under
    the store's prefix ``source`` (a URL), into an inventory in ``to`` (a
    directory, or a prefix URL): one part per batch of ``batch_size`` entries,
    each a task on ``client`` (a Dask client), or run here one after another
    without one. With ``since``, an earlier inventory, unchanged entries keep
    their rows from it and are not read (``since`` must not be ``to``: its
    parts are read while this scan writes).

    Raises SourceError when ``source`` cannot be listed, InventoryError when
    ``since`` is no inventory or ``to`` cannot be written.
    """
    if to_format not in FORMATS:
        raise ValueError(f"unknown inventory format {to_format!r} (known: {', '.join(FORMATS)})")
    if to_format == "parquet":
        _needs("pyarrow", "Parquet parts")
    place = place_at(to, endpoint_url)
    previous = _previous_parts(place_at(since, endpoint_url), place) if since is not None else []
    entries = _entries(source, recursive, endpoint_url)
    first = next(entries, None)  # a source that cannot be listed fails here, before DEST is made
    listed = itertools.chain([] if first is None else [first], entries)
    batches = (
        Batch(
            number, chunk, place.where, to_format, _overlapping(previous, _names(chunk)), endpoint_url, concurrency,
        )
        for number, chunk in enumerate(_chunks(listed, batch_size))
    )
    place.prepare()
    parts = [run_batch(batch) for batch in batches] if client is None else _run_on(client, batches)
    inventory = Inventory(place.where, to_format, tuple(parts))
    _write_manifest(place, inventory, os.fspath(source))
    written = {p.name for p in parts}
    for name in place.names():
        if name.startswith(PART_PREFIX) and name.endswith(tuple(FORMATS.values())) and name not in written:
            place.delete(name)
    return inventory


def _run_on(client: Client, batches: Iterable[Batch]) -> list[Part]:
    """Every batch run as a task on ``client``'s cluster, at most
    :data:`TASKS_PER_THREAD` per worker thread submitted and not done at a
    time (the listing is read as tasks finish: the scheduler holds a window of
    batches, not the fleet), the parts in batch order."""
    from distributed import as_completed

    threads = sum(w["nthreads"] for w in client.scheduler_info()["workers"].values())
    waiting = iter(batches)
    running = as_completed()
    numbers: dict[Future[Part], int] = {}  # each task's batch's number

    def submit(batch: Batch) -> None:
        task = client.submit(run_batch, batch, retries=RETRIES, pure=False)
        numbers[task] = batch.number
        running.add(task)

    for first in itertools.islice(waiting, TASKS_PER_THREAD * max(1, threads)):
        submit(first)
    parts: dict[int, Part] = {}
    for done in running:
        parts[numbers.pop(done)] = done.result()
        done.release()
        if (following := next(waiting, None)) is not None:
            submit(following)
    return [parts[number] for number in sorted(parts)]


def run_batch(batch: Batch) -> Part:
    """Probe one batch (carrying over what is unchanged) and write its part: a Dask task."""
    version = _version()
    named = [(utf8(entry.name), entry) for entry in batch.entries]  # the names as rows hold them
    wanted = {name for name, _ in named}
    earlier = {
        r["filename"]: r for part in batch.previous for r in _read_part(part.location, wanted, batch.endpoint_url)
    }
    fresh = [
        entry for name, entry in named if name not in earlier or not unchanged(earlier[name], entry.facts, version)
    ]
    if is_url(batch.entries[0].name):
        probed = dict(_probe_objects(fresh, version, batch))
    else:
        probed = dict(_probe_local(fresh, version))
    rows = [probed.get(entry.name) or earlier[name] for name, entry in named]
    name = part_name(batch.number, batch.entries[0].name, batch.to_format)
    place_at(batch.to, batch.endpoint_url).put(name, _encode(rows, batch.to_format))
    return Part(
        name, min(wanted), max(wanted), len(rows), len(fresh), len(rows) - len(fresh),
        sum(r["error_code"] is not None for r in rows),
    )


def part_name(number: int, first: str, to_format: str) -> str:
    """A part's name: the batch's number and a digest of its first entry's name,
    the same each time the same batch runs."""
    digest = hashlib.sha256(first.encode("utf-8", "surrogateescape")).hexdigest()[:12]
    return f"{PART_PREFIX}{number:06d}-{digest}{FORMATS[to_format]}"


@contextmanager
def dask_client(address: str | None = None, *, workers: int | None = None) -> Iterator[Client]:
    """A Dask client: of the scheduler at ``address``, or of a LocalCluster on
    this machine, listening on loopback only, with ``workers`` processes (default:
    one per usable CPU, at most :data:`DEFAULT_WORKERS_CAP`) of one thread each,
    closed on leaving."""
    import logging

    _needs("distributed", "a Dask cluster")
    from distributed import Client, LocalCluster

    if address:
        try:
            connected = Client(address)
        except OSError as exc:  # refused, unreachable, timed out (distributed.comm.timeouts.connect)
            raise InventoryError(f"scheduler {address}", str(exc) or type(exc).__name__) from None
        with connected as client:
            yield client
        return
    from .forked import usable_cpus

    count = workers or min(usable_cpus(), DEFAULT_WORKERS_CAP)
    with (
        LocalCluster(
            n_workers=count, threads_per_worker=1, processes=True, host="127.0.0.1",
            dashboard_address="127.0.0.1:0", silence_logs=logging.ERROR,  # its HTTP server: on a free port
        ) as cluster,
        Client(cluster) as client,
    ):
        yield client


def _needs(module: str, what: str) -> None:
    """Import ``module``; InventoryError, naming the extra, when it is not installed."""
    import importlib

    try:
        importlib.import_module(module)
    except ImportError:
        reason = f"needs the fleet extra: pip install 'storprobe[fleet]' ({module} is missing)"
        raise InventoryError(what, reason) from None


@functools.cache
def _version() -> str:
    from . import __version__

    return __version__


def _chunks(entries: Iterable[Entry], size: int) -> Iterator[tuple[Entry, ...]]:
    entries = iter(entries)
    while chunk := tuple(itertools.islice(entries, size)):
        yield chunk


def _local_listing(directory: str, recursive: bool) -> list[Entry]:
    """Every entry a scan of ``directory`` probes, with its status, sorted by name."""
    from .scan import listing

    listed = listing(directory, recursive=recursive)
    return sorted(Entry(path, _file_facts(path, as_file), as_file) for path, as_file in listed)


def listing(
    source: str | os.PathLike[str], *, recursive: bool = False, endpoint_url: str | None = None
) -> list[Entry]:
    """What :func:`fleet_scan` deals out in batches: every entry of the
    directory ``source`` (``recursive``: and below) or every object under the
    prefix URL ``source``, with what the listing says of it, in name order."""
    return list(_entries(source, recursive, endpoint_url))


def _entries(source: str | os.PathLike[str], recursive: bool, endpoint_url: str | None) -> Iterator[Entry]:
    """:func:`listing`, read as it is taken: a store lists a prefix in key
    order a page at a time (its keys are never all held); a directory is
    listed whole and sorted."""
    if is_url(source):
        return _object_listing(source, endpoint_url)
    return iter(_local_listing(os.fspath(source), recursive))


def _object_listing(prefix_url: str, endpoint_url: str | None) -> Iterator[Entry]:
    """Every object under ``prefix_url``, with what the listing says of it, in key order."""
    object_client()  # RemoteExtraMissing, named, when the client is not installed
    from .objectscan import list_objects

    for o in list_objects(prefix_url, endpoint_url=endpoint_url):
        yield Entry(o.url, ObjectFacts(size=o.size, etag=o.etag, mtime_ns=_nanoseconds(o.mtime)))


def _nanoseconds(moment: datetime | None) -> int | None:
    """``moment`` as nanoseconds since the epoch (a moment without a zone is UTC)."""
    if moment is None:
        return None
    delta = (moment if moment.tzinfo else moment.replace(tzinfo=UTC)) - datetime(1970, 1, 1, tzinfo=UTC)
    return (delta.days * 86_400 + delta.seconds) * 10**9 + delta.microseconds * 1000


def _file_facts(path: str, listed_as_file: bool) -> ObjectFacts:
    """What ``stat`` says of a listed file (of what a link points to, as the
    probe follows it); nothing when it cannot be asked (the entry is probed again)."""
    try:
        status = os.stat(path, follow_symlinks=not listed_as_file)
    except OSError:
        return ObjectFacts()
    if not (stat.S_ISREG(status.st_mode) or stat.S_ISDIR(status.st_mode) or stat.S_ISBLK(status.st_mode)):
        return ObjectFacts()  # no volume: its error record is made again each time
    return ObjectFacts(
        size=status.st_size, mtime_ns=status.st_mtime_ns, ctime_ns=status.st_ctime_ns,
        device=status.st_dev, inode=status.st_ino,
    )


def _probe_local(entries: Sequence[Entry], version: str) -> Iterator[tuple[str, dict[str, Any]]]:
    from .scan import scan_entries

    records = scan_entries([(entry.name, entry.listed_as_file) for entry in entries])
    for entry, record in zip(entries, records, strict=True):
        yield entry.name, row(entry.name, record.info, record.error, entry.facts, version)


def _probe_objects(entries: Sequence[Entry], version: str, batch: Batch) -> Iterator[tuple[str, dict[str, Any]]]:
    if not entries:
        return
    object_client()
    from .objectscan import Listed, probe_objects

    listed = [Listed(entry.name, entry.facts.size, entry.facts.etag) for entry in entries]
    records = probe_objects(listed, concurrency=batch.concurrency, endpoint_url=batch.endpoint_url)
    for entry, record in zip(entries, records, strict=True):
        yield entry.name, row(entry.name, record.info, record.error, entry.facts, version)


def _encode(rows: list[dict[str, Any]], to_format: str) -> bytes:
    if to_format == "jsonl":
        return "".join(json.dumps(r) + "\n" for r in rows).encode()
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows, schema=arrow_schema()), out)
    return out.getvalue()


def _read_part(location: str, names: set[str], endpoint_url: str | None) -> list[dict[str, Any]]:
    """The rows of the part at ``location`` whose filename is in ``names``
    (timestamps as nanoseconds, as :func:`storprobe.inventory.row` makes them).
    InventoryError when it cannot be read, or holds no inventory's rows."""
    where, _, name = location.rpartition("/")
    data = place_at(where, endpoint_url).get(name)
    try:
        return _rows(data, name.endswith(FORMATS["jsonl"]), names)
    except (ValueError, TypeError) as exc:  # pyarrow's ArrowInvalid is a ValueError
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise InventoryError(location, f"not a part of an inventory ({reason})") from None


def _rows(data: bytes, json_lines: bool, names: set[str]) -> list[dict[str, Any]]:
    if json_lines:
        rows = [json.loads(line) for line in data.splitlines()]
        if not all(isinstance(r, dict) and r.keys() == set(NAMES) for r in rows):
            raise ValueError("a line that is not a row of the schema")
        return [r for r in rows if r["filename"] in names]
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    table = pq.read_table(io.BytesIO(data), schema=arrow_schema())
    table = table.filter(pc.is_in(table["filename"], value_set=pa.array(sorted(names), pa.string())))
    as_numbers = pa.schema([f.with_type(pa.int64()) if pa.types.is_timestamp(f.type) else f for f in table.schema])
    found: list[dict[str, Any]] = table.cast(as_numbers).to_pylist()
    return found


def _previous_parts(earlier: Place, to: Place) -> list[PreviousPart]:
    """The parts of the inventory at ``earlier``, in name order; none when it was
    made with another schema (every entry is probed again). A manifest naming
    a part as no scan names one (another directory, say) is no inventory."""
    if earlier.key == to.key:
        raise InventoryError(earlier.where, "the previous inventory cannot be the destination: write beside it")
    try:
        manifest = json.loads(earlier.get(MANIFEST))
        if manifest["schema"] != SCHEMA_VERSION:
            return []
        parts = [(p["name"], p["first"], p["last"]) for p in manifest["parts"]]
        if not all(isinstance(n, str) and _PART_NAME.fullmatch(n) for n, _, _ in parts):
            raise ValueError("a part not named as a scan names its parts")
    except InventoryError as exc:
        raise InventoryError(earlier.where, f"no inventory ({MANIFEST}: {exc.reason})") from None
    except (ValueError, TypeError, KeyError) as exc:
        raise InventoryError(earlier.where, f"no inventory ({MANIFEST}: {exc!r})") from None
    if any(name.endswith(FORMATS["parquet"]) for name, _, _ in parts):
        _needs("pyarrow", "Parquet parts")
    return [PreviousPart(earlier.location(name), first, last) for name, first, last in parts]


def _names(entries: Sequence[Entry]) -> tuple[str, str]:
    """The least and the greatest filename rows hold for ``entries`` (a name
    that is not UTF-8 is held escaped, which may sort elsewhere)."""
    held = [utf8(entry.name) for entry in entries]
    return min(held), max(held)


def _overlapping(parts: Sequence[PreviousPart], names: tuple[str, str]) -> tuple[PreviousPart, ...]:
    """The parts that may hold a row of a batch whose filenames lie between ``names``."""
    first, last = names
    return tuple(p for p in parts if p.first <= last and first <= p.last)


def _write_manifest(place: Place, inventory: Inventory, source: str) -> None:
    manifest = {
        "schema": SCHEMA_VERSION, "storprobe": _version(), "source": source, "format": inventory.to_format,
        "records": inventory.records, "probed": inventory.probed, "carried": inventory.carried,
        "errors": inventory.errors, "parts": [p._asdict() for p in inventory.parts],
    }
    place.put(MANIFEST, (json.dumps(manifest, indent=1) + "\n").encode())


class Place(Protocol):
    """Where an inventory is: files named by a part's name, written whole."""

    #: as given (a directory or a prefix URL)
    where: str
    #: the same for two names of one place
    key: str

    def location(self, name: str) -> str: ...
    def prepare(self) -> None: ...
    def put(self, name: str, data: bytes) -> None: ...
    def get(self, name: str) -> bytes: ...
    def names(self) -> list[str]: ...
    def delete(self, name: str) -> None: ...


def place_at(where: str | os.PathLike[str], endpoint_url: str | None = None) -> Place:
    """The inventory place ``where`` names: a prefix in a store for a URL, else a directory."""
    if is_url(where):
        return StorePlace(where, endpoint_url)
    return LocalPlace(os.fspath(where))


class LocalPlace:
    """An inventory's directory on this machine (or one every worker mounts)."""

    def __init__(self, directory: str) -> None:
        self.where = directory
        self.key = os.path.realpath(directory)

    def location(self, name: str) -> str:
        return os.path.join(self.where, name)

    def prepare(self) -> None:
        try:
            os.makedirs(self.where, exist_ok=True)
        except OSError as exc:
            raise InventoryError(self.where, exc.strerror or str(exc)) from None

    def put(self, name: str, data: bytes) -> None:
        """Write ``name`` whole, or leave it as it was: a temporary file renamed over it."""
        final = self.location(name)
        temporary = self.location(f".{name}.{os.getpid()}.{threading.get_ident()}.tmp")
        try:
            with open(temporary, "wb") as f:
                f.write(data)
            os.replace(temporary, final)
        except OSError as exc:
            _remove_quietly(temporary)
            raise InventoryError(final, exc.strerror or str(exc)) from None

    def get(self, name: str) -> bytes:
        try:
            with open(self.location(name), "rb") as f:
                return f.read()
        except OSError as exc:
            raise InventoryError(self.location(name), exc.strerror or str(exc)) from None

    def names(self) -> list[str]:
        return sorted(os.listdir(self.where))

    def delete(self, name: str) -> None:
        _remove_quietly(self.location(name))


def _remove_quietly(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


class StorePlace:
    """An inventory under a prefix of an object store, written and read through
    the client that reads objects (:mod:`storprobe.objectstore`): a part is one
    object, and a store's put replaces an object whole."""

    def __init__(self, url: str, endpoint_url: str | None) -> None:
        client = object_client()
        self.where = url.rstrip("/")
        self.key = self.where + "/"
        self._name = client.ObjectName.parse(self.key)
        self._store = client.Stores(endpoint_url)(self._name)

    def location(self, name: str) -> str:
        return f"{self.where}/{name}"

    def prepare(self) -> None:
        """Nothing to make: a prefix exists when an object is put under it."""

    def put(self, name: str, data: bytes) -> None:
        self._call(self.location(name), lambda obstore: obstore.put(self._store, self._name.key + name, data))

    def get(self, name: str) -> bytes:
        return self._call(
            self.location(name), lambda obstore: bytes(obstore.get(self._store, self._name.key + name).bytes())
        )

    def names(self) -> list[str]:
        """The objects directly under the prefix."""
        prefix = self._name.key
        pages = self._call(self.where, lambda obstore: list(obstore.list(self._store, prefix or None)))
        return sorted(
            meta["path"][len(prefix) :] for page in pages for meta in page if "/" not in meta["path"][len(prefix) :]
        )

    def delete(self, name: str) -> None:
        self._call(self.location(name), lambda obstore: obstore.delete(self._store, self._name.key + name))

    def _call(self, what: str, request: Callable[[ModuleType], T]) -> T:
        """``request(obstore)``; InventoryError, naming ``what``, when the store refuses it."""
        import obstore

        try:
            return request(obstore)
        except (obstore.exceptions.BaseError, OSError) as exc:
            reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise InventoryError(what, reason) from None
