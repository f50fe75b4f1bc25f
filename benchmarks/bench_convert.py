#!/usr/bin/env python3
"""Convert performance: ``storprobe convert -O raw`` beside ``qemu-img convert -O raw``, in one run.

    python benchmarks/bench_convert.py [--size 1G] [--repeat 3] [--dir DIR]

Makes a qcow2 image of ``--size`` full of random data with qemu-img and qemu-io
(and its zlib-compressed copy, ``qemu-img convert -c``; and a sparse one with
1 MiB written every 64 MiB) in a temporary directory (on /var/tmp unless
``--dir``), then prints medians of interleaved repetitions, warm page cache,
whole processes writing a new file in that directory each time:
``storprobe convert`` against ``qemu-img convert`` (both write raw when no
``-O`` is given; qemu-img's default, 8 requests in flight, and ``-m 1``), each with the ratio storprobe / qemu-img,
the output's throughput in MiB/s of guest disk, and the bytes each output
allocates (both sparse: holes where the guest holds zeros).

Tests never assert timings; compare numbers from one run only (other work on
the machine moves them).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

MiB, GiB = 1 << 20, 1 << 30


def parse_size(text: str) -> int:
    units = {"K": 1 << 10, "M": MiB, "G": GiB, "T": 1 << 40}
    return int(text[:-1]) * units[text[-1].upper()] if text[-1].upper() in units else int(text)


def storprobe_command() -> list[str]:
    beside = Path(sys.executable).with_name("storprobe")
    return [str(beside)] if beside.exists() else [sys.executable, "-m", "storprobe"]


def timed(command: list[str], out: Path) -> tuple[float, int]:
    """Seconds ``command`` takes to write ``out`` (removed first), and the bytes ``out`` allocates."""
    out.unlink(missing_ok=True)
    start = time.perf_counter()
    subprocess.run(command, stdout=subprocess.DEVNULL, check=True)
    seconds = time.perf_counter() - start
    allocated = os.stat(out).st_blocks * 512
    out.unlink()
    return seconds, allocated


def make_images(d: Path, size: int) -> dict[str, Path]:
    raw = d / "random.raw"
    with open(raw, "wb") as f:
        for _ in range(size // (64 * MiB)):
            f.write(os.urandom(64 * MiB))
    full = d / "random.qcow2"
    subprocess.run(["qemu-img", "convert", "-O", "qcow2", str(raw), str(full)], check=True)
    compressed = d / "compressed.qcow2"
    subprocess.run(["qemu-img", "convert", "-c", "-O", "qcow2", str(raw), str(compressed)], check=True)
    raw.unlink()
    sparse = d / "sparse.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(sparse), str(size)], check=True)
    writes = [f"write -P 0x5a {at} 1M" for at in range(0, size, 64 * MiB)]
    subprocess.run(["qemu-io", "-f", "qcow2", *[arg for w in writes for arg in ("-c", w)], str(sparse)],
                   stdout=subprocess.DEVNULL, check=True)
    return {"random data": full, "zlib compressed (qemu-img convert -c)": compressed, "sparse (1 MiB / 64 MiB)": sparse}


def median_of(runs: dict[str, Callable[[], tuple[float, int]]], repeat: int) -> dict[str, tuple[float, int]]:
    """Each run ``repeat`` times, interleaved; the median seconds and the last allocation."""
    times: dict[str, list[float]] = {name: [] for name in runs}
    allocated: dict[str, int] = {}
    for _ in range(repeat):
        for name, run in runs.items():
            seconds, allocated[name] = run()
            times[name].append(seconds)
    return {name: (statistics.median(times[name]), allocated[name]) for name in runs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="1G", help="the guest disk's size (default: %(default)s)")
    parser.add_argument("--repeat", type=int, default=3, help="interleaved repetitions (default: %(default)s)")
    parser.add_argument("--dir", type=Path, help="where the images are made (default: a new directory on /var/tmp)")
    args = parser.parse_args()
    size = parse_size(args.size)
    d = args.dir or Path(tempfile.mkdtemp(prefix="bench-convert-", dir="/var/tmp"))
    d.mkdir(parents=True, exist_ok=True)
    try:
        images = make_images(d, size)
        out = d / "out.raw"
        ours = storprobe_command()
        print(f"convert -O raw of a {args.size} guest disk, medians of {args.repeat}, warm page cache:")
        for name, image in images.items():
            subprocess.run(["cat", str(image)], stdout=subprocess.DEVNULL, check=True)  # warm the cache
            result = median_of({
                "storprobe convert": lambda image=image: timed([*ours, "convert", str(image), str(out)], out),
                "qemu-img convert": lambda image=image: timed(["qemu-img", "convert", str(image), str(out)], out),
                "qemu-img convert -m 1": lambda image=image: timed(
                    ["qemu-img", "convert", "-m", "1", str(image), str(out)], out),
            }, args.repeat)
            mine = result["storprobe convert"][0]
            print(f"  {name}:")
            for label, (seconds, allocated) in result.items():
                ratio = "" if label == "storprobe convert" else f"   storprobe / this: {mine / seconds:.2f}x"
                print(f"    {label:<24}{seconds:7.2f} s {size / MiB / seconds:8.0f} MiB/s"
                      f"   allocates {allocated / MiB:7.1f} MiB{ratio}")
    finally:
        if args.dir is None:
            shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    main()
