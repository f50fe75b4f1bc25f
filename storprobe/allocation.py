"""What each image of a chain holds itself: ``info --allocated``.

An image is read alone, its backing file ignored, as ``qemu-img map`` reads
``json:{"driver": ..., "backing": null, ...}``: through its format row's block
map (:mod:`storprobe.datapath`), so the walk is bounded as ``storprobe map``'s
is. Its ranges are summed by what the image decides about them: guest data it
holds, or zeros it records. What it leaves to its backing file is neither.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import NamedTuple

from .datapath import ALONE, open_image
from .errors import ProbeError, SourceError
from .model import ImageInfo
from .registry import FormatTable


class Allocation(NamedTuple):
    """The guest bytes one image decides, from its own block map.

    ``data``: bytes it holds as guest data (``qemu-img map``: present, data).
    ``zero``: bytes it records as zeros (present, zero, no data): zero clusters,
    and in a format without backing files (raw, VDI) every range it reads as
    zeros, a hole or an unallocated block. The rest of the virtual size is
    left to a backing file.
    """

    data: int
    zero: int


def allocation(path: str | os.PathLike[str], format: str | None = None, *,
               table: FormatTable | None = None, probed: os.stat_result | None = None) -> Allocation:
    """What the image at ``path`` (``format``: trusted, not probed) holds
    itself; a named :class:`~storprobe.errors.ProbeError` when its data path
    cannot say (a format without a block map, an encrypted image, a table the
    format's rules refuse). ``probed``: the file's stat when it was probed
    before; another file found at ``path`` now is a SourceError."""
    data = zero = 0
    with open_image(path, format, backing=ALONE, table=table) as disk:
        now = disk.info.stat
        if probed is not None and now is not None and (now.st_dev, now.st_ino) != (probed.st_dev, probed.st_ino):
            raise SourceError(f"{os.fspath(path)} is another file than the one probed (replaced since)")
        for status in disk.block_status():
            if status.present and status.data:
                data += status.length
            elif status.present and status.zero:
                zero += status.length
    return Allocation(data, zero)


def chain_allocations(images: Sequence[ImageInfo], format: str | None = None, *,
                      table: FormatTable | None = None) -> list[Allocation | ProbeError]:
    """The :func:`allocation` of each image of a probed chain, top first, each
    opened as the chain was (the top as ``format``, every other as the format
    its parent records, probed when none); the named error of an image that
    cannot say stands in its place, and the others are still read."""
    formats = [format, *(image.backing.format if image.backing else None for image in images[:-1])]
    results: list[Allocation | ProbeError] = []
    for image, recorded in zip(images, formats, strict=True):
        try:
            results.append(allocation(image.filename, recorded, table=table, probed=image.stat))
        except ProbeError as exc:
            results.append(exc)
    return results
