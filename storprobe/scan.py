"""Pool scan: every entry of a directory, one record each, like a libvirt dir
pool refresh, except that one volume that cannot be probed is a record with
its error and never stops the scan or changes another volume's record.

Volumes are probed in batches of :data:`BATCH` (a run of probes, then a run
of records, is faster than alternating the two), and reads overlap without
threads: each volume is opened up to :data:`READAHEAD` entries before it is
probed and the kernel is asked to start reading its head and tail
(``posix_fadvise``), so a cold disk serves many reads at once. With ``jobs`` > 1,
threads probe batches ahead of the consumer, for file systems that do not
read ahead on the hint; records come in name order either way, with at most
``2 * jobs`` batches in flight. On a local disk threads only add contention for
the interpreter lock (benchmarks/bench_scan.py: no faster warm, slower cold),
hence one by default.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from itertools import islice
from typing import TYPE_CHECKING

from .detect import probe
from .errors import ProbeError, SourceError
from .model import ImageInfo
from .registry import FormatTable, format_table
from .source import PathSource

if TYPE_CHECKING:
    from concurrent.futures import Future

#: Entries probed in a row (by one thread, in one task): large enough that
#: handing out work is cheap next to probing, small enough to keep several
#: reads in flight and few records waiting.
BATCH = 32

#: Volumes opened, with their reads hinted to the kernel, ahead of the one probed.
READAHEAD = 2 * BATCH


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
    jobs: int = 1,
) -> Iterator[ScanRecord]:
    """Probe every entry of ``directory``, yielding records in name order as
    they are made; volumes are opened and read ahead of the consumer, by
    ``jobs`` threads when more than one.

    Raises SourceError at once when ``directory`` itself cannot be listed.
    """
    table = table or format_table()
    try:
        entries = _listing(os.fspath(directory))
    except OSError as exc:
        raise SourceError(exc.strerror or str(exc)) from None
    paths = _paths(entries, recursive)
    return _records(paths, table) if jobs <= 1 else _parallel_records(paths, table, jobs)


def _records(paths: Iterable[str], table: FormatTable) -> Iterator[ScanRecord]:
    """Records a batch at a time, the volumes of the batches after it opened ahead."""
    paths = iter(paths)
    window: deque[tuple[str, PathSource | SourceError]] = deque()
    try:
        while True:
            while len(window) < max(READAHEAD, BATCH) and (path := next(paths, None)) is not None:
                window.append((path, _opened(path)))
            if not window:
                return
            yield from [_record(*window.popleft(), table) for _ in range(min(BATCH, len(window)))]
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
