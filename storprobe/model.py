"""The result of probing one volume, and the records it holds.

The format table's rows (:mod:`storprobe.spec`) return these records from their
callbacks; this module imports nothing of the table.
"""

import os
from collections.abc import Mapping
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, NamedTuple

if TYPE_CHECKING:
    from .backing import BackingStore, RefusedName

#: The empty mapping a record holds by default (shared, so read-only).
EMPTY: Mapping[Any, Any] = MappingProxyType({})


class Backing(NamedTuple):
    """A backing store as the image records it (never resolved or opened here)."""

    name: str
    format: str | None = None  # the recorded format; None when the image does not say


class DataFile(NamedTuple):
    """A qcow2-style external data file as recorded in the image."""

    name: str | None
    raw: bool = False


class Snapshot(NamedTuple):
    """An internal snapshot, with the fields ``qemu-img info`` shows."""

    id: str
    name: str
    vm_state_size: int
    date_sec: int
    date_nsec: int
    vm_clock_nsec: int
    icount: int | None = None


class LibvirtFacts(NamedTuple):
    """How libvirt's storage driver treats a format's volumes, where it differs from
    what the bytes say; only the volume XML reads these (a row's, carried by each of its records)."""

    #: libvirt's ``<format type=...>`` for the format, when it is not the row's name.
    name: str | None = None
    #: libvirt reads no size from such a volume: its ``<capacity>`` is the file's size,
    #: even where qemu-img's virtual size is rounded to whole sectors.
    capacity_is_file_size: bool = False
    #: libvirt can create this format with a given cluster size (``vol-create`` passes
    #: ``<clusterSize>`` to ``qemu-img create -o cluster_size=``), so the volume XML carries it.
    cluster_size: bool = False


class ImageInfo(NamedTuple):
    """Everything storprobe learned about one volume from its bytes.

    ``evidence`` says why ``format`` was chosen: ``"magic"`` (signature and
    version), ``"extension"``, ``"fallback"`` (no signature matched) or
    ``"caller"`` (the format was given, not probed). ``matches`` lists every
    format whose signature the bytes carry, so polyglots are visible.
    """

    filename: str
    format: str
    virtual_size: int
    actual_size: int | None
    file_type: str = "file"
    evidence: str = "magic"
    matches: tuple[str, ...] = ()
    version: int | None = None
    cluster_size: int | None = None
    encryption: str | None = None
    dirty: bool | None = False
    compat: str | None = None
    flags: tuple[str, ...] | None = None
    backing: Backing | None = None
    data_file: DataFile | None = None
    snapshots: tuple[Snapshot, ...] = ()
    specific: Mapping[str, Any] | None = None
    details: Mapping[str, Any] = EMPTY
    stat: os.stat_result | None = None  # the volume's, when it was opened by path or file
    #: The QEMU driver that opens the volume (``qemu-img -f``); None: the format's name.
    driver: str | None = None
    #: The virtual size that driver shows, when it is not the format's own driver
    #: (QEMU reads an iso, a cow file, a LUKS2 volume as raw: the volume in whole sectors).
    driver_size: int | None = None
    #: What renderers need beyond the bytes' facts, so that they look nothing up:
    #: the row's libvirt facts; libvirt's name for the backing's recorded format
    #: (its row's, else the name as recorded); what the backing and data-file
    #: names denote (parsed as QEMU parses them, never opened), or why QEMU
    #: refuses them; the volume's SELinux label, read with its stat.
    libvirt: LibvirtFacts = LibvirtFacts()
    backing_libvirt_format: str | None = None
    backing_store: "BackingStore | RefusedName | None" = None
    data_file_store: "BackingStore | RefusedName | None" = None
    security_label: str | None = None
    #: Whether the format's header occupies the volume's first sector (its row
    #: reads a header at 0 with a signature there), the sector firmware and
    #: partition scanners read: for row hazards that judge that sector.
    header_at_start: bool = False

    @property
    def encrypted(self) -> bool:
        return self.encryption is not None

    @property
    def read_through_other_driver(self) -> bool:
        """Whether QEMU opens the volume with a driver not its format's (an iso,
        a cow file, LUKS2: raw), which shows none of the format's structures."""
        return self.driver not in (None, self.format)

    @property
    def driver_virtual_size(self) -> int:
        """The virtual size the driver QEMU opens the volume with shows."""
        return self.virtual_size if self.driver_size is None else self.driver_size
