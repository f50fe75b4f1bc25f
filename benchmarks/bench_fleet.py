#!/usr/bin/env python3
"""Fleet scan throughput: objects per second into an inventory, in one process and on Dask.

    python benchmarks/bench_fleet.py [-n 10000] [--workers 2] [--batch 256] [--repeat 3] [--s3 N]

Makes N small images (copies of a handful of real ``qemu-img create`` images
of several formats, and broken ones) in a temporary directory, then prints,
from one run with interleaved repetitions (medians), whole processes as a
user runs them, warm page cache:

- ``storprobe scan DIR --jsonl`` to /dev/null: the local scan, a worker
  process per CPU, as shipped (the line to compare with);
- ``scan DIR --to OUT``: an inventory of Parquet parts, written by this one process;
- ``scan DIR --to OUT --dask --jobs W``: the same batches on a LocalCluster of
  W worker processes (its start and stop included), and the cluster's own
  cost (the same command over an empty directory);
- refreshes of an unchanged directory (``--since`` the first inventory), in one
  process and on the cluster: every row carried over, no object read.

With ``--s3 N``: moto's S3 server on loopback (tests/servers.py) holding N of
the objects, scanned in process by range reads, without Dask and on a
LocalCluster of threads (so the in-process server is reachable), with the
requests per object the server counted. moto answers a request in
milliseconds of Python, so these numbers measure moto, not storprobe.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

#: The environment of every measured process: bytecode cached, output buffered, as installed.
ENV = {k: v for k, v in os.environ.items() if k not in ("PYTHONDONTWRITEBYTECODE", "PYTHONUNBUFFERED")}
TEMPLATES = [
    ("c4k.qcow2", "qcow2", "cluster_size=4096"),
    ("v2.qcow2", "qcow2", "cluster_size=512,compat=0.10"),
    ("a.qcow", "qcow", ""),
    ("a.qed", "qed", "cluster_size=4096"),
    ("s.vmdk", "vmdk", "subformat=streamOptimized"),
    ("a.vhd", "vpc", ""),
    ("a.vdi", "vdi", ""),
]


def storprobe_cmd() -> list[str]:
    script = Path(sys.executable).parent / "storprobe"
    return [str(script)] if script.exists() else [sys.executable, "-m", "storprobe"]


def make_objects(work: Path, n: int) -> Path:
    """``n`` objects in ``work/objects``: the templates in turn, one in 20 broken."""
    made = []
    for name, fmt, options in TEMPLATES:
        cmd = ["qemu-img", "create", "-q", "-f", fmt, str(work / name), "1M"]
        subprocess.run(cmd + (["-o", options] if options else []), check=True)
        made.append((name, (work / name).read_bytes()))
    good = made[0][1]
    made.append(("truncated.qcow2", good[:64]))
    made.append(("version77.qcow2", good[:4] + struct.pack(">I", 77) + good[8:]))
    objects = work / "objects"
    objects.mkdir()
    for index in range(n):
        name, data = made[index % len(made)] if index % 20 else made[-1 - index // 20 % 2]
        (objects / f"{index:06d}-{name}").write_bytes(data)
    return objects


def run_time(cmd: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True, env=ENV)
    return time.perf_counter() - start


def interleaved(runs: dict[str, Callable[[], float]], repeat: int) -> dict[str, float]:
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeat):
        for name, run in runs.items():
            times[name].append(run())
    return {name: statistics.median(values) for name, values in times.items()}


def local(work: Path, objects: Path, n: int, workers: int, batch: int, repeat: int) -> None:
    sp = storprobe_cmd()
    empty = work / "empty"
    empty.mkdir()
    base = work / "base"
    subprocess.run([*sp, "scan", str(objects), "--to", str(base)], check=True, stdout=subprocess.DEVNULL, env=ENV)
    out = work / "out"

    def inventory(*args: str, source: Path = objects) -> Callable[[], float]:
        def run() -> float:
            shutil.rmtree(out, ignore_errors=True)
            return run_time([*sp, "scan", str(source), "--to", str(out), "--batch", str(batch), *args])
        return run

    dask = ("--dask", "--jobs", str(workers))
    runs = {
        "scan --jsonl (local scan, a process per CPU)": lambda: run_time([*sp, "scan", "--jsonl", str(objects)]),
        "scan --to (one process)": inventory(),
        f"scan --to --dask --jobs {workers} (LocalCluster)": inventory(*dask),
        "scan --to --since (refresh, unchanged, one process)": inventory("--since", str(base)),
        f"scan --to --since --dask --jobs {workers}": inventory("--since", str(base), *dask),
        f"cluster only: --dask --jobs {workers}, empty dir": inventory(*dask, source=empty),
    }
    medians = interleaved(runs, repeat)
    startup = medians[f"cluster only: --dask --jobs {workers}, empty dir"]
    print(f"{n} objects, batches of {batch}, {os.cpu_count()} CPUs, Python {sys.version.split()[0]}")
    print(f"{'':52}{'time':>9}{'objects/s':>11}{'per object':>12}")
    for name, seconds in medians.items():
        rate = "" if name.startswith("cluster only") else f"{n / seconds:11.0f}{seconds / n * 1e6:9.1f} us"
        print(f"{name:52}{seconds:8.2f}s{rate}")
    for name, seconds in medians.items():
        if "--dask" in name and not name.startswith("cluster only"):
            print(f"{name:52}{n / max(seconds - startup, 1e-9):8.0f} objects/s without the cluster's start")


def remote(objects: Path, n: int, workers: int, batch: int, repeat: int) -> None:
    import importlib
    import logging
    from concurrent.futures import ThreadPoolExecutor

    import distributed

    from storprobe.fleet import fleet_scan

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    servers = importlib.import_module("servers")  # the tests' moto fixture
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # a line per request otherwise
    os.environ.update(servers.S3_ENV)
    files = sorted(objects.iterdir())[:n]
    with servers.moto_s3() as server:
        server.client.create_bucket(Bucket="bench")
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda p: server.client.put_object(Bucket="bench", Key=f"pool/{p.name}",
                                                               Body=p.read_bytes()), files))
        with (
            distributed.LocalCluster(n_workers=workers, threads_per_worker=1, processes=False,
                                     dashboard_address="127.0.0.1:0") as cluster,
            distributed.Client(cluster) as client,
        ):
            def scan(on: distributed.Client | None, out: str) -> Callable[[], float]:
                def run() -> float:
                    start = time.perf_counter()
                    fleet_scan("s3://bench/pool/", f"s3://bench/{out}/", client=on, endpoint_url=server.endpoint,
                               batch_size=batch)
                    return time.perf_counter() - start
                return run

            server.counts.clear()
            medians = interleaved({"S3, one process": scan(None, "one"),
                                   f"S3, LocalCluster of {workers} threads": scan(client, "dask")}, repeat)
        requests = sum(c for path, c in server.counts.requests.items() if path.startswith("/bench/pool/"))
    print(f"\n{n} objects in moto's S3 server (loopback), batches of {batch}")
    for name, seconds in medians.items():
        print(f"{name:52}{seconds:8.2f}s{n / seconds:11.0f} objects/s")
    print(f"requests per object, at the server: {requests / (2 * repeat * n):.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=10_000, help="objects (default: %(default)s)")
    parser.add_argument("--workers", type=int, default=2, help="LocalCluster workers (default: %(default)s)")
    parser.add_argument("--batch", type=int, default=256, help="objects per part (default: %(default)s)")
    parser.add_argument("--repeat", type=int, default=3, help="rounds, medians reported (default: %(default)s)")
    parser.add_argument("--s3", type=int, default=0, metavar="N", help="also scan N objects over moto's S3")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir="/var/tmp") as tmp:
        objects = make_objects(Path(tmp), args.n)
        local(Path(tmp), objects, args.n, args.workers, args.batch, args.repeat)
        if args.s3:
            remote(objects, min(args.s3, args.n), args.workers, args.batch, args.repeat)


if __name__ == "__main__":
    main()
