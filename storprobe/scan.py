"""Pool scan: every entry of a directory, one record each, like a libvirt dir
pool refresh, except that one volume that cannot be probed is a record with
its error and never stops the scan or changes another volume's record.

Volumes are probed in batches of :data:`BATCH` (a run of probes, then a run
of records, is faster than alternating the two), and reads overlap without
threads: each volume is opened up to :data:`READAHEAD` entries before it is
probed and the kernel is asked to start reading its head and tail
(``posix_fadvise``), so a cold disk serves many reads at once. :func:`scan`
yields records; :func:`scan_map` renders them (to text, say) in worker
processes, one per CPU, each handed batches as it asks for them
(:mod:`storprobe.forked`), and yields the results in the same name order.
"""

import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from functools import partial
from typing import TYPE_CHECKING, NamedTuple, TypeVar

from .detect import describe_image
from .errors import ProbeError, SourceError
from .model import ImageInfo
from .registry import FormatTable, format_table
from .source import PLAIN_HEAD, Image, PathSource

if TYPE_CHECKING:
    from .plain import PlainVolumes, Wanted

T = TypeVar("T")
#: A path to probe, and whether the directory listing says it is a regular file.
Entry = tuple[str, bool]

#: Entries probed in a row (by one process, as one unit of work): large enough
#: that handing out work is cheap next to probing, small enough to keep several
#: reads in flight and few records waiting.
BATCH = 64

#: Volumes opened, with their reads hinted to the kernel, ahead of the one probed.
READAHEAD = 2 * BATCH

#: Most worker processes a scan starts unless told: past a few, the one
#: process that writes every record is the bottleneck, and each worker costs memory.
DEFAULT_JOBS_CAP = 8


class ScanRecord(NamedTuple):
    """One directory entry: its probe result, or the error that stopped it."""

    path: str
    info: ImageInfo | None = None
    error: ProbeError | None = None


def _listing(directory: str) -> list[os.DirEntry]:
    with os.scandir(directory) as it:
        return sorted(it, key=lambda e: e.name)


def _paths(entries: list[os.DirEntry], recursive: bool) -> Iterator[Entry]:
    """(path, listed as a regular file) of each entry in name order; with
    ``recursive``, a directory's contents follow its own entry. Symlinked
    directories are not descended into."""
    for entry in entries:
        try:
            yield entry.path, entry.is_file(follow_symlinks=False)
        except OSError:  # its type unknown from the listing and its stat failing
            yield entry.path, False
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
) -> Iterator[ScanRecord]:
    """Probe every entry of ``directory``, yielding records in name order as
    they are made; volumes are opened and read ahead of the consumer.

    Raises SourceError at once when ``directory`` itself cannot be listed.
    """
    table = table or format_table()
    return _records(_paths(_top_listing(directory), recursive), table)


def scan_map(
    directory: str | os.PathLike[str],
    render: Callable[[ScanRecord], T],
    *,
    recursive: bool = False,
    table: FormatTable | None = None,
    jobs: int | None = None,
    quote: Callable[[str], str] | None = None,
) -> Iterator[T]:
    """``render(record)`` for every record :func:`scan` makes, in the same
    order, with ``jobs`` processes probing and rendering (default: one per
    usable CPU, at most :data:`DEFAULT_JOBS_CAP`). ``render`` must not raise,
    and with more than one job its results must pickle (text does). The entry
    list is made up front. Called while other threads run, it uses this process
    only, whatever ``jobs`` says (forking a threaded process can deadlock).

    ``quote``: how ``render``, a function to text that shows nothing of a
    volume's status but its allocation, writes a record's name (JSON's string
    encoder, say); given it, plain volumes are written from templates
    ``render`` made (:mod:`storprobe.plain`), to the same text.

    Raises SourceError at once when ``directory`` itself cannot be listed.
    """
    table = table or format_table()
    paths = list(_paths(_top_listing(directory), recursive))
    if jobs is None and len(paths) > BATCH:  # one batch is one process's work: no workers to count
        from .forked import usable_cpus

        jobs = min(usable_cpus(), DEFAULT_JOBS_CAP)
    return _rendered(paths, render, table, jobs or 1, quote)


def listing(directory: str | os.PathLike[str], *, recursive: bool = False) -> list[Entry]:
    """The entries :func:`scan` probes, in its order, without probing them (a
    fleet scan deals them out in batches to :func:`scan_entries`).

    Raises SourceError when ``directory`` itself cannot be listed.
    """
    return list(_paths(_top_listing(directory), recursive))


def scan_entries(entries: Iterable[Entry], *, table: FormatTable | None = None) -> Iterator[ScanRecord]:
    """Records for ``entries`` (from :func:`listing`, or some of them), in
    their order, read ahead as :func:`scan` reads."""
    return _records(entries, table or format_table())


def _rendered(
    paths: list[Entry],
    render: Callable[[ScanRecord], T],
    table: FormatTable,
    jobs: int,
    quote: Callable[[str], str] | None = None,
) -> Iterator[T]:
    plain = None
    if quote is not None and paths:
        from .plain import PlainVolumes

        plain = PlainVolumes(table, render, quote) if PlainVolumes.applies(table) else None

    def work(batch: list[Entry]) -> list[T]:
        if plain is None:
            return [render(record) for record in _records(batch, table)]
        probed = list(_ahead(batch, partial(_plain_or_probed, plain, table)))  # probes in a row, then renders
        return [_written(plain, render, item) for item in probed]

    batches = [paths[i : i + BATCH] for i in range(0, len(paths), BATCH)]
    if jobs > 1 and len(batches) > 1:
        from .forked import ordered_map  # its fork and pipe machinery, only where workers can share the work

        for rendered in ordered_map(work, batches, jobs):
            yield from rendered
    else:
        for batch in batches:
            yield from work(batch)


def _top_listing(directory: str | os.PathLike[str]) -> list[os.DirEntry]:
    try:
        return _listing(os.fspath(directory))
    except OSError as exc:
        raise SourceError(exc.strerror or str(exc)) from None


def _records(paths: Iterable[Entry], table: FormatTable) -> Iterator[ScanRecord]:
    """Records a batch at a time, the volumes of the batches after it opened ahead."""
    return _ahead(paths, partial(_record, table=table))


def _ahead(paths: Iterable[Entry], probe: Callable[[str, PathSource | SourceError], T]) -> Iterator[T]:
    """``probe(path, opened)`` of each entry (which closes what it is given), a
    batch at a time, the volumes of the batches after it opened ahead."""
    paths = iter(paths)
    window: deque[tuple[str, PathSource | SourceError]] = deque()
    ahead = max(READAHEAD, BATCH)
    try:
        while True:
            while len(window) < ahead and (entry := next(paths, None)) is not None:
                window.append((entry[0], _opened(*entry)))
            if not window:
                return
            yield from [probe(*window.popleft()) for _ in range(min(BATCH, len(window)))]
    finally:  # a consumer that stops early leaves volumes opened ahead
        for _, source in window:
            if isinstance(source, PathSource):
                source.close()


def _opened(path: str, listed_as_file: bool) -> PathSource | SourceError:
    """The volume opened and its first reads hinted, or why it cannot be opened."""
    try:
        source = PathSource(path, listed_as_file=listed_as_file)
    except SourceError as exc:
        return exc
    source.prefetch()
    return source


def _record(
    path: str, source: PathSource | SourceError, table: FormatTable, head: bytes | None = None
) -> ScanRecord:
    if isinstance(source, SourceError):
        return ScanRecord(path, error=source)
    try:
        return ScanRecord(path, info=describe_image(Image(source, head), table, None))
    except ProbeError as exc:
        return ScanRecord(path, error=exc)
    finally:
        source.close()


def _plain_or_probed(
    plain: "PlainVolumes", table: FormatTable, path: str, source: PathSource | SourceError
) -> "str | tuple[ScanRecord, Wanted | None]":
    """A plain volume's text, written from its template; else the volume's
    record, and what the template of its key wants when it is plain."""
    head, wanted = None, None
    if isinstance(source, PathSource) and source.file_type == "file":
        size = source.size()
        try:
            head = source.read_at(0, min(PLAIN_HEAD, size))
            text = plain.text(source, head)
        except ProbeError:  # a read that failed: the general path names the error
            text = head = None
        if isinstance(text, str):
            source.close()
            return text
        wanted = text
        if size > PLAIN_HEAD:
            head = None  # not the whole head the general path reads
    return _record(path, source, table, head), wanted


def _written(
    plain: "PlainVolumes", render: Callable[[ScanRecord], T], probed: "str | tuple[ScanRecord, Wanted | None]"
) -> T:
    """The text of what :func:`_plain_or_probed` made (a record rendered, which
    may make the template its key wants)."""
    if isinstance(probed, str):
        return probed  # type: ignore[return-value]  # render makes text (see scan_map's quote)
    record, wanted = probed
    rendered = render(record)
    if wanted is not None:
        plain.learn(wanted, record, rendered)
    return rendered
