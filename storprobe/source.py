"""Byte sources and the bounded view of an image that format callbacks read.

A :class:`ByteSource` is anything with a name, a size and positional reads: a
path (opened read-only, non-blocking, never following into FIFOs or sockets),
an open binary file, or bytes in memory. :class:`Image` wraps one with the
header buffer read once up front and a per-probe byte budget for any further
reads a format needs.
"""

from __future__ import annotations

import errno
import io
import os
import stat
from collections.abc import Callable, Hashable
from typing import BinaryIO, Protocol, TypeVar

from .errors import ReadLimitExceeded, SourceError, TruncatedHeader

#: Bytes read up front from every volume: libvirt's 0x8200, which also covers
#: the ISO 9660 signature at 32769.
HEAD_SIZE = 0x8200
#: Bytes read at once, and kept, when a format looks at the end of the file
#: (VHD footers, DMG trailers, VMDK stream footers all lie in the last 4 KiB).
TAIL_SIZE = 4096
#: Bytes a scan's fast path (:mod:`storprobe.plain`) reads at the start of a volume,
#: which a row's ``plain`` callback sees; a signature further in (ISO 9660's) is
#: read on its own. Reading all of HEAD_SIZE took a quarter of a scan's time.
PLAIN_HEAD = 4096
#: Most bytes one probe may read in all, header included; a header that asks
#: for more is refused with ReadLimitExceeded instead of being trusted.
READ_BUDGET = 16 * 1024 * 1024

#: QEMU's block-layer sector: a volume's length is counted in whole ones.
SECTOR = 512

T = TypeVar("T")


class ByteSource(Protocol):
    """What the core reads a volume through. The core only reads ``name``,
    ``file_type`` and ``stat``: a plain attribute, a class attribute or a
    property satisfies each. A source may also have ``security_label``, the
    volume's SELinux label read when it was opened (the volume XML's ``<label>``)."""

    @property
    def name(self) -> str: ...

    @property
    def file_type(self) -> str:
        """``"file"``, ``"block"`` or ``"directory"``."""
        ...

    @property
    def stat(self) -> os.stat_result | None:
        """The volume's status, taken when it was opened; None for one held in memory."""
        ...

    def size(self) -> int: ...

    def read_at(self, offset: int, length: int) -> bytes: ...

    def close(self) -> None: ...


_KIND_BY_MODE = (
    (stat.S_ISREG, "file"),
    (stat.S_ISBLK, "block"),
    (stat.S_ISDIR, "directory"),
    (stat.S_ISCHR, "character device"),
    (stat.S_ISFIFO, "FIFO"),
    (stat.S_ISSOCK, "socket"),
)


def _security_label(fd: int) -> str | None:
    """The SELinux label of the open file ``fd`` (libvirt's ``<label>``), if it has one."""
    try:
        return os.getxattr(fd, "security.selinux").rstrip(b"\0").decode() or None
    except (OSError, AttributeError, UnicodeDecodeError):  # no label, no xattrs, not Linux
        return None


def _kind(mode: int) -> str:
    if stat.S_ISREG(mode):
        return "file"
    return next((kind for test, kind in _KIND_BY_MODE if test(mode)), "special file")


def _check_volume(mode: int) -> str:
    """The kind of a file that may be probed; SourceError for any other."""
    kind = _kind(mode)
    if kind not in ("file", "block", "directory"):
        raise SourceError(f"is a {kind}, not a volume")
    return kind


_OPEN_FLAGS = os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | getattr(os, "O_CLOEXEC", 0)
_OPEN_FLAGS_NOFOLLOW = _OPEN_FLAGS | getattr(os, "O_NOFOLLOW", 0)
#: posix_fadvise and its WILLNEED, where the platform has them (not macOS).
_FADVISE = getattr(os, "posix_fadvise", None)
_WILLNEED = getattr(os, "POSIX_FADV_WILLNEED", 0)


def _open_listed_file(path: str) -> int:
    """``path`` opened without following a link, or -1 when it has become one."""
    try:
        return os.open(path, _OPEN_FLAGS_NOFOLLOW)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.EMLINK):  # Linux, the BSDs
            return -1
        raise


class PathSource:
    """A volume named by path. Only regular files, block devices and
    directories are probed; anything else is a SourceError, found without
    blocking and without opening it where possible (opening some devices has
    effects): the type is checked before the open, which is O_NONBLOCK, and
    again on the open fd."""

    def __init__(self, path: str | os.PathLike[str], *, listed_as_file: bool = False) -> None:
        """``listed_as_file``: a directory listing just said the entry is a
        regular file, not a link. The check before the open is skipped and the
        open does not follow links, so an entry swapped for a link since the
        listing takes the careful path instead."""
        self.name = os.fspath(path)
        try:
            self._fd = _open_listed_file(self.name) if listed_as_file else -1
            if self._fd < 0:
                _check_volume(os.stat(self.name).st_mode)
                self._fd = os.open(self.name, _OPEN_FLAGS)
        except OSError as exc:
            raise SourceError(_os_reason(exc, self.name)) from None
        try:
            self.stat = os.fstat(self._fd)
            self.file_type = _check_volume(self.stat.st_mode)  # the path may have changed since
            self._label: str | None = None
            self._label_read = False
            self._size = (
                os.lseek(self._fd, 0, os.SEEK_END) if self.file_type == "block" else self.stat.st_size
            )
        except OSError as exc:
            os.close(self._fd)
            raise SourceError(_os_reason(exc, self.name)) from None
        except BaseException:
            os.close(self._fd)
            raise

    @property
    def security_label(self) -> str | None:
        """The volume's SELinux label, read from the open descriptor when first
        asked (a probe asks; a scan's fast path, which writes no label, does not)."""
        if not self._label_read:
            self._label, self._label_read = _security_label(self._fd) if self._fd >= 0 else None, True
        return self._label

    def size(self) -> int:
        return self._size

    def prefetch(self) -> None:
        """Ask the kernel to start reading what a probe reads first (the head
        and the tail), so that reads of many volumes overlap; only a hint."""
        if self.file_type == "directory" or _FADVISE is None:
            return
        try:
            _FADVISE(self._fd, 0, HEAD_SIZE, _WILLNEED)
            if self._size > HEAD_SIZE:
                tail = max(HEAD_SIZE, self._size - TAIL_SIZE)
                _FADVISE(self._fd, tail, self._size - tail, _WILLNEED)
        except OSError:
            pass  # a hint the file system does not take

    def read_at(self, offset: int, length: int) -> bytes:
        try:
            return os.pread(self._fd, length, offset)
        except OSError as exc:
            raise SourceError(_os_reason(exc, self.name)) from None

    def close(self) -> None:
        os.close(self._fd)
        self._fd = -1


class FileSource:
    """An already open binary file (read with pread where it has a descriptor)."""

    file_type = "file"

    def __init__(self, fileobj: BinaryIO, name: str | None = None) -> None:
        self._file = fileobj
        self.name = name or str(getattr(fileobj, "name", "<file>"))
        self._fd: int | None = None
        self.stat: os.stat_result | None = None
        self.security_label: str | None = None
        try:
            fd = fileobj.fileno()
            self._fd, self.stat = fd, os.fstat(fd)
        except (OSError, AttributeError, io.UnsupportedOperation):
            self._fd, self.stat = None, None
        else:
            self.security_label = _security_label(fd)
        if self.stat is not None:
            self.file_type = _kind(self.stat.st_mode)
            if self.file_type not in ("file", "block"):
                raise SourceError(f"is a {self.file_type}, not a volume")

    def size(self) -> int:
        try:
            if self._fd is not None and self.stat is not None and stat.S_ISREG(self.stat.st_mode):
                return os.fstat(self._fd).st_size
            return self._file.seek(0, io.SEEK_END)
        except (OSError, ValueError) as exc:  # unseekable, closed, or failing
            raise SourceError(f"cannot tell its size: {exc}") from None

    def read_at(self, offset: int, length: int) -> bytes:
        try:
            if self._fd is not None:
                return os.pread(self._fd, length, offset)
            self._file.seek(offset)
            return self._file.read(length) or b""  # None: a non-blocking stream with nothing to read
        except (OSError, ValueError) as exc:
            raise SourceError(f"read failed: {exc}") from None

    def close(self) -> None:
        """The caller owns the file; nothing to close."""


class BytesSource:
    """A volume held in memory (tests, fuzzing, images already read)."""

    file_type = "file"
    stat = None
    security_label = None

    def __init__(self, data: bytes, name: str = "<bytes>") -> None:
        self._data = bytes(data)
        self.name = name

    def size(self) -> int:
        return len(self._data)

    def read_at(self, offset: int, length: int) -> bytes:
        return self._data[offset : offset + length]

    def close(self) -> None:
        """Nothing to release."""


def _os_reason(exc: OSError, name: str) -> str:
    reason = exc.strerror or str(exc)
    if exc.errno is not None and exc.errno == getattr(os, "ENXIO", None):
        reason = "cannot be opened (a socket or a device with no medium)"
    return reason


class Image:
    """The bounded view of one volume that detection and callbacks read.

    ``head`` is the first :data:`HEAD_SIZE` bytes; ``header`` the bytes at the
    chosen format's header start (``header_offset``), which is ``head`` unless
    the header is a trailer. :meth:`read` gets more, within :data:`READ_BUDGET`;
    :meth:`memo` keeps what a callback parsed for the other callbacks of the probe.
    """

    __slots__ = (
        "source", "name", "file_type", "size", "head", "header", "header_offset", "_spent", "_tail", "_memo"
    )

    def __init__(self, source: ByteSource, head: bytes | None = None) -> None:
        """``head``: the source's first :data:`HEAD_SIZE` bytes (or all of a
        shorter one), when the caller has read them already."""
        self.source = source
        self.name = source.name
        self.file_type = source.file_type
        self.size = source.size() if source.file_type != "directory" else 0
        self._spent = 0
        self._tail: bytes | None = None
        self._memo: dict[Hashable, object] = {}
        if head is not None:
            self._spent = len(head)
            self.head = head
        else:
            self.head = self._fetch(0, min(HEAD_SIZE, self.size)) if self.size else b""
        self.header = self.head
        self.header_offset = 0

    def _fetch(self, offset: int, length: int) -> bytes:
        self._spent += length
        if self._spent > READ_BUDGET:
            raise ReadLimitExceeded(
                f"reading {length} bytes at offset {offset} would exceed the "
                f"{READ_BUDGET}-byte read budget of one probe"
            )
        return self.source.read_at(offset, length)

    def read(self, offset: int, length: int, *, exact: bool = True) -> bytes:
        """``length`` bytes at ``offset`` (negative: from the end of the file).

        With ``exact`` (the default) a short read raises TruncatedHeader, so a
        field that points past the end of the file is a named error.
        """
        end = offset + length
        if 0 <= offset <= end <= len(self.head):
            return self.head[offset:end]
        if offset < 0:
            offset += self.size
            end = offset + length
        if offset < 0 or length < 0:
            raise TruncatedHeader(f"read of {length} bytes at offset {offset} is outside the file")
        tail_start = max(len(self.head), self.size - TAIL_SIZE)
        if end <= len(self.head):
            data = self.head[offset:end]
        elif offset >= tail_start and end <= self.size:
            if self._tail is None:
                self._tail = self._fetch(tail_start, self.size - tail_start)
            data = self._tail[offset - tail_start : end - tail_start]
        elif exact and end > self.size:
            raise TruncatedHeader(
                f"{length} bytes at offset {offset} run past the end of the file ({self.size} bytes)"
            )
        else:
            data = self._fetch(offset, min(length, max(0, self.size - offset)))
        if exact and len(data) != length:
            raise TruncatedHeader(f"file ended while reading {length} bytes at offset {offset}")
        return data

    def at_header(self, offset: int) -> Image:
        """Point ``header`` at the structure found at ``offset`` (negative: from the end).
        Moving it forgets what :meth:`memo` kept."""
        absolute = offset + self.size if offset < 0 else offset
        if absolute != self.header_offset:
            self.header = self.read(absolute, min(HEAD_SIZE, self.size - absolute), exact=False)
            self.header_offset = absolute
            self._memo.clear()
        return self

    def memo(self, key: Hashable, compute: Callable[[Image], T]) -> T:
        """``compute(self)``, once per probe and header: a format's ``size``,
        ``backing`` and ``features`` callbacks share one parse of the header with
        ``img.memo(parse_header, parse_header)``. An error is raised again, not kept."""
        try:
            return self._memo[key]  # type: ignore[return-value]
        except KeyError:
            value = self._memo[key] = compute(self)
            return value

    def walker(self) -> TableWalker:
        """A reader for a table walked front to back, field by field (see :class:`TableWalker`)."""
        return TableWalker(self)


def sector_rounded_size(img: Image) -> int:
    """The file size in whole 512-byte sectors, rounded up: the virtual size
    QEMU's block layer gives a volume it reads as it is (the guest reads zeros
    past the end of the file). A row sized by its file uses it as ``size``."""
    return -(-img.size // SECTOR) * SECTOR


class TableWalker:
    """:meth:`Image.read` for a table read front to back in many small pieces
    (snapshot entries, directory entries): reads are served from one buffer,
    refilled at the offset asked for when a read leaves it, with twice the
    bytes each time (4 KiB up to 1 MiB) while the walk uses at least half of
    what it read; a walk that skips most bytes reads exactly what it asks. So a
    table of 65536 entries costs a few dozen reads, not one per field, and no
    walk reads more than twice what it uses plus one buffer (the read budget
    stops at what a field-by-field walk would have read, give or take that)."""

    __slots__ = ("_img", "size", "_start", "_buffer", "_chunk", "_read", "_used")
    FIRST_CHUNK, LAST_CHUNK = 4096, 1 << 20

    def __init__(self, img: Image) -> None:
        self._img, self.size = img, img.size
        self._start, self._buffer, self._chunk = 0, b"", self.FIRST_CHUNK
        self._read = self._used = 0

    def read(self, offset: int, length: int) -> bytes:
        """``length`` bytes at ``offset`` (from the start); TruncatedHeader when the file ends first."""
        if offset < 0 or offset + length > self.size:
            raise TruncatedHeader(f"{length} bytes at offset {offset} run past the end of the file ({self.size} bytes)")
        self._used += length
        start = offset - self._start
        if 0 <= start and start + length <= len(self._buffer):
            return self._buffer[start : start + length]
        ahead = 2 * self._used >= self._read
        self._buffer = self._img.read(offset, max(length, self._chunk if ahead else 0), exact=False)
        self._start, self._read = offset, self._read + len(self._buffer)
        if ahead:
            self._chunk = min(2 * self._chunk, self.LAST_CHUNK)
        if len(self._buffer) < length:  # the file shrank since it was opened
            raise TruncatedHeader(f"file ended while reading {length} bytes at offset {offset}")
        return self._buffer[:length]
