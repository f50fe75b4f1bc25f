#!/usr/bin/env python3
"""Scan performance: storprobe next to the physical floor, qemu-img and libvirt.

    python benchmarks/bench_scan.py [-n 10000] [--format qcow2] [--repeat 5] [--dir DIR]

Makes one image with ``qemu-img create`` and copies it N times into a
directory, then prints, from one run with interleaved repetitions (medians):

- whole processes, warm page cache, output to /dev/null: ``storprobe scan DIR
  --output json`` (one worker process per CPU, the default) and with ``--jobs
  1``; the floor, a bare ``python -c`` loop that lists the directory and opens,
  fstats, reads 4 KiB of and closes each file; a minimal Python prober (the
  floor plus storprobe's two reads, one struct unpack and one small JSON object
  per file: no detection, no checks), what any Python prober costs at least;
  ``qemu-img info --output=json`` on a sample, extrapolated to N; ``virsh
  pool-refresh`` of a transient dir pool when libvirtd answers; the
  interpreter's own start. Ratios to the floor and to storprobe.
- in process: microseconds per ``probe()`` and read calls per probe (counted
  on a wrapping byte source) for one image of each format a tool here makes.
- peak RSS of ``storprobe scan --jsonl`` and ``--output json`` for N/4 and N
  entries (flat when streaming).
- cold page cache (root only: ``echo 3 > /proc/sys/vm/drop_caches`` before each
  run): the floor, storprobe in one process with its read-ahead switched off,
  in one process with read-ahead, and as shipped (read-ahead and a worker per CPU).

Python processes run as an installed package runs: with a bytecode cache
(``PYTHONPYCACHEPREFIX`` in the work directory, whatever
``PYTHONDONTWRITEBYTECODE`` says) and buffered output (``PYTHONUNBUFFERED``
unset). The directory must be on a disk (not tmpfs) for the cold numbers to
mean anything. ``--dir`` keeps the images between runs.
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
from collections.abc import Callable, Sequence
from pathlib import Path

FLOOR = """
import os, sys
d = sys.argv[1]
for name in sorted(os.listdir(d)):
    fd = os.open(os.path.join(d, name), os.O_RDONLY)
    os.fstat(fd)
    os.pread(fd, 4096, 0)
    os.close(fd)
"""
#: The least a Python prober that prints JSON does per file: the floor's system
#: calls and storprobe's two reads (head and tail), one struct unpack of the
#: head, one small JSON object; no detection, no checks.
MINIMAL = """
import json, os, struct, sys
d = sys.argv[1]
fields = struct.Struct(">4sIQIIQIIQQIIQ")
for name in sorted(os.listdir(d)):
    path = os.path.join(d, name)
    fd = os.open(path, os.O_RDONLY)
    st = os.fstat(fd)
    head = os.pread(fd, 0x8200, 0)
    tail = os.pread(fd, 4096, max(0, st.st_size - 4096))
    os.close(fd)
    v = fields.unpack_from(head) if len(head) >= fields.size else (b"",) + (0,) * 12
    print(json.dumps({"filename": path, "format": v[0].hex(), "version": v[1], "virtual-size": v[5],
                      "cluster-size": 1 << (v[4] & 63), "actual-size": st.st_blocks * 512,
                      "tail": tail[-512:-504].hex()}))
"""
NO_READAHEAD = """
import sys
import storprobe.scan
storprobe.scan.READAHEAD = storprobe.scan.BATCH = 1  # open, hint and read one volume at a time
from storprobe.cli import main
sys.exit(main(sys.argv[1:]))
"""
VIRSH = ["virsh", "-c", "qemu:///system"]
START = "python -c pass (interpreter start)"
#: The environment of every measured process (see the module docstring).
ENV = {k: v for k, v in os.environ.items() if k not in ("PYTHONDONTWRITEBYTECODE", "PYTHONUNBUFFERED")}


def storprobe_cmd() -> list[str]:
    """The installed console script (as a user runs it), else ``python -m storprobe``."""
    script = Path(sys.executable).parent / "storprobe"
    return [str(script)] if script.exists() else [sys.executable, "-m", "storprobe"]


def run_time(cmd: Sequence[str]) -> float:
    """Wall time of one whole process, its output thrown away."""
    start = time.perf_counter()
    subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True, env=ENV)
    return time.perf_counter() - start


def peak_rss_mib(cmd: Sequence[str]) -> float:
    """Peak resident memory of one process (its own, from wait4)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, env=ENV)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return usage.ru_maxrss / 1024


def make_pool(directory: Path, fmt: str, size: str, n: int) -> None:
    """``n`` copies of one ``qemu-img create`` image (reused when already there)."""
    directory.mkdir(parents=True, exist_ok=True)
    names = [f"vol{i:06d}.{fmt}" for i in range(n)]
    if sorted(os.listdir(directory)) == names:
        return
    for name in os.listdir(directory):
        os.unlink(directory / name)
    template = directory.parent / f"template.{fmt}"
    subprocess.run(["qemu-img", "create", "-q", "-f", fmt, str(template), size], check=True)
    for name in names:
        shutil.copyfile(template, directory / name)


def linked_pool(source: Path, directory: Path, n: int) -> Path:
    """The first ``n`` entries of ``source`` hard-linked into ``directory``."""
    if directory.exists():
        shutil.rmtree(directory)
    directory.mkdir()
    for name in sorted(os.listdir(source))[:n]:
        os.link(source / name, directory / name)
    return directory


class Pool:
    """A transient libvirt dir pool over the directory (None when libvirtd is absent)."""

    def __init__(self, directory: Path) -> None:
        self.name = f"storprobe-bench-{os.getpid()}"
        subprocess.run(
            [*VIRSH, "pool-create-as", self.name, "dir", "--target", str(directory)],
            check=True, capture_output=True,
        )

    @classmethod
    def open(cls, directory: Path) -> Pool | None:
        if shutil.which("virsh") is None:
            return None
        if subprocess.run([*VIRSH, "version"], capture_output=True, check=False).returncode != 0:
            return None
        return cls(directory)

    def refresh_cmd(self) -> list[str]:
        return [*VIRSH, "pool-refresh", self.name]

    def destroy(self) -> None:
        subprocess.run([*VIRSH, "pool-destroy", self.name], capture_output=True, check=False)


def interleaved(
    runs: dict[str, Callable[[], float]], repeat: int, before: Callable[[], None] = lambda: None
) -> dict[str, float]:
    """Median of ``repeat`` rounds, each round running every entry once, in turn."""
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeat):
        for name, run in runs.items():
            before()
            times[name].append(run())
    return {name: statistics.median(values) for name, values in times.items()}


def drop_caches() -> None:
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def versions() -> str:
    qemu = subprocess.run(["qemu-img", "--version"], capture_output=True, text=True, check=False).stdout
    virsh = "-"
    if shutil.which("virsh"):
        virsh = subprocess.run([*VIRSH, "--version"], capture_output=True, text=True, check=False).stdout.strip()
    return f"Python {sys.version.split()[0]}, {qemu.splitlines()[0]}, libvirt {virsh}, {os.cpu_count()} CPUs"


def table(rows: list[tuple[str, float]], n: int, floor: str, ours: str) -> None:
    print(f"{'':46}{'time':>9}{'per image':>12}{'vs floor':>10}{'vs storprobe':>14}")
    medians = dict(rows)
    for name, seconds in rows:
        per = "" if name == START else f"{seconds / n * 1e6:9.1f} us"
        print(f"{name:46}{seconds:8.3f}s{per:>12}{seconds / medians[floor]:9.2f}x{seconds / medians[ours]:13.2f}x")


def warm(pool_dir: Path, n: int, repeat: int, sample: int) -> None:
    storprobe = storprobe_cmd()
    floor_name, ours_name = "bare loop floor (open, fstat, 4 KiB, close)", "storprobe scan --output json"
    files = sorted(pool_dir.iterdir())[:sample]

    def qemu_img() -> float:
        start = time.perf_counter()
        for f in files:
            subprocess.run(["qemu-img", "info", "--output=json", str(f)], stdout=subprocess.DEVNULL, check=True)
        return (time.perf_counter() - start) * n / len(files)

    runs: dict[str, Callable[[], float]] = {
        START: lambda: run_time([sys.executable, "-c", "pass"]),
        floor_name: lambda: run_time([sys.executable, "-c", FLOOR, str(pool_dir)]),
        "minimal Python prober (no checks)": lambda: run_time([sys.executable, "-c", MINIMAL, str(pool_dir)]),
        ours_name: lambda: run_time([*storprobe, "scan", str(pool_dir), "--output", "json"]),
        "storprobe scan --output json --jobs 1": lambda: run_time([*storprobe, "scan", str(pool_dir), "--jobs", "1"]),
        "storprobe scan --jsonl": lambda: run_time([*storprobe, "scan", str(pool_dir), "--jsonl"]),
        f"qemu-img info x{n} (from {len(files)}, extrapolated)": qemu_img,
    }
    libvirt = Pool.open(pool_dir)
    try:
        if libvirt is not None:
            runs["virsh pool-refresh (transient dir pool)"] = lambda: run_time(libvirt.refresh_cmd())
        run_time([*storprobe, "scan", str(pool_dir)])  # warm the cache
        medians = interleaved(runs, repeat)
    finally:
        if libvirt is not None:
            libvirt.destroy()
    print(f"\nWarm page cache, whole processes, {repeat} interleaved rounds, medians:")
    table(list(medians.items()), n, floor_name, ours_name)
    if libvirt is None:
        print("(virsh pool-refresh: libvirtd not reachable at qemu:///system, skipped)")


class Counting:
    """A byte source that counts the reads a probe makes through it."""

    def __init__(self, source) -> None:
        self.source, self.reads = source, 0
        self.name, self.file_type, self.stat = source.name, source.file_type, source.stat

    def size(self) -> int:
        return self.source.size()

    def read_at(self, offset: int, length: int) -> bytes:
        self.reads += 1
        return self.source.read_at(offset, length)

    def close(self) -> None:
        self.source.close()


def sample_images(directory: Path) -> dict[str, Path]:
    """One small image per format a tool here can make (skipping missing tools)."""
    directory.mkdir(exist_ok=True)
    made: dict[str, Path] = {}

    def make(label: str, path: Path, *cmd: str) -> None:
        if not shutil.which(cmd[0]):
            return
        for _ in range(50):  # qemu-img's key-derivation timing fails at random where CPU clocks tick coarsely
            if path.exists():
                path.unlink()  # bximage, for one, will not overwrite
            proc = subprocess.run(cmd, capture_output=True, check=False)
            if proc.returncode == 0 or b"accurate CPU usage" not in proc.stderr:
                break
        if proc.returncode == 0 and path.exists():
            made[label] = path

    for fmt in ("qcow2", "qcow", "qed", "vmdk", "vpc", "vhdx", "vdi", "parallels", "raw"):
        path = directory / f"sample.{fmt}"
        make(fmt, path, "qemu-img", "create", "-q", "-f", fmt, str(path), "1G")
    path = directory / "descriptor.vmdk"
    make("vmdk (descriptor)", path, "qemu-img", "create", "-q", "-f", "vmdk", "-o", "subformat=monolithicFlat",
         str(path), "16M")
    path = directory / "sample.luks"
    make("luks", path, "qemu-img", "create", "-q", "-f", "luks", "--object", "secret,id=s0,data=x",
         "-o", "key-secret=s0,iter-time=10", str(path), "16M")
    path = directory / "sample.bochs"
    make("bochs", path, "bximage", "-q", "-func=create", "-hd=10M", "-imgmode=growing", str(path))
    raw = directory / "cloop-input.raw"
    raw.write_bytes(bytes(1 << 20))
    path = directory / "sample.cloop"
    make("cloop", path, "create_compressed_fs", "-q", "-B", "65536", str(raw), str(path))
    iso_root = directory / "iso-root"
    iso_root.mkdir(exist_ok=True)
    (iso_root / "file").write_bytes(b"x")
    path = directory / "sample.iso"
    make("iso", path, "xorriso", "-as", "mkisofs", "-quiet", "-o", str(path), str(iso_root))
    made["dir"] = iso_root
    return made


def in_process(directory: Path, repeat: int) -> None:
    from storprobe import ProbeError, probe
    from storprobe.source import PathSource

    print("\nIn process, one image per format (warm): microseconds per probe() (median of"
          f" {repeat} rounds of 2000), read calls per probe:")
    print(f"{'format':20}{'detected':>12}{'us/probe':>10}{'reads':>7}")
    for label, path in sample_images(directory).items():
        source = Counting(PathSource(path))
        try:
            detected = probe(source).format
        except ProbeError as exc:  # a named error is still a probe; show its code
            detected = exc.code
        finally:
            source.close()
        rounds = []
        for _ in range(repeat):
            start = time.perf_counter()
            for _ in range(2000):
                try:
                    probe(path)
                except ProbeError:
                    pass  # timed all the same
            rounds.append((time.perf_counter() - start) / 2000 * 1e6)
        print(f"{label:20}{detected:>12}{statistics.median(rounds):10.1f}{source.reads:7d}")


def memory(pool_dir: Path, n: int, scratch: Path) -> None:
    storprobe = storprobe_cmd()
    small = linked_pool(pool_dir, scratch / "quarter", max(1, n // 4))
    print("\nPeak RSS (MiB), streaming output:")
    print(f"{'':36}{f'N={n // 4}':>10}{f'N={n}':>10}")
    streaming = (("storprobe scan --jsonl", ["--jsonl"]), ("storprobe scan --output json", ["--output", "json"]))
    for label, extra in streaming:
        sizes = [peak_rss_mib([*storprobe, "scan", str(d), *extra]) for d in (small, pool_dir)]
        print(f"{label:36}{sizes[0]:10.1f}{sizes[1]:10.1f}")
    shutil.rmtree(small)


def cold(pool_dir: Path, n: int, repeat: int) -> None:
    if os.geteuid() != 0 or not os.access("/proc/sys/vm/drop_caches", os.W_OK):
        print("\nCold cache: skipped (needs root to drop the page cache)")
        return
    storprobe = storprobe_cmd()
    scan = ["scan", str(pool_dir), "--output", "json"]
    floor_name, ours_name = "bare loop floor", "storprobe scan (default)"
    runs: dict[str, Callable[[], float]] = {
        floor_name: lambda: run_time([sys.executable, "-c", FLOOR, str(pool_dir)]),
        "storprobe scan --jobs 1, read-ahead off": lambda: run_time(
            [sys.executable, "-c", NO_READAHEAD, *scan, "--jobs", "1"]
        ),
        "storprobe scan --jobs 1 (read-ahead)": lambda: run_time([*storprobe, *scan, "--jobs", "1"]),
        ours_name: lambda: run_time([*storprobe, *scan]),
    }
    medians = interleaved(runs, repeat, before=drop_caches)
    print(f"\nCold page cache (dropped before every run), {repeat} interleaved rounds, medians:")
    table(list(medians.items()), n, floor_name, ours_name)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", type=int, default=10_000, help="images in the pool (default 10000)")
    parser.add_argument("--format", default="qcow2", help="qemu-img format of the images (default qcow2)")
    parser.add_argument("--size", default="1G", help="virtual size of the images (default 1G)")
    parser.add_argument("--repeat", type=int, default=5, help="interleaved rounds, warm (default 5)")
    parser.add_argument("--cold-repeat", type=int, default=3, help="interleaved rounds, cold (default 3)")
    parser.add_argument("--sample", type=int, default=50, help="images qemu-img info runs on (default 50)")
    parser.add_argument("--dir", type=Path, help="work directory, kept (default: a temporary one, removed)")
    parser.add_argument("--no-cold", action="store_true", help="skip the cold-cache runs")
    args = parser.parse_args(argv)

    work = args.dir or Path(tempfile.mkdtemp(prefix="storprobe-bench-", dir="/var/tmp"))
    ENV["PYTHONPYCACHEPREFIX"] = str(work / "pycache")
    try:
        pool_dir = work / f"pool-{args.format}-{args.n}"
        make_pool(pool_dir, args.format, args.size, args.n)
        print(f"{args.n} {args.format} images ({args.size}, qemu-img create) in {pool_dir}")
        print(versions())
        warm(pool_dir, args.n, args.repeat, args.sample)
        in_process(work / "formats", args.repeat)
        memory(pool_dir, args.n, work)
        if not args.no_cold:
            cold(pool_dir, args.n, args.cold_repeat)
    finally:
        if args.dir is None:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
