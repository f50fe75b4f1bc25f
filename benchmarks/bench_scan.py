#!/usr/bin/env python3
"""Scan performance: storprobe next to libvirt, a bare Python loop and the physical floor.

    python benchmarks/bench_scan.py [-n 10000] [--repeat 7] [--runs 3] [--before REV] [--dir DIR]

Makes one image with ``qemu-img create`` and copies it N times into a
directory, installs this tree as a user installs it (a wheel in a fresh venv,
its console script, bytecode compiled, no editable finder), and prints, from one
run with interleaved rounds (medians):

- warm page cache, whole processes, output to /dev/null: ``storprobe scan DIR
  --output json`` (a worker per CPU, as shipped), with ``--jobs 1``, and
  ``--jsonl``; ``virsh pool-refresh`` of a transient dir pool on the same
  directory (libvirtd started when it does not answer and we are root); the
  bare loop (the venv's interpreter listing the directory and opening,
  fstatting, reading 4 KiB of and closing each file); the same loop in C,
  compiled with gcc into /tmp when the benchmark starts (the physical floor:
  it parses nothing); a minimal Python prober (the bare loop plus storprobe's
  two reads, one struct unpack and one small JSON object per file, no
  detection, no checks); ``qemu-img info`` on a sample, extrapolated; and the
  interpreter's own start. Ratios to virsh, to the bare loop and to the C loop,
  of wall time and of CPU time (the process, the workers it waited for, and for
  virsh libvirtd's threads: steadier than wall time on a loaded machine).
  ``--runs`` repeats the table and prints the spread of the ratios.
- start-up: ``storprobe scan`` of an empty directory (and of a directory of one
  image) against ``python -c pass``, through the installed console script:
  min and median, wall and CPU, of ``--startup-repeat`` interleaved runs.
- the head read: what the scan's first reads cost per image, in process, for
  the general path's (the 0x8200-byte head and the last 512 bytes) and the
  fast path's (a 4 KiB head, ISO 9660's signature at 32769 read on its own, the
  last 512 bytes: three reads, all inside what the read-ahead hint asked the
  disk for, so no more disk reads).
- in process: microseconds per ``probe()`` and read calls per probe for one
  image of each format a tool here makes, for this tree and, with
  ``--before REV``, for that git revision, in interleaved subprocesses.
- peak RSS of ``scan --jsonl`` and ``--output json`` for N/4 and N entries.
- cold page cache (root only; ``--no-cold`` skips it): the bare loop, storprobe
  in one process with read-ahead off and on, and as shipped.

Measured processes run as an installed package runs: with a bytecode cache and
buffered output, whatever ``PYTHONDONTWRITEBYTECODE`` and ``PYTHONUNBUFFERED``
say. The directory must be on a disk (not tmpfs) for the cold numbers to mean
anything. ``--dir`` keeps the images and the venv between runs.
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
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NamedTuple

ROOT = Path(__file__).resolve().parent.parent
FLOOR = """
import os, sys
d = sys.argv[1]
for name in sorted(os.listdir(d)):
    fd = os.open(os.path.join(d, name), os.O_RDONLY)
    os.fstat(fd)
    os.pread(fd, 4096, 0)
    os.close(fd)
"""
#: The bare loop in C: the physical floor (it reads what the Python loop reads and parses nothing).
FLOOR_C = r"""
#include <dirent.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

static int by_name(const void *a, const void *b) { return strcmp(*(char *const *)a, *(char *const *)b); }

int main(int argc, char **argv) {
    DIR *dir = opendir(argv[1]);
    if (!dir) return 1;
    size_t count = 0, room = 1024;
    char **names = malloc(room * sizeof *names);
    struct dirent *entry;
    while ((entry = readdir(dir))) {
        if (!strcmp(entry->d_name, ".") || !strcmp(entry->d_name, "..")) continue;
        if (count == room) names = realloc(names, (room *= 2) * sizeof *names);
        names[count++] = strdup(entry->d_name);
    }
    closedir(dir);
    qsort(names, count, sizeof *names, by_name);
    char path[4096], buf[4096];
    struct stat st;
    for (size_t i = 0; i < count; i++) {
        snprintf(path, sizeof path, "%s/%s", argv[1], names[i]);
        int fd = open(path, O_RDONLY);
        if (fd < 0) continue;
        fstat(fd, &st);
        if (pread(fd, buf, sizeof buf, 0) < 0) return 1;
        close(fd);
    }
    return 0;
}
"""
#: The least a Python prober that prints JSON does per file: the bare loop's system
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
#: The first reads of each image of a pool, timed in process: storprobe's, and a smaller head.
HEAD_READS = """
import os, sys, time, statistics
d, rounds = sys.argv[1], int(sys.argv[2])
paths = [os.path.join(d, n) for n in sorted(os.listdir(d))]
flags = os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC | os.O_NOFOLLOW
def storprobes():
    for p in paths:
        fd = os.open(p, flags); size = os.fstat(fd).st_size
        os.pread(fd, min(0x8200, size), 0); os.pread(fd, 512, size - 512); os.close(fd)
def smaller_head():
    for p in paths:
        fd = os.open(p, flags); size = os.fstat(fd).st_size
        os.pread(fd, 4096, 0); os.pread(fd, 5, 32769); os.pread(fd, 512, size - 512); os.close(fd)
times = {"storprobe": [], "smaller": []}
for _ in range(rounds):
    for name, loop in (("storprobe", storprobes), ("smaller", smaller_head)):
        start = time.process_time(); loop(); times[name].append((time.process_time() - start) / len(paths) * 1e6)
print({name: statistics.median(values) for name, values in times.items()})
"""
#: One image of each format, probed in process: prints {label: [format, us per probe, reads]}.
PER_FORMAT = """
import json, sys, time, statistics
from storprobe import ProbeError, probe
from storprobe.source import PathSource
images, repeat = json.loads(sys.argv[1]), int(sys.argv[2])
class Counting:
    def __init__(self, source):
        self.source, self.reads = source, 0
        self.name, self.file_type, self.stat = source.name, source.file_type, source.stat
    def size(self): return self.source.size()
    def read_at(self, offset, length):
        self.reads += 1
        return self.source.read_at(offset, length)
    def close(self): self.source.close()
out = {}
for label, path in images.items():
    source = Counting(PathSource(path))
    try:
        detected = probe(source).format
    except ProbeError as exc:
        detected = exc.code
    finally:
        source.close()
    rounds = []
    for _ in range(repeat):
        start = time.process_time()
        for _ in range(1000):
            try:
                probe(path)
            except ProbeError:
                pass
        rounds.append((time.process_time() - start) / 1000 * 1e6)
    out[label] = [detected, statistics.median(rounds), source.reads]
print(json.dumps(out))
"""
VIRSH = ["virsh", "-c", "qemu:///system"]
START = "python -c pass (interpreter start)"
#: The environment of every measured process (see the module docstring).
ENV = {k: v for k, v in os.environ.items() if k not in ("PYTHONDONTWRITEBYTECODE", "PYTHONUNBUFFERED")}


class Installed:
    """This tree as a user installs it: its wheel in a fresh venv, the venv
    seeing the dependencies (pluggy, lxml, google-crc32c) where they are
    installed now, but not that site-packages' own ``.pth`` files."""

    def __init__(self, work: Path) -> None:
        self.venv = work / "venv"
        self.python = str(self.venv / "bin" / "python")
        self.storprobe = str(self.venv / "bin" / "storprobe")

    def install(self, work: Path) -> None:
        if not self.venv.exists():
            subprocess.run([sys.executable, "-m", "venv", str(self.venv)], check=True)
        site = subprocess.run([self.python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                              capture_output=True, text=True, check=True).stdout.strip()
        import google_crc32c
        import lxml
        import pluggy

        found = sorted({str(Path(str(m.__file__)).resolve().parent.parent) for m in (pluggy, lxml, google_crc32c)})
        Path(site, "storprobe-bench-dependencies.pth").write_text("".join(f"{d}\n" for d in found))
        source, wheels = work / "source", work / "wheels"
        for made in (source, wheels):
            shutil.rmtree(made, ignore_errors=True)
        source.mkdir()
        for name in ("storprobe", "plugins", "xml-schemas"):
            shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
        for name in ("pyproject.toml", "README.md", "LICENSE"):
            shutil.copy(ROOT / name, source / name)
        subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "--no-index",
                        "-w", str(wheels), str(source)], check=True, capture_output=True)
        (wheel,) = wheels.glob("storprobe-*.whl")
        subprocess.run([self.python, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--force-reinstall",
                        str(wheel)], check=True, capture_output=True)


def compile_floor() -> str | None:
    """The C loop, compiled into /tmp (None without gcc)."""
    if shutil.which("gcc") is None:
        return None
    directory = Path(tempfile.mkdtemp(prefix="storprobe-bench-floor-", dir="/tmp"))
    (directory / "floor.c").write_text(FLOOR_C)
    subprocess.run(["gcc", "-O2", "-o", str(directory / "floor"), str(directory / "floor.c")], check=True)
    return str(directory / "floor")


class Timing(NamedTuple):
    """Wall time, and CPU time (user and system, of the process, the workers it
    waited for, and the server it asked, if any), in seconds."""

    wall: float
    cpu: float


def run_time(cmd: Sequence[str], server: int | None = None) -> Timing:
    """One whole process, its output thrown away; ``server``: the pid of a
    daemon doing the work (libvirtd), whose threads' CPU time counts too."""
    before = server_cpu(server)
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise subprocess.CalledProcessError(os.waitstatus_to_exitcode(status), cmd)
    return Timing(wall, usage.ru_utime + usage.ru_stime + server_cpu(server) - before)


def server_cpu(pid: int | None) -> float:
    """CPU seconds all threads of ``pid`` have run (0 for None)."""
    if pid is None:
        return 0.0
    total = 0
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/schedstat") as f:
                total += int(f.read().split()[0])
        except OSError:
            continue  # a thread that ended meanwhile
    return total / 1e9


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


def libvirtd_pid() -> int | None:
    out = subprocess.run(["pidof", "libvirtd"], capture_output=True, text=True, check=False).stdout.split()
    return int(out[0]) if len(out) == 1 else None


def libvirt_answers() -> bool:
    return subprocess.run([*VIRSH, "uri"], capture_output=True, check=False).returncode == 0


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
        if not libvirt_answers() and os.geteuid() == 0 and shutil.which("libvirtd"):
            subprocess.run(["libvirtd", "-d"], check=False)  # as tests/setup-tools.sh starts it
            for _ in range(50):
                if libvirt_answers():
                    break
                time.sleep(0.2)
        return cls(directory) if libvirt_answers() else None

    def refresh_cmd(self) -> list[str]:
        return [*VIRSH, "pool-refresh", self.name]

    def destroy(self) -> None:
        subprocess.run([*VIRSH, "pool-destroy", self.name], capture_output=True, check=False)


def interleaved(
    runs: dict[str, Callable[[], Timing]], repeat: int, before: Callable[[], None] = lambda: None
) -> dict[str, list[Timing]]:
    """Times of ``repeat`` rounds, each round running every entry once, in turn."""
    times: dict[str, list[Timing]] = {name: [] for name in runs}
    for _ in range(repeat):
        for name, run in runs.items():
            before()
            times[name].append(run())
    return times


def medians(times: dict[str, list[Timing]]) -> dict[str, Timing]:
    return {
        name: Timing(statistics.median(t.wall for t in values), statistics.median(t.cpu for t in values))
        for name, values in times.items()
    }


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


def table(rows: dict[str, Timing], n: int, columns: dict[str, str]) -> None:
    """Wall times, per image, and the ratio to each entry named in ``columns``
    (heading -> entry); then CPU times and their ratios."""
    headings = "".join(f"{heading:>10}" for heading in columns)
    print(f"{'':48}{'time':>9}{'per image':>12}{headings}{'CPU':>9}{headings}")
    for name, timing in rows.items():
        per = "" if name == START else f"{timing.wall / n * 1e6:9.1f} us"
        cells = ""
        for kind in ("wall", "cpu"):
            if kind == "cpu":
                cells += f"{timing.cpu:8.3f}s"
            for entry in columns.values():
                ratio = getattr(timing, kind) / getattr(rows[entry], kind) if entry in rows else 0
                cells += f"{ratio:9.2f}x" if ratio and name != START else f"{'':10}"
        print(f"{name:48}{timing.wall:8.3f}s{per:>12}{cells}")


OURS = "storprobe scan --output json"
BARE = "bare loop (python: open, fstat, 4 KiB, close)"
C_FLOOR = "C loop (the same reads, gcc -O2)"
VIRSH_REFRESH = "virsh pool-refresh (transient dir pool)"


def warm(installed: Installed, floor_c: str | None, pool_dir: Path, n: int, repeat: int, runs: int,
         sample: int) -> None:
    files = sorted(pool_dir.iterdir())[:sample]

    def qemu_img() -> Timing:
        timings = [run_time(["qemu-img", "info", "--output=json", str(f)]) for f in files]
        return Timing(sum(t.wall for t in timings) * n / len(files), sum(t.cpu for t in timings) * n / len(files))

    scan = [installed.storprobe, "scan", str(pool_dir)]
    entries: dict[str, Callable[[], Timing]] = {
        START: lambda: run_time([installed.python, "-c", "pass"]),
        BARE: lambda: run_time([installed.python, "-c", FLOOR, str(pool_dir)]),
        "minimal Python prober (no detection, no checks)": lambda: run_time(
            [installed.python, "-c", MINIMAL, str(pool_dir)]
        ),
        OURS: lambda: run_time([*scan, "--output", "json"]),
        "storprobe scan --output json --jobs 1": lambda: run_time([*scan, "--output", "json", "--jobs", "1"]),
        "storprobe scan --jsonl": lambda: run_time([*scan, "--jsonl"]),
    }
    if floor_c is not None:
        entries[C_FLOOR] = lambda: run_time([floor_c, str(pool_dir)])
    if sample:
        entries[f"qemu-img info x{n} (from {len(files)}, extrapolated)"] = qemu_img
    libvirt = Pool.open(pool_dir)
    ratios: list[dict[str, float]] = []
    try:
        if libvirt is not None:
            entries[VIRSH_REFRESH] = lambda: run_time(libvirt.refresh_cmd(), libvirtd_pid())
        run_time([*scan, "--output", "json"])  # warm the cache
        for number in range(runs):
            rows = medians(interleaved(entries, repeat))
            print(f"\nWarm page cache, whole processes, {repeat} interleaved rounds, medians"
                  + (f" (run {number + 1} of {runs})" if runs > 1 else "") + ":")
            table(rows, n, {"vs virsh": VIRSH_REFRESH, "vs bare": BARE, "vs C": C_FLOOR})
            ratios.append({f"{kind} vs {name}": getattr(rows[OURS], kind) / getattr(rows[entry], kind)
                           for kind in ("wall", "cpu")
                           for name, entry in (("virsh", VIRSH_REFRESH), ("bare loop", BARE), ("C loop", C_FLOOR))
                           if entry in rows})
    finally:
        if libvirt is not None:
            libvirt.destroy()
    if libvirt is None:
        print("(virsh pool-refresh: libvirtd not reachable at qemu:///system, skipped)")
    if runs > 1:
        print(f"\n`{OURS}`, ratios over {runs} runs (min-max):")
        for name in ratios[0]:
            values = [r[name] for r in ratios]
            print(f"  {name:20}{min(values):6.2f}x - {max(values):.2f}x   ({', '.join(f'{v:.2f}' for v in values)})")


def startup(installed: Installed, pool_dir: Path, work: Path, repeat: int) -> None:
    empty = work / "empty"
    empty.mkdir(exist_ok=True)
    one = linked_pool(pool_dir, work / "one", 1)
    entries = {
        START: lambda: run_time([installed.python, "-c", "pass"]),
        "storprobe scan EMPTY_DIR": lambda: run_time([installed.storprobe, "scan", str(empty)]),
        "storprobe scan DIR_OF_ONE_IMAGE": lambda: run_time([installed.storprobe, "scan", str(one)]),
    }
    times = interleaved(entries, repeat)
    print(f"\nStart-up, the installed console script, {repeat} interleaved runs (ms; over: minus python -c pass's):")
    overs = f"{'over':>8}{'over':>8}"
    print(f"{'':36}{'wall min':>10}{'median':>8}{overs}{'CPU min':>10}{'median':>8}{overs}")
    for name, values in times.items():
        cells = ""
        for kind in ("wall", "cpu"):
            mine = [getattr(t, kind) * 1e3 for t in values]
            base = [getattr(t, kind) * 1e3 for t in times[START]]
            low, mid = min(mine), statistics.median(mine)
            over = f"{low - min(base):8.1f}{mid - statistics.median(base):8.1f}" if name != START else f"{'':16}"
            cells += f"{low:10.1f}{mid:8.1f}{over}"
        print(f"{name:36}{cells}")


def head_reads(installed: Installed, pool_dir: Path, repeat: int) -> None:
    out = subprocess.run([installed.python, "-c", HEAD_READS, str(pool_dir), str(repeat)], capture_output=True,
                         text=True, check=True, env=ENV).stdout
    cost = eval(out, {})  # a dict literal this script printed
    print("\nThe first reads, per image, in process (CPU time, medians of interleaved rounds):")
    print(f"  general path: open, fstat, the 0x8200-byte head, the last 512 bytes, close: {cost['storprobe']:6.2f} us")
    print(f"  fast path: open, fstat, a 4 KiB head, 5 bytes at 32769, the last 512, close: {cost['smaller']:6.2f} us")
    print(f"  difference: {cost['storprobe'] - cost['smaller']:+.2f} us per image")


def sample_images(directory: Path) -> dict[str, str]:
    """One small image per format a tool here can make (skipping missing tools)."""
    directory.mkdir(exist_ok=True)
    made: dict[str, str] = {}

    def make(label: str, path: Path, *cmd: str) -> None:
        if not shutil.which(cmd[0]):
            return
        if path.exists():
            made[label] = str(path)
            return
        for _ in range(50):  # qemu-img's key-derivation timing fails at random where CPU clocks tick coarsely
            proc = subprocess.run(cmd, capture_output=True, check=False)
            if proc.returncode == 0 or b"accurate CPU usage" not in proc.stderr:
                break
            if path.exists():
                path.unlink()  # bximage, for one, will not overwrite
        if proc.returncode == 0 and path.exists():
            made[label] = str(path)

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
    made["dir"] = str(iso_root)
    return made


def revision_tree(revision: str, work: Path) -> Path:
    """The storprobe of a git revision, importable from the returned directory
    (``storprobe_plugins`` is its ``plugins`` directory, as the wheel maps it)."""
    tree = work / f"rev-{revision}"
    shutil.rmtree(tree, ignore_errors=True)
    tree.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", revision, "storprobe", "plugins"],
                             capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(tree)], input=archive, check=True)
    (tree / "storprobe_plugins").symlink_to("plugins")
    return tree


def per_format(installed: Installed, directory: Path, repeat: int, before: str | None, work: Path) -> None:
    images = json.dumps(sample_images(directory))
    trees: dict[str, Path | None] = {"after": None}
    if before is not None:
        trees = {"before": revision_tree(before, work), "after": None}
    env = dict(ENV, STORPROBE_DISABLE_PLUGIN_AUTOLOAD="1")
    results: dict[str, list[dict[str, list]]] = {name: [] for name in trees}
    for _ in range(repeat):
        for name, tree in trees.items():
            run_env = dict(env, PYTHONPATH=str(tree)) if tree is not None else env
            out = subprocess.run([installed.python, "-c", PER_FORMAT, images, "3"], capture_output=True, text=True,
                                 check=True, env=run_env).stdout
            results[name].append(json.loads(out))
    print(f"\nIn process, one image per format (warm): CPU microseconds per probe() (median of {repeat}"
          " interleaved runs of 3 x 1000), read calls per probe"
          + (f"; before: {before}, after: this tree" if before else "") + ":")
    header = f"{'format':20}{'detected':>12}" + "".join(f"{name + ' us':>11}{'reads':>7}" for name in trees)
    print(header)
    for label in results["after"][0]:
        cells = ""
        for name in trees:
            us = statistics.median(run[label][1] for run in results[name])
            cells += f"{us:11.1f}{results[name][0][label][2]:7d}"
        print(f"{label:20}{results['after'][0][label][0]:>12}{cells}")


def memory(installed: Installed, pool_dir: Path, n: int, scratch: Path) -> None:
    small = linked_pool(pool_dir, scratch / "quarter", max(1, n // 4))
    print("\nPeak RSS (MiB), streaming output:")
    print(f"{'':36}{f'N={n // 4}':>10}{f'N={n}':>10}")
    streaming = (("storprobe scan --jsonl", ["--jsonl"]), ("storprobe scan --output json", ["--output", "json"]))
    for label, extra in streaming:
        sizes = [peak_rss_mib([installed.storprobe, "scan", str(d), *extra]) for d in (small, pool_dir)]
        print(f"{label:36}{sizes[0]:10.1f}{sizes[1]:10.1f}")
    shutil.rmtree(small)


def cold(installed: Installed, pool_dir: Path, n: int, repeat: int) -> None:
    if os.geteuid() != 0 or not os.access("/proc/sys/vm/drop_caches", os.W_OK):
        print("\nCold cache: skipped (needs root to drop the page cache)")
        return
    scan = ["scan", str(pool_dir), "--output", "json"]
    ours = "storprobe scan (default)"
    entries: dict[str, Callable[[], Timing]] = {
        BARE: lambda: run_time([installed.python, "-c", FLOOR, str(pool_dir)]),
        "storprobe scan --jobs 1, read-ahead off": lambda: run_time(
            [installed.python, "-c", NO_READAHEAD, *scan, "--jobs", "1"]
        ),
        "storprobe scan --jobs 1 (read-ahead)": lambda: run_time([installed.storprobe, *scan, "--jobs", "1"]),
        ours: lambda: run_time([installed.storprobe, *scan]),
    }
    rows = medians(interleaved(entries, repeat, before=drop_caches))
    print(f"\nCold page cache (dropped before every run), {repeat} interleaved rounds, medians:")
    table(rows, n, {"vs bare": BARE, "vs ours": ours})


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", type=int, default=10_000, help="images in the pool (default 10000)")
    parser.add_argument("--format", default="qcow2", help="qemu-img format of the images (default qcow2)")
    parser.add_argument("--size", default="1G", help="virtual size of the images (default 1G)")
    parser.add_argument("--repeat", type=int, default=7, help="interleaved rounds, warm (default 7)")
    parser.add_argument("--runs", type=int, default=1, help="warm tables, for the spread of the ratios (default 1)")
    parser.add_argument("--startup-repeat", type=int, default=25, help="interleaved start-up runs (default 25)")
    parser.add_argument("--cold-repeat", type=int, default=3, help="interleaved rounds, cold (default 3)")
    parser.add_argument("--sample", type=int, default=20, help="images qemu-img info runs on, 0: none (default 20)")
    parser.add_argument("--before", metavar="REV", help="a git revision to compare the per-format table with")
    parser.add_argument("--dir", type=Path, help="work directory, kept (default: a temporary one, removed)")
    parser.add_argument("--no-cold", action="store_true", help="skip the cold-cache runs")
    parser.add_argument("--only", choices=("warm", "startup", "head", "formats"), action="append",
                        help="run only these sections (repeatable)")
    args = parser.parse_args(argv)

    work = args.dir or Path(tempfile.mkdtemp(prefix="storprobe-bench-", dir="/var/tmp"))
    floor_c = compile_floor()
    try:
        pool_dir = work / f"pool-{args.format}-{args.n}"
        make_pool(pool_dir, args.format, args.size, args.n)
        installed = Installed(work)
        installed.install(work)
        print(f"{args.n} {args.format} images ({args.size}, qemu-img create) in {pool_dir}")
        print(versions())
        sections = set(args.only or ("warm", "startup", "head", "formats", "memory", "cold"))
        if "warm" in sections:
            warm(installed, floor_c, pool_dir, args.n, args.repeat, args.runs, args.sample)
        if "startup" in sections:
            startup(installed, pool_dir, work, args.startup_repeat)
        if "head" in sections:
            head_reads(installed, pool_dir, args.repeat)
        if "formats" in sections:
            per_format(installed, work / "formats", args.repeat, args.before, work)
        if "memory" in sections:
            memory(installed, pool_dir, args.n, work)
        if "cold" in sections and not args.no_cold:
            cold(installed, pool_dir, args.n, args.cold_repeat)
    finally:
        if floor_c is not None:
            shutil.rmtree(Path(floor_c).parent, ignore_errors=True)
        if args.dir is None:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
