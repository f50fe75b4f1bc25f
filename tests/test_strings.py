"""Text from images (backing names, LUKS and qcow2 names) reads as qemu-img
shows it in its JSON, byte for byte of the input: QEMU reads C strings as
"modified UTF-8", one U+FFFD per malformed sequence rather than per byte, and
takes a backing name with a colon before any slash for a protocol, never
joined to the image's directory (a differential campaign found both)."""

from __future__ import annotations

import random
import struct

import pytest

from storprobe.layout import qemu_utf8

from oracle import ours, qemu_info, run

BACKING_OFFSET, BACKING_SIZE = 8, 16  # qcow2 header fields
NAME_AT = 4096  # where this test writes the name (inside the header cluster, past the extensions)

TRICKY = [
    b"plain.img", "caf\u00e9-\u20ac-\U0001f600.img".encode(),
    b"k\xf5\xaf8[", b"\xe2\x82A", b"\xe2\x82", b"\xff\xfe", b"\xbf", b"\xc1\xbf", b"\xc0\x80x",
    b"\xed\xa0\x80", b"\xed\xbf\xbf", b"\xef\xbf\xbe", b"\xef\xb7\x90", b"\xf4\x90\x80\x80",
    b"\xf8\x88\x80\x80\x80", b"\xfc\x84\x80\x80\x80\x80", b"\xf0\x9f\x98", b"\x1b[31m\x7f\x80",
    b"a:b.img", b"sub/a:b.img", b"v2.\xff:x", b"nbd:h:1", b":lead",  # a colon before any slash is a protocol to QEMU
]
_rng = random.Random(20261130)
RANDOM = [bytes(_rng.choice((_rng.randrange(1, 256), _rng.randrange(0x80, 0x100))) for _ in range(12))
          for _ in range(30)]


@pytest.fixture(scope="module")
def plain(tmp_path_factory) -> bytes:
    path = tmp_path_factory.mktemp("strings") / "top.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", "-o", "compat=0.10", path, "1M")
    return path.read_bytes()


@pytest.mark.parametrize("name", TRICKY + RANDOM, ids=lambda b: b.hex())
def test_backing_name_reads_as_qemu_shows_it(tmp_path, plain, name):
    data = bytearray(plain)
    struct.pack_into(">QI", data, BACKING_OFFSET, NAME_AT, len(name))
    data[NAME_AT : NAME_AT + len(name)] = name
    path = tmp_path / "top.qcow2"
    path.write_bytes(bytes(data))
    mine, theirs = ours(path), qemu_info(path)
    assert mine["backing-filename"] == theirs["backing-filename"] == qemu_utf8(name)
    assert mine["full-backing-filename"] == theirs["full-backing-filename"]
