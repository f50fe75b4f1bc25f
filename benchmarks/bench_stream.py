#!/usr/bin/env python3
"""Stream inspection: throughput, per-chunk cost and memory against the stated bound.

    python benchmarks/bench_stream.py [--gib 1] [--repeat 3]

For streams of ``--gib`` GiB made of a real image's head (qemu-img create:
qcow2, vmdk, vpc, vdi) or none (raw) followed by zeros, generated in chunks
and never held, it prints from one run (medians of ``--repeat``):

- throughput of :class:`storprobe.stream.StreamInspector` fed 64 KiB and
  1 MiB chunks, next to SHA-256 over the same chunks (what an image service
  computes over every upload anyway), and through the pass-through reader's
  ``read(n)``;
- the cost of one ``feed`` at 1-byte and 17-byte chunks (4 MiB of them),
  next to a bare loop that slices the same chunks and calls a no-op;
- memory: the most bytes the inspector held while fed (``held()``), its stated
  bound (head + capture limit + look-behind), and tracemalloc's peak while fed
  and while finishing;
- how soon a qcow2 image that names a backing file is rejected (bytes read);
- ``storprobe check --stream -`` reading the stream from a pipe, next to
  ``cat > /dev/null`` on the same pipe (whole processes).

Timings on a shared machine are noisy: read the ratios from one run.
"""

from __future__ import annotations

import argparse
import hashlib
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path

from storprobe.stream import StreamInspector
from storprobe.upload import InspectingReader

FORMATS = {"qcow2": (), "vmdk": (), "vpc": ("-o", "subformat=dynamic"), "vdi": (), "raw": None}


def head_of(tmp: Path, fmt: str) -> bytes:
    options = FORMATS[fmt]
    if options is None:
        return b""
    path = tmp / f"h.{fmt}"
    subprocess.run(["qemu-img", "create", "-q", "-f", fmt, *options, str(path), "1G"], check=True)
    data = path.read_bytes()
    return data if fmt != "vpc" else data[:-512]  # a dynamic VHD's footer copy ends the stream instead


def stream(head: bytes, total: int, chunk: int, trailer: bytes = b"") -> Iterator[bytes]:
    """``total`` bytes: ``head``, zeros, ``trailer`` at the very end, in chunks."""
    zeros = bytes(chunk)
    count = total // chunk
    for index in range(count):
        data = zeros
        if index * chunk < len(head):
            data = head[index * chunk : (index + 1) * chunk].ljust(chunk, b"\0")
        if trailer and index == count - 1:
            data = data[: chunk - len(trailer)] + trailer
        yield data


def timed(run: Callable[[], object], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def rate(consume: Callable[[Iterator[bytes]], object], make: Callable[[], Iterator[bytes]], repeat: int) -> float:
    """Seconds ``consume`` takes over a fresh stream from ``make`` (median)."""
    return timed(lambda: consume(make()), repeat)


def inspect(chunks: Iterator[bytes]) -> StreamInspector:
    inspector = StreamInspector()
    for chunk in chunks:
        inspector.feed(chunk)
    inspector.finish()
    return inspector


def sha256(chunks: Iterator[bytes]) -> str:
    """What an image service computes over every upload anyway (glance's os_hash_value)."""
    digest = hashlib.sha256()
    for chunk in chunks:
        digest.update(chunk)
    return digest.hexdigest()


class Source:
    """A ``read(n)`` source over generated chunks (as a request body is)."""

    def __init__(self, chunks: Iterator[bytes]) -> None:
        self._chunks = chunks

    def read(self, size: int = -1) -> bytes:
        return next(self._chunks, b"")


def through_reader(chunks: Iterator[bytes]) -> None:
    reader = InspectingReader(Source(chunks), StreamInspector())
    while reader.read(1 << 20):
        pass


def per_feed(chunk: int, total: int = 4 << 20) -> tuple[float, float]:
    """Microseconds per feed, and per bare call, at ``chunk`` bytes."""
    data = memoryview(bytes(total))

    def feeding() -> None:
        feed = StreamInspector().feed
        for at in range(0, total, chunk):
            feed(data[at : at + chunk])

    def bare() -> None:
        def nothing(piece: memoryview) -> None:
            return None

        for at in range(0, total, chunk):
            nothing(data[at : at + chunk])

    calls = total // chunk
    return timed(feeding, 1) / calls * 1e6, timed(bare, 1) / calls * 1e6


def memory(head: bytes, total: int, chunk: int) -> tuple[int, int, int, int]:
    """(most held, bound, tracemalloc peak while fed, peak while finishing)."""
    inspector = StreamInspector()
    most = 0
    tracemalloc.start()
    try:
        for piece in stream(head, total, chunk):
            inspector.feed(piece)
            most = max(most, inspector.held())
        fed = tracemalloc.get_traced_memory()[1]
        tracemalloc.reset_peak()
        inspector.finish()
        finished = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    return most, inspector.bound, fed, finished


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gib", type=float, default=1.0, help="stream length in GiB (default: 1)")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    total = int(args.gib * (1 << 30)) // (1 << 20) * (1 << 20)
    mib = total / (1 << 20)
    with tempfile.TemporaryDirectory() as tmp:
        heads = {fmt: head_of(Path(tmp), fmt) for fmt in FORMATS}
        footer = heads["vpc"] and Path(tmp, "h.vpc").read_bytes()[-512:]
        print(f"stream inspection of {mib:.0f} MiB streams (a real image's head, then zeros); medians of {args.repeat}")
        print(f"{'format':<8}{'chunk':>9}{'inspector MiB/s':>17}{'sha256 MiB/s':>14}{'reader MiB/s':>14}  verdict")
        for fmt, head in heads.items():
            trailer = footer if fmt == "vpc" else b""
            for chunk in (64 << 10, 1 << 20):
                make = partial(stream, head, total, chunk, trailer)
                t, f, r = (rate(consume, make, args.repeat) for consume in (inspect, sha256, through_reader))
                verdict = inspect(make()).verdict()
                print(f"{fmt:<8}{chunk:>9}{mib / t:>17.0f}{mib / f:>14.0f}{mib / r:>14.0f}  {verdict.state} "
                      f"{verdict.format}")
        print("\nper feed (4 MiB fed in tiny chunks)")
        for chunk in (1, 17):
            feed_us, bare_us = per_feed(chunk)
            print(f"  chunk {chunk:>2}: {feed_us:.2f} us per feed, a bare sliced call {bare_us:.2f} us "
                  f"({(feed_us - bare_us) * 1000:.0f} ns of inspector)")
        print(f"\nmemory on {mib:.0f} MiB in 1 MiB chunks (bytes)")
        for fmt in ("qcow2", "raw"):
            most, bound, fed, finished = memory(heads[fmt], total, 1 << 20)
            print(f"  {fmt:<6} held at most {most:>10,}  bound {bound:>11,}  tracemalloc peak fed {fed:>11,}"
                  f"  finishing {finished:>11,}")
        overlay = Path(tmp, "o.qcow2")
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", "h.qcow2", "-F", "qcow2", str(overlay)],
                       check=True, cwd=tmp)
        inspector = StreamInspector()
        for piece in stream(overlay.read_bytes(), total, 65536):
            if inspector.feed(piece).rejected:
                break
        verdict = inspector.verdict()
        print(f"\na qcow2 naming a backing file: {verdict.state} at byte {verdict.consumed:,}, after reading "
              f"{inspector.consumed:,} of {total:,} (64 KiB chunks)")
        raw_gen = f"import sys\nz=bytes(1<<20)\nfor _ in range({total >> 20}): sys.stdout.buffer.write(z)"
        for name, command in (("storprobe check --stream -", [sys.executable, "-m", "storprobe", "check", "--stream",
                                                               "-"]), ("cat > /dev/null", ["cat"])):
            def piped(command: list[str] = command) -> None:
                with subprocess.Popen([sys.executable, "-c", raw_gen], stdout=subprocess.PIPE) as producer:
                    subprocess.run(command, stdin=producer.stdout, stdout=subprocess.DEVNULL, check=False)
            seconds = timed(piped, args.repeat)
            print(f"  pipe of {mib:.0f} MiB of raw into {name:<28} {seconds:6.2f} s  {mib / seconds:7.0f} MiB/s")


if __name__ == "__main__":
    main()
