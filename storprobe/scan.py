"""Pool scan: every entry of a directory, one record each, like a libvirt dir
pool refresh, except that one volume that cannot be probed is a record with
its error and never stops the scan or changes another volume's record."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass

from .detect import probe
from .errors import ProbeError, SourceError
from .model import ImageInfo
from .registry import FormatTable, format_table


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
    directory: str | os.PathLike[str], *, recursive: bool = False, table: FormatTable | None = None
) -> Iterator[ScanRecord]:
    """Probe every entry of ``directory``, yielding records as they are made.

    Raises SourceError at once when ``directory`` itself cannot be listed.
    """
    table = table or format_table()
    try:
        entries = _listing(os.fspath(directory))
    except OSError as exc:
        raise SourceError(exc.strerror or str(exc)) from None
    return _records(_paths(entries, recursive), table)


def _records(paths: Iterator[str], table: FormatTable) -> Iterator[ScanRecord]:
    for path in paths:
        try:
            yield ScanRecord(path, info=probe(path, table=table))
        except ProbeError as exc:
            yield ScanRecord(path, error=exc)
