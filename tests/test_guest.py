"""Guest inspection against the tools that made the disks: filesystems made by
mkfs.*, mkswap, cryptsetup, mksquashfs and xorriso, compared with what
``blkid -p -o export`` says of them (type, label, UUID, version); partition
tables made by sfdisk, compared with ``sfdisk --json``; hostile tables and
superblocks built with struct.pack, which must end in named problems, within
bounded reads, never a traceback."""

from __future__ import annotations

import io
import json
import os
import struct
import subprocess
import uuid
import zlib
from pathlib import Path

import pytest

from storprobe.guest import inspect_guest, inspect_image
from storprobe.guestfs import MAX_READS
from storprobe.partitions import GPT_TYPE_NAMES, MAX_LOGICAL, MBR_TYPE_NAMES

from builders import broken_compressed_qcow2
from oracle import require, run

MiB = 1 << 20


# ---- oracles -------------------------------------------------------------------


def blkid(path: Path, offset: int | None = None, size: int | None = None) -> dict[str, str]:
    """``blkid -p -o export`` of ``path`` (at ``offset``, ``size`` bytes), its
    backslash escapes undone; empty when blkid finds nothing (status 2)."""
    args = [require("blkid"), "-p", "-o", "export"]
    if offset is not None:
        args += ["--offset", str(offset)]
    if size is not None:
        args += ["--size", str(size)]
    proc = subprocess.run([*args, str(path)], capture_output=True, text=True)
    assert proc.returncode in (0, 2), proc.stderr
    found = {}
    for line in proc.stdout.splitlines():
        key, _, value = line.partition("=")
        found[key] = value.replace("\\", "")
    return found


def blkid_content(found: dict[str, str]) -> tuple | None:
    """(TYPE, LABEL, UUID, VERSION) as blkid said them; None for no filesystem."""
    if "TYPE" not in found:
        return None
    return found["TYPE"], found.get("LABEL"), found.get("UUID"), found.get("VERSION")


def sfdisk_json(path: Path) -> dict:
    return json.loads(run("sfdisk", "--json", path).stdout)["partitiontable"]


def inspect(path: Path):
    with open(path, "rb") as f:
        return inspect_guest(f, os.path.getsize(path))


def ours(content) -> tuple | None:
    return None if content is None else (content.type, content.label, content.uuid, content.version)


# ---- makers: real tools --------------------------------------------------------


def sized(path: Path, size: int) -> Path:
    with open(path, "wb") as f:
        f.truncate(size)
    return path


def make_fs(kind: str, path: Path, label: str) -> Path:
    """A volume of ``kind`` with ``label`` at ``path``, made by its real tool
    (skipped, saying why, where the tool is missing)."""
    if kind.startswith("fat"):
        sized(path, {"fat12": 8, "fat16": 40, "fat32": 64}[kind] * MiB)
        run("mkfs.fat", "-F", kind[3:], "-n", label, path)
    elif kind in ("ext2", "ext3", "ext4"):
        sized(path, 32 * MiB)
        run(f"mkfs.{kind}", "-q", "-F", "-L", label, path)
    elif kind == "swap":
        sized(path, 16 * MiB)
        run("mkswap", "-L", label, path)
    elif kind == "xfs":
        sized(path, 320 * MiB)
        run("mkfs.xfs", "-q", "-L", label, path)
    elif kind == "btrfs":
        sized(path, 128 * MiB)
        run("mkfs.btrfs", "-q", "-L", label, path)
    elif kind == "ntfs":
        sized(path, 32 * MiB)
        run("mkntfs", "-q", "-Q", "-F", "-L", label, path)
    elif kind == "exfat":
        sized(path, 32 * MiB)
        run("mkfs.exfat", "-L", label, path)
    elif kind == "f2fs":
        sized(path, 64 * MiB)
        run("mkfs.f2fs", "-q", "-l", label, path)
    elif kind == "squashfs":
        tree = path.with_suffix(".d")
        tree.mkdir()
        (tree / "file").write_text("hello")
        run("mksquashfs", tree, path, "-quiet", "-noappend")
    elif kind in ("iso9660", "joliet"):
        tree = path.with_suffix(".d")
        tree.mkdir()
        (tree / "file").write_text("hello")
        run("xorriso", "-as", "mkisofs", *(["-J"] if kind == "joliet" else []), "-V", label, "-o", path, tree)
    elif kind in ("luks1", "luks2"):
        sized(path, 16 * MiB)
        key = path.with_suffix(".key")
        key.write_bytes(b"pw")
        options = ["--label", label, "--pbkdf", "pbkdf2"] if kind == "luks2" else []
        run("cryptsetup", "luksFormat", "--batch-mode", "--disable-locks", "--key-file", key,
            "--pbkdf-force-iterations", "1000", "--type", kind, *options, path)
    else:
        raise ValueError(kind)
    return path


KINDS = ("fat12", "fat16", "fat32", "ext2", "ext3", "ext4", "swap", "xfs", "btrfs", "ntfs", "exfat", "f2fs",
         "squashfs", "iso9660", "joliet", "luks1", "luks2")
LABELS = {"iso9660": "MY_ISO", "joliet": "A Joliet Label Longer Than 16", "fat12": "SMALL", "fat16": "MIDDLE",
          "fat32": "LARGE"}


def place(disk: Path, offset: int, image: Path) -> None:
    """Copy ``image`` into ``disk`` at ``offset``, its data ranges only (both stay sparse)."""
    with open(image, "rb") as src, open(disk, "r+b") as dst:
        end = os.fstat(src.fileno()).st_size
        at = 0
        while at < end:
            try:
                at = os.lseek(src.fileno(), at, os.SEEK_DATA)
            except OSError:
                break
            hole = os.lseek(src.fileno(), at, os.SEEK_HOLE)
            src.seek(at)
            dst.seek(offset + at)
            dst.write(src.read(hole - at))
            at = hole


# ---- a whole disk holding one volume ----------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_volume_as_blkid_says(tmp_path, kind):
    path = make_fs(kind, tmp_path / f"{kind}.img", LABELS.get(kind, f"lbl-{kind}"))
    found = blkid(path)
    report = inspect(path)
    assert ours(report.content) == blkid_content(found)
    assert report.content is not None
    assert (report.content.label is not None) == (kind not in ("squashfs", "luks1"))  # those have none
    assert not report.empty and report.problems == ()
    if kind == "exfat":
        # blkid 2.38 (Debian 12) also calls the boot sector's 0x55AA a DOS table; libblkid
        # since 2.39 checks for exFAT first, as it does for FAT and NTFS, and so do we.
        assert found.get("PTTYPE") in ("dos", None)
        assert report.table is None
    else:
        assert (report.table is None) == ("PTTYPE" not in found)


def test_lvm_physical_volume(tmp_path):
    """pvcreate needs a block device: a loop device over the file (root only)."""
    path = sized(tmp_path / "pv.img", 16 * MiB)
    require("pvcreate")
    attach = subprocess.run(["losetup", "-f", "--show", str(path)], capture_output=True, text=True)
    if attach.returncode != 0:
        pytest.skip(f"no loop device for pvcreate: {attach.stderr.strip()}")
    device = attach.stdout.strip()
    try:
        run("pvcreate", "-qq", "--config", "devices { use_devicesfile=0 obtain_device_list_from_udev=0 }", device)
    finally:
        subprocess.run(["losetup", "-d", device], check=False)
    report = inspect(path)
    assert ours(report.content) == blkid_content(blkid(path))
    assert report.content.type == "LVM2_member" and len(report.content.uuid) == 38


def lvm_label(sector: int = 1, *, pv_uuid: bytes = b"A" * 32, corrupt: bool = False) -> bytes:
    """An LVM2 label (lib/label/label.h: LABELONE, its own sector, CRC from
    offset 20, LVM2 001, then the PV header's 32-character UUID) in a 2 MiB disk
    (libblkid looks for no LVM on a floppy-sized one)."""
    label = bytearray(512)
    struct.pack_into("<8sQII8s32s", label, 0, b"LABELONE", sector, 0, 32, b"LVM2 001", pv_uuid)
    crc = 0xF597A6CF
    table = [0x00000000, 0x1DB71064, 0x3B6E20C8, 0x26D930AC, 0x76DC4190, 0x6B6B51F4, 0x4DB26158, 0x5005713C,
             0xEDB88320, 0xF00F9344, 0xD6D6A3E8, 0xCB61B38C, 0x9B64C2B0, 0x86D3D2D4, 0xA00AE278, 0xBDBDF21C]
    for byte in label[20:]:
        crc ^= byte
        crc = (crc >> 4) ^ table[crc & 0xF]
        crc = (crc >> 4) ^ table[crc & 0xF]
    struct.pack_into("<I", label, 16, crc ^ corrupt)
    disk = bytearray(2 * MiB)
    disk[sector * 512 : sector * 512 + 512] = label
    return bytes(disk)


@pytest.mark.parametrize("sector", [0, 1, 2, 3])
@pytest.mark.parametrize("corrupt", [False, True])
def test_hand_built_lvm_label(tmp_path, sector, corrupt):
    """Each of the four sectors LVM may put its label in; a wrong CRC is no PV (blkid agrees)."""
    path = tmp_path / "pv.img"
    path.write_bytes(lvm_label(sector, pv_uuid=b"abcdefGHIJKL0123456789mnopqrstuv", corrupt=corrupt))
    expected = blkid_content(blkid(path))
    assert ours(inspect(path).content) == expected
    assert (expected is None) == corrupt


def bitlocker_volume(boot: bytes, description: str, ident: uuid.UUID) -> bytes:
    """A BitLocker volume's start (libblkid's bitlocker.c layout, from libbde's
    documentation): the boot sector pointing (at 176) to FVE metadata at 64 KiB
    whose header holds the volume GUID and a description entry (type 7, a string)."""
    disk = bytearray(4 * MiB)
    disk[:11] = boot
    struct.pack_into("<Q", disk, 176, 0x10000)
    disk[510:512] = b"\x55\xaa"
    text = description.encode("utf-16-le")
    entries = struct.pack("<HHHH", 8 + len(text), 7, 2, 1) + text
    header = struct.pack("<IIII16s16s", 48 + len(entries), 1, 48, 48 + len(entries), ident.bytes_le, bytes(16))
    block = b"-FVE-FS-" + struct.pack("<HH", 0, 2) + bytes(52)
    metadata = block + header + entries
    disk[0x10000 : 0x10000 + len(metadata)] = metadata
    return bytes(disk)


@pytest.mark.parametrize("boot, version", [(b"\xeb\x58\x90-FVE-FS-", "2"), (b"\xeb\x52\x90-FVE-FS-", None)])
def test_bitlocker(tmp_path, boot, version):
    """Type and version as blkid says; the description and volume GUID (which
    libblkid reads since 2.40, Debian 12's 2.38 not) as the header holds them."""
    ident = uuid.uuid4()
    path = tmp_path / "bitlocker.img"
    path.write_bytes(bitlocker_volume(boot, "DESKTOP C: 2026-12-01", ident))
    found = blkid(path)
    content = inspect(path).content
    assert (content.type, content.version) == (found["TYPE"], found.get("VERSION")) == ("BitLocker", version)
    if version is not None:  # Windows 7 and later: the FVE metadata is read
        assert (content.label, content.uuid) == ("DESKTOP C: 2026-12-01", str(ident))


# ---- partitioned disks, against sfdisk and blkid at each partition ----------------------


def check_against_tools(path: Path, report) -> None:
    """The table as ``sfdisk --json`` lists it, each partition's content as
    ``blkid -p --offset`` finds it."""
    table = sfdisk_json(path)
    assert report.table.scheme == {"dos": "mbr", "gpt": "gpt"}[table["label"]]
    assert report.table.uuid == (None if table["id"] == "0x00000000" else table["id"])  # zero: none, as blkid
    sector = table["sectorsize"]
    listed = [
        {
            "number": int(p["node"][len(str(path)) :]),
            "start": p["start"] * sector,
            "size": p["size"] * sector,
            "type": p["type"],
            "uuid": p.get("uuid"),
            "name": p.get("name"),
            "bootable": p.get("bootable", False),
        }
        for p in table["partitions"]
    ]
    assert [
        {"number": p.number, "start": p.start, "size": p.size, "type": p.type, "uuid": p.uuid, "name": p.name,
         "bootable": p.bootable}
        for p in report.table.partitions
    ] == listed
    whole = blkid(path)
    assert whole["PTTYPE"] == table["label"]
    for entry in report.partitions:
        part = entry.partition
        if part.extended:
            assert entry.content is None  # an extended partition holds the chain, not a filesystem
            continue
        assert ours(entry.content) == blkid_content(blkid(path, part.start, part.size)), part


def test_mbr_with_logical_partitions(tmp_path):
    disk = sized(tmp_path / "mbr.img", 256 * MiB)
    script = (
        "label: dos\n"
        "1: start=2048, size=16384, type=1, bootable\n"
        "2: start=18432, size=204800, type=5\n"
        "5: start=20480, size=65536, type=83\n"
        "6: start=88064, size=32768, type=82\n"
        "7: start=122880, size=65536, type=7\n"
        "3: start=239616, size=65536, type=7\n"
    )
    run("sfdisk", "-q", disk, input=script.encode())
    volumes = {1: "fat12", 5: "ext2", 6: "swap", 7: "ntfs", 3: "exfat"}
    starts = {p["node"][len(str(disk)) :]: p["start"] * 512 for p in sfdisk_json(disk)["partitions"]}
    for index, kind in volumes.items():
        place(disk, starts[str(index)], make_fs(kind, tmp_path / f"{kind}.img", f"P{index}"))
    report = inspect(disk)
    check_against_tools(disk, report)
    assert [p.number for p in report.table.partitions] == [1, 2, 3, 5, 6, 7]
    assert {e.partition.number: e.content.type for e in report.partitions if e.content} == {
        1: "vfat", 5: "ext2", 6: "swap", 7: "ntfs", 3: "exfat"}
    assert report.problems == () and not report.empty


def test_gpt_with_named_partitions(tmp_path):
    disk = sized(tmp_path / "gpt.img", 768 * MiB)
    script = (
        "label: gpt\n"
        'size=64MiB, type=C12A7328-F81F-11D2-BA4B-00A0C93EC93B, name="EFI system partition"\n'
        "size=16MiB, type=0657FD6D-A4AB-43C4-84E5-0933C84B4F4F\n"
        'size=32MiB, type=0FC63DAF-8483-4772-8E79-3D69D8477DE4, name="root"\n'
        "size=320MiB, type=0FC63DAF-8483-4772-8E79-3D69D8477DE4\n"
        "size=16MiB, type=CA7D7CCB-63ED-4C53-861C-1742536059CC\n"
        "size=128MiB, type=EBD0A0A2-B9E5-4433-87C0-68B6B72699C7\n"
        "size=1MiB\n"
    )
    run("sfdisk", "-q", disk, input=script.encode())
    kinds = ["fat32", "swap", "ext4", "xfs", "luks2", "btrfs"]
    for part, kind in zip(sfdisk_json(disk)["partitions"], kinds, strict=False):  # the last one stays empty
        place(disk, part["start"] * 512, make_fs(kind, tmp_path / f"{kind}.img", f"g-{kind}"[:11]))
    report = inspect(disk)
    check_against_tools(disk, report)
    assert [e.content.type if e.content else None for e in report.partitions] == [
        "vfat", "swap", "ext4", "xfs", "crypto_LUKS", "btrfs", None]
    assert report.table.partitions[0].type_name == "EFI System"
    assert report.problems == ()


def test_type_names_are_sfdisks(tmp_path):
    """Every type name we give is the one ``sfdisk -T`` lists for that type."""
    listed = {}
    for label in ("gpt", "dos"):
        for line in run("sfdisk", "--label", label, "-T").stdout.decode().splitlines()[2:]:
            code, _, name = line.strip().partition(" ")
            listed[(label, code.upper())] = name.strip()
    for guid, name in GPT_TYPE_NAMES.items():
        assert listed[("gpt", guid)] == name
    for byte, name in MBR_TYPE_NAMES.items():
        assert listed[("dos", f"{byte:X}")] == name


def test_backup_gpt_when_the_primary_is_corrupt(tmp_path):
    """blkid reads the backup header at the last LBA when the primary's CRC fails; so do we, and say so."""
    disk = sized(tmp_path / "gpt.img", 64 * MiB)
    run("sfdisk", "-q", disk, input=b"label: gpt\nsize=8MiB\nsize=8MiB, type=S\n")
    expected = [(p.start, p.size, p.type) for p in inspect(disk).table.partitions]
    data = bytearray(disk.read_bytes())
    struct.pack_into("<I", data, 512 + 16, struct.unpack_from("<I", data, 512 + 16)[0] ^ 1)  # header CRC
    disk.write_bytes(bytes(data))
    report = inspect(disk)
    assert blkid(disk)["PTTYPE"] == "gpt"
    assert [(p.start, p.size, p.type) for p in report.table.partitions] == expected
    assert [p.code for p in report.problems] == ["guest.gpt-header", "guest.gpt-primary"]


def test_protective_mbr_without_gpt(tmp_path):
    disk = tmp_path / "pmbr.img"
    disk.write_bytes(bytes(mbr((0, 0xEE, 1, 2047))) + bytes(MiB - 512))
    report = inspect(disk)
    assert blkid(disk).get("PTTYPE") == "PMBR"
    assert report.table.scheme == "pmbr" and report.table.partitions == ()
    assert "guest.gpt-missing" in [p.code for p in report.problems]


def test_hybrid_iso_with_an_mbr(tmp_path):
    """xorriso's --protective-msdos-label: an ISO 9660 volume over the whole
    disk and an MBR in its system area; blkid reports both, so do we."""
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "file").write_text("hello")
    path = tmp_path / "hybrid.iso"
    run("xorriso", "-as", "mkisofs", "--protective-msdos-label", "-V", "HYBRID", "-o", path, tree)
    report = inspect(path)
    assert ours(report.content) == blkid_content(blkid(path))
    check_against_tools(path, report)


def test_hybrid_iso_with_a_gpt_of_248_entries(tmp_path):
    """xorriso's appended GPT partition: a GPT array of 248 entries (more than the
    usual 128) after the ISO, its partition holding a FAT; as blkid and sfdisk say."""
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "file").write_text("hello")
    fat = make_fs("fat12", tmp_path / "esp.img", "ESP")
    path = tmp_path / "hybrid.iso"
    run("xorriso", "-as", "mkisofs", "-appended_part_as_gpt", "-append_partition", "2", "0xef", fat,
        "-V", "HYBRIDGPT", "-o", path, tree)
    report = inspect(path)
    assert ours(report.content) == blkid_content(blkid(path))
    check_against_tools(path, report)
    assert [e.content.type for e in report.partitions if e.content] == ["vfat"]
    assert report.problems == ()


# ---- hostile tables: built by hand -------------------------------------------------


def mbr(*entries: tuple[int, int, int, int], disk_id: int = 0x12345678) -> bytearray:
    """A first sector with MBR entries (status, type, first LBA, sectors) and the 0x55AA signature."""
    sector = bytearray(512)
    struct.pack_into("<I", sector, 440, disk_id)
    for i, (status, kind, first, count) in enumerate(entries):
        struct.pack_into("<B3sB3sII", sector, 446 + 16 * i, status, b"", kind, b"", first, count)
    sector[510:512] = b"\x55\xaa"
    return sector


def codes(report) -> list[str]:
    return [p.code for p in report.problems]


class CountingDisk(io.BytesIO):
    """A guest disk in memory that counts its reads and the bytes they return."""

    def __init__(self, data: bytes) -> None:
        super().__init__(data)
        self.reads = self.bytes_read = 0

    def read(self, size: int | None = -1) -> bytes:
        self.reads += 1
        data = super().read(size)
        self.bytes_read += len(data)
        return data


def inspect_bytes(data: bytes):
    disk = CountingDisk(data)
    return inspect_guest(disk, len(data)), disk.reads


def test_partition_past_the_end_and_overlaps():
    data = bytes(mbr((0, 0x83, 2048, 4096), (0, 0x83, 4096, 100), (0, 0x83, 3000, 10_000_000))) + bytes(4 * MiB)
    report, _ = inspect_bytes(data)
    assert [p.number for p in report.table.partitions] == [1, 2, 3]
    assert codes(report) == ["guest.partition-past-end", "guest.partition-overlap", "guest.partition-overlap"]


def ebr_chain(links: list[tuple[int, int]], size: int = 8 * MiB) -> bytes:
    """An extended partition at sector 2048 whose EBRs sit at ``links``:
    (EBR sector relative to the extended partition, next link the same way, 0 for none);
    each EBR describes a 1-sector logical partition just after itself."""
    data = bytearray(size)
    ext_sectors = size // 512 - 2048
    data[:512] = mbr((0, 0x05, 2048, ext_sectors))
    for at, following in links:
        entries = [(0, 0x83, 1, 1)] + ([(0, 0x05, following, 2)] if following else [])
        data[(2048 + at) * 512 : (2048 + at) * 512 + 512] = mbr(*entries, disk_id=0)
    return bytes(data)


def test_looping_chain_of_logical_partitions():
    """An EBR whose link points back at an earlier one: libblkid stops (its link
    must move forward); we stop too, and name it."""
    report, reads = inspect_bytes(ebr_chain([(0, 4), (4, 0)]))
    assert [p.number for p in report.table.partitions] == [1, 5, 6]
    report, reads = inspect_bytes(ebr_chain([(0, 4), (4, 8), (8, 4)]))
    assert [p.number for p in report.table.partitions] == [1, 5, 6, 7]
    assert "guest.mbr-chain-loop" in codes(report)
    assert reads < 200


def test_endless_chain_of_logical_partitions_is_cut():
    links = [(4 * n, 4 * (n + 1)) for n in range(MAX_LOGICAL + 50)]
    report, reads = inspect_bytes(ebr_chain(links))
    assert len(report.table.partitions) == 1 + MAX_LOGICAL
    assert "guest.mbr-chain-length" in codes(report)


def gpt_disk(entry_count: int = 128, entries: list[tuple[bytes, int, int]] = (), size: int = 4 * MiB) -> bytes:
    """A GPT disk (512-byte sectors, array at LBA 2), ``entries`` (type GUID, first LBA, last LBA)."""
    sectors = size // 512
    array = bytearray(entry_count * 128)
    for i, (kind, first, last) in enumerate(entries):
        struct.pack_into("<16s16sQQQ72s", array, i * 128, kind, uuid.uuid4().bytes_le, first, last, 0,
                         "p".encode("utf-16-le"))
    header = bytearray(struct.pack("<8sIIIIQQQQ16sQIII", b"EFI PART", 0x10000, 92, 0, 0, 1, sectors - 1, 34,
                                   sectors - 34, uuid.uuid4().bytes_le, 2, entry_count, 128, zlib.crc32(array)))
    struct.pack_into("<I", header, 16, zlib.crc32(header))
    data = bytearray(size)
    data[:512] = mbr((0, 0xEE, 1, sectors - 1), disk_id=0)
    data[512 : 512 + 92] = header
    data[1024 : 1024 + min(len(array), size - 1024)] = array[: size - 1024]
    return bytes(data)


LINUX = uuid.UUID("0FC63DAF-8483-4772-8E79-3D69D8477DE4").bytes_le


def test_gpt_entries_outside_the_usable_area_are_skipped(tmp_path):
    data = gpt_disk(entries=[(LINUX, 2048, 4095), (LINUX, 10, 100), (LINUX, 5000, 4000), (LINUX, 3000, 9000)])
    path = tmp_path / "gpt.img"
    path.write_bytes(data)
    report = inspect(path)
    assert [p.number for p in report.table.partitions] == [1]
    assert codes(report) == ["guest.gpt-entry-outside"]
    assert report.problems[0].message.startswith("entry 2 (LBAs 10..100), entry 3 (LBAs 5000..4000), entry 4 ")
    assert blkid(path)["PTTYPE"] == "gpt"


def test_many_used_gpt_entries_are_capped():
    """200 used entries: the first 128 listed (and looked into), then a named problem."""
    entries = [(LINUX, 2048 + 8 * n, 2048 + 8 * n + 7) for n in range(200)]
    report, reads = inspect_bytes(gpt_disk(entry_count=256, entries=entries))
    assert [p.number for p in report.table.partitions] == list(range(1, 129))
    assert codes(report) == ["guest.gpt-partitions"]


def test_gpt_with_too_many_entries_is_not_read():
    """A header asking for a million entries (128 MiB of a 16 MiB disk): refused before reading them."""
    disk = CountingDisk(gpt_disk(entry_count=1_000_000, size=16 * MiB))
    report = inspect_guest(disk, 16 * MiB)
    assert report.table.scheme == "pmbr"
    assert "guest.gpt-header" in codes(report)
    assert disk.reads < 50 and disk.bytes_read < 2 * MiB


def test_reads_are_bounded_for_a_hostile_fat32(tmp_path):
    """A FAT32 whose root directory cluster chain points at itself, with 64 KiB
    clusters: the label search stops within the region's budget."""
    path = make_fs("fat32", tmp_path / "fat.img", "LOOP")
    data = bytearray(path.read_bytes())
    sector_size, reserved = struct.unpack_from("<HxH", data, 11)
    root = struct.unpack_from("<I", data, 44)[0]
    struct.pack_into("<I", data, reserved * sector_size + root * 4, root)  # the root chain loops
    first_data = reserved + struct.unpack_from("<I", data, 36)[0] * data[16]
    at = (first_data + (root - 2) * data[13]) * sector_size
    data[at : at + 32] = b"A" * 11 + b"\x20" + bytes(20)  # no label entry first: the search goes on
    report, reads = inspect_bytes(bytes(data))
    assert report.content.type == "vfat"
    assert reads <= MAX_READS + 1


def test_hostile_ntfs_record_size_is_a_named_problem(tmp_path):
    path = make_fs("ntfs", tmp_path / "ntfs.img", "BIG")
    data = bytearray(path.read_bytes())
    data[64] = 0xEB  # MFT records of 2 MiB, more than a region may read
    report, reads = inspect_bytes(bytes(data))
    assert report.content is None
    assert codes(report) == ["guest.read-limit"]
    assert blkid_content(blkid(write(tmp_path / "big.img", data))) is None  # no FILE record where blkid looks


def write(path: Path, data: bytes | bytearray) -> Path:
    path.write_bytes(bytes(data))
    return path


def test_every_mutation_ends_in_a_report(tmp_path):
    """Flipped bytes in the first sectors of real volumes and tables: a report, never a traceback."""
    import random

    rng = random.Random(12)
    samples = [make_fs(k, tmp_path / f"{k}.img", "M") .read_bytes()[: 2 * MiB] for k in ("fat16", "ext4", "ntfs")]
    samples.append(ebr_chain([(0, 4), (4, 8), (8, 0)], size=2 * MiB))
    samples.append(gpt_disk(entries=[(LINUX, 2048, 3000)], size=2 * MiB))
    for data in samples:
        for _ in range(60):
            mutated = bytearray(data)
            for _ in range(8):
                at = rng.randrange(0, 0x11000)
                mutated[at] = rng.randrange(256)
            report, reads = inspect_bytes(bytes(mutated))
            assert reads < 1000


# ---- empty --------------------------------------------------------------------------


def test_all_zero_disk_is_empty():
    report, _ = inspect_bytes(bytes(4 * MiB))
    assert report.empty and report.table is None and report.content is None


def test_table_or_data_is_not_empty():
    assert not inspect_bytes(bytes(mbr((0, 0x83, 2048, 100))) + bytes(2 * MiB))[0].empty
    assert not inspect_bytes(bytes(MiB - 1) + b"x" + bytes(MiB))[0].empty


def test_allocation_decides_when_known():
    assert inspect_guest(io.BytesIO(bytes(MiB)), MiB, allocated=True).empty is False
    data = bytes(mbr((0, 0x83, 2048, 100))) + bytes(MiB)
    assert inspect_guest(io.BytesIO(data), len(data), allocated=False).empty is True



# ---- through the data path: images of other formats, the command line -------------------------


def storprobe(*args: str | Path) -> subprocess.CompletedProcess:
    return subprocess.run([require("storprobe"), *map(str, args)], capture_output=True, text=True)


@pytest.fixture(scope="module")
def partitioned(tmp_path_factory) -> tuple[Path, Path]:
    """A GPT disk (an ext4 and a swap partition) as raw, and the same disk made
    qcow2 by ``qemu-img convert``."""
    d = tmp_path_factory.mktemp("partitioned")
    disk = sized(d / "disk.raw", 96 * MiB)
    run("sfdisk", "-q", disk, input=b"label: gpt\nsize=40MiB, name=\"data\"\nsize=16MiB, type=S\n")
    parts = sfdisk_json(disk)["partitions"]
    place(disk, parts[0]["start"] * 512, make_fs("ext4", d / "ext4.img", "data"))
    place(disk, parts[1]["start"] * 512, make_fs("swap", d / "swap.img", "sw"))
    qcow2 = d / "disk.qcow2"
    run("qemu-img", "convert", "-O", "qcow2", disk, qcow2)
    return disk, qcow2


def test_a_qcow2_reads_as_the_raw_it_was_made_from(partitioned):
    raw, qcow2 = partitioned
    assert inspect_image(qcow2) == inspect_image(raw) == inspect(raw)
    report = inspect_image(qcow2)
    assert [e.content.type for e in report.partitions] == ["ext4", "swap"]
    assert [e.content.label for e in report.partitions] == ["data", "sw"]


@pytest.mark.parametrize("commands", [(), ("write -z 0 1M",), ("write -P 0 0 64k", "discard 0 64k")])
def test_nothing_allocated_is_empty(tmp_path, commands):
    """A new qcow2, one with zero clusters only, one whose data was discarded:
    no data anywhere in the block status, as ``qemu-img map`` shows it."""
    path = tmp_path / "new.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", path, "64M")
    for command in commands:
        run("qemu-io", "-f", "qcow2", "-c", command, path)
    assert not any(e["data"] for e in json.loads(run("qemu-img", "map", "--output=json", path).stdout))
    report = inspect_image(path)
    assert report.empty and report.table is None and report.content is None


def test_data_anywhere_is_not_empty(tmp_path):
    """One byte far into a disk with no table: data is allocated, so not empty
    (the first MiB alone would say otherwise)."""
    path = tmp_path / "late.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", path, "64M")
    run("qemu-io", "-f", "qcow2", "-c", "write -P 1 40M 1", path)
    assert not inspect_image(path).empty
    raw = tmp_path / "late.raw"
    run("qemu-img", "convert", "-O", "raw", path, raw)
    assert inspect(raw).empty  # no allocation known: all-zero first MiB, no table


def test_inspect_command(partitioned):
    _, qcow2 = partitioned
    proc = storprobe("inspect", "--output", "json", qcow2)
    assert proc.returncode == 0, proc.stderr
    shown = json.loads(proc.stdout)
    assert shown["filename"] == str(qcow2) and shown["empty"] is False
    table = shown["partition-table"]
    assert table["type"] == "gpt" and table["id"] == sfdisk_json(partitioned[0])["id"]
    assert [(p["number"], p["content"]["type"]) for p in table["partitions"]] == [(1, "ext4"), (2, "swap")]
    assert table["partitions"][0]["name"] == "data" and table["partitions"][1]["type-name"] == "Linux swap"
    human = storprobe("inspect", qcow2)
    assert human.returncode == 0
    assert '    partition 1: start 1048576, size 40 MiB (41943040 bytes), type 0FC63DAF' in human.stdout
    assert '        content: ext4 1.0, label "data", uuid ' in human.stdout


def test_info_inspect_guest(partitioned):
    _, qcow2 = partitioned
    proc = storprobe("info", "--inspect-guest", "--output", "json", qcow2)
    assert proc.returncode == 0, proc.stderr
    shown = json.loads(proc.stdout)
    assert shown["format"] == "qcow2"
    alone = json.loads(storprobe("inspect", "--output", "json", qcow2).stdout)
    del alone["filename"]
    assert shown["storprobe"]["guest"] == alone
    human = storprobe("info", "--inspect-guest", qcow2)
    assert human.returncode == 0 and "\nguest:\n    virtual size: 96 MiB" in human.stdout
    xml = storprobe("info", "--inspect-guest", "--output", "xml", qcow2)
    assert xml.returncode == 2 and "--inspect-guest applies to --output human and json" in xml.stderr


def test_encrypted_image_is_refused_by_name(tmp_path):
    """The data path reads no encrypted image: inspect says why, status 1, no traceback."""
    path = tmp_path / "enc.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", "--object", "secret,id=s0,data=pw", "-o",
        "encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=10", path, "16M")
    proc = storprobe("inspect", path)
    assert proc.returncode == 1 and proc.stderr.startswith(f"storprobe: {path}: ")
    assert "Traceback" not in proc.stderr
    info = storprobe("info", "--inspect-guest", "--output", "json", path)  # the image is still described
    assert info.returncode == 1 and info.stderr.startswith(f"storprobe: {path}: guest disk: ")
    shown = json.loads(info.stdout)
    assert shown["format"] == "qcow2" and shown["encrypted"] is True
    assert shown["storprobe"]["guest"]["error"]["code"] == "datapath.encrypted"


@pytest.mark.parametrize("how", ["inflate", "l2"])
def test_unreadable_guest_data_is_a_named_error(tmp_path, how):
    """A compressed cluster that does not inflate, a cluster at a misaligned
    offset: the data path's named error, one line and status 1."""
    _, broken = broken_compressed_qcow2(tmp_path, how)
    proc = storprobe("inspect", broken)
    assert (proc.returncode, proc.stdout) == (1, "")
    assert proc.stderr.startswith(f"storprobe: {broken}: ") and proc.stderr.count("\n") == 1
