"""luks: LUKS encrypted volumes, versions 1 and 2 (big-endian).

LUKS1 (cryptsetup docs/on-disk-format.pdf): a 592-byte header with eight key
slots; the encrypted payload starts ``payload_offset`` 512-byte sectors in and
runs to the end of the file. qemu-img opens it as format ``luks``; the core's
:func:`storprobe.luks1.luks_specific` makes the checks QEMU 7.2 makes on open
(crypto/block-luks.c) and builds qemu-img's ``format-specific`` data, as it
does for the LUKS header a qcow2 image embeds.

LUKS2 (cryptsetup docs/on-disk-format-luks2.pdf): a 4 KiB binary header plus a
JSON area, ``hdr_size`` bytes in all, stored twice. QEMU 7.2 and libvirt 9.0
do not know LUKS2 and call it raw; we report format ``luks`` (version 2), check
it as cryptsetup does (lib/luks2/luks2_disk_metadata.c, luks2_json_metadata.c)
and give the data segment's facts as details.
"""

import json
from typing import TYPE_CHECKING, Any, NamedTuple

from storprobe import Features, FormatSpec, Image, InvalidHeader, Layout, LibvirtFacts, hookimpl
from storprobe.layout import cstring, read_uint
from storprobe.luks1 import (
    CREATE_STRINGS,
    LUKS1_HEADER,
    MAGIC,
    SECTOR,
    CreateRefused,
    created_payload_offset,
    luks_specific,
)
from storprobe.source import sector_rounded_size

if TYPE_CHECKING:  # measure loads when it is first used, not for a probe
    from storprobe.measure import Measurement, MeasureRequest

# ---- LUKS2 ----------------------------------------------------------------

LUKS2_HEADER = Layout(
    ">",
    "luks2 header",
    ("magic", "6s"),  # LUKS\xba\xbe; SKUL\xba\xbe in the secondary copy
    ("version", "H"),
    ("hdr_size", "Q"),  # binary header + JSON area, in bytes
    ("seqid", "Q"),
    ("label", "48s"),
    ("checksum_alg", "32s"),
    ("salt", "64s"),
    ("uuid", "40s"),
    ("subsystem", "48s"),
    ("hdr_offset", "Q"),
    (None, "184x"),
    ("csum", "64s"),
)
BINARY_HEADER_SIZE = 4096  # the JSON area starts here
CSUM_OFFSET = LUKS2_HEADER.size - 64
SECONDARY_MAGIC = b"SKUL\xba\xbe"
HDR_SIZES = frozenset(16384 << n for n in range(9))  # 16 KiB .. 4 MiB
CHECKSUM_ALGS = frozenset({"sha1", "sha224", "sha256", "sha384", "sha512"})
MAX_OBJECTS = 32  # cryptsetup's keyslot limit, applied to segments too
#: Deepest nesting of objects and arrays cryptsetup reads (json-c's default tokener depth;
#: checked: a 33rd level makes luksDump refuse the header), whatever Python's recursion limit.
JSON_DEPTH = 32


def _luks2_metadata(img: Image) -> tuple[Any, bytes, dict[str, Any]]:
    """The primary binary header, its whole area (checksum verified) and its JSON object."""
    hdr = LUKS2_HEADER.unpack(img.header)
    if hdr.hdr_offset != 0:
        raise InvalidHeader(f"primary header claims offset {hdr.hdr_offset}", code="luks.hdr-offset")
    if hdr.hdr_size not in HDR_SIZES:
        raise InvalidHeader(
            f"header size {hdr.hdr_size} is not a power of two in 16 KiB..4 MiB", code="luks.hdr-size"
        )
    area = img.read(0, hdr.hdr_size)
    _verify_checksum(hdr, area, "primary")
    return hdr, area, _json_object(area[BINARY_HEADER_SIZE:])


def _verify_checksum(hdr: Any, area: bytes, which: str) -> None:
    alg = cstring(hdr.checksum_alg)
    if alg not in CHECKSUM_ALGS:
        raise InvalidHeader(
            f"{which} header checksum algorithm {alg!r} is not supported", code="luks.checksum-alg"
        )
    import hashlib  # here, not at import: loading OpenSSL is a cost every process would pay

    digest = hashlib.new(alg)
    view = memoryview(area)
    digest.update(view[:CSUM_OFFSET])
    digest.update(bytes(64))
    digest.update(view[LUKS2_HEADER.size :])
    if hdr.csum[: digest.digest_size] != digest.digest():
        raise InvalidHeader(f"{which} header checksum mismatch", code="luks.checksum")


def _json_object(area: bytes) -> dict[str, Any]:
    """The JSON area's object: it opens the area, ends at a NUL, and only NULs follow,
    nested at most :data:`JSON_DEPTH` deep."""
    text, nul, rest = area.partition(b"\0")
    if not text.startswith(b"{") or not nul or rest.lstrip(b"\0"):
        raise InvalidHeader("JSON area is not one NUL-terminated object followed by zeros", code="luks.json")
    try:
        root = json.loads(text.decode("utf-8"))
    except (ValueError, RecursionError) as exc:
        raise InvalidHeader(f"JSON metadata does not parse: {exc}", code="luks.json") from None
    if _deeper_than(root, JSON_DEPTH):
        raise InvalidHeader(f"JSON metadata nests deeper than {JSON_DEPTH} levels", code="luks.json")
    return root


def _deeper_than(root: Any, limit: int) -> bool:
    """Whether objects and arrays nest more than ``limit`` deep (``root`` is level 1)."""
    pending = [(root, 1)]
    while pending:
        node, depth = pending.pop()
        children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else None
        if children is None:
            continue
        if depth > limit:
            return True
        pending.extend((child, depth + 1) for child in children)
    return False


def _number(value: Any) -> int | None:
    """A LUKS2 JSON number string (``"16777216"``) as an int; None if it is not one."""
    if isinstance(value, str) and 0 < len(value) <= 20 and value.isascii() and value.isdigit():
        number = int(value)
        return number if number < 1 << 64 else None
    return None


class Payload(NamedTuple):
    """Where the LUKS2 data segments put the payload."""

    offset: int  # of the first segment
    end: int | None  # of the last fixed-size segment; None when the data runs to the end of the device
    crypt: dict[str, Any]  # the first crypt segment's fields ({} when there is none)


def _payload(meta: dict[str, Any], hdr_size: int) -> Payload:
    """The data segments, after cryptsetup's checks of the config, keyslots and segments."""
    config = meta.get("config")
    if not isinstance(config, dict) or _number(config.get("json_size")) != hdr_size - BINARY_HEADER_SIZE:
        raise InvalidHeader("config.json_size does not match the binary header's size", code="luks.json-size")
    keyslots_size = _number(config.get("keyslots_size"))
    if keyslots_size is None or keyslots_size % 4096:
        raise InvalidHeader("config.keyslots_size is not a multiple of 4096", code="luks.keyslots-size")
    keyslots, segments = meta.get("keyslots"), meta.get("segments")
    if not isinstance(keyslots, dict) or len(keyslots) > MAX_OBJECTS:
        raise InvalidHeader(
            f"keyslots is not an object of at most {MAX_OBJECTS} entries", code="luks.keyslots"
        )
    if not isinstance(segments, dict) or not 0 < len(segments) <= MAX_OBJECTS:
        raise InvalidHeader(f"segments is not an object of 1..{MAX_OBJECTS} entries", code="luks.segments")
    spans = {key: _segment_span(key, seg) for key, seg in segments.items()}
    first = min(start for start, _ in spans.values())
    if first < 2 * hdr_size + keyslots_size:
        raise InvalidHeader(
            f"data offset {first} overlaps the headers and keyslots area", code="luks.payload-offset"
        )
    fixed = [end for _, end in spans.values() if end is not None]
    crypts = [key for key, seg in segments.items() if seg.get("type") == "crypt"]
    crypt = min(crypts, key=lambda key: spans[key][0], default=None)
    last = max(fixed) if len(fixed) == len(spans) else None  # None: a segment runs to the end
    return Payload(first, last, {} if crypt is None else segments[crypt])


def _segment_span(key: str, seg: Any) -> tuple[int, int | None]:
    """(offset, end or None for a "dynamic" size) of a well-formed segment."""
    offset = _number(seg.get("offset")) if isinstance(seg, dict) else None
    size = seg.get("size") if isinstance(seg, dict) else None
    length = None if size == "dynamic" else _number(size)
    if (
        not (key.isascii() and key.isdigit())
        or offset is None
        or offset % SECTOR
        or (size != "dynamic" and (not length or length % SECTOR))
        or (seg.get("type") == "crypt" and not _crypt_segment_ok(seg))
    ):
        raise InvalidHeader(f"segment {key!r} is malformed", code="luks.segment")
    return offset, None if length is None else offset + length


def _crypt_segment_ok(seg: dict[str, Any]) -> bool:
    sector_size = seg.get("sector_size")
    return (
        isinstance(seg.get("encryption"), str)
        and _number(seg.get("iv_tweak")) is not None
        and type(sector_size) is int
        and 0 < sector_size < 1 << 32
        and sector_size % SECTOR == 0
    )


def _check_secondary(img: Image, hdr: Any, area: bytes) -> None:
    """The secondary header at ``hdr_size`` must be a verified copy of the primary."""
    copy = img.read(hdr.hdr_size, hdr.hdr_size)
    second = LUKS2_HEADER.unpack(copy)
    same = ("version", "hdr_size", "seqid", "label", "checksum_alg", "uuid", "subsystem")
    if (
        second.magic != SECONDARY_MAGIC
        or second.hdr_offset != hdr.hdr_size
        or any(getattr(second, f) != getattr(hdr, f) for f in same)
        or copy[BINARY_HEADER_SIZE:] != area[BINARY_HEADER_SIZE:]
    ):
        raise InvalidHeader("secondary header is not a copy of the primary", code="luks.secondary-header")
    _verify_checksum(second, copy, "secondary")


def _luks2_features(img: Image) -> Features:
    hdr, area, meta = _luks2_metadata(img)
    _check_secondary(img, hdr, area)
    payload = _payload(meta, hdr.hdr_size)
    names = {"label": cstring(hdr.label), "subsystem": cstring(hdr.subsystem)}
    details: dict[str, Any] = {"uuid": cstring(hdr.uuid), **{k: v for k, v in names.items() if v}}
    details["payload-offset"] = payload.offset
    if payload.crypt:
        details["cipher"] = payload.crypt["encryption"]
        details["sector-size"] = payload.crypt["sector_size"]
    details["keyslots"] = len(meta["keyslots"])
    return Features(encryption="luks2", details=details)


# ---- the row --------------------------------------------------------------


def _version(img: Image) -> int:
    return read_uint(img.header, 6, 2, ">")


def features(img: Image) -> Features:
    if _version(img) == 1:
        return Features(encryption="luks", specific=luks_specific(img.header))
    return _luks2_features(img)


def size(img: Image) -> int:
    """The payload's bytes, from its offset to the end of the file or of a fixed-size
    LUKS2 segment. For LUKS1, as QEMU counts it, the file ends at a whole 512-byte sector."""
    if _version(img) == 1:
        limit = sector_rounded_size(img)
        start, end = LUKS1_HEADER.unpack(img.header).payload_offset * SECTOR, limit
    else:
        hdr, _, meta = _luks2_metadata(img)
        payload = _payload(meta, hdr.hdr_size)
        limit = img.size
        start, end = payload.offset, limit if payload.end is None else payload.end
    if start > end or end > limit:
        raise InvalidHeader(
            f"payload {start}..{end} runs past the end of the file ({img.size} bytes)",
            code="luks.payload-beyond-end",
        )
    return end - start


def measure(request: "MeasureRequest") -> "Measurement":
    """``qemu-img measure -O luks`` (block_crypto_measure): the LUKS1 header QEMU
    would write, then every byte of the disk (encrypted, so none is a hole)."""
    from storprobe.measure import CreateOption, MeasureError, Measurement

    # the luks driver's creation options (block/crypto.c block_crypto_create_opts_luks)
    options = request.options((
        CreateOption("size", "size"),
        *(CreateOption(name, "string") for name in CREATE_STRINGS),
        CreateOption("iter-time", "number"),
    ))
    size = options.number("size", 0) if request.source is None else request.source.virtual_size
    given = {name: value for name in CREATE_STRINGS if (value := options.string(name)) is not None}
    try:
        payload = created_payload_offset(given, request.secrets)
    except CreateRefused as refused:
        raise MeasureError(str(refused)) from None
    return Measurement(payload + size, payload + size)


@hookimpl
def storprobe_formats() -> list[FormatSpec]:
    return [
        FormatSpec(
            name="luks",
            description="LUKS encrypted volume (LUKS1, LUKS2)",
            libvirt=LibvirtFacts(name="raw"),  # libvirt models LUKS as raw with <encryption format='luks'>
            magic=MAGIC,
            endian=">",
            version_offset=6,
            version_width=2,
            versions=(1, 2),
            qemu_version_drivers={2: "raw"},  # QEMU 7.2's luks driver opens LUKS1 only
            size=size,
            features=features,
            measure=measure,
        )
    ]
