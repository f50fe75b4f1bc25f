"""Pool scan: every entry of a directory, one record each, like a libvirt dir
pool refresh, except that one volume that cannot be probed is a record with
its error and never stops the scan or changes another volume's record.

Reads overlap without threads: each volume is opened :data:`READAHEAD` entries
before it is probed and the kernel is asked to start reading its head and tail
(``posix_fadvise``), so a cold disk serves many reads at once. With ``jobs`` > 1,
threads also probe batches of entries ahead of the consumer, which overlaps
what the hint cannot (the inode reads of stat and open) but makes every system
call contend for the interpreter lock: faster on a cold disk, twice slower on
a warm cache (benchmarks/bench_scan.py). ``jobs=None`` chooses: threads when
the first volumes' heads are not in the page cache, one thread when they are.
Records come in name order either way, with at most ``2 * jobs`` batches in flight.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from itertools import chain, islice
from typing import TYPE_CHECKING

from .detect import probe
from .errors import ProbeError, SourceError
from .model import ImageInfo
from .registry import FormatTable, format_table
from .source import PathSource

if TYPE_CHECKING:
    from concurrent.futures import Future

#: Volumes opened, with their reads hinted to the kernel, ahead of the one probed.
READAHEAD = 64

#: Entries one thread probes per task: large enough that handing out work is
#: cheap next to probing, small enough to keep several reads in flight.
BATCH = 32

#: Threads for a cold page cache when ``jobs`` is None.
AUTO_JOBS = min(8, 2 * (os.cpu_count() or 1))

#: Entries whose page-cache residency decides ``jobs=None``.
SAMPLE = 8


@dataclass(frozen=True, slots=True)
class ScanRecord:
    """One directory entry: its probe result, or the error that stopped it."""

    path: str
    info: ImageInfo | None = None
    error: ProbeError | None = None


def _listing(directory: str) -> list[os.DirEntry]:
    with os.scandir(directory) as it:
        return sorted(it, key=lambda e: e.name)


def _paths(entries: list[os.DirEntry], recursive: bool) -> Iterator[str]:
    """Entry paths in name order; with ``recursive``, a directory's contents
    follow its own entry. Symlinked directories are not descended into."""
    for entry in entries:
        yield entry.path
        if recursive and entry.is_dir(follow_symlinks=False):
            try:
                below = _listing(entry.path)
            except OSError:
                continue  # its own record (a dir volume) stands; its contents cannot be listed
            yield from _paths(below, recursive)


def scan(
    directory: str | os.PathLike[str],
    *,
    recursive: bool = False,
    table: FormatTable | None = None,
    jobs: int | None = 1,
) -> Iterator[ScanRecord]:
    """Probe every entry of ``directory``, yielding records in name order as
    they are made; volumes are opened and read ahead of the consumer, by
    ``jobs`` threads when more than one (None: :data:`AUTO_JOBS` when the
    page cache is cold, else one).

    Raises SourceError at once when ``directory`` itself cannot be listed.
    """
    table = table or format_table()
    try:
        entries = _listing(os.fspath(directory))
    except OSError as exc:
        raise SourceError(exc.strerror or str(exc)) from None
    paths = _paths(entries, recursive)
    if jobs is None:
        return _chosen_records(paths, table)
    return _records(paths, table) if jobs <= 1 else _parallel_records(paths, table, jobs)


def _chosen_records(paths: Iterator[str], table: FormatTable) -> Iterator[ScanRecord]:
    """Threads if one of the first entries is a file not in the page cache, else one."""
    first = list(islice(paths, SAMPLE))
    rest = chain(first, paths)
    if any(_resident(path) is False for path in first):
        yield from _parallel_records(rest, table, AUTO_JOBS)
    else:
        yield from _records(rest, table)


def _resident(path: str) -> bool | None:
    try:
        source = PathSource(path)
    except SourceError:
        return None
    try:
        return source.cached()
    finally:
        source.close()


def _records(paths: Iterable[str], table: FormatTable) -> Iterator[ScanRecord]:
    window: deque[tuple[str, PathSource | SourceError]] = deque()
    try:
        for path in paths:
            window.append((path, _opened(path)))
            if len(window) > READAHEAD:
                yield _record(*window.popleft(), table)
        while window:
            yield _record(*window.popleft(), table)
    finally:  # a consumer that stops early leaves volumes opened ahead
        for _, source in window:
            if isinstance(source, PathSource):
                source.close()


def _opened(path: str) -> PathSource | SourceError:
    """The volume opened and its first reads hinted, or why it cannot be opened."""
    try:
        source = PathSource(path)
    except SourceError as exc:
        return exc
    source.prefetch()
    return source


def _record(path: str, source: PathSource | SourceError, table: FormatTable) -> ScanRecord:
    if isinstance(source, SourceError):
        return ScanRecord(path, error=source)
    try:
        return ScanRecord(path, info=probe(source, table=table))
    except ProbeError as exc:
        return ScanRecord(path, error=exc)
    finally:
        source.close()


def _batch(paths: list[str], table: FormatTable) -> list[ScanRecord]:
    return list(_records(paths, table))


def _parallel_records(paths: Iterator[str], table: FormatTable, jobs: int) -> Iterator[ScanRecord]:
    """Batches probed by ``jobs`` threads, yielded in submission order; a
    sliding window of ``2 * jobs`` batches bounds the records held."""
    from concurrent.futures import ThreadPoolExecutor

    pool = ThreadPoolExecutor(jobs, thread_name_prefix="storprobe-scan")
    window: deque[Future[list[ScanRecord]]] = deque()
    try:
        while batch := list(islice(paths, BATCH)):
            window.append(pool.submit(_batch, batch, table))
            if len(window) >= 2 * jobs:
                yield from window.popleft().result()
        while window:
            yield from window.popleft().result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
