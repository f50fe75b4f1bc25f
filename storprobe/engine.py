"""The probe as a machine that does no I/O: it runs over the bytes it was
given and, when it needs more, says which (h11's ``NEED_DATA``, for byte ranges).

:class:`KnownBytes` is a byte source made only of ranges fetched so far; a read
that reaches outside them raises :class:`NeedBytes`, which is a control signal,
not an error (a ``BaseException``, so no ``except Exception`` in a plugin or in
the core's callback guard can take it for a plugin failure). :func:`rounds`
runs a probe over such a source again and again, each time asking its driver
for the ranges the last run stopped at, until the probe finishes. A driver is a
loop of a few lines that fetches those ranges its own way: :func:`drive` with a
blocking ``fetch`` (a local file, a range-read client), :func:`drive_async`
with an awaitable one (many objects at once), or a forward-only stream that
captures ranges as they pass (:mod:`storprobe.stream`). A local path needs no
rounds: its source reads at once (:class:`~storprobe.source.PathSource`), and
the same probe code runs over it.

A run's reads are the ones the probe makes on a file read directly, so the
result is the same whichever way the bytes arrive; the per-probe read budget
(:data:`~storprobe.source.READ_BUDGET`) applies to each run, and
:data:`MAX_ROUNDS` bounds how often a probe may stop for more.
"""

from __future__ import annotations

import bisect
import os
from collections.abc import Awaitable, Callable, Generator, Iterable, Sequence
from typing import TypeVar

from .errors import ReadLimitExceeded, SourceError
from .source import HEAD_SIZE, TAIL_SIZE

T = TypeVar("T")
#: A byte range to fetch: (offset, length), offset counted from the start.
Range = tuple[int, int]
#: Fetched bytes: (offset, data).
Piece = tuple[int, bytes]
#: A probe run over a byte source (the driver's rounds re-run it whole).
Step = Callable[["KnownBytes"], T]
#: What a driver loop runs: yields the ranges to fetch, is sent what was fetched, returns the result.
Rounds = Generator[list[Range], Sequence[Piece], T]

#: Most times one probe may stop for more bytes: past this a header is sending
#: the probe on a walk of small reads, and it is refused, as the read budget refuses a large one.
MAX_ROUNDS = 64
#: Fewest bytes a round fetches for one need (clipped to the end of the volume):
#: a table read field by field costs a few rounds, not one per field.
MIN_FETCH = 64 * 1024


class NeedBytes(BaseException):
    """The probe needs bytes its source does not hold yet: ``(offset, length)``,
    only the part still missing. Raised through plugin code by design; a plugin
    must not catch ``BaseException`` (it would stop a range-read or stream probe)."""

    def __init__(self, offset: int, length: int, *, also: tuple[Range, ...] = ()) -> None:
        super().__init__(offset, length)
        self.offset = offset
        self.length = length
        #: more ranges to fetch in the same round (a row's declared reads), as they are
        self.also = also


class KnownBytes:
    """A byte source made of the ranges fetched so far from a volume of known
    ``size`` (held sorted and merged); reading outside them raises :class:`NeedBytes`."""

    stat: os.stat_result | None = None
    security_label: str | None = None

    def __init__(self, name: str, size: int, *, file_type: str = "file") -> None:
        if size < 0:
            raise SourceError(f"size {size} is negative")
        self.name = name
        self.file_type = file_type
        self._size = size
        self._starts: list[int] = []
        self._pieces: list[bytes] = []
        #: bytes taken in by :meth:`add`, overlaps included
        self.fetched = 0

    def size(self) -> int:
        return self._size

    def add(self, offset: int, data: bytes) -> None:
        """Keep ``data``, the volume's bytes at ``offset`` (clipped to its size)."""
        data = bytes(data[: max(0, self._size - offset)])
        if offset < 0 or not data:
            return
        self.fetched += len(data)
        end = offset + len(data)
        first = bisect.bisect_left(self._starts, offset)
        if first and self._starts[first - 1] + len(self._pieces[first - 1]) >= offset:
            first -= 1  # the piece before reaches this one: merge with it
        last = first
        while last < len(self._starts) and self._starts[last] <= end:
            last += 1
        if first < last:
            start = min(offset, self._starts[first])
            stop = max(end, self._starts[last - 1] + len(self._pieces[last - 1]))
            merged = bytearray(stop - start)
            for at, piece in zip(self._starts[first:last], self._pieces[first:last], strict=True):
                merged[at - start : at - start + len(piece)] = piece
            merged[offset - start : end - start] = data
            offset, data = start, bytes(merged)
        self._starts[first:last] = [offset]
        self._pieces[first:last] = [data]

    def read_at(self, offset: int, length: int) -> bytes:
        length = min(length, self._size - offset)
        if length <= 0:
            return b""
        index = bisect.bisect_right(self._starts, offset) - 1
        if index >= 0:
            start, piece = self._starts[index], self._pieces[index]
            if offset + length <= start + len(piece):
                return piece[offset - start : offset - start + length]
            if offset < start + len(piece):  # ask only for what is missing
                length -= start + len(piece) - offset
                offset = start + len(piece)
        raise NeedBytes(offset, length)

    def holds(self, offset: int, length: int) -> bool:
        """Whether the whole range is known."""
        try:
            self.read_at(offset, length)
        except NeedBytes:
            return False
        return True

    def widened(self, need: NeedBytes) -> Range:
        """The range to fetch for ``need``: at least :data:`MIN_FETCH` bytes,
        stopping at the next known piece and at the end of the volume."""
        after = bisect.bisect_right(self._starts, need.offset)
        limit = self._starts[after] if after < len(self._starts) else self._size
        end = min(max(need.offset + need.length, need.offset + MIN_FETCH), limit)
        return need.offset, max(end, need.offset + need.length) - need.offset

    def ask_ahead(self, base: int, ranges: Iterable[Range]) -> None:
        """NeedBytes for all of ``ranges`` (offsets from ``base``, clipped to the
        volume) that are not known yet, at once; nothing when all are."""
        missing = []
        for offset, length in ranges:
            start = max(0, base + offset)
            end = min(self._size, base + offset + length)
            if start < end and not self.holds(start, end - start):
                missing.append((start, end - start))
        if missing:
            raise NeedBytes(*missing[0], also=tuple(missing[1:]))

    def close(self) -> None:
        """Nothing to release."""


def first_ranges(size: int) -> list[Range]:
    """What every probe reads first: the head, and the tail where it lies beyond the head."""
    ranges = [(0, min(HEAD_SIZE, size))] if size else []
    if size > HEAD_SIZE:
        tail = max(HEAD_SIZE, size - TAIL_SIZE)
        ranges.append((tail, size - tail))
    return ranges


def rounds(step: Step[T], known: KnownBytes) -> Rounds[T]:
    """Run ``step`` over ``known`` until it finishes, yielding each time the
    ranges it needs (the head and tail first, unless held already) and taking
    the fetched pieces back. Raises ReadLimitExceeded after :data:`MAX_ROUNDS`."""
    wanted = [r for r in first_ranges(known.size()) if not known.holds(*r)]
    for _ in range(MAX_ROUNDS + 1):
        if wanted:
            for offset, data in (yield wanted):
                known.add(offset, data)
        try:
            return step(known)
        except NeedBytes as need:
            wanted = [known.widened(need), *need.also]
    raise ReadLimitExceeded(
        f"the probe stopped for more bytes over {MAX_ROUNDS} times", code="read-rounds"
    )


def drive(machine: Rounds[T], fetch: Callable[[list[Range]], Iterable[Piece]]) -> T:
    """Run ``machine`` with a blocking ``fetch`` of each round's ranges."""
    try:
        wanted = next(machine)
        while True:
            wanted = machine.send(list(fetch(wanted)))
    except StopIteration as done:
        return done.value


async def drive_async(machine: Rounds[T], fetch: Callable[[list[Range]], Awaitable[Iterable[Piece]]]) -> T:
    """Run ``machine`` with an awaitable ``fetch`` (the ranges of a round fetched together)."""
    try:
        wanted = next(machine)
        while True:
            wanted = machine.send(list(await fetch(wanted)))
    except StopIteration as done:
        return done.value
