"""The LUKS1 header (cryptsetup docs/on-disk-format.pdf) as QEMU 7.2 opens it
(crypto/block-luks.c): a 592-byte big-endian header with eight key slots.

Shared by every row that reads one: a LUKS volume starts with it, and an
encrypted qcow2 embeds one in a header extension. :func:`luks_specific` checks
it and builds qemu-img's ``format-specific`` data; broken rules raise
InvalidHeader with code ``luks.<rule>``.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Any

from .errors import InvalidHeader
from .layout import Layout, cstring

MAGIC = b"LUKS\xba\xbe"
SECTOR = 512

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


# ---- a new LUKS1 header, as QEMU 7.2 creates one (crypto/block-luks.c qcrypto_block_luks_create) ----------
# What ``qemu-img measure`` needs of it: the bytes before the payload, after the
# creation options are checked as QEMU checks them (QAPI's enums, then the
# driver's own refusals, with the messages of the nettle backend Debian builds).

#: QEMU's cipher algorithms -> (the LUKS cipher name, or None where LUKS has none; key bytes).
CREATE_CIPHERS: dict[str, tuple[str | None, int]] = {
    "aes-128": ("aes", 16), "aes-192": ("aes", 24), "aes-256": ("aes", 32), "des": (None, 8), "3des": (None, 24),
    "cast5-128": ("cast5", 16), "serpent-128": ("serpent", 16), "serpent-192": ("serpent", 24),
    "serpent-256": ("serpent", 32), "twofish-128": ("twofish", 16), "twofish-192": ("twofish", 24),
    "twofish-256": ("twofish", 32),
}
#: Ciphers whose ESSIV key may be another key size of the family, by the name QEMU's message gives it.
ESSIV_FAMILIES = {"aes": "AES", "serpent": "Serpent", "twofish": "Twofish"}
#: QEMU's LUKS creation options after the format's prefix, as QAPI visits them, with their enums.
CREATE_ENUMS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("cipher-alg", tuple(CREATE_CIPHERS)),
    ("cipher-mode", ("ecb", "cbc", "xts", "ctr")),
    ("ivgen-alg", ("plain", "plain64", "essiv")),
    ("ivgen-hash-alg", tuple(HASH_DIGEST_BYTES)),
    ("hash-alg", tuple(HASH_DIGEST_BYTES)),
)
#: The string-valued creation options (``key-secret`` names a secret object).
CREATE_STRINGS = ("key-secret", *(name for name, _ in CREATE_ENUMS))


class CreateRefused(Exception):
    """QEMU refuses these creation options: its message."""


def created_payload_offset(
    given: Mapping[str, str], secrets: Collection[str], prefix: str = ""
) -> int:
    """Bytes before the payload of the LUKS1 header QEMU would create with the
    creation options ``given`` (names without ``prefix``), whose key secret
    must be one of ``secrets`` (the ids of the secret objects given): a 4 KiB
    header, then eight key-material areas of 4000 stripes of the master key,
    each padded to 4 KiB. CreateRefused with QEMU's message otherwise."""
    for name, values in CREATE_ENUMS:
        if name in given and given[name] not in values:
            raise CreateRefused(f"Parameter '{name}' does not accept value '{given[name]}'")
    secret = given.get("key-secret")
    if secret is None:
        raise CreateRefused(f"Parameter '{prefix}key-secret' is required for cipher")
    if secret not in secrets:
        raise CreateRefused(f"No secret with id '{secret}'")
    algorithm = given.get("cipher-alg", "aes-256")
    luks_name, key_bytes = CREATE_CIPHERS[algorithm]
    if luks_name is None:
        raise CreateRefused(f"Algorithm '{algorithm}' not supported")
    if given.get("ivgen-alg", "plain64") == "essiv":
        digest = HASH_DIGEST_BYTES[given.get("ivgen-hash-alg", "sha256")]
        if digest != key_bytes and luks_name not in ESSIV_FAMILIES:
            raise CreateRefused(f"Cipher {algorithm} not supported with essiv")
        if digest != key_bytes and digest not in CIPHER_KEY_BYTES[luks_name]:
            raise CreateRefused(f"No {ESSIV_FAMILIES[luks_name]} cipher with key size {digest} available")
    mode = given.get("cipher-mode", "xts")
    if mode == "xts":
        if luks_name == "cast5":  # a 64-bit block: no XTS
            raise CreateRefused("Unsupported cipher mode xts")
        key_bytes *= 2
    area = -(-(key_bytes * STRIPES) // SECTOR)  # sectors of one slot's key material
    area = -(-area // KEY_AREA_ALIGN) * KEY_AREA_ALIGN
    return (KEY_AREA_ALIGN + KEY_SLOTS * area) * SECTOR
