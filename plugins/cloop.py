"""cloop: compressed loop images, V2.0 (big-endian).

A 128-byte shell preamble, the block size and block count, then ``n_blocks
+ 1`` 64-bit offsets of the compressed blocks. Validation follows QEMU's
block/cloop.c open (``cloop.<rule>``), plus the offsets table lying inside
the file; the table itself is not scanned. The virtual size is
``n_blocks * block_size``; QEMU multiplies the block count by the sectors per
block in 32 bits and so wraps for images of 2 TiB and more, which we do not
copy. libvirt 9.0 does not detect cloop (it calls it raw).
"""

from __future__ import annotations

from storprobe import Features, FormatSpec, Image, InvalidHeader, Layout, hookimpl

PREAMBLE = b"#!/bin/sh\n#V2.0 Format\nmodprobe cloop file=$0 && mount -r -t iso9660 /dev/cloop $1\n"
HEADER = Layout(">", "cloop header", (None, "128x"), ("block_size", "I"), ("n_blocks", "I"))

SECTOR = 512
MAX_BLOCK_SIZE = 64 * 1024 * 1024
MAX_BLOCKS = (2**32 - 2) // 8
MAX_OFFSETS_SIZE = 512 * 1024 * 1024


def _header(img: Image):
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


def features(img: Image) -> Features:
    hdr = _header(img)
    return Features(dirty=None, details={"block-size": hdr.block_size, "blocks": hdr.n_blocks})


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
