"""The stream inspector (storprobe.stream), its pass-through reader
(storprobe.upload) and ``storprobe check --stream``: every image the suite
builds, fed forward only at chunk sizes from 1 byte to 1 MiB, gets the verdict
``check()`` and ``probe()`` give on the same bytes, or "undetermined" naming
the bytes it lacked; an early verdict never contradicts them; hazards in the
head stop an upload after its head; memory stays within the stated bound on a
1 GiB stream."""

from __future__ import annotations

import io
import json
import random
import struct
import subprocess
import sys
import threading
import tracemalloc
from pathlib import Path

import pytest

import storprobe
from storprobe import FormatSpec, ProbeError, SourceError, UnknownFormat, hookimpl
from storprobe.safety import Policy, check
from storprobe.source import HEAD_SIZE, BytesSource
from storprobe.stream import FINAL, MISMATCH, PENDING, PROVISIONAL, UNDETERMINED, UNSAFE, StreamInspector
from storprobe.upload import InspectingReader, StreamRejected

from builders import build_dmg, corpus_files, load
from differential_campaign import mutated
from oracle import qemu_img_create, qemu_io

CHUNKS = (1, 17, 512, 65536, 1 << 20)
NAME = "upload"
EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
QCOW2_INCOMPATIBLE = 72  # offset of the v3 incompatible feature bits
#: The differential campaign's sample: mutants of the real images, by fixed seeds.
SAMPLE = 240
#: Chunk sizes 1 and 17 cost a Python call per byte or two: the sample's
#: mutants, and the real images with a declared format or size, are fed at them
#: when their image is at most this long (the real images and the corpus are
#: fed at them whole, multi-MiB ones included).
SMALL = 200_000


def streamed(data: bytes, chunk: int, **kwargs):
    """``data`` fed ``chunk`` bytes at a time: the verdict at the end and each new one on the way."""
    inspector = StreamInspector(name=NAME, **kwargs)
    view, feed = memoryview(data), inspector.feed
    changes, last = [], inspector.verdict()
    for at in range(0, len(data), chunk):
        verdict = feed(view[at : at + chunk])
        if verdict is not last:
            changes.append(verdict)
            last = verdict
    return inspector.finish(), changes


def assert_agrees(data: bytes, chunk: int, declared: str | None = None, **kwargs):
    """The stream's verdict is ``check()``'s on the same bytes, or undetermined;
    no verdict on the way contradicts ``check()``."""
    policy = kwargs.get("policy", Policy())
    expected = check(BytesSource(data, NAME), format=declared, policy=policy)
    final, changes = streamed(data, chunk, declared_format=declared, **kwargs)
    if final.state == FINAL:
        assert final.result == expected and final.hazards == expected.hazards and final.consumed == len(data)
    else:
        assert final.state == UNDETERMINED and final.needed is not None, final
    for early in changes:
        assert early.state in (PROVISIONAL, MISMATCH, UNSAFE), early
        if early.state == MISMATCH:
            assert expected.info is None and early.hazards == expected.hazards
        elif expected.info is not None:
            assert early.format == expected.info.format, (early, expected.info.format)
        if early.rejected:
            assert not expected.safe and set(early.hazards) <= set(expected.hazards), (early, expected)
    return final, changes


def assert_probe_agrees(data: bytes, declared: str | None = None) -> None:
    """``check()``'s record is ``probe()``'s (the stream's final verdict carries it)."""
    expected = check(BytesSource(data, NAME), format=declared).info
    if expected is None:
        with pytest.raises(ProbeError):
            storprobe.probe(BytesSource(data, NAME), format=declared)
    else:
        assert storprobe.probe(BytesSource(data, NAME), format=declared) == expected


# ---- equivalence: every image the suite builds, at every chunk size ------------------------


@pytest.mark.parametrize("chunk", CHUNKS)
def test_every_real_image_streams_to_its_check_verdict(real_image_seeds, chunk):
    """Real images of every format are decided (never undetermined), at every chunk size."""
    for data in real_image_seeds:
        final, _ = assert_agrees(data, chunk)
        assert final.state == FINAL, final


def test_the_real_images_records_are_probes(real_image_seeds):
    for data in real_image_seeds:
        assert_probe_agrees(data)


@pytest.mark.parametrize("chunk", CHUNKS)
@pytest.mark.parametrize("declared", ["qcow2", "vmdk", "raw", "vpc"])
def test_a_declared_format_streams_to_its_check_verdict(real_image_seeds, chunk, declared):
    for data in real_image_seeds:
        if chunk >= 512 or len(data) <= SMALL:
            assert_agrees(data, chunk, declared)


@pytest.mark.parametrize("chunk", [17, 65536])
def test_a_declared_size_streams_to_the_same_verdict(real_image_seeds, chunk):
    for data in real_image_seeds:
        if chunk >= 512 or len(data) <= SMALL:
            assert_agrees(data, chunk, size=len(data))
            assert_agrees(data, chunk, "qcow2", size=len(data))


@pytest.mark.parametrize("chunk", CHUNKS)
@pytest.mark.parametrize("path", corpus_files(), ids=lambda p: p.name)
def test_the_corpus_streams_to_its_check_verdict(path, chunk):
    data = load(path)
    assert_agrees(data, chunk)
    if chunk == 1:
        assert_probe_agrees(data)


@pytest.mark.parametrize("chunk", CHUNKS)
@pytest.mark.parametrize("path", sorted(EXAMPLES.iterdir()), ids=lambda p: p.name)
def test_the_examples_stream_to_their_check_verdict(path, chunk):
    final, _ = assert_agrees(path.read_bytes(), chunk)
    assert final.state == FINAL


@pytest.fixture(scope="module")
def sample(real_image_seeds) -> list[bytes]:
    return [mutated(random.Random(seed), real_image_seeds[seed % len(real_image_seeds)]) for seed in range(SAMPLE)]


@pytest.mark.parametrize("chunk", CHUNKS)
def test_the_differential_sample_streams_to_its_check_verdict(sample, chunk):
    fed = [data for data in sample if chunk >= 512 or len(data) <= SMALL]
    assert len(fed) >= SAMPLE // 2
    states = [assert_agrees(data, chunk)[0].state for data in fed]
    assert states.count(FINAL) >= len(fed) * 9 // 10  # undetermined stays the exception


# ---- early verdicts: how soon hazards stop an upload ---------------------------------------


@pytest.fixture(scope="module")
def overlay(tmp_path_factory) -> bytes:
    """A qcow2 image of 4 MiB of data that names a backing file."""
    d = tmp_path_factory.mktemp("overlay")
    qemu_img_create(d / "base.qcow2", "qcow2", "16M")
    image = qemu_img_create(d / "top.qcow2", "qcow2", "16M", "backing_file=base.qcow2,backing_fmt=qcow2")
    qemu_io(image, "write -P 0x5a 0 4M")
    return image.read_bytes()


@pytest.mark.parametrize("chunk", CHUNKS)
def test_a_backing_file_makes_it_unsafe_after_the_head(overlay, chunk):
    final, changes = assert_agrees(overlay, chunk)
    assert len(overlay) > 4 << 20 and final.state == FINAL and not final.result.safe
    early = changes[0]
    assert early.state == UNSAFE and early.format == "qcow2" and early.consumed == HEAD_SIZE
    assert [h.check for h in early.hazards] == ["backing-file"]


@pytest.mark.parametrize("chunk", [1, 512, 1 << 20])
def test_a_declared_format_that_does_not_arrive_is_a_mismatch_after_the_head(overlay, chunk):
    final, changes = assert_agrees(overlay, chunk, "vmdk")
    early = changes[0]
    assert early.state == MISMATCH and early.consumed == HEAD_SIZE and early.format == "qcow2"
    assert [h.check for h in early.hazards] == ["malformed"] and "not a vmdk image" in early.hazards[0].message
    assert early.safe is False and final.result.info is None


def test_a_qcow2_header_declared_raw_is_a_polyglot_after_the_head(overlay):
    _, changes = assert_agrees(overlay, 4096, "raw")
    assert changes[0].state == UNSAFE and changes[0].consumed == HEAD_SIZE
    assert "polyglot" in [h.check for h in changes[0].hazards]


def test_an_external_data_file_makes_it_unsafe_after_the_head(tmp_path):
    image = qemu_img_create(tmp_path / "df.qcow2", "qcow2", "16M", f"data_file={tmp_path / 'df.raw'}")
    data = image.read_bytes()
    _, changes = assert_agrees(data, 512)
    assert changes[0].state == UNSAFE and changes[0].consumed == HEAD_SIZE
    assert [h.check for h in changes[0].hazards] == ["data-file"]


def test_unknown_feature_bits_make_it_unsafe_after_the_head(overlay):
    data = bytearray(overlay)
    struct.pack_into(">Q", data, QCOW2_INCOMPATIBLE, 1 << 40)
    _, changes = assert_agrees(bytes(data), 65536)
    assert changes[0].state == UNSAFE and changes[0].consumed == HEAD_SIZE
    assert "qcow2.unknown-feature" in [h.check for h in changes[0].hazards]


def test_a_safe_image_is_provisional_after_the_head_and_final_at_the_end(tmp_path):
    image = qemu_img_create(tmp_path / "a.qcow2", "qcow2", "16M")
    qemu_io(image, "write -P 0x11 0 2M")
    data = image.read_bytes()
    final, changes = assert_agrees(data, 512)
    assert [(v.state, v.consumed, v.format) for v in changes] == [(PROVISIONAL, HEAD_SIZE, "qcow2")]
    assert changes[0].safe is None and final.safe is True


def test_a_raw_head_stays_pending_until_the_end():
    """A head no row with a signature there matches may still be a fixed VHD
    or a DMG (their signature is a trailer): nothing is said before the end."""
    final, changes = assert_agrees(bytes(3 << 20), 65536)
    assert changes == [] and final.format == "raw"
    inspector = StreamInspector()
    assert inspector.feed(bytes(3 << 20)).state == PENDING and inspector.finish().state == FINAL


def test_a_size_dependent_hazard_counts_early_only_with_a_declared_size(overlay):
    """A virtual size over the policy's limit may be the file's own size, so
    without a declared size it waits for the end; with one it is exact."""
    policy = Policy(max_virtual_size=1 << 20)
    data = bytearray(overlay)
    struct.pack_into(">QI", data, 8, 0, 0)  # no backing file at all
    _, undeclared = assert_agrees(bytes(data), 4096, policy=policy)
    assert [v.state for v in undeclared] == [PROVISIONAL]
    _, declared = assert_agrees(bytes(data), 4096, policy=policy, size=len(data))
    assert [v.state for v in declared] == [UNSAFE] and [h.check for h in declared[0].hazards] == ["size"]


# ---- ranges ahead, the look-behind, undetermined -------------------------------------------


def test_a_range_ahead_is_captured_as_it_passes_and_the_probe_reruns_only_then(registered):
    """A row that reads 8 bytes 5 MiB into the volume: the range is registered
    when the head arrives and captured as the stream passes it, with a
    look-behind of only the head's length; the probe runs at the head, when the range is
    complete and at the end, not at each of 6 million one-byte chunks."""
    runs = []

    def size(img):
        runs.append(1)
        return int.from_bytes(img.read(5 << 20, 8), "little")

    class Plugin:
        @hookimpl
        def storprobe_formats(self):
            return [FormatSpec("farsize", magic=b"TESTFMT!", size=size)]

    registered(Plugin())
    data = bytearray(6 << 20)
    data[:8] = b"TESTFMT!"
    data[5 << 20 : (5 << 20) + 8] = (123 << 20).to_bytes(8, "little")
    final, changes = assert_agrees(bytes(data), 1, look_behind=HEAD_SIZE)
    assert final.state == FINAL and final.result.info.virtual_size == 123 << 20
    assert [v.state for v in changes] == [PROVISIONAL]
    assert len(runs) <= 5


#: Where the DMG below keeps its block map: past the head.
PLIST_AT = 256 * 512


def dmg_with_its_plist_far_behind(gap: int) -> bytes:
    """A DMG whose block map lies ``gap`` bytes before its trailer (padding
    after the map leaves every recorded offset as it was)."""
    image = build_dmg(bytes(PLIST_AT))
    return image[:-512] + bytes(gap) + image[-512:]


def test_bytes_passed_beyond_the_look_behind_make_it_undetermined_naming_them():
    data = dmg_with_its_plist_far_behind(8 << 20)  # past the default look-behind, even untrimmed
    assert check(BytesSource(data, NAME)).info.format == "dmg"
    final, _ = assert_agrees(data, 65536)
    assert final.state == UNDETERMINED and final.needed[0] == PLIST_AT
    assert f"at offset {PLIST_AT}" in final.reason and final.safe is None
    final, _ = assert_agrees(data, 65536, look_behind=9 << 20)  # a look-behind that reaches it
    assert final.state == FINAL and final.result.info.format == "dmg"


def test_a_stream_shorter_or_longer_than_declared_is_a_source_error(overlay):
    inspector = StreamInspector(size=len(overlay) + 1)
    inspector.feed(overlay)
    with pytest.raises(SourceError, match="declared"):
        inspector.finish()


def test_an_unknown_declared_format_is_refused_at_once():
    with pytest.raises(UnknownFormat):
        StreamInspector("nonsense")


def test_a_finished_inspector_takes_no_more_bytes():
    inspector = StreamInspector()
    inspector.feed(b"x" * 100)
    assert inspector.finish().state == FINAL and inspector.finish() is inspector.verdict()
    with pytest.raises(SourceError):
        inspector.feed(b"more")


# ---- memory: bounded on a 1 GiB stream -----------------------------------------------------


def gib_of(head: bytes, chunk: int = 1 << 20):
    """1 GiB: ``head``, then zeros, in chunks (generated, never held)."""
    zeros = bytes(chunk)
    yield head + zeros[len(head) :]
    for _ in range((1 << 30) // chunk - 1):
        yield zeros


@pytest.mark.parametrize("kind", ["qcow2", "raw"])
def test_memory_stays_within_the_bound_on_a_gib_stream(tmp_path, kind):
    """The inspector's own bytes never pass its stated bound (head, capture
    limit, look-behind), nor does what Python allocates while it is fed; the
    final verdict is check()'s on a sparse file of the same 1 GiB."""
    head = qemu_img_create(tmp_path / "h.qcow2", "qcow2", "16M").read_bytes() if kind == "qcow2" else b""
    inspector = StreamInspector(name=NAME)
    tracemalloc.start()
    try:
        most = 0
        for chunk in gib_of(head):
            inspector.feed(chunk)
            most = max(most, inspector.held())
        feeding = tracemalloc.get_traced_memory()[1]
        final = inspector.finish()
        finishing = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert inspector.consumed == 1 << 30
    assert most <= inspector.bound and most <= HEAD_SIZE + 2 * inspector.look_behind
    assert feeding <= inspector.bound + (2 << 20)  # the bound, and a chunk in flight
    assert finishing <= 3 * inspector.bound  # the last run copies what is held into its source
    sparse = tmp_path / "sparse"
    sparse.write_bytes(head)
    with open(sparse, "r+b") as f:
        f.truncate(1 << 30)
    expected = check(sparse)
    assert final.state == FINAL and final.hazards == expected.hazards
    unlocated = {"filename": NAME, "stat": None, "actual_size": None, "security_label": None}
    assert final.result.info == expected.info._replace(**unlocated)


# ---- the pass-through reader ----------------------------------------------------------------


def test_the_reader_passes_chunks_through_unchanged_and_finishes_at_the_end(real_image_seeds):
    data = real_image_seeds[0]
    chunks = [data[i : i + 1000] for i in range(0, len(data), 1000)]
    reader = InspectingReader(chunks, StreamInspector(name=NAME))
    assert b"".join(reader) == data
    assert reader.verdict.state == FINAL and reader.verdict.result == check(BytesSource(data, NAME))


def test_the_reader_read_n_passes_bytes_through(real_image_seeds):
    data = real_image_seeds[-1]
    reader = InspectingReader(io.BytesIO(data), StreamInspector(name=NAME))
    got = []
    while chunk := reader.read(7777):
        got.append(chunk)
    assert b"".join(got) == data and reader.verdict.state == FINAL
    reader.close()


def test_the_reader_iterates_a_read_only_source(real_image_seeds):
    data = real_image_seeds[1]
    reader = InspectingReader(io.BytesIO(data), StreamInspector(name=NAME))
    assert b"".join(reader) == data and reader.verdict.state == FINAL


def test_the_reader_stops_an_unsafe_upload_after_its_head(overlay):
    reader = InspectingReader(io.BytesIO(overlay), StreamInspector(name=NAME))
    passed = 0
    with pytest.raises(StreamRejected) as rejected:
        for chunk in reader:
            passed += len(chunk)
    assert rejected.value.code == "stream.unsafe" and rejected.value.verdict.consumed == HEAD_SIZE
    assert passed < HEAD_SIZE and "backing-file" in str(rejected.value)


def test_the_reader_without_abort_passes_everything_and_keeps_the_verdict(overlay):
    reader = InspectingReader(io.BytesIO(overlay), StreamInspector("vmdk", name=NAME), abort=False)
    assert b"".join(reader) == overlay
    assert reader.verdict.state == FINAL and not reader.verdict.result.safe


# ---- storprobe check --stream -------------------------------------------------------------


def storprobe_stream(*args: str, stdin) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "storprobe", "check", "--stream", *args], stdin=stdin,
                          capture_output=True, text=True, check=False)


def test_check_stream_of_a_pipe_exits_as_check_does():
    for name, status in (("base.qcow2", 0), ("disk.vhd", 0), ("overlay.qcow2", 3)):
        with open(EXAMPLES / name, "rb") as f:
            proc = storprobe_stream("-", stdin=f)
        assert proc.returncode == status, proc.stderr
        assert proc.stdout.startswith("<stdin>: " + ("safe" if status == 0 else "UNSAFE"))


def test_check_stream_reads_a_file_too_and_says_the_stream_in_json():
    proc = storprobe_stream("--output", "json", "-f", "vmdk", str(EXAMPLES / "base.qcow2"), stdin=subprocess.DEVNULL)
    out = json.loads(proc.stdout)
    assert proc.returncode == 3 and out["safe"] is False and out["format"] == "qcow2"
    assert out["stream"] == {"state": "mismatch", "consumed": HEAD_SIZE}


def test_check_stream_stops_reading_an_unsafe_pipe_after_its_head(overlay):
    """The writer sees the pipe closed long before 1 GiB: the command read the
    head, said unsafe, and stopped (the pipe buffers a little more)."""
    proc = subprocess.Popen([sys.executable, "-m", "storprobe", "check", "--stream", "-"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    written = []

    def write():
        sent = 0
        try:
            for chunk in gib_of(overlay[:HEAD_SIZE], 65536):
                proc.stdin.write(chunk)
                sent += len(chunk)
            proc.stdin.close()
        except BrokenPipeError:
            pass
        written.append(sent)

    writer = threading.Thread(target=write)
    writer.start()
    out = proc.stdout.read()
    proc.wait(timeout=120)
    writer.join(timeout=120)
    assert proc.returncode == 3 and b"backing-file" in out and b"reading stopped" in out
    assert written[0] < 64 << 20


def test_check_stream_exits_4_when_undetermined(tmp_path):
    path = tmp_path / "far.dmg"
    path.write_bytes(dmg_with_its_plist_far_behind(8 << 20))
    with open(path, "rb") as f:
        proc = storprobe_stream("-", stdin=f)
    assert proc.returncode == 4, proc.stderr
    assert proc.stdout.startswith("<stdin>: UNDETERMINED") and f"at offset {PLIST_AT}" in proc.stdout


def test_check_stream_of_another_length_than_declared_exits_1():
    with open(EXAMPLES / "base.qcow2", "rb") as f:
        proc = storprobe_stream("--stream-size", "1M", "-", stdin=f)
    assert proc.returncode == 1 and proc.stderr.startswith("storprobe: <stdin>: ") and "declared" in proc.stderr
