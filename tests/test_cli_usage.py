"""The command line a qemu-img or virsh user expects: usage errors that show
the command's own usage, help for every argument with its default, options
that accumulate, names checked against the format table, qemu-img's sizes,
and no option silently ignored."""

from __future__ import annotations

import json
import struct
import subprocess
import sys

import pytest

from storprobe import format_table
from storprobe.chain import DEFAULT_MAX_DEPTH
from storprobe.cli import _parser
from storprobe.safety import DEFAULT_MAX_VIRTUAL_SIZE

from oracle import qemu_img_create, run


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "storprobe", *args], capture_output=True, text=True)


def usage_error(proc: subprocess.CompletedProcess, command: str, message: str) -> None:
    """Status 2, the command's usage, then its one-line error."""
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.startswith(f"usage: storprobe {command} "), proc.stderr
    assert proc.stderr.endswith(f"storprobe {command}: error: {message}\n"), proc.stderr


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    return qemu_img_create(tmp_path_factory.mktemp("usage") / "a.qcow2", "qcow2", "1G")


def test_an_unknown_option_shows_the_commands_usage(image):
    """qemu-img's -U (force share) means nothing here: the error shows info's usage, not the top level's."""
    usage_error(cli("info", "-U", str(image)), "info", "unrecognized arguments: -U")
    usage_error(cli("scan", "--frob", str(image.parent)), "scan", "unrecognized arguments: --frob")


def test_help_describes_every_argument_and_shows_the_defaults():
    from storprobe.sizes import size_to_str

    parser = _parser()
    for name, command in parser.commands.items():
        for action in command._actions:
            assert action.help, f"{name} {action.option_strings or action.dest} has no help"
    info = parser.commands["info"].format_help()
    assert f"(default: {DEFAULT_MAX_DEPTH}, libvirt's)" in " ".join(info.split())
    assert "(default: human)" in info
    check = " ".join(parser.commands["check"].format_help().split())
    assert f"default: {size_to_str(DEFAULT_MAX_VIRTUAL_SIZE)})" in check
    assert "documents to validate ('-': standard input)" in parser.commands["validate"].format_help()
    assert "the directory (a dir pool's target path)" in parser.commands["scan"].format_help()


def test_check_allow_accumulates_and_takes_comma_lists(image):
    both = cli("check", "--allow", "qcow2", "--allow", "raw", str(image))
    assert (both.returncode, both.stdout) == (0, f"{image}: safe (qcow2)\n")
    other = cli("check", "--allow", "raw", "--allow", "vmdk,qed", str(image))
    assert other.returncode == 3
    assert "format: format qcow2 is not allowed (allowed: qed, raw, vmdk)\n" in other.stdout


@pytest.mark.parametrize("args", [
    ("check", "--allow", "bogus"), ("check", "--allow", "qcow2,bogus"),
    ("check", "-f", "bogus"), ("info", "-f", "bogus"),
])
def test_an_unknown_format_name_is_a_usage_error_listing_the_known_ones(image, args):
    known = ", ".join(sorted(format_table().names()))
    option = "--allow" if "--allow" in args else "-f/--format"
    usage_error(cli(*args, str(image)), args[0], f"argument {option}: unknown format 'bogus' (known: {known})")


def test_an_empty_allow_list_is_a_usage_error(image):
    usage_error(cli("check", "--allow", ",", str(image)), "check", "argument --allow: no format named")


def qemu_img_size_text(size: str, tmp_path) -> str:
    """How qemu-img shows a virtual size given to it as ``size``: ``0.999 GiB (1072693248 bytes)``."""
    path = qemu_img_create(tmp_path / f"sized-{size}.qcow2", "qcow2", size)
    lines = run("qemu-img", "info", path).stdout.decode().splitlines()
    line = next(text for text in lines if text.startswith("virtual size: "))
    return line.removeprefix("virtual size: ")


@pytest.mark.parametrize("size, safe", [
    ("1G", True), ("1023M", False), ("1.5G", True), ("0.75g", False), ("1073741824", True),
])
def test_max_size_takes_qemu_img_sizes(image, tmp_path, size, safe):
    proc = cli("check", "--max-size", size, str(image))
    assert proc.returncode == (0 if safe else 3), proc.stderr
    if not safe:
        ours, limit = qemu_img_size_text("1G", tmp_path), qemu_img_size_text(size, tmp_path)
        assert f"size: virtual size {ours} exceeds the limit of {limit}\n" in proc.stdout


@pytest.mark.parametrize("size, reason", [
    ("-1", "a size cannot be negative"),
    ("-0", "a size cannot be negative"),
    ("1.5", "a fraction of a byte is not a size: give a suffix k, M, G, T, P or E"),
    ("1KiB", "not a size: use a number of bytes, or one with a suffix k, M, G, T, P or E"),
    ("8E", "larger than 9223372036854775807 bytes"),
])
def test_max_size_refuses_what_qemu_img_refuses(image, size, reason):
    usage_error(cli("check", "--max-size", size, str(image)), "check", f"argument --max-size: {size!r}: {reason}")


def test_the_size_hazard_reads_as_qemu_img_writes_sizes(tmp_path):
    big = qemu_img_create(tmp_path / "big.qcow2", "qcow2", "100T")
    proc = cli("check", str(big))
    assert proc.returncode == 3
    shown = qemu_img_size_text("100T", tmp_path)
    assert shown == "100 TiB (109951162777600 bytes)"
    limit = "64 TiB (70368744177664 bytes)"
    assert proc.stdout.splitlines()[1] == f"size: virtual size {shown} exceeds the limit of {limit}"


@pytest.mark.parametrize("args, command, message", [
    (("info", "--allow-probe"), "info", "--allow-probe applies only with --backing-chain"),
    (("info", "--max-depth", "3"), "info", "--max-depth applies only with --backing-chain"),
    (("info", "--backing-chain", "--max-depth", "0"), "info", "argument --max-depth: must be at least 1, not 0"),
    (("info", "--backing-chain", "--max-depth", "-1"), "info", "argument --max-depth: must be at least 1, not -1"),
    (("scan", "--jsonl", "--output", "xml"), "scan", "--jsonl is a JSON shape; it does not apply to --output xml"),
])
def test_an_option_that_would_do_nothing_is_a_usage_error(image, args, command, message):
    target = image.parent if command == "scan" else image
    usage_error(cli(*args, str(target)), command, message)


def test_a_format_that_cannot_be_that_kind_of_file_is_an_error(image, tmp_path):
    """``-f dir`` on a file, ``-f raw`` on a directory: named errors, not reports."""
    as_dir = cli("info", "-f", "dir", str(image))
    assert (as_dir.returncode, as_dir.stdout) == (1, "")
    assert as_dir.stderr == f"storprobe: {image}: a file cannot be a dir volume\n"
    as_raw = cli("info", "-f", "raw", str(tmp_path))
    assert (as_raw.returncode, as_raw.stdout) == (1, "")
    assert as_raw.stderr == f"storprobe: {tmp_path}: a directory cannot be a raw volume\n"
    assert cli("info", "-f", "dir", str(tmp_path)).returncode == 0


def test_a_missing_signature_reads_as_english(tmp_path):
    path = tmp_path / "not.iso"
    path.write_bytes(bytes(64 * 1024))
    proc = cli("info", "-f", "iso", str(path))
    assert proc.stderr == f"storprobe: {path}: not an iso image (its signature is missing)\n"
    proc = cli("info", "-f", "vmdk", str(path))
    assert proc.stderr == f"storprobe: {path}: not a vmdk image (its signature is missing)\n"


def test_the_unfollowed_probed_backing_names_the_option(tmp_path):
    """A qed overlay records no backing format, so its backing is probed; one
    that has a backing file itself stops the walk, and the error names the
    command line's option."""
    qemu_img_create(tmp_path / "base.qcow2", "qcow2", "1M")
    run("qemu-img", "create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", tmp_path / "mid.qcow2")
    run("qemu-img", "create", "-q", "-f", "qed", "-b", "mid.qcow2", "-F", "qcow2", tmp_path / "top.qed")
    proc = cli("info", "--backing-chain", str(tmp_path / "top.qed"))
    assert proc.returncode == 1
    assert proc.stderr.endswith("(base.qcow2); pass --allow-probe to follow it\n"), proc.stderr
    assert "allow_probe" not in proc.stderr
    followed = cli("info", "--backing-chain", "--allow-probe", str(tmp_path / "top.qed"))
    assert followed.returncode == 0 and followed.stdout.count("image: ") == 3


def test_a_chain_that_stops_at_a_network_backing_says_so(tmp_path):
    top = tmp_path / "net.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", "-u", "-b", "nbd://example.com:10809/disk", "-F", "raw", top, "1G")
    stop = "backing chain stops at nbd://example.com:10809/disk (network): only local files are followed"
    human = cli("info", "--backing-chain", str(top))
    assert (human.returncode, human.stderr) == (0, "")
    assert human.stdout.endswith(f"\n\n{stop}\n")
    shaped = json.loads(cli("info", "--backing-chain", "--output", "json", str(top)).stdout)
    assert shaped[-1]["storprobe"]["chain-stops"] == {"code": "backing.not-followed", "message": stop}
    assert "chain-stops" not in json.loads(cli("info", "--output", "json", str(top)).stdout)["storprobe"]


def test_a_local_chain_ends_without_a_stop_line(tmp_path):
    base = qemu_img_create(tmp_path / "base.qcow2", "qcow2", "1M")
    run("qemu-img", "create", "-q", "-f", "qcow2", "-b", base.name, "-F", "qcow2", tmp_path / "top.qcow2")
    proc = cli("info", "--backing-chain", str(tmp_path / "top.qcow2"))
    assert proc.returncode == 0 and "chain stops" not in proc.stdout


def test_qcow2_version_4_is_an_unsupported_qcow2_version(image, tmp_path):
    """qcow and qcow2 share their magic; QEMU's probes tell them apart by
    version (1; 2 and up), and qemu-img calls version 4 an unsupported qcow2 version."""
    data = bytearray(image.read_bytes())
    for version, named in ((4, "qcow2 version 4 (known: 2, 3)"), (0, "qcow version 0 (known: 1)")):
        struct.pack_into(">I", data, 4, version)
        path = tmp_path / f"v{version}.qcow2"
        path.write_bytes(data)
        assert cli("info", str(path)).stderr == f"storprobe: {path}: unsupported {named}\n"
    theirs = subprocess.run(["qemu-img", "info", str(tmp_path / "v4.qcow2")], capture_output=True, text=True)
    assert "Unsupported qcow2 version 4" in theirs.stderr
