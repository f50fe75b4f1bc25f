"""Inspecting an upload while it streams: bytes that arrive once, forward only.

A :class:`StreamInspector` is fed chunks (:meth:`~StreamInspector.feed`), may
be asked at any point (:meth:`~StreamInspector.verdict`) and is finished at the
end (:meth:`~StreamInspector.finish`). It runs the probe core that does no I/O
(:mod:`storprobe.engine`): a run over the bytes held so far stops with
:class:`~storprobe.engine.NeedBytes`; a range ahead of the stream is registered
and captured as chunks pass, and the probe runs again when it is complete (not
on every chunk). Its verdicts (:class:`StreamVerdict`):

- ``pending``: nothing decided yet;
- ``provisional``: the format is decided by the head (its first
  :data:`~storprobe.source.HEAD_SIZE` bytes): a row whose signature lies there
  matched, and every row that precedes it in detection order did not. Rows
  whose signature is a trailer (VHD, DMG) come after every such row, so no end
  of the stream can change the format; a head no such row matches (raw, a
  fixed VHD, a DMG) stays ``pending`` until the end;
- ``mismatch``: the caller declared a format whose signature lies in the head,
  and the head does not carry it: ``check(format=...)`` will refuse it, so abort;
- ``unsafe``: ``check()``, run over the bytes held so far, found hazards that
  the rest of the stream cannot take back (a backing file, an external data
  file, foreign extents, unknown feature bits, a polyglot...), so abort;
- ``final``: after :meth:`~StreamInspector.finish`, ``check()`` run over the
  stream's bytes at its true size: the same :class:`~storprobe.safety.Verdict`
  (its ImageInfo and hazards) ``check()`` and ``probe()`` give on those bytes;
- ``undetermined``: that run needed bytes a forward-only stream had passed and
  no longer held; ``needed`` names them. Never a different answer.

Before the end the size is unknown (unless declared, e.g. a Content-Length):
runs before the end use the declared size, or :data:`SPECULATIVE_SIZE`, and a
table in which trailer rows cannot match (so detection reads no tail, and a
callback that does read near the end waits for it). Without a declared size an
early ``unsafe`` counts only hazards the size cannot change: not ``size`` (a
virtual size may be the file's) nor ``malformed`` (a field may point past the
true end); this assumes what every built-in row does, that a row reads the
volume's size only to refuse what lies past it or to report a file-sized disk.

Memory is bounded (:meth:`~StreamInspector.held`, at most :attr:`~StreamInspector.bound`):
the head, the ranges registered ahead or kept from the look-behind (at most
``capture_limit`` bytes in all, the read budget by default), and at least the
last ``look_behind`` bytes (at most twice that: it is trimmed in batches),
which serve reads just behind the stream and hold its tail (VHD and DMG
footers, a VMDK stream footer, the probe's :data:`~storprobe.source.TAIL_SIZE`).
Chunks only pass through the look-behind: the head and each registered range
(none longer than the look-behind) are copied out of it when the stream
reaches their end, so a chunk costs one append whatever its size.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache
from typing import NamedTuple

from .detect import _signatures
from .engine import MAX_ROUNDS, MIN_FETCH, KnownBytes, NeedBytes, Range
from .errors import ProbeError, SourceError
from .registry import FormatTable, Row, format_table
from .safety import Policy, Verdict, check
from .source import HEAD_SIZE, READ_BUDGET, Image
from .spec import Hazard

#: The size runs before the end assume when none is declared: long enough that
#: no field of a real image points past it, short enough that a file-sized
#: disk stays under QEMU's and the default policy's limits. A read in its
#: second half is a read relative to the end, and waits for the end.
SPECULATIVE_SIZE = 1 << 40
#: Bytes kept behind the stream's position by default (at least the head's length):
#: enough for a DMG's block map before its trailer, or a VHDX whose BAT lies
#: before its metadata region (qemu-img's layout: read 1.1 MiB behind).
LOOK_BEHIND = 2 << 20
#: Hazards whose presence may depend on the stream's size, counted early only
#: when the size is declared.
SIZE_DEPENDENT = frozenset({"size", "malformed"})

PENDING, PROVISIONAL, MISMATCH, UNSAFE, FINAL, UNDETERMINED = (
    "pending", "provisional", "mismatch", "unsafe", "final", "undetermined"
)


class StreamVerdict(NamedTuple):
    """What a stream inspection says at one point: ``state`` (see the module),
    after ``consumed`` bytes. ``format``: the decided format (provisional,
    unsafe, final); ``hazards``: what makes it unsafe (early), or the final
    verdict's; ``result``: the final :class:`~storprobe.safety.Verdict`;
    ``needed``: the range an undetermined verdict lacked; ``reason``: one line."""

    state: str
    consumed: int
    format: str | None = None
    hazards: tuple[Hazard, ...] = ()
    result: Verdict | None = None
    needed: Range | None = None
    reason: str = ""

    @property
    def rejected(self) -> bool:
        """Whether the upload should be aborted now (mismatch or unsafe, early)."""
        return self.state in (MISMATCH, UNSAFE)

    @property
    def safe(self) -> bool | None:
        """True or False once known (False as soon as it is rejected), else None."""
        if self.state == FINAL:
            return self.result is not None and self.result.safe
        return False if self.rejected else None


class _Capture:
    """A registered range ``[start, end)`` and the bytes of it captured so far."""

    __slots__ = ("start", "end", "data")

    def __init__(self, start: int, end: int) -> None:
        self.start, self.end, self.data = start, end, bytearray()

    @property
    def complete(self) -> bool:
        return self.start + len(self.data) >= self.end


class StreamInspector:
    """Inspect a volume that arrives as a forward-only stream of chunks.

    ``declared_format``: the format the caller says it is (``check(format=...)``);
    ``size``: its length when known beforehand (a Content-Length), which makes
    early verdicts exact and :meth:`finish` refuse a stream of another length;
    ``policy`` and ``table`` as for :func:`~storprobe.safety.check`; ``name``
    is the volume's name in the record; ``look_behind`` and ``capture_limit``
    bound memory (see the module)."""

    def __init__(
        self,
        declared_format: str | None = None,
        *,
        size: int | None = None,
        policy: Policy = Policy(),
        table: FormatTable | None = None,
        name: str = "<stream>",
        look_behind: int = LOOK_BEHIND,
        capture_limit: int = READ_BUDGET,
    ) -> None:
        if size is not None and size < 0:
            raise SourceError(f"declared size {size} is negative")
        self._table = table or format_table()
        if declared_format is not None:
            self._table[declared_format]  # UnknownFormat now, not at the end
        self.declared_format, self.declared_size, self.policy, self.name = declared_format, size, policy, name
        self.look_behind = max(look_behind, HEAD_SIZE)
        self._trim_at = 2 * self.look_behind  # trimmed in batches: a byte is moved at most once
        self.capture_limit = capture_limit
        self._head = bytearray()
        self._behind = bytearray()  # the last look_behind bytes before _pos
        self._captures: list[_Capture] = []
        self._captured = 0  # bytes registered in all
        self._pos = 0
        #: where a chunk needs more than the look-behind: the end of the head or of a registered range
        self._stop = HEAD_SIZE
        self._runs = 0
        self._speculating = True
        self._verdict = StreamVerdict(PENDING, 0, reason="waiting for the head")
        self._finished = False

    # ---- feeding ----------------------------------------------------------------

    def feed(self, chunk: bytes | bytearray | memoryview) -> StreamVerdict:
        """Take the next chunk; the verdict so far."""
        end = self._pos + len(chunk)
        if end < self._stop:  # the common case: the chunk only passes through the look-behind
            behind = self._behind
            behind += chunk
            if len(behind) > self._trim_at:
                del behind[: len(behind) - self.look_behind]
            self._pos = end
            return self._verdict
        if self._finished:
            raise SourceError("the stream was finished; it takes no more bytes")
        view = memoryview(chunk).cast("B")
        while view:
            piece, view = view[: self._stop - self._pos], view[self._stop - self._pos :]
            self._pass(piece)
            if self._pos == self._stop:
                self._reached()
                self._stop = self._next_stop()
        return self._verdict

    def _pass(self, piece: memoryview) -> None:
        """Move ``piece`` into the look-behind."""
        behind = self._behind
        if len(piece) >= self.look_behind:
            behind[:] = piece[-self.look_behind :]
        else:
            behind += piece
            if len(behind) > self._trim_at:
                del behind[: len(behind) - self.look_behind]
        self._pos += len(piece)

    def _next_stop(self) -> int:
        """Where the next chunk must be cut: the end of the head or of a
        registered range, which is then copied out of the look-behind (no range
        is longer than it); infinite when none is pending."""
        stops = [c.end for c in self._captures if not c.complete]
        if self._pos < HEAD_SIZE:
            stops.append(HEAD_SIZE)
        return min(stops, default=1 << 63)

    def _reached(self) -> None:
        """At a stop: keep the head or the registered ranges now complete; the
        probe may then get further than it did, so it runs again."""
        pos, behind = self._pos, self._behind
        base = pos - len(behind)
        if pos == HEAD_SIZE:
            self._head = bytearray(behind[:HEAD_SIZE])
        for capture in self._captures:
            if capture.end == pos and not capture.complete:
                capture.data = behind[capture.start - base : capture.end - base]
        if self._speculating and not self._verdict.rejected:
            self._speculate()

    # ---- runs before the end ---------------------------------------------------

    def _size(self) -> int:
        if self.declared_size is not None:
            return self.declared_size
        return max(SPECULATIVE_SIZE, 2 * self._pos)

    def _known(self, size: int) -> _Recording:
        """A source holding every byte kept, at ``size``."""
        known = _Recording(self.name, size)
        known.add(0, bytes(self._head))
        for capture in self._captures:
            known.add(capture.start, bytes(capture.data))
        known.add(self._pos - len(self._behind), bytes(self._behind))
        return known

    def _speculate(self) -> None:
        """Run detection and ``check()`` over what is held, at the assumed size,
        with trailer rows that cannot match; decide what that lets us decide."""
        self._runs += 1
        fmt, table = self.declared_format, _head_table(self._table)
        if self._runs > MAX_ROUNDS or (fmt is not None and _is_trailer_row(self._table, fmt)):
            self._speculating = False  # a declared trailer format: only the end decides
            return
        size = self._size()
        try:
            known = self._known(size)
            matched = tuple(_signatures(Image(known), table)[0])
            decided = _decided(self._table, fmt, matched)
            if decided is None and fmt is None:  # raw, a trailer format or a refusal: the end decides
                self._speculating = False
                return
            if decided is not None and self._verdict.state == PENDING:
                self._verdict = StreamVerdict(PROVISIONAL, self._pos, decided, reason="format decided by the head")
            verdict = check(known, policy=self.policy, format=fmt, table=table)
        except NeedBytes as need:
            self._keep(known.reads)
            self._want(need, size)
            return
        except ProbeError:  # a match callback that failed: the end decides
            self._speculating = False
            return
        self._keep(known.reads)
        self._speculating = False  # the run finished: nothing more to learn before the end
        if fmt is not None and decided != fmt:  # the declared row's signature lies in the head, and is not there
            head = matched[0] if matched else None
            said = f"declared {fmt}, but the head is {head}" if head else f"declared {fmt}, which the head is not"
            self._verdict = StreamVerdict(MISMATCH, self._pos, head, verdict.hazards, reason=said)
            return
        counted = tuple(
            h for h in verdict.hazards if self.declared_size is not None or h.check not in SIZE_DEPENDENT
        )
        if counted:
            self._verdict = StreamVerdict(UNSAFE, self._pos, decided, counted, reason="hazards seen before the end")

    def _keep(self, reads: list[Range]) -> None:
        """Keep what a run read from the look-behind (the run at the end reads
        it again), as complete ranges, within the capture limit."""
        behind = self._pos - len(self._behind)
        for offset, length in reads:
            start, end = max(offset, behind, HEAD_SIZE), min(offset + length, self._pos)
            if start >= end or any(c.start <= start and end <= c.end for c in self._captures):
                continue
            if end - start > self.capture_limit - self._captured:
                return
            capture = _Capture(start, end)
            capture.data += self._behind[start - behind : end - behind]
            self._captures.append(capture)
            self._captured += end - start
        self._captures.sort(key=lambda c: c.start)

    def _want(self, need: NeedBytes, size: int) -> None:
        """Register the range a run stopped at, when the stream has yet to pass it."""
        if (self.declared_size is None and need.offset >= size // 2) or need.offset < self._pos:
            self._speculating = False  # relative to an end not yet known, or passed and not held: the end's run tells
            return
        if any(c.start <= need.offset < c.end for c in self._captures):
            return  # arriving already
        room = self.capture_limit - self._captured
        if room <= 0:
            self._speculating = False  # past the capture limit: the end's run will be undetermined
            return
        length = max(need.length, MIN_FETCH)
        for capture in self._captures:
            if capture.end == need.offset:  # a walk front to back: twice the last range, so few runs
                length = max(length, 2 * (capture.end - capture.start))
        later = [c.start for c in self._captures if c.start > need.offset]
        end = min(need.offset + length, size, need.offset + room, need.offset + self.look_behind, *later)
        self._captures.append(_Capture(need.offset, end))
        self._captures.sort(key=lambda c: c.start)
        self._captured += end - need.offset

    # ---- asking, finishing -----------------------------------------------------

    def verdict(self) -> StreamVerdict:
        """The verdict so far."""
        return self._verdict

    @property
    def consumed(self) -> int:
        """Bytes fed so far."""
        return self._pos

    def held(self) -> int:
        """Bytes the inspector holds now: head, registered ranges, look-behind."""
        return len(self._head) + sum(len(c.data) for c in self._captures) + len(self._behind)

    @property
    def bound(self) -> int:
        """Most bytes :meth:`held` can ever be: the head, the capture limit, the look-behind."""
        return HEAD_SIZE + self.capture_limit + self._trim_at

    def finish(self) -> StreamVerdict:
        """The stream has ended: ``check()`` over its bytes at its true size,
        ``final``, or ``undetermined`` naming the bytes that run lacked."""
        if self._finished:
            return self._verdict
        if self.declared_size is not None and self._pos != self.declared_size:
            raise SourceError(f"the stream ended after {self._pos} bytes; {self.declared_size} were declared")
        self._finished = True
        self._stop = -1  # every later feed takes the slow path, which refuses it
        known = self._known(self._pos)
        try:
            result = check(known, policy=self.policy, format=self.declared_format, table=self._table)
        except NeedBytes as need:
            self._verdict = StreamVerdict(
                UNDETERMINED, self._pos, self._verdict.format, needed=(need.offset, need.length),
                reason=f"the verdict needs {need.length} bytes at offset {need.offset}, "
                f"which the stream had passed (it keeps the last {self.look_behind})",
            )
        else:
            fmt = result.info.format if result.info is not None else None
            self._verdict = StreamVerdict(FINAL, self._pos, fmt, result.hazards, result, reason="the whole stream")
        self._head, self._behind, self._captures = bytearray(), bytearray(), []
        return self._verdict


class _Recording(KnownBytes):
    """Known bytes that note every range read from them."""

    def __init__(self, name: str, size: int) -> None:
        super().__init__(name, size)
        self.reads: list[Range] = []

    def read_at(self, offset: int, length: int) -> bytes:
        self.reads.append((offset, length))
        return super().read_at(offset, length)


def _decided(table: FormatTable, declared: str | None, matched: tuple[str, ...]) -> str | None:
    """The format the head decides: the declared one when the head carries it
    (or it has no signature to carry), else the first head row that matched."""
    if declared is not None:
        spec = table[declared]
        return declared if declared in matched or (spec.catch_all and "file" in spec.file_types) else None
    return matched[0] if matched else None


def _is_trailer_row(table: FormatTable, name: str) -> bool:
    return min(table[name].header_offsets) < 0


def _never(img: Image) -> bool:
    return False


@lru_cache(maxsize=8)
def _head_table(table: FormatTable) -> FormatTable:
    """``table`` with every row that reads a trailer unable to match (so
    detection reads nothing near the end); the rows stay, with their hazards."""
    neutral: Callable[[Image], bool] = _never
    return FormatTable([
        Row(row.spec._replace(magic=None, match=neutral, match_prefixes=(), header_offsets=(0,), extension=None),
            row.plugin)
        if min(row.spec.header_offsets) < 0 else row
        for row in table.rows
    ])
