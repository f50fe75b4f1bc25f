"""The format table's row type and what its callbacks return (the records they
carry, :class:`Backing`, :class:`DataFile`, :class:`Snapshot`, live with
:class:`~storprobe.model.ImageInfo` in :mod:`storprobe.model`).

A format is one :class:`FormatSpec`: data first (magic, version, size and crypt
fields, as offsets into the header), then at most four small callbacks for what
data cannot say. Offsets are relative to the header's start, which is one of
``header_offsets`` (negative values count from the end of the file, for formats
whose header is a trailer).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any, Literal, NamedTuple

from .model import EMPTY, Backing, DataFile, ImageInfo, Snapshot

if TYPE_CHECKING:
    from .source import Image

FileType = Literal["file", "block", "directory"]
#: The largest virtual size qemu-img can report (its sizes are signed 64-bit).
INT64_MAX = 2**63 - 1
#: QEMU's block-layer limit on a disk's length (BDRV_MAX_LENGTH: INT64_MAX rounded down to 1 GiB).
QEMU_MAX_LENGTH = INT64_MAX // 2**30 * 2**30


class Features(NamedTuple):
    """What a format's ``features`` callback found beyond the row's plain fields.

    ``specific`` is the ``data`` of qemu-img's ``format-specific`` object, with
    qemu-img's key names; ``details`` holds storprobe's own extra facts.
    ``flags`` are libvirt's ``<features>`` children; ``None`` means the format
    has no feature set (no ``<features>`` element), ``()`` an empty one.
    """

    cluster_size: int | None = None
    encryption: str | None = None
    dirty: bool | None = False  # None: the format keeps no dirty state qemu-img reports
    compat: str | None = None
    flags: tuple[str, ...] | None = None
    snapshots: tuple[Snapshot, ...] = ()
    data_file: DataFile | None = None
    specific: Mapping[str, Any] | None = None
    details: Mapping[str, Any] = EMPTY


class Hazard(NamedTuple):
    """A reason an image is not safe to hand to a hypervisor as it is."""

    check: str  # a stable name: "backing-file", "polyglot", "qcow2.unknown-feature" ...
    message: str


class FormatSpec(NamedTuple):
    """One row of the format table.

    ``hazards`` is called by ``storprobe check`` for every probed image, of this
    format or another: a row flags what its own structures reveal, in its own
    images (unknown feature bits, foreign extents) or embedded in another
    format's bytes (a partition table inside a qcow2 header).
    """

    name: str
    description: str = ""
    magic: bytes | tuple[bytes, ...] | None = None  # a tuple: alternatives with one layout
    magic_offset: int = 0
    header_offsets: tuple[int, ...] = (0,)
    extension: str | None = None
    endian: Literal["<", ">"] = "<"
    version_offset: int | None = None
    version_width: int = 4
    versions: tuple[int, ...] = ()
    size_offset: int | None = None
    size_width: int = 8
    size_multiplier: int = 1
    crypt_offset: int | None = None
    crypt_methods: Mapping[int, str] = EMPTY
    file_types: frozenset[FileType] = frozenset({"file", "block"})
    match: Callable[[Image], bool] | None = None
    #: What the header starts with whenever ``match`` can say yes: ``match`` is
    #: then asked only about such bytes (none declared: about every volume).
    match_prefixes: tuple[bytes, ...] = ()
    size: Callable[[Image], int] | None = None
    backing: Callable[[Image], Backing | None] | None = None
    features: Callable[[Image], Features] | None = None
    hazards: Callable[[Image, ImageInfo], Iterable[Hazard]] | None = None
    priority: int = 0
    libvirt_name: str | None = None
    #: libvirt reads no size from such a volume: its ``<capacity>`` is the file's size,
    #: even where qemu-img's virtual size is rounded to whole sectors.
    libvirt_capacity_is_file_size: bool = False
    #: libvirt can create this format with a given cluster size (``vol-create`` passes
    #: ``<clusterSize>`` to ``qemu-img create -o cluster_size=``), so the volume XML carries it.
    libvirt_cluster_size: bool = False
    #: The QEMU block driver that opens this format's images (``qemu-img -f``), when it is
    #: not the row's name: ``raw`` where QEMU has no driver and reads the bytes as they are.
    qemu_driver: str | None = None
    #: Versions whose QEMU driver is another than ``qemu_driver`` (QEMU's luks opens LUKS1 only).
    qemu_version_drivers: Mapping[int, str] = EMPTY

    @property
    def libvirt_format(self) -> str:
        """The name libvirt's ``<format type=...>`` uses for this format."""
        return self.libvirt_name or self.name

    def driver(self, version: int | None) -> str:
        """The QEMU driver that opens an image of this format and ``version``."""
        default = self.qemu_driver or self.name
        return default if version is None else self.qemu_version_drivers.get(version, default)

    @property
    def magics(self) -> tuple[bytes, ...]:
        """The row's magic values (none, one, or alternatives sharing one layout)."""
        if self.magic is None:
            return ()
        return self.magic if isinstance(self.magic, tuple) else (self.magic,)

    @property
    def catch_all(self) -> bool:
        """A row with no signature at all matches anything of its file types."""
        return self.magic is None and self.match is None and self.extension is None

    def sort_key(self) -> tuple:
        """Detection order: headers at the start, deeper headers, trailers,
        extension-only rows, catch-alls; then ``priority``, then name."""
        if self.catch_all:
            rank = 4
        elif self.magic is None and self.match is None:
            rank = 3
        elif min(self.header_offsets) < 0:
            rank = 2
        elif self.magic_offset + max(self.header_offsets) > 0:
            rank = 1
        else:
            rank = 0
        return (rank, self.priority, self.name)
