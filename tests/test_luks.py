"""luks: LUKS1 against qemu-img (images made by qemu-img and by cryptsetup),
LUKS2 against cryptsetup's own facts, and a malformed header for every rule.

qemu-img 7.2 probes LUKS2 as raw (its luks driver opens LUKS1 only), and so
does our qemu-img-shaped JSON, key for key; our reading (format "luks",
version 2, the payload's size, the encryption) is under our own key and is
checked against ``cryptsetup luksDump``.
"""

from __future__ import annotations

import hashlib
import json
import struct
import subprocess
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from storprobe import ProbeError, TruncatedHeader, probe
from storprobe.luks1 import LUKS1_HEADER_SIZE, luks_specific
from storprobe.qemu_json import EXTRA_KEY, to_qemu_json

from oracle import assert_same_as_qemu, code_of, probe_or_named_error, qemu_img_error, qemu_info, require, run

SECRET = ("--object", "secret,id=s0,data=pw")
SLOT0 = 208  # first LUKS1 key slot; each is 48 bytes


# ---- image makers ---------------------------------------------------------


def qemu_luks(path: Path, size: str = "16M", *options: str) -> Path:
    """A LUKS1 image made by ``qemu-img create -f luks`` (fast key derivation)."""
    opts = ",".join(("key-secret=s0", "iter-time=10", *options))
    run("qemu-img", "create", "-q", "-f", "luks", *SECRET, "-o", opts, path, size)
    return path


def cryptsetup_format(path: Path, size: int, *options: str) -> Path:
    """``cryptsetup luksFormat`` on a plain file (no root, no device-mapper, no locks)."""
    require("cryptsetup")
    key = path.with_suffix(".key")
    key.write_bytes(b"pw")
    with open(path, "wb") as f:
        f.truncate(size)
    flags = ("--batch-mode", "--disable-locks", "--key-file", key, "--pbkdf-force-iterations", "1000")
    run("cryptsetup", "luksFormat", *flags, *options, path)
    return path


def luks2_json(path: Path) -> dict:
    return json.loads(run("cryptsetup", "luksDump", "--disable-locks", "--dump-json-metadata", path).stdout)


@pytest.fixture(scope="module")
def small_luks1(tmp_path_factory) -> bytes:
    """A qemu-made LUKS1 image with a 4 KiB payload, as bytes."""
    return qemu_luks(tmp_path_factory.mktemp("luks") / "small.luks", "4K").read_bytes()


@pytest.fixture(scope="module")
def small_luks2(tmp_path_factory) -> bytes:
    """A cryptsetup LUKS2 image: 16 KiB headers, 512 KiB keyslots area, 1 MiB payload at 1 MiB."""
    path = tmp_path_factory.mktemp("luks") / "small.luks2"
    layout = ("--luks2-keyslots-size", "512k", "--offset", "2048")
    cryptsetup_format(path, 2 << 20, "--type", "luks2", "--pbkdf", "pbkdf2", *layout)
    return path.read_bytes()



# ---- LUKS1 against qemu-img -----------------------------------------------


@pytest.mark.parametrize(
    "options",
    [
        (),
        ("cipher-alg=aes-128", "cipher-mode=cbc", "ivgen-alg=essiv", "ivgen-hash-alg=sha256"),
        ("cipher-alg=twofish-256",),
        ("cipher-alg=serpent-128", "cipher-mode=cbc", "ivgen-alg=essiv", "ivgen-hash-alg=md5"),
        ("cipher-alg=cast5-128", "cipher-mode=cbc", "ivgen-alg=plain", "hash-alg=sha1"),
        ("cipher-alg=aes-192", "cipher-mode=xts", "hash-alg=sha512"),
    ],
    ids=lambda o: ",".join(o) or "defaults",
)
def test_qemu_made_luks_matches_qemu_img(tmp_path, options):
    path = qemu_luks(tmp_path / "a.luks", "16M", *options)
    mine = assert_same_as_qemu(path)
    assert mine["format"] == "luks" and mine["encrypted"] is True
    assert mine["virtual-size"] == 16 << 20
    # and in qemu-img's key order, so the printed JSON reads the same
    specific, theirs = mine["format-specific"]["data"], qemu_info(path)["format-specific"]["data"]
    assert list(specific) == list(theirs)
    assert [list(slot) for slot in specific["slots"]] == [list(slot) for slot in theirs["slots"]]


@pytest.mark.parametrize(
    "options",
    [(), ("--cipher", "aes-cbc-essiv:sha256", "--key-size", "256", "--hash", "sha1")],
    ids=["defaults", "cbc-essiv"],
)
def test_cryptsetup_luks1_matches_qemu_img(tmp_path, options):
    path = cryptsetup_format(tmp_path / "c.luks", 16 << 20, "--type", "luks1", *options)
    mine = assert_same_as_qemu(path)
    payload = mine["format-specific"]["data"]["payload-offset"]
    assert mine["virtual-size"] == path.stat().st_size - payload


def _patched(data: bytes, *patches: tuple[int, bytes]) -> bytes:
    buf = bytearray(data)
    for offset, value in patches:
        buf[offset : offset + len(value)] = value
    return bytes(buf)


def _name(offset: int, text: str) -> tuple[int, bytes]:
    """A 32-byte NUL-padded string field."""
    return offset, text.encode().ljust(32, b"\0")


def _u32(offset: int, value: int) -> tuple[int, bytes]:
    return offset, struct.pack(">I", value)


# Cipher specs QEMU accepts but qemu-img create cannot make (ECB/CTR) or that
# exercise the XTS key halving and ESSIV's key-size rule: we patch them into a
# qemu-made header and let qemu-img judge the result.
@pytest.mark.parametrize(
    "cipher, mode, key_bytes, hash_alg",
    [
        ("aes", "ecb-plain", 32, "sha256"),
        ("aes", "ctr-plain64", 16, "ripemd160"),
        ("aes", "cbc-essiv:md5", 32, "sha224"),
        ("aes", "xts-essiv:sha256", 64, "sha384"),
        ("aes", "xts-plain64:sha1", 48, "md5"),  # a hash after a non-essiv generator is ignored
        ("cast5", "xts-plain64", 32, "sha256"),
        ("cast5", "cbc-essiv:md5", 16, "sha256"),
        ("twofish", "cbc-plain", 24, "sha256"),
        ("aes", "xts-plain64", 33, "sha256"),  # QEMU halves odd XTS sizes too: 33 -> aes-128
    ],
)
def test_cipher_specs_match_qemu_img(tmp_path, small_luks1, cipher, mode, key_bytes, hash_alg):
    path = tmp_path / "p.luks"
    path.write_bytes(
        _patched(small_luks1, _name(8, cipher), _name(40, mode), _u32(108, key_bytes), _name(72, hash_alg))
    )
    assert_same_as_qemu(path)


def test_qcow2_embedded_header(tmp_path):
    """luks_specific() on the LUKS header inside a qcow2 gives qemu-img's ``encrypt`` object."""
    path = tmp_path / "e.qcow2"
    options = "encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=10"
    run("qemu-img", "create", "-q", "-f", "qcow2", *SECRET, "-o", options, path, "16M")
    encrypt = dict(qemu_info(path)["format-specific"]["data"]["encrypt"])
    assert encrypt.pop("format") == "luks"
    data = path.read_bytes()
    start = data.index(b"LUKS\xba\xbe")
    assert luks_specific(data[start : start + LUKS1_HEADER_SIZE]) == encrypt


@pytest.mark.parametrize("cut, expected", [(0, 4096), (4096, 0), (4096 + 100, 0), (-100, 4096 + 512)])
def test_luks1_size_in_whole_sectors(tmp_path, small_luks1, cut, expected):
    """qemu-img counts the file in whole 512-byte sectors, then takes off the payload
    offset; a payload starting at (or within the last sector before) the end is empty."""
    path = tmp_path / "cut.luks"
    path.write_bytes(small_luks1[: len(small_luks1) - cut] if cut > 0 else small_luks1 + bytes(-cut))
    assert assert_same_as_qemu(path)["virtual-size"] == expected


# ---- LUKS1 rules -------------------------------------------------------------

LUKS1_RULES = {
    "unterminated-string": [(8, b"a" * 32)],
    "payload-offset": [_u32(104, 1)],
    "master-key-iterations": [_u32(164, 0)],
    "slot-stripes": [_u32(SLOT0 + 7 * 48 + 44, 3999)],  # an inactive slot is checked too
    "slot-state": [_u32(SLOT0 + 48, 1)],
    "slot-iterations": [_u32(SLOT0 + 4, 0)],
    "slot-offset": [_u32(SLOT0 + 40, 7)],
    "slot-overlaps-payload": [_u32(SLOT0 + 7 * 48 + 40, 4000)],
    "slot-overlap": [_u32(SLOT0 + 48 + 40, 100)],  # slot 0 holds sectors 8..511
    "cipher-mode-format": [_name(40, "xts")],
    "iv-hash": [_name(40, "xts-plain64:whirlpool")],
    "cipher-mode": [_name(40, "CBC-plain")],
    "cipher": [_name(8, "des")],
    "key-bytes": [_u32(108, 16)],  # an XTS key of 16 bytes is two 8-byte AES keys
    "hash": [_name(72, "SHA256")],
    "ivgen": [_name(40, "xts-plain65")],
    "essiv-hash": [_name(40, "cbc-essiv"), _u32(108, 32)],
    "essiv-cipher": [_name(40, "cbc-essiv:sha1"), _u32(108, 32)],
    "payload-beyond-end": [_u32(104, 0xFFFFFFFF)],
}


@pytest.mark.parametrize("rule", LUKS1_RULES)
def test_luks1_rule(tmp_path, small_luks1, rule):
    """Each rule gives its own code, and qemu-img refuses the same file."""
    data = _patched(small_luks1, *LUKS1_RULES[rule])
    assert code_of(data) == f"luks.{rule}"
    path = tmp_path / "bad.luks"
    path.write_bytes(data)
    proc = subprocess.run([require("qemu-img"), "info", "--output=json", str(path)], capture_output=True)
    assert proc.returncode != 0, proc.stdout


def test_slot_far_past_the_payload_is_refused_where_qemu_wraps(tmp_path, small_luks1):
    """A key slot whose material starts near 2**32 sectors lies past the
    payload, and storprobe says so; QEMU adds the slot's length in 32-bit
    arithmetic, wraps to a small sector and opens the file (found by a
    differential campaign against qemu-img). The spec wins."""
    data = _patched(small_luks1, _u32(SLOT0 + 2 * 48 + 40, 2**32 - 129))
    assert code_of(data) == "luks.slot-overlaps-payload"
    path = tmp_path / "wrapped.luks"
    path.write_bytes(data)
    assert qemu_img_error(path) is None


def test_luks_specific_checks_magic_and_version(small_luks1):
    header = small_luks1[:LUKS1_HEADER_SIZE]
    for patch, code in (((0, b"LUKX"), "luks.magic"), ((6, b"\0\2"), "luks.version")):
        with pytest.raises(ProbeError) as err:
            luks_specific(_patched(header, patch))
        assert err.value.code == code
    with pytest.raises(TruncatedHeader):
        luks_specific(header[:-1])


def test_truncated_luks1_header(small_luks1):
    assert code_of(small_luks1[:400]) == "truncated"


@given(edits=st.lists(st.tuples(st.integers(0, LUKS1_HEADER_SIZE - 1), st.integers(0, 255)), min_size=1, max_size=12))
def test_luks1_mutations(small_luks1, edits):
    probe_or_named_error(_patched(small_luks1, *((at, bytes([value])) for at, value in edits)))


# ---- LUKS2 ------------------------------------------------------------------


@pytest.mark.parametrize(
    "size, options",
    [
        (32 << 20, ("--label", "mylabel", "--subsystem", "sub")),
        (8 << 20, ("--luks2-metadata-size", "64k", "--luks2-keyslots-size", "1m", "--offset", "4096",
                   "--sector-size", "512", "--cipher", "aes-cbc-essiv:sha256", "--key-size", "256")),
    ],
    ids=["defaults", "64k-metadata"],
)
def test_luks2_facts_match_cryptsetup(tmp_path, size, options):
    path = cryptsetup_format(tmp_path / "c.luks2", size, "--type", "luks2", "--pbkdf", "pbkdf2", *options)
    info = probe(path)
    meta = luks2_json(path)
    segment = meta["segments"]["0"]
    assert (info.format, info.version, info.encryption) == ("luks", 2, "luks2")
    assert info.virtual_size == size - int(segment["offset"])
    assert info.details["payload-offset"] == int(segment["offset"])
    assert info.details["cipher"] == segment["encryption"]
    assert info.details["sector-size"] == segment["sector_size"]
    assert info.details["keyslots"] == len(meta["keyslots"])
    uuid = run("cryptsetup", "luksUUID", "--disable-locks", path).stdout.decode().strip()
    assert info.details["uuid"] == uuid
    if "--label" in options:
        assert (info.details["label"], info.details["subsystem"]) == ("mylabel", "sub")
    # qemu-img 7.2 does not know LUKS2 and calls it raw: the JSON says what it says.
    theirs = qemu_info(path)
    assert (theirs["format"], theirs["virtual-size"]) == ("raw", size)
    mine = to_qemu_json(info)
    extra = mine.pop(EXTRA_KEY)
    assert mine == theirs
    assert (extra["format"], extra["virtual-size"], extra["encryption"]) == ("luks", info.virtual_size, "luks2")


def _seal(buf: bytearray, offset: int, hdr_size: int) -> None:
    """Recompute the checksum of the LUKS2 header copy at ``offset`` as cryptsetup writes it."""
    alg = bytes(buf[offset + 72 : offset + 104]).split(b"\0")[0].decode()
    buf[offset + 448 : offset + 512] = bytes(64)
    digest = hashlib.new(alg, bytes(buf[offset : offset + hdr_size])).digest()
    buf[offset + 448 : offset + 448 + len(digest)] = digest


def luks2_edit(data: bytes, edit=None, *, text: bytes | None = None, binary=(), second_binary=()) -> bytes:
    """A LUKS2 image with its JSON (both copies) and binary fields edited, then resealed."""
    buf = bytearray(data)
    hdr_size = struct.unpack_from(">Q", buf, 8)[0]
    meta = json.loads(bytes(buf[4096:hdr_size]).split(b"\0")[0])
    if edit is not None:
        edit(meta)
    if text is None:
        text = json.dumps(meta, separators=(",", ":")).encode()
    area = text.ljust(hdr_size - 4096, b"\0")
    for base, patches in ((0, binary), (hdr_size, second_binary)):
        buf[base + 4096 : base + hdr_size] = area
        for offset, value in patches:
            buf[base + offset : base + offset + len(value)] = value
        _seal(buf, base, hdr_size)
    return bytes(buf)


def test_luks2_resealed_copy_still_probes(small_luks2):
    """The test helper itself: an unchanged, resealed image is accepted."""
    assert probe(luks2_edit(small_luks2)).virtual_size == 1 << 20


def test_luks2_fixed_size_segment(small_luks2):
    """A segment with a fixed size (not "dynamic") is exactly that large."""
    data = luks2_edit(small_luks2, lambda m: m["segments"]["0"].update(size="524288"))
    assert probe(data).virtual_size == 524288


def test_luks2_two_segments_at_one_offset(small_luks2):
    """Hostile but well-formed: the first crypt segment is chosen by offset alone."""
    data = luks2_edit(small_luks2, lambda m: m["segments"].update({"1": dict(m["segments"]["0"], size="512")}))
    assert probe(data).details["payload-offset"] == 1 << 20


def _nested(depth: int) -> bytes:
    return b'{"a":' + b"[" * depth + b"]" * depth + b"}"


def _set(path: str, value):
    """An edit that sets meta[path...] = value (a dotted path)."""
    *parents, last = path.split(".")

    def edit(meta):
        for key in parents:
            meta = meta[key]
        meta[last] = value

    return edit


LUKS2_RULES = [
    ("hdr-offset", dict(binary=[(256, struct.pack(">Q", 4096))])),
    ("hdr-size", dict(binary=[(8, struct.pack(">Q", 20480))])),
    ("checksum-alg", dict(binary=[(72, b"md5".ljust(32, b"\0"))])),
    ("json", dict(text=b" {}")),
    ("json", dict(text=b'{"a":1}x')),
    ("json", dict(text=b'{"a":}')),
    ("json", dict(text=b"{\xff}")),
    ("json", dict(text=_nested(5000))),
    ("json-size", dict(edit=_set("config.json_size", "4096"))),
    ("keyslots-size", dict(edit=_set("config.keyslots_size", "1000"))),
    ("keyslots", dict(edit=_set("keyslots", []))),
    ("keyslots", dict(edit=_set("keyslots", {str(i): {} for i in range(33)}))),
    ("segments", dict(edit=_set("segments", {}))),
    ("segment", dict(edit=_set("segments.0.offset", "1048577"))),
    ("segment", dict(edit=_set("segments.0.offset", 1048576))),
    ("segment", dict(edit=_set("segments.0.size", "0"))),
    ("segment", dict(edit=_set("segments.0.sector_size", 100))),
    ("segment", dict(edit=_set("segments.0.encryption", None))),
    ("segment", dict(edit=_set("segments.x", {"type": "linear", "offset": "1048576", "size": "512"}))),
    ("payload-offset", dict(edit=_set("segments.0.offset", "0"))),
    ("payload-offset", dict(edit=_set("segments.0.offset", str(2 * 16384 + 512 * 1024 - 512)))),
    ("payload-beyond-end", dict(edit=_set("segments.0.offset", str(4 << 20)))),
    ("payload-beyond-end", dict(edit=_set("segments.0.size", str(2 << 20)))),
    ("secondary-header", dict(second_binary=[(0, b"LUKS\xba\xbe")])),
    ("secondary-header", dict(second_binary=[(16, struct.pack(">Q", 99))])),
]


@pytest.mark.parametrize("rule, change", LUKS2_RULES, ids=[f"{r}-{i}" for i, (r, _) in enumerate(LUKS2_RULES)])
def test_luks2_rule(small_luks2, rule, change):
    assert code_of(luks2_edit(small_luks2, **change)) == f"luks.{rule}"


@pytest.mark.parametrize("levels, cryptsetup_reads_it", [(31, True), (32, False)])
def test_luks2_json_nesting_limit_is_cryptsetups(small_luks2, tmp_path, levels, cryptsetup_reads_it):
    """cryptsetup's JSON parser (json-c) reads 32 levels of nesting and no more; so
    do we, on every Python (3.11's parser gives up on deep nesting, 3.13's does not)."""
    meta = json.loads(small_luks2[4096:16384].split(b"\0")[0])
    text = json.dumps(meta, separators=(",", ":")).encode()
    text = text[:-1] + b',"x":' + b"[" * levels + b"]" * levels + b"}"  # the root object is level 1
    path = tmp_path / "nested.luks2"
    path.write_bytes(luks2_edit(small_luks2, text=text))
    dumped = subprocess.run(["cryptsetup", "luksDump", path], capture_output=True, check=False)
    assert (dumped.returncode == 0) is cryptsetup_reads_it
    if cryptsetup_reads_it:
        assert probe(path).format == "luks"
    else:
        assert code_of(path) == "luks.json"


def test_luks2_checksums(small_luks2):
    """A flipped byte anywhere in either copy is caught; salts differ between copies."""
    hdr_size = 16384
    assert code_of(_patched(small_luks2, (120, b"\x01"))) == "luks.checksum"  # primary salt
    assert code_of(_patched(small_luks2, (hdr_size - 1, b"\x01"))) == "luks.checksum"  # primary JSON area
    assert code_of(_patched(small_luks2, (hdr_size + 120, b"\x01"))) == "luks.checksum"  # secondary salt
    assert code_of(_patched(small_luks2, (2 * hdr_size - 1, b"\x01"))) == "luks.secondary-header"


def test_luks2_truncated_before_secondary(small_luks2):
    assert code_of(small_luks2[:20000]) == "truncated"


@given(edits=st.lists(st.tuples(st.integers(0, 4095), st.integers(0, 255)), min_size=1, max_size=12))
def test_luks2_binary_mutations(small_luks2, edits):
    probe_or_named_error(_patched(small_luks2, *((at, bytes([value])) for at, value in edits)))


JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()
    | st.text(max_size=6)
    | st.sampled_from(["0", "512", "1048576", "dynamic", "crypt", "99999999999999999999999"]),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.sampled_from(["0", "1", "x"]), inner, max_size=3)
    ),
    max_leaves=6,
)
JSON_PATHS = [
    "config",
    "config.json_size",
    "config.keyslots_size",
    "keyslots",
    "keyslots.0",
    "segments",
    "segments.0",
    "segments.0.offset",
    "segments.0.size",
    "segments.0.type",
    "segments.0.encryption",
    "segments.0.sector_size",
    "segments.0.iv_tweak",
    "segments.1",
]


@given(changes=st.lists(st.tuples(st.sampled_from(JSON_PATHS), JSON_VALUES), min_size=1, max_size=3))
def test_luks2_json_mutations(small_luks2, changes):
    """Random values in the JSON metadata, with valid checksums, so the JSON checks are reached."""

    def edit(meta):
        for path, value in changes:
            try:
                _set(path, value)(meta)
            except (KeyError, TypeError):
                pass

    probe_or_named_error(luks2_edit(small_luks2, edit))
