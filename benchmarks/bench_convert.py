#!/usr/bin/env python3
"""Convert performance: ``storprobe convert -O raw`` beside ``qemu-img convert -O raw``, in one run.

    python benchmarks/bench_convert.py [--size 1G] [--repeat 3] [--dir DIR] [--only NAME ...]

Makes, in a temporary directory (on /var/tmp unless ``--dir``), qcow2 images of a
``--size`` guest disk with qemu-img and qemu-io: one full of random data; two
compressed copies (``qemu-img convert -c``, zlib and zstd) of data that deflates to
about half (each 4 KiB block 2 KiB of random bytes, 2 KiB of zeros: qemu-img keeps
a cluster of random data uncompressed, so random data would test no inflating);
and a sparse one with 1 MiB written every 64 MiB. It then prints medians of
interleaved repetitions, warm page cache, whole processes writing a new file in
that directory each time: ``storprobe convert`` against ``qemu-img convert``
(qemu-img's default, 8 requests in flight, and ``-m 1``), each with its wall time,
its CPU time (user + system, from the children's rusage: steadier than wall time
when others load the machine), the output's throughput in MiB/s of guest disk,
the bytes it allocates (both sparse: holes where the guest holds zeros) and the
ratios storprobe / qemu-img; and the load average before and after.

storprobe runs with its bytecode cached (``PYTHONDONTWRITEBYTECODE`` dropped, a
cache directory of the run's own, one untimed run first), as an installed
package runs: without it every module changed since its last compile is compiled
again at each start.

Where the time goes (profiles of 1 GiB, 2 CPUs, warm page cache): random data is
all system time on both sides, the kernel copying the file into the chunk buffer
(preadv) and the buffer into the page cache (pwrite), on two threads; storprobe
adds its start-up (0.07-0.15 s of the interpreter, imports and the format table,
bytecode cached: the sparse image measures it alone). Compressed data is
inflating (zlib 1.2: about 250 us a 64 KiB cluster, zstd 30 us) on a pool of
threads that read their own input and inflate into reused batch buffers, the
main thread walking the tables and copying each cluster once into the chunk
buffer. Tests never assert timings; compare numbers from one run only (other
work on the machine moves them).
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
from functools import partial
from pathlib import Path

MiB, GiB = 1 << 20, 1 << 30
IMAGES = ("random", "zlib", "zstd", "sparse")
Timing = tuple[float, float, int]  # wall seconds, CPU seconds, bytes allocated
TITLES = {
    "random": "random data",
    "zlib": "zlib compressed (qemu-img convert -c, data that deflates to half)",
    "zstd": "zstd compressed (the same data)",
    "sparse": "sparse (1 MiB / 64 MiB)",
}


def parse_size(text: str) -> int:
    units = {"K": 1 << 10, "M": MiB, "G": GiB, "T": 1 << 40}
    return int(text[:-1]) * units[text[-1].upper()] if text[-1].upper() in units else int(text)


def storprobe_command() -> list[str]:
    beside = Path(sys.executable).with_name("storprobe")
    return [str(beside)] if beside.exists() else [sys.executable, "-m", "storprobe"]


def timed(command: list[str], out: Path, env: dict[str, str] | None = None) -> Timing:
    """Wall and CPU seconds ``command`` takes to write ``out`` (removed first), and the bytes ``out`` allocates."""
    out.unlink(missing_ok=True)
    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, env=env)
    _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - start
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode:
        raise subprocess.CalledProcessError(process.returncode, command)
    allocated = os.stat(out).st_blocks * 512
    out.unlink()
    return seconds, usage.ru_utime + usage.ru_stime, allocated


def compressible(raw: Path, size: int) -> None:
    """``size`` bytes that deflate to about half: each 4 KiB block 2 KiB random, 2 KiB zeros."""
    zeros = bytes(2048)
    with open(raw, "wb") as f:
        for _ in range(size // (64 * MiB)):
            data = os.urandom(32 * MiB)
            f.write(b"".join(data[at : at + 2048] + zeros for at in range(0, len(data), 2048)))


def make_images(d: Path, size: int, names: list[str]) -> dict[str, Path]:
    images = {}
    if "random" in names:
        raw = d / "random.raw"
        with open(raw, "wb") as f:
            for _ in range(size // (64 * MiB)):
                f.write(os.urandom(64 * MiB))
        images["random"] = d / "random.qcow2"
        subprocess.run(["qemu-img", "convert", "-O", "qcow2", str(raw), str(images["random"])], check=True)
        raw.unlink()
    if {"zlib", "zstd"} & set(names):
        raw = d / "compressible.raw"
        compressible(raw, size)
        for kind in ("zlib", "zstd"):
            if kind in names:
                images[kind] = d / f"{kind}.qcow2"
                subprocess.run(["qemu-img", "convert", "-c", "-O", "qcow2", "-o", f"compression_type={kind}",
                                str(raw), str(images[kind])], check=True)
        raw.unlink()
    if "sparse" in names:
        images["sparse"] = d / "sparse.qcow2"
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(images["sparse"]), str(size)], check=True)
        writes = [f"write -P 0x5a {at} 1M" for at in range(0, size, 64 * MiB)]
        subprocess.run(["qemu-io", "-f", "qcow2", *[arg for w in writes for arg in ("-c", w)], str(images["sparse"])],
                       stdout=subprocess.DEVNULL, check=True)
    return images


def median_of(runs: dict[str, Callable[[], Timing]], repeat: int) -> dict[str, Timing]:
    """Each run ``repeat`` times, interleaved; the median wall and CPU seconds and the last allocation."""
    wall: dict[str, list[float]] = {name: [] for name in runs}
    cpu: dict[str, list[float]] = {name: [] for name in runs}
    allocated: dict[str, int] = {}
    for _ in range(repeat):
        for name, run in runs.items():
            seconds, used, allocated[name] = run()
            wall[name].append(seconds)
            cpu[name].append(used)
    return {name: (statistics.median(wall[name]), statistics.median(cpu[name]), allocated[name]) for name in runs}


def load() -> str:
    return " ".join(f"{value:.2f}" for value in os.getloadavg())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="1G", help="the guest disk's size (default: %(default)s)")
    parser.add_argument("--repeat", type=int, default=3, help="interleaved repetitions (default: %(default)s)")
    parser.add_argument("--dir", type=Path, help="where the images are made (default: a new directory on /var/tmp)")
    parser.add_argument("--only", nargs="+", choices=IMAGES, default=list(IMAGES), help="the images to convert")
    args = parser.parse_args()
    size = parse_size(args.size)
    d = args.dir or Path(tempfile.mkdtemp(prefix="bench-convert-", dir="/var/tmp"))
    d.mkdir(parents=True, exist_ok=True)
    env = {name: value for name, value in os.environ.items() if name != "PYTHONDONTWRITEBYTECODE"}
    env["PYTHONPYCACHEPREFIX"] = str(d / "pycache")
    try:
        images = make_images(d, size, args.only)
        out = d / "out.raw"
        ours = storprobe_command()
        timed([*ours, "convert", str(images[args.only[0]]), str(out)], out, env)  # compiles the bytecode
        print(f"convert -O raw of a {args.size} guest disk, medians of {args.repeat}, warm page cache "
              f"(load average {load()}):")
        for name, image in images.items():
            subprocess.run(["cat", str(image)], stdout=subprocess.DEVNULL, check=True)  # warm the cache
            result = median_of({
                "storprobe convert": partial(timed, [*ours, "convert", str(image), str(out)], out, env),
                "qemu-img convert": partial(timed, ["qemu-img", "convert", str(image), str(out)], out),
                "qemu-img convert -m 1": partial(timed, ["qemu-img", "convert", "-m", "1", str(image), str(out)], out),
            }, args.repeat)
            wall, cpu, _ = result["storprobe convert"]
            print(f"  {TITLES[name]}:")
            for label, (seconds, used, allocated) in result.items():
                ratio = "" if label == "storprobe convert" else (
                    f"   storprobe / this: {wall / seconds:.2f}x wall, {cpu / used:.2f}x CPU")
                print(f"    {label:<22}{seconds:6.2f} s wall {used:6.2f} s CPU {size / MiB / seconds:7.0f} MiB/s"
                      f"   allocates {allocated / MiB:7.1f} MiB{ratio}")
        print(f"load average after: {load()}")
    finally:
        if args.dir is None:
            shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    main()
