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
import stat
from typing import TYPE_CHECKING

from .errors import ProbeError

if TYPE_CHECKING:
    from .datapath import GuestDisk

#: Bytes read from the guest disk at once.
CHUNK = 2 << 20
#: The smallest run of zeros left as a hole (qemu-img convert's default ``-S``).
SPARSE = 4096
_ZERO_CHUNK = bytes(CHUNK)


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
        for status in disk.block_status():
            if status.data and not status.zero:
                _copy(disk, fd, status.start, status.length)
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


def _copy(disk: GuestDisk, fd: int, start: int, length: int) -> None:
    """Write the non-zero 4 KiB blocks of ``[start, start + length)``, read
    into one reused buffer."""
    buffer = memoryview(bytearray(min(CHUNK, length)))
    for at in range(start, start + length, CHUNK):
        size = min(CHUNK, start + length - at)
        view = buffer[:size]
        disk.seek(at)
        if disk.readinto(view) != size:
            raise ProbeError(f"short read at offset {at} of the guest disk", code="convert.short-read")
        if view == _ZERO_CHUNK[:size]:
            continue
        run_start = None  # where the run of non-zero blocks being gathered starts
        for block in range(at - at % SPARSE, at + size, SPARSE):
            lo, hi = max(block, at) - at, min(block + SPARSE, at + size) - at
            if view[lo:hi] == _ZERO_CHUNK[: hi - lo]:
                if run_start is not None:
                    _write(fd, view[run_start:lo], at + run_start)
                    run_start = None
            elif run_start is None:
                run_start = lo
        if run_start is not None:
            _write(fd, view[run_start:], at + run_start)


def _write(fd: int, data: memoryview, offset: int) -> None:
    try:
        while data:
            done = os.pwrite(fd, data, offset)
            data, offset = data[done:], offset + done
    except OSError as exc:
        raise WriteError(exc) from None
