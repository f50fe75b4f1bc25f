"""Objects probed by range reads (issue 11 §2), against real servers on
loopback (tests/servers.py): moto's S3 server, an HTTP server that honours
Range and Python's http.server, which ignores it. What the servers counted
(requests, body bytes per object) is what the assertions about cost read."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import storprobe
from storprobe import objectstore
from storprobe.cli import main
from storprobe.errors import ProbeError
from storprobe.objectchain import probe_object_chain
from storprobe.objectscan import WINDOW_FACTOR, Listed, list_objects, probe_objects, scan_objects
from storprobe.qemu_json import scan_record, to_qemu_json
from storprobe.safety import Policy, check
from storprobe.scan import scan
from storprobe.urls import REMOTE_SCHEMES, is_url

from builders import real_images
from oracle import qemu_img_create, run
from servers import Azurite, NoRangeServer, RangeServer, SilentServer, copy_tree, free_port, moto_s3, s3_credentials

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
BUCKET = "images"
#: Issue 11's target for plain images of these formats: requests and bytes per object.
PLAIN = {"qcow2", "vmdk", "vpc", "vdi", "raw"}
MAX_REQUESTS, MAX_BYTES = 2, 40 * 1024
#: Images whose backing name a walk in the store does not follow to an image.
BROKEN_CHAINS = {
    "loop.qcow2": "loop.qcow2", "out.qcow2": "../../../base.qcow2", "abs.qcow2": "/var/lib/images/base.qcow2",
    "gone.qcow2": "gone-base.qcow2", "nbd.qcow2": "nbd://127.0.0.1:10809/base",
}


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """A directory of real images: every builder's, the examples, a qemu-img
    chain, an empty file, one smaller than the head, one malformed."""
    d = tmp_path_factory.mktemp("images")
    files = {f"real-{i:02d}.img": data for i, data in enumerate(real_images(tmp_path_factory.mktemp("seeds")))}
    files |= {f"examples/{p.name}": p.read_bytes() for p in sorted(EXAMPLES.iterdir())}
    files |= {"empty.img": b"", "tiny.img": b"QFI\xfb", "bad.qcow2": b"QFI\xfb\0\0\0\3" + bytes(64)}
    copy_tree(files, d)
    (d / "chain").mkdir()
    (d / "plain").mkdir()
    qemu_img_create(d / "chain" / "base.qcow2", "qcow2", "16M")
    run("qemu-img", "create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", d / "chain" / "top.qcow2")
    for name, backing in BROKEN_CHAINS.items():  # backing names that end a walk in the store
        qemu_img_create(d / "chain" / name, "qcow2", "16M")
        run("qemu-img", "rebase", "-u", "-b", backing, "-F", "qcow2", d / "chain" / name)
    for plain in ("qcow2", "vmdk", "vpc", "vdi"):
        qemu_img_create(d / "plain" / f"disk.{plain}", plain, "1G")
    qemu_img_create(d / "plain" / "disk.raw", "raw", "8M")  # uploaded whole: kept small
    return d


def names(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


@pytest.fixture(scope="module")
def s3(images):
    with s3_credentials(), moto_s3() as server:
        server.client.create_bucket(Bucket=BUCKET)
        for name in names(images):
            server.client.upload_file(str(images / name), BUCKET, f"pool/{name}")
        yield server


@pytest.fixture(scope="module")
def web(images):
    with RangeServer(images) as server:
        yield server


def outcome(target, root: str, **kwargs) -> str:
    """What a probe said, as JSON, with the place the image lies in (a
    directory, a store's prefix) replaced and what only a file on disk has
    (its allocated size) left out."""
    try:
        out = to_qemu_json(storprobe.probe(target, **kwargs))
    except ProbeError as exc:
        return f"{type(exc).__name__} {exc.code} {exc}".replace(root, "ROOT")
    out.pop("actual-size", None)
    return json.dumps(out, sort_keys=True).replace(json.dumps(root)[1:-1], "ROOT")


def test_urls_are_recognised_by_registered_scheme_only(tmp_path, monkeypatch):
    assert REMOTE_SCHEMES == {"s3", "gs", "az", "http", "https"}
    for url in ("s3://b/k", "gs://b/k", "az://c/k", "http://h/k", "HTTPS://h/k"):
        assert is_url(url)
    for local in ("s3:x", "a:b.img", "ftp://h/k", "s3:/b/k", "file:///x", "./s3://b"):
        assert not is_url(local)
    assert not is_url(Path("s3://b/k"))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "s3:x").write_bytes(bytes(1024))  # a local name with a colon stays local
    assert storprobe.probe("s3:x").format == "raw"
    with pytest.raises(ProbeError) as missing:
        storprobe.probe(Path("s3://b/k"))  # a Path is a path, even one spelled like a URL
    assert missing.value.code == "source"


def test_the_client_loads_only_for_a_url_and_its_absence_is_named():
    script = (
        "import sys; import storprobe; assert 'obstore' not in sys.modules, 'obstore loaded at import';"
        "storprobe.probe(storprobe.BytesSource(b'x')); assert 'obstore' not in sys.modules;"
        "sys.modules['obstore'] = None\n"
        "try:\n    storprobe.probe('s3://bucket/key')\n"
        "except storprobe.SourceError as e:\n    print(e.code, e)\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("source.remote-missing ") and "pip install 'storprobe[remote]'" in proc.stdout


def test_every_image_probes_over_s3_as_it_does_locally(s3, images):
    for name in names(images):
        url = f"s3://{BUCKET}/pool/{name}"
        remote = outcome(url, f"s3://{BUCKET}/pool", endpoint_url=s3.endpoint)
        assert remote == outcome(images / name, str(images)), name


def test_plain_images_cost_at_most_two_requests_and_40_kib(s3, images):
    """Counted at the server: the head and the tail in one round, no HEAD request."""
    s3.counts.clear()
    for name in names(images / "plain"):
        info = storprobe.probe(f"s3://{BUCKET}/pool/plain/{name}", endpoint_url=s3.endpoint)
        assert info.format in PLAIN
        key = f"/{BUCKET}/pool/plain/{name}"
        assert s3.counts.requests[key] <= MAX_REQUESTS, name
        assert s3.counts.sent[key] <= MAX_BYTES, name
    assert set(s3.counts.requests) == {f"/{BUCKET}/pool/plain/{n}" for n in names(images / "plain")}


def test_no_format_needs_more_than_a_few_requests(s3, images):
    s3.counts.clear()
    records = list(probe_objects(list_objects(f"s3://{BUCKET}/pool/", endpoint_url=s3.endpoint),
                                 endpoint_url=s3.endpoint))
    assert {r.path for r in records if r.error is None and r.info.format == "vhdx"}
    for record in records:
        key = record.path.removeprefix("s3:/")
        assert s3.counts.requests[key] == record.requests <= 5, (record.path, record.info and record.info.format)
        assert s3.counts.sent[key] == record.fetched


def test_every_image_probes_over_http_as_it_does_locally(web, images):
    web.counts.clear()
    for name in names(images):
        url = f"{web.url}/{name}"
        assert outcome(url, web.url) == outcome(images / name, str(images)), name
    for name in names(images / "plain"):
        assert web.counts.requests[f"/plain/{name}"] <= MAX_REQUESTS
        assert web.counts.sent[f"/plain/{name}"] <= MAX_BYTES


def test_a_server_that_ignores_range_is_refused_before_the_object_is_sent(tmp_path):
    """Python's http.server answers a range request with 200 and the whole
    object: source.no-range, and the server sends little of a 4 GiB object."""
    huge = tmp_path / "huge.qcow2"
    qemu_img_create(huge, "qcow2", "64G")
    with huge.open("r+b") as f:
        f.truncate(4 << 30)  # sparse: costs the disk nothing
    with NoRangeServer(tmp_path) as server:
        with pytest.raises(storprobe.SourceError) as refused:
            storprobe.probe(f"{server.url}/huge.qcow2")
        assert refused.value.code == "source.no-range" and isinstance(refused.value, storprobe.NoRangeSupport)
        assert server.counts.requests["/huge.qcow2"] >= 1
        assert server.counts.sent["/huge.qcow2"] < 64 << 20  # socket buffers at most, not 4 GiB
        out = subprocess.run([sys.executable, "-m", "storprobe", "info", f"{server.url}/huge.qcow2"],
                             capture_output=True, text=True)
    assert out.returncode == 1 and "ignores Range" in out.stderr and len(out.stderr.splitlines()) == 1


def test_errors_are_named_and_one_bad_object_never_stops_a_scan(s3, web, images, monkeypatch):
    good = f"s3://{BUCKET}/pool/plain/disk.qcow2"
    refused = f"http://127.0.0.1:{free_port()}/disk.qcow2"
    with SilentServer() as silent:
        monkeypatch.setattr(objectstore, "REQUEST_TIMEOUT", objectstore.timedelta(seconds=1))
        monkeypatch.setattr(objectstore, "MAX_RETRIES", 0)
        urls = [
            good,
            f"s3://{BUCKET}/pool/no-such-key",
            f"{web.url}/no-such-file",
            f"{web.url}/forbidden/disk.qcow2",
            refused,
            f"{silent.url}/disk.qcow2",
            "s3:///no-bucket",
            good,
        ]
        records = list(probe_objects(urls, endpoint_url=s3.endpoint, concurrency=3))
    assert [r.path for r in records] == urls
    codes = [r.error.code if r.error else r.info.format for r in records]
    assert codes == [
        "qcow2", "source.not-found", "source.not-found", "source.denied", "source.unreachable",
        "source.timeout", "source.bad-url", "qcow2",
    ]
    assert all(isinstance(r.error, storprobe.SourceError) for r in records if r.error)


def test_check_over_s3_judges_as_locally_and_never_follows_a_backing_into_the_store(s3, images):
    for name in names(images):
        url = f"s3://{BUCKET}/pool/{name}"
        remote, local = check(url, endpoint_url=s3.endpoint), check(images / name)
        assert remote.safe == local.safe, name
        assert [h.check for h in remote.hazards] == [h.check for h in local.hazards], name
    s3.counts.clear()
    allowed = Policy(allow_backing=True)
    assert check(images / "chain" / "top.qcow2", policy=allowed).safe  # beside it, locally: followed
    top = check(f"s3://{BUCKET}/pool/chain/top.qcow2", policy=allowed, endpoint_url=s3.endpoint)
    assert [h.check for h in top.hazards] == ["backing-file"]
    assert set(s3.counts.requests) == {f"/{BUCKET}/pool/chain/top.qcow2"}  # base.qcow2 never asked for


def test_cli_info_and_check_over_s3(s3, images, capsys):
    url = f"s3://{BUCKET}/pool/chain/top.qcow2"
    assert main(["info", "--output", "json", "--endpoint-url", s3.endpoint, url]) == 0
    remote = json.loads(capsys.readouterr().out)
    assert main(["info", "--output", "json", str(images / "chain" / "top.qcow2")]) == 0
    local = json.loads(capsys.readouterr().out)
    local.pop("actual-size")
    assert json.dumps(remote).replace(f"s3://{BUCKET}/pool", "ROOT") == json.dumps(local).replace(str(images), "ROOT")
    assert main(["info", "--backing-chain", "--output", "json", "--endpoint-url", s3.endpoint, url]) == 0
    stops = json.loads(capsys.readouterr().out)[-1]["storprobe"]["chain-stops"]
    assert "not looked for in its store" in stops["message"]
    assert main(["check", "--endpoint-url", s3.endpoint, url]) == 3
    assert "backing-file" in capsys.readouterr().out
    assert main(["check", "--endpoint-url", s3.endpoint, f"s3://{BUCKET}/pool/plain/disk.vdi"]) == 0
    assert main(["info", "--endpoint-url", s3.endpoint, f"s3://{BUCKET}/pool/missing"]) == 1
    assert capsys.readouterr().err.strip() == f"storprobe: s3://{BUCKET}/pool/missing: {url[:0]}" \
        f"s3://{BUCKET}/pool/missing: no such object"
    assert main(["info", "--endpoint-url", s3.endpoint, str(images / "tiny.img")]) == 2  # not a URL


def test_scan_of_a_prefix_equals_the_local_scan_in_key_order(s3, images, capsys):
    local = [r for r in scan(images, recursive=True) if r.info is None or r.info.file_type != "directory"]
    records = list(scan_objects(f"s3://{BUCKET}/pool/", endpoint_url=s3.endpoint, concurrency=4))
    assert [r.path.removeprefix(f"s3://{BUCKET}/pool/") for r in records] == names(images)
    by_name = {str(Path(r.path).relative_to(images)): r for r in local}
    listed = {m["Key"]: m for m in s3.client.list_objects_v2(Bucket=BUCKET, Prefix="pool/")["Contents"]}
    for record in records:
        name = record.path.removeprefix(f"s3://{BUCKET}/pool/")
        mine, theirs = scan_record(record), scan_record(by_name[name])
        theirs.pop("actual-size", None)
        mine_text = json.dumps(mine).replace(f"s3://{BUCKET}/pool", "ROOT")
        assert mine_text == json.dumps(theirs).replace(str(images), "ROOT")
        meta = listed[f"pool/{name}"]
        assert (record.size, record.etag, record.mtime) == (meta["Size"], meta["ETag"], meta["LastModified"])
    assert sum(r.error is not None for r in records) == sum(r.error is not None for r in local) >= 1
    assert main(["scan", "--jsonl", "--endpoint-url", s3.endpoint, "--concurrency", "3", f"s3://{BUCKET}/pool/"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["filename"] for line in lines] == [r.path for r in records]
    assert all(set(line["object"]) == {"size", "etag", "mtime"} for line in lines)
    assert main(["scan", "--endpoint-url", s3.endpoint, "s3://no-such-bucket/"]) == 1
    assert "no-such-bucket" in capsys.readouterr().err


def test_a_scan_holds_a_bounded_window_of_objects(s3):
    """Memory flat in the number of objects: when the first record is out,
    the listing has been read no further than the window."""
    taken = 0

    def listing():
        nonlocal taken
        for _ in range(10_000):
            taken += 1
            yield Listed(f"s3://{BUCKET}/pool/plain/disk.raw")

    records = probe_objects(listing(), endpoint_url=s3.endpoint, concurrency=2)
    assert next(records).info.format == "raw"
    assert taken <= 2 * WINDOW_FACTOR + 1
    records.close()


def test_a_rows_declared_reads_come_in_one_round(images):
    """vhdx's row declares the headers and both region tables (64 to 320 KiB):
    a probe by rounds asks for them together in its second round, where it
    asked for each structure in turn (8 rounds before); a local probe ignores them."""
    from storprobe.engine import KnownBytes, drive, first_ranges
    from storprobe.spec import FormatSpec, row_problems

    vhdx = next(images / name for name in names(images) if (images / name).read_bytes()[:8] == b"vhdxfile")
    data = vhdx.read_bytes()
    asked: list[list[tuple[int, int]]] = []

    def fetch(ranges):
        asked.append(ranges)
        return [(offset, data[offset : offset + length]) for offset, length in ranges]

    from storprobe.detect import probing

    info = drive(probing(KnownBytes(str(vhdx), len(data))), fetch)
    assert info == storprobe.probe(vhdx)._replace(actual_size=None, stat=None)
    assert asked[0] == first_ranges(len(data)) and asked[1] == [(64 << 10, 256 << 10)]
    assert len(asked) <= 5
    assert row_problems(FormatSpec("x", magic=b"X", reads=((0, 0),)))


def test_retries_are_bounded(web):
    """A server that keeps failing (503) is asked again at most MAX_RETRIES
    times per request, then named: no endless loop."""
    web.counts.clear()
    with pytest.raises(storprobe.SourceError) as failed:
        storprobe.probe(f"{web.url}/broken/disk.qcow2")
    assert failed.value.code == "source.server-error"
    first_round = 2  # the head and the tail
    assert 1 < web.counts.requests["/broken/disk.qcow2"] <= first_round * (1 + objectstore.MAX_RETRIES)


def test_the_endpoint_comes_from_the_environment_too(s3, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3.endpoint)
    assert storprobe.probe(f"s3://{BUCKET}/pool/plain/disk.vdi").format == "vdi"


@pytest.fixture
def greedy_format():
    """A third-party row whose size callback walks 1 MiB reads through the file."""
    from storprobe import FormatSpec, hookimpl

    def size(img):
        return sum(len(img.read(i << 20, 1 << 20)) for i in range(1, 64))

    class Plugin:
        @hookimpl
        def storprobe_formats(self):
            return [FormatSpec("greedy", magic=b"GREEDY!!", size=size)]

    plugin = Plugin()
    storprobe.register(plugin)
    yield
    storprobe.unregister(plugin)


def test_the_read_budget_holds_per_object(greedy_format, tmp_path):
    """The probe's byte budget bounds what is fetched of an object, whatever its header asks."""
    from storprobe.source import READ_BUDGET

    image = tmp_path / "greedy.img"
    with image.open("wb") as f:
        f.write(b"GREEDY!!")
        f.truncate(64 << 20)
    with RangeServer(tmp_path) as server:
        with pytest.raises(storprobe.ReadLimitExceeded):
            storprobe.probe(f"{server.url}/greedy.img")
        assert server.counts.sent["/greedy.img"] <= READ_BUDGET + objectstore.REMOTE_MIN_FETCH + (64 << 10)
    with pytest.raises(storprobe.ReadLimitExceeded):
        storprobe.probe(image)  # as locally


def test_volume_xml_is_refused_for_a_url(s3, capsys):
    """libvirt's volume XML names a local path (its key and target path): for
    an object it would name a made-up file, so the option is a usage error."""
    for command in (["info", "--output", "xml"], ["scan", "--output", "xml"]):
        assert main([*command, "--endpoint-url", s3.endpoint, f"s3://{BUCKET}/pool/"]) == 2
        assert "describes local volumes" in capsys.readouterr().err


@pytest.mark.skipif(shutil.which("azurite-blob") is None, reason="azurite-blob (npm's azurite) is not installed")
def test_azure_takes_no_suffix_range_so_the_tail_comes_second(images, monkeypatch):
    """object_store refuses to send Azure a suffix range: the head goes first,
    the size comes from its Content-Range, the tail follows; the record is
    the local one, in at most two requests and 40 KiB."""
    for key, value in Azurite.ENV.items():
        monkeypatch.setenv(key, value)
    with Azurite() as azure:
        azure.create_container("images")
        for name in names(images / "plain"):
            azure.put("images", f"plain/{name}", (images / "plain" / name).read_bytes())
        urls = [f"az://images/plain/{name}" for name in names(images / "plain")]
        records = list(probe_objects(urls, endpoint_url=azure.endpoint))
        for record, name in zip(records, names(images / "plain"), strict=True):
            assert record.error is None, record.error
            assert outcome(record.path, "az://images", endpoint_url=azure.endpoint) == outcome(
                images / "plain" / name, str(images)
            )
            assert record.requests <= MAX_REQUESTS and record.fetched <= MAX_BYTES


def test_a_chain_is_followed_in_the_store_only_when_asked(s3, images, capsys):
    """--backing-in-store follows names relative to the object, in its bucket,
    as the local walk follows files: the same images; nothing else is opened."""
    url = f"s3://{BUCKET}/pool/chain/top.qcow2"
    args = ["info", "--backing-chain", "--output", "json", "--endpoint-url", s3.endpoint]
    assert main([*args, "--backing-in-store", url]) == 0
    remote = capsys.readouterr().out.replace(f"s3://{BUCKET}/pool", "ROOT")
    assert main([*args[:4], str(images / "chain" / "top.qcow2")]) == 0
    local = json.loads(capsys.readouterr().out.replace(str(images), "ROOT"))
    for image in local:
        image.pop("actual-size")
    assert json.loads(remote) == local and len(local) == 2
    s3.counts.clear()
    walks = {name: probe_object_chain(f"s3://{BUCKET}/pool/chain/{name}", endpoint_url=s3.endpoint)
             for name in BROKEN_CHAINS}
    assert walks["loop.qcow2"].chain.error.code == "backing.loop"
    assert walks["gone.qcow2"].chain.error.code == "backing.missing"
    assert "leads out of the object's bucket" in walks["out.qcow2"].stop
    assert "only a name relative to the object" in walks["abs.qcow2"].stop
    assert "only a name relative to the object" in walks["nbd.qcow2"].stop
    assert all(len(walk.chain.images) == 1 for walk in walks.values())
    asked = {key.rsplit("/", 1)[1] for key in s3.counts.requests}
    assert asked == {*BROKEN_CHAINS, "gone-base.qcow2"}  # the names tried in the store, nothing more
    assert main(["info", "--backing-in-store", "--endpoint-url", s3.endpoint, url]) == 2
