"""Scan with read-ahead and with threads: the same records in the same order as
one probe at a time, a bounded number probed ahead, a quiet stderr unless a
person watches a terminal."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import storprobe.scan
from storprobe import probe
from storprobe.qemu_json import scan_record
from storprobe.scan import BATCH, READAHEAD, scan

from oracle import qemu_img_create


@pytest.fixture(scope="module")
def pool(tmp_path_factory) -> Path:
    """More entries than the read-ahead window and several thread batches,
    with good images, broken ones and entries that are not volumes."""
    root = tmp_path_factory.mktemp("pool")
    qemu_img_create(root / "base.qcow2", "qcow2", "16M")
    good = (root / "base.qcow2").read_bytes()
    for i in range(READAHEAD + 3 * BATCH):
        name = root / f"vol{i:04d}"
        if i % 7 == 0:
            name.write_bytes(good[:64])  # truncated
        elif i % 5 == 0:
            name.write_bytes(bytes(4096))  # raw
        else:
            name.write_bytes(good)
    os.mkfifo(root / "fifo")
    (root / "dangling").symlink_to("nowhere")
    (root / "sub").mkdir()
    return root


def _records(records) -> list:
    return [(r.path, scan_record(r)) for r in records]


def test_read_ahead_gives_the_records_of_one_probe_at_a_time(pool):
    expected = []
    for entry in sorted(os.listdir(pool)):
        path = os.path.join(pool, entry)
        try:
            expected.append((path, scan_record(storprobe.scan.ScanRecord(path, info=probe(path)))))
        except storprobe.ProbeError as exc:
            expected.append((path, scan_record(storprobe.scan.ScanRecord(path, error=exc))))
    assert _records(scan(pool)) == expected


@pytest.mark.parametrize("jobs", [2, 5])
def test_threads_keep_name_order_and_records(pool, jobs):
    assert _records(scan(pool, jobs=jobs)) == _records(scan(pool))


def test_threads_probe_a_bounded_window_ahead(pool, monkeypatch):
    probed = []
    real = storprobe.scan.probe
    monkeypatch.setattr(storprobe.scan, "probe", lambda source, **kw: probed.append(source) or real(source, **kw))
    records = scan(pool, jobs=2)
    first = next(records)
    assert first.path.endswith("base.qcow2")
    assert len(probed) <= 2 * 2 * BATCH  # two batches per thread, and no more until asked
    records.close()  # stopping early cancels what was not started


def cli(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "storprobe", *args], capture_output=True, text=True, check=False, **kwargs)


def test_cli_jobs_output_is_the_same(pool):
    one = cli("scan", str(pool))
    four = cli("scan", "--jobs", "4", str(pool))
    assert one.returncode == four.returncode == 0
    assert one.stdout == four.stdout
    assert one.stderr == four.stderr == ""  # no progress bar: stderr is not a terminal
    assert len(json.loads(one.stdout)) == len(os.listdir(pool))


def test_cli_jobs_is_a_positive_number(pool):
    for wrong, message in (("0", "at least 1"), ("many", "must be a number")):
        proc = cli("scan", "--jobs", wrong, str(pool))
        assert proc.returncode == 2 and message in proc.stderr


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_bar_only_for_a_watched_terminal(pool, monkeypatch):
    from storprobe.cli import _parser, _progress

    args = _parser().parse_args(["scan", str(pool)])
    records = iter([])
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    assert _progress(records, args) is records  # stderr not a terminal
    monkeypatch.setattr(sys, "stderr", Terminal())
    monkeypatch.setattr(sys, "stdout", Terminal())
    assert _progress(records, args) is records  # the output itself is on the terminal
    monkeypatch.setattr(sys, "stdout", io.StringIO())
    bar = _progress(records, args)
    assert bar is not records and bar.total == len(os.listdir(pool))
    assert list(bar) == []


def test_stopping_early_closes_what_was_opened_ahead(pool):
    before = len(os.listdir("/proc/self/fd"))
    records = scan(pool)
    next(records)
    assert len(os.listdir("/proc/self/fd")) > before  # volumes opened ahead
    records.close()
    assert len(os.listdir("/proc/self/fd")) == before
