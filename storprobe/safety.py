"""A safety verdict for untrusted images: is this volume safe to hand to a
hypervisor under a policy?

The core's checks need no format knowledge: a backing file of any kind, an
external data file, a format outside the allowed list, bytes that carry more
than one format's signature (polyglots, and the CVE-2008-2004 pattern of a
"raw" volume whose first sector probes as another format), a virtual size over
the policy's limit, and any header that breaks its format's rules. Each format
row adds its own through its ``hazards`` callback. Encryption is reported as a
fact, never as a hazard.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import NamedTuple

from .detect import Target, describe_image, guarded, open_source
from .errors import ProbeError, SourceError, UnknownFormat
from .model import ImageInfo
from .registry import FormatTable, format_table
from .sizes import size_text
from .source import Image
from .spec import FormatSpec, Hazard

#: Largest virtual size accepted by default: 64 TiB, VHDX's and most
#: hypervisors' limit; far beyond any real disk image, far below a hostile one.
DEFAULT_MAX_VIRTUAL_SIZE = 64 << 40
SECTOR = 512


class Policy(NamedTuple):
    """What the caller accepts. ``allow_formats`` None accepts every format."""

    allow_formats: frozenset[str] | None = None
    allow_backing: bool = False
    allow_data_file: bool = False
    max_virtual_size: int = DEFAULT_MAX_VIRTUAL_SIZE


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
    target: Target, *, policy: Policy = Policy(), format: str | None = None, table: FormatTable | None = None
) -> Verdict:
    """Probe ``target`` and judge it under ``policy``.

    Raises SourceError when the volume cannot be read at all (UnknownFormat
    for a ``format`` no plugin provides); a malformed header is a hazard, not
    an exception.
    """
    table = table or format_table()
    source = open_source(target)
    name = source.name
    try:
        img = Image(source)
        info = describe_image(img, table, format)
        hazards = (*_core_hazards(img, info, policy, table), *_row_hazards(img, info, table))
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
    others = [m for m in info.matches if m != info.format]
    if info.evidence == "caller" and table[info.format].catch_all:
        others = [m for m in others if _in_first_sector(img, table[m])]
    if others:
        yield Hazard(
            "polyglot",
            f"the bytes also carry the signature of {', '.join(others)}: "
            f"a hypervisor that probes may open it as {others[0]}, not {info.format}",
        )
    if info.backing is not None and not policy.allow_backing:
        yield Hazard("backing-file", f"it names a backing file {info.backing.name!r}, which a hypervisor would open")
    if info.data_file is not None and not policy.allow_data_file:
        named = f"names an external data file {info.data_file.name!r}" if info.data_file.name else (
            "keeps its data in an external file whose name it does not record"
        )
        yield Hazard("data-file", f"it {named}, which a hypervisor would open")
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
            yield from guarded(spec, "hazards", lambda spec=spec: tuple(spec.hazards(img, info)))


def policy_from_allow(allow: str | None, **flags: bool) -> Policy:
    """A policy from a comma-separated ``--allow`` list and flags."""
    formats = frozenset(f.strip() for f in allow.split(",") if f.strip()) if allow is not None else None
    return Policy(allow_formats=formats, **flags)

