"""Fleet scans: a listing probed in batches (on a Dask cluster) into an inventory
of Parquet parts that says what a local scan says; parts that a retried task
overwrites; a refresh that reads only what changed; a schema that changes only
on purpose."""

from __future__ import annotations

import ctypes
import io
import json
import os
import pickle
import shutil
import struct
import subprocess
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from storprobe.fleet import MANIFEST, Batch, InventoryError, _run_on, fleet_scan, listing, run_batch
from storprobe.inventory import COLUMNS, SCHEMA_VERSION, arrow_schema
from storprobe.qemu_json import scan_record
from storprobe.scan import scan

from oracle import qemu_img_create, unusable_entry
from servers import free_port, moto_s3, s3_credentials

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")
distributed = pytest.importorskip("distributed")

#: Objects the cluster scan probes (the issue asks for at least 2,000).
FLEET = 2000
#: Objects the same scan probes over S3: moto's server takes some 25 ms a
#: request on this machine (uploads included), so 2,000 would take a minute.
S3_FLEET = 300
BUCKET = "fleet"

#: The schema as released: a change here is a change for every reader of an inventory.
PINNED = [
    ("filename", "string"), ("format", "string"), ("virtual_size", "int64"), ("actual_size", "int64"),
    ("cluster_size", "int64"), ("encrypted", "bool"), ("dirty_flag", "bool"), ("backing_filename", "string"),
    ("full_backing_filename", "string"), ("backing_filename_format", "string"), ("format_specific", "string"),
    ("snapshots", "string"), ("storprobe_format", "string"), ("evidence", "string"),
    ("matches", "list<item: string>"), ("version", "int64"), ("encryption", "string"), ("compat", "string"),
    ("features", "list<item: string>"), ("storprobe", "string"), ("error_code", "string"),
    ("error_message", "string"), ("object_size", "int64"), ("object_etag", "string"),
    ("object_mtime", "timestamp[ns, tz=UTC]"), ("file_ctime", "timestamp[ns, tz=UTC]"), ("file_device", "uint64"),
    ("file_inode", "uint64"), ("storprobe_version", "string"),
]

#: The inventory's column for each key of ``scan --jsonl``'s object, written out here
#: independently of storprobe.inventory; JSON values are compared decoded.
FROM_JSON = {
    "filename": "filename", "format": "format", "virtual-size": "virtual_size", "actual-size": "actual_size",
    "cluster-size": "cluster_size", "encrypted": "encrypted", "dirty-flag": "dirty_flag",
    "backing-filename": "backing_filename", "full-backing-filename": "full_backing_filename",
    "backing-filename-format": "backing_filename_format", "format-specific": "format_specific",
    "snapshots": "snapshots", "storprobe": "storprobe",
}
FROM_EXTRA = {
    "format": "storprobe_format", "evidence": "evidence", "matches": "matches", "version": "version",
    "encryption": "encryption", "compat": "compat", "features": "features",
}
JSON_COLUMNS = {"format_specific", "snapshots", "storprobe"}


@pytest.fixture(scope="module")
def templates(tmp_path_factory) -> dict[str, bytes]:
    """Small real images of several formats, and broken ones (each a named error)."""
    d = tmp_path_factory.mktemp("templates")
    made = [
        qemu_img_create(d / "c4k.qcow2", "qcow2", "1M", "cluster_size=4096"),
        qemu_img_create(d / "v2.qcow2", "qcow2", "1M", "cluster_size=512,compat=0.10"),
        qemu_img_create(d / "child.qcow2", "qcow2", "1M", "cluster_size=4096,backing_file=c4k.qcow2,backing_fmt=qcow2"),
        qemu_img_create(d / "a.qcow", "qcow", "1M"),
        qemu_img_create(d / "a.qed", "qed", "1M", "cluster_size=4096"),
        qemu_img_create(d / "s.vmdk", "vmdk", "1M", "subformat=streamOptimized"),
        qemu_img_create(d / "a.vhd", "vpc", "1M"),
        qemu_img_create(d / "a.vdi", "vdi", "1M"),
    ]
    images = {path.name: path.read_bytes() for path in made}
    good = images["c4k.qcow2"]
    images["truncated.qcow2"] = good[:64]
    images["version77.qcow2"] = good[:4] + struct.pack(">I", 77) + good[8:]
    images["zeros.raw"] = bytes(4096)
    images["empty.raw"] = b""
    return images


def fill(directory: Path, templates: dict[str, bytes], count: int) -> list[Path]:
    """``count`` objects: the templates in turn, one named by bytes that are
    not UTF-8, and a FIFO and a dangling link."""
    directory.mkdir(exist_ok=True)
    names = sorted(templates)
    made = []
    for index in range(count - 3):
        name = names[index % len(names)]
        path = directory / f"{index:05d}-{name}"
        path.write_bytes(templates[name])
        made.append(path)
    made.append(directory / os.fsdecode(b"latin-\xe9t\xe9.qcow2"))
    made[-1].write_bytes(templates["child.qcow2"])
    made.append(unusable_entry(directory / "fifo", "fifo"))
    made.append(unusable_entry(directory / "dangling", "dangling"))
    return made


@pytest.fixture(scope="module")
def fleet(tmp_path_factory, templates) -> Path:
    root = tmp_path_factory.mktemp("fleet") / "objects"
    fill(root, templates, FLEET)
    return root


@pytest.fixture(scope="module")
def client():
    """Two workers, one thread each, as threads of this process (processes=False):
    the same scheduler, task graph and retries as worker processes, without
    starting two interpreters that import storprobe on a machine whose two CPUs
    the whole suite shares. test_cli_scan_on_a_local_cluster runs worker processes."""
    with (
        distributed.LocalCluster(
            n_workers=2, threads_per_worker=1, processes=False, dashboard_address="127.0.0.1:0"
        ) as cluster,
        distributed.Client(cluster) as c,
    ):
        yield c


def read_rows(directory: Path) -> list[dict]:
    """Every row of a Parquet inventory, timestamps as nanoseconds (pyarrow needs pandas for datetimes)."""
    table = pa.concat_tables(pq.read_table(part) for part in sorted(directory.glob("part-*.parquet")))
    plain = pa.schema([f.with_type(pa.int64()) if pa.types.is_timestamp(f.type) else f for f in table.schema])
    return table.cast(plain).to_pylist()


def utf8(text: str) -> str:
    """A name as Parquet holds it: the bytes that are not UTF-8 as \\xNN."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def expected_row(record) -> dict:
    """What an inventory row says of a local scan's record, from ``scan --jsonl``'s object."""
    shown = json.loads(json.dumps(scan_record(record)).replace("\\udc", "\\\\x"))  # as utf8() writes them
    out = dict.fromkeys(c.name for c in COLUMNS if not c.name.startswith(("object_", "file_", "storprobe_v")))
    if "error" in shown:
        out.update(filename=shown["filename"], error_code=shown["error"]["code"],
                   error_message=shown["error"]["message"])
        return out
    out["encrypted"] = False  # qemu-img leaves the key out when it is false
    for key, column in FROM_JSON.items():
        if key in shown:
            out[column] = shown[key]
    for key, column in FROM_EXTRA.items():
        out[column] = shown["storprobe"].get(key)
    return out


def comparable(row: dict) -> dict:
    out = {k: v for k, v in row.items() if not k.startswith(("object_", "file_", "storprobe_v"))}
    for column in JSON_COLUMNS:
        out[column] = None if out[column] is None else json.loads(out[column])
    return out


class OpenWatch:
    """The kernel's count of opens of the files in a directory (inotify's
    IN_OPEN): which objects a scan really read, by whatever code."""

    IN_OPEN = 0x20
    EVENT = struct.Struct("iIII")

    def __init__(self, directory: Path) -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        self.fd = libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if self.fd < 0 or libc.inotify_add_watch(self.fd, os.fsencode(directory), self.IN_OPEN) < 0:
            pytest.skip(f"no inotify here: {os.strerror(ctypes.get_errno())}")

    def opened(self) -> Counter[str]:
        """Files opened since the last call, by name (the directory's own opens left out)."""
        seen: Counter[str] = Counter()
        while True:
            try:
                data = os.read(self.fd, 1 << 16)
            except BlockingIOError:
                return seen
            at = 0
            while at < len(data):
                _, _, _, length = self.EVENT.unpack_from(data, at)
                name = data[at + self.EVENT.size : at + self.EVENT.size + length].rstrip(b"\0")
                if name:
                    seen[os.fsdecode(name)] += 1
                at += self.EVENT.size + length

    def close(self) -> None:
        os.close(self.fd)


def test_the_schema_is_pinned():
    schema = arrow_schema()
    assert [(f.name, str(f.type)) for f in schema] == PINNED
    assert all(f.metadata[b"doc"] for f in schema), "every column says what it holds"
    assert schema.metadata[b"storprobe.schema"] == str(SCHEMA_VERSION).encode()
    assert SCHEMA_VERSION == 1, "a new column raises the version: pin the new schema above"


def test_a_cluster_scan_says_what_a_local_scan_says(fleet, tmp_path, client):
    """2,000 objects on two workers: every entry one row, in name order, equal to
    the local scan's record; the broken ones are error rows that stop nothing."""
    out = tmp_path / "inventory"
    with distributed.get_task_stream(client) as tasks:
        inventory = fleet_scan(fleet, out, client=client, batch_size=128)
    assert len({t["worker"] for t in tasks.data}) == 2, "both workers probed batches"
    local = list(scan(fleet))
    rows = read_rows(out)
    assert len(rows) == len(local) == FLEET
    assert [r["filename"] for r in rows] == [utf8(path) for path in sorted(r.path for r in local)]
    by_name = {utf8(r.path): r for r in local}
    for row in rows:
        assert comparable(row) == expected_row(by_name[row["filename"]]), row["filename"]
        status = os.lstat(by_name[row["filename"]].path)
        if row["filename"].endswith(("fifo", "dangling")):
            assert row["object_size"] is None
        else:
            assert (row["object_size"], row["object_mtime"], row["file_inode"]) == (
                status.st_size, status.st_mtime_ns, status.st_ino)
    errors = Counter(r["error_code"] for r in rows if r["error_code"])
    assert errors.keys() == {"source", "truncated", "unsupported-version"} and errors["source"] == 2, errors
    assert inventory.records == FLEET and inventory.errors == sum(errors.values()) and inventory.carried == 0
    manifest = json.loads((out / MANIFEST).read_text())
    assert [p["name"] for p in manifest["parts"]] == sorted(p.name for p in out.glob("part-*.parquet"))
    assert len(manifest["parts"]) == -(-FLEET // 128) and manifest["records"] == FLEET


def test_the_cluster_holds_a_window_of_batches_not_the_fleet(tmp_path, templates, client):
    """Batches are taken from the listing as tasks finish: at most two per
    worker thread (two threads here) are submitted and not done."""
    objects = tmp_path / "objects"
    fill(objects, templates, 40)
    out = tmp_path / "inventory"
    out.mkdir()
    ahead = []

    def batches():
        for number, entry in enumerate(listing(objects)):
            ahead.append(number - len(list(out.glob("part-*"))))  # taken, less those done (or being written)
            yield Batch(number, (entry,), str(out), "parquet")

    parts = _run_on(client, batches())
    assert [p.first for p in parts] == [utf8(e.name) for e in listing(objects)]
    assert max(ahead) <= 2 * 2 and len(ahead) == 40


def test_a_batch_run_again_overwrites_its_part(tmp_path, templates):
    objects = tmp_path / "objects"
    fill(objects, templates, 40)
    out = tmp_path / "inventory"
    first = fleet_scan(objects, out, batch_size=16)
    written = {p.name: p.read_bytes() for p in out.glob("part-*")}
    batch = Batch(1, tuple(listing(objects)[16:32]), str(out), "parquet")
    again = run_batch(batch)
    assert again == first.parts[1]
    assert {p.name: p.read_bytes() for p in out.glob("part-*")} == written, "same names, same bytes"
    assert not list(out.glob(".*")), "no temporary file left"
    rows = read_rows(out)
    assert len(rows) == len({r["filename"] for r in rows}) == 40


def test_a_scan_into_an_earlier_inventory_leaves_only_its_own_parts(tmp_path, templates):
    objects = tmp_path / "objects"
    made = fill(objects, templates, 40)
    out = tmp_path / "inventory"
    fleet_scan(objects, out, batch_size=8)
    for path in made[:20]:
        path.unlink()
    (out / "notes.txt").write_text("kept")
    fleet_scan(objects, out, batch_size=8)
    rows = read_rows(out)
    assert sorted(r["filename"] for r in rows) == sorted(utf8(str(p)) for p in made[20:])
    assert len(list(out.glob("part-*"))) == 3 and (out / "notes.txt").read_text() == "kept"


def test_a_refresh_reads_only_what_changed(tmp_path, templates):
    """Counted by the kernel: a refresh opens the new and changed objects (and
    the entries that are no volume) and no other; its rows are the earlier
    inventory's for the rest, and the new facts for the changed ones."""
    objects = tmp_path / "objects"
    made = fill(objects, templates, 300)
    watch = OpenWatch(objects)
    try:
        fleet_scan(objects, tmp_path / "first", batch_size=64)
        assert set(watch.opened()) == {p.name for p in made[:-2]}, "a full scan opens every file (a FIFO: never)"
        first = {r["filename"]: r for r in read_rows(tmp_path / "first")}
        manifest = (tmp_path / "first" / MANIFEST).read_text()
        assert "latin-\\\\xe9t" in manifest and "\\udc" not in manifest, "names in the manifest as rows hold them"

        vhd = next(p for p in made if p.name.endswith("a.vhd"))
        rewritten = next(p for p in made if p.name.endswith("c4k.qcow2"))
        hidden = next(p for p in made if p.name.endswith("a.vdi"))
        touched = next(p for p in made if p.name.endswith("a.qed"))
        gone = next(p for p in made if p.name.endswith("a.qcow"))
        shutil.copyfile(objects / vhd.name, rewritten)  # another format, another size
        before = hidden.stat()
        hidden.write_bytes(bytes(before.st_size))  # same size; the times set back as they were
        os.utime(hidden, ns=(before.st_atime_ns, before.st_mtime_ns))
        os.utime(touched)
        gone.unlink()
        new = objects / "new.vmdk"
        new.write_bytes(templates["s.vmdk"])
        watch.opened()

        refreshed = fleet_scan(objects, tmp_path / "second", since=tmp_path / "first", batch_size=64)
        changed = {rewritten.name, hidden.name, touched.name, new.name}
        assert set(watch.opened()) == changed
    finally:
        watch.close()
    no_volume = {"fifo", "dangling"}  # probed again (and not opened): what was wrong may be no more
    assert (refreshed.probed, refreshed.carried) == (len(changed | no_volume), 300 - len(changed | no_volume))
    rows = {r["filename"]: r for r in read_rows(tmp_path / "second")}
    assert set(rows) == set(first) - {str(gone)} | {str(new)}
    for name, row in rows.items():
        if Path(name).name not in changed:
            assert row == first[name], name
    assert rows[str(rewritten)]["format"] == "vpc" and rows[str(new)]["format"] == "vmdk"
    assert (first[str(hidden)]["format"], rows[str(hidden)]["format"]) == ("vdi", "raw")


def test_a_refresh_from_json_lines(tmp_path, templates):
    objects = tmp_path / "objects"
    fill(objects, templates, 30)
    fleet_scan(objects, tmp_path / "first", to_format="jsonl", batch_size=8)
    lines = [json.loads(line) for p in sorted((tmp_path / "first").glob("part-*.jsonl")) for line in p.open()]
    fleet_scan(objects, tmp_path / "parquet", batch_size=8)
    assert lines == read_rows(tmp_path / "parquet"), "JSON lines hold the same rows"
    refreshed = fleet_scan(objects, tmp_path / "second", since=tmp_path / "first", batch_size=8)
    assert (refreshed.probed, refreshed.carried) == (2, 28)  # the FIFO and the dangling link: no volume
    assert read_rows(tmp_path / "second") == lines


@pytest.mark.parametrize("to_format", ["parquet", "jsonl"])
def test_a_damaged_previous_inventory_stops_the_refresh_naming_its_part(tmp_path, templates, to_format):
    objects = tmp_path / "objects"
    fill(objects, templates, 10)
    fleet_scan(objects, tmp_path / "first", to_format=to_format)
    part = next((tmp_path / "first").glob("part-*"))
    part.write_bytes(part.read_bytes()[: len(part.read_bytes()) // 2])
    done = storprobe("scan", objects, "--to", tmp_path / "second", "--since", tmp_path / "first")
    assert done.returncode == 1
    assert done.stderr.startswith(f"storprobe: {part}: not a part of an inventory (") and done.stderr.count("\n") == 1
    assert not (tmp_path / "second" / MANIFEST).exists()


def test_a_damaged_part_found_on_a_worker_is_the_same_error_here(tmp_path, templates, client):
    objects = tmp_path / "objects"
    fill(objects, templates, 10)
    fleet_scan(objects, tmp_path / "first")
    part = next((tmp_path / "first").glob("part-*"))
    part.write_bytes(b"PAR1")
    with pytest.raises(InventoryError) as raised:
        fleet_scan(objects, tmp_path / "second", since=tmp_path / "first", client=client)
    assert raised.value.subject == str(part) and raised.value.reason.startswith("not a part of an inventory")
    again = pickle.loads(pickle.dumps(raised.value))  # as a worker process sends it back
    assert (again.subject, again.reason) == (raised.value.subject, raised.value.reason)


def test_the_previous_inventory_is_never_the_destination(tmp_path, templates):
    objects = tmp_path / "objects"
    fill(objects, templates, 10)
    fleet_scan(objects, tmp_path / "inv")
    with pytest.raises(InventoryError, match="cannot be the destination"):
        fleet_scan(objects, tmp_path / "inv", since=tmp_path / "inv")
    with pytest.raises(InventoryError, match="no inventory"):
        fleet_scan(objects, tmp_path / "new", since=objects)
    manifest = json.loads((tmp_path / "inv" / MANIFEST).read_text())
    (tmp_path / "secret").write_text("not for a scan to open")
    for name in ("../secret", "part-000000-0123456789ab.parquet/../../secret", 7):
        manifest["parts"][0]["name"] = name
        (tmp_path / "inv" / MANIFEST).write_text(json.dumps(manifest))
        with pytest.raises(InventoryError, match="no inventory"):
            fleet_scan(objects, tmp_path / "new", since=tmp_path / "inv")
    (tmp_path / "inv" / MANIFEST).write_text("[]")
    with pytest.raises(InventoryError, match="no inventory"):
        fleet_scan(objects, tmp_path / "new", since=tmp_path / "inv")


def storprobe(*args: str | Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "storprobe", *map(str, args)], capture_output=True, text=True,
                          env=None if env is None else os.environ | env)


def test_cli_scan_on_a_running_scheduler(tmp_path, templates):
    """``--dask tcp://...``: the command is the scheduler's client, the work
    runs on that cluster's worker (a thread of this test process, on loopback)."""
    objects = tmp_path / "objects"
    fill(objects, templates, 50)
    with (
        distributed.LocalCluster(n_workers=1, threads_per_worker=1, processes=False, protocol="tcp://",
                                 host="127.0.0.1", dashboard_address="127.0.0.1:0") as cluster,
        distributed.Client(cluster) as here,
        distributed.get_task_stream(here) as tasks,
    ):
        address = cluster.scheduler_address
        done = storprobe("scan", objects, "--to", tmp_path / "inv", "--batch", "20", "--dask", address)
        assert done.returncode == 0, done.stderr
    assert len([t for t in tasks.data if t["key"].startswith("run_batch")]) == 3
    assert json.loads(done.stdout)["records"] == len(read_rows(tmp_path / "inv")) == 50


def test_a_scheduler_that_does_not_answer_is_one_line(tmp_path):
    port = free_port()
    done = storprobe("scan", tmp_path, "--to", tmp_path / "inv", "--dask", f"tcp://127.0.0.1:{port}",
                     env={"DASK_DISTRIBUTED__COMM__TIMEOUTS__CONNECT": "1s"})
    assert done.returncode == 1, done.stderr
    assert done.stderr.startswith(f"storprobe: scheduler tcp://127.0.0.1:{port}: ") and "Traceback" not in done.stderr
    assert not (tmp_path / "inv").exists()


def test_cli_scan_on_a_local_cluster(tmp_path, templates):
    """``scan --to --dask``: a LocalCluster of two worker processes (tasks pickled
    to them), closed at the end; the summary on stdout."""
    objects = tmp_path / "objects"
    fill(objects, templates, 100)
    done = storprobe("scan", objects, "--to", tmp_path / "inv", "--batch", "30", "--dask", "--jobs", "2")
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert summary == {"inventory": str(tmp_path / "inv"), "format": "parquet", "parts": 4, "records": 100,
                       "probed": 100, "carried": 0, "errors": summary["errors"]}
    assert summary["errors"] == sum(r["error_code"] is not None for r in read_rows(tmp_path / "inv"))


def test_dask_is_imported_only_for_a_cluster(tmp_path, templates):
    objects = tmp_path / "objects"
    fill(objects, templates, 10)
    code = ("import sys; from storprobe.cli import main; main(sys.argv[1:]); "
            "print(sorted(m for m in ('dask', 'distributed') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code, "scan", str(objects), "--to", str(tmp_path / "inv")],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == "[]"


@pytest.mark.parametrize(("args", "complaint"), [
    (["--dask"], "--dask applies only with --to"),
    (["--since", "x"], "--since applies only with --to"),
    (["--to", "x", "--jsonl"], "--jsonl shapes records on stdout"),
    (["--to", "x", "--jobs", "2"], "--jobs with --to"),
    (["--to", "x", "--dask", "nowhere"], "is no scheduler address"),
    (["--to", "x", "--recursive", "s3://bucket/prefix/"], "--recursive applies only to a directory"),
])
def test_options_that_would_do_nothing_are_usage_errors(tmp_path, args, complaint):
    done = storprobe("scan", *args) if args[-1].startswith("s3:") else storprobe("scan", tmp_path, *args)
    assert done.returncode == 2 and complaint in done.stderr


@pytest.fixture(scope="module")
def s3(fleet):
    """moto's S3 server on loopback, holding the first :data:`S3_FLEET` of the
    fleet's objects under ``pool/`` (a store holds no FIFO or dangling link)."""
    pytest.importorskip("obstore")
    with s3_credentials(), moto_s3() as server:
        server.client.create_bucket(Bucket=BUCKET)
        files = [p for p in sorted(fleet.iterdir()) if p.is_file() and not p.is_symlink()][:S3_FLEET]
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda p: server.client.put_object(
                Bucket=BUCKET, Key=f"pool/{p.name}", Body=p.read_bytes()), files))
        yield server


def read_store_rows(server, prefix: str) -> list[dict]:
    """Every row of a Parquet inventory under ``prefix`` in the bucket, read with boto3 (not storprobe's client)."""
    listed = server.client.list_objects_v2(Bucket=BUCKET, Prefix=prefix)["Contents"]
    keys = sorted(o["Key"] for o in listed if o["Key"].rpartition("/")[2].startswith("part-"))
    tables = [pq.read_table(io.BytesIO(server.client.get_object(Bucket=BUCKET, Key=k)["Body"].read())) for k in keys]
    table = pa.concat_tables(tables)
    plain = pa.schema([f.with_type(pa.int64()) if pa.types.is_timestamp(f.type) else f for f in table.schema])
    return table.cast(plain).to_pylist()


def test_a_cluster_scan_of_a_bucket_says_what_a_local_scan_says(s3, fleet, client):
    """The same objects uploaded to S3 (moto), scanned on two workers by range
    reads into an inventory in the bucket: each row is the local scan's, but
    for the place (a prefix URL for a directory) and what only a file on disk has."""
    pool, local_root = f"s3://{BUCKET}/pool", str(fleet)
    inventory = fleet_scan(
        f"{pool}/", f"s3://{BUCKET}/inventory/", client=client, endpoint_url=s3.endpoint, batch_size=64
    )
    rows = read_store_rows(s3, "inventory/")
    local = {r.path: r for r in scan(fleet) if not r.path.endswith(("fifo", "dangling"))}
    local = {path: local[path] for path in sorted(local)[:S3_FLEET]}
    assert inventory.records == len(rows) == len(local) == S3_FLEET
    assert [r["filename"] for r in rows] == [p.replace(local_root, pool) for p in sorted(local)]
    listed = {o["Key"]: o for page in s3.client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix="pool/")
              for o in page["Contents"]}
    for row in rows:
        path = row["filename"].replace(pool, local_root)
        mine, theirs = comparable(row), expected_row(local[path])
        mine.pop("actual_size"), theirs.pop("actual_size")
        assert json.dumps(mine).replace(pool, "ROOT") == json.dumps(theirs).replace(local_root, "ROOT"), path
        meta = listed[row["filename"].removeprefix(f"s3://{BUCKET}/")]
        assert (row["object_size"], row["object_etag"]) == (meta["Size"], meta["ETag"])
        assert row["object_mtime"] // 10**6 == int(meta["LastModified"].timestamp() * 1000)
        assert row["file_inode"] is None
    assert {r["error_code"] for r in rows} == {None, "truncated", "unsupported-version"}


def test_a_refresh_of_a_bucket_asks_only_for_what_changed(s3, templates):
    """Counted at the server: a refresh sends no request for an object whose
    ETag and size the listing repeats, and reads the new and rewritten ones."""
    names = sorted(templates)
    objects = {f"refresh/{i:03d}-{names[i % len(names)]}": templates[names[i % len(names)]] for i in range(120)}
    for key, data in objects.items():
        s3.client.put_object(Bucket=BUCKET, Key=key, Body=data)
    prefix = f"s3://{BUCKET}/refresh/"
    first = fleet_scan(prefix, f"s3://{BUCKET}/inv1", endpoint_url=s3.endpoint, batch_size=32)
    rewritten, gone, new, retagged = sorted(objects)[5], sorted(objects)[6], "refresh/new.vhd", sorted(objects)[7]
    listed = {o["Key"]: o for o in s3.client.list_objects_v2(Bucket=BUCKET, Prefix="refresh/")["Contents"]}
    time.sleep(0.01)
    s3.client.copy_object(Bucket=BUCKET, Key=retagged, CopySource={"Bucket": BUCKET, "Key": retagged},
                          Metadata={"note": "metadata only"}, MetadataDirective="REPLACE")
    again = {o["Key"]: o for o in s3.client.list_objects_v2(Bucket=BUCKET, Prefix="refresh/")["Contents"]}
    assert again[retagged]["ETag"] == listed[retagged]["ETag"], "a copy in place keeps the ETag"
    assert again[retagged]["LastModified"] > listed[retagged]["LastModified"], "and gives a new time"
    s3.client.put_object(Bucket=BUCKET, Key=rewritten, Body=templates["a.vhd"])
    s3.client.delete_object(Bucket=BUCKET, Key=gone)
    s3.client.put_object(Bucket=BUCKET, Key=new, Body=templates["a.vhd"])
    s3.counts.clear()
    second = fleet_scan(prefix, f"s3://{BUCKET}/inv2", since=f"s3://{BUCKET}/inv1", endpoint_url=s3.endpoint,
                        batch_size=32)
    read = {path for path, count in s3.counts.requests.items() if path.startswith(f"/{BUCKET}/refresh/")}
    assert read == {f"/{BUCKET}/{rewritten}", f"/{BUCKET}/{new}"}
    assert (first.probed, second.probed, second.carried) == (120, 2, 118)
    rows = {r["filename"]: r for r in read_store_rows(s3, "inv2/")}
    before = {r["filename"]: r for r in read_store_rows(s3, "inv1/")}
    assert rows[f"s3://{BUCKET}/{rewritten}"]["format"] == rows[f"s3://{BUCKET}/{new}"]["format"] == "vpc"
    assert set(rows) == set(before) - {f"s3://{BUCKET}/{gone}"} | {f"s3://{BUCKET}/{new}"}
    assert rows[f"s3://{BUCKET}/{retagged}"]["object_mtime"] == before[f"s3://{BUCKET}/{retagged}"]["object_mtime"]
    assert all(rows[name] == before[name] for name in rows if name not in (f"s3://{BUCKET}/{rewritten}",
                                                                         f"s3://{BUCKET}/{new}"))


def test_an_object_gone_since_the_listing_is_an_error_row(s3, templates):
    """A batch whose listing names an object deleted since: that object's row
    is its named error; the batch's other objects are probed and written."""
    s3.client.put_object(Bucket=BUCKET, Key="gone/a.vhd", Body=templates["a.vhd"])
    s3.client.put_object(Bucket=BUCKET, Key="gone/b.vhd", Body=templates["a.vhd"])
    listed = listing(f"s3://{BUCKET}/gone/", endpoint_url=s3.endpoint)
    s3.client.delete_object(Bucket=BUCKET, Key="gone/a.vhd")
    part = run_batch(Batch(0, tuple(listed), f"s3://{BUCKET}/gone-inventory", "parquet", endpoint_url=s3.endpoint))
    assert (part.records, part.errors) == (2, 1)
    rows = read_store_rows(s3, "gone-inventory/")
    assert [(r["filename"], r["format"], r["error_code"]) for r in rows] == [
        (f"s3://{BUCKET}/gone/a.vhd", None, "source.not-found"), (f"s3://{BUCKET}/gone/b.vhd", "vpc", None)]


def test_cli_inventories_a_directory_into_a_bucket(s3, tmp_path, templates):
    """``scan DIR --to s3://... --endpoint-url``: the endpoint serves the
    inventory (and the earlier one of a refresh), not the scanned directory."""
    objects = tmp_path / "objects"
    fill(objects, templates, 30)
    first = storprobe("scan", objects, "--to", f"s3://{BUCKET}/cli-1/", "--to-format", "jsonl", "--batch", "8",
                      "--endpoint-url", s3.endpoint)
    assert first.returncode == 0, first.stderr
    second = storprobe("scan", objects, "--to", f"s3://{BUCKET}/cli-2", "--since", f"s3://{BUCKET}/cli-1/",
                       "--endpoint-url", s3.endpoint)
    assert second.returncode == 0, second.stderr
    assert json.loads(first.stdout)["probed"] == 30 and json.loads(second.stdout)["carried"] == 28
    lines = [json.loads(line) for key in sorted(o["Key"] for o in s3.client.list_objects_v2(
        Bucket=BUCKET, Prefix="cli-1/part-")["Contents"])
        for line in s3.client.get_object(Bucket=BUCKET, Key=key)["Body"].read().splitlines()]
    assert lines == read_store_rows(s3, "cli-2/")
    assert storprobe("scan", objects, "--endpoint-url", s3.endpoint).returncode == 2  # no URL: a usage error


@pytest.mark.parametrize(("missing", "args", "what"), [
    ("pyarrow", [], "Parquet parts"), ("distributed", ["--to-format", "jsonl", "--dask"], "a Dask cluster"),
])
def test_without_the_fleet_extra_the_command_says_what_to_install(tmp_path, missing, args, what):
    code = f"import sys; sys.modules[{missing!r}] = None; from storprobe.cli import main; sys.exit(main(sys.argv[1:]))"
    done = subprocess.run([sys.executable, "-c", code, "scan", str(tmp_path), "--to", str(tmp_path / "inv"), *args],
                          capture_output=True, text=True)
    assert (done.returncode, done.stderr) == (
        1, f"storprobe: {what}: needs the fleet extra: pip install 'storprobe[fleet]' ({missing} is missing)\n")
