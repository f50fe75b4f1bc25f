"""``storprobe map``'s text: ``qemu-img map``'s output (QEMU 7.2), byte for byte.

Pure functions of :class:`~storprobe.datapath.Status` ranges: they are merged
as qemu-img merges them (same flags, depth and presence, contiguous offsets),
then printed as its JSON array or its human table. ``compressed`` adds the key
QEMU 8.2 prints (and merges on); 7.2 has none.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

from .blockmap import DataPathError
from .datapath import Status


def _entry(status: Status) -> Status:
    """A range as one line of the map (qemu-img's Status): its file only where it has an offset."""
    return status if status.offset is not None else status._replace(filename="")


def _mergeable(current: Status, following: Status, compressed: bool) -> bool:
    return (
        (current.zero, current.data, current.depth, current.present, current.offset is None, current.filename)
        == (following.zero, following.data, following.depth, following.present, following.offset is None,
            following.filename)
        and (not compressed or current.compressed == following.compressed)
        and (current.offset is None or current.offset + current.length == following.offset)
    )


Dump = Callable[[Status, "Status | None"], "tuple[str, Status | None]"]


def _entries(statuses: Iterable[Status], dump: Dump, compressed: bool) -> Iterator[str]:
    """qemu-img map's loop: each range merged into the entry before it when it
    can be, else that entry printed (``dump`` may change the one that follows,
    as the human table does). It starts from an empty entry, printed as it is
    when the disk is empty."""
    current = Status(0, 0, 0, False, False, False, None, False, "")
    for status in statuses:
        following = _entry(status)
        if current.length and _mergeable(current, following, compressed):
            current = current._replace(length=current.length + following.length)
            continue
        if current.length:
            text, changed = dump(current, following)
            following = changed or following
            yield text
        current = following
    yield dump(current, None)[0]


def json_lines(statuses: Iterable[Status], *, compressed: bool = False) -> Iterator[str]:
    """``qemu-img map --output=json``, piece by piece (``compressed``: 8.2's key too)."""

    def dump(entry: Status, following: Status | None) -> tuple[str, Status | None]:
        text = (
            f'{{ "start": {entry.start}, "length": {entry.length}, "depth": {entry.depth},'
            f' "present": {_bool(entry.present)}, "zero": {_bool(entry.zero)}, "data": {_bool(entry.data)}'
        )
        if compressed:
            text += f', "compressed": {_bool(entry.compressed)}'
        if entry.offset is not None:
            text += f', "offset": {entry.offset}'
        return text + ("},\n" if following is not None else "}"), None

    yield "["
    yield from _entries(statuses, dump, compressed)
    yield "]\n"


def human_lines(statuses: Iterable[Status]) -> Iterator[str]:
    """``qemu-img map``'s table: data ranges with where they lie. Data with no
    offset (a compressed cluster) cannot be shown: a DataPathError once the
    lines before it are out, as qemu-img fails there."""

    def dump(entry: Status, following: Status | None) -> tuple[str, Status | None]:
        if entry.data and entry.offset is None:
            raise DataPathError("File contains external, encrypted or compressed clusters.", code="map.no-offset")
        text = ""
        if entry.data and not entry.zero:
            text = f"{_hex(entry.start):<16}{_hex(entry.length):<16}{_hex(entry.offset or 0):<16}{entry.filename}\n"
        if following is not None and (not following.data or following.zero):
            following = following._replace(data=False, zero=True)  # the table shows no other zeros
        return text, following

    yield f"{'Offset':<16}{'Length':<16}{'Mapped to':<16}File\n"
    yield from _entries(statuses, dump, False)


def _bool(value: bool) -> str:
    return "true" if value else "false"


def _hex(value: int) -> str:
    """C's ``%#x``: no prefix on zero."""
    return f"{value:#x}" if value else "0"
