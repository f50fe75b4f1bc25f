"""cloop: compressed loop images, V2.0 (big-endian).

A 128-byte shell preamble, the block size and block count, then ``n_blocks
+ 1`` 64-bit offsets of the compressed blocks. Validation follows QEMU's
block/cloop.c open (``cloop.<rule>``), its walk of the offsets table
included (up to 4 MiB of table: 512k blocks), plus the table lying inside
the file. The virtual size is
``n_blocks * block_size``; QEMU multiplies the block count by the sectors per
block in 32 bits and so wraps for images of 2 TiB and more, which we do not
copy. libvirt 9.0 does not detect cloop (it calls it raw).
"""

from __future__ import annotations

import operator
import struct

from storprobe import Features, FormatSpec, Image, InvalidHeader, Layout, hookimpl
from storprobe.layout import Header

PREAMBLE = b"#!/bin/sh\n#V2.0 Format\nmodprobe cloop file=$0 && mount -r -t iso9660 /dev/cloop $1\n"
HEADER = Layout(">", "cloop header", (None, "128x"), ("block_size", "I"), ("n_blocks", "I"))

SECTOR = 512
MAX_BLOCK_SIZE = 64 * 1024 * 1024
MAX_BLOCKS = (2**32 - 2) // 8
MAX_OFFSETS_SIZE = 512 * 1024 * 1024
MAX_COMPRESSED_BLOCK = 2 * MAX_BLOCK_SIZE  # QEMU's bound on one block's compressed bytes
OFFSETS_SCAN_LIMIT = 4 * 1024 * 1024  # larger tables are checked for position only


def _header(img: Image) -> Header:
    """The header, checked as QEMU's cloop open checks it."""
    hdr = HEADER.unpack(img.header)
    if hdr.block_size % SECTOR:
        raise InvalidHeader(f"cloop block size {hdr.block_size} is not a multiple of 512", code="cloop.block-size")
    if hdr.block_size == 0:
        raise InvalidHeader("cloop block size is 0", code="cloop.block-size-zero")
    if hdr.block_size > MAX_BLOCK_SIZE:
        raise InvalidHeader(f"cloop block size {hdr.block_size} is above 64 MiB", code="cloop.block-size-too-large")
    if hdr.n_blocks > MAX_BLOCKS:
        raise InvalidHeader(f"cloop block count {hdr.n_blocks} is above {MAX_BLOCKS}", code="cloop.n-blocks")
    offsets_size = (hdr.n_blocks + 1) * 8
    if offsets_size > MAX_OFFSETS_SIZE:
        raise InvalidHeader(
            f"cloop offsets table of {offsets_size} bytes is above 512 MiB", code="cloop.offsets-too-large"
        )
    if HEADER.size + offsets_size > img.size:
        raise InvalidHeader(
            f"cloop offsets table ({hdr.n_blocks + 1} entries) runs past the end of the file",
            code="cloop.offsets-beyond-eof",
        )
    return hdr


def _check_offsets(img: Image, n_blocks: int) -> bool:
    """QEMU's walk of the offsets table: each offset at least the one before,
    no block's compressed bytes above 128 MiB; the first entry that breaks a
    rule names it. False when the table is too large to scan."""
    count = n_blocks + 1
    if count * 8 > OFFSETS_SCAN_LIMIT:
        return False
    offsets = struct.unpack(f">{count}Q", img.read(HEADER.size, count * 8))
    sizes = list(map(operator.sub, offsets[1:], offsets[:-1]))
    if sizes and (min(sizes) < 0 or max(sizes) > MAX_COMPRESSED_BLOCK):
        index, size = next((i, s) for i, s in enumerate(sizes, 1) if not 0 <= s <= MAX_COMPRESSED_BLOCK)
        if size < 0:
            raise InvalidHeader(f"cloop offset {index} lies before offset {index - 1}", code="cloop.offsets-order")
        raise InvalidHeader(
            f"cloop block {index - 1} has {size} compressed bytes, above 128 MiB", code="cloop.compressed-block-size"
        )
    return True


def features(img: Image) -> Features:
    hdr = _header(img)
    details: dict[str, object] = {"block-size": hdr.block_size, "blocks": hdr.n_blocks}
    if not _check_offsets(img, hdr.n_blocks):
        details["offsets-not-scanned"] = f"table larger than {OFFSETS_SCAN_LIMIT} bytes"
    return Features(dirty=None, details=details)


def size(img: Image) -> int:
    hdr = _header(img)
    return hdr.n_blocks * hdr.block_size


@hookimpl
def storprobe_formats() -> list[FormatSpec]:
    return [
        FormatSpec(
            name="cloop",
            description="compressed loop image",
            magic=PREAMBLE,
            size=size,
            features=features,
        )
    ]
