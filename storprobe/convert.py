"""``storprobe convert -O raw``: the guest disk written out as a raw file, sparse.

Ranges the block status calls zero or unallocated are never written, nor is
any aligned 4 KiB block of data that holds only zeros (``qemu-img convert``'s
default ``-S 4k``): they stay holes of a file sized to the disk with
``ftruncate``. The bytes equal ``qemu-img convert -O raw``'s.

Unlike qemu-img, which truncates whatever the destination names (following a
symbolic link), the destination must not exist unless ``overwrite`` is given,
and even then it must be a regular file, not a link: an image converted from
untrusted input never clobbers another file. A destination this function
created is removed again when the conversion fails.
"""

from __future__ import annotations

import os
import queue
import stat
import threading
from collections.abc import Iterator
from types import TracebackType
from typing import TYPE_CHECKING

from .errors import ProbeError

if TYPE_CHECKING:
    from .datapath import GuestDisk

#: Bytes read from the guest disk at once (1 MiB took less time and CPU than 2 MiB or
#: 256 KiB converting 1 GiB of random or compressed data: the chunk just read is
#: more likely still in the processor's cache when it is written).
CHUNK = 1 << 20
#: Chunk buffers in flight: one being read while the others wait to be written.
BUFFERS = 3
#: The smallest run of zeros left as a hole (qemu-img convert's default ``-S``).
SPARSE = 4096
_ZERO_BLOCK = bytes(SPARSE)
#: Offsets of the bytes of each 4 KiB block looked at first: a block one of them
#: is not zero in holds data, and the rest of it is never looked at (most data
#: blocks); only the others are compared with zeros whole.
_SAMPLES = (*range(0, SPARSE, SPARSE // 8), SPARSE - 1)


class DestinationError(ProbeError):
    """The destination cannot be created (it exists, it is a link or not a regular file)."""

    code = "convert.destination"


class WriteError(Exception):
    """Writing the destination failed (a full disk, a file size limit ...); ``error`` says why."""

    def __init__(self, error: OSError) -> None:
        super().__init__(error)
        self.error = error


def convert_to_raw(disk: GuestDisk, destination: str | os.PathLike[str], *, overwrite: bool = False) -> None:
    """Write ``disk`` to the new raw file ``destination`` (replacing a regular
    file there with ``overwrite``). Raises :class:`DestinationError`,
    :class:`WriteError`, or the data path's named errors reading the disk."""
    fd = _create(destination, overwrite)
    try:
        try:
            os.ftruncate(fd, disk.size)
        except OSError as exc:
            raise WriteError(exc) from None
        with _WriteBehind(fd) as writer:
            for start, length in _data_ranges(disk):
                _copy(disk, writer, start, length)
    except BaseException:
        os.close(fd)
        os.unlink(destination)
        raise
    try:
        os.close(fd)
    except OSError as exc:
        os.unlink(destination)
        raise WriteError(exc) from None


def _create(destination: str | os.PathLike[str], overwrite: bool) -> int:
    flags = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
    if overwrite:
        try:
            mode = os.lstat(destination).st_mode
        except FileNotFoundError:
            pass
        else:
            if not stat.S_ISREG(mode):
                raise DestinationError("exists and is not a regular file; it is not replaced")
            flags |= os.O_TRUNC
    else:
        flags |= os.O_EXCL
    try:
        fd = os.open(destination, flags, 0o644)
    except FileExistsError:
        raise DestinationError("exists (pass --overwrite to replace it)") from None
    except OSError as exc:  # ELOOP: it became a symbolic link since lstat
        raise DestinationError(exc.strerror or str(exc)) from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):  # a FIFO or device created between lstat and open
        os.close(fd)
        raise DestinationError("is not a regular file; it is not replaced")
    return fd


class _WriteBehind:
    """Writes chunks on a thread of its own while the next ones are read (``pread``
    and ``pwrite`` both let other threads run): a conversion takes about as long as
    the longer of its reads and its writes, not their sum. At most :data:`BUFFERS`
    chunk buffers are made, when first needed, and reused; a failed write is raised
    when the block is left (or when the next buffer is asked for), after the thread
    has ended."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.error: WriteError | None = None
        self._free: queue.SimpleQueue[bytearray] = queue.SimpleQueue()
        self._made = 0
        self._jobs: queue.SimpleQueue[tuple[bytearray, list[tuple[int, int]], int] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="storprobe-convert-writer", daemon=True)
        self._thread.start()

    def __enter__(self) -> _WriteBehind:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self._jobs.put(None)
        self._thread.join()
        if kind is None and self.error is not None:
            raise self.error

    def buffer(self) -> bytearray:
        """A chunk buffer whose last write is done."""
        try:
            buffer = self._free.get_nowait()
        except queue.Empty:
            if self._made < BUFFERS:
                self._made += 1
                return bytearray(CHUNK)
            buffer = self._free.get()
        if self.error is not None:
            raise self.error
        return buffer

    def write(self, buffer: bytearray, runs: list[tuple[int, int]], at: int) -> None:
        """Write ``buffer[lo:hi]`` at ``at + lo`` for each run, then free the buffer."""
        self._jobs.put((buffer, runs, at))

    def _run(self) -> None:
        while (job := self._jobs.get()) is not None:
            buffer, runs, at = job
            if self.error is None:  # after a failure, buffers are only handed back
                view = memoryview(buffer)
                try:
                    for lo, hi in runs:
                        _write(self.fd, view[lo:hi], at + lo)
                except WriteError as exc:
                    self.error = exc
                view.release()
            self._free.put(buffer)


def _data_ranges(disk: GuestDisk) -> Iterator[tuple[int, int]]:
    """``(start, length)`` of the ranges the block status calls data (not zeros),
    those that follow one another joined: a run of compressed clusters, one
    status each, is copied in whole chunks."""
    start = end = 0
    for status in disk.block_status():
        if status.data and not status.zero:
            if status.start != end:
                if end > start:
                    yield start, end - start
                start = status.start
            end = status.start + status.length
    if end > start:
        yield start, end - start


def _copy(disk: GuestDisk, writer: _WriteBehind, start: int, length: int) -> None:
    """Write ``[start, start + length)`` but its aligned 4 KiB blocks of zeros."""
    for at in range(start, start + length, CHUNK):
        size = min(CHUNK, start + length - at)
        buffer = writer.buffer()
        with memoryview(buffer) as view:
            disk.seek(at)
            if disk.readinto(view[:size]) != size:
                writer.write(buffer, [], at)
                raise ProbeError(f"short read at offset {at} of the guest disk", code="convert.short-read")
        writer.write(buffer, list(_data_runs(buffer, at, size)), at)


def _data_runs(buffer: bytearray, at: int, size: int) -> Iterator[tuple[int, int]]:
    """The ranges ``[lo, hi)`` of ``buffer[:size]`` (guest bytes from offset
    ``at``) left once its 4 KiB blocks of zeros, aligned on the disk, are taken
    out. The :data:`_SAMPLES` bytes of every block are gathered with strided
    slices and OR-ed together as integers, a byte per block (C, a few thousand
    bytes a chunk); only a block whose samples are all zeros is compared whole."""
    view = memoryview(buffer)
    first = -at % SPARSE  # where the first block aligned on the disk starts
    count = max(0, (size - first) // SPARSE)  # the whole blocks in the buffer
    end = first + count * SPARSE
    samples = 0
    for offset in _SAMPLES:
        samples |= int.from_bytes(buffer[first + offset : end : SPARSE], "little")
    marks = samples.to_bytes(count, "little")  # block i's byte is zero when it may hold only zeros
    run = 0  # where the range being gathered starts
    i = marks.find(0)
    while i >= 0:
        lo = hi = first + i * SPARSE
        while i < count and not marks[i] and view[hi : hi + SPARSE] == _ZERO_BLOCK:
            i, hi = i + 1, hi + SPARSE
        if hi > lo:
            if lo > run:
                yield run, lo
            run = hi
        i = marks.find(0, i + 1)
    if run < size:
        yield run, size


def _write(fd: int, data: memoryview, offset: int) -> None:
    try:
        while data:
            done = os.pwrite(fd, data, offset)
            data, offset = data[done:], offset + done
    except OSError as exc:
        raise WriteError(exc) from None
