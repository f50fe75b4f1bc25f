"""Pool scan: one record per directory entry; a bad volume never spoils the rest."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from lxml import etree

from storprobe import SourceError, probe
from storprobe.qemu_json import to_qemu_json
from storprobe.scan import scan
from storprobe.validate import schema_errors
from storprobe.volume_xml import to_volume_xml

from oracle import canonical_xml, qemu_img_create


@pytest.fixture
def pool(tmp_path) -> Path:
    qemu_img_create(tmp_path / "good.qcow2", "qcow2", "16M")
    qemu_img_create(tmp_path / "good.vmdk", "vmdk", "16M")
    (tmp_path / "good.raw").write_bytes(bytes(4096))
    good = (tmp_path / "good.qcow2").read_bytes()
    (tmp_path / "truncated.qcow2").write_bytes(good[:64])  # libvirt 9.0 fails the whole pool on this
    bad_version = bytearray(good[:4096])
    bad_version[4:8] = (77).to_bytes(4, "big")
    (tmp_path / "version77.qcow2").write_bytes(bad_version)
    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "dangling").symlink_to("nowhere")
    (tmp_path / "sub").mkdir()
    qemu_img_create(tmp_path / "sub" / "inner.qcow2", "qcow2", "8M")
    return tmp_path


EXPECTED_ERRORS = {
    "truncated.qcow2": "truncated",
    "version77.qcow2": "unsupported-version",
    "fifo": "source",
    "dangling": "source",
}


def test_every_entry_gets_a_record_and_errors_stay_local(pool):
    records = list(scan(pool))
    assert [Path(r.path).name for r in records] == sorted(p.name for p in pool.iterdir())
    for record in records:
        name = Path(record.path).name
        if name in EXPECTED_ERRORS:
            assert record.info is None and record.error.code.endswith(EXPECTED_ERRORS[name]), name
        else:
            assert record.error is None, name
            alone = probe(record.path)
            assert to_qemu_json(record.info) == to_qemu_json(alone)
    assert {Path(r.path).name: r.info.format for r in records if r.info} == {
        "good.qcow2": "qcow2", "good.vmdk": "vmdk", "good.raw": "raw", "sub": "dir"}


def test_recursive_descends_after_each_directory(pool):
    names = [os.path.relpath(r.path, pool) for r in scan(pool, recursive=True)]
    assert names.index("sub") + 1 == names.index(os.path.join("sub", "inner.qcow2"))


def test_scan_is_lazy(tmp_path):
    """Records are made as they are asked for: a volume past the first batch,
    changed in place after the first record was taken, is probed as changed
    (an eager scan would already have described the old bytes)."""
    from storprobe.scan import BATCH

    for index in range(BATCH + 1):
        (tmp_path / f"a{index:03}.raw").write_bytes(bytes(512))
    last = tmp_path / "z.qcow2"
    qemu_img_create(last, "qcow2", "16M")
    records = scan(tmp_path)
    assert next(records).path.endswith("a000.raw")
    with open(last, "r+b") as volume:  # in place: a volume opened ahead sees it too
        volume.seek(4)
        volume.write((77).to_bytes(4, "big"))
    *_, final = records
    assert final.path == str(last) and final.error is not None
    assert final.error.code.endswith("unsupported-version")


def test_unlistable_directory_is_an_error(tmp_path):
    with pytest.raises(SourceError):
        scan(tmp_path / "missing")


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "storprobe", *args], capture_output=True, text=True)


def test_cli_json_and_jsonl(pool):
    whole = cli("scan", str(pool))
    assert whole.returncode == 0, whole.stderr
    records = json.loads(whole.stdout)
    lines = cli("scan", "--jsonl", str(pool)).stdout.splitlines()
    assert [json.loads(line) for line in lines] == records
    errors = {Path(r["filename"]).name: r["error"]["code"] for r in records if "error" in r}
    assert set(errors) == set(EXPECTED_ERRORS)


def test_cli_xml_validates_and_matches_single_documents(pool):
    proc = cli("scan", "--output", "xml", str(pool))
    assert proc.returncode == 0, proc.stderr
    assert schema_errors(proc.stdout) == []
    root = etree.fromstring(proc.stdout)
    assert sorted(e.get("path").rsplit("/", 1)[1] for e in root.findall("error")) == sorted(EXPECTED_ERRORS)
    for volume in root.findall("volume"):
        single = etree.fromstring(to_volume_xml(probe(volume.findtext("key"))))
        assert canonical_xml(volume) == canonical_xml(single)


def test_cli_missing_directory(tmp_path):
    proc = cli("scan", str(tmp_path / "missing"))
    assert proc.returncode == 1
    assert proc.stderr == f"storprobe: {tmp_path / 'missing'}: No such file or directory\n"
