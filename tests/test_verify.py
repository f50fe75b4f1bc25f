"""storprobe verify against qemu-img check: real qcow2 images made by qemu-img and
qemu-io, then broken by struct patches; our report (parsed JSON, byte for byte
through the command) and exit status must be qemu-img check's."""

from __future__ import annotations

import importlib.util
import json
import os
import random
import struct
import subprocess
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

import storprobe_plugins.qcow2 as qcow2_plugin
from storprobe import INT64_MAX, BytesSource, ProbeError, format_table
from storprobe.verify import (
    EXIT_FAILED,
    EXIT_NO_CHECK,
    CheckReader,
    NoCheck,
    Report,
    to_human,
    to_json,
    verify,
)

from builders import bitmap_dir, in_bitmap_dir, in_bitmap_table
from oracle import qemu_img_create, require, run

SECRET = ("--object", "secret,id=s0,data=pw")
COPIED, COMPRESSED = 1 << 63, 1 << 62
OFFSET_MASK = 0x00FFFFFFFFFFFE00


def qemu_check(path: Path, *extra: str) -> tuple[dict | None, int, str]:
    """qemu-img check --output=json: the parsed report (None when it printed none), status, text."""
    cmd = [require("qemu-img"), "check", "--output=json", *extra, str(path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    return (json.loads(proc.stdout) if proc.stdout.strip() else None), proc.returncode, proc.stdout


def storprobe_verify(path: Path, output: str = "json") -> subprocess.CompletedProcess:
    return subprocess.run(
        [require("storprobe"), "verify", "--output", output, str(path)], capture_output=True, text=True, check=False
    )


def ours(path: Path) -> tuple[dict | None, int]:
    """Our report as qemu-img's JSON would parse, and our status: the same with
    the L2 walk vectorised by numpy (when installed) and in pure Python."""
    answers = []
    for vectorise_from in (0, None) if numpy_installed() else (None,):
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(qcow2_plugin, "NUMPY_MIN_CLUSTERS", INT64_MAX if vectorise_from is None else vectorise_from)
            try:
                report = verify(path)
            except NoCheck:
                answers.append((None, EXIT_NO_CHECK))
            except ProbeError:
                answers.append((None, EXIT_FAILED))
            else:
                answers.append((json.loads(to_json(report)), report.exit_status))
    assert all(answer == answers[0] for answer in answers), "numpy and pure Python disagree"
    return answers[0]


def numpy_installed() -> bool:
    return importlib.util.find_spec("numpy") is not None


def assert_as_qemu(path: Path, *qemu_extra: str) -> dict | None:
    """Our report and status are qemu-img check's; the JSON text is too."""
    theirs, status, text = qemu_check(path, *qemu_extra)
    mine, my_status = ours(path)
    assert (mine, my_status) == (theirs, status)
    if theirs is not None and not qemu_extra:
        proc = storprobe_verify(path)
        assert (proc.stdout, proc.returncode) == (text, status)
    return mine


# --- building images -------------------------------------------------------------------


def qcow2(tmp_path: Path, name: str, size: str = "64M", *options: str) -> Path:
    return qemu_img_create(tmp_path / name, "qcow2", size, *options)


def io(path: Path, *commands: str, image_opts: tuple[str, ...] = ()) -> Path:
    args: list[str | Path] = ["qemu-io"]
    if image_opts:
        args += [*image_opts, "--image-opts"]
    for command in commands:
        args += ["-c", command]
    run(*args, path)
    return path


def writes(cluster_size: int = 65536) -> tuple[str, ...]:
    """Data, a compressed cluster (at 16M), zeros with and without an allocation, a discard."""
    return ("write -P 0x11 0 128k", f"write -c -P 0x22 16M {cluster_size}", "write -z 2M 64k", "write -z -u 3M 128k",
            "write -P 0x33 5M 4k", "discard 0 64k")


WRITES = writes()


class Qcow2Bytes:
    """A qcow2 file's bytes, with the tables a patch needs located (big-endian fields)."""

    def __init__(self, path: Path) -> None:
        self.path, self.data = path, bytearray(path.read_bytes())
        (self.version,) = struct.unpack_from(">I", self.data, 4)
        (self.cluster_bits,) = struct.unpack_from(">I", self.data, 20)
        self.cluster_size = 1 << self.cluster_bits
        self.l1_size, self.l1_offset, self.reftable_offset = struct.unpack_from(">IQQ", self.data, 36)
        self.refcount_order = struct.unpack_from(">I", self.data, 96)[0] if self.version == 3 else 4
        incompatible = struct.unpack_from(">Q", self.data, 72)[0] if self.version == 3 else 0
        self.l2_entry_size = 16 if incompatible & 16 else 8

    def u64(self, offset: int) -> int:
        return struct.unpack_from(">Q", self.data, offset)[0]

    def put(self, offset: int, value: int) -> None:
        struct.pack_into(">Q", self.data, offset, value)

    def l1_entry(self, guest: int) -> int:
        """The file offset of the L1 entry mapping guest offset ``guest``."""
        per_l2 = self.cluster_size // self.l2_entry_size
        return self.l1_offset + 8 * (guest // (per_l2 * self.cluster_size))

    def l2_entry(self, guest: int) -> int:
        """The file offset of the L2 entry mapping ``guest`` (its L2 table must exist)."""
        l2 = self.u64(self.l1_entry(guest)) & OFFSET_MASK
        per_l2 = self.cluster_size // self.l2_entry_size
        return l2 + self.l2_entry_size * ((guest // self.cluster_size) % per_l2)

    def data_offset(self, guest: int) -> int:
        return self.u64(self.l2_entry(guest)) & OFFSET_MASK

    def set_refcount(self, host: int, value: int) -> None:
        """Record ``value`` as the refcount of the cluster at file offset ``host`` (16-bit refcounts)."""
        assert self.refcount_order == 4
        cluster = host >> self.cluster_bits
        per_block = self.cluster_size * 8 >> self.refcount_order
        block = self.u64(self.reftable_offset + 8 * (cluster // per_block))
        struct.pack_into(">H", self.data, block + 2 * (cluster % per_block), value)

    def save(self, name: str) -> Path:
        out = self.path.with_name(name)
        out.write_bytes(bytes(self.data))
        return out


# --- clean images across qcow2's options --------------------------------------------------


@pytest.mark.parametrize(
    "options",
    [
        ("compat=0.10",),
        ("compat=1.1",),
        ("cluster_size=512",),
        ("cluster_size=4096", "refcount_bits=1"),
        ("refcount_bits=2",),
        ("refcount_bits=4", "cluster_size=8192"),
        ("refcount_bits=8",),
        ("refcount_bits=32",),
        ("refcount_bits=64", "cluster_size=2M"),
        ("extended_l2=on",),
        ("extended_l2=on", "cluster_size=2M"),
        ("compression_type=zstd",),
        ("lazy_refcounts=on",),
        ("preallocation=metadata",),
        ("preallocation=metadata", "cluster_size=512"),
        ("preallocation=metadata", "extended_l2=on"),
    ],
    ids=lambda options: ",".join(options),
)
def test_clean_images_as_qemu(tmp_path, options):
    image = qcow2(tmp_path, "a.qcow2", "64M", *options)
    assert assert_as_qemu(image)["check-errors"] == 0
    cluster_size = Qcow2Bytes(image).cluster_size
    made = writes(cluster_size)
    if "preallocation=metadata" in options:  # compressed writes go to unallocated clusters only
        made = tuple(command for command in made if " -c " not in command)
    io(image, *made)
    assert assert_as_qemu(image).get("allocated-clusters")


def test_refcount_width_one_overflows_on_shared_clusters(tmp_path):
    """With 1-bit refcounts a snapshot shares clusters QEMU cannot count twice:
    qemu-img snapshot refuses, so the sharing is made by an L2 entry copied."""
    image = io(qcow2(tmp_path, "a.qcow2", "8M", "refcount_bits=1"), "write -P 1 0 64k")
    q = Qcow2Bytes(image)
    q.put(q.l2_entry(64 << 10), q.u64(q.l2_entry(0)))
    assert assert_as_qemu(q.save("shared.qcow2"))["corruptions"] >= 1


def test_snapshots_bitmaps_and_compressed_clusters(tmp_path):
    image = io(qcow2(tmp_path, "a.qcow2", "64M"), *WRITES)
    run("qemu-img", "snapshot", "-c", "one", image)
    io(image, "write -P 0x44 0 64k", "write -c -P 0x55 8M 64k")
    run("qemu-img", "snapshot", "-c", "two", image)
    run("qemu-img", "bitmap", "--add", image, "b0")
    run("qemu-img", "bitmap", "--add", "-g", "512", image, "b1")
    io(image, "write -P 0x66 20M 1M")
    mine = assert_as_qemu(image)
    assert mine["compressed-clusters"] == 2 and "corruptions" not in mine


def test_converted_compressed_image(tmp_path):
    source = io(qcow2(tmp_path, "src.qcow2", "16M"), "write -P 0x77 0 4M", "write -P 0x78 8M 512k")
    image = tmp_path / "c.qcow2"
    run("qemu-img", "convert", "-c", "-O", "qcow2", source, image)
    assert assert_as_qemu(image)["compressed-clusters"] > 0


def test_compressed_clusters_packed_across_host_clusters(tmp_path):
    """Compressed clusters start anywhere in a sector; each spans the sectors from
    its start's sector, less the bytes before it (4 KiB clusters: eight sectors
    each, so many compressed clusters end on a host cluster's boundary)."""
    rng = random.Random(7)
    raw = tmp_path / "half-random.raw"
    raw.write_bytes(b"".join(rng.randbytes(rng.randrange(1000, 3000)).ljust(4096, b"\0") for _ in range(512)))
    image = tmp_path / "packed.qcow2"
    run("qemu-img", "convert", "-c", "-O", "qcow2", "-o", "cluster_size=4096", raw, image)
    assert assert_as_qemu(image)["compressed-clusters"] == 512


def test_luks_encrypted_qcow2(tmp_path):
    """qemu-img check needs the secret to open the image; storprobe reads no
    encrypted byte and checks without it (a reasoned difference: the LUKS header
    is counted as one more referenced region either way)."""
    image = tmp_path / "e.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", *SECRET, "-o", "encrypt.format=luks,encrypt.key-secret=s0",
        "-o", "encrypt.iter-time=10", image, "16M")
    opts = ("--object", "secret,id=s0,data=pw", "--image-opts")
    io(Path(f"driver=qcow2,file.filename={image},encrypt.key-secret=s0"), "write -P 1 0 1M", image_opts=SECRET)
    theirs, status, _ = qemu_check(Path(f"driver=qcow2,file.filename={image},encrypt.key-secret=s0"), *opts)
    mine, my_status = ours(image)
    theirs["filename"] = str(image)
    assert (mine, my_status) == (theirs, status) and status == 0
    assert qemu_check(image)[1] == EXIT_FAILED  # without the secret qemu-img cannot open it


# --- broken images -------------------------------------------------------------------


@pytest.fixture
def written(tmp_path) -> Qcow2Bytes:
    """A v3 image with data clusters at 64k..128k, one at 5M, a compressed one at 16M."""
    return Qcow2Bytes(io(qcow2(tmp_path, "w.qcow2", "64M"), *WRITES))


def test_refcount_of_a_used_cluster_zeroed(written):
    written.set_refcount(written.data_offset(64 << 10), 0)
    mine = assert_as_qemu(written.save("zero-refcount.qcow2"))
    assert mine["corruptions"] == 2  # the refcount, and the COPIED flag that now disagrees


def test_refcount_too_high_is_a_leak_and_a_copied_flag_error(written):
    written.set_refcount(written.data_offset(64 << 10), 2)
    mine = assert_as_qemu(written.save("high-refcount.qcow2"))
    assert (mine["leaks"], mine["corruptions"]) == (1, 1)


def test_unreferenced_cluster_is_a_leak_only(written):
    end = len(written.data)
    written.data += bytes(written.cluster_size)
    written.set_refcount(end, 1)
    image = written.save("leak.qcow2")
    assert assert_as_qemu(image)["leaks"] == 1
    assert storprobe_verify(image).returncode == 3


@pytest.mark.parametrize(
    "name, change",
    [
        ("past-eof", lambda q, e: (e & ~OFFSET_MASK) | (len(q.data) + (1 << 30))),
        ("misaligned", lambda q, e: e + 512),
        ("into-header", lambda q, e: (e & ~OFFSET_MASK) | 0),
        ("onto-reftable", lambda q, e: (e & ~OFFSET_MASK) | q.reftable_offset),
        ("copied-cleared", lambda q, e: e & ~COPIED),
        ("reserved-bits", lambda q, e: e | 1 << 40 << 16 | 0x100),
        ("zero-flag", lambda q, e: e | 1),
        ("compressed-flag", lambda q, e: e | COMPRESSED),
    ],
)
def test_broken_l2_entry(written, name, change):
    entry = written.l2_entry(64 << 10)
    written.put(entry, change(written, written.u64(entry)))
    assert assert_as_qemu(written.save(f"{name}.qcow2"))["check-errors"] == 0


def test_duplicate_cluster_use(written):
    written.put(written.l2_entry(5 << 20), written.u64(written.l2_entry(64 << 10)))
    mine = assert_as_qemu(written.save("duplicate.qcow2"))
    assert (mine["corruptions"], mine["leaks"]) == (1, 1)  # counted twice, recorded once; 5M now unused


def test_compressed_entry_with_copied_flag(written):
    entry = written.l2_entry(16 << 20)
    assert written.u64(entry) & COMPRESSED
    written.put(entry, written.u64(entry) | COPIED)
    assert assert_as_qemu(written.save("compressed-copied.qcow2"))["corruptions"] == 1


@pytest.mark.parametrize("bits", [1 << 62 | 0x100, 1 << 0, 1 << 63, 0x200, 1 << 50])
def test_broken_l1_entry(written, bits):
    entry = written.l1_entry(0)
    written.put(entry, written.u64(entry) ^ bits)
    assert_as_qemu(written.save("l1.qcow2"))


@pytest.mark.parametrize(
    "change", [0x1, 0x200, 1 << 40, 1 << 63], ids=["reserved", "misaligned", "outside", "past-qemu-limit"]
)
def test_broken_refcount_table_entry(written, change):
    """An unaligned refcount block cannot be read: every cluster it covers is a
    check error, and qemu-img prints its report and exits 1."""
    written.put(written.reftable_offset, written.u64(written.reftable_offset) ^ change)
    assert_as_qemu(written.save("reftable.qcow2"))


@pytest.mark.parametrize(
    "field, fmt, change",
    [(0, "Q", 512), (8, "I", 1 << 22), (36, "I", -16)],
    ids=["l1-misaligned", "l1-too-large", "extra-data-incomplete"],
)
def test_broken_snapshot_entry(tmp_path, field, fmt, change):
    """A snapshot's L1 table unaligned or larger than QEMU's 32 MiB is one
    corruption, not walked; a v3 entry with less than 16 bytes of extra data is one."""
    image = io(qcow2(tmp_path, "s.qcow2", "16M"), "write -P 1 0 64k")
    run("qemu-img", "snapshot", "-c", "one", image)
    q = Qcow2Bytes(image)
    (snapshots,) = struct.unpack_from(">Q", q.data, 64)
    (value,) = struct.unpack_from(">" + fmt, q.data, snapshots + field)
    struct.pack_into(">" + fmt, q.data, snapshots + field, value + change)
    mine = assert_as_qemu(q.save("snap.qcow2"))
    assert mine["corruptions"] >= 1


def test_extended_l2_bitmap_rules(tmp_path):
    """Extended L2 entries: subclusters allocated and zero at once, an unallocated
    cluster with allocated subclusters, a compressed cluster with a bitmap."""
    image = io(qcow2(tmp_path, "x.qcow2", "16M", "extended_l2=on"),
               "write -P 1 0 64k", "write -P 2 128k 4k", "write -c -P 3 1M 64k")
    q = Qcow2Bytes(image)
    q.put(q.l2_entry(0) + 8, q.u64(q.l2_entry(0) + 8) | 1 << 32)
    q.put(q.l2_entry(192 << 10) + 8, 1)
    q.put(q.l2_entry(1 << 20) + 8, 1 << 40)
    assert assert_as_qemu(q.save("bitmaps.qcow2"))["corruptions"] == 3


def test_bitmap_table_entries(tmp_path):
    """An in-use bitmap is not loaded when the image opens, so its table reaches
    the check: a cluster it names is a reference, an entry with reserved bits
    stops the check (exit 1, no report)."""
    image = io(qcow2(tmp_path, "b.qcow2", "16M"), "write -P 1 0 64k")
    run("qemu-img", "bitmap", "--add", image, "b0")
    run("qemu-io", "-c", "write -P 2 64k 64k", "--image-opts", f"driver=qcow2,file.filename={image}")
    data = bytearray(image.read_bytes())
    in_bitmap_dir(12, "I", 3)(data)  # flags: in-use and auto
    broken = image.with_name("in-use.qcow2")
    broken.write_bytes(bytes(data))
    assert_as_qemu(broken)
    in_bitmap_table(1)(data)  # all ones, no cluster: valid, and nothing to count
    broken.write_bytes(bytes(data))
    assert assert_as_qemu(broken)["leaks"] == 1  # the cluster the entry named
    in_bitmap_table(0x1FE)(data)  # reserved bits: the table does not load, the check fails
    broken.write_bytes(bytes(data))
    assert assert_as_qemu(broken) is None
    assert bitmap_dir(bytes(data))[0] == 1


def test_truncated_images(written):
    """The last cluster cut short may be referenced (QEMU reads zeros there); L2
    tables and refcount blocks cut away read as zeros too."""
    whole = bytes(written.data)
    for keep in (len(whole) - 100, len(whole) // 2, 3 * written.cluster_size):
        written.data = bytearray(whole[:keep])
        assert_as_qemu(written.save(f"cut{keep}.qcow2"))


def test_external_data_file(tmp_path):
    """With a data file its clusters are not counted in the image; a compressed
    cluster is a corruption there (QEMU opens the data file, which storprobe never
    reads for a check)."""
    image = qcow2(tmp_path, "d.qcow2", "16M", f"data_file={tmp_path / 'd.raw'}")
    io(image, "write -P 1 0 64k", "write -P 2 1M 8k")
    assert assert_as_qemu(image)["allocated-clusters"] == 2
    q = Qcow2Bytes(image)
    q.put(q.l2_entry(0), q.u64(q.l2_entry(0)) | COMPRESSED)
    assert assert_as_qemu(q.save("d2.qcow2"))["corruptions"] == 2  # compressed with a data file, and COPIED


# --- known differences, each with its reason -----------------------------------------


def test_snapshot_table_past_the_end_is_refused(tmp_path):
    """qemu-img info refuses nothing here but storprobe refuses a snapshot table
    that runs past the end of the file (qcow2.snapshot-table-beyond-file, as info
    does); QEMU's check reads zeros there and reports. Both call it broken."""
    image = io(qcow2(tmp_path, "s.qcow2", "16M"), "write -P 1 0 64k")
    run("qemu-img", "snapshot", "-c", "one", image)
    q = Qcow2Bytes(image)
    (snapshots,) = struct.unpack_from(">Q", q.data, 64)
    struct.pack_into(">H", q.data, snapshots + 14, 0xFFFF)  # name_size
    broken = q.save("long-name.qcow2")
    assert qemu_check(broken)[0] is not None
    with pytest.raises(ProbeError) as caught:
        verify(broken)
    assert caught.value.code == "qcow2.snapshot-table-beyond-file"


def test_no_refcount_table_is_refused(written):
    """QEMU opens an image with no refcount table in check mode only, to count
    every cluster a corruption (exit 2); storprobe opens images as qemu-img info
    does, which refuses it (qcow2.no-refcount-table): could not check, exit 1."""
    struct.pack_into(">I", written.data, 56, 0)
    broken = written.save("no-reftable.qcow2")
    theirs, status, _ = qemu_check(broken)
    assert status == 2 and theirs["corruptions"] > 0
    with pytest.raises(ProbeError) as caught:
        verify(broken)
    assert caught.value.code == "qcow2.no-refcount-table"
    assert storprobe_verify(broken).returncode == EXIT_FAILED


def test_random_table_mutations_agree_with_qemu(tmp_path):
    """A seeded campaign: bytes of the L1, L2 and refcount tables and blocks flipped
    at random; every outcome (report and status) is qemu-img check's."""
    image = io(qcow2(tmp_path, "m.qcow2", "32M", "cluster_size=4096"), *WRITES)
    run("qemu-img", "snapshot", "-c", "one", image)
    io(image, "write -P 0x44 0 8k")
    base = Qcow2Bytes(image)
    tables = [base.l1_offset, base.u64(base.l1_offset) & OFFSET_MASK, base.reftable_offset,
              base.u64(base.reftable_offset) & OFFSET_MASK]
    rng = random.Random(12)
    for round_ in range(24):
        q = Qcow2Bytes(image)
        for _ in range(rng.randint(1, 3)):
            q.data[rng.choice(tables) + rng.randrange(64)] ^= 1 << rng.randrange(8)
        assert_as_qemu(q.save(f"mutant{round_}.qcow2"))


# --- formats without a check, and the renderings ---------------------------------------


@pytest.mark.parametrize("fmt", ["raw", "qcow", "vpc", "luks"])
def test_formats_qemu_cannot_check_answer_63(tmp_path, fmt):
    options = ("key-secret=s0", "iter-time=10") if fmt == "luks" else ()
    image = tmp_path / f"x.{fmt}"
    run("qemu-img", "create", "-q", "-f", fmt, *(SECRET if fmt == "luks" else ()),
        *[arg for option in options for arg in ("-o", option)], image, "1M")
    if fmt == "luks":  # qemu-img opens LUKS only with its key; storprobe needs none to know there is no check
        assert qemu_check(image)[1] == EXIT_FAILED
        opened = Path(f"driver=luks,file.filename={image},key-secret=s0")
        _, status, _ = qemu_check(opened, *SECRET, "--image-opts")
    else:
        _, status, _ = qemu_check(image, "-f", fmt)
    assert status == EXIT_NO_CHECK
    with pytest.raises(NoCheck):
        verify(image)
    assert storprobe_verify(image).returncode == EXIT_NO_CHECK


@pytest.mark.parametrize("fmt", ["qed", "vdi", "vhdx", "vmdk", "parallels"])
def test_formats_qemu_checks_are_checked(tmp_path, fmt):
    """QEMU 7.2 has a check (bdrv_co_check) for these, and qcow2: 63 would be a lie,
    so their rows have one, and it answers as qemu-img does (their own tests go further)."""
    image = qemu_img_create(tmp_path / f"x.{fmt}", fmt, "1M")
    assert qemu_check(image)[1] == 0
    assert format_table()[fmt].check is not None
    assert_as_qemu(image)


def test_format_given(tmp_path, written):
    """-f as qemu-img check takes it: raw has no check (63); a raw file is not a qcow2 (1)."""
    image = written.save("given.qcow2")
    raw = tmp_path / "plain.raw"
    raw.write_bytes(bytes(1 << 20))
    for path, fmt in ((image, "raw"), (raw, "qcow2")):
        _, status, _ = qemu_check(path, "-f", fmt)
        proc = subprocess.run([require("storprobe"), "verify", "-f", fmt, str(path)], capture_output=True, text=True)
        assert proc.returncode == status


def test_what_qemu_cannot_open_is_not_checked(tmp_path, written):
    """A directory, and a qcow2 with an incompatible feature QEMU does not know: exit 1."""
    struct.pack_into(">Q", written.data, 72, 1 << 20)
    for path in (tmp_path, written.save("unknown-feature.qcow2")):
        assert qemu_check(path)[1] == EXIT_FAILED
        assert storprobe_verify(path).returncode == EXIT_FAILED


def test_backing_file_is_not_opened(tmp_path):
    """qemu-img opens the backing chain before checking the top image, and fails
    when a backing file is missing; storprobe checks the top image's metadata
    alone and never opens its backing file (a reasoned difference)."""
    base = io(qcow2(tmp_path, "base.qcow2", "16M"), "write -P 1 0 1M")
    top = tmp_path / "top.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", "-b", base.name, "-F", "qcow2", top)
    io(top, "write -P 2 64k 64k")
    assert_as_qemu(top)
    base.unlink()
    assert qemu_check(top)[1] == EXIT_FAILED
    mine, status = ours(top)
    assert status == 0 and mine["allocated-clusters"] == 1


def test_human_output_is_qemu_img_checks(written):
    written.set_refcount(written.data_offset(64 << 10), 2)
    image = written.save("human.qcow2")
    theirs = subprocess.run([require("qemu-img"), "check", str(image)], capture_output=True, text=True)
    proc = storprobe_verify(image, "human")
    assert (proc.stdout, proc.returncode) == (theirs.stdout, theirs.returncode)
    written.put(written.reftable_offset, written.u64(written.reftable_offset) | 0x200)  # check errors: exit 1
    image = written.save("human-errors.qcow2")
    theirs = subprocess.run([require("qemu-img"), "check", str(image)], capture_output=True, text=True)
    proc = storprobe_verify(image, "human")
    assert (proc.stdout, proc.returncode) == (theirs.stdout, theirs.returncode) and theirs.returncode == 1
    assert proc.stderr.endswith("Check failed\n")


@pytest.mark.parametrize(
    "name",
    [b"caf\xc3\xa9 \\ \"q\".qcow2", b"tab\tnl\ndel\x7f.qcow2", b"\xf0\x9f\x92\xbe.qcow2",
     b"bad\xff\xc3-\xc0\xaf\xed\xa0\x80\xef\xb7\x90\xe2\x82.qcow2"],
    ids=["latin-quote-backslash", "controls", "beyond-bmp", "not-utf8"],
)
def test_file_names_are_escaped_as_qemu_writes_them(tmp_path, written, name):
    """QEMU's JSON writer: \\uXXXX in upper case for anything outside printable
    ASCII (DEL too), surrogate pairs beyond the BMP, one U+FFFD per byte sequence
    its modified UTF-8 reader refuses."""
    image = Path(os.fsdecode(bytes(tmp_path) + b"/" + name))
    image.write_bytes(bytes(written.data))
    _, status, text = qemu_check(image)
    proc = storprobe_verify(image)
    assert (proc.stdout, proc.returncode) == (text, status)


def test_human_rendering_of_every_line():
    from storprobe.verify import CheckResult

    text = to_human(Report("x", "qcow2", CheckResult(1, 2, 3, 4096, 10, 4, 1, 1)))
    assert text == (
        "\n2 errors were found on the image.\nData may be corrupted, or further writes to the image may corrupt it.\n"
        "\n3 leaked clusters were found on the image.\nThis means waste of disk space, but no harm to data.\n"
        "\n1 internal errors have occurred during the check.\n"
        "4/10 = 40.00% allocated, 25.00% fragmented, 25.00% compressed clusters\nImage end offset: 4096\n"
    )


def test_no_image_end_offset_or_counts_left_out():
    text = to_json(Report("x", "qcow2", __import__("storprobe.verify").verify.CheckResult()))
    assert json.loads(text) == {"check-errors": 0, "filename": "x", "format": "qcow2"}


def test_read_budget_is_a_named_error(written):
    image = written.save("budget.qcow2")
    with pytest.raises(ProbeError) as caught:
        verify(image, budget=1024)
    assert caught.value.code == "verify.read-limit"


def test_reader_reads_zeros_past_the_end():
    reader = CheckReader(BytesSource(b"abc"))
    assert reader.read(1, 4) == b"bc\0\0" and reader.read(10, 2) == b"\0\0"


@pytest.fixture(scope="module")
def seed_image(tmp_path_factory) -> bytes:
    path = tmp_path_factory.mktemp("seed") / "seed.qcow2"
    qemu_img_create(path, "qcow2", "4M", "cluster_size=512", "refcount_bits=8")
    io(path, "write -P 1 0 8k", "write -c -P 2 64k 4k", "write -z 128k 4k")
    run("qemu-img", "snapshot", "-c", "s", path)
    return path.read_bytes()


@given(st.lists(st.tuples(st.integers(0, 16 * 1024), st.integers(0, 255)), min_size=1, max_size=8))
def test_mutated_images_raise_only_named_errors(seed_image, edits):
    data = bytearray(seed_image)
    for offset, value in edits:
        if offset < len(data):
            data[offset] = value
    try:
        verify(BytesSource(bytes(data)))
    except ProbeError:
        pass
