"""Scan with read-ahead and with worker processes: the same records in the same
order as one probe at a time, children that die or are abandoned cleaned up,
a quiet stderr unless a person watches a terminal."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import storprobe.scan
from storprobe import probe
from storprobe.forked import ordered_map, threads
from storprobe.qemu_json import scan_record
from storprobe.scan import BATCH, READAHEAD, scan, scan_map

from oracle import qemu_img_create

#: Tests that need this process to fork: it must have no other thread (a pytest-xdist
#: worker has execnet's), so there they run in a single-threaded pytest of their own.
forks = pytest.mark.skipif(threads() > 1, reason="other threads run here: test_forking_tests_single_threaded runs it")


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
        # An access time after the change time: a read (relatime) no longer
        # updates it, so every scan of the pool prints the same <atime>, in
        # whichever order (or xdist worker) the tests run.
        stat = name.stat()
        os.utime(name, ns=(stat.st_mtime_ns + 3600 * 10**9, stat.st_mtime_ns))
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


def _rendered(record) -> tuple:
    return record.path, scan_record(record)


@pytest.mark.parametrize("jobs", [1, 2, 5])
def test_worker_processes_keep_name_order_and_records(pool, jobs):
    assert list(scan_map(pool, _rendered, jobs=jobs)) == _records(scan(pool))


@forks
def test_ordered_map_shares_items_and_keeps_their_order():
    def work(i: int) -> tuple[int, int]:
        time.sleep(0.002)  # long enough that every process takes a share
        return i, os.getpid()

    done = list(ordered_map(work, list(range(60)), 3))
    assert [i for i, _ in done] == list(range(60))
    assert len({pid for _, pid in done}) == 3
    assert list(ordered_map(str, [], 4)) == []
    assert list(ordered_map(str, [7], 4)) == ["7"]  # no more processes than items
    _assert_no_children_left()


@forks
def test_a_process_with_more_to_do_is_given_less():
    """Items go to whichever process asks: one that also spends time elsewhere
    (this one, which writes every result) takes fewer."""
    parent = os.getpid()

    def work(i: int) -> bool:
        time.sleep(0.006 if os.getpid() == parent else 0.001)
        return os.getpid() == parent

    here = sum(ordered_map(work, list(range(200)), 2))
    assert here < 80  # round-robin dealing gave it half
    _assert_no_children_left()


@forks
def test_children_answer_on_descriptors_past_select_s_limit():
    """A process with over a thousand files open (a library's caller may have
    them) still hears its children: they are polled, not select()ed (FD_SETSIZE)."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 1200:
        pytest.skip(f"at most {hard} open files here")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 1200), hard))
    held = [os.open(os.devnull, os.O_RDONLY) for _ in range(1100)]
    try:
        assert max(held) > 1024
        done = list(ordered_map(lambda i: (i, os.getpid()), list(range(40)), 3))
    finally:
        for fd in held:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert [i for i, _ in done] == list(range(40))
    _assert_no_children_left()


@forks
def test_a_child_that_dies_leaves_its_items_to_the_parent():
    parent = os.getpid()

    def work(i: int) -> tuple[int, bool]:
        if os.getpid() != parent and i >= 4:
            os._exit(9)  # killed in the middle of the work, holding the next item too
        time.sleep(0.002)
        return i * i, os.getpid() == parent

    done = list(ordered_map(work, list(range(12)), 2))
    assert [square for square, _ in done] == [i * i for i in range(12)]
    assert not all(here for _, here in done)  # the child answered some before it died
    _assert_no_children_left()


@forks
def test_stopping_early_kills_and_reaps_the_children():
    results = ordered_map(lambda i: "x" * 100_000, list(range(200)), 3)
    next(results)
    next(results)  # children started and blocked on full pipes
    results.close()
    _assert_no_children_left()


def test_scan_map_refuses_an_unlistable_directory_at_once(tmp_path):
    with pytest.raises(storprobe.SourceError):
        scan_map(tmp_path / "missing", _rendered)  # when called, not when first iterated


def test_cli_reader_that_goes_away_ends_the_scan_and_its_workers(pool):
    """``storprobe scan DIR | head -1``: a quiet exit, no worker left behind."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "storprobe", "scan", "--jsonl", "--jobs", "3", str(pool)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    assert proc.stdout.readline().startswith(b"{")
    proc.stdout.close()
    assert proc.wait(timeout=60) == 0
    assert proc.stderr.read() == b""
    left = [pid for pid in os.listdir("/proc") if pid.isdigit() and _command_line(pid).endswith(str(pool))]
    assert left == []


def _command_line(pid: str) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def _assert_no_children_left() -> None:
    with pytest.raises(ChildProcessError):
        os.waitpid(-1, os.WNOHANG)  # no child at all, not even a zombie


def cli(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "storprobe", *args], capture_output=True, text=True, check=False, **kwargs
    )


@pytest.mark.parametrize("output", [[], ["--jsonl"], ["--output", "xml"]])
def test_cli_jobs_output_is_the_same(pool, output):
    one = cli("scan", *output, "--jobs", "1", str(pool))
    default = cli("scan", *output, str(pool))
    four = cli("scan", *output, "--jobs", "4", str(pool))
    assert one.returncode == default.returncode == four.returncode == 0
    assert one.stdout == default.stdout == four.stdout
    assert one.stderr == default.stderr == four.stderr == ""  # no progress bar: stderr is not a terminal
    assert one.stdout.count(str(pool)) >= len(os.listdir(pool))


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


@forks
def test_a_child_that_cannot_be_forked_leaves_its_items_to_the_parent(monkeypatch):
    """At a process limit fork fails: the items it would have had are done here."""
    real_fork, forks = os.fork, []

    def fork() -> int:
        forks.append(1)
        if len(forks) == 2:
            raise BlockingIOError(11, "Resource temporarily unavailable")
        return real_fork()

    monkeypatch.setattr(os, "fork", fork)

    def work(i: int) -> tuple[int, int]:
        time.sleep(0.002)
        return i, os.getpid()

    done = list(ordered_map(work, list(range(40)), 3))
    assert [i for i, _ in done] == list(range(40))
    assert len({pid for _, pid in done}) == 2  # this process and the one child forked
    _assert_no_children_left()


def _rendered_with_pid(record) -> tuple:
    return record.path, scan_record(record), os.getpid()


@forks
def test_no_fork_while_other_threads_run(pool):
    """Forking a process with other threads can deadlock the child (it inherits
    locks those threads held): scan_map then runs in this process alone, with the
    same records; once the thread has ended, it forks again."""
    parent = os.getpid()
    expected = _records(scan(pool))
    release = threading.Event()
    waiter = threading.Thread(target=release.wait, daemon=True)
    waiter.start()
    try:
        done = list(scan_map(pool, _rendered_with_pid, jobs=2))
        squares = list(ordered_map(lambda i: (i * i, os.getpid()), list(range(6)), 3))
    finally:
        release.set()
        waiter.join()
    assert [(path, record) for path, record, _ in done] == expected
    assert {pid for _, _, pid in done} == {parent}
    assert squares == [(i * i, parent) for i in range(6)]
    forked = list(scan_map(pool, _rendered_with_pid, jobs=2))
    assert [(path, record) for path, record, _ in forked] == expected
    assert len({pid for _, _, pid in forked}) == 2


@forks
def test_no_fork_while_a_thread_threading_does_not_know_runs():
    """A thread started through ``_thread`` (as execnet and C libraries start
    theirs) is invisible to threading.active_count(), not to the kernel."""
    import _thread

    parent, release, started = os.getpid(), threading.Event(), threading.Event()
    _thread.start_new_thread(lambda: (started.set(), release.wait()), ())
    started.wait()
    try:
        assert threading.active_count() == 1 and threads() == 2
        assert list(ordered_map(lambda i: (i, os.getpid()), list(range(6)), 3)) == [(i, parent) for i in range(6)]
    finally:
        release.set()


def test_forking_tests_single_threaded():
    """Where this process has other threads (an xdist worker), the tests marked
    ``forks`` run in a pytest of their own, in one thread."""
    if threads() == 1:
        pytest.skip("this process is single-threaded: the forking tests ran here")
    selected = [name for name, test in globals().items() if name.startswith("test_") and _forks(test)]
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-n", "0", "-p", "no:cacheprovider", __file__,
         "-k", " or ".join(selected)],
        capture_output=True, text=True, cwd=Path(__file__).parent.parent, check=False,
    )
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert f"{len(selected)} passed" in proc.stdout.splitlines()[-1]


def _forks(test) -> bool:
    return any(mark.name == "skipif" and mark.kwargs.get("reason") == forks.kwargs["reason"]
               for mark in getattr(test, "pytestmark", []))
