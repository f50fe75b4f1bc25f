"""The data path and verify of VDI (and the formats after it) against QEMU 7.2.

Images are made by qemu-img and written by qemu-io; ``storprobe map --output
json`` must print qemu-img map's text, open_image must read what ``qemu-img
convert -O raw`` writes, and ``storprobe verify`` must report (JSON and exit
status) what ``qemu-img check --output=json`` does, on clean images and on
images whose tables are broken by struct patches.
"""

from __future__ import annotations

import json
import struct
import subprocess
from pathlib import Path

import pytest

from storprobe import ProbeError
from storprobe.cli import main
from storprobe.datapath import IGNORE, LOCAL, open_image
from storprobe.verify import to_json, verify

from builders import BAT, LOG_GUID, Vhdx, log_entry
from oracle import qemu_guest_bytes, qemu_img_create, qemu_io, qemu_map, reads_as_qemu, require

MiB = 1024 * 1024


def assert_same_map(capsys: pytest.CaptureFixture[str], image: Path) -> str:
    """Our JSON map and human table of ``image`` are qemu-img's text."""
    theirs = qemu_map(image)
    assert theirs.returncode == 0, theirs.stderr
    status = main(["map", "--output", "json", str(image)])
    out, err = capsys.readouterr()
    assert (status, err, out) == (0, "", theirs.stdout.decode())
    human = qemu_map(image, output="human")
    status = main(["map", str(image)])
    assert (status, capsys.readouterr().out) == (human.returncode, human.stdout.decode())
    return theirs.stdout.decode()


def assert_reads_as_qemu(image: Path, tmp: Path) -> bytes:
    expected = qemu_guest_bytes(image, tmp)
    with open_image(image) as disk:
        assert disk.read() == expected
    return expected


def qemu_check(image: Path) -> tuple[dict | None, int, str]:
    proc = subprocess.run([require("qemu-img"), "check", "--output=json", str(image)], capture_output=True,
                          text=True, check=False)
    return (json.loads(proc.stdout) if proc.stdout.strip() else None), proc.returncode, proc.stdout


def assert_check_as_qemu(image: Path) -> dict | None:
    """Our verify report (parsed, and the command's text) and status are qemu-img check's."""
    theirs, status, text = qemu_check(image)
    report = verify(image)
    assert (json.loads(to_json(report)), report.exit_status) == (theirs, status)
    proc = subprocess.run([require("storprobe"), "verify", "--output", "json", str(image)], capture_output=True,
                          text=True, check=False)
    assert (proc.stdout, proc.returncode) == (text, status)
    return theirs


def patched(image: Path, name: str, *edits: tuple[int, str, int]) -> Path:
    """A copy of ``image`` with little-endian fields ``(offset, struct code, value)`` rewritten."""
    data = bytearray(image.read_bytes())
    for offset, code, value in edits:
        struct.pack_into("<" + code, data, offset, value)
    out = image.with_name(name)
    out.write_bytes(bytes(data))
    return out


# ---- vdi ----------------------------------------------------------------------------------------------------

VDI_BMAP, VDI_BLOCKS_ALLOCATED = 0x154, 0x184
VDI_WRITES = ("write -P 0x11 0 64k", "write -P 0x22 3M 4k", "write -z 2M 64k", "write -P 0x33 1500k 8k",
              "discard 3M 1M")


def vdi(tmp: Path, name: str = "d.vdi", size: str = "5M", *options: str, script: tuple[str, ...] = VDI_WRITES) -> Path:
    image = qemu_img_create(tmp / name, "vdi", size, *options)
    if script:
        qemu_io(image, *script)
    return image


def vdi_field(image: Path, offset: int) -> int:
    return struct.unpack_from("<I", image.read_bytes(), offset)[0]


@pytest.mark.parametrize("options", [(), ("static=on",)])
def test_vdi_map_read_and_check_as_qemu(tmp_path, capsys, options):
    """Dynamic: unallocated blocks are zeros this image decides (no backing);
    static: every block allocated, the file's holes marked as zeros."""
    image = vdi(tmp_path, "d.vdi", "5M", *options)
    text = assert_same_map(capsys, image)
    assert '"zero": true' in text and '"data": true' in text
    data = assert_reads_as_qemu(image, tmp_path)
    assert data[:65536] == b"\x11" * 65536 and data[3 * MiB : 3 * MiB + 4096] == b"\x22" * 4096
    assert assert_check_as_qemu(image) == {"check-errors": 0, "filename": str(image), "format": "vdi"}


def test_vdi_odd_sizes_and_a_block_map_longer_than_a_piece(tmp_path, capsys):
    """A disk of a size that is no whole block, and one whose block map spans
    several of the pieces it is read in (16384 entries each)."""
    odd = vdi(tmp_path, "odd.vdi", str(3 * MiB + 4608), script=("write -P 5 3M 4608", "write -P 6 1M 1k"))
    assert_same_map(capsys, odd)
    assert_reads_as_qemu(odd, tmp_path)
    big = vdi(tmp_path, "big.vdi", "40G", script=("write -P 7 17G 64k", "write -P 8 16383M 1M", "write -P 9 39G 4k"))
    assert_same_map(capsys, big)
    with open_image(big) as disk:
        for at in (17 << 30, (16383 << 20) - 512, 39 << 30):
            disk.seek(at)
            piece = disk.read(1 << 20)
            assert piece == qemu_read(big, at, 1 << 20, tmp_path)
    assert_check_as_qemu(big)


def qemu_read(image: Path, offset: int, length: int, tmp: Path) -> bytes:
    """``length`` guest bytes at ``offset``, as qemu-io reads them (dumped to a file)."""
    out = tmp / "piece.raw"
    spec = json.dumps({"driver": "raw", "offset": offset, "size": length,
                       "file": {"driver": "vdi", "file": {"driver": "file", "filename": str(image)}}})
    subprocess.run([require("qemu-img"), "convert", "-O", "raw", f"json:{spec}", str(out)], check=True)
    return out.read_bytes()


def vdi_entry(image: Path, block: int) -> int:
    return vdi_field(image, VDI_BMAP) + 4 * block


@pytest.mark.parametrize("case", ["duplicate", "too-large", "count-low", "discarded", "far-past-eof", "all"])
def test_vdi_broken_block_maps_as_qemu(tmp_path, capsys, case):
    """Block map entries QEMU's check counts as corruptions (exit 2), and what
    its reader makes of them: a block named twice reads twice, one past
    blocks_in_image or past the end of the file reads zeros, a discarded
    entry (0xfffffffe) reads zeros like an unallocated one."""
    image = vdi(tmp_path)
    allocated = vdi_field(image, VDI_BLOCKS_ALLOCATED)
    edits = {
        "duplicate": [(vdi_entry(image, 4), "I", 0)],
        "too-large": [(vdi_entry(image, 4), "I", 5)],
        "count-low": [(VDI_BLOCKS_ALLOCATED, "I", allocated - 1)],
        "discarded": [(vdi_entry(image, 0), "I", 0xFFFFFFFE), (VDI_BLOCKS_ALLOCATED, "I", allocated - 1)],
        "far-past-eof": [(vdi_entry(image, 1), "I", 0xFFFFFFFD)],
        "all": [(vdi_entry(image, 1), "I", 0), (vdi_entry(image, 4), "I", 0), (vdi_entry(image, 2), "I", 9),
                (VDI_BLOCKS_ALLOCATED, "I", 1)],
    }[case]
    broken = patched(image, f"{case}.vdi", *edits)
    assert_same_map(capsys, broken)
    assert_reads_as_qemu(broken, tmp_path)
    report = assert_check_as_qemu(broken)
    assert report is not None
    assert report.get("corruptions", 0) == {"too-large": 1, "count-low": 1, "discarded": 0, "all": 4}.get(case, 2)


def test_vdi_refused_where_qemu_reports_a_mismatch(tmp_path):
    """The probe refuses more blocks allocated than the image has (a count
    past the map; QEMU opens it and its check reports the mismatch, exit 2):
    the image is not read here, so verify fails (exit 1) with the probe's named error."""
    image = patched(vdi(tmp_path), "over.vdi", (VDI_BLOCKS_ALLOCATED, "I", 6))
    assert qemu_check(image)[1] == 2
    with pytest.raises(ProbeError) as caught:
        verify(image)
    assert caught.value.code == "vdi.blocks-allocated"


# ---- qed ----------------------------------------------------------------------------------------------------

QED_CLUSTER_SIZE, QED_TABLE_SIZE, QED_L1_OFFSET = 4, 8, 40
QED_WRITES = ("write -P 0x11 0 64k", "write -z 128k 8k", "write -P 0x22 1M 4k", "write -P 0x33 2M 4k",
              "write -P 0x44 1020k 8k", "write -z 3M 64k", "write -P 0x55 5M 12k")


def qed(tmp: Path, name: str = "a.qed", size: str = "6M", *options: str, script: tuple[str, ...] = QED_WRITES) -> Path:
    image = qemu_img_create(tmp / name, "qed", size, *options)
    if script:
        qemu_io(image, *script)
    return image


class QedTables:
    """A QED file's bytes with its L1 table and the L2 tables it names located."""

    def __init__(self, image: Path) -> None:
        self.data = bytearray(image.read_bytes())
        self.cluster, self.table_size = struct.unpack_from("<II", self.data, QED_CLUSTER_SIZE)
        self.l1 = struct.unpack_from("<Q", self.data, QED_L1_OFFSET)[0]
        self.entries = self.table_size * self.cluster // 8

    def u64(self, offset: int) -> int:
        return struct.unpack_from("<Q", self.data, offset)[0]

    def l1_entry(self, guest: int) -> int:
        return self.l1 + 8 * (guest // (self.entries * self.cluster))

    def l2_entry(self, guest: int) -> int:
        return self.u64(self.l1_entry(guest)) + 8 * (guest // self.cluster % self.entries)

    def save(self, path: Path) -> Path:
        path.write_bytes(bytes(self.data))
        return path


@pytest.mark.parametrize("options", [("cluster_size=4096",), (), ("cluster_size=65536", "table_size=16"),
                                     ("cluster_size=1M", "table_size=1")])
def test_qed_map_read_and_check_as_qemu(tmp_path, capsys, options):
    if "table_size=1" in options:
        # QEMU 7.2's table-offset check wraps for one-cluster tables: it opens no such image; read as the spec says
        image = qed(tmp_path, "a.qed", "6M", *options, script=())
        assert "QED table offset is invalid" in subprocess.run([require("qemu-io"), "-c", "read 0 512", str(image)],
                                                               capture_output=True, text=True).stderr
        assert verify(image).exit_status == 0
        with open_image(image) as disk:
            assert disk.read() == bytes(6 * MiB)
        return
    image = qed(tmp_path, "a.qed", "6M", *options)
    text = assert_same_map(capsys, image)
    assert '"present": false' in text and '"present": true, "zero": false, "data": true' in text
    data = assert_reads_as_qemu(image, tmp_path)
    assert data[2 * MiB : 2 * MiB + 4096] == b"\x33" * 4096
    report = assert_check_as_qemu(image)
    assert report is not None and report["allocated-clusters"] > 0


@pytest.mark.parametrize("backing_fmt", ["qed", "raw", "qcow2"])
def test_qed_over_a_backing_file(tmp_path, capsys, backing_fmt):
    """Unallocated clusters are the backing file's (longer or shorter than the
    image); zero clusters hide it; a raw backing is recorded with no-probe."""
    base = qemu_img_create(tmp_path / f"base.{backing_fmt}", backing_fmt, "4M")
    qemu_io(base, "write -P 0x61 0 4M", fmt=backing_fmt)
    top = qed(tmp_path, "top.qed", "6M", f"backing_file={base.name}", f"backing_fmt={backing_fmt}",
              script=("write -P 0x11 64k 4k", "write -z 1M 64k", "write -P 0x22 5M 4k"))
    text = assert_same_map(capsys, top)
    assert '"depth": 1' in text
    expected = qemu_guest_bytes(top, tmp_path)
    with open_image(top, backing=tmp_path) as disk:
        assert disk.read() == expected
    with pytest.raises(ProbeError) as caught:
        open_image(top)  # the default policy: an untrusted image does not choose what else is read
    assert caught.value.code == "backing.refused"
    assert expected[1 * MiB : 1 * MiB + 65536] == bytes(65536) and expected[2 * MiB] == 0x61
    assert_check_as_qemu(top)


def qed_map_fails_as_qemu(capsys: pytest.CaptureFixture[str], image: Path, code: str) -> None:
    """qemu-img map and convert fail on ``image``; ours are the named error ``code``."""
    assert qemu_map(image).returncode != 0
    assert subprocess.run([require("qemu-img"), "convert", "-O", "raw", str(image), "/dev/null"],
                          capture_output=True).returncode != 0
    status = main(["map", "--output", "json", str(image)])
    _, err = capsys.readouterr()
    assert status == 1 and err.startswith(f"storprobe: {image}: ") and err.count("\n") == 1, err
    with pytest.raises(ProbeError) as caught, open_image(image) as disk:
        disk.read()
    assert caught.value.code == code


#: Two data runs in the first L2 table (4 KiB clusters, 4-cluster tables: 8 MiB each), nothing beyond it.
SMALL_QED_WRITES = ("write -P 1 0 64k", "write -P 2 2M 4k")


@pytest.mark.parametrize("case", ["unaligned", "past-eof", "l1-unaligned", "l1-past-eof"])
def test_qed_invalid_offsets_fail_reads_and_are_corruptions(tmp_path, capsys, case):
    t = QedTables(qed(tmp_path, "a.qed", "20M", "cluster_size=4096", script=SMALL_QED_WRITES))
    if case.startswith("l1"):
        at, value = t.l1_entry(2 * MiB), (t.u64(t.l1_entry(2 * MiB)) + 512 if case == "l1-unaligned"
                                          else len(t.data) + 4 * t.cluster)
        code = "qed.l2-offset"
    else:
        at, value = t.l2_entry(2 * MiB), {"unaligned": t.u64(t.l2_entry(2 * MiB)) + 512,
                                          "past-eof": len(t.data) // t.cluster * t.cluster}[case]
        code = "qed.cluster-offset"
    struct.pack_into("<Q", t.data, at, value)
    broken = t.save(tmp_path / f"{case}.qed")
    qed_map_fails_as_qemu(capsys, broken, code)
    report = assert_check_as_qemu(broken)
    assert report is not None and report["corruptions"] >= 1


@pytest.mark.parametrize("case", ["shared-data", "shared-table", "leak", "zero-l1", "run-past-eof"])
def test_qed_check_counts_as_qemu(tmp_path, capsys, case):
    """A data cluster two entries name, an L2 table two L1 entries name (the
    second not walked), a cluster nothing names (a leak: exit 3), an L1 entry
    of 1 (zero clusters exist only in L2 tables), and a data run whose
    contiguous continuation lies past the end of the file (QEMU checks a run's
    first cluster only: it maps it, reads zeros, and check counts it)."""
    t = QedTables(qed(tmp_path, "a.qed", "20M", "cluster_size=4096", script=SMALL_QED_WRITES))
    if case == "shared-data":
        struct.pack_into("<Q", t.data, t.l2_entry(1 * MiB), t.u64(t.l2_entry(0)))
    elif case == "shared-table":
        struct.pack_into("<Q", t.data, t.l1_entry(16 * MiB), t.u64(t.l1_entry(0)))
    elif case == "leak":
        t.data += bytes([7]) * t.cluster
    elif case == "zero-l1":
        struct.pack_into("<Q", t.data, t.l1_entry(16 * MiB), 1)
    else:
        last = t.l2_entry(2 * MiB)
        struct.pack_into("<Q", t.data, last + 8, t.u64(last) + t.cluster)
    broken = t.save(tmp_path / f"{case}.qed")
    theirs = qemu_map(broken)
    if theirs.returncode == 0:
        assert_same_map(capsys, broken)
        assert_reads_as_qemu(broken, tmp_path)
    else:
        qed_map_fails_as_qemu(capsys, broken, "qed.l2-offset")
    report = assert_check_as_qemu(broken)
    assert report is not None
    assert (report.get("corruptions", 0), report.get("leaks", 0)) != (0, 0) or case == "run-past-eof"


# ---- vhdx ---------------------------------------------------------------------------------------------------

VHDX_WRITES = ("write -P 0x11 0 64k", "write -P 0x22 3M 4k", "write -z 5M 1M", "write -P 0x33 7M 2M", "discard 8M 1M")
FULLY_PRESENT, PARTIALLY_PRESENT, BAT_ZERO = 6, 7, 2


def vhdx(tmp: Path, name: str = "a.vhdx", size: str = "10M", *options: str,
         script: tuple[str, ...] = VHDX_WRITES) -> Path:
    image = qemu_img_create(tmp / name, "vhdx", size, *options)
    if script:
        qemu_io(image, *script)
    return image


def bat_entry(v: Vhdx, index: int) -> int:
    """The file offset of BAT entry ``index`` (payload blocks and sector bitmaps interleaved)."""
    return v.region_offset(BAT) + 8 * index


@pytest.mark.parametrize("options", [("subformat=dynamic", "block_size=1M"), ("subformat=dynamic", "block_size=8M"),
                                     ("subformat=fixed", "block_size=1M"), ()])
def test_vhdx_map_read_and_check_as_qemu(tmp_path, capsys, options):
    """QEMU has no block status for VHDX: its map is one data range with no
    offset (the human table fails, as qemu-img's does); reads go through the BAT."""
    image = vhdx(tmp_path, "a.vhdx", "10M", *options)
    assert assert_same_map(capsys, image).count("\n") == 1
    data = assert_reads_as_qemu(image, tmp_path)
    assert data[3 * MiB : 3 * MiB + 4096] == b"\x22" * 4096 and data[5 * MiB : 6 * MiB] == bytes(MiB)
    assert assert_check_as_qemu(image) == {"check-errors": 0, "filename": str(image), "format": "vhdx"}


@pytest.mark.parametrize("state", [BAT_ZERO, 3, 5, 1, 0, 4, PARTIALLY_PRESENT])
def test_vhdx_block_states_read_as_qemu(tmp_path, capsys, state):
    """A present block's BAT state rewritten: zero, unmapped (3, and 5 of
    v0.95), undefined and not present read as zeros; 4 and partially present
    are QEMU's I/O error and our named error. None is a check corruption."""
    image = vhdx(tmp_path, "a.vhdx", "10M", "block_size=1M")
    v = Vhdx(image)
    at = bat_entry(v, 7)
    v.put(at, "<Q", struct.unpack_from("<Q", v.data, at)[0] & ~7 | state)
    broken = Vhdx(tmp_path / f"state{state}.vhdx", bytes(v.data)).save()
    assert_same_map(capsys, broken)
    if state in (4, PARTIALLY_PRESENT):
        assert subprocess.run([require("qemu-img"), "convert", "-O", "raw", str(broken), "/dev/null"],
                              capture_output=True).returncode != 0
        with pytest.raises(ProbeError) as caught, open_image(broken) as disk:
            disk.read()
        assert caught.value.code == "vhdx.block-state"
    else:
        assert assert_reads_as_qemu(broken, tmp_path)[7 * MiB : 8 * MiB] == bytes(MiB)
    assert_check_as_qemu(broken)


def test_vhdx_with_a_log_to_replay_is_not_opened(tmp_path, capsys):
    """A valid log entry: QEMU opens the image read-write only (it replays the
    log, rewriting the file), so map, convert and check fail; ours are named errors."""
    v = Vhdx(vhdx(tmp_path, "a.vhdx", "10M", "block_size=1M"))
    v.both_headers(48, "16s", LOG_GUID)
    v.put_log(0, log_entry(v, 1, b"\x5a" * 4096))
    image = Vhdx(tmp_path / "log.vhdx", bytes(v.data)).save()
    assert qemu_map(image).returncode != 0
    assert qemu_check(image)[1] == 1
    status = main(["map", "--output", "json", str(image)])
    assert status == 1 and "log needs replaying" in capsys.readouterr().err
    with pytest.raises(ProbeError) as caught:
        open_image(image)
    assert caught.value.code == "vhdx.not-opened"
    proc = subprocess.run([require("storprobe"), "verify", "--output", "json", str(image)], capture_output=True,
                          text=True, check=False)
    assert (proc.stdout, proc.returncode) == ("", 1) and "log needs replaying" in proc.stderr


def test_vhdx_bat_entries_qemu_counts_in_a_bat_the_probe_does_not_scan(tmp_path):
    """A BAT larger than the probe scans (4 MiB: a 600 GiB disk of 1 MiB
    blocks): fully present entries past the end of the file, overflowing, or
    over the metadata region are corruptions QEMU's check counts (each rule
    once), and a read of such a block is a named error where QEMU's open fails."""
    image = vhdx(tmp_path, "big.vhdx", "600G", "block_size=1M", script=("write -P 1 0 1M", "write -P 2 300G 4k"))
    v = Vhdx(image)
    end = len(v.data) // MiB * MiB
    for index, offset in ((2, end + 4 * MiB), (3, 0xFFFFFFFFFFF00000), (4, v.metadata), (5, 0)):
        v.put(bat_entry(v, index), "<Q", offset | FULLY_PRESENT)
    broken = Vhdx(tmp_path / "bad-bat.vhdx", bytes(v.data)).save()
    theirs = assert_check_as_qemu(broken)
    assert theirs is not None and theirs["corruptions"] == 4
    assert subprocess.run([require("qemu-img"), "convert", "-O", "raw", str(broken), "/dev/null"],
                          capture_output=True).returncode != 0
    with open_image(broken) as disk:
        assert disk.pread(0, 4096) == b"\x01" * 4096
        for block in (2, 3, 4):
            with pytest.raises(ProbeError) as caught:
                disk.pread(block * MiB, 512)
            assert caught.value.code == "vhdx.bat-entry"
        assert disk.pread(300 << 30, 4096) == b"\x02" * 4096


def test_vhdx_truncated_bat_entry_is_refused_by_the_probe(tmp_path):
    """A fully present entry past the end of a BAT the probe scans: the probe
    refuses the image (vhdx.truncated: QEMU's open refuses it too), so verify
    cannot report what qemu-img check does when it opens it for checking only
    (a corruption, exit 2): ours is exit 1 with the named error."""
    v = Vhdx(vhdx(tmp_path, "a.vhdx", "10M", "block_size=1M"))
    v.put(bat_entry(v, 1), "<Q", (len(v.data) + 8 * MiB) // MiB * MiB | FULLY_PRESENT)
    broken = Vhdx(tmp_path / "trunc.vhdx", bytes(v.data)).save()
    assert qemu_check(broken)[1] == 2
    with pytest.raises(ProbeError) as caught:
        verify(broken)
    assert caught.value.code == "vhdx.truncated"


# ---- parallels ----------------------------------------------------------------------------------------------

PARALLELS_INUSE, PARALLELS_BAT, INUSE_DIRTY = 44, 64, 0x746F6E59
PARALLELS_WRITES = ("write -P 0x11 0 64k", "write -P 0x22 3M 4k", "write -z 5M 1M", "write -P 0x33 1M 8k",
                    "discard 3M 1M", "write -P 0x44 8M 2M")


def parallels(tmp: Path, name: str = "a.hdd", size: str = "12M", *options: str,
              script: tuple[str, ...] = PARALLELS_WRITES) -> Path:
    image = qemu_img_create(tmp / name, "parallels", size, *options)
    if script:
        qemu_io(image, *script)
    return image


def bat(image: Path, index: int) -> int:
    return struct.unpack_from("<I", image.read_bytes(), PARALLELS_BAT + 4 * index)[0]


@pytest.mark.parametrize("options", [(), ("cluster_size=64k",), ("cluster_size=4k",)])
def test_parallels_map_read_and_check_as_qemu(tmp_path, capsys, options):
    image = parallels(tmp_path, "a.hdd", "12M", *options)
    text = assert_same_map(capsys, image)
    assert '"present": false' in text and '"offset"' in text
    data = assert_reads_as_qemu(image, tmp_path)
    assert data[8 * MiB : 10 * MiB] == b"\x44" * (2 * MiB)
    report = assert_check_as_qemu(image)
    assert report is not None and report["allocated-clusters"] > 0


def test_parallels_old_magic_counts_offsets_in_sectors(tmp_path, capsys):
    """``WithoutFreeSpace``: a BAT entry is the cluster's offset in sectors, not
    in clusters (QEMU's off_multiplier 1), and the size only the low 32 bits."""
    image = parallels(tmp_path, script=("write -P 0x11 0 64k", "write -P 0x22 2M 1M"))
    old = patched(image, "old.hdd")
    old.write_bytes(b"WithoutFreeSpace" + old.read_bytes()[16:])
    assert_same_map(capsys, old)
    assert_reads_as_qemu(old, tmp_path)
    assert_check_as_qemu(old)


@pytest.mark.parametrize("case", ["unclean", "past-eof", "leak", "fragmented", "shared", "far"])
def test_parallels_check_and_reads_as_qemu(tmp_path, capsys, case):
    """Not closed cleanly (a corruption), a cluster past the end of the file (a
    corruption; it reads as zeros), space past the last cluster (leaks: exit 3),
    clusters out of order (fragmented), two entries naming one cluster (QEMU
    does not notice), an entry far past the end (zeros)."""
    image = parallels(tmp_path)
    first, last = bat(image, 0), bat(image, 8)
    edits = {
        "unclean": [(PARALLELS_INUSE, "I", INUSE_DIRTY)],
        "past-eof": [(PARALLELS_BAT + 4 * 4, "I", last + 3)],
        "leak": [],
        "fragmented": [(PARALLELS_BAT, "I", last), (PARALLELS_BAT + 4 * 8, "I", first)],
        "shared": [(PARALLELS_BAT + 4 * 2, "I", first)],
        "far": [(PARALLELS_BAT + 4 * 11, "I", 0xFFFFFFFF)],
    }[case]
    broken = patched(image, f"{case}.hdd", *edits)
    if case == "leak":
        broken.write_bytes(broken.read_bytes() + bytes(3 * MiB + 512))
    assert_same_map(capsys, broken)
    assert_reads_as_qemu(broken, tmp_path)
    report = assert_check_as_qemu(broken)
    assert report is not None
    assert {"unclean": report.get("corruptions"), "past-eof": report.get("corruptions"), "leak": report.get("leaks"),
            "fragmented": report.get("fragmented-clusters"), "shared": 1, "far": report.get("corruptions")}[case]


# ---- mutated tables, every format: QEMU's I/O error and our named error agree ------------------------------


def vdi_tables(image: Path) -> tuple[list[int], str]:
    data = image.read_bytes()
    bmap, blocks = struct.unpack_from("<I", data, VDI_BMAP)[0], struct.unpack_from("<I", data, 0x180)[0]
    return [bmap + 4 * i for i in range(blocks)], "I"


def qed_tables(image: Path) -> tuple[list[int], str]:
    t = QedTables(image)
    l2s = {t.u64(t.l1 + 8 * i) for i in range(t.entries)} - {0}
    return [table + 8 * i for table in sorted({t.l1} | l2s) for i in range(16)], "Q"


def vhdx_tables(image: Path) -> tuple[list[int], str]:
    v = Vhdx(image)
    return [bat_entry(v, i) for i in range(12)], "Q"


def parallels_tables(image: Path) -> tuple[list[int], str]:
    return [PARALLELS_BAT + 4 * i for i in range(12)], "I"


SEEDS = {
    "vdi": lambda tmp: vdi(tmp, "seed.vdi"),
    "qed": lambda tmp: qed(tmp, "seed.qed", "20M", "cluster_size=4096", script=SMALL_QED_WRITES + QED_WRITES),
    "vhdx": lambda tmp: vhdx(tmp, "seed.vhdx", "10M", "block_size=1M"),
    "parallels": lambda tmp: parallels(tmp, "seed.hdd"),
}
TABLES = {"vdi": vdi_tables, "qed": qed_tables, "vhdx": vhdx_tables, "parallels": parallels_tables}


#: Where the probe refuses what QEMU 7.2 opens, and why the spec wins.
STRICTER_THAN_QEMU = {
    # MS-VHDX: payload blocks lie past the header section's first MiB; QEMU registers only the log and the
    # regions, so it reads a block at offset 0 from the file's identifier and headers
    "vhdx.block-overlap",
}


@pytest.mark.parametrize("fmt", sorted(SEEDS))
def test_mutated_tables_agree_with_qemu(tmp_path, capsys, fmt):
    """A seeded campaign over each format's block tables (entries set to
    boundary values, other entries' values, random bits): where qemu-img maps,
    reads or checks the result, ours prints, reads and reports the same; where
    it fails, ours is a named error (the probe's, where it refuses the image)."""
    import random

    seed = SEEDS[fmt](tmp_path)
    original = seed.read_bytes()
    places, code = TABLES[fmt](seed)
    width = struct.calcsize(code)
    existing = sorted({struct.unpack_from("<" + code, original, at)[0] for at in places})
    mib_steps = [k * MiB | state for k in (0, 1, 2, 3, len(original) // MiB, 4096) for state in (0, 2, 6, 7)]
    boundaries = [0, 1, 2, 4096, 4096 + 512, len(original), len(original) * 4, 2 ** (8 * width) - 1,
                  2 ** (8 * width) - 2, 2 ** (8 * width - 1)] + (mib_steps if fmt == "vhdx" else [])
    rng = random.Random(f"{fmt}-12")
    agreed = {"read": 0, "refused": 0}
    for case in range(30):
        data = bytearray(original)
        for _ in range(rng.randint(1, 3)):
            pool = rng.choice((boundaries, existing))
            value = rng.choice(pool) if rng.random() < 0.9 else rng.getrandbits(8 * width)
            struct.pack_into("<" + code, data, rng.choice(places), value % 2 ** (8 * width))
        image = tmp_path / f"m{case}.{fmt}"
        image.write_bytes(bytes(data))
        try:
            verify(image)
        except ProbeError as exc:
            assert qemu_check(image)[1] != 0 or exc.code in STRICTER_THAN_QEMU, f"case {case}: QEMU checks it"
            agreed["refused"] += 1
            continue
        assert_check_as_qemu(image)
        theirs = qemu_map(image)
        status = main(["map", "--output", "json", str(image)])
        out, err = capsys.readouterr()
        if theirs.returncode == 0:
            assert (status, out) == (0, theirs.stdout.decode()), f"case {case}: {err}"
        else:
            assert status == 1 and err.startswith("storprobe: "), f"case {case}: QEMU refuses to map, we map"
        agreed["read" if reads_as_qemu(image, tmp_path, case) else "refused"] += 1
    assert agreed["read"], agreed


def test_tables_larger_than_the_cache_are_read_not_kept(tmp_path):
    """A cache smaller than one piece of a table: every format still reads what qemu-img reads."""
    for make in SEEDS.values():
        image = make(tmp_path)
        with open_image(image, cache_bytes=512) as disk:
            assert disk.read() == qemu_guest_bytes(image, tmp_path)


def test_parallels_disk_of_a_tebibyte_which_qemu_cannot_map(tmp_path, capsys):
    """qemu-img 7.2 aborts mapping a parallels disk of 1 TiB or more (its
    block_status counts sectors in an int, and the block layer asserts); the
    map here is the BAT's: two data clusters, the rest unallocated, one
    extent per run, and the data reads as qemu-io wrote it."""
    image = parallels(tmp_path, "big.hdd", "1T", script=("write -P 1 500G 4k", "write -P 2 0 4k"))
    assert qemu_map(image).returncode != 0
    status = main(["map", "--output", "json", str(image)])
    lines = capsys.readouterr().out.splitlines()
    assert status == 0 and len(lines) == 4
    assert [json.loads(line.strip("[],"))["data"] for line in lines] == [True, False, True, False]
    with open_image(image) as disk:
        assert disk.pread(500 << 30, 4096) == b"\x01" * 4096 and disk.pread(0, 4096) == b"\x02" * 4096


def test_vhdx_differencing_disk_is_not_opened(tmp_path):
    """QEMU 7.2 opens no differencing VHDX (its sector bitmaps are not read):
    neither does the data path, whatever the backing policy."""
    parent = vhdx(tmp_path, "parent.vhdx", "10M", "block_size=1M")
    v = Vhdx(vhdx(tmp_path, "child.vhdx", "10M", "block_size=1M", script=()))
    v.make_differencing({"relative_path": parent.name})
    child = v.save()
    assert qemu_map(child).returncode != 0
    for policy in (LOCAL, IGNORE, tmp_path):
        with pytest.raises(ProbeError) as caught:
            open_image(child, backing=policy)
        assert caught.value.code == "vhdx.not-opened"


@pytest.mark.parametrize("fmt", sorted(SEEDS))
def test_check_reads_within_its_budget(tmp_path, fmt):
    """Every table a check reads counts against the read budget: one too small
    is a named error, never a longer read; the default is enough."""
    image = SEEDS[fmt](tmp_path)
    with pytest.raises(ProbeError) as caught:
        verify(image, budget=16)
    assert caught.value.code == "verify.read-limit"
    assert verify(image).exit_status == qemu_check(image)[1]
