"""What the core does with every kind of volume and source, whatever its bytes."""

from __future__ import annotations

import errno
import io
import os
import socket
import struct

import pytest

from storprobe import BytesSource, FileSource, PathSource, ProbeError, SourceError, probe
from storprobe.errors import ReadLimitExceeded, TruncatedHeader, UnsupportedVersion
from storprobe.source import HEAD_SIZE, READ_BUDGET, Image

from oracle import qemu_img_create, unusable_entry


@pytest.fixture(scope="module")
def qcow2_bytes(tmp_path_factory) -> bytes:
    """A real 1 MiB qcow2 v3 image made by qemu-img."""
    return qemu_img_create(tmp_path_factory.mktemp("q") / "a.qcow2", "qcow2", "1M").read_bytes()


def test_empty_file_is_raw_of_size_zero(tmp_path):
    (tmp_path / "empty").write_bytes(b"")
    info = probe(tmp_path / "empty")
    assert (info.format, info.virtual_size, info.evidence) == ("raw", 0, "fallback")


def test_directory_is_dir(tmp_path):
    info = probe(tmp_path)
    assert (info.format, info.file_type) == ("dir", "directory")


def test_fifo_is_refused_without_blocking(tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(SourceError, match="FIFO"):
        probe(fifo)  # no writer: a blocking open would hang here


def test_socket_is_refused(tmp_path):
    path = tmp_path / "sock"
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(path))
        with pytest.raises(SourceError):
            probe(path)


def test_character_device_is_refused():
    with pytest.raises(SourceError, match="character device"):
        probe("/dev/zero")


def test_missing_file(tmp_path):
    with pytest.raises(SourceError, match="No such file"):
        probe(tmp_path / "missing")


def test_symlink_is_followed_and_dangling_symlink_is_an_error(tmp_path):
    (tmp_path / "real").write_bytes(b"x" * 4096)
    (tmp_path / "link").symlink_to("real")
    assert probe(tmp_path / "link").virtual_size == 4096
    (tmp_path / "dangling").symlink_to("nowhere")
    with pytest.raises(SourceError):
        probe(tmp_path / "dangling")
    (tmp_path / "loop").symlink_to("loop")
    with pytest.raises(SourceError, match="symbolic links"):
        probe(tmp_path / "loop")


def test_permission_denied(tmp_path, monkeypatch):
    path = tmp_path / "secret"
    path.write_bytes(b"x")
    path.chmod(0)
    if os.geteuid() == 0:  # root opens any file: make the open fail as it would for a user

        def refuse(*args, **kwargs):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))

        monkeypatch.setattr(os, "open", refuse)
    with pytest.raises(SourceError, match="Permission denied"):
        probe(path)


def test_bytes_and_file_objects_give_the_same_answer(tmp_path, qcow2_bytes):
    data = qcow2_bytes
    (tmp_path / "img").write_bytes(data)
    with open(tmp_path / "img", "rb") as f:
        from_file = probe(f)
    from_unseekable_fd = probe(FileSource(io.BytesIO(data), name="mem"))
    for info in (probe(data), from_file, from_unseekable_fd, probe(tmp_path / "img")):
        assert (info.format, info.virtual_size) == ("qcow2", 1 << 20)


def test_unknown_version_is_reported_not_raw(qcow2_bytes):
    data = bytearray(qcow2_bytes)
    struct.pack_into(">I", data, 4, 99)
    with pytest.raises(UnsupportedVersion, match="version 99"):
        probe(bytes(data))


def test_magic_with_truncated_version_is_a_named_error():
    with pytest.raises(TruncatedHeader, match="version"):
        probe(b"QFI\xfb\0")


def test_caller_format_is_trusted_but_other_signatures_stay_visible(qcow2_bytes):
    info = probe(qcow2_bytes, format="raw")
    assert (info.format, info.evidence, info.matches) == ("raw", "caller", ("qcow2",))


def test_caller_format_must_carry_its_signature():
    with pytest.raises(ProbeError, match="not a qcow2 image") as err:
        probe(bytes(4096), format="qcow2")
    assert err.value.code == "wrong-format"


def test_polyglot_iso_with_qcow2_header_lists_both(qcow2_bytes):
    data = bytearray(qcow2_bytes.ljust(40000, b"\0"))
    data[32769:32774] = b"CD001"
    info = probe(bytes(data))
    assert info.format == "qcow2"  # the header at offset 0 is what a hypervisor would open
    assert set(info.matches) == {"qcow2", "iso"}


def test_reads_beyond_the_head_are_bounded():
    img = Image(BytesSource(bytes(HEAD_SIZE * 2)))
    with pytest.raises(TruncatedHeader):
        img.read(HEAD_SIZE, HEAD_SIZE * 2)
    with pytest.raises(TruncatedHeader):
        img.read(-HEAD_SIZE * 3, 10)
    assert img.read(HEAD_SIZE, 10, exact=False) == bytes(10)


def test_read_budget_is_enforced():
    class Endless(BytesSource):
        def size(self):
            return 1 << 50

        def read_at(self, offset, length):
            return bytes(length)

    img = Image(Endless(b""))
    img.read(1 << 40, READ_BUDGET // 2)
    with pytest.raises(ReadLimitExceeded):
        img.read(1 << 41, READ_BUDGET // 2 + 1)


# ---- hostile sources: special files, files that change while read ------------------


def test_dev_null_is_refused_before_it_is_opened(monkeypatch):
    """Character devices are refused on their stat: opening some (watchdogs,
    tapes) has effects, so they are never opened."""
    opened = []
    real_open = os.open
    monkeypatch.setattr(os, "open", lambda path, *a, **k: opened.append(path) or real_open(path, *a, **k))
    for device in ("/dev/null", "/dev/zero"):
        with pytest.raises(SourceError, match="character device"):
            probe(device)
    assert opened == []


def test_entry_listed_as_a_file_then_swapped_for_a_link_takes_the_careful_path(tmp_path, monkeypatch, qcow2_bytes):
    """A scan trusts the listing's "regular file" and skips the stat before the
    open, but opens without following links: an entry swapped since the listing
    for a link to a device is stat-ed first and never opened; a link to a
    regular file is followed, as for any path."""
    entry = tmp_path / "vol"
    entry.symlink_to("/dev/null")  # what the entry became after it was listed as a file
    opened = []
    real_open = os.open
    monkeypatch.setattr(os, "open", lambda path, flags, *a: opened.append((path, flags)) or real_open(path, flags, *a))
    stated = []
    real_stat = os.stat
    monkeypatch.setattr(os, "stat", lambda path, *a, **k: stated.append(path) or real_stat(path, *a, **k))
    with pytest.raises(SourceError, match="character device"):
        PathSource(entry, listed_as_file=True)
    assert opened == [(str(entry), opened[0][1])] and opened[0][1] & os.O_NOFOLLOW  # refused, then only stat-ed
    (tmp_path / "target.qcow2").write_bytes(qcow2_bytes)
    entry.unlink()
    entry.symlink_to("target.qcow2")
    source = PathSource(entry, listed_as_file=True)
    try:
        assert probe(source).format == "qcow2"
    finally:
        source.close()
    entry.unlink()
    entry.write_bytes(qcow2_bytes)
    opened.clear()
    stated.clear()
    PathSource(entry, listed_as_file=True).close()
    assert (len(opened), stated) == (1, [])  # a regular file: opened once, no stat before


def test_block_device_is_probed_read_only(tmp_path):
    """A loop device over a qcow2 image: probed like the file, as a block device."""
    import subprocess

    from oracle import require

    image = qemu_img_create(tmp_path / "a.qcow2", "qcow2", "1M")
    losetup = require("losetup")
    attach = subprocess.run([losetup, "-f", "--show", "-r", str(image)], check=False, capture_output=True, text=True)
    device = attach.stdout.strip().splitlines()[-1] if attach.returncode == 0 and attach.stdout.strip() else ""
    if not device.startswith("/dev/"):
        pytest.skip(f"no loop device available here ({attach.stderr.strip() or 'losetup failed'})")
    try:
        info = probe(device)
        assert (info.format, info.file_type, info.virtual_size) == ("qcow2", "block", 1 << 20)
    finally:
        subprocess.run([losetup, "-d", device], check=False, capture_output=True)


def test_open_pipe_is_refused_not_read():
    read_end, write_end = os.pipe()
    os.write(write_end, b"QFI\xfb" + bytes(100))
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe, pytest.raises(SourceError, match="FIFO"):
        probe(pipe)


def test_file_object_that_fails_is_a_source_error():
    class Failing(io.RawIOBase):
        def readable(self):
            return True

        def seek(self, *args):
            raise OSError(errno.EIO, os.strerror(errno.EIO))

    with pytest.raises(SourceError, match="Input/output error"):
        probe(Failing())


class Shrinking(BytesSource):
    """A file truncated to ``cut`` bytes after its size was taken."""

    def __init__(self, data: bytes, cut: int) -> None:
        super().__init__(data, name="shrinking")
        self.cut = cut

    def read_at(self, offset, length):
        return super().read_at(offset, max(0, min(length, self.cut - offset)))


class Growing(BytesSource):
    """A file that grows after its size was taken: reads see the new bytes."""

    def __init__(self, data: bytes, grown: bytes) -> None:
        super().__init__(data, name="growing")
        self.grown = data + grown

    def read_at(self, offset, length):
        return self.grown[offset : offset + length]


@pytest.fixture(scope="module")
def real_images(tmp_path_factory) -> dict[str, bytes]:
    """One real image per format whose probe reads beyond the head or from the end."""
    d = tmp_path_factory.mktemp("real")
    made = {
        "qcow2": qemu_img_create(d / "a.qcow2", "qcow2", "64M"),
        "vmdk-stream": qemu_img_create(d / "a.vmdk", "vmdk", "64M", "subformat=streamOptimized"),
        "vpc": qemu_img_create(d / "a.vhd", "vpc", "64M"),
        "vpc-fixed": qemu_img_create(d / "f.vhd", "vpc", "1M", "subformat=fixed"),
        "vhdx": qemu_img_create(d / "a.vhdx", "vhdx", "64M"),
        "vdi": qemu_img_create(d / "a.vdi", "vdi", "64M"),
        "qed": qemu_img_create(d / "a.qed", "qed", "64M"),
        "parallels": qemu_img_create(d / "a.hdd", "parallels", "64M"),
    }
    from oracle import run

    run("qemu-img", "snapshot", "-c", "s1", made["qcow2"])
    run("qemu-img", "bitmap", "--add", made["qcow2"], "b0")
    return {name: path.read_bytes() for name, path in made.items()}


@pytest.mark.parametrize("kind", ["qcow2", "vmdk-stream", "vpc", "vpc-fixed", "vhdx", "vdi", "qed", "parallels"])
def test_file_truncated_while_read(real_images, kind):
    """Whatever the cut, a result or a named error (mostly 'truncated')."""
    data = real_images[kind]
    for cut in sorted({0, 1, 100, 511, 4096, HEAD_SIZE - 1, HEAD_SIZE, len(data) // 2, len(data) - 512,
                       len(data) - 1}):
        try:
            probe(Shrinking(data, cut))
        except ProbeError as exc:
            assert exc.code != "plugin-error", (cut, exc)


@pytest.mark.parametrize("kind", ["qcow2", "vmdk-stream", "vpc", "vpc-fixed", "vhdx", "vdi"])
def test_file_growing_while_read(real_images, kind):
    """The size taken at the start holds: the probe gives the same answer."""
    data = real_images[kind]
    grown = probe(Growing(data, b"\xa5" * 1_000_000))
    assert (grown.format, grown.virtual_size) == (probe(data).format, probe(data).virtual_size)


def test_real_file_truncated_and_grown_between_open_and_read(tmp_path, real_images):
    path = tmp_path / "a.vhd"

    class Changing(PathSource):
        def __init__(self, path, change):
            super().__init__(path)
            self.change = change

        def read_at(self, offset, length):
            self.change()
            return super().read_at(offset, length)

    path.write_bytes(real_images["vpc-fixed"])
    with pytest.raises(TruncatedHeader):  # the footer at the end is gone
        probe(Changing(path, lambda: os.truncate(path, 4096)))
    path.write_bytes(real_images["vpc-fixed"])
    with open(path, "ab", buffering=0) as grow:
        assert probe(Changing(path, lambda: grow.write(bytes(4096)))).format == "vpc"


@pytest.mark.parametrize(
    "kind", ["missing", "fifo", "socket", "null", "dangling", "loop", "denied", "truncated-vpc", "truncated-vmdk"]
)
def test_cli_prints_one_line_for_an_unusable_source(tmp_path, kind, monkeypatch, capsys):
    """``info`` exits 1 with one line ``storprobe: PATH: reason``; so does
    ``check`` for a volume it cannot read, while a readable volume with a
    broken header is a verdict (exit 3, a ``malformed`` hazard)."""
    from storprobe.cli import main

    path = tmp_path / kind
    if kind in ("missing", "fifo", "socket", "dangling", "loop"):
        unusable_entry(path, kind)
    elif kind == "null":
        path = "/dev/null"
    elif kind == "denied":
        path.write_bytes(b"x")
        path.chmod(0)
        monkeypatch.setattr(os, "open", _refuse)
    elif kind == "truncated-vpc":
        path.write_bytes(b"conectix" + bytes(100))
    elif kind == "truncated-vmdk":
        path.write_bytes(b"KDMV")
    readable = kind.startswith("truncated")
    for command in ("info", "check"):
        assert main([command, str(path)]) == (3 if readable and command == "check" else 1)
        out, err = capsys.readouterr()
        if readable and command == "check":
            assert err == "" and out.splitlines()[1].startswith("malformed: ")
        else:
            assert out == ""
            assert len(err.splitlines()) == 1 and err.startswith(f"storprobe: {path}: "), err


def _refuse(*args, **kwargs):
    raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))
