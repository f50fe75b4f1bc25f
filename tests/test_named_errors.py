"""The catalogue of named errors: per format, every validation rule with the
exact code a probe raises for it, each demonstrated on a malformed image built
here from a real one (qemu-img, cryptsetup, bximage, xorriso) or from the
per-format tests' hand-built images.

``test_catalogue_is_complete`` keeps this file honest: the codes below are
exactly the codes the plugins raise (found in their source), so a new rule
without an entry here, or an entry for a rule that no longer exists, fails.
The codes of ``storprobe check``'s hazards are catalogued in test_safety.py.
"""

from __future__ import annotations

import hashlib
import json
import re
import struct
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import NamedTuple

import pytest

from storprobe import ProbeError, probe

from builders import (
    AUTOCLEAR,
    BACKING_OFFSET,
    BACKING_SIZE,
    BAT,
    CLUSTER_BITS,
    COMPRESSION,
    CRYPT,
    EXT_BACKING_FORMAT,
    EXT_BITMAPS,
    EXT_CRYPTO,
    EXT_FEATURES,
    FILE_PARAMETERS,
    HEADER_LENGTH,
    INCOMPAT,
    L1_OFFSET,
    L1_SIZE,
    LOGICAL_SECTOR_SIZE,
    METADATA,
    NB_SNAPSHOTS,
    PAGE_83,
    REFCOUNT_ORDER,
    REFTABLE_CLUSTERS,
    REFTABLE_OFFSET,
    REGION_TABLE,
    SIZE,
    SNAPSHOTS_OFFSET,
    UNKNOWN,
    VIRTUAL_DISK_SIZE,
    Vhdx,
    bad_parent_locator,
    bitmap_dir,
    build_dmg,
    cloop_bytes,
    conflicting_headers,
    corrupt_both_headers,
    cowd,
    descriptor,
    endless_log_search,
    get,
    in_bitmap_dir,
    in_bitmap_table,
    in_ext,
    in_luks,
    item_entry_field,
    item_value,
    log_with_invalid_descriptor,
    luks_at,
    past_end,
    patch,
    qemu_v2,
    region_entry_field,
    u8,
    u32,
    u64,
    uml_v3,
    with_cid,
)
from oracle import qemu_img_create, require, run

KiB, MiB = 1024, 1024 * 1024
Edit = Callable[[bytearray], object]


class Rule(NamedTuple):
    code: str
    rule: str  # what is broken, in words
    base: str  # a base image of the ``bases`` fixture, or "" for hand-built bytes
    edits: tuple[Edit, ...] = ()
    claimed_size: int | None = None  # probe as a sparse file of this size (zeros after the bytes)


def rule(code: str, text: str, base: str, *edits: Edit, size: int | None = None) -> Rule:
    return Rule(code, text, base, edits, size)


def be(offset: int, fmt: str, value: int | bytes) -> Edit:
    """Pack a big-endian field (negative offset: from the end)."""
    return lambda b: struct.pack_into(">" + fmt, b, offset % len(b), value)


def le(offset: int, fmt: str, value: int | bytes) -> Edit:
    return lambda b: struct.pack_into("<" + fmt, b, offset % len(b), value)


def replace(data: bytes) -> Edit:
    """Replace the whole image (for hand-built bytes)."""

    def edit(b: bytearray) -> None:
        b[:] = data

    return edit


def grow(length: int) -> Edit:
    return lambda b: b.extend(bytes(max(0, length - len(b))))


# ---- format-specific fix-ups ---------------------------------------------------------


def vpc_checksums(b: bytearray) -> None:
    """Refresh the checksum of the footer copy at 0 and of the trailer."""
    for start in (0, len(b) - 512):
        if b[start : start + 8] == b"conectix":
            block = b[start : start + 512]
            struct.pack_into(">I", b, start + 64, ~(sum(block) - sum(block[64:68])) & 0xFFFFFFFF)


def vpc_footer(offset: int, fmt: str, value: int) -> Edit:
    """A footer field in both copies, checksums refreshed."""

    def edit(b: bytearray) -> None:
        for start in (0, len(b) - 512):
            struct.pack_into(">" + fmt, b, start + offset, value)
        vpc_checksums(b)

    return edit


def vhdx(change: Callable[[Vhdx], object]) -> Edit:
    def edit(b: bytearray) -> None:
        image = Vhdx(Path("unused.vhdx"), bytes(b))
        change(image)
        b[:] = image.data

    return edit


LUKS2_CSUM = 448


def luks2(primary: Callable[[bytearray], object] = lambda h: None, meta: Callable[[dict], object] | None = None,
          secondary: Callable[[bytearray], object] = lambda h: None) -> Edit:
    """Edit a LUKS2 header pair: the binary headers and/or the JSON metadata of
    both copies, then recompute both SHA-256 checksums."""

    def edit(b: bytearray) -> None:
        size = struct.unpack_from(">Q", b, 8)[0]
        if meta is not None:
            obj = json.loads(bytes(b[4096:size]).split(b"\0", 1)[0])
            meta(obj)
            text = json.dumps(obj).encode().ljust(size - 4096, b"\0")
            b[4096:size] = b[size + 4096 : 2 * size] = text
        for start, change in ((0, primary), (size, secondary)):
            area = bytearray(b[start : start + size])
            change(area)
            area[LUKS2_CSUM : LUKS2_CSUM + 64] = bytes(64)
            area[LUKS2_CSUM : LUKS2_CSUM + 32] = hashlib.sha256(area).digest()
            b[start : start + size] = area

    return edit


def set_meta(path: str, value: object) -> Callable[[dict], None]:
    """Set a JSON member by a dotted path (``segments.0.offset``)."""

    def change(obj: dict) -> None:
        *parents, last = path.split(".")
        for key in parents:
            obj = obj[key]
        obj[last] = value

    return change


PARALLELS_CLUSTER_SECTORS = 8  # 4 KiB clusters, so an extension cluster fits the small base
PARALLELS_EXT_SECTOR = 128
PARALLELS_EXT_MAGIC, PARALLELS_DIRTY_BITMAP = 0xAB234CEF23DCEA87, 0x20385FAE252CB34A


def parallels_ext(features: bytes, *, magic: int = PARALLELS_EXT_MAGIC, good_sum: bool = True) -> Edit:
    """A Format Extension cluster at sector 128 holding ``features``."""

    def edit(b: bytearray) -> None:
        struct.pack_into("<I", b, 28, PARALLELS_CLUSTER_SECTORS)
        struct.pack_into("<Q", b, 56, PARALLELS_EXT_SECTOR)
        body = features.ljust(PARALLELS_CLUSTER_SECTORS * 512 - 24, b"\0")
        digest = hashlib.md5(body).digest() if good_sum else bytes(16)
        at = PARALLELS_EXT_SECTOR * 512
        b[at : at + 24 + len(body)] = struct.pack("<Q16s", magic, digest) + body

    return edit


def parallels_feature(magic: int, data: bytes, *, flags: int = 0, size: int | None = None) -> bytes:
    length = len(data) if size is None else size
    return struct.pack("<QQI4x", magic, flags, length) + data + bytes(-len(data) % 8)


def parallels_bitmap(sectors: int = 64 * MiB // 512, granularity: int = 128, l1_size: int = 1,
                     size: int | None = None) -> bytes:
    data = struct.pack("<Q16sII", sectors, bytes(16), granularity, l1_size) + bytes(8 * l1_size)
    return parallels_feature(PARALLELS_DIRTY_BITMAP, data, size=size)


# ---- the catalogue -------------------------------------------------------------------


RSRC_DMG = build_dmg(bytes(4096), "rsrc")  # its resource fork starts at 4096, its first resource at 4096 + 256


def cloop(block_size: int, n_blocks: int, entries: int | None = None, offsets: tuple[int, ...] = ()) -> Edit:
    return replace(cloop_bytes(block_size, n_blocks, entries, offsets))


def vmdk_text(*lines: str, create_type: str = "monolithicFlat", head: str | None = None) -> Edit:
    text = descriptor(create_type, *lines) if head is None else descriptor(create_type, *lines, head=head)
    return replace(text)


def kdmv(**fields: int) -> Edit:
    def edit(b: bytearray) -> None:
        b[:] = patch(bytes(b), **fields)

    return edit


def iso_descriptor(index: int, offset: int, fmt: str, value: int | bytes) -> Edit:
    return le(32768 + 2048 * index + offset, fmt, value)


def iso_terminator_gone(b: bytearray) -> None:
    at = next(i for i in range(32768, len(b), 2048) if b[i] == 255)
    b[at + 1 : at + 6] = b"CD002"


CATALOGUE: dict[str, list[Rule]] = {
    "core": [
        rule("truncated", "a field the format needs lies past the end of the file", "qcow2-v3",
             lambda b: b.__delitem__(slice(100, None))),
        rule("unsupported-version", "a known magic with an unknown version", "qcow2-v3", u32(4, 99)),
        rule("read-limit", "a structure larger than the 16 MiB read budget", "qcow2-rich",
             in_ext(EXT_BITMAPS, 8, "Q", 1024 * 65535), size=80 * MiB),
        rule("dmg.size-too-large", "a row's size field beyond QEMU's length limit (FORMAT.size-too-large; dmg's here)",
             "", replace(build_dmg(bytes(4096), sector_count=2**63 // 512))),
    ],
    "bochs": [
        rule("bochs.type", "image type is not Redolog", "bochs", le(32, "16s", b"Nonsense\0")),
        rule("bochs.subtype", "redolog subtype is not Growing", "bochs", le(48, "16s", b"Undoable\0")),
        rule("bochs.catalog-size", "catalog of more than 2^20 entries", "bochs", le(72, "I", 0x100001)),
        rule("bochs.extent-too-small", "extent below 512 bytes", "bochs", le(80, "I", 256)),
        rule("bochs.extent-not-power-of-two", "extent size not a power of two", "bochs", le(80, "I", 1536)),
        rule("bochs.extent-too-large", "extent above 8 MiB", "bochs", le(80, "I", 16 * MiB)),
        rule("bochs.catalog-too-small", "catalog cannot cover the disk", "bochs", le(72, "I", 1)),
        rule("bochs.catalog-beyond-eof", "catalog runs past the end of the file", "bochs", le(72, "I", 0x100000)),
    ],
    "cloop": [
        rule("cloop.block-size", "block size not a multiple of 512", "", cloop(1000, 1)),
        rule("cloop.block-size-zero", "block size 0", "", cloop(0, 1)),
        rule("cloop.block-size-too-large", "block size above 64 MiB", "", cloop(64 * MiB + 512, 1)),
        rule("cloop.n-blocks", "block count above (2^32 - 2) / 8", "", cloop(65536, 2**32 // 8, 0)),
        rule("cloop.offsets-too-large", "offsets table above 512 MiB", "", cloop(65536, 64 * MiB, 0)),
        rule("cloop.offsets-beyond-eof", "offsets table runs past the end of the file", "", cloop(65536, 10, 1)),
        rule("cloop.offsets-order", "an offset below the one before", "", cloop(65536, 3, offsets=(200, 300, 250))),
        rule("cloop.compressed-block-size", "a block of more than 128 MiB compressed", "",
             cloop(65536, 3, offsets=(200, 200 + 2**27 + 1))),
    ],
    "cow": [
        rule("cow.v2-layout", "no 512-byte sector size at any v2 layout's offset", "",
             replace(qemu_v2(1 * MiB)), be(1048, "I", 1024)),
        rule("cow.sector-size", "v3 sector size 0", "", replace(uml_v3(1 * MiB, sectorsize=0))),
        rule("cow.alignment", "v3 alignment 0", "", replace(uml_v3(1 * MiB, alignment=0))),
        rule("cow.bitmap-format", "v3 bitmap format other than 0", "", replace(uml_v3(1 * MiB, cow_format=1))),
    ],
    "dmg": [
        rule("dmg.header-size", "trailer size field is not 512", "", replace(build_dmg(bytes(4096), header_size=1024))),
        rule("dmg.data-fork", "data fork runs past the trailer", "",
             replace(build_dmg(bytes(4096), data_fork_length=1 << 40))),
        rule("dmg.rsrc-fork", "resource fork outside the file before the trailer", "",
             replace(build_dmg(bytes(4096), "rsrc", rsrc_fork_offset=1 << 40))),
        rule("dmg.xml-plist", "XML property list outside the file before the trailer", "",
             replace(build_dmg(bytes(4096), xml_offset=1 << 40))),
        rule("dmg.xml-size", "XML property list above 16 MiB", "",
             replace(build_dmg(bytes(17 * MiB), xml_offset=0, xml_length=16 * MiB + 1))),
        rule("dmg.no-block-map", "neither a resource fork nor an XML property list", "",
             replace(build_dmg(bytes(4096), xml_length=0))),
        rule("dmg.xml-data", "a <data> element of the property list not closed", "",
             replace(build_dmg(bytes(4096)).replace(b"</data>", b"</dat\0>"))),
        rule("dmg.rsrc-data", "resource data outside the resource fork", "",
             replace(RSRC_DMG[:4096] + struct.pack(">I", 1 << 20) + RSRC_DMG[4100:])),
        rule("dmg.resource-size", "a resource of length 0", "",
             replace(RSRC_DMG[: 4096 + 256] + bytes(4) + RSRC_DMG[4096 + 260 :])),
        rule("dmg.chunk-sectors", "a raw chunk of more than 64 MiB of sectors", "",
             replace(build_dmg(bytes(4096), chunk=(1, 131073, 512)))),
        rule("dmg.chunk-length", "a chunk of more than 64 MiB in the data fork", "",
             replace(build_dmg(bytes(4096), chunk=(1, 8, 2**26 + 1)))),
    ],
    "iso": [
        rule("iso.unterminated", "volume descriptor set without a terminator", "iso", iso_terminator_gone),
        rule("iso.descriptor-type", "unknown volume descriptor type", "iso", iso_descriptor(0, 0, "B", 7)),
        rule("iso.no-primary", "no primary volume descriptor", "iso", iso_descriptor(0, 0, "B", 0)),
        rule("iso.both-endian", "little- and big-endian copies of a field differ", "iso",
             iso_descriptor(0, 128, "H", 1024)),
        rule("iso.block-size", "logical block size not 512, 1024 or 2048", "iso",
             iso_descriptor(0, 128, "H", 4096), be(32768 + 130, "H", 4096)),
    ],
    "luks": [
        rule("luks.magic", "embedded LUKS header without its magic", "qcow2-luks", in_luks(5, "B", 0xBF)),
        rule("luks.version", "embedded LUKS header of version 2", "qcow2-luks", in_luks(6, "H", 2)),
        rule("luks.unterminated-string", "cipher name without a NUL", "luks1", be(8, "32s", b"a" * 32)),
        rule("luks.cipher-mode-format", "cipher mode not <mode>-<ivgen>", "luks1", be(40, "32s", b"xts")),
        rule("luks.iv-hash", "unknown IV generator hash", "luks1", be(40, "32s", b"xts-plain64:sha257")),
        rule("luks.cipher-mode", "unknown cipher mode", "luks1", be(40, "32s", b"abc-plain64")),
        rule("luks.cipher", "unknown cipher", "luks1", be(8, "32s", b"des")),
        rule("luks.key-bytes", "key size the cipher does not have", "luks1", be(108, "I", 20)),
        rule("luks.hash", "unknown hash", "luks1", be(72, "32s", b"md4")),
        rule("luks.ivgen", "unknown IV generator", "luks1", be(40, "32s", b"xts-plain65")),
        rule("luks.essiv-hash", "essiv without a hash", "luks1", be(40, "32s", b"xts-essiv")),
        rule("luks.essiv-cipher", "essiv hash digest no key of the cipher", "luks1",
             be(8, "32s", b"cast5"), be(108, "I", 16), be(40, "32s", b"cbc-essiv:sha256")),
        rule("luks.payload-offset", "LUKS1 payload overlapping the header", "luks1", be(104, "I", 2)),
        rule("luks.master-key-iterations", "master key digest iterations 0", "luks1", be(164, "I", 0)),
        rule("luks.slot-stripes", "key slot stripes other than 4000", "luks1", be(208 + 44, "I", 3999)),
        rule("luks.slot-state", "key slot neither active nor disabled", "luks1", be(208 + 48, "I", 1)),
        rule("luks.slot-iterations", "active key slot with 0 iterations", "luks1", be(208 + 4, "I", 0)),
        rule("luks.slot-offset", "key material overlapping the header", "luks1", be(208 + 40, "I", 2)),
        rule("luks.slot-overlaps-payload", "key material overlapping the payload", "luks1",
             lambda b: struct.pack_into(">I", b, 208 + 7 * 48 + 40, get(b, 104, "I") - 8)),
        rule("luks.slot-overlap", "two key slots' material overlapping", "luks1",
             lambda b: struct.pack_into(">I", b, 208 + 48 + 40, get(b, 208 + 40, "I"))),
        rule("luks.payload-beyond-end", "payload starting past the end of the file", "luks1",
             lambda b: struct.pack_into(">I", b, 104, len(b) // 512 + 8)),
        rule("luks.hdr-offset", "LUKS2 primary header claiming another offset", "luks2", be(256, "Q", 1)),
        rule("luks.hdr-size", "LUKS2 header size not a power of two in 16 KiB..4 MiB", "luks2", be(8, "Q", 12345)),
        rule("luks.checksum-alg", "LUKS2 checksum algorithm not supported", "luks2", be(72, "32s", b"md5")),
        rule("luks.checksum", "LUKS2 header checksum mismatch", "luks2", be(24, "B", ord("x"))),
        rule("luks.json", "LUKS2 JSON area not one object", "luks2",
             luks2(meta=lambda m: None), lambda b: b.__setitem__(slice(4096, 4097), b"["),
             lambda b: luks2()(b)),
        rule("luks.json-size", "LUKS2 config.json_size not the header's", "luks2",
             luks2(meta=set_meta("config.json_size", "4096"))),
        rule("luks.keyslots-size", "LUKS2 keyslots_size not a multiple of 4096", "luks2",
             luks2(meta=set_meta("config.keyslots_size", "4097"))),
        rule("luks.keyslots", "LUKS2 keyslots not an object", "luks2", luks2(meta=set_meta("keyslots", []))),
        rule("luks.segments", "LUKS2 without segments", "luks2", luks2(meta=set_meta("segments", {}))),
        rule("luks.segment", "LUKS2 segment with an unaligned offset", "luks2",
             luks2(meta=set_meta("segments.0.offset", "4097"))),
        rule("luks.payload-offset", "LUKS2 data overlapping headers and keyslots", "luks2",
             luks2(meta=set_meta("segments.0.offset", "4096"))),
        rule("luks.secondary-header", "LUKS2 secondary header not a copy", "luks2",
             luks2(secondary=lambda h: h.__setitem__(slice(24, 28), b"diff"))),
    ],
    "parallels": [
        rule("parallels.tracks", "zero sectors per cluster", "parallels", le(28, "I", 0)),
        rule("parallels.cluster-size", "cluster too big", "parallels", le(28, "I", (2**31 - 1) // 513 + 1)),
        rule("parallels.bat-entries", "BAT of more than (2^31 - 1) / 4 entries", "parallels",
             le(32, "I", (2**31 - 1) // 4 + 1)),
        rule("parallels.bat-beyond-eof", "BAT runs past the end of the file", "parallels", le(32, "I", 1 << 20)),
        rule("parallels.data-off-overlaps-bat", "data area overlapping the BAT", "parallels",
             le(32, "I", 200), le(48, "I", 1)),
        rule("parallels.data-off-beyond-eof", "data area past the end of the file", "parallels", le(48, "I", 4096)),
        rule("parallels.size-too-large", "disk above QEMU's length limit", "parallels", le(36, "Q", 2**63 - 1)),
        rule("parallels.ext-beyond-eof", "extension cluster past the end of the file", "parallels",
             le(56, "Q", 1 << 20)),
        rule("parallels.ext-magic", "extension cluster with a wrong magic", "parallels", parallels_ext(b"", magic=1)),
        rule("parallels.ext-checksum", "extension cluster checksum mismatch", "parallels",
             parallels_ext(b"", good_sum=False)),
        rule("parallels.ext-unterminated", "extension without an end-of-features marker", "parallels",
             parallels_ext(parallels_bitmap(l1_size=(4096 - 48 - 32) // 8))),
        rule("parallels.ext-feature-flags", "extension feature with flags", "parallels",
             parallels_ext(parallels_feature(PARALLELS_DIRTY_BITMAP, b"", flags=1))),
        rule("parallels.ext-feature-size", "extension feature past its cluster", "parallels",
             parallels_ext(parallels_feature(PARALLELS_DIRTY_BITMAP, b"", size=1 << 20))),
        rule("parallels.ext-feature-unknown", "unknown extension feature", "parallels",
             parallels_ext(parallels_feature(0x1234, b""))),
        rule("parallels.ext-bitmap-short", "dirty bitmap feature too short", "parallels",
             parallels_ext(parallels_feature(PARALLELS_DIRTY_BITMAP, bytes(8)))),
        rule("parallels.ext-bitmap-size", "dirty bitmap of another disk size", "parallels",
             parallels_ext(parallels_bitmap(sectors=12345))),
        rule("parallels.ext-bitmap-granularity", "dirty bitmap granularity not a power of two", "parallels",
             parallels_ext(parallels_bitmap(granularity=3))),
        rule("parallels.ext-bitmap-l1-size", "dirty bitmap L1 table beyond its feature", "parallels",
             parallels_ext(parallels_feature(
                 PARALLELS_DIRTY_BITMAP, struct.pack("<Q16sII", 64 * MiB // 512, bytes(16), 128, 1000) + bytes(8)))),
    ],
    "qcow": [
        rule("qcow.size-too-small", "size below 2 bytes", "qcow", be(24, "Q", 1)),
        rule("qcow.cluster-bits", "cluster_bits outside 9..16", "qcow", be(32, "B", 8)),
        rule("qcow.l2-bits", "l2_bits outside 6..13", "qcow", be(33, "B", 5)),
        rule("qcow.crypt-method", "unknown crypt method", "qcow", be(36, "I", 2)),
        rule("qcow.size-too-large", "size overflowing the L1 table", "qcow", be(24, "Q", 2**64 - 1)),
        rule("qcow.l1-size", "L1 table above (2^31 - 1) / 8 entries", "qcow",
             be(24, "Q", 2**62), be(32, "B", 9), be(33, "B", 6)),
        rule("qcow.backing-name-length", "backing name above 1023 bytes", "qcow", be(8, "Q", 48), be(16, "I", 2000)),
        rule("qcow.l1-table-offset", "L1 table past QEMU's length limit", "qcow", be(40, "Q", 2**63)),
        rule("qcow.backing-name-offset", "backing name past the end of the file", "qcow",
             be(8, "Q", 10000), be(16, "I", 100)),
    ],
    "qcow2": [
        rule("qcow2.cluster-bits", "cluster_bits outside 9..21", "qcow2-v3", u32(CLUSTER_BITS, 8)),
        rule("qcow2.header-too-short", "v3 header_length below 104", "qcow2-v3", u32(HEADER_LENGTH, 100)),
        rule("qcow2.header-too-large", "header_length beyond the first cluster", "qcow2-v3",
             u32(HEADER_LENGTH, 65536 + 8)),
        rule("qcow2.backing-offset", "backing name offset beyond the first cluster", "qcow2-v3",
             u64(BACKING_OFFSET, 65537)),
        rule("qcow2.compression-type", "unknown compression type", "qcow2-v3", u8(COMPRESSION, 2)),
        rule("qcow2.compression-type-bit", "compression type and its feature bit disagree", "qcow2-v3",
             u64(INCOMPAT, 1 << 3)),
        rule("qcow2.extended-l2-cluster-size", "extended L2 with clusters below 16 KiB", "qcow2-small",
             u64(INCOMPAT, 1 << 4)),
        rule("qcow2.refcount-order", "refcount_order above 6", "qcow2-v3", u32(REFCOUNT_ORDER, 7)),
        rule("qcow2.no-refcount-table", "no refcount table", "qcow2-v3", u32(REFTABLE_CLUSTERS, 0)),
        rule("qcow2.refcount-table-too-large", "refcount table above 8 MiB", "qcow2-v3", u32(REFTABLE_CLUSTERS, 129)),
        rule("qcow2.refcount-table-offset", "refcount table not cluster-aligned", "qcow2-v3",
             u64(REFTABLE_OFFSET, 65536 + 8)),
        rule("qcow2.too-many-snapshots", "more than 65536 snapshots", "qcow2-v3", u32(NB_SNAPSHOTS, 65537)),
        rule("qcow2.snapshot-table-offset", "snapshot table not cluster-aligned", "qcow2-v3",
             u64(SNAPSHOTS_OFFSET, 512)),
        rule("qcow2.l1-too-large", "L1 table above 32 MiB", "qcow2-v3", u32(L1_SIZE, 4 * MiB + 1)),
        rule("qcow2.l1-offset", "L1 table not cluster-aligned", "qcow2-v3", u64(L1_OFFSET, 3 * 65536 + 8)),
        rule("qcow2.image-too-big", "virtual size needing more than 2^31 - 1 L1 entries", "qcow2-v3",
             u64(SIZE, 2**62)),
        rule("qcow2.l1-too-small", "L1 table too small for the virtual size", "qcow2-v3", u64(SIZE, 1 << 30)),
        rule("qcow2.crypt-method", "unknown encryption method", "qcow2-v3", u32(CRYPT, 3)),
        rule("qcow2.size-too-large", "virtual size beyond QEMU's limit", "qcow2-v3", u64(SIZE, 2**64 - 512)),
        rule("qcow2.extension-too-large", "header extension overrunning its area", "qcow2-v3",
             in_ext(EXT_FEATURES, -4, "I", 65536)),
        rule("qcow2.backing-format-too-long", "backing format name above 15 bytes", "qcow2-rich",
             in_ext(EXT_BACKING_FORMAT, -4, "I", 16)),
        rule("qcow2.backing-name-too-long", "backing name above 1023 bytes", "qcow2-rich", u32(BACKING_SIZE, 1024)),
        rule("qcow2.crypto-header-unexpected", "encryption header pointer without LUKS", "qcow2-luks", u32(CRYPT, 1)),
        rule("qcow2.crypto-header-size", "encryption header pointer of a wrong size", "qcow2-luks",
             in_ext(EXT_CRYPTO, -4, "I", 24)),
        rule("qcow2.crypto-header-offset", "LUKS header not cluster-aligned", "qcow2-luks",
             in_ext(EXT_CRYPTO, 0, "Q", lambda b: luks_at(b) + 512)),
        rule("qcow2.crypto-header-missing", "LUKS encryption without its header pointer", "qcow2-luks",
             lambda b: struct.pack_into(">I", b, b.index(struct.pack(">I", EXT_CRYPTO), 72), 0x0BADC0DE)),
        rule("qcow2.luks-outside-extension", "LUKS header larger than its reserved area", "qcow2-luks",
             in_ext(EXT_CRYPTO, 8, "Q", 100)),
        rule("qcow2.data-file-raw-without-data-file", "data-file-raw without a data file", "qcow2-v3",
             u64(AUTOCLEAR, 2)),
        rule("qcow2.bitmaps-extension-size", "bitmaps extension of a wrong size", "qcow2-rich",
             in_ext(EXT_BITMAPS, -4, "I", 16)),
        rule("qcow2.bitmaps-reserved", "bitmaps extension reserved field set", "qcow2-rich",
             in_ext(EXT_BITMAPS, 4, "I", 1)),
        rule("qcow2.too-many-bitmaps", "more than 65535 bitmaps", "qcow2-rich", in_ext(EXT_BITMAPS, 0, "I", 65536)),
        rule("qcow2.no-bitmaps", "bitmaps extension with zero bitmaps", "qcow2-rich", in_ext(EXT_BITMAPS, 0, "I", 0)),
        rule("qcow2.bitmap-directory-offset", "bitmap directory not cluster-aligned", "qcow2-rich",
             in_ext(EXT_BITMAPS, 16, "Q", lambda b: bitmap_dir(b)[2] + 8)),
        rule("qcow2.bitmap-directory-too-large", "bitmap directory above 64 MiB", "qcow2-rich",
             in_ext(EXT_BITMAPS, 8, "Q", 1024 * 65535 + 1)),
        rule("qcow2.bitmap-directory-empty", "bitmap directory of size 0", "qcow2-rich",
             in_ext(EXT_BITMAPS, 8, "Q", 0)),
        rule("qcow2.bitmap-directory-beyond-file", "bitmap directory past the end of the file", "qcow2-rich",
             in_ext(EXT_BITMAPS, 16, "Q", past_end)),
        rule("qcow2.bitmap-directory-broken", "bitmap directory ending inside an entry", "qcow2-rich",
             in_ext(EXT_BITMAPS, 8, "Q", 16)),
        rule("qcow2.bitmap-count", "directory entries and bitmap count disagree", "qcow2-rich",
             in_ext(EXT_BITMAPS, 0, "I", 1)),
        rule("qcow2.bitmap-extra-data", "bitmap with extra data", "qcow2-rich", in_bitmap_dir(20, "I", 8)),
        rule("qcow2.bitmap-entry", "bitmap entry breaking QEMU's constraints", "qcow2-rich",
             in_bitmap_dir(17, "B", 8)),
        rule("qcow2.bitmap-duplicate-name", "two bitmaps with one name", "qcow2-rich",
             in_bitmap_dir(32 + 24 + 1, "B", ord("0"))),
        rule("qcow2.bitmap-table-size", "bitmap table of a size not fitting the disk", "qcow2-rich",
             in_bitmap_dir(8, "I", 2)),
        rule("qcow2.bitmap-table-entry", "bitmap table entry with reserved bits", "qcow2-rich", in_bitmap_table(2)),
        rule("qcow2.snapshot-extra-data-too-large", "snapshot extra data above 1 KiB", "qcow2-rich",
             lambda b: struct.pack_into(">I", b, get(b, SNAPSHOTS_OFFSET, "Q") + 36, 1025)),
        rule("qcow2.snapshot-table-too-large", "snapshot table above 64 MiB", "qcow2-v3",
             u32(NB_SNAPSHOTS, 65536), u64(SNAPSHOTS_OFFSET, 1 * MiB), grow(1 * MiB),
             lambda b: b.extend((struct.pack(">QIHHIIQII", 0, 0, 0, 0, 0, 0, 0, 0, 1024) + bytes(1024)) * 65536)),
        rule("qcow2.snapshot-table-beyond-file", "snapshot table past the end of the file", "qcow2-rich",
             u64(SNAPSHOTS_OFFSET, 1 << 30)),
    ],
    "qed": [
        rule("qed.features", "unknown feature bits", "qed", le(16, "Q", 0x100)),
        rule("qed.cluster-size", "cluster size not a power of two in 4 KiB..64 MiB", "qed", le(4, "I", 1000)),
        rule("qed.table-size", "table size not a power of two in 1..16", "qed", le(8, "I", 3)),
        rule("qed.image-size-unaligned", "image size not a multiple of 512", "qed", le(48, "Q", 100)),
        rule("qed.image-size-too-large", "image size beyond what the tables map", "qed", le(48, "Q", 2**62)),
        rule("qed.l1-table-alignment", "L1 table not cluster-aligned", "qed",
             lambda b: struct.pack_into("<Q", b, 40, struct.unpack_from("<Q", b, 40)[0] + 1)),
        rule("qed.l1-table-in-header", "L1 table inside the header", "qed", le(40, "Q", 0)),
        rule("qed.l1-table-beyond-eof", "L1 table past the end of the file", "qed", le(40, "Q", 1 << 40)),
        rule("qed.header-size", "header above 4 GiB", "qed", le(4, "I", 64 * MiB), le(12, "I", 64),
             le(40, "Q", 64 * 64 * MiB), size=64 * 64 * MiB + 4 * 64 * MiB),
        rule("qed.backing-name-offset", "backing name outside the header clusters", "qed",
             le(16, "Q", 1), le(56, "I", 65536), le(60, "I", 10)),
        rule("qed.backing-name-length", "backing name above 4095 bytes", "qed",
             le(16, "Q", 1), le(56, "I", 0), le(60, "I", 5000)),
    ],
    "vdi": [
        rule("vdi.disk-size", "disk size above QEMU's limit", "vdi", le(0x170, "Q", 2**62)),
        rule("vdi.bmap-alignment", "block map offset not sector-aligned", "vdi", le(0x154, "I", 513)),
        rule("vdi.data-alignment", "data offset not sector-aligned", "vdi", le(0x158, "I", 513)),
        rule("vdi.sector-size", "sector size other than 512", "vdi", le(0x168, "I", 4096)),
        rule("vdi.block-size", "block size other than 1 MiB", "vdi", le(0x178, "I", 2 * MiB)),
        rule("vdi.blocks-in-image", "blocks cannot hold the disk", "vdi", le(0x180, "I", 1)),
        rule("vdi.link-uuid", "a link to a parent (differencing)", "vdi", le(0x1A8, "16s", b"\1" * 16)),
        rule("vdi.parent-uuid", "a parent modification (differencing)", "vdi", le(0x1B8, "16s", b"\1" * 16)),
        rule("vdi.blocks-max", "more blocks than QEMU allows", "vdi", le(0x180, "I", (0x80000000 - 512) // 4 + 1)),
        rule("vdi.image-type", "unknown image type", "vdi", le(0x4C, "I", 7)),
        rule("vdi.blocks-allocated", "more blocks allocated than in the image", "vdi", le(0x184, "I", 65)),
        rule("vdi.bmap-beyond-file", "block map past the end of the file", "vdi", le(0x180, "I", 1 << 20)),
        rule("vdi.data-beyond-file", "allocated blocks past the end of the file", "vdi", le(0x184, "I", 64)),
    ],
    "vhdx": [
        rule("vhdx.no-valid-header", "neither header valid", "vhdx", vhdx(corrupt_both_headers)),
        rule("vhdx.header-conflict", "valid headers with one sequence number that differ", "vhdx",
             vhdx(conflicting_headers)),
        rule("vhdx.log-offset", "log offset not a non-zero multiple of 1 MiB", "vhdx",
             vhdx(lambda v: v.both_headers(72, "<Q", 1536 * KiB))),
        rule("vhdx.log-version", "log version other than 0", "vhdx", vhdx(lambda v: v.both_headers(64, "<H", 1))),
        rule("vhdx.log-length", "log length not a multiple of 1 MiB", "vhdx",
             vhdx(lambda v: (v.both_headers(48, "16s", b"\1" * 16), v.both_headers(68, "<I", 1536 * KiB)))),
        rule("vhdx.log-beyond-file", "log past the end of the file", "vhdx",
             vhdx(lambda v: v.both_headers(72, "<Q", 64 * MiB))),
        rule("vhdx.log-descriptor", "log entry with an invalid descriptor", "vhdx", vhdx(log_with_invalid_descriptor)),
        rule("vhdx.log-loop", "log entry QEMU's search reads again for ever", "vhdx", vhdx(endless_log_search)),
        rule("vhdx.region-checksum", "region table checksum mismatch", "vhdx",
             vhdx(lambda v: v.put(REGION_TABLE + 100, "B", 1))),
        rule("vhdx.region-signature", "region table without its signature", "vhdx",
             vhdx(lambda v: v.regions(0, "4s", b"reg1"))),
        rule("vhdx.region-count", "more than 2047 region table entries", "vhdx",
             vhdx(lambda v: v.regions(8, "<I", 2048))),
        rule("vhdx.region-overlap", "regions overlapping", "vhdx",
             vhdx(region_entry_field(METADATA, 16, "<Q", 2 * MiB))),
        rule("vhdx.region-beyond-file", "region past the end of the file", "vhdx",
             vhdx(region_entry_field(METADATA, 16, "<Q", 8 * MiB))),
        rule("vhdx.region-duplicate", "a region listed twice", "vhdx",
             vhdx(region_entry_field(BAT, 0, "16s", METADATA))),
        rule("vhdx.region-required", "unknown required region", "vhdx",
             vhdx(lambda v: (region_entry_field(BAT, 0, "16s", UNKNOWN)(v),
                             region_entry_field(UNKNOWN, 28, "<I", 1)(v)))),
        rule("vhdx.region-missing", "no BAT region", "vhdx", vhdx(region_entry_field(BAT, 0, "16s", UNKNOWN))),
        rule("vhdx.metadata-signature", "metadata table without its signature", "vhdx",
             vhdx(lambda v: v.put(v.metadata, "8s", b"metadatA"))),
        rule("vhdx.metadata-count", "more than 2047 metadata entries", "vhdx",
             vhdx(lambda v: v.put(v.metadata + 10, "<H", 2048))),
        rule("vhdx.metadata-required", "unknown required metadata item", "vhdx",
             vhdx(lambda v: (item_entry_field(PAGE_83, 0, "16s", UNKNOWN)(v),
                             item_entry_field(UNKNOWN, 24, "<I", 4)(v)))),
        rule("vhdx.metadata-duplicate", "a metadata item listed twice", "vhdx",
             vhdx(item_entry_field(PAGE_83, 0, "16s", FILE_PARAMETERS))),
        rule("vhdx.metadata-item-range", "metadata item outside its region", "vhdx",
             vhdx(item_entry_field(VIRTUAL_DISK_SIZE, 16, "<I", 1 * MiB))),
        rule("vhdx.metadata-missing", "a required metadata item missing", "vhdx",
             vhdx(lambda v: (item_entry_field(PAGE_83, 0, "16s", UNKNOWN)(v),
                             item_entry_field(UNKNOWN, 24, "<I", 0)(v)))),
        rule("vhdx.parent-locator-missing", "differencing disk without a parent locator", "vhdx",
             vhdx(lambda v: v.put(v.item(FILE_PARAMETERS) + 4, "<I", 2))),
        rule("vhdx.block-size", "block size not a power of two in 1..256 MiB", "vhdx",
             vhdx(item_value(FILE_PARAMETERS, "<I", 3 * MiB))),
        rule("vhdx.logical-sector-size", "logical sector size not 512 or 4096", "vhdx",
             vhdx(item_value(LOGICAL_SECTOR_SIZE, "<I", 1024))),
        rule("vhdx.virtual-size", "virtual size above 64 TiB", "vhdx",
             vhdx(item_value(VIRTUAL_DISK_SIZE, "<Q", 64 * 1024**4 + 512))),
        rule("vhdx.virtual-size-alignment", "virtual size not a whole number of sectors", "vhdx",
             vhdx(item_value(VIRTUAL_DISK_SIZE, "<Q", 64 * MiB + 100))),
        rule("vhdx.bat-too-small", "BAT region too small for the disk", "vhdx",
             vhdx(region_entry_field(BAT, 24, "<I", 32))),
        rule("vhdx.truncated", "a block past the end of the file", "vhdx",
             vhdx(lambda v: v.put(v.region_offset(BAT), "<Q", (64 * MiB) | 6))),
        rule("vhdx.block-overlap", "a payload block inside the metadata region", "vhdx-1m",
             vhdx(lambda v: v.put(v.region_offset(BAT), "<Q", v.metadata | 6))),
        rule("vhdx.parent-locator", "parent locator listing more entries than it holds", "vhdx",
             vhdx(bad_parent_locator)),
    ],
    "vmdk": [
        rule("vmdk.descriptor-offset", "embedded descriptor not at sector 1", "vmdk-sparse", kdmv(desc_offset=2)),
        rule("vmdk.descriptor-size", "descriptor above 1 MiB", "vmdk-sparse", kdmv(desc_size=2048)),
        rule("vmdk.descriptor-range", "embedded descriptor past the end of the file", "vmdk-sparse",
             kdmv(desc_size=1000)),
        rule("vmdk.footer", "header pointing at a missing footer", "vmdk-sparse", kdmv(gd_offset=2**64 - 1)),
        rule("vmdk.gtes-per-gt", "grain table entries outside 1..512", "vmdk-sparse", kdmv(num_gtes_per_gt=513)),
        rule("vmdk.grain-size", "grain not a power of two up to 1 GiB", "vmdk-sparse", kdmv(grain_size=24)),
        rule("vmdk.capacity", "capacity overflowing 64 bits of bytes", "vmdk-sparse",
             kdmv(capacity=(1 << 54) + 1, grain_size=0x200000)),
        rule("vmdk.l1-size", "grain directory above 2^25 entries", "vmdk-sparse",
             kdmv(capacity=1 << 50, num_gtes_per_gt=1, grain_size=1)),
        rule("vmdk.overhead", "grains starting past the end of the file", "vmdk-sparse", kdmv(overhead=10**6)),
        rule("vmdk.gd-offset", "grain directory past QEMU's length limit", "vmdk-sparse", kdmv(gd_offset=2**54)),
        rule("vmdk.rgd-offset", "redundant grain directory in use past QEMU's length limit", "vmdk-sparse",
             kdmv(flags=3, rgd_offset=2**54)),
        rule("vmdk.create-type", "unsupported createType", "", vmdk_text('RW 8 FLAT "f" 0', create_type="custom")),
        rule("vmdk.create-type-missing", "descriptor without a createType", "",
             replace(b'version=1\nCID=1\nparentCID=1\nRW 8 FLAT "f" 0\n')),
        rule("vmdk.no-extents", "descriptor without an extent QEMU opens", "", vmdk_text()),
        rule("vmdk.extent-line", "invalid extent line", "", vmdk_text('RW 8 FLAT "f"')),
        rule("vmdk.extent-count", "more than 32768 extent lines", "", vmdk_text(*['RW 1 FLAT "f" 0'] * 32769)),
        rule("vmdk.cid", "CID not a 32-bit hex number", "",
             vmdk_text('RW 8 FLAT "f" 0', head=with_cid("123456789"))),
        rule("vmdk.parent-hint", "unterminated parentFileNameHint", "",
             vmdk_text('RW 8 FLAT "f" 0', 'parentFileNameHint="base.vmdk')),
        rule("vmdk.grain-size", "COWD grain of 0 sectors", "", replace(cowd(grain=0))),
    ],
    "vpc": [
        rule("vpc.checksum", "footer checksum mismatch", "vpc", be(8, "I", 3)),
        rule("vpc.disk-type", "disk type other than 2, 3, 4", "vpc", vpc_footer(60, "I", 5)),
        rule("vpc.fixed-copy", "footer copy at 0 claiming a fixed disk", "vpc", be(60, "I", 2), vpc_checksums),
        rule("vpc.missing-copy", "dynamic disk without its footer copy at 0", "vpc", be(0, "8s", b"conectiX")),
        rule("vpc.too-large", "disk above 2040 GiB", "vpc", vpc_footer(28, "4s", b"win "),
             vpc_footer(48, "Q", 1 << 42)),
        rule("vpc.data-offset", "dynamic header past the end of the file", "vpc", vpc_footer(16, "Q", 1 << 40)),
        rule("vpc.dynamic-magic", "dynamic header without its cookie", "vpc", be(512, "8s", b"cxsparsE")),
        rule("vpc.block-size", "block size not a power of two of at least 512", "vpc", be(512 + 32, "I", 1000)),
        rule("vpc.table-entries", "block allocation table too large", "vpc", be(512 + 28, "I", 2**31)),
        rule("vpc.table-too-small", "block allocation table too small for the disk", "vpc", be(512 + 28, "I", 1)),
        rule("vpc.table-offset", "block allocation table past the end of the file", "vpc",
             be(512 + 16, "Q", 1 << 40)),
        rule("vpc.truncated", "a data block past the end of the file", "vpc", be(1536, "I", 1 << 20)),
        rule("vpc.parent-name", "differencing disk without a parent name", "vpc", vpc_footer(60, "I", 4)),
    ],
}


@pytest.fixture(scope="module")
def bases(tmp_path_factory) -> dict[str, bytes]:
    """Real images to break."""
    d = tmp_path_factory.mktemp("bases")
    secret = ("--object", "secret,id=s0,data=pw")
    run("qemu-img", "create", "-q", "-f", "qcow2", *secret, "-o", "encrypt.format=luks,encrypt.key-secret=s0",
        "-o", "encrypt.iter-time=10", d / "luks.qcow2", "64M")
    run("qemu-img", "create", "-q", "-f", "luks", *secret, "-o", "key-secret=s0,iter-time=10", d / "a.luks", "16M")
    made = {
        "qcow2-v3": qemu_img_create(d / "v3.qcow2", "qcow2", "64M"),
        "qcow2-small": qemu_img_create(d / "small.qcow2", "qcow2", "64M", "cluster_size=8k"),
        "qcow2-rich": qemu_img_create(d / "rich.qcow2", "qcow2", "64M", "backing_file=v3.qcow2,backing_fmt=qcow2"),
        "qcow2-luks": d / "luks.qcow2",
        "luks1": d / "a.luks",
        "qcow": qemu_img_create(d / "a.qcow", "qcow", "64M"),
        "qed": qemu_img_create(d / "a.qed", "qed", "64M"),
        "vdi": qemu_img_create(d / "a.vdi", "vdi", "64M"),
        "vpc": qemu_img_create(d / "a.vhd", "vpc", "64M"),
        "vhdx": qemu_img_create(d / "a.vhdx", "vhdx", "64M"),
        "vhdx-1m": qemu_img_create(d / "b.vhdx", "vhdx", "64M", "block_size=1M"),
        "vmdk-sparse": qemu_img_create(d / "a.vmdk", "vmdk", "64M"),
        "parallels": qemu_img_create(d / "a.hdd", "parallels", "64M"),
    }
    for name in ("b0", "b1"):
        run("qemu-img", "bitmap", "--add", made["qcow2-rich"], name)
    run("qemu-img", "snapshot", "-c", "s1", made["qcow2-rich"])
    return {name: path.read_bytes() for name, path in made.items()}


@pytest.fixture(scope="module")
def tool_bases(tmp_path_factory) -> dict[str, Callable[[], bytes]]:
    """Images from other tools, made on first use (a missing tool skips only its rules)."""
    d = tmp_path_factory.mktemp("tools")

    def luks2() -> bytes:
        path = d / "luks2.img"
        path.write_bytes(bytes(20 * MiB))
        run("cryptsetup", "luksFormat", "--type", "luks2", "--batch-mode", "--key-file", "-", "--pbkdf", "pbkdf2",
            "--pbkdf-force-iterations", "1000", path, input=b"pw")
        return path.read_bytes()

    def bochs() -> bytes:
        run("bximage", "-q", "-func=create", "-hd=10M", "-imgmode=growing", d / "a.bochs")
        return (d / "a.bochs").read_bytes()

    def iso() -> bytes:
        (d / "tree").mkdir(exist_ok=True)
        (d / "tree" / "hello.txt").write_text("hello\n")
        run("xorriso", "-as", "mkisofs", "-quiet", "-o", d / "a.iso", d / "tree")
        return (d / "a.iso").read_bytes()

    return {name: cache(make) for name, make in (("luks2", luks2), ("bochs", bochs), ("iso", iso))}


class Sparse:
    """The bytes, then zeros up to a claimed size: a sparse file without the disk space."""

    file_type, stat, name = "file", None, "<sparse>"

    def __init__(self, data: bytes, size: int) -> None:
        self.data, self._size = data, size

    def size(self) -> int:
        return self._size

    def read_at(self, offset: int, length: int) -> bytes:
        length = max(0, min(length, self._size - offset))
        chunk = self.data[offset : offset + length]
        return chunk + bytes(length - len(chunk))

    def close(self) -> None:
        """Nothing to release."""


CASES = [(fmt, r) for fmt, rules in CATALOGUE.items() for r in rules]


@pytest.mark.parametrize("fmt, case", CASES, ids=[f"{fmt}:{r.code}:{r.rule}" for fmt, r in CASES])
def test_rule_has_its_code(bases, tool_bases, fmt, case):
    if case.base in tool_bases:
        require({"luks2": "cryptsetup", "bochs": "bximage", "iso": "xorriso"}[case.base])
        data = bytearray(tool_bases[case.base]())
    else:
        data = bytearray(bases[case.base] if case.base else b"")
    for edit in case.edits:
        edit(data)
    target = Sparse(bytes(data), case.claimed_size) if case.claimed_size else bytes(data)
    with pytest.raises(ProbeError) as exc:
        probe(target)
    assert exc.value.code == case.code, exc.value


PLUGINS = Path(__file__).resolve().parent.parent / "plugins"
HAZARD_NAME = re.compile(r'Hazard\(\s*"([a-z0-9.-]+)"')
#: Core modules that check a format's structures for several plugins, by format.
SHARED = {"luks": [PLUGINS.parent / "storprobe" / "luks1.py"]}


#: Core modules of the data path, whose ``datapath.*`` codes are listed in DATA_PATH.
CORE_DATA_PATH = [PLUGINS.parent / "storprobe" / name for name in ("blockmap.py", "datapath.py", "verify.py")]


def raised_codes() -> set[str]:
    """Every error code named in the plugins' source and the core helpers they
    share (hazard names excluded), and the data path's own (``datapath.*``)."""
    codes = {code for path in CORE_DATA_PATH for code in re.findall(r'"(datapath\.[a-z0-9-]+)"', path.read_text())}
    for path in PLUGINS.glob("*.py"):
        fmt = path.stem
        source = "".join(p.read_text() for p in [path, *SHARED.get(fmt, [])])
        found = set(re.findall(rf'"({fmt}\.[a-z0-9-]+)"', source))
        if fmt == "qcow2":  # rules named through helpers: _invalid("rule", ...) and friends
            for pattern in (r'_invalid\(\s*"([a-z0-9-]+)"', r'_check_table_offset\(\s*\w+,\s*"([a-z0-9-]+)"',
                            r'"([a-z0-9-]+-beyond-file)"'):
                found |= {f"qcow2.{name}" for name in re.findall(pattern, source)}
        codes |= found - set(HAZARD_NAME.findall(source))
    return codes


#: Codes the data path raises (storprobe map, open_image, verify ...), for an image that
#: probes: demonstrated by the tests of that path, in the file named here (on the real
#: images those tests build), not by a probe.
DATA_PATH = {
    "datapath.data-file": "test_open_image.py",
    "datapath.encrypted": "test_open_image.py",
    "datapath.missing-extra": "test_open_image.py",
    "datapath.named-file-missing": "test_map_vmdk_vpc.py",
    "datapath.named-file-not-local": "test_map_vmdk_vpc.py",
    "datapath.named-file-refused": "test_map_vmdk_vpc.py",
    "datapath.named-file-relative": "test_verify_vmdk_extents.py",
    "datapath.too-large": "test_datapath_bounds.py",
    "datapath.unsupported-format": "test_open_image.py",
    "qcow.cluster-offset": "test_differential.py",
    "qcow.cluster-offset-unaligned": "test_open_image.py",
    "qcow.l2-offset": "test_differential.py",
    "qed.cluster-offset": "test_map_vdi_qed_vhdx.py",
    "qed.l2-offset": "test_map_vdi_qed_vhdx.py",
    "vhdx.bat-entry": "test_map_vdi_qed_vhdx.py",
    "vhdx.block-state": "test_map_vdi_qed_vhdx.py",
    "vhdx.not-opened": "test_map_vdi_qed_vhdx.py",
    "vmdk.compressed-corrupt": "test_map_vmdk_vpc.py",
    "vmdk.compressed-short": "test_map_vmdk_vpc.py",
    "vmdk.compressed-size": "test_map_vmdk_vpc.py",
    "vmdk.extent-capacity": "test_map_vmdk_vpc.py",
    "vmdk.extent-not-sparse": "test_map_vmdk_vpc.py",
    "vmdk.extent-type-unsupported": "test_map_vmdk_vpc.py",
    "vmdk.gd-index": "test_map_vmdk_vpc.py",
    "vmdk.parent-cid": "test_map_vmdk_vpc.py",
}


def test_catalogue_is_complete():
    catalogued = {r.code for fmt, rules in CATALOGUE.items() if fmt != "core" for r in rules}
    assert not catalogued & DATA_PATH.keys()
    assert catalogued | DATA_PATH.keys() == raised_codes()


@pytest.mark.parametrize("code, test_file", sorted(DATA_PATH.items()))
def test_data_path_codes_are_demonstrated_where_named(code, test_file):
    """The named test file asserts the code (in full, or its rule after the format's dot)."""
    text = (Path(__file__).parent / test_file).read_text()
    assert code in text or f'"{code.split(".", 1)[1]}' in text or f"'{code.split('.', 1)[1]}" in text
