"""What a format row gives the data path: a block map of one image.

A row's ``block_map`` callback turns a probed image into a :class:`BlockMap`,
which answers, for a range of the guest disk, the :class:`Extent` s that
cover it (data, zeros, or unallocated: ask the backing file) and reads the
bytes of a data extent. It reads the image's file through a :class:`HostFile`:
positional reads that return zeros past the end of the file (as QEMU's block
layer does), tables through a cache bounded in bytes, and where the file
system knows them, its holes (``SEEK_DATA``/``SEEK_HOLE``).
"""

from __future__ import annotations

import errno
import os
import stat
import zlib
from collections import OrderedDict
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, NamedTuple, Protocol, runtime_checkable

from .errors import ProbeError, SourceError

if TYPE_CHECKING:
    from .model import ImageInfo

#: Bytes of tables (L1 pieces, L2 tables) the data path keeps per opened chain
#: by default: QEMU's default L2 cache size on Linux.
DEFAULT_CACHE_BYTES = 32 * 1024 * 1024


class DataPathError(ProbeError):
    """The guest data cannot be read: a table entry QEMU refuses (``code``
    names the rule, ``qcow2.l2-offset-unaligned`` ...), an image the data path
    does not read (encrypted, an external data file), a short decompression."""

    code = "datapath"


class MissingExtra(DataPathError):
    """Reading this image needs an optional dependency that is not installed."""

    code = "datapath.missing-extra"


def inflate_cluster(data: bytes | memoryview, size: int, format: str, *, window_bits: int = -12) -> bytes:
    """A compressed cluster's raw deflate stream inflated as QEMU's qcow and qcow2
    drivers inflate it: into exactly ``size`` bytes (more is never produced);
    a stream that is corrupt or ends short of ``size`` is a named error
    (``FORMAT.compressed-corrupt``, ``FORMAT.compressed-short``), never a shift."""
    try:
        out = zlib.decompressobj(window_bits).decompress(data, size)
    except zlib.error as exc:
        raise DataPathError(f"compressed cluster does not inflate: {exc}",
                            code=f"{format}.compressed-corrupt") from None
    if len(out) != size:
        raise DataPathError(f"compressed cluster inflates to {len(out)} bytes, not a cluster of {size}",
                            code=f"{format}.compressed-short")
    return out


class Extent(NamedTuple):
    """A range of the guest disk with one status, as QEMU's block status says it.

    ``data`` and ``zero`` are QEMU's flags: data only (bytes in the file),
    zero only (reads as zeros), both (allocated data the file holds as a hole,
    or past its end: zeros), neither (unallocated: the backing file's bytes).
    ``host_offset`` is where ``start`` lies in the image's file, when the
    format says; a compressed extent has none and is one cluster or less.
    """

    start: int
    length: int
    data: bool
    zero: bool
    host_offset: int | None = None
    compressed: bool = False
    file: str | None = None  # the file ``host_offset`` lies in, when not the image's own (a VMDK extent)

    @property
    def end(self) -> int:
        return self.start + self.length

    @property
    def allocated(self) -> bool:
        """Whether this image decides the range's bytes (not its backing file)."""
        return self.data or self.zero

    @property
    def kind(self) -> str:
        """``"data"``, ``"zero"`` (reads as zeros) or ``"unallocated"``."""
        if self.zero:
            return "zero"
        return "data" if self.data else "unallocated"


class BlockMap(Protocol):
    """One image's guest-to-host map, made by its row's ``block_map`` callback."""

    def extents(self, start: int, length: int, *, want_zero: bool = True) -> Iterator[Extent]:
        """Extents covering ``[start, start + length)`` in order, each non-empty
        and within the range. ``want_zero`` False (reading) may skip the work
        of finding which allocated data reads as zeros (the file's holes)."""
        ...

    def read(self, extent: Extent, offset: int, length: int) -> bytes:
        """The guest bytes ``[offset, offset + length)``, inside ``extent``,
        one this map gave with ``data`` set."""
        ...


@runtime_checkable
class ReadsInto(Protocol):
    """A block map that can also read a data extent's bytes straight into the
    caller's buffer (a file read lands there with no copy in between)."""

    def read_into(self, extent: Extent, offset: int, out: memoryview) -> None:
        """:meth:`BlockMap.read` of ``len(out)`` bytes at ``offset``, written into ``out``."""
        ...


class FileAsDisk:
    """The block map of a guest disk that is its host file from byte 0 (raw, a
    fixed VHD before its footer): the host offset is the guest offset, and the
    file's holes (``SEEK_DATA``/``SEEK_HOLE``, or its end) read as zeros. QEMU's
    file driver calls a hole unallocated; a format that passes block status
    through to the file (``BDRV_BLOCK_RAW``) calls it data reading as zeros:
    ``holes_are_data``."""

    def __init__(self, host: HostFile, *, holes_are_data: bool = False) -> None:
        self.host = host
        self.holes_are_data = holes_are_data

    def extents(self, start: int, length: int, *, want_zero: bool = True) -> Iterator[Extent]:
        if not want_zero:
            yield Extent(start, length, True, False, start)
            return
        for offset, run, is_data in self.host.holes(start, length):
            yield Extent(offset, run, is_data or self.holes_are_data, not is_data, offset)

    def read(self, extent: Extent, offset: int, length: int) -> bytes:
        return self.host.read(offset, length)

    def read_into(self, extent: Extent, offset: int, out: memoryview) -> None:
        self.host.read_into(offset, out)


@runtime_checkable
class BackingRule(Protocol):
    """A block map whose format has a rule for reading the image below it
    (QEMU's vmdk reads its parent only when the parent's CID is the one it records)."""

    def check_backing(self, below: ImageInfo) -> None:
        """Raise a named error when guest bytes may not be read from ``below``
        (asked before each read that falls through to it)."""
        ...


@runtime_checkable
class ReadsNoBacking(Protocol):
    """A block map whose format QEMU reads without the backing file the image
    records (a differencing VHD, which QEMU 7.2 opens as a dynamic one: every
    range data or zeros, none unallocated): the data path opens nothing below it."""

    reads_no_backing: bool


class TableCache:
    """Tables read from image files, least recently used dropped first, at most
    ``capacity`` bytes in all (a table larger than that is read, not kept)."""

    def __init__(self, capacity: int = DEFAULT_CACHE_BYTES) -> None:
        self.capacity = capacity
        self.held = 0
        self._tables: OrderedDict[tuple[int, int, int], bytes] = OrderedDict()

    def get(self, host: HostFile, offset: int, length: int) -> bytes:
        key = (id(host), offset, length)
        table = self._tables.get(key)
        if table is not None:
            self._tables.move_to_end(key)
            return table
        table = host.read(offset, length)
        if length <= self.capacity:
            while self.held + length > self.capacity:
                self.held -= len(self._tables.popitem(last=False)[1])
            self._tables[key] = table
            self.held += length
        return table

    def forget(self, host: HostFile) -> None:
        """Drop what was read from ``host`` (closed)."""
        for key in [k for k in self._tables if k[0] == id(host)]:
            self.held -= len(self._tables.pop(key))


_OPEN_FLAGS = os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | getattr(os, "O_CLOEXEC", 0)


class HostFile:
    """An image's file, opened read-only, for the data path: a byte source
    (so it can be probed) whose reads past the end return zeros."""

    def __init__(self, path: str, cache: TableCache, *, nofollow: bool = False) -> None:
        """Open ``path``, a regular file or block device (anything else is a
        SourceError, found before opening); ``nofollow``: refuse a symlink."""
        self.name, self.cache = path, cache
        try:
            if not nofollow:
                _check_kind(os.stat(path).st_mode)
            self._fd = os.open(path, _OPEN_FLAGS | (getattr(os, "O_NOFOLLOW", 0) if nofollow else 0))
        except OSError as exc:
            raise SourceError(exc.strerror or str(exc)) from None
        #: How this image may open the files it names for its own data (set by the data path from its policy).
        self.named_opener: Callable[[str], HostFile] | None = None
        self._named: list[HostFile] = []
        try:
            self.stat: os.stat_result | None = os.fstat(self._fd)
            self.file_type = _check_kind(self.stat.st_mode)
            self._size = os.lseek(self._fd, 0, os.SEEK_END)
        except BaseException:
            os.close(self._fd)
            raise

    def size(self) -> int:
        return self._size

    @property
    def allocated_bytes(self) -> int:
        """Bytes the file system holds for the file (QEMU's allocated file size)."""
        return self.stat.st_blocks * 512 if self.stat is not None else self._size

    def read_at(self, offset: int, length: int) -> bytes:
        """Up to ``length`` bytes at ``offset`` (short at the end of the file)."""
        try:
            return os.pread(self._fd, length, offset)
        except OSError as exc:
            raise SourceError(f"{self.name}: read failed: {exc.strerror or exc}") from None

    def read(self, offset: int, length: int) -> bytes:
        """``length`` bytes at ``offset``; zeros where the file has ended."""
        data = self.read_at(offset, length) if offset < self._size else b""
        while len(data) < length and offset + len(data) < self._size:  # a short read inside the file
            more = self.read_at(offset + len(data), length - len(data))
            if not more:
                break
            data += more
        return data + bytes(length - len(data))

    def read_into(self, offset: int, out: memoryview) -> None:
        """:meth:`read` of ``len(out)`` bytes at ``offset``, straight into ``out``."""
        done, length = 0, len(out)
        while done < length and offset + done < self._size:  # again after a short read inside the file
            try:
                got = os.preadv(self._fd, [out[done:]], offset + done)
            except OSError as exc:
                raise SourceError(f"{self.name}: read failed: {exc.strerror or exc}") from None
            if not got:
                break
            done += got
        if done < length:
            out[done:] = bytes(length - done)

    def table(self, offset: int, length: int) -> bytes:
        """A table's bytes, through the chain's bounded cache."""
        return self.cache.get(self, offset, length)

    def holes(self, offset: int, length: int) -> Iterator[tuple[int, int, bool]]:
        """``(offset, length, is_data)`` runs covering ``[offset, offset + length)``,
        as QEMU's file driver tells them: from ``SEEK_DATA``/``SEEK_HOLE``; all
        data where the file system cannot say; a hole from the end of the file."""
        end = offset + length
        while offset < end:
            try:
                data = os.lseek(self._fd, offset, os.SEEK_DATA)
            except OSError as exc:
                if exc.errno == errno.ENXIO:  # nothing but a hole from here to the end of the file
                    yield offset, end - offset, False
                else:
                    yield offset, end - offset, True
                return
            if data > offset:
                yield offset, min(data, end) - offset, False
                offset = min(data, end)
                continue
            try:
                hole = os.lseek(self._fd, offset, os.SEEK_HOLE)
            except OSError:
                hole = end
            hole = max(hole, offset + 1)
            yield offset, min(hole, end) - offset, True
            offset = min(hole, end)

    def open_named(self, name: str) -> HostFile:
        """The file ``name`` this image records for its own data (a VMDK
        descriptor's extent), opened under the rules of the policy the image was
        opened with, and closed with it; a named error when the policy refuses it."""
        if self.named_opener is None:
            raise DataPathError(f"{self.name} names the file {name!r} for its data, which its policy refuses "
                                "(allow backing files, inside a directory or as recorded, to read it)",
                                code="datapath.named-file-refused")
        named = self.named_opener(name)
        self._named.append(named)
        return named

    def close(self) -> None:
        for named in self._named:
            named.close()
        self.cache.forget(self)
        os.close(self._fd)


def _check_kind(mode: int) -> str:
    if stat.S_ISREG(mode):
        return "file"
    if stat.S_ISBLK(mode):
        return "block"
    raise SourceError("is not a regular file or a block device: no guest data to read")
