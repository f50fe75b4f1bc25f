"""storprobe check: every hazard on a real or hand-built image, no false alarm
on any legitimate one, and the command's exit status and output shapes.

Images come from qemu-img, xorriso, sfdisk and mkfs.fat; what those tools
cannot make (foreign VMDK extents, unknown qcow2 feature bits, polyglots,
differencing VHD/VHDX) is hand-built from their output with struct.pack.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from storprobe import SourceError, UnknownFormat
from storprobe.safety import DEFAULT_MAX_VIRTUAL_SIZE, Policy, Verdict, check

from oracle import qemu_img_create, qemu_img_error, qemu_info, rebase_unsafe, run, unusable_entry

SECRET = ("--object", "secret,id=sec0,data=123456")
QCOW2_INCOMPATIBLE = 72  # offset of the v3 incompatible feature bits


def checks(verdict: Verdict) -> list[str]:
    return [hazard.check for hazard in verdict.hazards]


def assert_safe(path: Path, fmt: str | None = None) -> Verdict:
    verdict = check(path, format=fmt)
    assert verdict.hazards == (), verdict.hazards
    assert verdict.safe and verdict.info is not None
    return verdict


def storprobe(*args: str | Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "storprobe", *map(str, args)], check=False, capture_output=True, text=True
    )


def qemu_img(*args: str | Path) -> None:
    run("qemu-img", *args)


def xorriso(path: Path, tmp_path: Path, *options: str | Path) -> Path:
    tree = tmp_path / "tree"
    (tree / "boot").mkdir(parents=True, exist_ok=True)
    (tree / "hello.txt").write_text("hello\n")
    (tree / "boot" / "boot.img").write_bytes(bytes(range(256)) * 8)
    run("xorriso", "-as", "mkisofs", "-quiet", "-o", path, *options, tree)
    return path


def isohybrid(path: Path, tmp_path: Path, *extra: str) -> Path:
    """An isohybrid ISO (El Torito plus an MBR for USB sticks; the boot code,
    syslinux's isohdpfx.bin in real life, does not matter here)."""
    template = tmp_path / "isohdpfx.bin"
    template.write_bytes(bytes(432))
    return xorriso(path, tmp_path, "-isohybrid-mbr", template, "-b", "boot/boot.img", "-no-emul-boot", *extra)


def partitioned_raw(path: Path, label: str = "dos", size: int = 8 << 20) -> Path:
    path.write_bytes(bytes(size))
    run("sfdisk", "-q", path, input=f"label: {label}\n,4MiB\n,\n".encode())
    return path


def patched(path: Path, *changes: tuple[int, bytes]) -> Path:
    data = bytearray(path.read_bytes())
    for offset, value in changes:
        data[offset : offset + len(value)] = value
    path.write_bytes(bytes(data))
    return path


def set_incompatible_bits(path: Path, bits: int) -> Path:
    data = bytearray(path.read_bytes())
    (current,) = struct.unpack_from(">Q", data, QCOW2_INCOMPATIBLE)
    struct.pack_into(">Q", data, QCOW2_INCOMPATIBLE, current | bits)
    path.write_bytes(bytes(data))
    return path


VMDK_DESCRIPTOR = """\
# Disk DescriptorFile
version=1
CID=12345678
parentCID=ffffffff
createType="{create_type}"

# Extent description
{extents}

# The Disk Data Base
ddb.virtualHWVersion = "4"
ddb.adapterType = "ide"
"""


def vmdk_descriptor(path: Path, *extents: str, create_type: str = "monolithicFlat") -> Path:
    path.write_text(VMDK_DESCRIPTOR.format(create_type=create_type, extents="\n".join(extents)))
    return path


def embedded_descriptor_names(path: Path, line: str) -> Path:
    """A monolithicSparse file whose embedded descriptor (sector 1) has ``line``
    as its extent line instead of the one naming the file itself."""
    data = bytearray(path.read_bytes())
    end = data.index(b"\0", 512)
    text = data[512:end].decode()
    own = next(x for x in text.splitlines() if x.startswith("RW "))
    new = text.replace(own, line).encode()
    assert len(new) < 20 * 512
    data[512 : 512 + max(len(new), end - 512)] = new.ljust(end - 512, b"\0")
    path.write_bytes(bytes(data))
    return path


# ---- no false alarm ----------------------------------------------------------


def _qcow2(*options: str):
    def make(path: Path, tmp_path: Path) -> Path:
        return qemu_img_create(path.with_suffix(".qcow2"), "qcow2", "64M", *options)

    return make


def _qcow2_with_bitmaps_and_snapshots(path: Path, tmp_path: Path) -> Path:
    path = qemu_img_create(path.with_suffix(".qcow2"), "qcow2", "64M")
    qemu_img("bitmap", "--add", path, "b0")
    qemu_img("bitmap", "--add", "--disable", path, "b1")
    qemu_img("snapshot", "-c", "first", path)
    qemu_img("snapshot", "-c", "second", path)
    return path


_ENCRYPTED: dict[str, bytes] = {}  # qemu-img spends seconds on its PBKDF benchmark: make each kind once


def _encrypted(path: Path, fmt: str, *options: str) -> Path:
    if fmt not in _ENCRYPTED:
        qemu_img("create", "-q", "-f", fmt, *SECRET, *options, path, "16M")
        _ENCRYPTED[fmt] = path.read_bytes()
    path.write_bytes(_ENCRYPTED[fmt])
    return path


def _qcow2_luks(path: Path, tmp_path: Path) -> Path:
    return _encrypted(path.with_suffix(".qcow2"), "qcow2", "-o", "encrypt.format=luks,encrypt.key-secret=sec0",
                      "-o", "encrypt.iter-time=10")


def _luks(path: Path, tmp_path: Path) -> Path:
    return _encrypted(path.with_suffix(".luks"), "luks", "-o", "key-secret=sec0,iter-time=10")


def _vmdk(subformat: str):
    def make(path: Path, tmp_path: Path) -> Path:
        return qemu_img_create(path.with_suffix(".vmdk"), "vmdk", "64M", f"subformat={subformat}")

    return make


def _vmdk_renamed(path: Path, tmp_path: Path) -> Path:
    """An upload stored under another name: the embedded descriptor still names
    the old file, which is the same file (QEMU opens nothing else)."""
    made = qemu_img_create(path.with_suffix(".vmdk"), "vmdk", "64M")
    return made.rename(tmp_path / "upload-0001")


def _qemu_img(fmt: str, *options: str):
    def make(path: Path, tmp_path: Path) -> Path:
        return qemu_img_create(path.with_suffix("." + fmt), fmt, "64M", *options)

    return make


def _raw(path: Path, tmp_path: Path) -> Path:
    return qemu_img_create(path.with_suffix(".raw"), "raw", "64M")


def _raw_mbr(path: Path, tmp_path: Path) -> Path:
    return partitioned_raw(path.with_suffix(".img"))


def _raw_gpt(path: Path, tmp_path: Path) -> Path:
    return partitioned_raw(path.with_suffix(".img"), "gpt")


def _raw_fat(path: Path, tmp_path: Path) -> Path:
    path = path.with_suffix(".img")
    path.write_bytes(bytes(8 << 20))
    run("mkfs.fat", path)
    return path


def _iso(path: Path, tmp_path: Path) -> Path:
    return xorriso(path.with_suffix(".iso"), tmp_path)


def _iso_hybrid(path: Path, tmp_path: Path) -> Path:
    return isohybrid(path.with_suffix(".iso"), tmp_path)


def _iso_hybrid_efi(path: Path, tmp_path: Path) -> Path:
    return isohybrid(path.with_suffix(".iso"), tmp_path, "-eltorito-alt-boot", "-e", "boot/boot.img",
                     "-no-emul-boot", "-isohybrid-gpt-basdat")


def _vpc_fixed_partitioned(path: Path, tmp_path: Path) -> Path:
    """A fixed VHD is the guest's disk plus a footer: its first sector is the
    guest's MBR, legitimately."""
    raw = partitioned_raw(tmp_path / "guest.img")
    qemu_img("convert", "-O", "vpc", "-o", "subformat=fixed,force_size=on", raw, path.with_suffix(".vhd"))
    return path.with_suffix(".vhd")


def _dmg_partitioned(path: Path, tmp_path: Path) -> Path:
    """A DMG's data fork is the guest's disk, MBR and all; its header is the trailer."""
    from builders import build_dmg

    path = path.with_suffix(".dmg")
    path.write_bytes(build_dmg(partitioned_raw(tmp_path / "guest.img").read_bytes()))
    return path


def _bochs(path: Path, tmp_path: Path) -> Path:
    path = path.with_suffix(".bochs")
    run("bximage", "-q", "-func=create", "-hd=10M", "-imgmode=growing", path)
    return path


LEGITIMATE = {
    "qcow2-v2": _qcow2("compat=0.10"),
    "qcow2-v3": _qcow2(),
    "qcow2-lazy-refcounts": _qcow2("lazy_refcounts=on"),
    "qcow2-extended-l2": _qcow2("extended_l2=on", "cluster_size=128k"),
    "qcow2-zstd": _qcow2("compression_type=zstd"),
    "qcow2-refcount-bits-64": _qcow2("refcount_bits=64"),
    "qcow2-bitmaps-snapshots": _qcow2_with_bitmaps_and_snapshots,
    "qcow2-luks": _qcow2_luks,
    "raw": _raw,
    "raw-mbr": _raw_mbr,
    "raw-gpt": _raw_gpt,
    "raw-fat": _raw_fat,
    "iso": _iso,
    "iso-isohybrid": _iso_hybrid,
    "iso-isohybrid-efi": _iso_hybrid_efi,
    "vpc-dynamic": _qemu_img("vpc"),
    "vpc-fixed": _qemu_img("vpc", "subformat=fixed"),
    "vpc-fixed-partitioned": _vpc_fixed_partitioned,
    "vhdx": _qemu_img("vhdx"),
    "vhdx-fixed": _qemu_img("vhdx", "subformat=fixed"),
    "vdi": _qemu_img("vdi"),
    "vdi-static": _qemu_img("vdi", "static=on"),
    "vmdk-monolithic-sparse": _vmdk("monolithicSparse"),
    "vmdk-stream-optimized": _vmdk("streamOptimized"),
    "vmdk-renamed": _vmdk_renamed,
    "luks": _luks,
    "qed": _qemu_img("qed"),
    "qcow": _qemu_img("qcow"),
    "parallels": _qemu_img("parallels"),
    "dmg-partitioned": _dmg_partitioned,
    "bochs": _bochs,
}


@pytest.mark.parametrize("make", LEGITIMATE.values(), ids=LEGITIMATE.keys())
def test_no_false_alarm(tmp_path, make):
    path = make(tmp_path / "image", tmp_path)
    verdict = assert_safe(path)
    assert assert_safe(path, verdict.info.format).info.format == verdict.info.format  # and when declared


@pytest.mark.parametrize("make", [_raw_mbr, _raw_gpt, _raw_fat, _iso, _iso_hybrid, _vpc_fixed_partitioned],
                         ids=["mbr", "gpt", "fat", "iso", "isohybrid", "vpc-fixed"])
def test_declared_raw_is_safe_when_its_first_sector_is_the_guests(tmp_path, make):
    """An ISO, a fixed VHD or a partitioned disk declared raw: their signatures
    (if any) lie past the first sector, where hypervisors read them as raw."""
    assert_safe(make(tmp_path / "image", tmp_path), "raw")


def test_encryption_is_a_fact_not_a_hazard(tmp_path):
    for make in (_luks, _qcow2_luks):
        verdict = assert_safe(make(tmp_path / "image", tmp_path))
        assert verdict.info.encryption == "luks"
    proc = storprobe("check", "--output", "json", tmp_path / "image.luks")
    assert proc.returncode == 0
    assert json.loads(proc.stdout) | {"filename": None} == {
        "filename": None, "safe": True, "format": "luks", "encryption": "luks", "hazards": []
    }


# ---- backing files, data files -------------------------------------------------


@pytest.mark.parametrize(
    "backing, hazard",
    [
        ("base.qcow2", "backing-file"),
        ("/var/lib/images/base.qcow2", "backing-file"),
        ('json:{"file":{"driver":"file","filename":"/etc/shadow"}}', "backing-file"),
        ("nbd://example.invalid:10809/export", "backing-protocol"),
        ("nbd:example.invalid:10809", "backing-protocol"),
        ('json:{"file":{"driver":"nbd","server":{"type":"inet","host":"example.invalid","port":"10809"}}}',
         "backing-protocol"),
    ],
    ids=["relative", "absolute", "json-file", "nbd-uri", "nbd-legacy", "json-nbd"],
)
def test_backing_of_any_kind_is_refused_by_default(tmp_path, backing, hazard):
    qemu_img_create(tmp_path / "base.qcow2", "qcow2", "64M")
    top = qemu_img_create(tmp_path / "top.qcow2", "qcow2", "64M")
    rebase_unsafe(top, backing, "raw")
    verdict = check(top)
    assert checks(verdict) == [hazard]
    assert repr(backing) in verdict.hazards[0].message


@pytest.mark.parametrize("fmt", ["qcow2", "qed", "qcow", "vmdk"])
def test_backing_file_in_every_format_that_has_one(tmp_path, fmt):
    base = qemu_img_create(tmp_path / "base.img", fmt, "64M")
    top = tmp_path / "top.img"
    qemu_img("create", "-q", "-f", fmt, "-b", base, "-F", fmt, top)
    assert checks(check(top)) == ["backing-file"]


def test_differencing_vhd_names_a_backing_file(tmp_path):
    from builders import edit, on_both_footers

    path = qemu_img_create(tmp_path / "child.vhd", "vpc", "64M")
    name = "parent.vhd".encode("utf-16-be")
    edit(path, *on_both_footers(60, ">I", 4), (512 + 64, f"{len(name)}s", name), dynamic_header=True)
    assert checks(check(path)) == ["backing-file"]


def test_differencing_vhdx_names_a_backing_file(tmp_path):
    from builders import Vhdx

    image = Vhdx(qemu_img_create(tmp_path / "child.vhdx", "vhdx", "64M"))
    image.make_differencing({"relative_path": ".\\parent.vhdx", "absolute_win32_path": "C:\\vms\\parent.vhdx"})
    assert checks(check(image.save())) == ["backing-file"]


@pytest.mark.parametrize("raw_flag", ["off", "on"])
def test_external_data_file(tmp_path, raw_flag):
    path = qemu_img_create(tmp_path / "a.qcow2", "qcow2", "64M", f"data_file={tmp_path / 'data.raw'}",
                           f"data_file_raw={raw_flag}")
    verdict = check(path)
    assert checks(verdict) == ["data-file"]
    assert "data.raw" in verdict.hazards[0].message
    assert check(path, policy=Policy(allow_data_file=True)).safe


def test_external_data_file_without_a_recorded_name(tmp_path):
    """The data-file bit without the extension naming the file: the caller
    must supply one (QEMU's 'data-file' option), still an external file."""
    path = qemu_img_create(tmp_path / "a.qcow2", "qcow2", "64M", f"data_file={tmp_path / 'data.raw'}")
    data = bytearray(path.read_bytes())
    at = data.index(struct.pack(">I", 0x44415441), 104)  # the data file name extension
    data[at : at + 4] = struct.pack(">I", 0x0BADC0DE)
    path.write_bytes(bytes(data))
    verdict = check(path)
    assert checks(verdict) == ["data-file"]
    assert "does not record" in verdict.hazards[0].message


# ---- where backing files may live (issue 9: --allow-backing allowed every backing) ----


def overlay(path: Path, backing: str, fmt: str | None = "raw") -> Path:
    """``qemu-img create -f qcow2 -b NAME -F FMT -u PATH 1M``: a qcow2 naming
    ``backing`` as it is, opened by nothing; ``fmt`` None then drops the
    recorded format (qemu-img records one always), by renaming its header
    extension to one QEMU ignores."""
    run("qemu-img", "create", "-q", "-f", "qcow2", "-b", backing, "-F", fmt or "raw", "-u", path, "1M")
    if fmt is None:
        data = bytearray(path.read_bytes())
        at = data.index(struct.pack(">I", 0xE2792ACA), 104)  # the backing format extension
        data[at : at + 4] = struct.pack(">I", 0x0BADC0DE)
        path.write_bytes(bytes(data))
        assert qemu_info(path).get("backing-filename-format") is None
    return path


@pytest.fixture
def images(tmp_path) -> Path:
    """An allowed directory holding a raw base image, beside a directory
    ``outside`` holding the secret a hostile name reaches for."""
    allowed = tmp_path / "images"
    allowed.mkdir()
    qemu_img_create(allowed / "base.raw", "raw", "1M")
    (tmp_path / "outside").mkdir()
    qemu_img_create(tmp_path / "outside" / "secret.raw", "raw", "1M")
    return allowed


def test_allow_backing_accepts_a_regular_file_in_the_images_own_directory(images):
    top = overlay(images / "top.qcow2", "base.raw")
    assert checks(check(top)) == ["backing-file"]
    assert check(top, policy=Policy(allow_backing=True)).safe
    assert check(top, policy=Policy(backing_dirs=(str(images),))).safe
    assert storprobe("check", "--allow-backing", top).returncode == 0
    assert storprobe("check", "--allow-backing-in", images, top).returncode == 0


OUTSIDE = {
    "absolute": "/etc/shadow",
    "dotdot": "../../../../../../../../etc/passwd",
    "sibling-dir": "../outside/secret.raw",
    "file-prefix": "file:/etc/passwd",
    "json-file": 'json:{"file":{"driver":"file","filename":"/etc/shadow"}}',
}


@pytest.mark.parametrize("name", OUTSIDE.values(), ids=OUTSIDE.keys())
def test_backing_outside_the_allowed_directory(images, name, monkeypatch):
    """The CVE-2024-32498 pattern: a raw backing that is a host file. Judged by
    its name alone: nothing outside the allowed directory is looked at."""
    top = overlay(images / "top.qcow2", name)
    touched = _watch_file_system(monkeypatch, top)
    for policy in (Policy(allow_backing=True), Policy(backing_dirs=(str(images),))):
        verdict = check(top, policy=policy)
        assert checks(verdict) == ["backing-outside"]
        assert repr(name) in verdict.hazards[0].message and str(images) in verdict.hazards[0].message
    monkeypatch.undo()
    assert _outside(touched, images) == []
    proc = storprobe("check", "--allow-backing", top)
    assert proc.returncode == 3
    assert proc.stdout.splitlines()[1].startswith("backing-outside: ")


@pytest.mark.parametrize("name", ["file:base.raw", 'json:{"file":{"driver":"file","filename":"base.raw"}}'])
def test_backing_named_relative_to_qemus_working_directory(images, tmp_path, name):
    """After a protocol prefix or inside json:, QEMU joins no directory to a
    relative name: it opens the name against its own working directory, which
    no image can tell (qemu-img finds base.raw only when run in images/)."""
    top = overlay(images / "top.qcow2", name)
    info = ["qemu-img", "info", "--backing-chain", str(top)]
    assert subprocess.run(info, cwd=images, capture_output=True).returncode == 0
    assert subprocess.run(info, cwd=tmp_path, capture_output=True).returncode != 0
    verdict = check(top, policy=Policy(allow_backing=True))
    assert checks(verdict) == ["backing-relative"]
    assert "working directory" in verdict.hazards[0].message


def test_relative_backing_of_a_volume_given_as_bytes(images):
    """No path, no directory to resolve ``base.raw`` against; an absolute name is still judged."""
    top = overlay(images / "top.qcow2", "base.raw")
    assert checks(check(top.read_bytes(), policy=Policy(allow_backing=True, backing_dirs=(str(images),)))) == [
        "backing-relative"
    ]
    absolute = overlay(images / "absolute.qcow2", str(images / "base.raw"))
    assert check(absolute.read_bytes(), policy=Policy(backing_dirs=(str(images),))).safe


NEVER_SAFE = {
    "host_device": ("host_device:/dev/vda", "backing-host-device"),
    "host_cdrom": ("host_cdrom:/dev/sr0", "backing-host-device"),
    "json-host_device": ('json:{"file":{"driver":"host_device","filename":"/dev/vda"}}', "backing-host-device"),
    "nvme": ("nvme://0000:01:00.0/1", "backing-host-device"),  # VFIO takes the host's controller over
    "fat-root": ("fat:/", "backing-host-directory"),
    "fat-rw": ("fat:rw:/home", "backing-host-directory"),
    "json-vvfat": ('json:{"file":{"driver":"vvfat","dir":"/etc"}}', "backing-host-directory"),
    "blkdebug": ("blkdebug:/etc/blkdebug.conf:/etc/shadow", "backing-host-file"),
    "blkverify": ("blkverify:/etc/passwd:/etc/shadow", "backing-host-file"),
    "null-co": ("null-co://", "backing-null"),
    "null-aio": ("null-aio://", "backing-null"),
}


@pytest.mark.parametrize("name, hazard", NEVER_SAFE.values(), ids=NEVER_SAFE.keys())
def test_host_devices_directories_debug_and_null_drivers_are_never_safe(images, name, hazard):
    """Whatever the policy: every directory, every protocol by name."""
    top = overlay(images / "top.qcow2", name)
    protocol = json.loads(name[5:])["file"]["driver"] if name.startswith("json:") else name.partition(":")[0]
    everything = Policy(allow_backing=True, backing_dirs=("/",), backing_protocols=frozenset({protocol, "nbd"}))
    for policy in (Policy(), Policy(allow_backing=True), everything):
        verdict = check(top, policy=policy)
        assert checks(verdict) == [hazard]
        assert "never safe" in verdict.hazards[0].message and "worse than a missing file" in verdict.hazards[0].message
    proc = storprobe("check", "--allow-backing", "--allow-backing-in", "/", "--allow-backing-protocol", protocol, top)
    assert proc.returncode == 3 and proc.stdout.splitlines()[1].startswith(f"{hazard}: ")


SYMLINKS = {
    # name recorded, links made inside the allowed directory (link -> target)
    "absolute-target": ("passwd.raw", {"passwd.raw": "/etc/passwd"}),
    "relative-target": ("link.raw", {"link.raw": "../outside/secret.raw"}),
    "directory-link": ("sub/secret.raw", {"sub": "../outside"}),
    "dotdot-after-link": ("deep/../secret.raw", {"deep": "../outside/deep"}),
    "chain-of-links": ("a.raw", {"a.raw": "b.raw", "b.raw": "/etc/passwd"}),
    "loop": ("a.raw", {"a.raw": "b.raw", "b.raw": "a.raw"}),
}


@pytest.mark.parametrize("name, links", SYMLINKS.values(), ids=SYMLINKS.keys())
def test_backing_whose_symlinks_lead_out_of_the_allowed_directory(images, name, links, monkeypatch):
    """The name lies inside the directory, the file it reaches does not
    (``deep/../secret.raw`` is ``images/secret.raw`` by name, which exists,
    but the kernel resolves ``deep`` first and lands in ``outside``). Nothing
    outside the directory is stat-ed, read or opened on the way."""
    (images.parent / "outside" / "deep").mkdir()
    qemu_img_create(images / "secret.raw", "raw", "1M")  # the decoy, by name
    for link, target in links.items():
        (images / link).symlink_to(target)
    top = overlay(images / "top.qcow2", name)
    touched = _watch_file_system(monkeypatch, top)
    verdict = check(top, policy=Policy(backing_dirs=(str(images),)))
    assert checks(verdict) == ["backing-symlink"]
    assert repr(name) in verdict.hazards[0].message
    assert _outside(touched, images) == []


def _outside(touched: list[str], allowed: Path) -> list[str]:
    """The paths in ``touched`` neither inside ``allowed`` nor on the way to it."""
    real = os.path.realpath(allowed)
    return [p for p in touched if os.path.commonpath((p, real)) not in (real, p)]


def _watch_file_system(monkeypatch, top: Path) -> list[str]:
    """Every path ``os`` is asked to stat, read as a link or open, as absolute
    names, from after a first check of ``top`` (which loads the format table
    and storprobe's modules, files of their own)."""
    check(top, policy=Policy(allow_backing=True))
    touched: list[str] = []
    for name in ("stat", "lstat", "readlink", "open"):
        real = getattr(os, name)

        def watched(path, *args, real=real, **kwargs):
            if isinstance(path, (str, os.PathLike)):
                touched.append(os.path.abspath(path))
            return real(path, *args, **kwargs)

        monkeypatch.setattr(os, name, watched)
    return touched


def test_symlinks_inside_the_allowed_directory_are_followed(images):
    (images / "sub").mkdir()
    (images / "sub" / "inner").symlink_to("../base.raw")
    (images / "current").symlink_to(images / "sub")
    top = overlay(images / "top.qcow2", "current/inner")
    assert check(top, policy=Policy(backing_dirs=(str(images),))).safe


def test_allowed_directory_given_through_a_symlink(images, tmp_path):
    """``--allow-backing-in /var/lib/images`` where that is a link to the real
    pool: names and links are judged against the real directory."""
    (tmp_path / "pool").symlink_to(images)
    top = overlay(images / "top.qcow2", str(tmp_path / "pool" / "base.raw"))
    assert check(top, policy=Policy(backing_dirs=(str(tmp_path / "pool"),))).safe
    assert check(tmp_path / "pool" / "top.qcow2", policy=Policy(allow_backing=True)).safe
    (images / "alias.raw").symlink_to(tmp_path / "pool" / "base.raw")  # a link through the pool's name
    aliased = overlay(images / "aliased.qcow2", "alias.raw")
    assert check(aliased, policy=Policy(backing_dirs=(str(tmp_path / "pool"),))).safe


def test_backing_that_is_not_a_regular_file(images):
    (images / "sub").mkdir()
    os.mkfifo(images / "pipe")
    (images / "dirlink").symlink_to("sub")
    for name, kind in (("sub", "directory"), ("pipe", "FIFO"), ("dirlink", "directory")):
        top = overlay(images / "top.qcow2", name)
        verdict = check(top, policy=Policy(allow_backing=True))  # a FIFO is never opened: no hang
        assert checks(verdict) == ["backing-not-regular"]
        assert f"is a {kind}" in verdict.hazards[0].message


def test_backing_that_does_not_exist(images):
    for name in ("gone.raw", "base.raw/inner", "nodir/base.raw"):
        top = overlay(images / "top.qcow2", name)
        assert checks(check(top, policy=Policy(allow_backing=True))) == ["backing-missing"]


def test_backing_whose_format_is_not_recorded(images):
    """A hypervisor would probe it: the backing's own bytes would decide (CVE-2008-2004)."""
    top = overlay(images / "top.qcow2", "base.raw", fmt=None)
    verdict = check(top, policy=Policy(allow_backing=True))
    assert checks(verdict) == ["backing-format-unrecorded"]
    assert "probe" in verdict.hazards[0].message


def test_backing_format_that_is_a_protocol_driver(images):
    """``-F host_device`` opens the named file as the host's device."""
    top = overlay(images / "top.qcow2", "base.raw", fmt="host_device")
    assert checks(check(top, policy=Policy(allow_backing=True))) == ["backing-format-unknown"]


def test_backing_name_qemu_refuses(images):
    """``vvfat:`` is no protocol (vvfat's is ``fat:``): qemu-img says "Unknown protocol 'vvfat'"."""
    for name in ("rbd:no-pool", 'json:{"file":', "vvfat:/etc"):
        top = overlay(images / "top.qcow2", name)
        for policy in (Policy(), Policy(allow_backing=True, backing_protocols=frozenset({"rbd"}))):
            assert checks(check(top, policy=policy)) == ["backing-invalid"]


# ---- the backing chain --------------------------------------------------------


def test_chain_inside_the_directory_is_judged_to_its_end(images):
    """Each name resolves against its own image's directory: ``sub/mid.qcow2``
    names ``../base.raw``, which is ``images/base.raw``."""
    (images / "sub").mkdir()
    overlay(images / "sub" / "mid.qcow2", "../base.raw")
    top = overlay(images / "top.qcow2", "sub/mid.qcow2", "qcow2")
    assert check(top, policy=Policy(backing_dirs=(str(images),))).safe
    assert qemu_info(top, "qcow2")["backing-filename"] == "sub/mid.qcow2"


@pytest.mark.parametrize(
    "lower, hazard",
    [("/etc/passwd", "backing-outside"), ("../../etc/passwd", "backing-outside"),
     ("host_device:/dev/vda", "backing-host-device"), ("nbd://example.invalid/x", "backing-protocol")],
    ids=["absolute", "dotdot", "host-device", "network"],
)
def test_chain_whose_lower_backing_leaves_the_directory(images, lower, hazard):
    """A chain of two inside the directory whose lower image names a host file:
    the top image's own name is fine, the chain is not."""
    mid = overlay(images / "mid.qcow2", lower)
    top = overlay(images / "top.qcow2", "mid.qcow2", "qcow2")
    verdict = check(top, policy=Policy(backing_dirs=(str(images),)))
    assert checks(verdict) == [hazard]
    assert verdict.hazards[0].message.startswith(f"backing file {mid} names the backing {lower!r}")
    proc = storprobe("check", "--output", "json", "--allow-backing-in", images, top)
    assert proc.returncode == 3
    assert json.loads(proc.stdout)["hazards"] == [{"check": h.check, "message": h.message} for h in verdict.hazards]


def test_hazards_of_the_images_below_are_reported(images):
    """A backing image is opened too: its own hazards count, said of it."""
    mid = set_incompatible_bits(overlay(images / "mid.qcow2", "base.raw"), 1 << 1)
    top = overlay(images / "top.qcow2", "mid.qcow2", "qcow2")
    verdict = check(top, policy=Policy(allow_backing=True))
    assert checks(verdict) == ["qcow2.corrupt"]
    assert verdict.hazards[0].message.startswith(f"backing file {mid}: ")
    declared_raw = overlay(images / "top2.qcow2", "mid.qcow2", "raw")  # a qcow2 header read as raw
    assert checks(check(declared_raw, policy=Policy(allow_backing=True))) == ["polyglot"]
    assert checks(check(top, policy=Policy(allow_backing=True, allow_formats=frozenset({"qcow2"})))) == [
        "qcow2.corrupt", "format"  # base.raw
    ]
    assert checks(check(top, policy=Policy(allow_backing=True, allow_formats=frozenset({"raw"})))) == [
        "format", "format", "qcow2.corrupt"
    ]


def test_chain_loops_are_named(images):
    overlay(images / "a.qcow2", "b.qcow2", "qcow2")
    b = overlay(images / "b.qcow2", "a.qcow2", "qcow2")
    verdict = check(b, policy=Policy(allow_backing=True))
    assert checks(verdict) == ["backing-loop"]
    assert "a.qcow2" in verdict.hazards[0].message
    itself = overlay(images / "self.qcow2", "self.qcow2", "qcow2")
    assert checks(check(itself, policy=Policy(allow_backing=True))) == ["backing-loop"]
    (images / "alias.qcow2").symlink_to("self.qcow2")
    aliased = overlay(images / "self.qcow2", "alias.qcow2", "qcow2")
    assert checks(check(aliased, policy=Policy(allow_backing=True))) == ["backing-loop"]


def test_chain_deeper_than_the_policy(images):
    overlay(images / "mid.qcow2", "base.raw")
    top = overlay(images / "top.qcow2", "mid.qcow2", "qcow2")
    assert check(top, policy=Policy(allow_backing=True, max_depth=2)).safe
    verdict = check(top, policy=Policy(allow_backing=True, max_depth=1))
    assert checks(verdict) == ["backing-too-deep"]


def test_chain_across_allowed_directories(images, tmp_path):
    """``--allow-backing-in`` repeats: a golden image in one directory, overlays in another."""
    overlays = tmp_path / "overlays"
    overlays.mkdir()
    top = overlay(overlays / "top.qcow2", str(images / "base.raw"))
    assert checks(check(top, policy=Policy(allow_backing=True))) == ["backing-outside"]
    assert check(top, policy=Policy(backing_dirs=(str(overlays), str(images)))).safe
    assert storprobe("check", "--allow-backing-in", images, top).returncode == 0
    assert storprobe("check", "--allow-backing-in", overlays, top).returncode == 3
    assert storprobe("check", "--allow-backing", "--allow-backing-in", images, top).returncode == 0


# ---- network backings, accepted by protocol name ---------------------------------------


@pytest.mark.usefixtures("no_network")
def test_network_backing_is_accepted_by_protocol_name_only(images):
    top = overlay(images / "top.qcow2", "nbd://example.invalid:10809/export")
    others = Policy(backing_protocols=frozenset({"rbd"}))
    for policy in (Policy(), Policy(allow_backing=True, backing_dirs=("/",)), others):
        verdict = check(top, policy=policy)
        assert checks(verdict) == ["backing-protocol"]
        assert "example.invalid" in verdict.hazards[0].message and "nbd" in verdict.hazards[0].message
    assert check(top, policy=Policy(backing_protocols=frozenset({"nbd"}))).safe
    rbd = overlay(images / "rbd.qcow2", "rbd:pool/image:mon_host=example.invalid")
    assert check(rbd, policy=Policy(backing_protocols=frozenset({"nbd", "rbd"}))).safe
    unrecorded = overlay(images / "probed.qcow2", "nbd://example.invalid:10809/export", fmt=None)
    assert checks(check(unrecorded, policy=Policy(backing_protocols=frozenset({"nbd"})))) == [
        "backing-format-unrecorded"
    ]


def test_cli_allow_backing_protocol(images):
    top = overlay(images / "top.qcow2", "nbd://example.invalid:10809/export")
    assert storprobe("check", "--allow-backing", top).returncode == 3
    assert storprobe("check", "--allow-backing-protocol", "rbd", top).returncode == 3
    assert storprobe("check", "--allow-backing-protocol", "rbd,nbd", top).returncode == 0
    assert storprobe("check", "--allow-backing-protocol", "rbd", "--allow-backing-protocol", "nbd", top).returncode == 0


def test_cli_help_says_what_allow_backing_accepts():
    text = " ".join(storprobe("check", "--help").stdout.split())
    assert "--allow-backing accept backing files in the image's own directory only" in text
    assert "--allow-backing-in DIR" in text and "--allow-backing-protocol PROTOCOL,..." in text


# ---- external data files, placed as backing files are ----------------------------


def test_external_data_file_outside_the_images_directory(images, tmp_path):
    elsewhere = tmp_path / "outside" / "data.raw"
    path = qemu_img_create(images / "a.qcow2", "qcow2", "1M", f"data_file={elsewhere}")
    verdict = check(path, policy=Policy(allow_data_file=True))
    assert checks(verdict) == ["data-file-outside"]
    assert str(elsewhere) in verdict.hazards[0].message
    assert check(path, policy=Policy(data_file_dirs=(str(tmp_path / "outside"),))).safe
    assert storprobe("check", "--allow-data-file", path).returncode == 3
    assert storprobe("check", "--allow-data-file-in", tmp_path / "outside", path).returncode == 0


def test_external_data_file_swapped_for_a_symlink(images):
    data = images / "data.raw"
    path = qemu_img_create(images / "a.qcow2", "qcow2", "1M", f"data_file={data}")
    assert check(path, policy=Policy(allow_data_file=True)).safe
    data.unlink()
    data.symlink_to("/etc/shadow")
    assert checks(check(path, policy=Policy(allow_data_file=True))) == ["data-file-symlink"]


def test_external_data_file_named_relative(images):
    """QEMU 7.2 opens a relative data-file name against its working directory
    (qemu-io from elsewhere cannot open it), not the image's: unplaceable."""
    path = qemu_img_create(images / "a.qcow2", "qcow2", "1M", f"data_file={images / 'data.raw'}")
    run("qemu-img", "amend", "-f", "qcow2", "-o", "data_file=data.raw", path)
    assert qemu_info(path)["format-specific"]["data"]["data-file"] == "data.raw"
    assert checks(check(path)) == ["data-file"]
    assert checks(check(path, policy=Policy(allow_data_file=True))) == ["data-file-relative"]


# ---- a directory is not an image --------------------------------------------------------


def test_directory_is_not_an_image(tmp_path):
    verdict = check(tmp_path)
    assert verdict.info.file_type == "directory"
    assert checks(verdict) == ["directory"]
    fmt = verdict.info.format
    assert check(tmp_path, policy=Policy(allow_formats=frozenset({fmt}))).safe
    assert checks(check(tmp_path, policy=Policy(allow_formats=frozenset({"raw"})))) == ["format", "directory"]
    proc = storprobe("check", tmp_path)
    assert proc.returncode == 3
    assert proc.stdout.splitlines()[:2] == [f"{tmp_path}: UNSAFE ({fmt})", f"directory: {verdict.hazards[0].message}"]
    out = json.loads(storprobe("check", "--output", "json", tmp_path).stdout)
    assert (out["safe"], [h["check"] for h in out["hazards"]]) == (False, ["directory"])
    assert storprobe("check", "--allow", fmt, tmp_path).returncode == 0


# ---- VMDK extents (CVE-2022-47951) ---------------------------------------------


@pytest.mark.parametrize("subformat", ["monolithicFlat", "twoGbMaxExtentSparse", "twoGbMaxExtentFlat"])
def test_vmdk_descriptor_with_extent_files(tmp_path, subformat):
    path = qemu_img_create(tmp_path / "d.vmdk", "vmdk", "3G", f"subformat={subformat}")
    verdict = check(path)
    assert checks(verdict) == ["vmdk.external-extent"]
    assert "'d-" in verdict.hazards[0].message  # d-flat.vmdk, d-s001.vmdk ...


@pytest.mark.parametrize(
    "extent, hazards",
    [
        ('RW 2048 FLAT "../other/disk.raw" 0', ["vmdk.external-extent", "vmdk.extent-path"]),
        ('RW 2048 FLAT "/etc/passwd" 0', ["vmdk.external-extent", "vmdk.extent-path"]),
        ('RW 2048 SPARSE "sub/../../x.vmdk"', ["vmdk.external-extent", "vmdk.extent-path"]),
        ('RW 2048 FLAT "C:\\Windows\\win.ini" 0', ["vmdk.external-extent", "vmdk.extent-path"]),
        ('RW 2048 FLAT "nbd://example.invalid/x" 0', ["vmdk.external-extent", "vmdk.extent-path"]),
        ('RW 2048 FLAT "/dev/sda" 0', ["vmdk.external-extent", "vmdk.extent-path", "vmdk.device-extent"]),
        ('RW 2048 VMFSRDM "disk-rdm.vmdk"', ["vmdk.external-extent", "vmdk.device-extent"]),
        ('RW 2048 FLAT "disk-flat.vmdk" 0', ["vmdk.external-extent"]),
    ],
    ids=["dotdot", "absolute", "nested-dotdot", "windows-drive", "protocol", "device", "rdm", "sibling"],
)
def test_vmdk_hand_built_descriptor(tmp_path, extent, hazards):
    create_type = "monolithicFlat" if "FLAT" in extent else "twoGbMaxExtentSparse"
    lines = [extent] if "VMFSRDM" not in extent else ['RW 2048 FLAT "disk-flat.vmdk" 0', extent]
    path = vmdk_descriptor(tmp_path / "disk.vmdk", *lines, create_type=create_type)
    assert checks(check(path)) == hazards


def test_vmdk_descriptor_naming_only_itself_is_still_a_descriptor(tmp_path):
    """A text descriptor's data always lives elsewhere: even a name equal to
    its own file is opened anew, under whatever name the upload now has."""
    path = vmdk_descriptor(tmp_path / "disk.vmdk", 'RW 2048 FLAT "disk.vmdk" 0')
    assert checks(check(path)) == ["vmdk.external-extent"]


@pytest.mark.parametrize(
    "line, hazards",
    [
        ('RW 131072 FLAT "/etc/passwd" 0', ["vmdk.external-extent", "vmdk.extent-path"]),
        ('RW 131072 SPARSE "../x.vmdk"', ["vmdk.external-extent", "vmdk.extent-path"]),
        ('RW 65536 SPARSE "d.vmdk"\nRW 65536 SPARSE "e.vmdk"', ["vmdk.external-extent"]),
    ],
    ids=["flat", "dotdot", "two-extents"],
)
def test_sparse_vmdk_whose_embedded_descriptor_names_other_files(tmp_path, line, hazards):
    """QEMU opens only the sparse file; VMware reads its embedded descriptor.
    Either way, an embedded descriptor naming anything but the file is a trap."""
    path = embedded_descriptor_names(qemu_img_create(tmp_path / "d.vmdk", "vmdk", "64M"), line)
    assert check(path).info.format == "vmdk"
    assert checks(check(path)) == hazards


def test_kdmv_header_carrying_a_descriptor_file(tmp_path):
    """Capacity 0 and a descriptor: QEMU opens the descriptor's extents."""
    path = qemu_img_create(tmp_path / "d.vmdk", "vmdk", "64M")
    text = VMDK_DESCRIPTOR.format(create_type="monolithicFlat", extents='RW 131072 FLAT "/etc/passwd" 0').encode()
    patched(path, (12, struct.pack("<Q", 0)), (512, text.ljust(20 * 512, b"\0")))
    assert checks(check(path)) == ["vmdk.external-extent", "vmdk.extent-path"]


def test_many_extents_are_listed_briefly(tmp_path):
    lines = [f'RW 2048 FLAT "part{i}.raw" 0' for i in range(1000)]
    verdict = check(vmdk_descriptor(tmp_path / "d.vmdk", *lines))
    assert checks(verdict) == ["vmdk.external-extent"]
    assert verdict.hazards[0].message.count("part") == 4 and "and 996 more" in verdict.hazards[0].message


# ---- qcow2 feature bits ---------------------------------------------------------


@pytest.mark.parametrize("bit", [5, 31, 63])
def test_qcow2_unknown_incompatible_feature(tmp_path, bit):
    path = set_incompatible_bits(qemu_img_create(tmp_path / "a.qcow2", "qcow2", "64M"), 1 << bit)
    verdict = check(path)
    assert checks(verdict) == ["qcow2.unknown-feature"]
    assert f"bit {bit}" in verdict.hazards[0].message


def test_qcow2_corrupt_bit(tmp_path):
    path = set_incompatible_bits(qemu_img_create(tmp_path / "a.qcow2", "qcow2", "64M"), 1 << 1)
    assert checks(check(path)) == ["qcow2.corrupt"]
    assert "corrupt: true" in run("qemu-img", "info", "-U", path).stdout.decode()


def test_qcow2_dirty_bit_is_no_hazard(tmp_path):
    """The dirty bit is lazy_refcounts at work: QEMU repairs the refcounts."""
    path = qemu_img_create(tmp_path / "a.qcow2", "qcow2", "64M", "lazy_refcounts=on")
    assert check(set_incompatible_bits(path, 1 << 0)).safe


# ---- polyglots and the CVE-2008-2004 pattern ------------------------------------


def test_declared_raw_volume_that_probes_as_qcow2(tmp_path):
    """A guest wrote a qcow2 header (with a backing file) into its raw disk."""
    path = qemu_img_create(tmp_path / "guest.img", "qcow2", "64M")
    rebase_unsafe(path, "/etc/shadow", "raw")
    verdict = check(path, format="raw")
    assert verdict.info.format == "raw"
    assert checks(verdict) == ["polyglot"]
    assert "qcow2" in verdict.hazards[0].message
    assert checks(check(path)) == ["backing-file"]  # probed, it is a qcow2 with a backing file


@pytest.mark.parametrize("fmt", ["vmdk", "vpc", "vdi", "qed", "luks"])
def test_declared_raw_volume_whose_first_sector_is_another_format(tmp_path, fmt):
    path = _luks(tmp_path / "a", tmp_path) if fmt == "luks" else qemu_img_create(tmp_path / "a", fmt, "64M")
    assert checks(check(path, format="raw")) == ["polyglot"]


def test_iso_with_a_qcow2_header_in_its_system_area(tmp_path):
    iso = xorriso(tmp_path / "a.iso", tmp_path)
    qcow2 = qemu_img_create(tmp_path / "a.qcow2", "qcow2", "1M").read_bytes()
    path = patched(iso, (0, qcow2[:512]))
    verdict = check(path)
    assert verdict.info.format == "qcow2" and set(verdict.info.matches) == {"qcow2", "iso"}
    assert checks(verdict) == ["polyglot"]
    assert "iso" in verdict.hazards[0].message
    assert checks(check(path, format="iso")) == ["polyglot"]  # declared iso, it probes as qcow2
    assert checks(check(path, format="raw")) == ["polyglot"]


@pytest.mark.parametrize("label, table", [("dos", "MBR"), ("gpt", "GPT")])
@pytest.mark.parametrize("fmt", ["qcow2", "qed", "qcow"])
def test_partition_table_inside_a_header(tmp_path, fmt, label, table):
    """The partition table (protective MBR, GPT header and entries) of a real
    disk copied past the header: a hypervisor sees the image, firmware and
    partition scanners see a partitioned disk."""
    disk = partitioned_raw(tmp_path / "disk.img", label).read_bytes()
    path = patched(qemu_img_create(tmp_path / f"a.{fmt}", fmt, "64M"), (446, disk[446 : 34 * 512]))
    verdict = check(path)
    assert verdict.info.format == fmt
    assert checks(verdict) == ["raw.partition-table"]
    assert table in verdict.hazards[0].message


def test_partition_table_inside_a_header_of_a_row_only_the_given_table_has(tmp_path):
    """check(table=...) is honoured by the row hazards too: the raw row judges the
    first sector of a format that exists only in the caller's table."""
    from storprobe import FormatSpec
    from storprobe.registry import FormatTable, Row, format_table

    table = FormatTable([Row(FormatSpec(name="customfmt", magic=b"CUSTOMFMT"), "custom"), *format_table().rows])
    disk = partitioned_raw(tmp_path / "disk.img", "dos").read_bytes()
    image = bytearray(b"CUSTOMFMT".ljust(4096, b"\0"))
    image[446:512] = disk[446:512]
    verdict = check(bytes(image), table=table)
    assert "customfmt" not in format_table() and verdict.info.format == "customfmt"
    assert checks(verdict) == ["raw.partition-table"]


def test_mbr_entry_past_a_vdi_header(tmp_path):
    """VDI's header ends at byte 456: the MBR's second to fourth entries and
    its signature fit after it."""
    entry = struct.pack("<B3sB3sII", 0x80, bytes(3), 0x83, bytes(3), 2048, 8192)
    path = patched(qemu_img_create(tmp_path / "a.vdi", "vdi", "64M"), (462, entry), (510, b"\x55\xaa"))
    verdict = check(path)
    assert verdict.info.format == "vdi"
    assert checks(verdict) == ["raw.partition-table"]


def test_partition_table_in_a_dynamic_vhds_footer_copy(tmp_path):
    """A dynamic VHD's first sector is its footer copy, 427 reserved bytes at its
    end: an MBR fits there (checksum refreshed, QEMU opens the image). A fixed
    VHD's first sector is the guest's disk, judged by
    test_declared_raw_is_safe_when_its_first_sector_is_the_guests."""
    from builders import edit

    entry = struct.pack("<B3sB3sII", 0x80, bytes(3), 0x83, bytes(3), 2048, 8192)
    path = edit(qemu_img_create(tmp_path / "a.vhd", "vpc", "64M"), (446, "16s", entry), (510, "2s", b"\x55\xaa"))
    assert qemu_img_error(path, "vpc") is None
    verdict = check(path)
    assert verdict.info.format == "vpc"
    assert checks(verdict) == ["raw.partition-table"]


def test_fat_boot_sector_inside_a_vdi_preheader(tmp_path):
    """VDI's first 64 bytes are free text; a FAT boot sector's BPB fits there."""
    fat = tmp_path / "fat.img"
    fat.write_bytes(bytes(8 << 20))
    run("mkfs.fat", fat)
    path = qemu_img_create(tmp_path / "a.vdi", "vdi", "64M")
    path = patched(path, (0, fat.read_bytes()[:0x40]), (510, b"\x55\xaa"))
    verdict = check(path)
    assert verdict.info.format == "vdi"
    assert checks(verdict) == ["raw.boot-sector"]


# ---- policy: formats, size, malformed headers ----------------------------------


def test_format_outside_the_allowed_list(tmp_path):
    path = qemu_img_create(tmp_path / "a.qcow2", "qcow2", "64M")
    verdict = check(path, policy=Policy(allow_formats=frozenset({"raw"})))
    assert checks(verdict) == ["format"]
    assert "qcow2" in verdict.hazards[0].message
    assert check(path, policy=Policy(allow_formats=frozenset({"raw", "qcow2"}))).safe


def test_virtual_size_over_the_limit(tmp_path):
    path = qemu_img_create(tmp_path / "a.qcow2", "qcow2", "100T")
    assert checks(check(path)) == ["size"]
    assert check(path, policy=Policy(max_virtual_size=100 << 40)).safe
    assert checks(check(path, policy=Policy(max_virtual_size=1 << 30))) == ["size"]
    assert DEFAULT_MAX_VIRTUAL_SIZE == 64 << 40


def test_malformed_header_is_a_hazard_with_its_code(tmp_path):
    path = qemu_img_create(tmp_path / "a.qcow2", "qcow2", "64M")
    patched(path, (20, struct.pack(">I", 30)))
    verdict = check(path)
    assert verdict.info is None
    assert checks(verdict) == ["malformed"]
    assert "(qcow2.cluster-bits)" in verdict.hazards[0].message


def test_unreadable_volume_and_unknown_format_raise(tmp_path):
    with pytest.raises(SourceError):
        check(tmp_path / "missing")
    with pytest.raises(UnknownFormat):
        check(qemu_img_create(tmp_path / "a.qcow2", "qcow2", "1M"), format="nonsense")


def test_hazards_combine(tmp_path):
    path = qemu_img_create(tmp_path / "a.qcow2", "qcow2", "64M", f"data_file={tmp_path / 'd.raw'}")
    rebase_unsafe(path, "nbd://example.invalid/x", "raw")
    set_incompatible_bits(path, 1 << 1 | 1 << 40)
    verdict = check(path, policy=Policy(allow_formats=frozenset({"raw"}), max_virtual_size=1 << 20))
    assert checks(verdict) == [
        "format", "size", "data-file", "qcow2.unknown-feature", "qcow2.corrupt", "backing-protocol"
    ]


# ---- the command -----------------------------------------------------------------


def test_cli_safe_exits_0_with_one_line(tmp_path):
    path = qemu_img_create(tmp_path / "a.qcow2", "qcow2", "64M")
    proc = storprobe("check", path)
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, f"{path}: safe (qcow2)\n", "")


def test_cli_unsafe_exits_3_with_one_line_per_hazard(tmp_path):
    path = qemu_img_create(tmp_path / "a.qcow2", "qcow2", "64M")
    rebase_unsafe(path, "evil\nname: with a newline", "raw")
    set_incompatible_bits(path, 1 << 1)
    proc = storprobe("check", path)
    assert proc.returncode == 3 and proc.stderr == ""
    lines = proc.stdout.splitlines()
    assert lines[0] == f"{path}: UNSAFE (qcow2)"
    assert [line.split(":", 1)[0] for line in lines[1:]] == ["qcow2.corrupt", "backing-invalid"]
    assert "'evil\\nname: with a newline'" in lines[2]  # untrusted names are quoted, one line each


def test_cli_policy_options(tmp_path):
    base = qemu_img_create(tmp_path / "base.qcow2", "qcow2", "64M")
    path = tmp_path / "top.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-b", base, "-F", "qcow2", "-o", f"data_file={tmp_path / 'd.raw'}", path)
    assert storprobe("check", path).returncode == 3
    assert storprobe("check", "--allow-backing", path).returncode == 3
    assert storprobe("check", "--allow-backing", "--allow-data-file", path).returncode == 0
    assert storprobe("check", "--allow-backing", "--allow-data-file", "--allow", "raw,vmdk", path).returncode == 3
    assert storprobe("check", "--allow-backing", "--allow-data-file", "--allow", "raw,qcow2", path).returncode == 0
    proc = storprobe("check", "--allow-backing", "--allow-data-file", "--max-size", "1000000", path)
    assert proc.returncode == 3 and proc.stdout.splitlines()[1].startswith("size: ")
    assert storprobe("check", "-f", "raw", path).returncode == 3


def test_cli_json_is_the_api_verdict(tmp_path):
    path = qemu_img_create(tmp_path / "a.qcow2", "qcow2", "64M")
    rebase_unsafe(path, "json:{\"file\":{\"filename\":\"/etc/passwd\"}}", "raw")
    proc = storprobe("check", "--output", "json", path)
    assert proc.returncode == 3
    out = json.loads(proc.stdout)
    verdict = check(path)
    assert out == {
        "filename": str(path),
        "safe": False,
        "format": "qcow2",
        "encryption": None,
        "hazards": [{"check": h.check, "message": h.message} for h in verdict.hazards],
    }
    assert [h["check"] for h in out["hazards"]] == ["backing-file"]


def test_cli_malformed_header_exits_3(tmp_path):
    path = tmp_path / "bad.qcow2"
    path.write_bytes(b"QFI\xfb" + struct.pack(">I", 3) + bytes(200))
    proc = storprobe("check", "--output", "json", path)
    assert proc.returncode == 3
    out = json.loads(proc.stdout)
    assert (out["safe"], out["format"], [h["check"] for h in out["hazards"]]) == (False, None, ["malformed"])
    proc = storprobe("check", path)
    assert proc.stdout.splitlines()[0] == f"{path}: UNSAFE (unreadable header)"


@pytest.mark.parametrize("kind", ["missing", "fifo", "socket", "loop"])
def test_cli_unreadable_exits_1_with_one_line(tmp_path, kind):
    path = unusable_entry(tmp_path / kind, kind)
    proc = storprobe("check", path)
    assert (proc.returncode, proc.stdout) == (1, "")
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"storprobe: {path}: ")


def test_cli_usage_errors_exit_2(tmp_path):
    assert storprobe("check").returncode == 2
    assert storprobe("check", "-f", "nonsense", tmp_path).returncode == 2
    assert storprobe("check", "--max-size", "lots", tmp_path).returncode == 2
    assert storprobe("check", "--output", "xml", tmp_path).returncode == 2


# ---- whatever the bytes ----------------------------------------------------------


@given(data=st.binary(max_size=4096), fmt=st.sampled_from([None, "raw", "qcow2", "vmdk"]))
def test_check_never_fails_on_any_bytes(data, fmt):
    """A verdict for any bytes; a malformed header is a named hazard, never a plugin defect."""
    for body in (data, b"QFI\xfb\0\0\0\3" + data, b"KDMV\1\0\0\0" + data, b"# Disk DescriptorFile\nversion=1\n" + data):
        verdict = check(body, format=fmt)
        assert all("(plugin-error)" not in h.message for h in verdict.hazards), verdict.hazards
