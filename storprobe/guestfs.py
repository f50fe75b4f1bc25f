"""What a guest disk holds at a partition's start: a filesystem, swap, an LVM
physical volume or a LUKS header, told by its superblock as libblkid tells it
(util-linux libblkid/src/superblocks/*.c: the same signatures, sanity checks
and checksums, tried in libblkid's order, named with blkid's ``TYPE``).

Each prober is ``(Region) -> Content | None`` and reads a bounded number of
small pieces through its :class:`Region`, whose budget stops a hostile
superblock (a root directory said to be gigabytes long, a cluster chain that
loops) with :class:`GuestReadLimit`. Labels and UUIDs are formatted as blkid
prints them: labels up to the first NUL with trailing white space removed,
DCE UUIDs in lower case, serial numbers as their own format writes them.
"""

from __future__ import annotations

import hashlib
import struct
import uuid
import zlib
from collections.abc import Callable
from typing import NamedTuple

from .errors import ProbeError

#: Bytes read at once from a region's start: every superblock below lies in
#: them but for directories and NTFS's MFT (btrfs's ends at 68 KiB).
HEAD = 0x11000
#: What one region may read beyond its head: this many reads, this many bytes.
MAX_READS = 64
MAX_BYTES = 1 << 20
#: Most directory entries searched for a FAT or exFAT volume label (libblkid
#: reads a FAT12/16 root directory whole, up to 65535 entries, and follows
#: a FAT32 or exFAT root directory for 100 clusters or 256 MiB); the label is
#: the first entry mkfs writes.
MAX_DIR_ENTRIES = 4096
MAX_DIR_CLUSTERS = 16
#: libblkid's "tiny device" (a floppy or so), where it looks for no RAID member.
TINY = 1440 * 1024
_WHITESPACE = b" \t\n\v\f\r"

Reader = Callable[[int, int], bytes]


class GuestReadLimit(ProbeError):
    """A superblock asks for more reads or bytes than a region's budget."""

    code = "guest.read-limit"


class Content(NamedTuple):
    """What starts a region, as blkid names it."""

    type: str  # blkid's TYPE: ext4, vfat, ntfs, swap, crypto_LUKS, LVM2_member ...
    usage: str  # blkid's USAGE: filesystem, crypto, raid, other
    label: str | None = None
    uuid: str | None = None
    version: str | None = None


class Region:
    """A window of the guest disk (a partition, or the whole disk), read through
    a budget: offsets are relative to its start and nothing past its end is read."""

    def __init__(self, read: Reader, start: int, size: int) -> None:
        self._read, self.start, self.size = read, start, size
        self.reads = 0
        self.bytes = 0
        self.head = read(start, min(size, HEAD))

    def read(self, offset: int, length: int) -> bytes:
        """Up to ``length`` bytes at ``offset`` (fewer at the region's end)."""
        length = max(0, min(length, self.size - offset))
        if offset < 0 or length == 0:
            return b""
        if offset + length <= len(self.head):
            return self.head[offset : offset + length]
        self.reads += 1
        self.bytes += length
        if self.reads > MAX_READS or self.bytes > MAX_BYTES:
            raise GuestReadLimit(
                f"the superblock at byte {self.start} asks for more than {MAX_READS} reads or {MAX_BYTES} bytes"
            )
        return self._read(self.start + offset, length)


# ---- formatting as blkid does ----------------------------------------------------


def _label(raw: bytes) -> str | None:
    """A byte-string label: up to the first NUL, trailing white space removed."""
    text = raw.split(b"\0", 1)[0].rstrip(_WHITESPACE)
    return text.decode("utf-8", "replace") or None


def _utf16_label(raw: bytes, encoding: str = "utf-16-le") -> str | None:
    text = raw[: len(raw) & ~1].decode(encoding, "replace").split("\0", 1)[0]
    return text.rstrip(_WHITESPACE.decode()) or None


def _uuid(raw: bytes) -> str | None:
    """A 16-byte DCE UUID in lower case; None when all zero (blkid leaves it out)."""
    return str(uuid.UUID(bytes=raw)) if any(raw) else None


def _serial(raw: bytes) -> str | None:
    """A 4-byte little-endian volume serial as ``XXXX-XXXX`` (FAT, exFAT)."""
    return f"{raw[3]:02X}{raw[2]:02X}-{raw[1]:02X}{raw[0]:02X}" if any(raw) else None


def _le(raw: bytes | bytearray, offset: int, width: int) -> int:
    return int.from_bytes(raw[offset : offset + width], "little")


def _be(raw: bytes, offset: int, width: int) -> int:
    return int.from_bytes(raw[offset : offset + width], "big")


def _power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli), as ext4, XFS and btrfs checksum their superblocks
    (google-crc32c's C code, as the vhdx row uses; loaded when first needed)."""
    from google_crc32c import value

    return int(value(data))


# ---- the probers, in libblkid's order ---------------------------------------------


def _lvm2(region: Region) -> Content | None:
    """An LVM2 physical volume: a ``LABELONE`` label in one of the first four
    sectors, naming its own sector, CRC over the rest of the label."""
    head = region.head
    for magic_at in (0x218, 0x018, 0x418, 0x618):
        if head[magic_at : magic_at + 8] == b"LVM2 001":
            break
    else:
        return None
    sector = magic_at // 1024 * 2
    buf = head[sector * 512 : sector * 512 + 1024]
    if buf[512:520] == b"LABELONE" and buf[:8] != b"LABELONE":
        sector, buf = sector + 1, buf[512:]
    if buf[:8] != b"LABELONE" or _le(buf, 8, 8) != sector or _lvm_crc(buf[20:512]) != _le(buf, 16, 4):
        return None
    pv = buf[32:64].decode("ascii", "replace")
    pv_uuid = "-".join((pv[:6], pv[6:10], pv[10:14], pv[14:18], pv[18:22], pv[22:26], pv[26:]))
    return Content("LVM2_member", "raid", uuid=pv_uuid, version="LVM2 001")


def _lvm_crc(data: bytes) -> int:
    """LVM2's label checksum: CRC-32 by nibbles from LVM's own initial value."""
    crc = 0xF597A6CF
    for byte in data:
        crc ^= byte
        crc = (crc >> 4) ^ _NIBBLE_CRC[crc & 0xF]
        crc = (crc >> 4) ^ _NIBBLE_CRC[crc & 0xF]
    return crc


def _nibble_table() -> list[int]:
    table = []
    for nibble in range(16):
        crc = nibble
        for _ in range(4):
            crc = (crc >> 1) ^ (0xEDB88320 if crc & 1 else 0)
        table.append(crc)
    return table


_NIBBLE_CRC = _nibble_table()


def _luks(region: Region) -> Content | None:
    """A LUKS1 or LUKS2 header at the region's start (the primary one: a
    secondary LUKS2 header alone is not looked for, as ``blkid -p``)."""
    hdr = region.head
    if hdr[:6] != b"LUKS\xba\xbe" or len(hdr) < 512:
        return None
    version = _be(hdr, 6, 2)
    if version == 2 and _be(hdr, 0x100, 8) != 0:  # hdr_offset of a primary header
        return None
    found = Content("crypto_LUKS", "crypto", version=str(version))
    if version in (1, 2):
        found = found._replace(uuid=_label(hdr[168:208]))
    if version == 2:
        found = found._replace(label=_label(hdr[24:72]))
    return found


#: BitLocker's boot sectors: Vista's, Windows 7's and later, BitLocker To Go's.
_BITLOCKER = {b"\xeb\x52\x90-FVE-FS-": None, b"\xeb\x58\x90-FVE-FS-": 176, b"\xeb\x58\x90MSWIN4.1": 440}
#: The FVE metadata a BitLocker volume's description is searched in, at most.
MAX_FVE_METADATA = 64 << 10


def _bitlocker(region: Region) -> Content | None:
    """A BitLocker volume: its boot sector, and (but for Vista's) the FVE
    metadata block it points at, with the version, the volume's GUID and the
    description Windows shows as its label (as libblkid since 2.40 reads them)."""
    bs = region.head[:512]
    if bs[:11] not in _BITLOCKER or len(bs) < 512:
        return None
    pointer = _BITLOCKER[bs[:11]]
    if pointer is None:
        return Content("BitLocker", "crypto")
    at = _le(bs, pointer, 8)
    if not at or at % 64:
        return None
    fve = region.read(at, 64 + 48)  # the block header, then the metadata header
    if fve[:8] != b"-FVE-FS-" or len(fve) < 112:
        return None
    found = Content("BitLocker", "crypto", version=str(_le(fve, 10, 2)))
    ident = fve[80:96]
    if any(ident):
        found = found._replace(uuid=str(uuid.UUID(bytes_le=ident)))
    size = _le(fve, 64, 4)
    metadata = region.read(at + 64, min(size, MAX_FVE_METADATA))
    entry = 48
    while entry + 8 < min(size, len(metadata)):
        length, kind, value = struct.unpack_from("<HHH", metadata, entry)
        if entry % 2 or length < 8 or entry + length > size:
            break
        if kind == 0x0007 and value == 0x0002:  # the description, a string
            return found._replace(label=_utf16_label(metadata[entry + 8 : entry + length]))
        entry += length
    return found


def _vfat(region: Region) -> Content | None:
    """A FAT12, FAT16 or FAT32 boot sector whose geometry holds together; the
    label is the root directory's volume-label entry (as blkid's LABEL)."""
    bs = region.head[:512]
    if len(bs) < 512 or not fat_boot_sector(bs):
        return None
    sector_size, cluster_sectors = _le(bs, 11, 2), bs[13]
    reserved, dir_entries = _le(bs, 14, 2), _le(bs, 17, 2)
    fat_length16 = _le(bs, 22, 2)
    fat_size = (fat_length16 or _le(bs, 36, 4)) * bs[16]
    clusters = _fat_clusters(bs)
    label = serial = version = None
    if fat_length16:
        root = (reserved + fat_size) * sector_size
        label = _fat_dir_label(region.read(root, min(dir_entries, MAX_DIR_ENTRIES) * 32))
        serial = _serial(bs[39:43]) if bs[38] in (0x28, 0x29) else None
        version = "FAT12" if clusters < 0xFF4 else "FAT16" if clusters < 0xFFF4 else None
    elif _le(bs, 36, 4):
        label = _fat32_label(region, bs, sector_size, cluster_sectors, reserved, fat_size)
        serial, version = _serial(bs[67:71]), "FAT32"
        fsinfo = _le(bs, 48, 2)
        if fsinfo:
            info = region.read(fsinfo * sector_size, 512)
            if info[:4] not in (b"RRaA", b"RRdA", bytes(4)) or info[484:488] not in (b"rrAa", bytes(4)):
                return None
    return Content("vfat", "filesystem", label=label, uuid=serial, version=version)


#: Where libblkid looks for FAT's signatures: (offset, bytes), its order.
_FAT_MAGICS = (
    (0x52, b"MSWIN"), (0x52, b"FAT32   "), (0x36, b"MSDOS"), (0x36, b"FAT16   "), (0x36, b"FAT12   "),
    (0x36, b"FAT     "), (0, b"\xeb"), (0, b"\xe9"), (0x1FE, b"\x55\xaa"),
)


def fat_boot_sector(bs: bytes) -> bool:
    """Whether the 512 bytes ``bs`` are a FAT boot sector (libblkid's checks);
    a partition table's first sector with 0x55AA is not."""
    magic = next((m for at, m in _FAT_MAGICS if bs[at : at + len(m)] == m), None)
    if magic is None:
        return False
    if len(magic) <= 2 and (bs[510:512] != b"\x55\xaa" or bs[0x36:0x3E] in (b"JFS     ", b"HPFS    ")):
        return False
    media, cluster_sectors, sector_size = bs[21], bs[13], _le(bs, 11, 2)
    if not bs[16] or not _le(bs, 14, 2) or not (media >= 0xF8 or media == 0xF0):
        return False
    if not _power_of_two(cluster_sectors) or not _power_of_two(sector_size) or not 512 <= sector_size <= 4096:
        return False
    fat32 = not _le(bs, 22, 2) and _le(bs, 36, 4)
    clusters = _fat_clusters(bs)
    limit = 0x0FFFFFF6 if fat32 else 0xFFF4 if clusters > 0xFF4 else 0xFF4
    return clusters <= limit and bs[3:11] != b"-FVE-FS-"  # BitLocker keeps a FAT-like sector


def _fat_clusters(bs: bytes) -> int:
    """The data clusters a FAT boot sector describes, in 32-bit arithmetic as libblkid counts."""
    sector_size, reserved, dir_entries = _le(bs, 11, 2), _le(bs, 14, 2), _le(bs, 17, 2)
    sectors = _le(bs, 19, 2) or _le(bs, 32, 4)
    fat_size = (_le(bs, 22, 2) or _le(bs, 36, 4)) * bs[16]
    dir_sectors = (dir_entries * 32 + sector_size - 1) // sector_size
    return ((sectors - (reserved + fat_size + dir_sectors)) & 0xFFFFFFFF) // bs[13]


def _fat_dir_label(entries: bytes) -> str | None:
    """The volume-label entry among FAT directory ``entries``, if any."""
    for at in range(0, len(entries) - 31, 32):
        entry = entries[at : at + 32]
        if entry[0] == 0:
            return None
        free, first_cluster, attr = entry[0] == 0xE5, _le(entry, 20, 2) or _le(entry, 26, 2), entry[11]
        if free or first_cluster or attr & 0x3F == 0x0F:
            continue
        if attr & 0x18 == 0x08:
            name = (b"\xe5" + entry[1:11]) if entry[0] == 0x05 else entry[:11]
            return _label(name)
    return None


def _fat32_label(region: Region, bs: bytes, sector_size: int, cluster_sectors: int, reserved: int,
                 fat_size: int) -> str | None:
    """The label in a FAT32 root directory, following its cluster chain through the FAT."""
    cluster_bytes = cluster_sectors * sector_size
    fat_entries = _le(bs, 36, 4) * sector_size // 4
    cluster = _le(bs, 44, 4)
    for _ in range(MAX_DIR_CLUSTERS):
        if not cluster or cluster >= fat_entries:
            return None
        at = (reserved + fat_size + (cluster - 2) * cluster_sectors) * sector_size
        label = _fat_dir_label(region.read(at, min(cluster_bytes, MAX_DIR_ENTRIES * 32)))
        if label is not None:
            return label
        cluster = _le(region.read(reserved * sector_size + cluster * 4, 4), 0, 4) & 0x0FFFFFFF
    return None


def _swap(region: Region) -> Content | None:
    """Linux swap: its signature in the last ten bytes of the first page, for
    pages of 4 to 64 KiB; version 1's header after the first KiB."""
    head = region.head
    if head[:8] == b"\xed\xc3\x02\xe9\x98\x56\xe5\x0c":  # TuxOnIce hibernation image
        return None
    for page in (0x1000, 0x2000, 0x4000, 0x8000, 0x10000):
        magic = head[page - 10 : page]
        if magic == b"SWAP-SPACE":
            return Content("swap", "other", version="0")
        if magic == b"SWAPSPACE2":
            break
    else:
        return None
    hdr = head[1024:1024 + 512]
    if _le(hdr, 0, 4) not in (1, 1 << 24) or _le(hdr, 4, 4) == 0:
        return None
    found = Content("swap", "other", version="1")
    if not any(hdr[172:180]):  # padding[32..33]: zero where the label and UUID are real
        found = found._replace(label=_label(hdr[28:44]) if hdr[28] else None, uuid=_uuid(hdr[12:28]))
    return found


def _xfs(region: Region) -> Content | None:
    """An XFS superblock that passes libblkid's sanity checks (and, version 5, its CRC)."""
    sb = region.head[:512]
    if sb[:4] != b"XFSB" or len(sb) < 512:
        return None
    (blocksize, dblocks, _rb, _rx, _uuid_raw, _ls, _ri, _rbm, _rs, rextsize, agblocks, agcount, _rbb, _lb,
     versionnum, sectsize, inodesize, _ipb, _name, blocklog, sectlog, inodelog, inopblog, _ag, _rxl, _ip,
     imax_pct) = struct.unpack_from(">IQQQ16sQQQQIIIIIHHHH12sBBBBBBBB", sb, 4)
    features2 = _be(sb, 200, 4)
    if (
        agcount <= 0
        or not 512 <= sectsize <= 32768 or not 9 <= sectlog <= 15 or sectsize != 1 << sectlog
        or not 512 <= blocksize <= 65536 or not 9 <= blocklog <= 16 or blocksize != 1 << blocklog
        or not 256 <= inodesize <= 2048 or not 8 <= inodelog <= 11 or inodesize != 1 << inodelog
        or blocklog - inodelog != inopblog
        or not 4096 <= rextsize * blocksize <= 1 << 30
        or imax_pct > 100
        or dblocks == 0 or dblocks > agcount * agblocks or dblocks < (agcount - 1) * agblocks + 64
    ):
        return None
    if versionnum & 0x0F == 5:
        if not versionnum & 0x8000 or not features2 & 0x100:
            return None
        full = bytearray(region.read(0, sectsize))
        expected = _le(full, 224, 4)
        full[224:228] = bytes(4)
        if len(full) < sectsize or crc32c(bytes(full)) != expected:
            return None
    return Content("xfs", "filesystem", label=_label(sb[108:120]), uuid=_uuid(sb[32:48]))


#: ext feature bits libblkid tells ext2, ext3 and ext4 apart by.
_EXT_HAS_JOURNAL = 0x0004
_EXT_JOURNAL_DEV = 0x0008
_EXT_TEST_FILESYS = 0x0004
_EXT_METADATA_CSUM = 0x0400
_EXT2_INCOMPAT = 0x0002 | 0x0010  # filetype, meta_bg
_EXT3_INCOMPAT = 0x0002 | 0x0004 | 0x0010  # ... and recover
_EXT23_RO_COMPAT = 0x0001 | 0x0002 | 0x0004  # sparse_super, large_file, btree_dir


def _ext(region: Region) -> Content | None:
    """An ext2/3/4 superblock (or an external journal, jbd), named as libblkid
    names it from the feature bits; with metadata_csum, its CRC must match."""
    sb = region.head[1024:2048]
    if sb[56:58] != b"\x53\xef" or len(sb) < 1024:
        return None
    compat, incompat, ro_compat = struct.unpack_from("<III", sb, 92)
    if ro_compat & _EXT_METADATA_CSUM:
        if crc32c(sb[:1020]) ^ 0xFFFFFFFF != _le(sb, 1020, 4):
            return None
    elif _le(sb, 24, 4) >= 256:  # s_log_block_size
        return None
    test_fs = _le(sb, 0x160, 4) & _EXT_TEST_FILESYS
    journal = compat & _EXT_HAS_JOURNAL
    beyond_ext3 = ro_compat & ~_EXT23_RO_COMPAT or incompat & ~_EXT3_INCOMPAT
    if incompat & _EXT_JOURNAL_DEV:
        kind = "jbd"
    elif test_fs:
        kind = "ext4dev"
    elif beyond_ext3:
        kind = "ext4"
    elif journal:
        kind = "ext3"
    elif not incompat & ~_EXT2_INCOMPAT:
        kind = "ext2"
    else:
        return None
    version = f"{_le(sb, 76, 4)}.{_le(sb, 62, 2)}"
    return Content(kind, "filesystem" if kind != "jbd" else "other", label=_label(sb[120:136]),
                   uuid=_uuid(sb[104:120]), version=version)


def _iso9660(region: Region) -> Content | None:
    """An ISO 9660 volume: its primary volume descriptor (label, and a UUID
    from its modification or creation date), a Joliet supplementary one's
    label where there is one; the root directory must point at itself."""
    if region.head[0x8001:0x8006] != b"CD001":
        return None
    pvd = joliet = None
    for n in range(16):
        desc = region.head[0x8000 + n * 2048 : 0x8000 + n * 2048 + 2048]
        if len(desc) < 881 or desc[0] == 0xFF:
            break
        if desc[0] == 1 and pvd is None:
            pvd = desc
        elif desc[0] == 2 and joliet is None and desc[88:91] in (b"%/@", b"%/C", b"%/E"):
            joliet = desc
    if pvd is None or _le(pvd, 128, 2) == 0:
        return None
    block = _le(pvd, 128, 2)
    root_lba, root_len = _le(pvd, 158, 4), _le(pvd, 166, 4)
    if root_len < 34:
        return None
    root = region.read(root_lba * block, min(root_len, 2048))
    if len(root) < 34 or root[0] < 34 or root[32] != 1 or root[33] != 0 or _le(root, 2, 4) != root_lba:
        return None
    if joliet is not None:
        merged = _merge_joliet(joliet[40:72], pvd[40:72])
        label = _utf16_label(merged or joliet[40:72], "utf-16-be")
    else:
        label = _label(pvd[40:72])
    return Content("iso9660", "filesystem", label=label, uuid=_iso_date_uuid(pvd),
                   version="Joliet Extension" if joliet is not None else None)


def _iso_date_uuid(pvd: bytes) -> str | None:
    """blkid's ISO "UUID": the modification date (else the creation date) as
    ``YYYY-MM-DD-HH-MM-SS-CC``."""
    for at in (830, 813):  # modified, created
        digits, offset = pvd[at : at + 16], pvd[at + 16]
        if digits == b"0" * 16 and offset == 0:
            continue
        if not any(digits):
            return None
        d = digits.decode("latin-1")
        return f"{d[0:4]}-{d[4:6]}-{d[6:8]}-{d[8:10]}-{d[10:12]}-{d[12:14]}-{d[14:16]}"
    return None


def _merge_joliet(utf16: bytes, ascii_: bytes) -> bytes | None:
    """A Joliet name (UTF-16BE, at most 16 characters) completed from the
    primary descriptor's longer ASCII one when it is a prefix of it ('_' stands
    for a character ASCII cannot hold), as blkid reconstructs labels; None when not."""
    out = bytearray()
    u = a = 0
    n = len(ascii_)
    while u + 1 < n and a < n:
        if 0xD8 <= utf16[u] <= 0xDB and u + 3 < n and 0xDC <= utf16[u + 2] <= 0xDF:
            out += utf16[u : u + 2]
            u += 2
        hi, lo, c = utf16[u], utf16[u + 1], ascii_[a]
        if c == ord("_"):
            out += bytes((hi, lo))
        elif hi == 0 and lo == ord("_"):
            out += bytes((0, c))
        elif hi == 0 and _ascii_upper(c) == _ascii_upper(lo):
            out += bytes((0, lo if 0x41 <= c <= 0x5A else c))
        else:
            return None
        u += 2
        a += 1
    for c in ascii_[a:]:
        out += bytes((0, c))
    return bytes(out)


def _ascii_upper(c: int) -> int:
    return c - 0x20 if 0x61 <= c <= 0x7A else c


def _ntfs(region: Region) -> Content | None:
    """An NTFS boot sector with a sane geometry and ``FILE`` records where it
    puts the MFT; the label is the $Volume record's $VOLUME_NAME attribute."""
    bs = region.head[:512]
    if bs[3:11] != b"NTFS    " or len(bs) < 512:
        return None
    geometry = ntfs_geometry(bs)
    if geometry is None:
        return None
    mft_offset, record_size = geometry
    if region.read(mft_offset, 4) != b"FILE":
        return None
    record = region.read(mft_offset + 3 * record_size, record_size)
    if record[:4] != b"FILE":
        return None
    serial = bs[72:80]
    return Content("ntfs", "filesystem", label=_ntfs_volume_name(record, record_size),
                   uuid=f"{_le(serial, 0, 8):016X}" if any(serial) else None)


def ntfs_geometry(bs: bytes) -> tuple[int, int] | None:
    """The MFT's byte offset and record size of an NTFS boot sector that passes
    libblkid's checks; None when it does not."""
    sector_size, spc = _le(bs, 11, 2), bs[13]
    if not 256 <= sector_size <= 4096 or not _power_of_two(sector_size):
        return None
    if spc not in (1, 2, 4, 8, 16, 32, 64, 128):
        if not 240 <= spc <= 249:
            return None
        spc = 1 << (256 - spc)
    if sector_size * spc > 2 << 20:
        return None
    if _le(bs, 14, 2) or _le(bs, 17, 2) or _le(bs, 19, 2) or _le(bs, 22, 2) or _le(bs, 32, 4) or bs[16]:
        return None
    per_record = struct.unpack_from("<b", bs, 64)[0]
    if not 0xE1 <= bs[64] <= 0xF7 and per_record not in (1, 2, 4, 8, 16, 32, 64):
        return None
    if per_record > 0:
        record_size = per_record * spc * sector_size
    elif -per_record >= 31:
        return None
    else:
        record_size = 1 << -per_record
    clusters = _le(bs, 40, 8) // spc
    mft, mirror = _le(bs, 48, 8), _le(bs, 56, 8)
    if mft > clusters or mirror > clusters or record_size < 4:
        return None
    return mft * sector_size * spc, record_size


def _ntfs_volume_name(record: bytes, record_size: int) -> str | None:
    at = _le(record, 20, 2)  # attrs_offset
    allocated = _le(record, 28, 4)
    while at + 22 <= record_size and at <= allocated:  # 22: an attribute header
        kind, length = _le(record, at, 4), _le(record, at + 4, 4)
        if not length or kind == 0xFFFFFFFF:
            return None
        if kind == 0x60:  # $VOLUME_NAME
            value_len, value_off = _le(record, at + 16, 4), _le(record, at + 20, 2)
            if value_off <= record_size - at and value_len <= record_size - at - value_off:
                return _utf16_label(record[at + value_off : at + value_off + value_len])
            return None
        at += length
    return None


def _squashfs(region: Region) -> Content | None:
    """squashfs 4 (little-endian ``hsqs``), or an older one (``squashfs3``:
    ``hsqs``, or big-endian ``sqsh``, of version 3 or less)."""
    head = region.head
    if len(head) < 96:
        return None
    if head[:4] == b"hsqs":
        major, minor = _le(head, 28, 2), _le(head, 30, 2)
    elif head[:4] == b"sqsh":
        major, minor = _be(head, 28, 2), _be(head, 30, 2)
        if major > 3:
            return None
    else:
        return None
    return Content("squashfs" if major >= 4 else "squashfs3", "filesystem", version=f"{major}.{minor}")


def _btrfs(region: Region) -> Content | None:
    """A btrfs superblock at 64 KiB whose checksum matches (CRC-32C or SHA-256;
    xxhash is taken on trust, as Python has none)."""
    sb = region.head[0x10000:0x11000]
    if sb[64:72] != b"_BHRfS_M" or len(sb) < 4096 or region.size < 1 << 20:
        return None
    csum_type = _le(sb, 196, 2)
    if csum_type == 0 and crc32c(sb[32:]) != _le(sb, 0, 4):
        return None
    if csum_type == 2 and hashlib.sha256(sb[32:]).digest() != sb[:32]:
        return None
    if not _le(sb, 144, 4):  # sectorsize
        return None
    return Content("btrfs", "filesystem", label=_label(sb[299:555]) if sb[299] else None, uuid=_uuid(sb[32:48]))


def _exfat(region: Region) -> Content | None:
    """An exFAT boot region (its checksum over eleven sectors checked); the
    label is the root directory's label entry, UTF-16."""
    bs = region.head[:512]
    if bs[3:11] != b"EXFAT   " or not exfat_boot_sector(region):
        return None
    label = _exfat_label(region, bs)
    return Content("exfat", "filesystem", label=label, uuid=_serial(bs[100:104]), version=f"{bs[105]}.{bs[104]}")


def exfat_boot_sector(region: Region) -> bool:
    """Whether the region starts with an exFAT boot region libblkid accepts."""
    bs = region.head[:512]
    if len(bs) < 512 or bs[510:512] != b"\x55\xaa" or bs[:3] != b"\xeb\x76\x90" or bs[3:11] != b"EXFAT   ":
        return False
    if any(bs[11:64]) or not 1 <= bs[110] <= 2 or not 9 <= bs[108] <= 12 or not 0 <= bs[109] <= 25 - bs[108]:
        return False
    fat_offset, fat_length, heap, count, root = struct.unpack_from("<IIIII", bs, 80)
    fats = fat_length * bs[110] & 0xFFFFFFFF  # libblkid's unsigned 32-bit arithmetic, wrapping
    if not 24 <= fat_offset <= (heap - fats) & 0xFFFFFFFF:
        return False
    if not (fat_offset + fats) & 0xFFFFFFFF <= heap <= 1 << 31 or not 2 <= root <= (count + 1) & 0xFFFFFFFF:
        return False
    sector = 1 << bs[108]
    region_bytes = region.read(0, sector * 12)
    if len(region_bytes) < sector * 12:
        return False
    checksum = 0
    for i, byte in enumerate(region_bytes[: sector * 11]):
        if i not in (106, 107, 112):
            checksum = ((checksum >> 1) | (checksum & 1) << 31) + byte & 0xFFFFFFFF
    stored = region_bytes[sector * 11 :]
    return all(_le(stored, i, 4) == checksum for i in range(0, sector, 4))


def _exfat_label(region: Region, bs: bytes) -> str | None:
    sector_shift, cluster_shift = bs[108], bs[109]
    fat_offset, heap, cluster = _le(bs, 80, 4), _le(bs, 88, 4), _le(bs, 96, 4)
    cluster_bytes = 1 << (sector_shift + cluster_shift)

    def cluster_at(n: int) -> int:
        return (heap + ((n - 2) << cluster_shift)) << sector_shift

    for _ in range(MAX_DIR_CLUSTERS):
        entries = region.read(cluster_at(cluster), min(cluster_bytes, MAX_DIR_ENTRIES * 32))
        for at in range(0, len(entries) - 31, 32):
            if entries[at] == 0:
                return None
            if entries[at] == 0x83:
                return _utf16_label(entries[at + 2 : at + 2 + min(entries[at + 1] * 2, 22)])
        if len(entries) < cluster_bytes:
            return None
        cluster = _le(region.read((fat_offset << sector_shift) + cluster * 4, 4), 0, 4)
        if not 2 <= cluster <= 0xFFFFFF6:
            return None
    return None


def _f2fs(region: Region) -> Content | None:
    sb = region.head[1024:1024 + 3072]
    if sb[:4] != b"\x10\x20\xf5\xf2" or len(sb) < 0x47C:
        return None
    major, minor = _le(sb, 4, 2), _le(sb, 6, 2)
    if (major, minor) == (1, 0):
        return Content("f2fs", "filesystem")
    csum_at = _le(sb, 0x20, 4)
    if csum_at:
        full = region.read(1024, 4096)
        if csum_at % 4 or csum_at + 4 > 4096 or len(full) < csum_at + 4:
            return None
        if ~zlib.crc32(full[:csum_at], ~0xF2F52010 & 0xFFFFFFFF) & 0xFFFFFFFF != _le(full, csum_at, 4):
            return None
    label = _utf16_label(sb[0x7C:0x47C]) if sb[0x7C] else None
    return Content("f2fs", "filesystem", label=label, uuid=_uuid(sb[0x6C:0x7C]), version=f"{major}.{minor}")


#: The probers in libblkid's order (RAID and crypto signatures before filesystems).
PROBERS: tuple[Callable[[Region], Content | None], ...] = (
    _lvm2, _luks, _bitlocker, _vfat, _swap, _xfs, _ext, _iso9660, _ntfs, _squashfs, _btrfs, _exfat, _f2fs,
)


def identify(region: Region) -> Content | None:
    """What starts ``region``: the first prober's answer, None when none knows it."""
    for prober in PROBERS:
        found = prober(region)
        if found is not None:
            return found
    return None
