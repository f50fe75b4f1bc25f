"""A scan's fast path: plain volumes written from templates the general path made.

Most volumes of a pool are their format's plainest kind (for qcow2: no backing
file, encryption, snapshots, bitmaps or data file), and their records differ
only in name, virtual size and allocation. A row's ``plain`` callback tells
such a volume from its head alone and names the key that fixes the rest of its
record. The first volume of each key is probed and rendered by the general
path as ever; its record, rendered again with stand-in values, becomes the
template every later volume of that key is written from, kept only when it
writes that first volume's text exactly. So the general path is the reference,
and tests/test_fast_path_gate.py holds both paths to byte-identical output
over tens of thousands of mutated headers.

Detection is the format table's signature index run over the head and the
tail, as the general path runs it: the fast path takes a volume only when the
one row whose signature and version it carries has a ``plain`` callback and no
other signature is there. It is for the built-in formats only: a table with a
third-party row (whose signatures it was not tested with) turns it off.
"""

from collections.abc import Callable, Hashable
from typing import Literal, NamedTuple

from .registry import Candidate, FormatTable
from .scan import ScanRecord
from .source import PLAIN_HEAD, PathSource
from .spec import FormatSpec

#: Stand-ins for the values a template leaves out (the decimal ints are unlikely
#: in a record, and a template is kept only when each shows exactly once).
_NAME, _VIRTUAL_SIZE, _ALLOCATION = "\0storprobe:name\0", 7_305_029_914_273_390_311, 6_148_914_691_236_517_203


class PlainVolumes:
    """Texts of plain volumes for one format table and one ``render`` function,
    which writes a record's name with ``quote`` (JSON's string encoder, say) and
    shows nothing else of the volume's status than its allocation."""

    def __init__(self, table: FormatTable, render: Callable[[ScanRecord], object], quote: Callable[[str], str]) -> None:
        self._table, self._render, self._quote = table, render, quote
        self._head_windows = tuple(
            self._window(w.start, w.key, w.candidates) for w in table.windows if w.start >= 0
        )
        #: (window start, the bytes its decision reads) -> the decision (see :meth:`_decide`)
        self._decisions: dict[tuple[int, bytes], tuple[int, FormatSpec, int | None] | bool | None] = {}
        self._tail_windows = tuple((w.start, w.key, w.candidates) for w in table.windows if w.start < 0)
        self._tail = max((-start for start, _, _ in self._tail_windows), default=0)
        #: (row position, version) of the rows with a ``plain`` callback, for the versions QEMU opens
        #: with the row's own driver (another driver shows the volume's size, which no key holds)
        self._written = {
            (position, version)
            for position, (spec, _, _) in enumerate(table.signed)
            if spec.plain is not None
            for version in (spec.versions if spec.version_offset is not None else (None,))
            if spec.driver(version) == spec.name
        }
        #: (row position, version, key) -> the template, or None where no template can be made
        self._templates: dict[Hashable, Template | None] = {}

    @staticmethod
    def applies(table: FormatTable) -> bool:
        """Whether the fast path may run over ``table``: its rows are the built-in
        plugins' alone, and the signature index decides every one of them."""
        return table.builtin_only and not table.unindexed

    def _window(self, start: int, key: int, candidates: dict[bytes, tuple[Candidate, ...]]) -> "_HeadWindow":
        """A head window as :meth:`_only_row` reads it: within :data:`PLAIN_HEAD`
        from the head itself, else from the span its decisions read, read on its own
        (offsets then count from that span's start, ``base``)."""
        deciders = {k: _Decider.of(start, tuple(map(self._entry, entries))) for k, entries in candidates.items()}
        low = min([start, *(d.low for d in deciders.values())])
        high = max([start + key, *(d.high for d in deciders.values())])
        if high <= PLAIN_HEAD:
            return _HeadWindow(start, start, start + key, deciders, None, 0)
        rebased = {k: _Decider.of(start - low, tuple(e.rebased(low) for e in d.entries)) for k, d in deciders.items()}
        return _HeadWindow(start, start - low, start - low + key, rebased, low, high - low)

    def text(self, source: PathSource, head: bytes) -> "str | Wanted | None":
        """The text of a volume (a regular file, ``head`` its first :data:`PLAIN_HEAD`
        bytes) from its key's template; None when the volume is not plain; a
        :class:`Wanted` when its key has no template yet (render its record as
        ever, then pass both to :meth:`learn`)."""
        size = source.size()
        stat = source.stat
        if stat is None:
            return None
        found = self._only_row(source, head, size)
        if found is None:
            return None
        position, spec, version = found
        plain = spec.plain(head) if spec.plain is not None else None
        if plain is None:
            return None
        key, virtual_size = plain
        allocation = stat.st_blocks * 512
        try:
            template = self._templates[position, version, key]
        except KeyError:
            return Wanted((position, version, key), virtual_size, allocation)
        return None if template is None else template.fill(self._quote(source.name), virtual_size, allocation)

    def learn(self, wanted: "Wanted", record: ScanRecord, rendered: object) -> None:
        """Make the template :meth:`text` wanted, from the volume's record and
        the text ``render`` made of it."""
        key, virtual_size, allocation = wanted
        info = record.info
        template = None
        if info is not None and (info.filename, info.virtual_size, info.actual_size) == (
            record.path,
            virtual_size,
            allocation,
        ):
            stand_in = info._replace(filename=_NAME, virtual_size=_VIRTUAL_SIZE, actual_size=_ALLOCATION)
            template = Template.of(self._render(ScanRecord(_NAME, info=stand_in)), self._quote)
            if template is not None and template.fill(self._quote(record.path), virtual_size, allocation) != rendered:
                template = None
        self._templates[key] = template

    def _entry(self, candidate: Candidate) -> "_Entry":
        spec = self._table.signed[candidate.position][0]
        field = None
        if spec.version_offset is not None:
            order: Literal["big", "little"] = "big" if spec.endian == ">" else "little"
            field = (spec.version_offset, spec.version_offset + spec.version_width, order, frozenset(spec.versions))
        return _Entry(candidate.signature, candidate.position, spec, "file" in spec.file_types,
                      candidate.is_magic and not candidate.offset, field)

    def _only_row(self, source: PathSource, head: bytes, size: int) -> tuple[int, FormatSpec, int | None] | None:
        """(position, row, version) of the one row whose signature (a magic, at
        header offset 0) and version the volume carries, when no other signature
        is there and that row has a ``plain`` callback; else None."""
        found: tuple[int, FormatSpec, int | None] | None = None
        decisions = self._decisions
        for at, start, end, deciders, base, length in self._head_windows:
            if base is None:
                data = head
            elif size > at:
                data = source.read_at(base, length)
            else:
                continue  # the file ends before the window
            decider = deciders.get(data[start:end])
            if decider is None:
                continue
            seen = (at, data[decider.low : decider.high])
            decision = decisions.get(seen, False)
            if decision is False:
                decision = _decide(data, start, decider.entries)
                if len(decisions) < MAX_DECISIONS:
                    decisions[seen] = decision
            if decision is None:
                continue
            if decision is True or found is not None:
                return None
            found = decision  # type: ignore[assignment]
        if found is None or (found[0], found[2]) not in self._written:
            return None
        if self._tail_windows and size > 0:
            tail_start = max(0, size - self._tail)
            tail = head[tail_start:] if size <= len(head) else source.read_at(tail_start, size - tail_start)
            for start, key, trailers in self._tail_windows:
                at = size + start - tail_start
                candidates = trailers.get(tail[at : at + key]) if at >= 0 else None
                if candidates and any(tail.startswith(c.signature, at) for c in candidates):
                    return None
        return found


class Wanted(NamedTuple):
    """A plain volume whose key has no template yet: the key, and the volume's
    virtual size and allocation as the fast path read them."""

    key: Hashable
    virtual_size: int
    allocation: int


#: Decisions a scan remembers (distinct signature bytes, so few unless the bytes are made to differ).
MAX_DECISIONS = 4096


def _decide(head: bytes, start: int, entries: "tuple[_Entry, ...]") -> tuple[int, FormatSpec, int | None] | bool | None:
    """What one window of the signature index says of ``head``: the one row
    whose signature and version it carries (position, row, version), None for
    none, True for more than one or a signature the fast path leaves alone."""
    found = None
    for signature, position, spec, for_files, at_start, field in entries:
        if not for_files or not head.startswith(signature, start):
            continue  # the general path passes over a row not for files
        if not at_start:
            return True
        version = None
        if field is not None:
            offset, field_end, order, versions = field
            version = int.from_bytes(head[offset:field_end], order)
            if field_end > len(head) or version not in versions:
                continue  # the general path passes over a refused version when another row matches
        if found is not None:
            return True
        found = (position, spec, version)
    return found


class _Decider(NamedTuple):
    """The candidates a window's key bytes select, and the span of the head
    their decision reads (signatures and version fields): equal bytes there,
    equal decision."""

    low: int
    high: int
    entries: "tuple[_Entry, ...]"

    @classmethod
    def of(cls, start: int, entries: "tuple[_Entry, ...]") -> "_Decider":
        spans = [(start, start + len(e.signature)) for e in entries]
        spans += [(e.version_field[0], e.version_field[1]) for e in entries if e.version_field is not None]
        return cls(min(low for low, _ in spans), max(high for _, high in spans), entries)


class _Entry(NamedTuple):
    """A candidate of the signature index with what the fast path asks of its row:
    whether it is for regular files, whether it is a magic at header offset 0, and
    its version field (offset, end, byte order, versions accepted), if it has one."""

    signature: bytes
    position: int
    spec: FormatSpec
    for_files: bool
    at_start: bool
    version_field: tuple[int, int, Literal["big", "little"], frozenset[int]] | None

    def rebased(self, base: int) -> "_Entry":
        """The entry as read from bytes that start at ``base`` of the volume."""
        if self.version_field is None:
            return self
        offset, end, order, versions = self.version_field
        return self._replace(version_field=(offset - base, end - base, order, versions))


class _HeadWindow(NamedTuple):
    """A window of the signature index in the head, as the fast path reads it:
    its place in the volume (``at``, which keys remembered decisions), where its
    key bytes lie in the bytes read for it (``start`` to ``end``), and the
    deciders of those bytes; ``base`` None: the bytes are the head, else the
    ``length`` bytes from ``base`` on."""

    at: int
    start: int
    end: int
    deciders: dict[bytes, _Decider]
    base: int | None
    length: int


class Template(NamedTuple):
    """A volume's text in four literal parts, and which of the name (0), the
    virtual size (1) and the allocation (2) goes between each two."""

    parts: tuple[str, str, str, str]
    order: tuple[int, int, int]

    @classmethod
    def of(cls, text: object, quote: Callable[[str], str]) -> "Template | None":
        """The template of a text written with the stand-ins, or None unless
        ``text`` is a str that shows each of them exactly once."""
        if not isinstance(text, str):
            return None
        marks = (quote(_NAME), str(_VIRTUAL_SIZE), str(_ALLOCATION))
        if any(text.count(mark) != 1 for mark in marks):
            return None
        order = sorted(range(3), key=lambda field: text.index(marks[field]))
        parts, rest = [], text
        for field in order:
            part, rest = rest.split(marks[field])
            parts.append(part)
        return cls((parts[0], parts[1], parts[2], rest), (order[0], order[1], order[2]))

    def fill(self, name: str, virtual_size: int, allocation: int) -> str:
        """The text of a volume: ``name`` already quoted."""
        values = (name, str(virtual_size), str(allocation))
        (a, b, c, d), (x, y, z) = self
        return "".join((a, values[x], b, values[y], c, values[z], d))
