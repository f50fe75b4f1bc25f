"""Sizes read as qemu-img reads them (QEMU's qemu_strtosz) and written as it
writes them (size_to_str), with qemu-img itself as the oracle."""

from __future__ import annotations

import re
import subprocess

import pytest

from storprobe.sizes import parse_size, size_text

from oracle import require

#: Suffix case, fractions (rounded half up, ``1.`` with no digits), the B
#: suffix, hexadecimal, C's leading space and plus sign, exponents (refused;
#: ``1e`` is one exbibyte), fractions of a byte, units qemu-img does not
#: know, negatives, and the INT64_MAX limit.
SIZES = [
    "1G", "1g", "1.5G", "1.5g", "1.g", "10.5k", "1.0000000001k", "0.0001k", "1.0", "512", "1B", "1b", "3B",
    "1k", "1K", "1m", "1T", "1t", "1p", "1P", "0.5E", "7e", "0x200", "0X1f0", " 1G", "+1G", "0", "0k",
    "1.5", "1.5b", "1e3", "1.5e3G", ".5k", "", "1x", "1KiB", "1Gb", "1 G", "1G ", "-1", "-0", " -1k",
    "8E", "16E", "9223372036854775807", "9223372036854775808", "8191P", "0x",
]


def qemu_img_reads(size: str, tmp_path) -> int | None:
    """The byte count qemu-img takes ``size`` for, or None when it refuses it
    as a size. ``qemu-img create -f raw`` keeps the size to the byte in the
    ``Formatting ... size=N`` line it prints before creating the (sparse)
    file, even for a size the file system then refuses."""
    path = tmp_path / "sized.raw"
    create = [require("qemu-img"), "create", "-f", "raw", str(path), "--", size]
    proc = subprocess.run(create, capture_output=True, text=True)
    if "Invalid image size specified" in proc.stderr:
        return None
    said = re.search(r" size=(\d+)", proc.stdout)
    assert said is not None, proc.stdout + proc.stderr
    path.unlink(missing_ok=True)
    return int(said[1])


@pytest.mark.parametrize("size", SIZES)
def test_sizes_read_as_qemu_img_reads_them(size, tmp_path):
    theirs = qemu_img_reads(size, tmp_path)
    if theirs is None:
        with pytest.raises(ValueError):
            parse_size(size)
    else:
        assert parse_size(size) == theirs


def test_hexadecimal_takes_no_suffix():
    """QEMU 7.2 warns that a suffix on a hexadecimal size is deprecated, and QEMU 8 refuses it."""
    with pytest.raises(ValueError):
        parse_size("0x1G")
    assert parse_size("0x1B") == 27  # B is a hexadecimal digit


@pytest.mark.parametrize("size", ["0", "512", "999.5K", "1000K", "1023.9K", "1M", "1.5M", "64T", "100T", "1E", "1.9E"])
def test_sizes_written_as_qemu_img_writes_them(size, tmp_path):
    """qcow2 with 2 MiB clusters holds up to 2 EiB (qemu-img rounds sizes up to whole sectors)."""
    path = tmp_path / "sized.qcow2"
    create = [require("qemu-img"), "create", "-q", "-f", "qcow2", "-o", "cluster_size=2M", str(path), size]
    subprocess.run(create, check=True)
    info = subprocess.run([require("qemu-img"), "info", str(path)], capture_output=True, text=True).stdout
    line = next(line for line in info.splitlines() if line.startswith("virtual size: "))
    bytes_shown = int(re.search(r"\((\d+) bytes\)", line)[1])
    assert line == f"virtual size: {size_text(bytes_shown)}"
