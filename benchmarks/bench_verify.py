#!/usr/bin/env python3
"""verify performance: ``storprobe verify`` next to ``qemu-img check``, time and peak RSS.

    python benchmarks/bench_verify.py [--size 1T] [--fragmented 1G] [--repeat 3] [--dir DIR]

Makes (or reuses, with ``--dir``) two qcow2 images and checks each with both
tools in one run, rounds interleaved, warm page cache, output to a pipe:

- ``--size`` (default 1 TiB) with ``preallocation=metadata``: every L2 entry
  allocated, one run of consecutive clusters per table (the issue's target:
  within 3x of qemu-img check's time at no more than 2x its peak memory);
- ``--fragmented`` (default 1 GiB, 0 to skip) with 4 KiB clusters (262144 of
  them), written cluster by cluster from the end backwards with qemu-io, so no
  two neighbouring entries are adjacent on the host: no table is one run, every
  entry is counted one by one (by numpy a table at a time when it is installed).

For each: the median wall time and the largest peak RSS of each tool (the
child's ``ru_maxrss`` from ``wait4``), their ratios, and whether the two
reports are the same JSON (they must be).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def tool(name: str) -> str:
    """``name`` beside this interpreter (the virtual environment's storprobe), else on PATH."""
    beside = os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", os.defpath)])
    found = shutil.which(name, path=beside)
    if found is None:
        sys.exit(f"bench_verify: {name} is not installed")
    return found


def run_child(cmd: list[str]) -> tuple[float, int, str]:
    """Wall seconds, peak RSS (KiB) and output of ``cmd``, measured on the child alone."""
    start = time.perf_counter()
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: output into the pipe, errors to /dev/null, then exec
        os.close(read_end)
        os.dup2(write_end, 1)
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 2)
        try:
            os.execv(cmd[0], cmd)
        finally:
            os._exit(127)
    os.close(write_end)
    chunks = []
    with os.fdopen(read_end, "rb") as pipe:
        while chunk := pipe.read(65536):
            chunks.append(chunk)
    _, _, usage = os.wait4(pid, 0)
    return time.perf_counter() - start, usage.ru_maxrss, b"".join(chunks).decode()


def make_preallocated(path: Path, size: str) -> None:
    subprocess.run([tool("qemu-img"), "create", "-q", "-f", "qcow2", "-o", "preallocation=metadata", str(path), size],
                   check=True)


def make_fragmented(path: Path, size: str) -> None:
    """Every cluster written, from the last backwards: each L2 entry's host cluster
    comes just before the previous entry's."""
    subprocess.run([tool("qemu-img"), "create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", str(path), size],
                   check=True)
    info = json.loads(subprocess.run([tool("qemu-img"), "info", "--output=json", str(path)],
                                     capture_output=True, check=True).stdout)
    cluster, total = info["cluster-size"], info["virtual-size"]
    script = "".join(f"write -q -P 0x5a {offset} {cluster}\n" for offset in range(total - cluster, -1, -cluster))
    subprocess.run([tool("qemu-io"), str(path)], input=script.encode(), stdout=subprocess.DEVNULL, check=True)


def compare(label: str, image: Path, repeat: int) -> None:
    qemu = [tool("qemu-img"), "check", "--output=json", str(image)]
    ours = [tool("storprobe"), "verify", "--output", "json", str(image)]
    times: dict[str, list[float]] = {"qemu-img check": [], "storprobe verify": []}
    peaks: dict[str, int] = {"qemu-img check": 0, "storprobe verify": 0}
    outputs: dict[str, str] = {}
    for _ in range(repeat):  # interleaved, so a slow moment of the machine hits both
        for name, cmd in (("qemu-img check", qemu), ("storprobe verify", ours)):
            seconds, peak, out = run_child(cmd)
            times[name].append(seconds)
            peaks[name] = max(peaks[name], peak)
            outputs[name] = out
    same = json.loads(outputs["qemu-img check"] or "null") == json.loads(outputs["storprobe verify"] or "null")
    base_time, base_peak = statistics.median(times["qemu-img check"]), peaks["qemu-img check"]
    print(f"\n{label}: {image} ({image.stat().st_size} bytes, {image.stat().st_blocks * 512} on disk)")
    print(f"  {'':<18}{'median s':>10}{'peak RSS MiB':>14}{'time x':>8}{'RSS x':>7}")
    for name in times:
        median, peak = statistics.median(times[name]), peaks[name]
        print(f"  {name:<18}{median:>10.2f}{peak / 1024:>14.1f}{median / base_time:>8.2f}{peak / base_peak:>7.2f}")
    print(f"  same report: {'yes' if same else 'NO'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="1T", help="virtual size of the preallocated image (default: 1T)")
    parser.add_argument(
        "--fragmented", default="1G", help="virtual size of the fragmented image, 0: skip (default: 1G)"
    )
    parser.add_argument("--repeat", type=int, default=3, help="runs of each tool per image (default: 3)")
    parser.add_argument("--dir", type=Path, help="keep (and reuse) the images here")
    args = parser.parse_args()
    work = args.dir or Path(tempfile.mkdtemp(prefix="bench_verify.", dir="/var/tmp"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        preallocated = work / f"prealloc-{args.size}.qcow2"
        if not preallocated.exists():
            make_preallocated(preallocated, args.size)
        compare(f"preallocation=metadata, {args.size}", preallocated, args.repeat)
        if args.fragmented not in ("0", ""):
            fragmented = work / f"fragmented-4k-{args.fragmented}.qcow2"
            if not fragmented.exists():
                make_fragmented(fragmented, args.fragmented)
            compare(f"written backwards, {args.fragmented}", fragmented, args.repeat)
    finally:
        if args.dir is None:
            shutil.rmtree(work)


if __name__ == "__main__":
    main()
