#!/usr/bin/env python3
"""Data-path performance: storprobe map and open_image beside qemu-img, in one run.

    python benchmarks/bench_datapath.py [--map-size 1T] [--read-size 1G] [--repeat 3] [--dir DIR]

Makes its images with qemu-img and qemu-io in a temporary directory (on /var/tmp
unless ``--dir``), then prints medians of interleaved repetitions, warm page cache:

- map: ``storprobe map --output json`` and ``qemu-img map --output=json`` (whole
  processes, output to /dev/null) of a sparse qcow2 image of ``--map-size`` with
  1 MiB written every GiB, and of one with preallocated metadata (every cluster
  allocated over a sparse file: the walk has nothing to skip);
- read: ``open_image(...).readinto`` of the whole guest disk of a ``--read-size``
  qcow2 image full of random data (in process, 4 MiB at a time, bytes dropped;
  and in a whole process) and of its zlib-compressed copy, beside ``qemu-img
  convert -O raw`` of the same image to a file (default, and ``-m 1``);
  throughput in MiB/s.

Each line gives the ratio storprobe / qemu-img; for whole processes, the CPU time
(user + system, from the children's rusage) too, which others' load on a shared
machine disturbs less than wall time. Tests never assert timings;
compare numbers from one run only.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

MiB, GiB = 1 << 20, 1 << 30
READ_CHUNK = 4 * MiB
READER = """
import sys
from storprobe import open_image
buffer = memoryview(bytearray(4 << 20))
with open_image(sys.argv[1]) as disk:
    while disk.readinto(buffer):
        pass
"""


def parse_size(text: str) -> int:
    units = {"K": 1 << 10, "M": MiB, "G": GiB, "T": 1 << 40}
    return int(text[:-1]) * units[text[-1].upper()] if text[-1].upper() in units else int(text)


def storprobe_command() -> list[str]:
    beside = Path(sys.executable).with_name("storprobe")
    return [str(beside)] if beside.exists() else [sys.executable, "-m", "storprobe"]


#: CPU seconds (user + system) of each command's last run, by command name: on a shared
#: machine wall time waits on others' work, CPU time less so.
CPU: dict[str, list[float]] = {}


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def timed(command: list[str], name: str | None = None) -> float:
    start, cpu = time.perf_counter(), children_cpu()
    subprocess.run(command, stdout=subprocess.DEVNULL, check=True)
    if name:
        CPU.setdefault(name, []).append(children_cpu() - cpu)
    return time.perf_counter() - start


def median_of(repeat: int, runs: dict[str, Callable[[], float]]) -> dict[str, float]:
    """Interleaved repetitions of each run; the median seconds of each."""
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeat):
        for name, run in runs.items():
            times[name].append(run())
    return {name: statistics.median(values) for name, values in times.items()}


def in_process_read(path: Path) -> float:
    from storprobe import open_image

    buffer = memoryview(bytearray(READ_CHUNK))
    start = time.perf_counter()
    with open_image(path) as disk:
        while disk.readinto(buffer):
            pass
    return time.perf_counter() - start


def qemu_convert(path: Path, out: Path, *options: str) -> float:
    seconds = timed(["qemu-img", "convert", *options, "-O", "raw", str(path), str(out)],
                    f"qemu {path.name} {' '.join(options)}")
    out.unlink()
    return seconds


def make_sparse(path: Path, size: int) -> None:
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), str(size)], check=True)
    commands: list[str] = []
    for gib in range(size // GiB):
        commands += ["-c", f"write -P {gib % 251 + 1} {gib * GiB + 4096} 1M"]
    for start in range(0, len(commands), 2000):  # qemu-io takes them in batches
        subprocess.run(["qemu-io", *commands[start : start + 2000], str(path)], stdout=subprocess.DEVNULL, check=True)


def make_full(directory: Path, size: int) -> tuple[Path, Path]:
    raw = directory / "random.raw"
    with open(raw, "wb") as f:
        for _ in range(size // (64 * MiB)):
            f.write(os.urandom(64 * MiB))
    full, compressed = directory / "full.qcow2", directory / "compressed.qcow2"
    subprocess.run(["qemu-img", "convert", "-O", "qcow2", str(raw), str(full)], check=True)
    # half random, half a repeated pattern: compressible clusters and some that do not shrink
    with open(raw, "r+b") as f:
        for offset in range(0, size, 2 * MiB):
            f.seek(offset)
            f.write(bytes([offset // (2 * MiB) % 256]) * MiB)
    subprocess.run(["qemu-img", "convert", "-c", "-O", "qcow2", str(raw), str(compressed)], check=True)
    raw.unlink()
    return full, compressed


def report(title: str, ours: float, theirs: float, unit: str = "s", size: int | None = None) -> None:
    rate = f"  ({size / MiB / ours:7.0f} MiB/s vs {size / MiB / theirs:7.0f})" if size else ""
    print(f"  {title:<58}{ours:8.3f} {unit} vs {theirs:8.3f} {unit}   ratio {ours / theirs:5.2f}{rate}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--map-size", default="1T", help="virtual size of the images mapped (default: 1T)")
    parser.add_argument("--read-size", default="1G", help="virtual size of the image read (default: 1G)")
    parser.add_argument("--repeat", type=int, default=3, help="repetitions, interleaved (default: 3)")
    parser.add_argument("--dir", help="work directory (default: a temporary one on /var/tmp)")
    args = parser.parse_args()
    work = Path(args.dir or tempfile.mkdtemp(prefix="spbench-", dir="/var/tmp"))
    work.mkdir(parents=True, exist_ok=True)
    map_size, read_size = parse_size(args.map_size), parse_size(args.read_size)
    try:
        sparse, prealloc = work / "sparse.qcow2", work / "prealloc.qcow2"
        if not sparse.exists():
            make_sparse(sparse, map_size)
        if not prealloc.exists():
            subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", "preallocation=metadata", str(prealloc),
                            str(map_size)], check=True)
        full, compressed = work / "full.qcow2", work / "compressed.qcow2"
        if not (full.exists() and compressed.exists()):
            full, compressed = make_full(work, read_size)
        ours = storprobe_command()
        print(f"map, whole processes, JSON to /dev/null ({args.map_size} virtual, 64 KiB clusters):")
        for name, image in (("1 MiB written per GiB", sparse), ("preallocated metadata", prealloc)):
            t = median_of(args.repeat, {
                "ours": lambda image=image, name=name: timed([*ours, "map", "--output", "json", str(image)],
                                                             f"ours {name}"),
                "qemu": lambda image=image, name=name: timed(["qemu-img", "map", "--output=json", str(image)],
                                                             f"qemu {name}"),
            })
            report(name, t["ours"], t["qemu"])
            cpu = {who: statistics.median(CPU[f"{who} {name}"]) for who in ("ours", "qemu")}
            report(f"{name} (CPU time)", cpu["ours"], cpu["qemu"])
        print(f"read the whole guest disk ({args.read_size}) vs qemu-img convert -O raw to a file:")
        out = work / "out.raw"
        for name, image in (("random data", full), ("zlib compressed (qemu-img convert -c)", compressed)):
            t = median_of(args.repeat, {
                "ours": lambda image=image: in_process_read(image),
                "process": lambda image=image, name=name: timed([sys.executable, "-c", READER, str(image)],
                                                                f"ours {name}"),
                "qemu": lambda image=image: qemu_convert(image, out),
                "qemu-m1": lambda image=image: qemu_convert(image, out, "-m", "1"),
            })
            report(f"{name}: open_image, in process", t["ours"], t["qemu"], size=read_size)
            report(f"{name}: open_image, whole process", t["process"], t["qemu"], size=read_size)
            report(f"{name}: open_image vs qemu-img convert -m 1", t["ours"], t["qemu-m1"], size=read_size)
            cpu = {key: statistics.median(CPU[key]) for key in (f"ours {name}", f"qemu {image.name} ",
                                                                f"qemu {image.name} -m 1")}
            report(f"{name}: whole process vs convert (CPU time)", cpu[f"ours {name}"], cpu[f"qemu {image.name} "])
            report(f"{name}: whole process vs convert -m 1 (CPU time)", cpu[f"ours {name}"],
                   cpu[f"qemu {image.name} -m 1"])
    finally:
        if not args.dir:
            shutil.rmtree(work)


if __name__ == "__main__":
    main()
