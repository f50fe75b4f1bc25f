"""Backing chains, walked top-down from each image's own bytes.

Local backing files are probed as the format their child records; a format
that is not recorded is probed, but a probed image that has a backing file
itself stops the walk (libvirt's rule) unless the caller allows probing.
A backing that is no local file (a network server, a host device or directory,
a debug driver, null: ``BackingStore.reach``) ends the walk, reported, never
opened. Loops (by device and inode, so symlinks cannot hide one) and chains
deeper than ``max_depth`` are named errors; whatever went wrong, the images
above the failure are returned.
"""

from __future__ import annotations

import os

from .backing import BackingStore, RefusedName
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

#: Backing images followed below the top one before the walk gives up
#: (libvirt refuses chains deeper than 200 layers).
DEFAULT_MAX_DEPTH = 200


class Chain:
    """The images of a chain, top first, with what each one's backing name
    denotes; ``error`` says why the walk stopped before the end, if it did."""

    __slots__ = ("images", "stores", "error")

    def __init__(
        self, images: list[ImageInfo], stores: list[BackingStore | None], error: BackingError | None = None
    ) -> None:
        self.images, self.stores, self.error = images, stores, error

    @property
    def top(self) -> ImageInfo:
        return self.images[0]


def backing_store(info: ImageInfo) -> BackingStore | None:
    """What ``info``'s recorded backing name denotes, resolved against its directory
    (parsed when it was probed); raises BackingNameError when QEMU refuses the name."""
    if isinstance(info.backing_store, RefusedName):
        raise info.backing_store.error()
    return info.backing_store


def probe_chain(
    path: str | os.PathLike[str],
    *,
    format: str | None = None,
    allow_probe: bool = False,
    max_depth: int = DEFAULT_MAX_DEPTH,
    table: FormatTable | None = None,
) -> Chain:
    """Probe ``path`` and every local image below it.

    Errors on the top image raise, as :func:`storprobe.probe` does; errors
    further down are returned in :attr:`Chain.error` with the images above.
    """
    table = table or format_table()
    top = probe(path, format=format, table=table)
    chain = Chain([top], [])
    seen = {_identity(top)}
    info, probed = top, False  # the caller chose the top image; the rule is about backing files
    while True:
        try:
            store = backing_store(info)
        except BackingError as exc:
            chain.stores.append(None)
            chain.error = exc
            return chain
        chain.stores.append(store)
        if store is None or not store.is_file:
            return chain
        assert store.path is not None and info.backing is not None
        if store.relative_to_working_directory:
            chain.error = BackingError(
                f"backing file {store.path} of {info.filename} ({info.backing.name}) is relative to the working "
                "directory of the process that opens it, not to the image: not followed",
                code="backing.relative",
            )
            return chain
        recorded = info.backing.format
        if probed and not allow_probe:
            chain.error = BackingFormatNotSpecified(
                f"format of {info.filename} was probed, not recorded by its parent, and it has a "
                f"backing file ({info.backing.name}); pass allow_probe to follow it"
            )
            return chain
        if len(chain.images) > max_depth:
            chain.error = ChainTooDeep(f"backing chain is deeper than {max_depth} images")
            return chain
        try:
            info = probe(store.path, format=recorded, table=table)
        except SourceError as exc:
            chain.error = BackingMissing(f"backing file {store.path} of {chain.images[-1].filename}: {exc}")
            return chain
        except ProbeError as exc:
            chain.error = BackingError(f"backing file {store.path}: {exc}", code=f"backing.{exc.code}")
            return chain
        identity = _identity(info)
        if identity in seen:
            chain.error = BackingLoop(
                f"backing file {store.path} of {chain.images[-1].filename} is already in the chain"
            )
            return chain
        seen.add(identity)
        chain.images.append(info)
        probed = recorded is None


def _identity(info: ImageInfo) -> tuple[int, int] | str:
    if info.stat is None:
        return os.path.realpath(info.filename)
    return (info.stat.st_dev, info.stat.st_ino)
