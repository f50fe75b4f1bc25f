"""The format table's row type and what its callbacks return (the records they
carry, :class:`Backing`, :class:`DataFile`, :class:`Snapshot`, live with
:class:`~storprobe.model.ImageInfo` in :mod:`storprobe.model`).

A format is one :class:`FormatSpec`: data first (magic, version, size and crypt
fields, as offsets into the header), then at most four small callbacks for what
data cannot say. Offsets are relative to the header's start, which is one of
``header_offsets`` (negative values count from the end of the file, for formats
whose header is a trailer).
"""

from collections.abc import Callable, Hashable, Iterable, Mapping
from typing import TYPE_CHECKING, Any, Literal, NamedTuple

from .model import EMPTY, Backing, DataFile, ImageInfo, LibvirtFacts, Snapshot
from .source import HEAD_SIZE, READ_BUDGET, Image

if TYPE_CHECKING:
    from .blockmap import BlockMap, HostFile
    from .measure import Measurement, MeasureRequest
    from .verify import CheckReader, CheckResult

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


#: Widths a fixed field may have: an unsigned integer of one to eight bytes.
FIELD_WIDTHS = range(1, 9)


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
    crypt_width: int = 4
    crypt_methods: Mapping[int, str] = EMPTY  # the crypt field's values -> encryption names (0: none)
    file_types: frozenset[FileType] = frozenset({"file", "block"})
    match: Callable[[Image], bool] | None = None
    #: What the header starts with whenever ``match`` can say yes: ``match`` is
    #: then asked only about such bytes (none declared: about every volume).
    match_prefixes: tuple[bytes, ...] = ()
    size: Callable[[Image], int] | None = None
    backing: Callable[[Image], Backing | None] | None = None
    features: Callable[[Image], Features] | None = None
    hazards: Callable[[Image, ImageInfo], Iterable[Hazard]] | None = None
    #: A scan's fast path (:mod:`storprobe.plain`): given the head of a volume (its first
    #: :data:`~storprobe.source.PLAIN_HEAD` bytes, fewer in a shorter file) that carries
    #: this row's signature and no other, ``(key, virtual size)`` when the volume is the
    #: format's plainest (every check passes, nothing beyond the head to read) and its record
    #: is fixed by ``key`` with its name, virtual size and status; None for any other volume.
    #: tests/test_fast_path_gate.py holds it to the general path's output.
    plain: Callable[[bytes], tuple[Hashable, int] | None] | None = None
    #: ``storprobe verify``: the metadata walk of ``qemu-img check`` (read-only), given the
    #: image and a bounded reader of its metadata (see :mod:`storprobe.verify`). None: the
    #: format has no check here (exit 63 unless QEMU's driver has one, then "not yet").
    check: "Callable[[Image, CheckReader], CheckResult] | None" = None
    priority: int = 0
    libvirt: LibvirtFacts = LibvirtFacts()
    #: The QEMU block driver that opens this format's images (``qemu-img -f``), when it is
    #: not the row's name: ``raw`` where QEMU has no driver and reads the bytes as they are.
    qemu_driver: str | None = None
    #: Versions whose QEMU driver is another than ``qemu_driver`` (QEMU's luks opens LUKS1 only).
    qemu_version_drivers: Mapping[int, str] = EMPTY
    #: The guest-to-host map of an image of this format, for the data path (``open_image``,
    #: ``storprobe map``): built from the probed image, its record and its opened file.
    block_map: "Callable[[Image, ImageInfo, HostFile], BlockMap] | None" = None
    #: ``storprobe measure -O <this format>``: the size a new image of this format
    #: would take (``qemu-img measure``, the driver's ``bdrv_measure``), for a
    #: virtual size or a source's data (see :mod:`storprobe.measure`). None: QEMU's
    #: driver measures nothing (or it is not done here).
    measure: "Callable[[MeasureRequest], Measurement] | None" = None
    #: Byte ranges ``(offset from the header's start, length)`` the row's callbacks read in
    #: every probe, as data: a probe by rounds (an object read by ranges) fetches them all
    #: in one round as soon as the row is chosen, instead of one round per structure the
    #: callbacks find in turn. A local file ignores it. Clipped to the volume.
    reads: tuple[tuple[int, int], ...] = ()

    @property
    def libvirt_format(self) -> str:
        """The name libvirt's ``<format type=...>`` uses for this format."""
        return self.libvirt.name or self.name

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


def row_problems(spec: FormatSpec) -> list[str]:
    """Why ``spec`` cannot work as a row (empty when it can): a field no probe
    could read, or a column that needs another one. The table refuses such a row
    when it is built, so a plugin's mistake shows at load, not in every probe."""
    problems: list[str] = []
    magics = spec.magics
    if not spec.name or not isinstance(spec.name, str):
        problems.append("name must be a non-empty string")
    if spec.magic is not None and (not magics or not all(isinstance(m, bytes) and m for m in magics)):
        problems.append("magic must be non-empty bytes, or a non-empty tuple of them")
    if spec.endian not in ("<", ">"):
        problems.append(f"endian must be '<' or '>', not {spec.endian!r}")
    if not spec.header_offsets:
        problems.append("header_offsets must name at least one offset")
    if not spec.file_types or not spec.file_types <= {"file", "block", "directory"}:
        problems.append(f"file_types {sorted(spec.file_types)} must be some of file, block, directory")
    if spec.magic_offset < 0:
        problems.append(f"magic_offset {spec.magic_offset} is negative (header_offsets count from the end)")
    elif magics:
        problems += _beyond_header(spec, "magic", spec.magic_offset, max(map(len, magics)))
    if spec.versions and spec.version_offset is None:
        problems.append("versions without a version_offset are never read")
    if spec.crypt_methods and spec.crypt_offset is None:
        problems.append("crypt_methods without a crypt_offset are never read")
    if spec.match_prefixes and spec.match is None:
        problems.append("match_prefixes gate a match callback, and there is none")
    if any(length < 1 or length > READ_BUDGET for _, length in spec.reads):
        problems.append(f"reads {list(spec.reads)} must each be 1 to {READ_BUDGET} bytes long")
    if spec.size_multiplier < 1:
        problems.append(f"size_multiplier {spec.size_multiplier} must be at least 1")
    for field, needs in (("version", "versions"), ("size", None), ("crypt", "crypt_methods")):
        offset, width = getattr(spec, f"{field}_offset"), getattr(spec, f"{field}_width")
        if offset is None:
            continue
        if needs and not getattr(spec, needs):
            problems.append(f"{field}_offset {offset} with no {needs}: every value would be refused")
        if width not in FIELD_WIDTHS:
            problems.append(f"{field}_width {width} is not 1..8 bytes")
        elif offset < 0:
            problems.append(f"{field}_offset {offset} is negative (header_offsets count from the end)")
        else:
            problems += _beyond_header(spec, f"{field} field", offset, width)
    if spec.crypt_methods and 0 in spec.crypt_methods:
        problems.append("crypt_methods maps 0, which means no encryption")
    unknown = sorted(set(spec.qemu_version_drivers) - set(spec.versions))
    if unknown:
        problems.append(f"qemu_version_drivers names versions {unknown} not in versions")
    return problems


def _beyond_header(spec: FormatSpec, what: str, offset: int, width: int) -> list[str]:
    """A field at ``offset`` of ``width`` bytes that no header buffer holds: past
    :data:`~storprobe.source.HEAD_SIZE`, or past the end of the file for a trailer."""
    room = min((-start if start < 0 else HEAD_SIZE for start in spec.header_offsets), default=HEAD_SIZE)
    if offset + width > room:
        return [f"{what} at {offset} ({width} bytes) lies beyond the {room} bytes a header is read with"]
    return []
