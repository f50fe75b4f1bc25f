"""The storprobe command: output shapes, exit status, one-line errors."""

from __future__ import annotations

import json
import struct
import subprocess
import sys

import pytest

from storprobe.cli import main

from oracle import qemu_img_create, unusable_entry


def storprobe_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "storprobe", *args], capture_output=True, text=True)


def test_info_json(tmp_path):
    qemu_img_create(tmp_path / "a.qcow2", "qcow2", "1G")
    proc = storprobe_cli("info", "--output", "json", str(tmp_path / "a.qcow2"))
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert (out["format"], out["virtual-size"]) == ("qcow2", 1 << 30)


def test_info_human(tmp_path, capsys):
    qemu_img_create(tmp_path / "a.qcow2", "qcow2", "1G")
    assert main(["info", str(tmp_path / "a.qcow2")]) == 0
    out = capsys.readouterr().out
    assert "file format: qcow2" in out
    assert "virtual size: 1 GiB (1073741824 bytes)" in out


@pytest.mark.parametrize("kind", ["missing", "fifo", "truncated", "badversion"])
def test_unprobeable_volume_exits_1_with_one_line(tmp_path, kind):
    path = tmp_path / kind
    if kind in ("missing", "fifo"):
        unusable_entry(path, kind)
    elif kind == "truncated":
        path.write_bytes(b"QFI\xfb\0\0")
    elif kind == "badversion":
        path.write_bytes(b"QFI\xfb" + struct.pack(">I", 42) + bytes(100))
    proc = storprobe_cli("info", str(path))
    assert proc.returncode == 1
    assert proc.stdout == ""
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"storprobe: {path}: ")


def test_usage_errors_exit_2(tmp_path):
    assert storprobe_cli("info").returncode == 2
    assert storprobe_cli("info", "-f", "nonsense", str(tmp_path)).returncode == 2
    assert storprobe_cli("frobnicate").returncode == 2


def test_formats_lists_the_table():
    proc = storprobe_cli("formats", "--output", "json")
    rows = json.loads(proc.stdout)
    names = [r["name"] for r in rows]
    assert {"qcow2", "vmdk", "raw", "dir", "iso", "luks"} <= set(names)
    qcow2 = next(r for r in rows if r["name"] == "qcow2")
    assert (qcow2["magic"], qcow2["versions"], qcow2["plugin"]) == ("QFI\\xfb", [2, 3], "qcow2")
    human = storprobe_cli("formats").stdout
    assert "qcow2" in human and "QFI\\xfb" in human


def test_human_output_is_qemu_img_info_plus_our_section(tmp_path):
    """Everything qemu-img info prints, line for line, then storprobe's own facts."""
    from oracle import run

    base = qemu_img_create(tmp_path / "base.qcow2", "qcow2", "64M")
    run("qemu-img", "create", "-q", "-f", "qcow2", "-o", "lazy_refcounts=on", "-b", base.name, "-F", "qcow2",
        tmp_path / "top.qcow2")
    run("qemu-img", "snapshot", "-c", "first", tmp_path / "top.qcow2")
    run("qemu-img", "bitmap", "--add", tmp_path / "top.qcow2", "b0")
    theirs = run("qemu-img", "info", tmp_path / "top.qcow2").stdout.decode()
    proc = storprobe_cli("info", str(tmp_path / "top.qcow2"))
    ours, _, extra = proc.stdout.partition("storprobe:\n")
    assert ours == theirs
    assert "evidence: magic" in extra


def test_human_output_escapes_what_a_terminal_would_act_on(tmp_path):
    """Names come from the image: an escape sequence in a backing or snapshot
    name could rewrite the operator's screen or clipboard, a newline forge a
    line. qemu-img prints them raw; we show them escaped."""
    from oracle import run

    image = qemu_img_create(tmp_path / "hostile.qcow2", "qcow2", "1M")
    run("qemu-img", "snapshot", "-c", "snap\x1b[2J", image)
    run("qemu-img", "rebase", "-u", "-b", "/x\x1b]52;c;SGk=\x07\nforged: line\u202e", "-F", "raw", image)
    out = storprobe_cli("info", str(image)).stdout
    assert "backing file: /x\\x1b]52;c;SGk=\\x07\\nforged: line\\u202e\n" in out
    assert "\n1         snap\\x1b[2J " in out
    assert not any(ch in out for ch in "\x1b\x07\u202e")
    assert not any(line.startswith("forged") for line in out.splitlines())


def test_version_is_the_installed_distributions():
    from importlib.metadata import version

    import storprobe

    assert storprobe.__version__ == version("storprobe")
    proc = storprobe_cli("--version")
    assert (proc.stdout, proc.stderr, proc.returncode) == (f"storprobe {version('storprobe')}\n", "", 0)


def test_a_dirty_qcow2_is_not_cleanly_shut_down_as_qemu_img_says(tmp_path):
    """The dirty bit (incompatible feature bit 0, set while a lazy_refcounts
    image is open for writing) is the one line of qemu-img info's that ours lacked."""
    from oracle import patched, run

    clean = qemu_img_create(tmp_path / "clean.qcow2", "qcow2", "64M", "lazy_refcounts=on")
    dirty = patched(clean, tmp_path / "dirty.qcow2", (72, "Q", 1), endian=">")
    theirs = run("qemu-img", "info", "-U", dirty).stdout.decode()
    assert "cleanly shut down: no\n" in theirs
    ours, _, _ = storprobe_cli("info", str(dirty)).stdout.partition("storprobe:\n")
    assert ours == theirs
    assert "cleanly shut down" not in storprobe_cli("info", str(clean)).stdout


def test_our_section_has_no_empty_headings(tmp_path):
    """A fact with nothing under it (no features, no other signature) is left out, not a bare ``features:``."""
    qemu_img_create(tmp_path / "a.qcow2", "qcow2", "1M")
    (tmp_path / "zeros.img").write_bytes(bytes(4096))
    for name in ("a.qcow2", "zeros.img"):
        _, _, ours = storprobe_cli("info", str(tmp_path / name)).stdout.partition("storprobe:\n")
        lines = ours.splitlines()
        indent = [len(line) - len(line.lstrip()) for line in lines] + [0]
        headings = [i for i, line in enumerate(lines) if line.endswith(":")]
        assert all(indent[i + 1] > indent[i] for i in headings), ours
    assert "    features:\n" not in storprobe_cli("info", str(tmp_path / "a.qcow2")).stdout
