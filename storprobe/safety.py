"""A safety verdict for untrusted images: is this volume safe to hand to a
hypervisor under a policy?

The core's checks need no format knowledge: a directory handed over as a disk,
a format outside the allowed list, bytes that carry more than one format's
signature (polyglots, and the CVE-2008-2004 pattern of a "raw" volume whose
first sector probes as another format), a virtual size over the policy's
limit, any header that breaks its format's rules, and where the files an image
makes a hypervisor open lie. Each format row adds its own through its
``hazards`` callback. Encryption is reported as a fact, never as a hazard.

Backing and data files: a host device, a host directory, a host file read by
a debug driver or a null driver is never safe; a network backing is safe only
when its protocol is accepted by name; a local file only when it is a regular
file inside an allowed directory (judged on the name first, so nothing outside
is ever looked at, then without letting a symlink lead out), with a recorded
format. The images of a backing chain are judged as the top one is, down to
the policy's depth, loops named.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable, Iterator
from functools import partial
from typing import NamedTuple

from .backing import (
    REACH_HOST_DEVICE,
    REACH_HOST_DIRECTORY,
    REACH_HOST_FILE,
    REACH_NONE,
    BackingStore,
    parse_backing_name,
)
from .chain import DEFAULT_MAX_DEPTH
from .detect import Target, describe_image, guarded, open_source
from .engine import KnownBytes, Rounds, rounds
from .errors import BackingNameError, ProbeError, ReadLimitExceeded, SourceError, UnknownFormat
from .human import shown
from .model import ImageInfo
from .registry import FormatTable, format_table
from .sizes import size_text
from .source import Image, PathSource
from .spec import FormatSpec, Hazard
from .urls import is_url, object_client

#: Largest virtual size accepted by default: 64 TiB, VHDX's and most
#: hypervisors' limit; far beyond any real disk image, far below a hostile one.
DEFAULT_MAX_VIRTUAL_SIZE = 64 << 40
SECTOR = 512
#: Symlinks followed while placing one name (the kernel's limit, ELOOP).
MAX_SYMLINKS = 40

#: What QEMU reaches through a protocol that is never safe: the hazard's
#: suffix and what the driver does, worded for its message.
_NEVER_SAFE = {
    REACH_HOST_DEVICE: ("host-device", "opens the host's device {path}: the guest would use the host's disk"),
    REACH_HOST_DIRECTORY: ("host-directory", "shows the host's directory {path} to the guest as a FAT disk"),
    REACH_HOST_FILE: ("host-file", "reads the host files named in it (a debug driver's configuration and image)"),
    REACH_NONE: ("null", "is a null driver: the guest would see zeros, not an image"),
}
_KINDS = ((stat.S_ISDIR, "directory"), (stat.S_ISBLK, "block device"), (stat.S_ISCHR, "character device"),
          (stat.S_ISFIFO, "FIFO"), (stat.S_ISSOCK, "socket"))


class Policy(NamedTuple):
    """What the caller accepts. ``allow_formats`` None accepts every format but
    a directory, which is accepted only when its format is listed.

    Backing files: ``allow_backing`` accepts them in the checked image's own
    directory, ``backing_dirs`` in those directories; ``backing_protocols``
    accepts network backings by protocol name (``"nbd"``, ``"rbd"``). External
    data files: ``allow_data_file`` in the image's own directory,
    ``data_file_dirs`` in those. ``max_depth`` bounds the backing chain judged.
    """

    allow_formats: frozenset[str] | None = None
    allow_backing: bool = False
    allow_data_file: bool = False
    max_virtual_size: int = DEFAULT_MAX_VIRTUAL_SIZE
    backing_dirs: tuple[str, ...] = ()
    backing_protocols: frozenset[str] = frozenset()
    data_file_dirs: tuple[str, ...] = ()
    max_depth: int = DEFAULT_MAX_DEPTH


class Verdict(NamedTuple):
    """The outcome of :func:`check`: ``safe`` when there is no hazard.

    ``info`` is None when the header could not be understood (the hazard then
    says why)."""

    path: str
    info: ImageInfo | None
    hazards: tuple[Hazard, ...] = ()

    @property
    def safe(self) -> bool:
        return not self.hazards


def check(
    target: Target,
    *,
    policy: Policy = Policy(),
    format: str | None = None,
    table: FormatTable | None = None,
    endpoint_url: str | None = None,
) -> Verdict:
    """Probe ``target`` and judge it, and every image of its backing chain
    that may be opened, under ``policy``.

    Raises SourceError when the volume cannot be read at all (UnknownFormat
    for a ``format`` no plugin provides); a malformed header is a hazard, not
    an exception. Relative backing names of a volume given as bytes or an open
    file have no directory to lie in: they are outside every allowed one. A
    URL (``s3://``, ``https://`` ...) is read by ranges (:func:`judging`;
    ``endpoint_url``: an S3-compatible store's).
    """
    table = table or format_table()
    if is_url(target):
        return object_client().check_url(
            target, policy=policy, format=format, table=table, endpoint_url=endpoint_url
        )
    where = _located(target)
    verdict = _judge(target, policy, format, table, where)
    if verdict.info is None:
        return verdict
    roots = _roots(policy.backing_dirs, policy.allow_backing, where)
    below = _chain_hazards(verdict.info, where, roots, policy, table)
    return verdict._replace(hazards=verdict.hazards + tuple(below))


def judging(
    known: KnownBytes, *, policy: Policy = Policy(), format: str | None = None, table: FormatTable | None = None
) -> Rounds[Verdict]:
    """:func:`check` of a volume whose bytes arrive in rounds (an object read by
    ranges; see :mod:`storprobe.engine`). It has no directory: a relative
    backing or data file name lies outside every allowed one, and no backing is
    looked for beside it (in its store)."""
    table = table or format_table()
    try:
        verdict = yield from rounds(lambda source: _judge(source, policy, format, table, None), known)
    except ReadLimitExceeded as exc:  # too many rounds: malformed, as a budget exceeded is
        return Verdict(known.name, None, (Hazard("malformed", f"{exc.reason} ({exc.code})"),))
    if verdict.info is None:
        return verdict
    below = _chain_hazards(verdict.info, None, _roots(policy.backing_dirs, False, None), policy, table)
    return verdict._replace(hazards=verdict.hazards + tuple(below))


def _located(target: Target) -> Located | None:
    """Where a volume given by path lies; None for bytes or an open file."""
    if not isinstance(target, (str, os.PathLike)):
        return None
    path = os.path.abspath(target)
    home = Root(os.path.dirname(path), os.path.realpath(os.path.dirname(path)))
    return Located(os.path.join(home.real, os.path.basename(path)), home)


def _judge(target: Target, policy: Policy, format: str | None, table: FormatTable, where: Located | None) -> Verdict:
    """One image's hazards, its backing chain aside."""
    source = open_source(target)
    name = source.name
    try:
        img = Image(source)
        info = describe_image(img, table, format)
        hazards = (
            *_core_hazards(img, info, policy, table),
            *_data_file_hazards(info, policy, where),
            *_row_hazards(img, info, table),
        )
        return Verdict(name, info, hazards)
    except (SourceError, UnknownFormat):
        raise
    except ProbeError as exc:
        return Verdict(name, None, (Hazard("malformed", f"{exc.reason} ({exc.code})"),))
    finally:
        if source is not target:
            source.close()


def _core_hazards(img: Image, info: ImageInfo, policy: Policy, table: FormatTable) -> Iterator[Hazard]:
    if policy.allow_formats is not None and info.format not in policy.allow_formats:
        allowed = ", ".join(sorted(policy.allow_formats)) or "none"
        yield Hazard("format", f"format {info.format} is not allowed (allowed: {allowed})")
    if info.file_type == "directory" and (policy.allow_formats is None or info.format not in policy.allow_formats):
        yield Hazard(
            "directory",
            f"it is a directory, not a disk image: a hypervisor given it as a disk shows the host's files "
            f"to the guest (QEMU's fat: driver) or fails; accepted only when format {info.format} is allowed by name",
        )
    others = [m for m in info.matches if m != info.format]
    if info.evidence == "caller" and table[info.format].catch_all:
        others = [m for m in others if _in_first_sector(img, table[m])]
    if others:
        yield Hazard(
            "polyglot",
            f"the bytes also carry the signature of {', '.join(others)}: "
            f"a hypervisor that probes may open it as {others[0]}, not {info.format}",
        )
    if info.virtual_size > policy.max_virtual_size:
        limit, size = size_text(policy.max_virtual_size), size_text(info.virtual_size)
        yield Hazard("size", f"virtual size {size} exceeds the limit of {limit}")


def _in_first_sector(img: Image, spec: FormatSpec) -> bool:
    """Whether ``spec``'s signature lies in the volume's first sector. A volume
    declared raw is the guest's disk: a signature there is what a probing
    hypervisor sees (CVE-2008-2004), while one deeper in (an ISO's descriptors,
    a VHD footer) is data any raw disk may hold and hypervisors read as raw."""
    starts = [offset + spec.magic_offset for offset in spec.header_offsets if offset >= 0]
    return any(
        at < SECTOR and (spec.match is not None or any(img.head.startswith(magic, at) for magic in spec.magics))
        for at in starts
    )


def _row_hazards(img: Image, info: ImageInfo, table: FormatTable) -> Iterator[Hazard]:
    for spec in table.specs:
        if spec.hazards is not None and img.file_type in spec.file_types:
            yield from guarded(spec, "hazards", partial(_hazards_of, spec, img, info))


def _hazards_of(spec: FormatSpec, img: Image, info: ImageInfo) -> tuple[Hazard, ...]:
    """The row's hazards, all of them (so an error while they are made is the callback's)."""
    assert spec.hazards is not None
    return tuple(spec.hazards(img, info))


# ---- where the files an image names lie ----------------------------------------


class Kind(NamedTuple):
    """A kind of file an image names: its hazards' prefix, the hazard when
    none is accepted, and how messages call it."""

    prefix: str
    refused: str
    what: str


BACKING = Kind("backing", "backing-file", "the backing")
DATA_FILE = Kind("data-file", "data-file", "the external data file")


class Placed(NamedTuple):
    """A name that denotes a regular file inside an allowed directory."""

    path: str  # real: no symlink in it
    stat: os.stat_result


class Root(NamedTuple):
    """An allowed directory as the caller named it (absolute) and as it really is."""

    named: str
    real: str


class Located(NamedTuple):
    """Where a volume lies: its path with the directory resolved (QEMU joins a
    relative name to the directory, the kernel then resolves it the same from
    either) and that directory, as named and real."""

    path: str
    home: Root


def _at(real: str) -> Located:
    """Where a volume whose path has no symlink in it lies."""
    home = os.path.dirname(real)
    return Located(real, Root(home, home))


def _roots(dirs: tuple[str, ...], own: bool, where: Located | None) -> tuple[Root, ...]:
    """The allowed directories (the caller's, so resolving them is fine)."""
    roots = [Root(os.path.abspath(d), os.path.realpath(d)) for d in dirs]
    if own and where is not None:
        roots.append(where.home)
    return tuple(dict.fromkeys(roots))


def _data_file_hazards(info: ImageInfo, policy: Policy, where: Located | None) -> Iterator[Hazard]:
    """An external data file is opened read-write as the guest's disk: its
    name is judged as a backing name is, except that QEMU 7.2 opens a relative
    one against its own working directory, not the image's directory."""
    data = info.data_file
    if data is None:
        return
    roots = _roots(policy.data_file_dirs, policy.allow_data_file, where)
    if data.name is None:
        if not roots:
            yield Hazard("data-file", "it keeps its data in an external file whose name it does not record, "
                                      "which a hypervisor would open")
        return
    placed = _place(DATA_FILE, data.name, None, roots, frozenset())
    if isinstance(placed, Hazard):
        yield placed


def _chain_hazards(
    info: ImageInfo, where: Located | None, roots: tuple[Root, ...], policy: Policy, table: FormatTable
) -> Iterator[Hazard]:
    """The hazards of ``info``'s backing chain: each name placed, each image
    judged as the top one was, down to ``policy.max_depth`` images below it."""
    seen = {(info.stat.st_dev, info.stat.st_ino)} if info.stat is not None else set()
    subject = "it"
    for depth in range(1, policy.max_depth + 2):
        backing = info.backing
        if backing is None:
            return
        said = f"{subject} names the backing {backing.name!r}"
        image = where.path if where is not None else None
        placed = _place(BACKING, backing.name, image, roots, policy.backing_protocols, subject)
        if isinstance(placed, Hazard):
            yield placed
            return
        if backing.format is None:
            yield Hazard("backing-format-unrecorded", f"{said} without its format: a hypervisor would probe it, "
                         "and the backing's own bytes would choose what else is opened (the CVE-2008-2004 pattern)")
            return
        if backing.format not in table or "file" not in table[backing.format].file_types:
            yield Hazard("backing-format-unknown", f"{said} as format {backing.format!r}, which is no disk image "
                         "format storprobe can check")
            return
        if placed is None:  # an accepted network backing: never opened here
            return
        if depth > policy.max_depth:
            yield Hazard("backing-too-deep", f"{said}, past the {policy.max_depth} backing files the policy "
                         "judges: the chain is too deep")
            return
        identity = (placed.stat.st_dev, placed.stat.st_ino)
        if identity in seen:
            yield Hazard("backing-loop", f"{said} ({shown(placed.path)}), which is already in the chain: a loop")
            return
        seen.add(identity)
        lower = _judge_backing(placed, backing.format, policy, table, said)
        if isinstance(lower, Hazard):
            yield lower
            return
        said_of = f"backing file {shown(placed.path)}: "
        yield from (hazard._replace(message=said_of + hazard.message) for hazard in lower.hazards)
        if lower.info is None:
            return
        info, where, subject = lower.info, _at(placed.path), f"backing file {shown(placed.path)}"


def _judge_backing(placed: Placed, fmt: str, policy: Policy, table: FormatTable, said: str) -> Verdict | Hazard:
    """The verdict on a placed backing file, opened without following a link;
    a hazard when it cannot be read or is no longer the file placed."""
    try:
        source = PathSource(placed.path, listed_as_file=True)
    except SourceError as exc:
        return Hazard("backing-missing", f"{said}, which cannot be read: {exc.reason}")
    try:
        if source.stat is None or (source.stat.st_dev, source.stat.st_ino) != (placed.stat.st_dev, placed.stat.st_ino):
            return Hazard("backing-symlink", f"{said}, which was replaced while it was checked")
        return _judge(source, policy, fmt, table, _at(placed.path))
    finally:
        source.close()


def _place(
    kind: Kind, name: str, image: str | None, roots: tuple[Root, ...], protocols: frozenset[str],
    subject: str = "it",
) -> Placed | Hazard | None:
    """Where ``name``, recorded by the image at ``image`` (None: no directory
    resolves a relative name), leads: a regular
    file inside one of ``roots``, None for a network store whose protocol is
    accepted, or the hazard that says why neither."""
    said, check = f"{subject} names {kind.what} {name!r}", kind.prefix
    try:
        store = parse_backing_name(name, image)
    except BackingNameError as exc:
        return Hazard(f"{check}-invalid", f"{said}, which QEMU refuses: {exc.reason}")
    if store.reach in _NEVER_SAFE:
        suffix, reached = _NEVER_SAFE[store.reach]
        return Hazard(
            f"{check}-{suffix}",
            f"{said}: QEMU's {store.protocol} driver {reached.format(path=shown(store.path or name))}; "
            "worse than a missing file, never safe",
        )
    if not store.is_file:
        return _network(check, said, store, protocols)
    if not roots:
        return Hazard(kind.refused, f"{said}, which a hypervisor would open")
    return _inside(check, said, store.path, roots)


def _network(check: str, said: str, store: BackingStore, protocols: frozenset[str]) -> Hazard | None:
    if store.protocol in protocols:
        return None
    hosts = ", ".join(h.name or h.socket or "?" for h in store.hosts) or "a host it does not name"
    accepted = ", ".join(sorted(protocols)) or "none"
    return Hazard(f"{check}-protocol", f"{said}: a hypervisor would connect to {shown(hosts)} over "
                                       f"{store.protocol}, a protocol not accepted (accepted: {accepted})")


def _inside(check: str, said: str, path: str | None, roots: tuple[Root, ...]) -> Placed | Hazard:
    """``path`` placed as the kernel resolves it, judged by name before
    anything is looked at, then one component at a time: nothing outside the
    ``roots`` is ever stat-ed, and a symlink that leads out is refused."""
    if path is None or not os.path.isabs(path):
        return Hazard(f"{check}-relative", f"{said}, a relative name QEMU opens against the hypervisor's working "
                                           "directory (or the directory of a volume not given by path): no "
                                           "allowed directory can hold it")
    allowed = " or ".join(shown(r.named) for r in roots)
    lexical = os.path.normpath(path)
    if not _strictly_inside(lexical, (named for root in roots for named in root)):
        return Hazard(f"{check}-outside", f"{said}, which is {shown(lexical)}: outside {allowed}")
    current, pending = _start(path, roots)
    hops, st = 0, None
    while pending:
        if st is not None and not stat.S_ISDIR(st.st_mode):
            return Hazard(f"{check}-missing", f"{said}, which does not exist ({shown(current)} is not a directory)")
        part = pending.pop(0)
        if part == "..":
            current, st = os.path.dirname(current), None  # the parent of a real directory
            continue
        candidate = os.path.join(current, part)
        if any(_within(root.real, candidate) for root in roots):
            current, st = candidate, None  # a root, or on the way to one: real directories, not looked at
            continue
        if not _strictly_inside(candidate, (root.real for root in roots)):
            return Hazard(f"{check}-symlink", f"{said}, whose symlinks lead to {shown(candidate)}: outside {allowed}")
        try:
            st = os.lstat(candidate)
            if stat.S_ISLNK(st.st_mode):
                hops += 1
                if hops > MAX_SYMLINKS:
                    return Hazard(f"{check}-symlink", f"{said}, whose symlinks loop")
                target = os.readlink(candidate)
                if os.path.isabs(target):
                    current, parts = _start(target, roots)
                else:
                    parts = _parts(target)
                pending[:0], st = parts, None
                continue
        except OSError as exc:
            return Hazard(f"{check}-missing", f"{said}, which does not exist ({shown(candidate)}: "
                                              f"{exc.strerror or exc})")
        current = candidate
    if st is not None and stat.S_ISREG(st.st_mode):
        return Placed(current, st)
    mode = st.st_mode if st is not None else stat.S_IFDIR
    kind = next((name for test, name in _KINDS if test(mode)), "special file")
    return Hazard(f"{check}-not-regular", f"{said}, which is a {kind} ({shown(current)}), not a regular file")


def _start(path: str, roots: tuple[Root, ...]) -> tuple[str, list[str]]:
    """Where the walk of ``path`` starts and its components from there: at a
    root's real directory when ``path`` begins with the root's name, else at ``/``."""
    parts = _parts(path)
    for root in roots:
        named = _parts(root.named)
        if parts[: len(named)] == named:
            return root.real, parts[len(named):]
    return "/", parts


def _parts(path: str) -> list[str]:
    return [p for p in path.split("/") if p not in ("", ".")]


def _within(inner: str, outer: str) -> bool:
    """Whether ``outer`` is ``inner`` or one of its ancestors (by name)."""
    return os.path.commonpath((inner, outer)) == outer


def _strictly_inside(path: str, dirs: Iterable[str]) -> bool:
    """Whether ``path`` lies inside one of ``dirs``, by name."""
    return any(path != d and _within(path, d) for d in dirs)


def names(values: Iterable[str] | None) -> frozenset[str]:
    """Names from comma-separated lists (``--allow-backing-protocol nbd,rbd``)."""
    return frozenset(name.strip() for value in values or () for name in value.split(",") if name.strip())
