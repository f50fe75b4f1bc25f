"""Real tools as oracles: make images with qemu-img and friends, read qemu-img's answer."""

from __future__ import annotations

import json
import os
import shutil
import socket
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from storprobe import ImageInfo, ProbeError, probe
from storprobe.datapath import open_image
from storprobe.qemu_json import EXTRA_KEY, to_qemu_json
from storprobe.safety import check
from storprobe.source import READ_BUDGET


def require(tool: str) -> str:
    """The path of ``tool``, looked for first beside the running interpreter (the
    virtual environment's ``storprobe``, which is not on ``PATH`` unless it is
    activated); skip the test, saying why, when it is not installed."""
    beside = os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", os.defpath)])
    path = shutil.which(tool, path=beside) or shutil.which(tool, path="/usr/sbin:/sbin")
    if path is None:
        pytest.skip(f"{tool} is not installed (.ci/run installs it)")
    return path


#: qemu-img's complaint when its key-derivation benchmark saw no CPU time pass
#: (a kernel whose per-thread CPU clock ticks coarsely: most tries on some
#: machines); a fact of the machine, not of the image, so ``run`` tries again.
_COARSE_CPU_CLOCK = b"Unable to get accurate CPU usage"


def run(*args: str | Path, input: bytes | None = None) -> subprocess.CompletedProcess:
    """Run a tool, failing the test with its stderr when it fails."""
    cmd = [str(a) for a in args]
    cmd[0] = require(cmd[0])
    for _ in range(50):
        proc = subprocess.run(cmd, capture_output=True, input=input)
        if proc.returncode == 0 or _COARSE_CPU_CLOCK not in proc.stderr:
            break
    if proc.returncode != 0:
        pytest.fail(f"{' '.join(cmd)} failed: {proc.stderr.decode(errors='replace')}")
    return proc


def qemu_img_create(path: Path, fmt: str, size: str = "64M", *options: str) -> Path:
    """``qemu-img create -f fmt [-o opt ...] path size``."""
    args: list[str] = ["qemu-img", "create", "-q", "-f", fmt]
    for opt in options:
        args += ["-o", opt]
    run(*args, path, size)
    return path


def qemu_info(path: Path, fmt: str | None = None) -> dict[str, Any]:
    """What ``qemu-img info --output=json`` says of ``path``."""
    args = ["qemu-img", "info", "--output=json", "-U"]
    if fmt:
        args += ["-f", fmt]
    return json.loads(run(*args, path).stdout)


def ours(path: Path, fmt: str | None = None) -> dict[str, Any]:
    """Our qemu-img-shaped JSON for ``path``, without our extra key."""
    out = to_qemu_json(probe(path, format=fmt))
    out.pop(EXTRA_KEY)
    return out


def patched(
    src: Path, dst: Path, *edits: tuple[int, str, int | bytes], endian: str = "<", append: bytes = b""
) -> Path:
    """A copy of ``src`` at ``dst`` with fields ``(offset, struct code, value)``
    rewritten in ``endian`` byte order, and ``append`` added at the end."""
    data = bytearray(src.read_bytes())
    for offset, code, value in edits:
        struct.pack_into(endian + code, data, offset, value)
    dst.write_bytes(bytes(data) + append)
    return dst


class CountingSource:
    """A volume in memory: ``data`` then zeros up to ``size`` bytes, counting
    the read calls and the bytes read."""

    file_type = "file"
    stat = None

    def __init__(self, data: bytes, size: int | None = None, name: str = "<counting>") -> None:
        self.data, self._size, self.name = data, len(data) if size is None else size, name
        self.bytes_read = self.reads = 0

    def size(self) -> int:
        return self._size

    def read_at(self, offset: int, length: int) -> bytes:
        length = max(0, min(length, self._size - offset))
        self.reads += 1
        self.bytes_read += length
        chunk = self.data[offset : offset + length]
        return chunk + bytes(length - len(chunk))

    def close(self) -> None:
        """Nothing to release."""


def unusable_entry(path: Path, kind: str) -> Path:
    """``path`` made into a directory entry no volume can be read from:
    ``missing``, ``fifo``, ``socket``, ``dangling`` (link to nothing) or
    ``loop`` (link to itself)."""
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "socket":
        with socket.socket(socket.AF_UNIX) as sock:
            sock.bind(str(path))  # the socket file stays when the socket closes
    elif kind == "dangling":
        path.symlink_to("nowhere")
    elif kind == "loop":
        path.symlink_to(path.name)
    elif kind != "missing":
        raise ValueError(f"no such unusable entry: {kind}")
    return path


def qemu_img_error(path: Path, fmt: str | None = None) -> str | None:
    """What ``qemu-img info`` says when it refuses ``path`` (its stderr), None when it opens it."""
    args: list[str | Path] = [require("qemu-img"), "info", "--output=json", "-U"]
    if fmt:
        args += ["-f", fmt]
    proc = subprocess.run([*args, path], capture_output=True, text=True, errors="replace", check=False)
    return proc.stderr if proc.returncode != 0 else None


def qemu_refuses(path: Path, fmt: str | None = None) -> str:
    """``qemu-img info`` must refuse ``path``: its error message."""
    error = qemu_img_error(path, fmt)
    assert error is not None, f"qemu-img accepted {path}"
    return error


def assert_same_as_qemu(path: Path, fmt: str | None = None, *, ignore: tuple[str, ...] = ()) -> dict:
    """Differential check: our JSON equals qemu-img's, key by key and in its key
    order (minus ``ignore``), so the text is the same too."""
    theirs = qemu_info(path, fmt)
    mine = ours(path, fmt)
    for key in ignore:
        theirs.pop(key, None)
        mine.pop(key, None)
    assert mine == theirs
    assert json.dumps(mine, indent=4) == json.dumps(theirs, indent=4)
    return mine


def qemu_chain_info(path: Path) -> list[dict[str, Any]]:
    """What ``qemu-img info --backing-chain --output=json`` says of ``path``."""
    return json.loads(run("qemu-img", "info", "--backing-chain", "--output=json", "-U", path).stdout)


def rebase_unsafe(image: Path, backing: str, fmt: str | None = None) -> None:
    """Rewrite an image's backing name without any check (loops, missing files)."""
    args: list[str | Path] = ["qemu-img", "rebase", "-u", "-b", backing]
    if fmt:
        args += ["-F", fmt]
    run(*args, image)


def qemu_io(path: Path, *commands: str, fmt: str | None = None) -> None:
    """Run ``qemu-io -c COMMAND ...`` on ``path``: guest writes (``write -P``,
    ``write -z``, ``write -zu``, ``write -c`` compressed), ``discard``."""
    args: list[str | Path] = ["qemu-io"]
    if fmt:
        args += ["-f", fmt]
    for command in commands:
        args += ["-c", command]
    proc = run(*args, path)
    said = (proc.stdout + proc.stderr).lower()
    assert b"error" not in said and b"failed" not in said, said


def qemu_map(path: Path, fmt: str | None = None, *, output: str = "json") -> subprocess.CompletedProcess:
    """``qemu-img map --output=OUTPUT path``, however it ends (its status, stdout and stderr)."""
    args = [require("qemu-img"), "map", f"--output={output}"] + (["-f", fmt] if fmt else [])
    return subprocess.run([*args, str(path)], capture_output=True, check=False)


def qemu_guest_bytes(path: Path, tmp: Path, fmt: str | None = None) -> bytes:
    """The guest disk of ``path``, as ``qemu-img convert -O raw`` writes it."""
    out = tmp / f"{path.name}.converted.raw"
    run("qemu-img", "convert", "-O", "raw", *(["-f", fmt] if fmt else []), path, out)
    data = out.read_bytes()
    out.unlink()
    return data


def reads_as_qemu(image: Path, tmp: Path, case: object) -> bool:
    """Whether ``open_image`` reads ``image``, asserting that QEMU agrees: both
    read it (the same bytes as ``qemu-img convert -O raw``), or both refuse."""
    raw = tmp / f"{image.name}.converted.raw"
    converted = subprocess.run([require("qemu-img"), "convert", "-O", "raw", str(image), str(raw)],
                               capture_output=True, check=False)
    try:
        with open_image(image) as disk:
            mine = disk.read()
    except ProbeError as exc:
        assert converted.returncode != 0, f"case {case}: we refuse ({exc.code}), QEMU reads"
        return False
    assert converted.returncode == 0, f"case {case}: QEMU fails to read, we read"
    assert mine == raw.read_bytes(), f"case {case}"
    raw.unlink()
    return True


class LibvirtPool:
    """A transient libvirt dir pool over a directory; skips when libvirt is absent.
    Its name is ``name`` and this process's id: libvirtd is one for the whole
    machine, shared by parallel test workers and by other runs."""

    URI = "qemu:///system"

    def __init__(self, directory: Path, name: str) -> None:
        require("virsh")
        self.directory, self.name = directory, f"{name}-{os.getpid()}"
        # ``virsh uri`` needs the connection and nothing else (``virsh version``
        # asks libvirtd to probe the hypervisor: about 4 s here, per call).
        probe_conn = subprocess.run(["virsh", "-c", self.URI, "uri"], capture_output=True)
        if probe_conn.returncode != 0:
            pytest.skip("libvirtd is not running (.ci/run starts it with 'libvirtd -d')")
        self._virsh("pool-create-as", self.name, "dir", "--target", str(directory))

    def _virsh(self, *args: str) -> str:
        proc = subprocess.run(["virsh", "-c", self.URI, *args], capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"virsh {' '.join(args)}: {proc.stderr.strip()}")
        return proc.stdout

    def refresh(self) -> None:
        self._virsh("pool-refresh", self.name)

    def dumpxml(self, volume: str) -> str:
        return self._virsh("vol-dumpxml", "--pool", self.name, volume)

    def volumes(self) -> list[str]:
        return sorted(line.split()[0] for line in self._virsh("vol-list", self.name).splitlines()[2:] if line.strip())

    def destroy(self) -> None:
        subprocess.run(["virsh", "-c", self.URI, "pool-destroy", self.name], capture_output=True)


def canonical_xml(element) -> tuple:
    """An lxml element as nested tuples (tag, attributes, stripped text, children),
    child order kept; ``atime`` left out, since reading a file may update it
    between two tools' looks."""
    children = tuple(canonical_xml(c) for c in element if c.tag != "atime")
    return (element.tag, tuple(sorted(element.attrib.items())), (element.text or "").strip(), children)


def probe_or_named_error(data, *formats: str | None) -> None:
    """Probe ``data`` (bytes or a ByteSource), detected or as each of
    ``formats``: a result that renders, or one of our named errors, never a
    plugin defect."""
    for fmt in formats or (None,):
        try:
            info = probe(data, format=fmt)
        except ProbeError as exc:
            assert exc.code != "plugin-error", exc
        else:
            renders(info)


def probe_and_check(data: bytes) -> str:
    """The probe's format or error code, after checking it read within budget
    and that ``check`` gives a verdict too; never a plugin defect."""
    source = CountingSource(data)
    try:
        info = probe(source)
    except ProbeError as exc:
        outcome = exc.code
    else:
        outcome = info.format
        renders(info)
    assert outcome != "plugin-error"
    assert source.bytes_read <= READ_BUDGET
    verdict = check(data)
    assert all("(plugin-error)" not in hazard.message for hazard in verdict.hazards), verdict.hazards
    return outcome


def renders(info: ImageInfo) -> None:
    """``info`` renders as qemu-img's JSON, as text, as volume XML that our
    schema accepts (or a named error: a name XML cannot carry, a backing name
    that does not parse), and as a scan entry, which never fails."""
    from storprobe.human import render
    from storprobe.jsontext import indented
    from storprobe.scan import ScanRecord
    from storprobe.validate import schema_errors
    from storprobe.volume_xml import scan_document_parts, scan_entry, to_volume_xml

    indented(to_qemu_json(info))
    render(info)
    try:
        xml = to_volume_xml(info)
    except ProbeError as exc:
        assert exc.code in ("xml.unrepresentable", "backing.name"), exc
    else:
        assert schema_errors(xml.encode()) == []
    entry = scan_entry(ScanRecord(info.filename, info))
    assert schema_errors("".join(scan_document_parts([entry])).encode()) == []


def libvirt_volumes(directory: Path, tag: str) -> dict[str, tuple[str, int]]:
    """libvirt's (format, capacity) of every file in ``directory``, from a transient dir pool."""
    from xml.etree import ElementTree

    pool = LibvirtPool(directory, f"storprobe-{tag}")
    try:
        volumes = {name: ElementTree.fromstring(pool.dumpxml(name)) for name in pool.volumes()}
    finally:
        pool.destroy()
    return {
        name: (vol.find("target/format").get("type"), int(vol.findtext("capacity"))) for name, vol in volumes.items()
    }


def code_of(target) -> str:
    """The code of the named error probing ``target`` (a path or bytes) must raise."""
    with pytest.raises(ProbeError) as exc:
        probe(target)
    return exc.value.code
