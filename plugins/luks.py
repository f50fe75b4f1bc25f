"""luks: LUKS encrypted volumes, versions 1 and 2 (big-endian).

LUKS1 (cryptsetup docs/on-disk-format.pdf): a 592-byte header with eight key
slots; the encrypted payload starts ``payload_offset`` 512-byte sectors in and
runs to the end of the file. qemu-img opens it as format ``luks``; the checks
here are the ones QEMU 7.2 makes on open (crypto/block-luks.c), and
:func:`luks_specific` builds qemu-img's ``format-specific`` data, for a LUKS
file and for the LUKS header a qcow2 image embeds.

LUKS2 (cryptsetup docs/on-disk-format-luks2.pdf): a 4 KiB binary header plus a
JSON area, ``hdr_size`` bytes in all, stored twice. QEMU 7.2 and libvirt 9.0
do not know LUKS2 and call it raw; we report format ``luks`` (version 2), check
it as cryptsetup does (lib/luks2/luks2_disk_metadata.c, luks2_json_metadata.c)
and give the data segment's facts as details.
"""

from __future__ import annotations

import json
from typing import Any, NamedTuple

from storprobe import Features, FormatSpec, Image, InvalidHeader, Layout, hookimpl
from storprobe.layout import cstring, read_uint
from storprobe_plugins.raw import sector_rounded_size

MAGIC = b"LUKS\xba\xbe"
SECTOR = 512

# ---- LUKS1 ----------------------------------------------------------------

LUKS1_HEADER = Layout(
    ">",
    "luks1 header",
    ("magic", "6s"),
    ("version", "H"),
    ("cipher_name", "32s"),
    ("cipher_mode", "32s"),  # <mode>-<iv generator>[:<iv hash>], e.g. xts-plain64
    ("hash_spec", "32s"),
    ("payload_offset", "I"),  # in 512-byte sectors
    ("key_bytes", "I"),
    ("mk_digest", "20s"),
    ("mk_digest_salt", "32s"),
    ("mk_digest_iter", "I"),
    ("uuid", "40s"),
)
LUKS1_KEY_SLOT = Layout(
    ">",
    "luks1 key slot",
    ("active", "I"),
    ("iterations", "I"),
    ("salt", "32s"),
    ("key_material_offset", "I"),  # in 512-byte sectors
    ("stripes", "I"),
)
KEY_SLOTS = 8
#: Bytes of a LUKS1 header with its key slots: what :func:`luks_specific` reads.
LUKS1_HEADER_SIZE = LUKS1_HEADER.size + KEY_SLOTS * LUKS1_KEY_SLOT.size
SLOT_ACTIVE = 0x00AC71F3
SLOT_DISABLED = 0x0000DEAD
STRIPES = 4000  # anti-forensic stripes; QEMU accepts no other count
KEY_AREA_ALIGN = 4096 // SECTOR  # key material starts after, and is padded to, 4 KiB

#: Cipher names QEMU's LUKS driver knows -> their key sizes in bytes (an XTS
#: key is two such keys, so its key_bytes is twice as large).
CIPHER_KEY_BYTES = {"aes": (16, 24, 32), "cast5": (16,), "serpent": (16, 24, 32), "twofish": (16, 24, 32)}
CIPHER_MODES = frozenset({"ecb", "cbc", "xts", "ctr"})
IV_GENERATORS = frozenset({"plain", "plain64", "essiv"})
HASH_DIGEST_BYTES = {
    "md5": 16,
    "sha1": 20,
    "sha224": 28,
    "sha256": 32,
    "sha384": 48,
    "sha512": 64,
    "ripemd160": 20,
}
#: qemu-img's keys in the order it prints them (in qcow2's ``encrypt``, "format"
#: follows ivgen-hash-alg).
SPECIFIC_KEYS = (
    "ivgen-alg",
    "hash-alg",
    "cipher-alg",
    "uuid",
    "ivgen-hash-alg",
    "cipher-mode",
    "slots",
    "payload-offset",
    "master-key-iters",
)


def luks_specific(data: bytes) -> dict[str, Any]:
    """qemu-img's ``format-specific`` data for the LUKS1 header at the start of ``data``.

    ``data`` must hold :data:`LUKS1_HEADER_SIZE` bytes (TruncatedHeader if not).
    Applies every check QEMU 7.2 makes when it opens the header (InvalidHeader
    with code ``luks.<rule>``), except where the payload ends: that depends on
    the container, so the caller checks it. qcow2 nests the result as its
    ``encrypt`` object with ``"format": "luks"`` added.
    """
    hdr = LUKS1_HEADER.unpack(data)
    slots = [
        LUKS1_KEY_SLOT.unpack(data, LUKS1_HEADER.size + i * LUKS1_KEY_SLOT.size) for i in range(KEY_SLOTS)
    ]
    if hdr.magic != MAGIC:
        raise InvalidHeader("not a LUKS header (bad magic)", code="luks.magic")
    if hdr.version != 1:
        raise InvalidHeader(f"LUKS version {hdr.version} where a LUKS1 header is needed", code="luks.version")
    info = _cipher(hdr)
    _check_key_slots(hdr, slots)
    info |= {
        "payload-offset": hdr.payload_offset * SECTOR,
        "master-key-iters": hdr.mk_digest_iter,
        "uuid": cstring(hdr.uuid),
        "slots": [_slot_info(slot) for slot in slots],
    }
    return {key: info[key] for key in SPECIFIC_KEYS if key in info}


def _cipher(hdr: Any) -> dict[str, Any]:
    """qemu-img's cipher keys, from the cipher name, mode spec, key size and hash."""
    for field in ("cipher_name", "cipher_mode", "hash_spec"):
        if b"\0" not in getattr(hdr, field):
            raise InvalidHeader(f"LUKS header {field} is not NUL-terminated", code="luks.unterminated-string")
    name, spec, hash_alg = cstring(hdr.cipher_name), cstring(hdr.cipher_mode), cstring(hdr.hash_spec)
    mode, dash, ivgen_spec = spec.partition("-")
    if not dash:
        raise InvalidHeader(
            f"cipher mode {spec!r} is not <mode>-<iv generator>", code="luks.cipher-mode-format"
        )
    ivgen, colon, iv_hash = ivgen_spec.partition(":")
    if colon and iv_hash not in HASH_DIGEST_BYTES:
        raise InvalidHeader(f"unknown IV generator hash {iv_hash!r}", code="luks.iv-hash")
    if mode not in CIPHER_MODES:
        raise InvalidHeader(f"unknown cipher mode {mode!r}", code="luks.cipher-mode")
    if name not in CIPHER_KEY_BYTES:
        raise InvalidHeader(f"unknown cipher {name!r}", code="luks.cipher")
    key_bytes = hdr.key_bytes // 2 if mode == "xts" else hdr.key_bytes
    if key_bytes not in CIPHER_KEY_BYTES[name]:
        raise InvalidHeader(
            f"{name} has no {key_bytes}-byte key (key_bytes {hdr.key_bytes})", code="luks.key-bytes"
        )
    if hash_alg not in HASH_DIGEST_BYTES:
        raise InvalidHeader(f"unknown hash {hash_alg!r}", code="luks.hash")
    if ivgen not in IV_GENERATORS:
        raise InvalidHeader(f"unknown IV generator {ivgen!r}", code="luks.ivgen")
    info = {"cipher-alg": f"{name}-{key_bytes * 8}", "cipher-mode": mode, "ivgen-alg": ivgen}
    if ivgen == "essiv":
        if not colon:
            raise InvalidHeader("the essiv IV generator needs a hash (essiv:<hash>)", code="luks.essiv-hash")
        # ESSIV keys a cipher of the same family with the hash's digest.
        if HASH_DIGEST_BYTES[iv_hash] not in CIPHER_KEY_BYTES[name]:
            raise InvalidHeader(f"no {name} cipher takes a {iv_hash} digest as key", code="luks.essiv-cipher")
        info["ivgen-hash-alg"] = iv_hash
    info["hash-alg"] = hash_alg
    return info


def _check_key_slots(hdr: Any, slots: list[Any]) -> None:
    """Key material lies between the 4 KiB header and the payload, one area per slot."""
    if hdr.payload_offset < KEY_AREA_ALIGN:
        raise InvalidHeader(
            f"payload at sector {hdr.payload_offset} overlaps the header", code="luks.payload-offset"
        )
    if hdr.mk_digest_iter == 0:
        raise InvalidHeader("master key digest iteration count is zero", code="luks.master-key-iterations")
    area = -(-hdr.key_bytes * STRIPES // SECTOR)  # sectors of split key material per slot
    area += -area % KEY_AREA_ALIGN
    starts: list[int] = []
    for index, slot in enumerate(slots):
        if slot.stripes != STRIPES:
            raise InvalidHeader(
                f"key slot {index} has {slot.stripes} stripes, not {STRIPES}", code="luks.slot-stripes"
            )
        if slot.active not in (SLOT_ACTIVE, SLOT_DISABLED):
            raise InvalidHeader(
                f"key slot {index} state {slot.active:#010x} is neither active nor disabled",
                code="luks.slot-state",
            )
        if slot.active == SLOT_ACTIVE and slot.iterations == 0:
            raise InvalidHeader(f"key slot {index} iteration count is zero", code="luks.slot-iterations")
        start = slot.key_material_offset
        if start < KEY_AREA_ALIGN:
            raise InvalidHeader(f"key slot {index} material overlaps the header", code="luks.slot-offset")
        if start + area > hdr.payload_offset:
            raise InvalidHeader(
                f"key slot {index} material overlaps the payload", code="luks.slot-overlaps-payload"
            )
        for other, other_start in enumerate(starts):
            if start < other_start + area and other_start < start + area:
                raise InvalidHeader(f"key slots {other} and {index} overlap", code="luks.slot-overlap")
        starts.append(start)


def _slot_info(slot: Any) -> dict[str, Any]:
    key_offset = slot.key_material_offset * SECTOR
    if slot.active == SLOT_ACTIVE:
        return {"active": True, "iters": slot.iterations, "key-offset": key_offset, "stripes": slot.stripes}
    return {"active": False, "key-offset": key_offset}


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
    """The JSON area's object: it opens the area, ends at a NUL, and only NULs follow."""
    text, nul, rest = area.partition(b"\0")
    if not text.startswith(b"{") or not nul or rest.lstrip(b"\0"):
        raise InvalidHeader("JSON area is not one NUL-terminated object followed by zeros", code="luks.json")
    try:
        return json.loads(text.decode("utf-8"))
    except (ValueError, RecursionError) as exc:
        raise InvalidHeader(f"JSON metadata does not parse: {exc}", code="luks.json") from None


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
    ends = [end for _, end in spans.values()]
    crypts = [key for key, seg in segments.items() if seg.get("type") == "crypt"]
    crypt = min(crypts, key=lambda key: spans[key][0], default=None)
    return Payload(first, None if None in ends else max(ends), {} if crypt is None else segments[crypt])


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


@hookimpl
def storprobe_formats() -> list[FormatSpec]:
    return [
        FormatSpec(
            name="luks",
            description="LUKS encrypted volume (LUKS1, LUKS2)",
            libvirt_name="raw",  # libvirt models LUKS as raw with <encryption format='luks'>
            magic=MAGIC,
            endian=">",
            version_offset=6,
            version_width=2,
            versions=(1, 2),
            qemu_version_drivers={2: "raw"},  # QEMU 7.2's luks driver opens LUKS1 only
            size=size,
            features=features,
        )
    ]
