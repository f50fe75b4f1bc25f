"""The read-only data path: a guest disk read through its backing chain.

:func:`open_image` opens an image and the backing files its policy allows,
each through its format row's ``block_map`` (:mod:`storprobe.blockmap`), and
returns a :class:`GuestDisk`: a seekable, read-only :class:`io.RawIOBase` of
the guest's bytes. :meth:`GuestDisk.block_status` says, range by range, what
``qemu-img map`` says: which image of the chain holds it (``depth``), whether
it is data, zeros, or unallocated through the whole chain, where it lies in
that image's file, and whether it is compressed.

Backing files are refused unless the caller says otherwise
(:class:`BackingPolicy`): an untrusted image must not choose which files are
read. The walk keeps the rules of :mod:`storprobe.chain` (a recorded local
name only, never a network or protocol name; loops, also through symlinks,
and depth are named errors) and, with a directory, those of
:mod:`storprobe.safety` (a regular file inside it, no symlink leading out).
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable, Iterator
from typing import NamedTuple

from .backing import BackingNameError, parse_backing_name
from .blockmap import (
    DEFAULT_CACHE_BYTES,
    BackingRule,
    BlockMap,
    DataPathError,
    Extent,
    HostFile,
    ReadsInto,
    ReadsNoBacking,
    TableCache,
)
from .chain import DEFAULT_MAX_DEPTH, backing_store
from .detect import probe
from .errors import (
    BackingError,
    BackingFormatNotSpecified,
    BackingLoop,
    BackingMissing,
    ChainTooDeep,
    ProbeError,
    SourceError,
)
from .model import ImageInfo
from .registry import FormatTable, format_table
from .safety import BACKING, DEFAULT_MAX_VIRTUAL_SIZE, Kind, Placed, Root, _place
from .sizes import size_text
from .source import Image


class BackingPolicy(NamedTuple):
    """Which backing files :func:`open_image` reads.

    :data:`REFUSE` (the default): an image that names one is refused (unless
    its block map reads none of it, :class:`~storprobe.blockmap.ReadsNoBacking`:
    a differencing VHD, read as QEMU reads it).
    :data:`IGNORE`: the image is read alone; what its backing would hold reads
    as zeros (``qemu-img``'s ``backing: null``), and no other file is opened.
    :data:`ALONE`: as IGNORE, but the files the image names for its own data (a
    VMDK descriptor's extents) are opened as LOCAL opens them, as ``qemu-img``
    opens them with ``backing: null`` (``storprobe map --no-backing``).
    :data:`LOCAL`: any recorded local file, as ``qemu-img`` opens it (for images
    you trust). :func:`backing_inside`: only regular files inside a directory.
    """

    follow: bool = False
    inside: str | None = None  # with follow: the directory every backing file must lie in
    ignore: bool = False


REFUSE = BackingPolicy()
IGNORE = BackingPolicy(ignore=True)
LOCAL = BackingPolicy(follow=True)
ALONE = BackingPolicy(follow=True, ignore=True)


def backing_inside(directory: str | os.PathLike[str]) -> BackingPolicy:
    """Follow backing files only when they are regular files inside ``directory``."""
    return BackingPolicy(follow=True, inside=os.path.abspath(directory))


class BackingRefused(BackingError):
    """The image names a backing file its policy does not let the data path read."""

    code = "backing.refused"


class TooLarge(DataPathError):
    """An image of the chain is larger than the data path's bound on virtual
    size (``max_size``, ``--max-size``): its tables are never walked."""

    code = "datapath.too-large"


def check_size(info: ImageInfo, max_size: int, *, backing: bool = False) -> None:
    """Raise :class:`TooLarge` when ``info``'s virtual size exceeds ``max_size``:
    what bounds the extents a walk of the image can meet (at most its size
    over its cluster size) before any table is read."""
    if info.virtual_size > max_size:
        which = f"backing file {info.filename}: " if backing else ""
        raise TooLarge(f"{which}virtual size {size_text(info.virtual_size)} exceeds the bound of "
                       f"{size_text(max_size)} on what the data path reads (max_size, --max-size)")


class Layer(NamedTuple):
    """One image of an opened chain: its record, its file and its block map."""

    info: ImageInfo
    host: HostFile
    map: BlockMap

    @property
    def size(self) -> int:
        return self.info.virtual_size


class Status(NamedTuple):
    """A range of the guest disk as ``qemu-img map`` reports it.

    ``depth``: the image of the chain that decides it (0 the top); ``present``:
    some image holds it (else it reads as zeros for lack of any); ``offset``
    and ``filename``: where it lies in that image's file, when known.
    """

    start: int
    length: int
    depth: int
    present: bool
    zero: bool
    data: bool
    offset: int | None
    compressed: bool
    filename: str


def open_layers(
    path: str | os.PathLike[str],
    format: str | None = None,
    *,
    backing: BackingPolicy = REFUSE,
    max_depth: int = DEFAULT_MAX_DEPTH,
    max_size: int = DEFAULT_MAX_VIRTUAL_SIZE,
    cache: TableCache | None = None,
    table: FormatTable | None = None,
) -> list[Layer]:
    """The images of ``path``'s chain that ``backing`` lets the data path read,
    top first, each opened and mapped; a named error for anything refused (an
    image larger than ``max_size`` among them, before its map is made)."""
    table = table or format_table()
    cache = cache or TableCache()
    layers: list[Layer] = []
    try:
        host = HostFile(os.fspath(path), cache)
        seen: set[tuple[int, int]] = set()
        recorded, probed_format = format, False
        while True:
            host.named_opener = named_opener(host.name, backing, cache)
            try:
                layer = _open_layer(host, recorded, table, max_size, below=bool(layers))
            except (BackingError, TooLarge):
                raise
            except ProbeError as exc:
                if not layers:
                    raise
                raise BackingError(f"backing file {host.name}: {exc}", code=f"backing.{exc.code}") from None
            layers.append(layer)
            assert host.stat is not None
            identity = (host.stat.st_dev, host.stat.st_ino)
            if identity in seen:
                raise BackingLoop(f"backing file {host.name} is already in the chain")
            seen.add(identity)
            info = layer.info
            if info.backing is None or backing.ignore or isinstance(layer.map, ReadsNoBacking):
                return layers
            if not backing.follow:
                raise BackingRefused(
                    f"{info.filename} has a backing file ({info.backing.name}), which the policy refuses "
                    "(follow backing files only for images you trust, or inside a directory you name)"
                )
            if probed_format:
                raise BackingFormatNotSpecified(
                    f"format of {info.filename} was probed, not recorded by its parent, and it has a "
                    f"backing file ({info.backing.name}): not followed"
                )
            if len(layers) > max_depth:
                raise ChainTooDeep(f"backing chain is deeper than {max_depth} images")
            host = _open_backing(info, backing, cache)
            recorded = info.backing.format
            probed_format = recorded is None
    except BaseException:
        for opened in layers:
            opened.host.close()
        raise


def _open_layer(host: HostFile, format: str | None, table: FormatTable, max_size: int, *, below: bool) -> Layer:
    try:
        info = probe(host, format=format, table=table)
        check_size(info, max_size, backing=below)
        spec = table[info.format]
        if info.encrypted:
            raise DataPathError(f"{info.filename} is encrypted ({info.encryption}): its data is not read",
                                code="datapath.encrypted")
        if info.data_file is not None:
            raise DataPathError(f"{info.filename} keeps its data in an external data file: not read",
                                code="datapath.data-file")
        if spec.block_map is None:
            raise DataPathError(f"the data path does not read {info.format} images yet",
                                code="datapath.unsupported-format")
        make = spec.block_map
        return Layer(info, host, _guarded_map(spec.name, lambda: make(Image(host), info, host)))
    except BaseException:
        host.close()
        raise


def _guarded_map(format: str, make: Callable[[], BlockMap]) -> BlockMap:
    """A row's block map; a defect in the plugin becomes a named error."""
    try:
        return make()
    except ProbeError:
        raise
    except Exception as exc:
        raise ProbeError(f"{format} plugin's block_map callback failed: {type(exc).__name__}: {exc}",
                         code="plugin-error") from exc


def _open_backing(info: ImageInfo, policy: BackingPolicy, cache: TableCache) -> HostFile:
    """The backing file ``info`` names, opened when the policy allows it."""
    assert info.backing is not None
    store = backing_store(info)  # BackingNameError for a name QEMU refuses
    if store is None or not store.is_file:
        reach = "no file" if store is None else f"{store.reach} over {store.protocol}"
        raise BackingRefused(f"backing {info.backing.name!r} of {info.filename} is {reach}: only local files are read",
                             code="backing.not-local")
    assert store.path is not None
    if store.relative_to_working_directory:
        raise BackingRefused(
            f"backing file {store.path} of {info.filename} ({info.backing.name}) is relative to the working "
            "directory of the process that opens it, not to the image: not followed",
            code="backing.relative",
        )
    return _open_local(BACKING, info.backing.name, store.path, info.filename, policy, cache)


class NamedFileRefused(DataPathError):
    """An image names a file for its own data (a VMDK extent) that its policy does not let the data path read."""

    code = "datapath.named-file-refused"


class NamedFileMissing(DataPathError):
    """A file an image names for its own data cannot be opened."""

    code = "datapath.named-file-missing"


def named_opener(image: str, policy: BackingPolicy, cache: TableCache) -> Callable[[str], HostFile] | None:
    """How the image at ``image`` opens the files it names for its own data (a
    VMDK descriptor's extents): under the rules its backing files are opened by
    (a local name QEMU resolves against the image's directory; inside the
    policy's directory when it has one); None (refused) unless the policy
    follows files."""
    if not policy.follow:
        return None

    def open_named(name: str) -> HostFile:
        try:
            store = parse_backing_name(name, image)
        except BackingNameError as exc:
            raise NamedFileRefused(f"{image} names {name!r}, which QEMU refuses: {exc.reason}") from None
        if not store.is_file or store.path is None:
            raise NamedFileRefused(f"{image} names {name!r}, {store.reach} over {store.protocol}: only local files "
                                   "are read", code="datapath.named-file-not-local")
        if store.relative_to_working_directory:
            raise NamedFileRefused(f"{image} names {name!r}, relative to the working directory, not to the image: "
                                   "not read", code="datapath.named-file-relative")
        return _open_local(NAMED_FILE, name, store.path, image, policy, cache)

    return open_named


#: What the data path calls a file an image names for its own data, in refusals.
NAMED_FILE = Kind("named-file", "named-file", "the file")


def _open_local(kind: Kind, name: str, path: str, image: str, policy: BackingPolicy, cache: TableCache) -> HostFile:
    """The local file ``path`` (``name`` as ``image`` records it), opened as
    QEMU would, or with a directory in ``policy``, only when it is a regular
    file inside it reached by no symlink leading out (safety's rules)."""
    refused, missing, prefix, label = (
        (BackingRefused, BackingMissing, "backing", "backing file") if kind is BACKING
        else (NamedFileRefused, NamedFileMissing, "datapath", "file")
    )
    if policy.inside is None:
        try:
            return HostFile(path, cache)
        except SourceError as exc:
            raise missing(f"{label} {path} of {image}: {exc}") from None
    roots = (Root(policy.inside, os.path.realpath(policy.inside)),)
    placed = _place(kind, name, os.path.realpath(image), roots, frozenset(), image)
    if not isinstance(placed, Placed):
        reason = placed.message if placed is not None else "not a local file"
        raise refused(f"{reason} ({label}s are read only inside {policy.inside})",
                      code=f"{prefix}.{placed.check}" if placed is not None else f"{prefix}.not-local")
    try:
        host = HostFile(placed.path, cache, nofollow=True)
    except SourceError as exc:
        raise missing(f"{label} {placed.path} of {image}: {exc}") from None
    assert host.stat is not None
    if (host.stat.st_dev, host.stat.st_ino) != (placed.stat.st_dev, placed.stat.st_ino):
        host.close()
        raise refused(f"{label} {placed.path} was replaced while it was opened",
                      code=f"{prefix}.{kind.prefix}-symlink")
    return host


def statuses(layers: list[Layer], start: int, end: int, depth: int = 0) -> Iterator[Status]:
    """What ``qemu-img map`` learns of ``[start, end)``, range by range (not
    merged): the first image of the chain from ``depth`` down that holds each
    range, and zeros where none does or where a backing file has ended."""
    layer = layers[depth]
    for extent in _checked(layer, start, end, want_zero=True):
        if extent.allocated:
            yield Status(extent.start, extent.length, depth, True, extent.zero, extent.data, extent.host_offset,
                         extent.compressed, extent.file or layer.info.filename)
            continue
        at, stop = extent.start, extent.end
        if depth + 1 < len(layers):
            below = min(stop, layers[depth + 1].size)
            if at < below:
                yield from statuses(layers, at, below, depth + 1)
                at = below
        if at < stop:
            offset = None if extent.host_offset is None else extent.host_offset + at - extent.start
            yield Status(at, stop - at, depth, False, True, False, offset, False, layer.info.filename)


def _checked(layer: Layer, start: int, end: int, *, want_zero: bool) -> Iterator[Extent]:
    """``layer``'s extents of ``[start, end)``, checked to cover it in order, so
    that a faulty map can neither loop nor skip (a named error instead)."""
    at = start
    for extent in layer.map.extents(start, end - start, want_zero=want_zero):
        if extent.start != at or extent.length <= 0 or extent.end > end:
            raise ProbeError(
                f"{layer.info.format} block map gave extent {extent.start}+{extent.length} where {at} was next",
                code="plugin-error",
            )
        at = extent.end
        yield extent
    if at != end:
        raise ProbeError(f"{layer.info.format} block map stopped at {at} before {end}", code="plugin-error")


class GuestDisk(io.RawIOBase):
    """The guest disk of an opened chain: seekable and read-only. Reads past
    the end return nothing; the bytes come from the first image of the chain
    that holds them, zeros where none does."""

    def __init__(self, layers: list[Layer]) -> None:
        super().__init__()
        self.layers = layers
        self.size = layers[0].size
        self.name = layers[0].info.filename
        self._position = 0
        #: Each layer's map, where it reads data straight into a buffer (no copy of each read).
        self._reads_into = [layer.map if isinstance(layer.map, ReadsInto) else None for layer in layers]

    @property
    def info(self) -> ImageInfo:
        """The top image's record."""
        return self.layers[0].info

    def _check_open(self) -> None:
        if self.closed:
            raise ValueError("I/O operation on closed guest disk")

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        self._check_open()
        return self._position

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        self._check_open()
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._position, io.SEEK_END: self.size}.get(whence)
        if base is None:
            raise ValueError(f"invalid whence {whence}")
        if base + offset < 0:
            raise ValueError(f"negative seek position {base + offset}")
        self._position = base + offset
        return self._position

    def readinto(self, buffer: memoryview | bytearray) -> int:  # type: ignore[override]
        self._check_open()
        view = memoryview(buffer).cast("B")
        count = max(0, min(len(view), self.size - self._position))
        if count:
            self._fill(view[:count], self._position, 0)
            self._position += count
        return count

    def write(self, data: object) -> int:
        raise io.UnsupportedOperation("the guest disk is read-only")

    def pread(self, offset: int, length: int) -> bytes:
        """``length`` bytes at ``offset`` (fewer at the end of the disk), the position unchanged."""
        self._check_open()
        out = bytearray(max(0, min(length, self.size - offset)))
        if out:
            self._fill(memoryview(out), offset, 0)
        return bytes(out)

    def _fill(self, out: memoryview, start: int, depth: int) -> None:
        """``out`` (zeros on entry unless it is a fresh buffer) filled with the
        guest bytes at ``start`` as image ``depth`` and those below it hold them."""
        layer = self.layers[depth]
        for extent in _checked(layer, start, start + len(out), want_zero=False):
            piece = out[extent.start - start : extent.end - start]
            if extent.data and not extent.zero:
                reader = self._reads_into[depth]
                if reader is not None:
                    reader.read_into(extent, extent.start, piece)
                    continue
                data = layer.map.read(extent, extent.start, extent.length)
                if len(data) != extent.length:
                    raise ProbeError(f"{layer.info.format} block map read {len(data)} bytes, not {extent.length}",
                                     code="plugin-error")
                piece[:] = data
                continue
            below = 0
            if not extent.allocated and depth + 1 < len(self.layers):
                below = max(0, min(extent.end, self.layers[depth + 1].size) - extent.start)
                if below:
                    if isinstance(layer.map, BackingRule):
                        layer.map.check_backing(self.layers[depth + 1].info)
                    self._fill(piece[:below], extent.start, depth + 1)
            piece[below:] = bytes(len(piece) - below)

    def block_status(self, start: int = 0, length: int | None = None) -> Iterator[Status]:
        """:func:`statuses` of ``[start, start + length)`` (default: to the end of the disk)."""
        end = self.size if length is None else min(self.size, start + length)
        return statuses(self.layers, start, end) if start < end else iter(())

    def close(self) -> None:
        if not self.closed:
            for layer in self.layers:
                layer.host.close()
        super().close()


def open_image(
    path: str | os.PathLike[str],
    format: str | None = None,
    *,
    backing: BackingPolicy | str | os.PathLike[str] = REFUSE,
    max_depth: int = DEFAULT_MAX_DEPTH,
    max_size: int = DEFAULT_MAX_VIRTUAL_SIZE,
    cache_bytes: int = DEFAULT_CACHE_BYTES,
    table: FormatTable | None = None,
) -> GuestDisk:
    """The guest disk of the image at ``path`` (``format``: trust it instead of
    probing), read-only, through the backing files ``backing`` allows (a
    directory given as a path means :func:`backing_inside` it); tables are
    cached in at most ``cache_bytes``. An image of the chain whose virtual size
    exceeds ``max_size`` (default 64 TiB, ``check``'s bound) is refused
    (``datapath.too-large``). Raises a named
    :class:`~storprobe.errors.ProbeError` for anything it will not read."""
    policy = backing if isinstance(backing, BackingPolicy) else backing_inside(backing)
    cache = TableCache(cache_bytes)
    return GuestDisk(open_layers(path, format, backing=policy, max_depth=max_depth, max_size=max_size, cache=cache,
                                 table=table))
