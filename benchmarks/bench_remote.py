#!/usr/bin/env python3
"""Object-store scans: objects per second, and requests and bytes per object,
counted at the server, for storprobe's concurrent range reads next to the
obvious alternatives, on loopback servers that honour Range.

    python benchmarks/bench_remote.py [-n 10000] [--sample 1000] [--concurrency 64]

Makes N small real images (qemu-img: qcow2, vmdk, vpc, vdi and raw, in turn)
and serves them from servers started in processes of their own (so the client's
CPU is its own): moto's S3 server (tests/servers.py's, counting per object),
tests/servers.py's RangeServer (Python's ThreadingHTTPServer honouring Range),
the same answering each request 20 ms late (a store's time to first byte,
which loopback lacks), and nginx when /usr/sbin/nginx is installed
(``apt-get install nginx-light``; counted from its access log). For each
server, in one run:

- storprobe: ``scan_objects`` of the prefix on S3 (the listing's sizes: no size
  round trip) or ``probe_objects`` of the URLs on HTTP, ``--concurrency`` at once;
- a sequential client: the same probes one at a time (``concurrency=1``);
- the whole object, then ``storprobe.probe`` of its bytes: fsspec's default
  ``fsspec.open(url).read()`` on HTTP (fsspec's HTTP filesystem, which needs
  aiohttp), boto3's ``get_object()["Body"].read()`` on S3 (s3fs, fsspec's S3,
  pins a botocore other than the one moto and boto3 here need).

The sequential client and fsspec run on ``--sample`` objects (their rates are
per object; the whole N would take minutes). Client CPU seconds per object say
where the ceiling is: when the client's CPU per object is far below the wall
time per object, the server (or the round trip) bounds the rate.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

FORMATS = (
    ("qcow2", "16M", "cluster_size=4096"),
    ("vmdk", "16M", None),
    ("vpc", "16M", None),
    ("vdi", "16M", None),
    ("raw", "64K", None),
)
BUCKET = "bench"


def make_images(d: Path, n: int) -> list[str]:
    """N image files named img-00000.EXT ... (copies of one image per format)."""
    seeds = {}
    for fmt, size, options in FORMATS:
        path = d / f"seed.{fmt}"
        args = ["qemu-img", "create", "-q", "-f", fmt, *(["-o", options] if options else []), str(path), size]
        subprocess.run(args, check=True)
        seeds[fmt] = path.read_bytes()
        path.unlink()
    (d / "objects").mkdir()
    names = []
    for i in range(n):
        fmt = FORMATS[i % len(FORMATS)][0]
        name = f"img-{i:05d}.{fmt}"
        (d / "objects" / name).write_bytes(seeds[fmt])
        names.append(name)
    return names


def serve(kind: str, directory: str, ready, stop, results, delay: float) -> None:
    """A server in this process until ``stop`` is set; its counts put on ``results``."""
    from servers import S3_ENV, RangeServer, moto_s3

    if kind == "moto":
        os.environ.update(S3_ENV)
        with moto_s3() as server:
            server.client.create_bucket(Bucket=BUCKET)
            for name in sorted(os.listdir(directory)):
                with open(os.path.join(directory, name), "rb") as f:
                    server.client.put_object(Bucket=BUCKET, Key=f"pool/{name}", Body=f.read())
            server.counts.clear()
            _serve_until(server.endpoint, server.counts, ready, stop, results)
    else:
        with RangeServer(directory, delay=delay) as server:
            _serve_until(server.url, server.counts, ready, stop, results)


def _serve_until(url, counts, ready, stop, results) -> None:
    ready.put(url)
    while True:
        command = stop.get()
        with counts.lock:
            results.put((dict(counts.requests), dict(counts.sent)))
            counts.requests.clear()
            counts.sent.clear()
        if command == "stop":
            return


class Served:
    """A server in a child process; :meth:`counts` takes (and resets) what it counted."""

    def __init__(self, kind: str, directory: Path, delay: float = 0.0) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.ready, self.stop, self.results = ctx.Queue(), ctx.Queue(), ctx.Queue()
        self.process = ctx.Process(
            target=serve, args=(kind, str(directory), self.ready, self.stop, self.results, delay)
        )
        self.process.start()
        self.url = self.ready.get(timeout=1800)

    def counts(self) -> tuple[Counter, Counter]:
        self.stop.put("count")
        requests, sent = self.results.get()
        return Counter(requests), Counter(sent)

    def close(self) -> None:
        self.stop.put("stop")
        self.results.get()
        self.process.join()


class Nginx:
    """nginx serving ``directory`` on a free port, its access log counting requests and body bytes by URI."""

    def __init__(self, directory: Path, work: Path) -> None:
        from servers import free_port

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = work / "access.log"
        conf = work / "nginx.conf"
        conf.write_text(f"""
worker_processes 1;
pid {work}/nginx.pid;
error_log {work}/error.log;
events {{ worker_connections 1024; }}
http {{
    log_format counted '$uri $body_bytes_sent';
    access_log {self.log} counted;
    client_body_temp_path {work};
    proxy_temp_path {work};
    fastcgi_temp_path {work};
    uwsgi_temp_path {work};
    scgi_temp_path {work};
    keepalive_requests 100000;
    server {{
        listen 127.0.0.1:{self.port};
        root {directory};
    }}
}}
""")
        self.process = subprocess.Popen(["/usr/sbin/nginx", "-c", str(conf), "-g", "daemon off;"])
        for _ in range(100):
            try:
                import urllib.request

                urllib.request.urlopen(self.url + "/", timeout=1)
                break
            except OSError as exc:
                if getattr(exc, "code", None):  # an HTTP answer (403/404): it listens
                    break
                time.sleep(0.05)

    def counts(self) -> tuple[Counter, Counter]:
        self.process.send_signal(signal.SIGUSR1)  # reopen the log: what was logged is flushed
        time.sleep(0.3)
        requests, sent = Counter(), Counter()
        if self.log.exists():
            for line in self.log.read_text().splitlines():
                uri, size = line.rsplit(" ", 1)
                requests[uri] += 1
                sent[uri] += int(size)
            self.log.unlink()
            self.process.send_signal(signal.SIGUSR1)
        return requests, sent

    def close(self) -> None:
        self.process.terminate()
        self.process.wait()


def timed(work, *args) -> tuple[float, float, int]:
    """(wall seconds, this process's CPU seconds, objects) of ``work(*args)``."""
    wall, cpu = time.perf_counter(), time.process_time()
    done = work(*args)
    return time.perf_counter() - wall, time.process_time() - cpu, done


def run_storprobe(urls, listing_prefix, endpoint, concurrency) -> int:
    from storprobe.objectscan import Listed, probe_objects, scan_objects

    if listing_prefix is not None:
        records = scan_objects(listing_prefix, endpoint_url=endpoint, concurrency=concurrency)
    else:
        records = probe_objects([Listed(u, s) for u, s in urls], endpoint_url=endpoint, concurrency=concurrency)
    count = 0
    for record in records:
        assert record.error is None, (record.path, record.error)
        count += 1
    return count


def run_fsspec(urls) -> int:
    import fsspec

    import storprobe

    fs = fsspec.filesystem("http")
    for url, _ in urls:
        with fs.open(url) as f:
            data = f.read()
        storprobe.probe(storprobe.BytesSource(data, url))
    return len(urls)


def run_boto3(endpoint, keys) -> int:
    import boto3

    import storprobe

    client = boto3.client("s3", endpoint_url=endpoint)
    for key in keys:
        data = client.get_object(Bucket=BUCKET, Key=key)["Body"].read()
        storprobe.probe(storprobe.BytesSource(data, key))
    return len(keys)


def row(table, server, client, n, wall, cpu, counts, prefix) -> None:
    requests, sent = counts
    keys = [k for k in requests if k.startswith(prefix)]
    table.append((
        server, client, n, n / wall, 1000 * wall / n, 1000 * cpu / n,
        sum(requests[k] for k in keys) / n, sum(sent[k] for k in keys) / n / 1024,
    ))


def bench_server(table, kind, server, names, sample, sizes, concurrency) -> None:
    """The three clients against one server, rows added to ``table``."""
    if kind == "moto":
        from servers import S3_ENV

        os.environ.update(S3_ENV)
        base, prefix, endpoint, listing = f"{server.url}/{BUCKET}/pool", f"/{BUCKET}/pool/", server.url, f"s3://{BUCKET}/pool/"
        sequential = [(f"s3://{BUCKET}/pool/{name}", sizes[name]) for name in sample]
    else:
        base, prefix, endpoint, listing = server.url, "/", None, None
        sequential = [(f"{base}/{name}", sizes[name]) for name in sample]
    urls = [(f"{base}/{name}", sizes[name]) for name in names]
    wall, cpu, n = timed(run_storprobe, urls, listing, endpoint, concurrency)
    row(table, kind, f"storprobe, {concurrency} at once", n, wall, cpu, server.counts(), prefix)
    wall, cpu, n = timed(run_storprobe, sequential, None, endpoint, 1)
    row(table, kind, "storprobe, sequential", n, wall, cpu, server.counts(), prefix)
    if kind == "moto":
        wall, cpu, n = timed(run_boto3, endpoint, [f"pool/{name}" for name in sample])
        row(table, kind, "boto3 get_object().read()", n, wall, cpu, server.counts(), prefix)
    else:
        wall, cpu, n = timed(run_fsspec, [(f"{base}/{name}", sizes[name]) for name in sample])
        row(table, kind, "fsspec open().read()", n, wall, cpu, server.counts(), prefix)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", type=int, default=10_000, help="objects (default: %(default)s)")
    parser.add_argument("--sample", type=int, default=1000, help="objects for the slow clients (default: %(default)s)")
    parser.add_argument("--concurrency", type=int, default=64, help="storprobe's (default: %(default)s)")
    parser.add_argument(
        "--servers", default="nginx,range,range-20ms,moto",
        help="which, in order; range-Nms: the range server with N ms before each answer (default: %(default)s)",
    )
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-remote-", dir="/var/tmp"))
    table: list[tuple] = []
    try:
        names = make_images(work, args.n)
        objects = work / "objects"
        sizes = {name: (objects / name).stat().st_size for name in names}
        sample = names[: args.sample]  # every format in turn
        for kind in args.servers.split(","):
            if kind == "nginx" and not os.path.exists("/usr/sbin/nginx"):
                print("nginx: not installed (apt-get install nginx-light), skipped", file=sys.stderr)
                continue
            print(f"{kind}: starting ({args.n} objects)", file=sys.stderr)
            if kind == "nginx":
                server = Nginx(objects, work)
            else:  # range-20ms: the range server answering each request 20 ms late, as a store's first byte is
                delay = int(kind.partition("-")[2].removesuffix("ms") or 0) / 1000
                server = Served("moto" if kind == "moto" else "range", objects, delay)
            try:
                server.counts()
                bench_server(table, kind, server, names, sample, sizes, args.concurrency)
            finally:
                server.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print("| server | client | objects | objects/s | ms/object | client CPU ms/object | requests/object | KiB/object |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for server, client, n, rate, ms, cpu_ms, requests, kib in table:
        print(f"| {server} | {client} | {n} | {rate:,.0f} | {ms:.2f} | {cpu_ms:.2f} | {requests:.2f} | {kib:.1f} |")


if __name__ == "__main__":
    main()
