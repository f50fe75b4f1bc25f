"""The data path's bound on virtual size (``--max-size``, ``max_size=``).

Every command that reads a guest disk (map, verify, measure of a source,
inspect, compare, convert) and the Python API refuse an image whose header
declares a virtual size over the bound (default 64 TiB, ``check``'s), and a
backing file over it, with ``datapath.too-large``, before any table of it is
read. qemu-img has no such bound: the tests show it reading what we refuse
(the README's differences table). Within the bound nothing changes, and the
extents a map walks stay bounded by the virtual size over the cluster size.
"""

from __future__ import annotations

import struct
import subprocess
from pathlib import Path

import pytest

from storprobe import ProbeError
from storprobe.datapath import LOCAL, open_image
from storprobe.guest import inspect_image
from storprobe.measure import measure
from storprobe.safety import DEFAULT_MAX_VIRTUAL_SIZE
from storprobe.verify import verify

from builders import descriptor
from oracle import qemu_img_create, qemu_io, qemu_map, require, run

TIB = 1 << 40
BOUND = DEFAULT_MAX_VIRTUAL_SIZE
assert BOUND == 64 * TIB
REFUSAL = "exceeds the bound of 64 TiB"


def storprobe(*args: str | Path) -> subprocess.CompletedProcess:
    return subprocess.run([require("storprobe"), *map(str, args)], capture_output=True, text=True, check=False)


def code(call) -> str:
    with pytest.raises(ProbeError) as refused:
        call()
    return refused.value.code


def hand_patched(path: Path, size: int) -> Path:
    """A 1 MiB qcow2 whose header is patched to declare ``size`` bytes, with
    the L1 table it records made long enough (running past the end of the
    file, which QEMU reads as zeros): an image QEMU opens as it is."""
    qemu_img_create(path, "qcow2", "1M")
    data = bytearray(path.read_bytes())
    cluster_bits = struct.unpack_from(">I", data, 20)[0]
    span = (1 << cluster_bits) * ((1 << cluster_bits) // 8)  # guest bytes one L1 entry maps
    struct.pack_into(">Q", data, 24, size)
    struct.pack_into(">I", data, 36, -(-size // span))  # l1_size
    path.write_bytes(bytes(data))
    return path


@pytest.fixture(params=["created", "hand-patched"])
def huge(request, tmp_path) -> Path:
    """A qcow2 of 65 TiB, one TiB over the bound: made by qemu-img create, or patched into a small one's header."""
    if request.param == "created":
        return qemu_img_create(tmp_path / "huge.qcow2", "qcow2", "65T")
    return hand_patched(tmp_path / "huge.qcow2", 65 * TIB)


# ---- refused by every command and the API --------------------------------------------------------------


def qemu_check_status(image: Path) -> int:
    return subprocess.run([require("qemu-img"), "check", str(image)], capture_output=True).returncode


def test_qemu_img_reads_it(huge):
    """The difference: qemu-img has no bound, and maps and checks the image
    (the patched one's L1 table runs past the end of the file: a corruption)."""
    assert qemu_map(huge, "qcow2").returncode == 0
    assert qemu_check_status(huge) in (0, 2)


@pytest.mark.parametrize("command, status", [
    (("map", "--output", "json"), 1), (("verify", "--output", "json"), 1), (("measure", "-O", "qcow2"), 1),
    (("inspect",), 1),
])
def test_every_command_refuses_it(huge, command, status):
    proc = storprobe(*command, huge)
    assert (proc.returncode, proc.stdout) == (status, "")
    assert REFUSAL in proc.stderr and "65 TiB (71468255805440 bytes)" in proc.stderr


def test_compare_and_convert_refuse_it(huge, tmp_path):
    """compare: qemu-img compare's status for an image it cannot open (2); convert writes nothing."""
    small = qemu_img_create(tmp_path / "small.qcow2", "qcow2", "1M")
    for first, second in ((huge, small), (small, huge)):
        proc = storprobe("compare", first, second)
        assert proc.returncode == 2 and REFUSAL in proc.stderr and str(huge) in proc.stderr
    destination = tmp_path / "out.raw"
    proc = storprobe("convert", "-O", "raw", huge, destination)
    assert proc.returncode == 1 and REFUSAL in proc.stderr
    assert not destination.exists()


def test_the_api_refuses_it(huge):
    assert code(lambda: open_image(huge)) == "datapath.too-large"
    assert code(lambda: verify(huge)) == "datapath.too-large"
    assert code(lambda: measure("qcow2", source=huge)) == "datapath.too-large"
    assert code(lambda: inspect_image(huge)) == "datapath.too-large"


def test_refused_before_any_table_is_read(tmp_path):
    """A VMDK descriptor of 2^40 sectors (512 TiB) whose extent file does not
    exist: the bound refuses it before the file is looked for; with the bound
    raised, the missing file is what stops the data path."""
    image = tmp_path / "d.vmdk"
    image.write_bytes(descriptor("monolithicFlat", f'RW {1 << 40} FLAT "missing.raw" 0'))
    assert code(lambda: open_image(image, backing=LOCAL)) == "datapath.too-large"
    assert code(lambda: verify(image, named_files=LOCAL)) == "datapath.too-large"
    raised = 1 << 49
    assert code(lambda: open_image(image, backing=LOCAL, max_size=raised)) == "datapath.named-file-missing"
    assert code(lambda: verify(image, named_files=LOCAL, max_size=raised)) == "datapath.named-file-missing"


# ---- a backing file over the bound ---------------------------------------------------------------------


def test_a_backing_file_over_the_bound_is_refused(tmp_path):
    base = hand_patched(tmp_path / "base.qcow2", 65 * TIB)
    top = qemu_img_create(tmp_path / "top.qcow2", "qcow2", "1G", f"backing_file={base.name}", "backing_fmt=qcow2")
    qemu_io(top, "write -P 0x11 0 64k", fmt="qcow2")
    with pytest.raises(ProbeError) as refused:
        open_image(top, backing=LOCAL)
    assert refused.value.code == "datapath.too-large" and f"backing file {base}" in refused.value.reason
    for command in (("map",), ("inspect",), ("convert", "-O", "raw", "SRC", tmp_path / "o.raw"),
                    ("compare", "SRC", top), ("measure", "-O", "qcow2", "SRC")):
        args = [top if arg == "SRC" else arg for arg in command]
        if "SRC" not in command:
            args.append(top)
        proc = storprobe(*args)
        assert proc.returncode == (2 if command[0] == "compare" else 1), command
        assert REFUSAL in proc.stderr and "backing file" in proc.stderr
    assert storprobe("map", "--no-backing", top).returncode == 0  # the top image alone is within the bound
    raised = storprobe("map", "--output", "json", "--max-size", "65T", top)
    assert (raised.returncode, raised.stdout) == (0, qemu_map(top, "qcow2").stdout.decode())


# ---- within the bound, and the bound moved ----------------------------------------------------------------


def test_an_image_at_the_bound_is_read_as_qemu_reads_it(tmp_path):
    image = qemu_img_create(tmp_path / "at.qcow2", "qcow2", "64T")
    qemu_io(image, "write -P 0x22 0 64k", "write -P 0x33 40T 64k", fmt="qcow2")
    mine = storprobe("map", "--output", "json", image)
    assert (mine.returncode, mine.stdout) == (0, qemu_map(image, "qcow2").stdout.decode())
    with open_image(image) as disk:
        assert disk.size == BOUND and disk.pread(40 * TIB, 2) == b"\x33\x33"
    assert verify(image).exit_status == 0


def test_max_size_raises_and_lowers_the_bound(huge, tmp_path):
    for args in (("map",), ("inspect",), ("measure", "-O", "qcow2")):
        assert storprobe(*args, "--max-size", "65T", huge).returncode == 0, args
    assert storprobe("verify", "--max-size", "65T", huge).returncode == qemu_check_status(huge)
    with open_image(huge, max_size=65 * TIB) as disk:
        assert disk.size == 65 * TIB
    assert verify(huge, max_size=65 * TIB).exit_status == qemu_check_status(huge)
    small = qemu_img_create(tmp_path / "two.qcow2", "qcow2", "2M")
    raw = tmp_path / "two.raw"
    assert storprobe("convert", "--max-size", "2M", small, raw).returncode == 0  # the bound is inclusive
    assert raw.stat().st_size == 2 << 20
    for command in (("map",), ("verify",), ("inspect",), ("measure",), ("compare", raw), ("convert",)):
        args = [*command[:1], "--max-size", "1M", small, *command[1:]]
        if command[0] == "convert":
            args.append(tmp_path / "not-written.raw")
        proc = storprobe(*args)
        assert proc.returncode == (2 if command[0] == "compare" else 1), command
        assert "exceeds the bound of 1 MiB (1048576 bytes)" in proc.stderr
    assert not (tmp_path / "not-written.raw").exists()
    assert code(lambda: open_image(small, max_size=(2 << 20) - 1)) == "datapath.too-large"
    assert code(lambda: measure("raw", source=small, max_size=1 << 20)) == "datapath.too-large"


def test_max_size_is_a_size_and_needs_something_to_bound():
    assert storprobe("map", "--max-size", "lots", "x").returncode == 2
    proc = storprobe("measure", "--size", "1G", "--max-size", "1T")
    assert proc.returncode == 2 and "does not apply to --size" in proc.stderr


# ---- the walk stays bounded ------------------------------------------------------------------------------


def test_the_largest_image_with_the_smallest_clusters_maps_in_bounded_steps(tmp_path):
    """At 64 TiB qemu-img's smallest qcow2 cluster is 16 KiB (its L1 table is
    capped at 32 MiB): map of such an image, written here and there, ends after
    at most one extent per cluster; one cluster more and the bound refuses it."""
    cluster = 16 << 10
    assert subprocess.run([require("qemu-img"), "create", "-f", "qcow2", "-o", "cluster_size=8k",
                           str(tmp_path / "no.qcow2"), "64T"], capture_output=True).returncode == 1
    image = qemu_img_create(tmp_path / "big.qcow2", "qcow2", "64T", f"cluster_size={cluster}")
    qemu_io(image, "write -P 1 0 48k", "write -z 1T 16k", "write -P 2 63T 4k", fmt="qcow2")
    with open_image(image) as disk:
        extents = sum(1 for _ in disk.block_status())
    assert 0 < extents <= BOUND // cluster
    run("qemu-img", "resize", "-f", "qcow2", image, f"+{cluster}")
    assert code(lambda: open_image(image)) == "datapath.too-large"
