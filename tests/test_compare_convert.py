"""``storprobe compare`` against ``qemu-img compare`` (its lines and exit
statuses, strict or not, across formats, sizes and backing chains) and
``storprobe convert -O raw`` against ``qemu-img convert -O raw`` (the same
bytes by ``cmp``, no more blocks allocated), on images made by qemu-img and
qemu-io; broken images (a corrupt compressed cluster, misaligned tables) must
fail with qemu-img's statuses."""

from __future__ import annotations

import filecmp
import itertools
import json
import os
import resource
import signal
import subprocess
from pathlib import Path

import pytest

from storprobe.compare import compare
from storprobe.convert import convert_to_raw
from storprobe.datapath import IGNORE, LOCAL, open_image

from builders import broken_compressed_qcow2
from oracle import qemu_img_create, require, run

MiB = 1 << 20


def qemu_io(path: Path, *commands: str, fmt: str = "qcow2") -> None:
    args: list[str | Path] = ["qemu-io", "-f", fmt]
    for command in commands:
        args += ["-c", command]
    run(*args, path)


def storprobe(*args: str | Path) -> subprocess.CompletedProcess:
    return subprocess.run([require("storprobe"), *map(str, args)], capture_output=True, text=True)


def qemu_compare(*args: str | Path) -> tuple[int, list[str]]:
    proc = subprocess.run([require("qemu-img"), "compare", *map(str, args)], capture_output=True, text=True)
    return proc.returncode, proc.stdout.splitlines()


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> dict[str, Path]:
    """Pairs worth comparing: same data written differently (zero clusters,
    written zeros, raw), sizes that differ with and without data beyond the
    smaller, a difference inside a cluster, backing chains that differ below."""
    d = tmp_path_factory.mktemp("compare")
    made = {}

    def qcow2(name: str, size: str, *commands: str, backing: Path | None = None) -> Path:
        path = d / f"{name}.qcow2"
        if backing is None:
            qemu_img_create(path, "qcow2", size)
        else:
            run("qemu-img", "create", "-q", "-f", "qcow2", "-b", backing.name, "-F", "qcow2", path, size)
        if commands:
            qemu_io(path, *commands)
        made[name] = path
        return path

    qcow2("data", "4M", "write -P 0x11 0 64k", "write -P 0x22 1000 1")
    qcow2("data-late", "4M", "write -P 0x11 0 64k", "write -P 0x22 1000 1", "write -P 0x33 1500000 1")
    qcow2("byte", "4M", "write -P 0x11 0 64k")
    qcow2("empty", "4M")
    qcow2("written-zeros", "4M", "write -P 0 0 64k")
    qcow2("zero-clusters", "4M", "write -z 0 64k")
    qcow2("larger-empty", "8M")
    qcow2("larger-tail", "8M", "write -P 1 6000000 1")
    qcow2("larger-same", "8M", "write -P 0x11 0 64k", "write -P 0x22 1000 1")
    base = qcow2("base", "4M", "write -P 0x61 0 1M")
    qcow2("top", "4M", "write -P 0x62 512k 64k", backing=base)
    other_base = qcow2("other-base", "4M", "write -P 0x61 0 1M", "write -P 0x63 300000 1")
    qcow2("top-other-base", "4M", "write -P 0x62 512k 64k", backing=other_base)
    for name in ("data", "top", "empty"):
        raw = d / f"{name}.raw"
        run("qemu-img", "convert", "-O", "raw", made[name], raw)
        made[f"{name}-raw"] = raw
    sparse = d / "sparse.raw"
    with open(sparse, "wb") as f:
        f.truncate(4 * MiB)
    made["sparse-raw"] = sparse
    return made


#: The bases are compared through their tops; "byte" is for the command's own tests.
NOT_PAIRED = ("base", "other-base", "byte")


def test_compare_as_qemu_img_does(images):
    """Every ordered pair, strict and not: the same lines and exit status."""
    differences = []
    paired = {name: path for name, path in images.items() if name not in NOT_PAIRED}
    for (a, one), (b, two) in itertools.product(paired.items(), repeat=2):
        for strict in (False, True):
            with open_image(one, backing=LOCAL) as first, open_image(two, backing=LOCAL) as second:
                outcome = compare(first, second, strict=strict)
            theirs = qemu_compare(*(["-s"] if strict else []), one, two)
            if (outcome.status, list(outcome.lines)) != theirs:
                differences.append((a, b, strict, outcome, theirs))
    assert differences == []


def test_the_command_prints_qemu_imgs_lines_and_status(images):
    for args in ((images["data"], images["data-late"]), ("-s", images["larger-empty"], images["empty"]),
                 (images["top"], images["top-raw"]), (images["top"], images["top-other-base"])):
        proc = storprobe("compare", *args)
        assert (proc.returncode, proc.stdout.splitlines()) == qemu_compare(*args)
        assert proc.stderr == ""


def test_a_difference_in_a_backing_layer(images):
    """The chains differ only in their base images: compare follows them (as
    qemu-img does); with --no-backing the tops alone are identical."""
    proc = storprobe("compare", images["top"], images["top-other-base"])
    assert (proc.returncode, proc.stdout) == (1, "Content mismatch at offset 299520!\n")
    assert qemu_compare(images["top"], images["top-other-base"])[0] == 1
    alone = storprobe("compare", "--no-backing", images["top"], images["top-other-base"])
    assert (alone.returncode, alone.stdout) == (0, "Images are identical.\n")


def test_quiet_prints_nothing(images):
    proc = storprobe("compare", "-q", images["data"], images["byte"])
    assert (proc.returncode, proc.stdout) == (1, "")


def test_an_image_that_cannot_be_opened_is_status_2(images, tmp_path):
    missing = tmp_path / "missing.qcow2"
    for args in ((missing, images["data"]), (images["data"], missing)):
        proc = storprobe("compare", *args)
        assert proc.returncode == qemu_compare(*args)[0] == 2
        assert proc.stdout == "" and proc.stderr.startswith(f"storprobe: {missing}: ")


@pytest.mark.parametrize("how, status", [("inflate", 4), ("l1", 3), ("l2", 3)])
def test_unreadable_data_and_allocation(tmp_path, how, status):
    """A read that fails is status 4, a block status that fails is 3, as qemu-img."""
    plain, broken = broken_compressed_qcow2(tmp_path, how)
    assert qemu_compare(plain, broken)[0] == status
    proc = storprobe("compare", plain, broken)
    assert proc.returncode == status and proc.stdout == ""
    assert proc.stderr.startswith(f"storprobe: {broken}: ")


# ---- convert ----------------------------------------------------------------------------


def allocated(path: Path) -> int:
    return os.stat(path).st_blocks * 512


@pytest.fixture(scope="module")
def sources(images, tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("convert")
    extra = {}
    mixed = qemu_img_create(d / "mixed.qcow2", "qcow2", "16M", "cluster_size=4096")
    qemu_io(mixed, "write -P 0x41 0 1M", "write -z 256k 128k", "write -P 0 2M 512k", "write -P 0x42 3M 5000",
            "discard 512k 64k", "write -P 0x43 15M 1M")
    extra["mixed"] = mixed
    packed = d / "compressed.qcow2"
    run("qemu-img", "convert", "-c", "-O", "qcow2", mixed, packed)
    extra["compressed"] = packed
    return {**images, **extra}


def test_convert_writes_what_qemu_img_writes(sources, tmp_path):
    for name, source in sources.items():
        theirs, mine = tmp_path / f"{name}.qemu.raw", tmp_path / f"{name}.ours.raw"
        run("qemu-img", "convert", "-O", "raw", source, theirs)
        with open_image(source, backing=LOCAL) as disk:
            convert_to_raw(disk, mine)
        run("cmp", theirs, mine)
        assert allocated(mine) <= allocated(theirs), name


def test_the_command_converts(sources, tmp_path):
    theirs, mine = tmp_path / "qemu.raw", tmp_path / "ours.raw"
    run("qemu-img", "convert", "-O", "raw", sources["compressed"], theirs)
    proc = storprobe("convert", "-O", "raw", sources["compressed"], mine)
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, "", "")
    run("cmp", theirs, mine)


def test_zeros_and_unallocated_ranges_are_holes(sources, tmp_path):
    """Only the 4 KiB blocks holding a non-zero byte are allocated in the output."""
    out = tmp_path / "mixed.raw"
    assert storprobe("convert", sources["mixed"], out).returncode == 0
    data = out.read_bytes()
    nonzero = sum(1 for at in range(0, len(data), 4096) if any(data[at : at + 4096]))
    assert allocated(out) == nonzero * 4096
    assert allocated(out) < len(data) // 4


def test_no_backing_writes_the_top_alone(images, tmp_path):
    spec = json.dumps({"driver": "qcow2", "backing": None, "file": {"driver": "file", "filename": str(images["top"])}})
    theirs, mine = tmp_path / "qemu.raw", tmp_path / "ours.raw"
    run("qemu-img", "convert", "-O", "raw", f"json:{spec}", theirs)
    assert storprobe("convert", "--no-backing", images["top"], mine).returncode == 0
    assert filecmp.cmp(theirs, mine, shallow=False)


def test_an_existing_destination_is_not_replaced(images, tmp_path):
    """qemu-img truncates whatever the destination names; we refuse unless
    --overwrite, and never replace a symbolic link or what is not a regular file."""
    target = tmp_path / "precious"
    target.write_bytes(b"keep me")
    proc = storprobe("convert", images["data"], target)
    assert proc.returncode == 1
    assert proc.stderr == f"storprobe: {target}: exists (pass --overwrite to replace it)\n"
    assert target.read_bytes() == b"keep me"
    link = tmp_path / "link"
    link.symlink_to(target)
    proc = storprobe("convert", "--overwrite", images["data"], link)
    assert proc.returncode == 1 and "not a regular file" in proc.stderr
    assert target.read_bytes() == b"keep me"
    assert storprobe("convert", "--overwrite", images["data"], target).returncode == 0
    run("cmp", target, images["data-raw"])


def test_a_failed_write_is_a_write_error(images, tmp_path):
    """A file size limit (RLIMIT_FSIZE, as a full disk would) stops the write:
    one line ``storprobe: write error: ...``, status 1, no partial output left."""
    out = tmp_path / "limited.raw"

    def limit() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 * MiB, 1 * MiB))

    proc = subprocess.run([require("storprobe"), "convert", images["data"], out], capture_output=True, text=True,
                          preexec_fn=limit)
    assert (proc.returncode, proc.stdout) == (1, "")
    assert proc.stderr == "storprobe: write error: File too large\n"
    assert not out.exists()


def test_unreadable_source_leaves_no_output(tmp_path):
    _, broken = broken_compressed_qcow2(tmp_path, "inflate")
    out = tmp_path / "out.raw"
    proc = storprobe("convert", broken, out)
    assert proc.returncode == 1 and proc.stderr.startswith(f"storprobe: {broken}: ")
    assert not out.exists()


def test_convert_refuses_other_output_formats(images, tmp_path):
    proc = storprobe("convert", "-O", "qcow2", images["data"], tmp_path / "x")
    assert proc.returncode == 2 and "invalid choice" in proc.stderr


def test_compare_and_convert_agree(images, tmp_path):
    """A converted image compares identical to its source, strict too where both are fully raw."""
    out = tmp_path / "top.raw"
    assert storprobe("convert", images["top"], out).returncode == 0
    with open_image(images["top"], backing=LOCAL) as top, open_image(out) as raw:
        assert compare(top, raw).lines == ("Images are identical.",)
    with open_image(images["top"], backing=IGNORE) as alone, open_image(out) as raw:
        assert compare(alone, raw).status == 1
