"""What a guest disk holds: its partition table, and what starts each partition
(or the whole disk): a filesystem, swap, LVM or LUKS, by type, label and UUID;
or nothing at all ("empty": an uploaded image with no OS in it).

Reads go through a readable, seekable binary file of the guest disk (what
:func:`storprobe.open_image` returns, or a raw file), a bounded number of small
reads per partition; whatever is malformed (a table past the disk's end,
overlapping partitions, a looping chain of logical partitions, a superblock
asking for too much) is a :class:`~storprobe.partitions.Problem` in the report,
never an exception. Only a failing read of the disk raises (:class:`GuestReadError`).
"""

from __future__ import annotations

import io
import os
from typing import TYPE_CHECKING, BinaryIO, NamedTuple

from .errors import ProbeError
from .guestfs import Content, GuestReadLimit, Region, identify
from .partitions import Partition, PartitionTable, Problem, read_partition_table

if TYPE_CHECKING:
    from .datapath import BackingPolicy, GuestDisk

#: Bytes at the start of a disk with no table that must be zero (with nothing
#: identified there) for it to be called empty when the allocation is not known.
EMPTY_HEAD = 1 << 20
#: Boot sectors whose 0x55AA is a filesystem's, not a partition table's (libblkid's rule).
_WHOLE_DISK_BOOT_SECTORS = frozenset({"vfat", "exfat", "ntfs"})


class GuestReadError(ProbeError):
    """The guest disk could not be read (an I/O error, a data-path error)."""

    code = "guest.read"


class PartitionContent(NamedTuple):
    """A partition and what starts it (None: nothing storprobe knows)."""

    partition: Partition
    content: Content | None


class GuestReport(NamedTuple):
    """What the guest disk holds. ``content`` is what starts the whole disk
    (a filesystem on an unpartitioned disk, an isohybrid ISO beside its MBR);
    ``empty`` says the disk holds no data: nothing allocated, when the caller
    knows the allocation, else no table, nothing identified and an all-zero
    first MiB."""

    size: int
    empty: bool
    table: PartitionTable | None
    content: Content | None
    partitions: tuple[PartitionContent, ...]
    problems: tuple[Problem, ...]


def inspect_guest(disk: BinaryIO | io.RawIOBase, size: int, *, allocated: bool | None = None) -> GuestReport:
    """Inspect the guest disk ``disk`` of ``size`` bytes. ``allocated``: whether
    any of it holds data (from the data path's block status), None when unknown."""
    read = _Read(disk, size)
    problems: list[Problem] = []
    whole, problem = _identify(read, 0, size)
    problems += problem
    boot_sector_fs = whole is not None and whole.type in _WHOLE_DISK_BOOT_SECTORS
    table = read_partition_table(read, size, whole_disk_filesystem=boot_sector_fs)
    if table is not None and whole is not None and whole.type == "LVM2_member" and not table.partitions:
        table = None  # an empty MBR on an LVM physical volume (libblkid's rule)
    partitions = []
    if table is not None:
        problems += table.problems
        for part in table.partitions:
            content = None
            if part.start < size and not part.extended:  # an extended partition starts with the chain's first EBR
                content, problem = _identify(read, part.start, min(part.size, size - part.start))
                problems += problem
            partitions.append(PartitionContent(part, content))
    if allocated is not None:
        empty = not allocated
    else:
        empty = table is None and whole is None and not any(read(0, min(size, EMPTY_HEAD)))
    return GuestReport(size, empty, table, whole, tuple(partitions), tuple(problems))


def inspect_image(
    path: str | os.PathLike[str], format: str | None = None, *, backing: BackingPolicy | None = None
) -> GuestReport:
    """Inspect the guest disk of the image at ``path`` through the data path
    (:func:`storprobe.open_image`; ``backing``: its policy, by default the
    recorded local chain as ``qemu-img`` follows it). The disk is empty when
    its block status shows data nowhere."""
    from .datapath import LOCAL, open_image

    with open_image(path, format, backing=LOCAL if backing is None else backing) as disk:
        return inspect_disk(disk)


def inspect_disk(disk: GuestDisk) -> GuestReport:
    """Inspect an opened guest disk, its allocation read from its block status."""
    allocated = any(status.data for status in disk.block_status())
    return inspect_guest(disk, disk.size, allocated=allocated)


def _identify(read: _Read, start: int, size: int) -> tuple[Content | None, list[Problem]]:
    try:
        return identify(Region(read, start, size)), []
    except GuestReadLimit as exc:
        return None, [Problem(exc.code, exc.reason)]


class _Read:
    """Reads of the guest disk: ``length`` bytes at ``offset``, fewer at its end."""

    def __init__(self, disk: BinaryIO | io.RawIOBase, size: int) -> None:
        self.disk, self.size = disk, size

    def __call__(self, offset: int, length: int) -> bytes:
        length = max(0, min(length, self.size - offset))
        if length == 0 or offset < 0:
            return b""
        chunks = []
        try:
            self.disk.seek(offset)
            while length:
                chunk = self.disk.read(length)
                if not chunk:
                    break
                chunks.append(chunk)
                length -= len(chunk)
        except OSError as exc:
            raise GuestReadError(f"cannot read the guest disk at byte {offset}: {exc.strerror or exc}") from None
        return b"".join(chunks)
