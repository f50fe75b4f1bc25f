"""Backing chains of objects, walked in their store only when the caller asks.

By default a backing name an object records is reported and never looked for
(``info --backing-chain URL`` stops at the object, saying so). Asked, the walk
follows a plain relative name (``base.qcow2``, ``../bases/base.qcow2``) to the
object it names beside the child in the same bucket or on the same host, and
nothing else: an absolute path, a protocol or ``json:`` name, or a name that
leads out of the bucket ends the walk with its reason, never opened. Otherwise
it keeps :func:`storprobe.chain.probe_chain`'s rules: the recorded format is
trusted, a probed format with a backing of its own stops the walk unless
``allow_probe``, loops and chains deeper than ``max_depth`` are named errors,
and the images above a failure are returned.
"""

from __future__ import annotations

import posixpath
from typing import NamedTuple

from .backing import BackingStore
from .chain import DEFAULT_MAX_DEPTH, Chain, backing_store
from .errors import (
    BackingError,
    BackingFormatNotSpecified,
    BackingLoop,
    BackingMissing,
    ChainTooDeep,
    ProbeError,
    SourceError,
)
from .objectstore import ObjectName, Stores, object_reader, probe_machine, run
from .registry import FormatTable


class ObjectChain(NamedTuple):
    """The chain's images, top first (``chain.error``: why the walk failed), and
    ``stop``: why it ended at an image that names a backing, when it did."""

    chain: Chain
    stop: str | None


def probe_object_chain(
    url: str,
    *,
    format: str | None = None,
    allow_probe: bool = False,
    max_depth: int = DEFAULT_MAX_DEPTH,
    table: FormatTable | None = None,
    endpoint_url: str | None = None,
) -> ObjectChain:
    """Probe the object at ``url`` and every backing below it in its store.
    Errors on the top object raise, as :func:`storprobe.probe` does."""
    return run(_walk(url, format, allow_probe, max_depth, table, Stores(endpoint_url)))


async def _walk(
    url: str, format: str | None, allow_probe: bool, max_depth: int, table: FormatTable | None, stores: Stores
) -> ObjectChain:
    info = await object_reader(url, stores).run(probe_machine(format, table))
    chain = Chain([info], [])
    seen, probed = {url}, False
    while True:
        try:
            store = backing_store(info)
        except BackingError as exc:
            chain.stores.append(None)
            chain.error = exc
            return ObjectChain(chain, None)
        chain.stores.append(store)
        if store is None:
            return ObjectChain(chain, None)
        assert info.backing is not None
        below = beside(url, info.backing.name, store)
        if not isinstance(below, _Found):
            return ObjectChain(chain, f"backing chain stops at {info.backing.name}: {below}")
        if probed and not allow_probe:
            chain.error = BackingFormatNotSpecified(
                f"format of {info.filename} was probed, not recorded by its parent, and it has a "
                f"backing file ({info.backing.name}); pass allow_probe to follow it"
            )
            return ObjectChain(chain, None)
        if len(chain.images) > max_depth:
            chain.error = ChainTooDeep(f"backing chain is deeper than {max_depth} images")
            return ObjectChain(chain, None)
        if below.url in seen:
            chain.error = BackingLoop(f"backing object {below.url} of {info.filename} is already in the chain")
            return ObjectChain(chain, None)
        recorded = info.backing.format
        try:
            info = await object_reader(below.url, stores).run(probe_machine(recorded, table))
        except SourceError as exc:
            chain.error = BackingMissing(f"backing object {below.url} of {chain.images[-1].filename}: {exc}")
            return ObjectChain(chain, None)
        except ProbeError as exc:
            chain.error = BackingError(f"backing object {below.url}: {exc}", code=f"backing.{exc.code}")
            return ObjectChain(chain, None)
        seen.add(below.url)
        chain.images.append(info)
        url, probed = below.url, recorded is None


class _Found(NamedTuple):
    url: str


def beside(url: str, name: str, store: BackingStore) -> _Found | str:
    """The object a backing ``name`` recorded by the object at ``url`` denotes
    in the same store, or why it is not followed there."""
    if not store.is_file or store.relative_to_working_directory or name.startswith("/") or ":" in name:
        return "only a name relative to the object is looked for in its store"
    parent = ObjectName.parse(url)
    key = posixpath.normpath(posixpath.join(posixpath.dirname(parent.key), name))
    if key == ".." or key.startswith("../") or key == ".":
        return "it leads out of the object's bucket"
    return _Found(f"{parent.root}/{key}")

