"""qcow2 against qemu-img 7.2: real images compared field by field, and every
validation rule hit by a real image with one field broken by hand.

Hand edits use plain struct offsets from QEMU's docs/interop/qcow2.txt (not the
plugin's layouts), so a wrong layout in the plugin cannot hide here.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from storprobe import Backing, DataFile, probe

from builders import (
    AUTOCLEAR,
    BACKING_OFFSET,
    BACKING_SIZE,
    CLUSTER_BITS,
    COMPRESSION,
    CRYPT,
    EXT_BACKING_FORMAT,
    EXT_BITMAPS,
    EXT_CRYPTO,
    EXT_FEATURES,
    HEADER_LENGTH,
    INCOMPAT,
    L1_OFFSET,
    L1_SIZE,
    NB_SNAPSHOTS,
    REFCOUNT_ORDER,
    REFTABLE_CLUSTERS,
    REFTABLE_OFFSET,
    SIZE,
    SNAPSHOTS_OFFSET,
    Edit,
    bitmap_dir,
    ext_at,
    get,
    in_bitmap_dir,
    in_bitmap_table,
    in_ext,
    in_luks,
    luks_at,
    past_end,
    u8,
    u32,
    u64,
)
from oracle import (
    assert_same_as_qemu,
    code_of,
    probe_or_named_error,
    qemu_img_create,
    qemu_img_error,
    qemu_info,
    qemu_refuses,
    require,
    run,
)

SECRET = ("--object", "secret,id=s0,data=pw")
LUKS = "encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=10"


@pytest.fixture(autouse=True)
def _qemu_img():
    require("qemu-img")


def create(path: Path, *options: str, size: str = "64M", secret: bool = False) -> Path:
    if secret:
        args = ["qemu-img", "create", "-q", "-f", "qcow2", *SECRET]
        for opt in options:
            args += ["-o", opt]
        run(*args, path, size)
        return path
    return qemu_img_create(path, "qcow2", size, *options)


def same(path: Path) -> dict:
    """Equal to qemu-img's JSON, with qemu-img's key order at every level too."""
    mine = assert_same_as_qemu(path)
    assert json.dumps(mine) == json.dumps(qemu_info(path))
    return mine


def edited(src: Path, dst: Path, *edits: Edit) -> Path:
    data = bytearray(src.read_bytes())
    for edit in edits:
        edit(data)
    dst.write_bytes(data)
    return dst


def luks_text(delta: int, text: bytes) -> Edit:
    """Overwrite a LUKS name field (32 bytes) with ``text``, NUL-padded."""

    def edit(b: bytearray) -> None:
        at = luks_at(b) + delta
        b[at : at + 32] = text.ljust(32, b"\0")

    return edit


def rewrite_snapshots(path: Path, extra: Callable[[int, bytes], bytes]) -> Path:
    """Re-emit the snapshot table in place with each entry's extra data replaced."""
    b = bytearray(path.read_bytes())
    count, start = get(b, NB_SNAPSHOTS, "I"), get(b, SNAPSHOTS_OFFSET, "Q")
    pos, table = start, bytearray()
    for index in range(count):
        pos = (pos + 7) // 8 * 8
        head = list(struct.unpack_from(">QIHHIIQII", b, pos))
        pos += 40
        old_extra = bytes(b[pos : pos + head[8]])
        pos += head[8]
        names = bytes(b[pos : pos + head[2] + head[3]])
        pos += len(names)
        new_extra = extra(index, old_extra)
        head[8] = len(new_extra)
        table += bytes(-len(table) % 8) + struct.pack(">QIHHIIQII", *head) + new_extra + names
    b[start:pos] = table.ljust(pos - start, b"\0")
    path.write_bytes(b)
    return path


# ---------------------------------------------------------------- real images


@pytest.fixture(scope="module")
def bases(tmp_path_factory) -> dict[str, Path]:
    """Real images to break: plain v2/v3, one with a backing file, bitmaps and
    snapshots, one LUKS-encrypted, one with 8 KiB clusters."""
    require("qemu-img")
    d = tmp_path_factory.mktemp("bases")
    qemu_img_create(d / "base.qcow2", "qcow2")
    made = {
        "v2": create(d / "v2.qcow2", "compat=0.10"),
        "v3": create(d / "v3.qcow2"),
        "small": create(d / "small.qcow2", "cluster_size=8k"),
        "luks": create(d / "luks.qcow2", LUKS, secret=True),
        "rich": create(d / "rich.qcow2", "backing_file=base.qcow2,backing_fmt=qcow2"),
    }
    for name in ("b0", "b1"):
        run("qemu-img", "bitmap", "--add", made["rich"], name)
    run("qemu-img", "snapshot", "-c", "s1", made["rich"])
    return made


@pytest.mark.parametrize("compat", ["0.10", "1.1"])
def test_compat(tmp_path, compat):
    path = create(tmp_path / "a.qcow2", f"compat={compat}")
    out = same(path)
    info = probe(path)
    assert out["format-specific"]["data"]["compat"] == compat
    assert info.compat == (None if compat == "0.10" else compat)  # libvirt: <compat> for v3 only
    assert info.version == (2 if compat == "0.10" else 3)
    assert info.flags == (None if compat == "0.10" else ())


def test_lazy_refcounts(tmp_path):
    path = create(tmp_path / "a.qcow2", "lazy_refcounts=on")
    assert same(path)["format-specific"]["data"]["lazy-refcounts"] is True
    assert probe(path).flags == ("lazy_refcounts",)


@pytest.mark.parametrize("cluster_size", ["64k", "2M"])
def test_extended_l2(tmp_path, cluster_size):
    path = create(tmp_path / "a.qcow2", f"extended_l2=on,cluster_size={cluster_size}", size="3G")
    assert same(path)["format-specific"]["data"]["extended-l2"] is True
    assert probe(path).flags == ("extended_l2",)


def test_zstd(tmp_path):
    path = create(tmp_path / "a.qcow2", "compression_type=zstd")
    assert same(path)["format-specific"]["data"]["compression-type"] == "zstd"


@pytest.mark.parametrize("bits", [1, 2, 4, 8, 16, 32, 64])
def test_refcount_bits(tmp_path, bits):
    path = create(tmp_path / "a.qcow2", f"refcount_bits={bits}")
    assert same(path)["format-specific"]["data"]["refcount-bits"] == bits


@pytest.mark.parametrize("cluster_bits", range(9, 22))
def test_cluster_sizes(tmp_path, cluster_bits):
    path = create(tmp_path / "a.qcow2", f"cluster_size={1 << cluster_bits}", size="100M")
    assert same(path)["cluster-size"] == 1 << cluster_bits


@pytest.mark.parametrize("raw", ["on", "off"])
def test_data_file(tmp_path, raw):
    path = create(tmp_path / "a.qcow2", f"data_file={tmp_path / 'data.raw'},data_file_raw={raw}")
    data = same(path)["format-specific"]["data"]
    assert data["data-file"] == str(tmp_path / "data.raw") and data["data-file-raw"] is (raw == "on")
    assert probe(path).data_file == DataFile(str(tmp_path / "data.raw"), raw == "on")


def test_snapshots_beside_a_data_file_are_not_listed(tmp_path):
    """The spec rules internal snapshots out for an image with an external
    data file, and qemu-img lists none there (it still reads and checks the
    table on open); we list none either and count them in our details (found
    by the differential campaign)."""
    path = create(tmp_path / "a.qcow2", f"data_file={tmp_path / 'data.raw'}")
    data = bytearray(path.read_bytes())
    struct.pack_into(">IQ", data, NB_SNAPSHOTS, 2, 0)  # two entries read from the header cluster
    path.write_bytes(bytes(data))
    assert "snapshots" not in same(path)
    assert probe(path).details["snapshots-ignored"] == 2


def test_data_file_bit_without_a_name(tmp_path):
    """The name is optional: QEMU then needs it from the command line, yet qemu-img
    info still describes the image."""
    path = edited(create(tmp_path / "made.qcow2"), tmp_path / "a.qcow2", u64(INCOMPAT, 1 << 2))
    data = same(path)["format-specific"]["data"]
    assert "data-file" not in data and data["data-file-raw"] is False
    assert probe(path).data_file == DataFile(None, False)


def test_data_file_raw_bit_alone_is_refused(tmp_path):
    """The spec forbids data-file-raw without a data file. qemu-img info
    ignores the bit, but QEMU refuses to open the image for I/O (qemu-io)."""
    path = edited(create(tmp_path / "made.qcow2"), tmp_path / "a.qcow2", u64(AUTOCLEAR, 2))
    assert "data-file-raw" not in qemu_info(path)["format-specific"]["data"]
    assert code_of(path) == "qcow2.data-file-raw-without-data-file"


def test_luks(bases):
    encrypt = same(bases["luks"])["format-specific"]["data"]["encrypt"]
    assert encrypt["format"] == "luks" and encrypt["cipher-alg"] == "aes-256" and len(encrypt["slots"]) == 8
    assert probe(bases["luks"]).encryption == "luks"


def test_luks_essiv_with_data_file_and_bitmap(tmp_path):
    """All optional format-specific keys at once: their relative order is qemu-img's."""
    path = create(
        tmp_path / "a.qcow2",
        LUKS + ",encrypt.cipher-alg=twofish-128,encrypt.cipher-mode=cbc,encrypt.ivgen-alg=essiv"
        ",encrypt.ivgen-hash-alg=sha256,encrypt.hash-alg=sha512",
        f"data_file={tmp_path / 'data.raw'}",
        secret=True,
    )
    opts = f"driver=qcow2,file.filename={path},encrypt.key-secret=s0"
    run("qemu-img", "bitmap", *SECRET, "--add", "--image-opts", opts, "b0")
    data = same(path)["format-specific"]["data"]
    assert data["encrypt"]["ivgen-hash-alg"] == "sha256" and data["bitmaps"][0]["name"] == "b0"


def test_luks_without_its_header_pointer(tmp_path, bases):
    """LUKS method but no encryption-header extension: qemu-img 7.2 crashes on such
    an image (SIGSEGV in info) and QEMU refuses to open it for I/O (qemu-io:
    "Missing CRYPTO header"); a named error."""
    path = edited(
        bases["luks"], tmp_path / "a.qcow2", lambda b: struct.pack_into(">I", b, ext_at(b, EXT_CRYPTO), 0x1234)
    )
    assert code_of(path) == "qcow2.crypto-header-missing"


@pytest.mark.parametrize("compat", ["0.10", "1.1"])
def test_aes(tmp_path, compat):
    """qemu-img 7.2 still creates AES-encrypted images (it only refuses to run them)."""
    path = create(tmp_path / "a.qcow2", f"compat={compat},encrypt.format=aes,encrypt.key-secret=s0", secret=True)
    assert same(path)["format-specific"]["data"]["encrypt"] == {"format": "aes"}
    assert probe(path).encryption == "aes"


@pytest.mark.parametrize("fmt", ["qcow2", "raw"])
def test_backing_with_format(tmp_path, fmt):
    qemu_img_create(tmp_path / "base", fmt)
    path = create(tmp_path / "a.qcow2", f"backing_file={tmp_path / 'base'},backing_fmt={fmt}")
    assert same(path)["backing-filename-format"] == fmt
    assert probe(path).backing == Backing(str(tmp_path / "base"), fmt)


def test_relative_backing_name(tmp_path):
    qemu_img_create(tmp_path / "base.qcow2", "qcow2")
    path = create(tmp_path / "a.qcow2", "backing_file=base.qcow2,backing_fmt=qcow2")
    assert same(path)["backing-filename"] == "base.qcow2"


def test_backing_without_format(tmp_path):
    """qemu-img 7.2 refuses to write a backing name without a format (create and
    rebase -u alike), so the backing-format extension is renamed to an unknown type,
    which QEMU skips."""
    qemu_img_create(tmp_path / "base.raw", "raw")
    made = create(tmp_path / "made.qcow2", "backing_file=base.raw,backing_fmt=raw")
    path = edited(
        made, tmp_path / "a.qcow2", lambda b: struct.pack_into(">I", b, ext_at(b, EXT_BACKING_FORMAT), 0x1234)
    )
    out = same(path)
    assert "backing-filename-format" not in out and out["backing-filename"] == "base.raw"
    assert probe(path).backing == Backing("base.raw", None)


def test_empty_backing_format(tmp_path):
    """A zero-length backing-format extension means no format, as in QEMU."""
    qemu_img_create(tmp_path / "base.raw", "raw")
    made = create(tmp_path / "made.qcow2", "backing_file=base.raw,backing_fmt=raw")
    path = edited(made, tmp_path / "a.qcow2", in_ext(EXT_BACKING_FORMAT, -4, "I", 0))
    assert "backing-filename-format" not in same(path)
    assert probe(path).backing == Backing("base.raw", None)


def test_bitmaps(tmp_path):
    path = create(tmp_path / "a.qcow2")
    run("qemu-img", "bitmap", "--add", path, "b1")
    run("qemu-img", "bitmap", "--add", "--disable", "-g", "1M", path, "b2")
    run("qemu-img", "bitmap", "--add", "-g", "512", path, "tiny")
    bitmaps = same(path)["format-specific"]["data"]["bitmaps"]
    assert bitmaps == [
        {"flags": ["auto"], "name": "b1", "granularity": 65536},
        {"flags": [], "name": "b2", "granularity": 1 << 20},
        {"flags": ["auto"], "name": "tiny", "granularity": 512},
    ]


def test_bitmap_in_use(tmp_path):
    """QEMU sets in_use while a bitmap is open for writing; set it by hand."""
    made = create(tmp_path / "made.qcow2")
    run("qemu-img", "bitmap", "--add", made, "b1")
    path = edited(made, tmp_path / "a.qcow2", in_bitmap_dir(12, "I", 3))
    assert same(path)["format-specific"]["data"]["bitmaps"][0]["flags"] == ["in-use", "auto"]


def test_bitmap_table_past_end_of_file(tmp_path):
    """QEMU reads zeros past the end of the file: an all-clear bitmap, not an error."""
    made = create(tmp_path / "made.qcow2")
    run("qemu-img", "bitmap", "--add", made, "b1")
    path = edited(made, tmp_path / "a.qcow2", in_bitmap_dir(0, "Q", 1 << 30))
    assert same(path)["format-specific"]["data"]["bitmaps"][0]["name"] == "b1"


def test_bitmaps_ignored_without_autoclear_bit(tmp_path):
    """A program unaware of bitmaps clears the autoclear bit; QEMU then ignores them."""
    made = create(tmp_path / "made.qcow2")
    run("qemu-img", "bitmap", "--add", made, "b1")
    path = edited(made, tmp_path / "a.qcow2", u64(AUTOCLEAR, 0))
    assert "bitmaps" not in same(path)["format-specific"]["data"]


@pytest.mark.parametrize("compat", ["0.10", "1.1"])
def test_snapshots(tmp_path, compat):
    path = create(tmp_path / "a.qcow2", f"compat={compat}")
    for name in ("first", "second", "third"):
        run("qemu-img", "snapshot", "-c", name, path)
    out = same(path)
    assert [s["name"] for s in out["snapshots"]] == ["first", "second", "third"]
    assert [s.id for s in probe(path).snapshots] == ["1", "2", "3"]


@pytest.mark.parametrize(
    "extra",
    [
        pytest.param(lambda i, e: b"", id="v2-style-no-extra-data"),
        pytest.param(lambda i, e: e[:16], id="no-icount"),
        pytest.param(lambda i, e: e[:16] + b"\xff" * 8, id="icount-unset"),
        pytest.param(lambda i, e: struct.pack(">QQQ", 5 << 30, 64 << 20, 77 + i) + b"\1" * 100, id="large-vm-state"),
        pytest.param(lambda i, e: struct.pack(">QQQ", 2**64 - 5, 0, 2**63 + i), id="beyond-int64"),
    ],
)
def test_snapshot_extra_data(tmp_path, extra):
    """Snapshot tables QEMU no longer writes, but reads: the 64-bit VM state size
    and icount are used only when the extra data holds them."""
    path = create(tmp_path / "a.qcow2")
    for name in ("first", "second"):
        run("qemu-img", "snapshot", "-c", name, path)
    same(rewrite_snapshots(path, extra))


@pytest.mark.parametrize("prealloc", ["metadata", "falloc", "full"])
def test_preallocation(tmp_path, prealloc):
    same(create(tmp_path / "a.qcow2", f"preallocation={prealloc}", size="8M"))


def test_dirty_bit(tmp_path):
    path = edited(create(tmp_path / "made.qcow2"), tmp_path / "a.qcow2", u64(INCOMPAT, 1))
    assert same(path)["dirty-flag"] is True
    assert probe(path).dirty


def test_corrupt_bit(tmp_path):
    path = edited(create(tmp_path / "made.qcow2"), tmp_path / "a.qcow2", u64(INCOMPAT, 2))
    assert same(path)["format-specific"]["data"]["corrupt"] is True


def test_virtual_size_rounds_down_to_sectors(tmp_path):
    path = edited(create(tmp_path / "made.qcow2"), tmp_path / "a.qcow2", u64(SIZE, (64 << 20) - 100))
    assert same(path)["virtual-size"] == (64 << 20) - 512


def test_unknown_incompatible_bits_are_reported_not_raised(tmp_path):
    """QEMU refuses the image and names the bits from the feature-name table."""

    def name_bit_5(b: bytearray) -> None:
        struct.pack_into(">BB46s", b, ext_at(b, EXT_FEATURES) + 8, 0, 5, b"shiny new feature")

    path = edited(create(tmp_path / "made.qcow2"), tmp_path / "a.qcow2", u64(INCOMPAT, 1 << 5 | 1 << 40), name_bit_5)
    refusal = qemu_refuses(path)
    assert "shiny new feature" in refusal and "Unknown incompatible feature: 10000000000" in refusal
    info = probe(path)
    assert info.details["unknown-incompatible-features"] == ["shiny new feature", "bit 40"]
    assert info.details["incompatible-features"] == 1 << 5 | 1 << 40


def test_details(tmp_path, bases):
    qemu_img_create(tmp_path / "base.qcow2", "qcow2")
    path = create(tmp_path / "a.qcow2", "backing_file=base.qcow2,backing_fmt=qcow2,lazy_refcounts=on")
    details = probe(path).details
    assert details["header-length"] == 112 and details["compatible-features"] == 1
    assert 0 < details["backing-file-offset"] < 65536
    luks = probe(bases["luks"]).details["encryption-header"]
    assert luks["offset"] % 65536 == 0 and luks["length"] > 592


# ---------------------------------------------------------------- broken headers


# (rule, base image, edits, does qemu-img 7.2 refuse it too?)
BROKEN = [
    ("cluster-bits", "v3", [u32(CLUSTER_BITS, 8)], True),
    ("cluster-bits", "v3", [u32(CLUSTER_BITS, 22)], True),
    ("header-too-short", "v3", [u32(HEADER_LENGTH, 100)], True),
    ("header-too-large", "v3", [u32(HEADER_LENGTH, 65536 + 8)], True),
    ("backing-offset", "v3", [u64(BACKING_OFFSET, 65537)], True),
    ("compression-type", "v3", [u8(COMPRESSION, 2)], True),
    ("compression-type-bit", "v3", [u64(INCOMPAT, 1 << 3)], True),
    ("compression-type-bit", "v3", [u8(COMPRESSION, 1)], True),
    ("extended-l2-cluster-size", "small", [u64(INCOMPAT, 1 << 4)], True),
    ("refcount-order", "v3", [u32(REFCOUNT_ORDER, 7)], True),
    ("no-refcount-table", "v3", [u32(REFTABLE_CLUSTERS, 0)], True),
    ("refcount-table-too-large", "v3", [u32(REFTABLE_CLUSTERS, 129)], True),
    ("refcount-table-offset", "v3", [u64(REFTABLE_OFFSET, 65536 + 8)], True),
    ("too-many-snapshots", "v3", [u32(NB_SNAPSHOTS, 65537)], True),
    ("snapshot-table-offset", "v3", [u64(SNAPSHOTS_OFFSET, 512)], True),
    ("snapshot-table-offset", "v3", [u32(NB_SNAPSHOTS, 65536), u64(SNAPSHOTS_OFFSET, 2**63 - 65536)], True),
    ("l1-too-large", "v3", [u32(L1_SIZE, 4 * 1024 * 1024 + 1)], True),
    ("l1-offset", "v3", [u64(L1_OFFSET, 3 * 65536 + 8)], True),
    ("image-too-big", "v3", [u64(SIZE, 2**62)], True),
    ("l1-too-small", "v3", [u64(SIZE, 1 << 30)], True),
    ("crypt-method", "v3", [u32(CRYPT, 3)], True),
    ("size-too-large", "v3", [u64(SIZE, 2**64 - 512)], True),
    ("extension-too-large", "v3", [in_ext(EXT_FEATURES, -4, "I", 65536)], True),
    ("extension-too-large", "rich", [u64(BACKING_OFFSET, 120)], True),
    ("backing-format-too-long", "rich", [in_ext(EXT_BACKING_FORMAT, -4, "I", 16)], True),
    ("backing-name-too-long", "rich", [u32(BACKING_SIZE, 1024)], True),
    ("crypto-header-unexpected", "luks", [u32(CRYPT, 1)], True),
    ("crypto-header-size", "luks", [in_ext(EXT_CRYPTO, -4, "I", 24)], True),
    ("crypto-header-offset", "luks", [in_ext(EXT_CRYPTO, 0, "Q", lambda b: luks_at(b) + 512)], True),
    ("luks-outside-extension", "luks", [in_ext(EXT_CRYPTO, 8, "Q", 100)], True),
    ("luks.magic", "luks", [in_luks(5, "B", 0xBF)], True),
    ("luks.version", "luks", [in_luks(6, "H", 2)], True),
    ("luks.unterminated-string", "luks", [luks_text(8, b"a" * 32)], True),
    ("luks.unterminated-string", "luks", [luks_text(72, b"h" * 32)], True),
    ("luks.payload-offset", "luks", [in_luks(104, "I", 2)], True),
    ("luks.master-key-iterations", "luks", [in_luks(164, "I", 0)], True),
    ("luks.slot-stripes", "luks", [in_luks(208 + 44, "I", 3999)], True),
    ("luks.slot-state", "luks", [in_luks(208 + 48, "I", 1)], True),
    ("luks.slot-iterations", "luks", [in_luks(208 + 4, "I", 0)], True),
    ("luks.slot-offset", "luks", [in_luks(208 + 40, "I", 2)], True),
    ("luks.slot-overlaps-payload", "luks", [in_luks(208 + 40, "I", 4040)], True),
    ("luks.slot-overlap", "luks", [in_luks(208 + 40, "I", 512)], True),
    ("luks.cipher-mode-format", "luks", [luks_text(40, b"xts")], True),
    ("luks.cipher-mode", "luks", [luks_text(40, b"abc-plain64")], True),
    ("luks.ivgen", "luks", [luks_text(40, b"xts-plain65")], True),
    ("luks.iv-hash", "luks", [luks_text(40, b"xts-plain64:sha257")], True),
    ("luks.hash", "luks", [luks_text(72, b"sha2566")], True),
    ("luks.essiv-hash", "luks", [luks_text(40, b"xts-essiv")], True),
    (
        "luks.essiv-cipher",
        "luks",
        [
            luks_text(8, b"cast5"),
            in_luks(108, "I", 16),
            luks_text(40, b"cbc-essiv:sha256"),
        ],
        True,
    ),
    ("luks.cipher", "luks", [luks_text(8, b"foo")], True),
    ("luks.key-bytes", "luks", [in_luks(108, "I", 0)], True),
    ("bitmaps-extension-size", "rich", [in_ext(EXT_BITMAPS, -4, "I", 16)], True),
    ("bitmaps-reserved", "rich", [in_ext(EXT_BITMAPS, 4, "I", 1)], True),
    ("too-many-bitmaps", "rich", [in_ext(EXT_BITMAPS, 0, "I", 65536)], True),
    ("no-bitmaps", "rich", [in_ext(EXT_BITMAPS, 0, "I", 0)], True),
    ("bitmap-directory-offset", "rich", [in_ext(EXT_BITMAPS, 16, "Q", lambda b: bitmap_dir(b)[2] + 8)], True),
    ("bitmap-directory-too-large", "rich", [in_ext(EXT_BITMAPS, 8, "Q", 1024 * 65535 + 1)], True),
    ("bitmap-directory-empty", "rich", [in_ext(EXT_BITMAPS, 8, "Q", 0)], True),
    ("bitmap-directory-beyond-file", "rich", [in_ext(EXT_BITMAPS, 16, "Q", past_end)], True),
    ("bitmap-directory-broken", "rich", [in_ext(EXT_BITMAPS, 8, "Q", 16)], True),
    ("bitmap-directory-broken", "rich", [in_ext(EXT_BITMAPS, 8, "Q", 60)], True),
    ("bitmap-count", "rich", [in_ext(EXT_BITMAPS, 0, "I", 1)], True),
    ("bitmap-count", "rich", [in_ext(EXT_BITMAPS, 0, "I", 3)], True),
    ("bitmap-extra-data", "rich", [in_bitmap_dir(20, "I", 8)], True),
    ("bitmap-entry", "rich", [in_bitmap_dir(17, "B", 8)], True),
    ("bitmap-entry", "rich", [in_bitmap_dir(16, "B", 2)], True),
    ("bitmap-entry", "rich", [in_bitmap_dir(12, "I", 1 << 2)], True),
    ("bitmap-entry", "rich", [in_bitmap_dir(8, "I", 0)], True),
    ("bitmap-entry", "rich", [in_bitmap_dir(0, "Q", 65536 + 512)], True),
    ("bitmap-entry", "rich", [u64(SIZE, 1 << 40), u32(L1_SIZE, 2048)], True),
    ("bitmap-duplicate-name", "rich", [in_bitmap_dir(32 + 24 + 1, "B", ord("0"))], True),
    ("bitmap-table-size", "rich", [in_bitmap_dir(8, "I", 2)], True),
    ("bitmap-table-entry", "rich", [in_bitmap_table(2)], True),
    ("bitmap-table-entry", "rich", [in_bitmap_table(0x70001)], True),
    ("bitmap-table-entry", "rich", [in_bitmap_table(0x10200)], True),
    (
        "snapshot-extra-data-too-large",
        "rich",
        [lambda b: struct.pack_into(">I", b, get(b, SNAPSHOTS_OFFSET, "Q") + 36, 1025)],
        True,
    ),
    # QEMU reads zeros past the end of the file and lists an empty snapshot; we refuse
    ("snapshot-table-beyond-file", "rich", [u64(SNAPSHOTS_OFFSET, 1 << 30)], False),
]


@pytest.mark.parametrize("rule,base,edits,qemu_too", BROKEN, ids=[f"{rule}-{i}" for i, (rule, *_) in enumerate(BROKEN)])
def test_broken_header(tmp_path, bases, rule, base, edits, qemu_too):
    path = edited(bases[base], tmp_path / "broken.qcow2", *edits)
    assert code_of(path) == (rule if rule.startswith("luks.") else f"qcow2.{rule}")
    assert (qemu_img_error(path) is not None) is qemu_too


def test_broken_v2_header(tmp_path, bases):
    path = edited(bases["v2"], tmp_path / "broken.qcow2", u32(CLUSTER_BITS, 30))
    assert code_of(path) == "qcow2.cluster-bits"
    qemu_refuses(path)


def test_snapshot_table_too_large(tmp_path):
    """65536 entries of 1 KiB extra data each pass 64 MiB: QEMU's cap. Only the known
    24 bytes of each extra data are read, so the cap, not the read budget, stops it."""
    path = create(tmp_path / "made.qcow2")
    entry = struct.pack(">QIHHIIQII", 0, 0, 0, 0, 0, 0, 0, 0, 1024) + bytes(1024)
    table_offset = 1 << 20
    with open(path, "r+b") as f:
        f.seek(NB_SNAPSHOTS)
        f.write(struct.pack(">IQ", 65536, table_offset))
        f.seek(table_offset)
        f.write(entry * 65536)
    assert code_of(path) == "qcow2.snapshot-table-too-large"
    assert "too big" in qemu_refuses(path)


def test_bitmap_directory_read_is_bounded(tmp_path, bases):
    """A directory at QEMU's 64 MiB cap inside an 80 MiB (sparse) file: the read
    budget refuses it by name instead of reading it."""
    path = edited(bases["rich"], tmp_path / "a.qcow2", in_ext(EXT_BITMAPS, 8, "Q", 1024 * 65535))
    with open(path, "r+b") as f:
        f.truncate(80 << 20)
    assert code_of(path) == "read-limit"
    qemu_refuses(path)


def test_truncated(tmp_path, bases):
    assert code_of(bases["v3"].read_bytes()[:100]) == "truncated"
    assert code_of(bases["v2"].read_bytes()[:60]) == "truncated"


def test_backing_name_past_end_of_file(tmp_path, bases):
    data = bytearray(bases["v3"].read_bytes()[:4096])
    struct.pack_into(">QI", data, BACKING_OFFSET, 4000, 200)
    assert code_of(bytes(data)) == "truncated"


# ---------------------------------------------------------------- hostile bytes

EXTREMES = [0, 1, 7, 8, 0xFF, 0x100, 0xFFFF, 0x10000, 0x7FFFFFFF, 0xFFFFFFFF, 2**63 - 1, 2**64 - 1]


@pytest.fixture(scope="module")
def fuzz_bases(bases) -> list[tuple[bytes, list[int]]]:
    """Real images with the offsets worth mutating: header, extensions, snapshot
    table, bitmap directory and LUKS header."""
    out = []
    for name in ("rich", "luks", "v2"):
        data = bases[name].read_bytes()
        spots = list(range(0, 0x300, 4))
        if get(data, NB_SNAPSHOTS, "I"):
            spots += range(get(data, SNAPSHOTS_OFFSET, "Q"), get(data, SNAPSHOTS_OFFSET, "Q") + 96, 2)
        if name == "rich":
            spots += range(bitmap_dir(data)[2], bitmap_dir(data)[2] + 64, 2)
            spots += range(get(data, bitmap_dir(data)[2], "Q"), get(data, bitmap_dir(data)[2], "Q") + 16, 4)
        if name == "luks":
            spots += range(luks_at(data), luks_at(data) + 600, 4)
        out.append((data, spots))
    return out


@settings(suppress_health_check=[*settings.default.suppress_health_check, HealthCheck.function_scoped_fixture])
@given(
    which=st.integers(0, 2),
    mutations=st.lists(
        st.tuples(
            st.integers(0, 10**6),
            st.sampled_from([1, 2, 4, 8]),
            st.one_of(st.sampled_from(EXTREMES), st.integers(0, 2**64 - 1)),
        ),
        min_size=1,
        max_size=6,
    ),
)
def test_mutated_real_headers(fuzz_bases, which, mutations):
    data, spots = fuzz_bases[which]
    buf = bytearray(data)
    for spot, width, value in mutations:
        at = spots[spot % len(spots)]
        buf[at : at + width] = (value % 2 ** (8 * width)).to_bytes(width, "big")
    probe_or_named_error(bytes(buf))
