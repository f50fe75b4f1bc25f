"""No traceback, ever, on output: every subcommand against a full disk
(/dev/full), a closed standard output and a reader that went away (EPIPE).

A full disk and a closed descriptor are ordinary failures, reported as
coreutils does (``cat: write error: No space left on device``): one line
``storprobe: write error: REASON`` on stderr and status 1. A reader that left
(``storprobe scan DIR | head -c1``) ends the command quietly, status 0.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from oracle import qemu_img_create, run

STORPROBE = [sys.executable, "-m", "storprobe"]
FULL = "storprobe: write error: No space left on device\n"
CLOSED = "storprobe: write error: Bad file descriptor\n"


@pytest.fixture(scope="module")
def volumes(tmp_path_factory) -> Path:
    """A qcow2 over a backing file, a raw volume, their pool's volume XML, and
    a pool large enough that ``scan --jobs 2`` forks a worker (over two batches)."""
    here = tmp_path_factory.mktemp("volumes")
    pool = here / "pool"
    pool.mkdir()
    qemu_img_create(pool / "base.raw", "raw", "1M")
    run("qemu-img", "create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw", pool / "top.qcow2")
    big = here / "big"
    big.mkdir()
    for i in range(300):
        (big / f"v{i:03d}.img").write_bytes(bytes(512))
    (here / "vol.xml").write_text(run(*STORPROBE, "info", "--output", "xml", pool / "top.qcow2").stdout.decode())
    return here


COMMANDS = {
    "info": ["info", "{pool}/top.qcow2"],
    "info-json": ["info", "--output", "json", "{pool}/top.qcow2"],
    "info-xml": ["info", "--output", "xml", "{pool}/top.qcow2"],
    "info-chain": ["info", "--backing-chain", "{pool}/top.qcow2"],
    "info-chain-json": ["info", "--backing-chain", "--output", "json", "{pool}/top.qcow2"],
    "scan": ["scan", "{pool}"],
    "scan-jsonl": ["scan", "--jsonl", "{pool}"],
    "scan-xml": ["scan", "--output", "xml", "{pool}"],
    "scan-jobs": ["scan", "--jobs", "2", "{big}"],
    "scan-jobs-jsonl": ["scan", "--jobs", "2", "--jsonl", "{big}"],
    "scan-jobs-xml": ["scan", "--jobs", "2", "--output", "xml", "{big}"],
    "check": ["check", "{pool}/base.raw"],
    "check-unsafe": ["check", "{pool}/top.qcow2"],
    "check-json": ["check", "--output", "json", "{pool}/base.raw"],
    "check-stream": ["check", "--stream", "{pool}/top.qcow2"],
    "scan-to": ["scan", "--to", "{here}/inventory", "{pool}"],
    "map": ["map", "{pool}/top.qcow2"],
    "map-json": ["map", "--output", "json", "{pool}/top.qcow2"],
    "verify": ["verify", "{pool}/top.qcow2"],
    "verify-json": ["verify", "--output", "json", "{pool}/top.qcow2"],
    "measure": ["measure", "-O", "qcow2", "{pool}/top.qcow2"],
    "measure-json": ["measure", "--output", "json", "--size", "1G"],
    "inspect": ["inspect", "{pool}/top.qcow2"],
    "inspect-json": ["inspect", "--output", "json", "{pool}/top.qcow2"],
    "info-guest": ["info", "--inspect-guest", "{pool}/top.qcow2"],
    "compare": ["compare", "{pool}/base.raw", "{pool}/top.qcow2"],
    "validate": ["validate", "{here}/vol.xml"],
    "formats": ["formats"],
    "formats-json": ["formats", "--output", "json"],
    "help": ["--help"],
    "info-help": ["info", "--help"],
    "version": ["--version"],
}


def _args(volumes: Path, name: str) -> list[str]:
    where = {"here": volumes, "pool": volumes / "pool", "big": volumes / "big"}
    return [arg.format(**where) for arg in COMMANDS[name]]


@pytest.mark.parametrize("name", COMMANDS)
def test_a_full_disk_is_one_line_and_status_1(volumes, name):
    with open("/dev/full", "w") as full:
        proc = subprocess.run([*STORPROBE, *_args(volumes, name)], stdout=full, stderr=subprocess.PIPE, text=True)
    assert (proc.stderr, proc.returncode) == (FULL, 1)


@pytest.mark.parametrize("name", COMMANDS)
def test_a_closed_stdout_is_one_line_and_status_1(volumes, name):
    """``>&-``: the interpreter starts without a descriptor 1 (``sys.stdout`` is None)."""
    proc = subprocess.run(
        ["bash", "-c", '"$@" >&-', "bash", *STORPROBE, *_args(volumes, name)], capture_output=True, text=True
    )
    assert (proc.stderr, proc.returncode) == (CLOSED, 1)


@pytest.mark.parametrize("name", COMMANDS)
def test_a_reader_that_left_ends_it_quietly(volumes, name):
    """EPIPE on the first write, whatever the output's size: the pipe's read
    end is closed before the command starts."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        proc = subprocess.run([*STORPROBE, *_args(volumes, name)], stdout=write_end, stderr=subprocess.PIPE, text=True)
    finally:
        os.close(write_end)
    assert (proc.stderr, proc.returncode) == ("", 0)


def test_a_reader_that_leaves_midway_ends_a_parallel_scan_quietly(volumes):
    """``scan | head -c1``: the reader goes away after the workers started."""
    proc = subprocess.run(
        ["bash", "-c", '"$@" | head -c1 >/dev/null; echo "${PIPESTATUS[0]}"', "bash", *STORPROBE,
         *_args(volumes, "scan-jobs-xml")],
        capture_output=True, text=True,
    )
    assert (proc.stdout, proc.stderr) == ("0\n", "")


def test_a_probe_error_with_stdout_closed_is_the_probe_error(tmp_path):
    """Nothing was written, so nothing failed to be: the volume's own error stands."""
    missing = tmp_path / "missing.qcow2"
    proc = subprocess.run(["bash", "-c", '"$@" >&-', "bash", *STORPROBE, "info", str(missing)],
                          capture_output=True, text=True)
    assert proc.returncode == 1
    assert proc.stderr == f"storprobe: {missing}: No such file or directory\n"
