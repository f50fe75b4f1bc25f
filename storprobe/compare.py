"""``storprobe compare``: do two guest disks hold the same bytes? As
``qemu-img compare`` decides it (QEMU 7.2 qemu-img.c img_compare), with its
messages and exit codes.

The common part is walked range by range through both disks' block status:
ranges zero in both are equal unread; ranges allocated in both are read and
compared; a range allocated in one only must read as zeros there. Then, when
the sizes differ ("Warning: Image size mismatch!"), what the larger disk holds
beyond the smaller must read as zeros. The first difference is reported at the
start of its 512-byte sector, as QEMU compares sector by sector. Strict mode
(``-s``) also calls a size or a block status that differs a difference: its
flags as QEMU compares them (allocated, zero, data, offset known, and whether
the range runs to the end of the disk).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, NamedTuple

from .errors import ProbeError

if TYPE_CHECKING:
    from .datapath import GuestDisk, Status

#: Exit statuses, qemu-img compare's.
IDENTICAL, DIFFERENT, OPEN_FAILED, STATUS_FAILED, READ_FAILED = 0, 1, 2, 3, 4
SECTOR = 512
#: Most bytes read from each disk at once (qemu-img's IO_BUF_SIZE).
CHUNK = 2 << 20


class CompareError(ProbeError):
    """A disk's block status or bytes could not be read during the comparison;
    ``status`` is qemu-img's exit status for it (3 block status, 4 read)."""

    code = "compare"

    def __init__(self, message: str, *, filename: str, status: int) -> None:
        super().__init__(message)
        self.filename, self.status = filename, status


class Outcome(NamedTuple):
    """The verdict: ``status`` (0 identical, 1 different) and the lines qemu-img prints."""

    status: int
    lines: tuple[str, ...]


def compare(first: GuestDisk, second: GuestDisk, *, strict: bool = False) -> Outcome:
    """Compare the guest disks ``first`` and ``second``; raises :class:`CompareError`
    when one cannot be read (the exit status it carries is qemu-img's)."""
    if strict and first.size != second.size:
        return Outcome(DIFFERENT, ("Strict mode: Image size mismatch!",))
    common = min(first.size, second.size)
    for start, length, one, two in _paired(first, second, common):
        if strict and _kind(one, first.size) != _kind(two, second.size):
            return Outcome(DIFFERENT, (f"Strict mode: Offset {start} block status mismatch!",))
        if one.zero and two.zero:
            continue
        if one.present == two.present:
            if not one.present:
                continue
            mismatch = _first_difference(first, second, start, length)
        else:
            mismatch = _first_nonzero(first if one.present else second, start, length)
        if mismatch is not None:
            return Outcome(DIFFERENT, (f"Content mismatch at offset {mismatch}!",))
    lines: tuple[str, ...] = ()
    if first.size != second.size:
        lines = ("Warning: Image size mismatch!",)
        larger = first if first.size > second.size else second
        for status in _statuses(larger, common, larger.size):
            if status.present and not status.zero:
                mismatch = _first_nonzero(larger, status.start, status.length)
                if mismatch is not None:
                    return Outcome(DIFFERENT, (*lines, f"Content mismatch at offset {mismatch}!"))
    return Outcome(IDENTICAL, (*lines, "Images are identical."))


def _kind(status: Status, size: int) -> tuple[bool, ...]:
    """What strict mode compares of a range's block status: QEMU's flags
    (allocated, zero, data, offset valid, and "runs to the end of the disk")."""
    return (status.present, status.zero, status.data, status.offset is not None,
            status.start + status.length >= size)


def _statuses(disk: GuestDisk, start: int, end: int) -> Iterator[Status]:
    """``disk``'s block status over ``[start, end)``; a failure is qemu-img's status 3."""
    walk = disk.block_status(start, end - start)
    while True:
        try:
            status = next(walk)
        except StopIteration:
            return
        except ProbeError as exc:
            raise CompareError(exc.reason, filename=disk.name, status=STATUS_FAILED) from None
        yield status


def _paired(first: GuestDisk, second: GuestDisk, end: int) -> Iterator[tuple[int, int, Status, Status]]:
    """Ranges of ``[0, end)`` over which both disks' block status stays the same:
    (start, length, first's status, second's status)."""
    ones, twos = _statuses(first, 0, end), _statuses(second, 0, end)
    one, two = next(ones, None), next(twos, None)
    at = 0
    while at < end and one is not None and two is not None:
        stop = min(one.start + one.length, two.start + two.length, end)
        yield at, stop - at, one, two
        at = stop
        if one.start + one.length <= at:
            one = next(ones, None)
        if two.start + two.length <= at:
            two = next(twos, None)


def _read(disk: GuestDisk, offset: int, length: int) -> bytes:
    try:
        data = disk.pread(offset, length)
    except ProbeError as exc:
        raise CompareError(f"error while reading offset {offset}: {exc.reason}", filename=disk.name,
                           status=READ_FAILED) from None
    except OSError as exc:
        raise CompareError(f"error while reading offset {offset}: {exc.strerror or exc}", filename=disk.name,
                           status=READ_FAILED) from None
    if len(data) != length:
        raise CompareError(f"error while reading offset {offset}: short read", filename=disk.name,
                           status=READ_FAILED)
    return data


def _first_difference(first: GuestDisk, second: GuestDisk, start: int, length: int) -> int | None:
    """The start of the first sector in ``[start, start + length)`` the disks differ in."""
    for at in range(start, start + length, CHUNK):
        size = min(CHUNK, start + length - at)
        one, two = _read(first, at, size), _read(second, at, size)
        if one != two:
            return (at + _differing(one, two)) // SECTOR * SECTOR
    return None


def _differing(one: bytes, two: bytes) -> int:
    """The index of the first byte ``one`` and ``two`` (not equal) differ at, found
    by halving: each step a comparison of slices, done in C."""
    low, high = 0, len(one)
    while high - low > 1:
        middle = (low + high) // 2
        if one[low:middle] != two[low:middle]:
            high = middle
        else:
            low = middle
    return low


def _first_nonzero(disk: GuestDisk, start: int, length: int) -> int | None:
    """The start of the first sector in ``[start, start + length)`` that is not all zeros on ``disk``."""
    for at in range(start, start + length, CHUNK):
        data = _read(disk, at, min(CHUNK, start + length - at))
        stripped = data.lstrip(b"\0")
        if stripped:
            return (at + len(data) - len(stripped)) // SECTOR * SECTOR
    return None
