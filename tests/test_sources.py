"""What the core does with every kind of volume and source, whatever its bytes."""

from __future__ import annotations

import io
import os
import socket
import errno
import struct

import pytest

from storprobe import BytesSource, FileSource, ProbeError, SourceError, probe
from storprobe.errors import ReadLimitExceeded, TruncatedHeader, UnsupportedVersion
from storprobe.source import HEAD_SIZE, READ_BUDGET, Image

from oracle import qemu_img_create


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
