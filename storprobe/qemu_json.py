"""``qemu-img info --output=json`` for an :class:`ImageInfo`: same keys, same
omission rules, so tools that parse qemu-img can switch. storprobe's own facts
go under the single extra key ``"storprobe"``."""

from __future__ import annotations

import os
import re
from typing import TYPE_CHECKING, Any

from .errors import ProbeError
from .model import ImageInfo, Snapshot

if TYPE_CHECKING:
    from .allocation import Allocation
    from .backing import BackingStore, RefusedName
    from .guest import GuestReport
    from .guestfs import Content
    from .partitions import Partition
    from .scan import ScanRecord

EXTRA_KEY = "storprobe"
#: What QEMU takes for a protocol prefix: a colon before any slash (``nbd:``,
#: ``json:``, but also ``a:b`` or ``v2.\ufffd:x``, protocols it does not know).
_PROTOCOL = re.compile(r"^[^:/]*:")


def full_backing_filename(image_name: str, backing_name: str) -> str:
    """The backing name joined to the image's directory, as qemu-img shows it;
    absolute names and names with a protocol prefix stay as they are."""
    if os.path.isabs(backing_name) or _PROTOCOL.match(backing_name):
        return backing_name
    return os.path.join(os.path.dirname(image_name), backing_name)


def _snapshot(snap: Snapshot) -> dict[str, Any]:
    entry: dict[str, Any] = {}
    if snap.icount is not None:
        entry["icount"] = snap.icount
    entry.update(
        {
            "vm-clock-nsec": snap.vm_clock_nsec % 1_000_000_000,
            "name": snap.name,
            "date-sec": snap.date_sec,
            "date-nsec": snap.date_nsec,
            "vm-clock-sec": snap.vm_clock_nsec // 1_000_000_000,
            "id": snap.id,
            "vm-state-size": snap.vm_state_size,
        }
    )
    return entry


def to_qemu_json(info: ImageInfo) -> dict[str, Any]:
    """The object ``qemu-img info --output=json`` prints, plus our extra key.
    ``format`` is the driver QEMU opens the volume with (``qemu-img -f``)."""
    if info.read_through_other_driver:
        return _through_driver(info)
    out: dict[str, Any] = {}
    if info.snapshots:
        out["snapshots"] = [_snapshot(s) for s in info.snapshots]
    if info.backing is not None and info.backing.format is not None:
        out["backing-filename-format"] = info.backing.format
    out["virtual-size"] = info.virtual_size
    out["filename"] = info.filename
    if info.cluster_size is not None:
        out["cluster-size"] = info.cluster_size
    out["format"] = info.format
    if info.actual_size is not None:
        out["actual-size"] = info.actual_size
    if info.specific is not None:
        out["format-specific"] = {"type": info.format, "data": dict(info.specific)}
    if info.encrypted:
        out["encrypted"] = True
    if info.backing is not None:
        out["full-backing-filename"] = full_backing_filename(info.filename, info.backing.name)
        out["backing-filename"] = info.backing.name
    if info.dirty is not None:
        out["dirty-flag"] = info.dirty
    out[EXTRA_KEY] = extras(info)
    return out


def _through_driver(info: ImageInfo) -> dict[str, Any]:
    """What qemu-img prints of a volume QEMU opens with another driver than its
    format's (an iso, a cow file, LUKS2: raw): that driver reads the bytes as they
    are, so no structure of the format shows; our reading is under our key."""
    out: dict[str, Any] = {
        "virtual-size": info.driver_virtual_size,
        "filename": info.filename,
        "format": info.driver,
    }
    if info.actual_size is not None:
        out["actual-size"] = info.actual_size
    out["dirty-flag"] = False
    out[EXTRA_KEY] = extras(info)
    return out


def extras(info: ImageInfo) -> dict[str, Any]:
    """storprobe's facts that qemu-img does not print: the format and, where
    QEMU's driver shows another, the virtual size as storprobe reads them."""
    extra: dict[str, Any] = {"format": info.format}
    if info.driver_size is not None and info.driver_size != info.virtual_size:
        extra["virtual-size"] = info.virtual_size
    extra["evidence"] = info.evidence
    extra["matches"] = list(info.matches)
    if info.version is not None:
        extra["version"] = info.version
    if info.encryption is not None:
        extra["encryption"] = info.encryption
    if info.compat is not None:
        extra["compat"] = info.compat
    if info.flags is not None:
        extra["features"] = list(info.flags)
    if info.backing is not None and info.backing_store is not None:
        extra["backing-store"] = _store(info.backing.name, info.backing_store)
    if info.data_file is not None:
        extra["data-file"] = {"raw-image": info.data_file.raw}  # qemu-img: data-file-raw
        if info.data_file.name is not None and info.data_file_store is not None:
            extra["data-file"] |= _store(info.data_file.name, info.data_file_store)
    if info.details:
        extra["details"] = dict(info.details)
    return extra


def _store(name: str, store: BackingStore | RefusedName) -> dict[str, Any]:
    """What a recorded backing or data-file name denotes (parsed when probed, never opened)."""
    from .backing import RefusedName  # loaded already: the probe that made ``store`` used it

    if isinstance(store, RefusedName):  # a name QEMU refuses: as recorded, flagged
        return {"name": name, "error": {"code": store.code, "message": store.reason}}
    out: dict[str, Any] = {"name": store.name, "protocol": store.protocol, "reach": store.reach}
    if store.path is not None:
        out["path"] = store.path
    if store.hosts:
        out["hosts"] = [{k: v for k, v in h._asdict().items() if v is not None} for h in store.hosts]
    if store.target is not None:
        out["target"] = store.target
    if store.options:
        out["options"] = dict(store.options)
    return out


def scan_record(record: ScanRecord) -> dict[str, Any]:
    """A scan record: the image's JSON, or its path and the error that stopped it."""
    if record.info is not None:
        return to_qemu_json(record.info)
    assert record.error is not None
    return {"filename": record.path, "error": {"code": record.error.code, "message": record.error.reason}}


def allocation_json(held: Allocation | ProbeError) -> dict[str, Any]:
    """What an image holds itself (:func:`storprobe.allocation.allocation`), as
    ``info --allocated`` puts it under ``"storprobe"`` as ``"allocated"``: its
    bytes of data and of zeros, or the named error that kept them unknown."""
    if isinstance(held, ProbeError):
        return {"error": {"code": held.code, "message": held.reason}}
    return {"data": held.data, "zero": held.zero}


def guest_json(report: GuestReport) -> dict[str, Any]:
    """What a guest disk holds (:func:`storprobe.guest.inspect_guest`), as the
    object ``storprobe inspect`` prints and ``info --inspect-guest`` puts under
    ``"storprobe"`` as ``"guest"``: absent facts are left out."""
    out: dict[str, Any] = {"virtual-size": report.size, "empty": report.empty}
    if report.table is not None:
        table = report.table
        out["partition-table"] = {"type": table.scheme}
        if table.uuid is not None:
            out["partition-table"]["id"] = table.uuid
        out["partition-table"]["sector-size"] = table.sector_size
        out["partition-table"]["partitions"] = [
            _partition(entry.partition, table.scheme) | _content(entry.content) for entry in report.partitions
        ]
    out |= _content(report.content)
    out["problems"] = [{"code": p.code, "message": p.message} for p in report.problems]
    return out


def _partition(part: Partition, scheme: str) -> dict[str, Any]:
    out: dict[str, Any] = {"number": part.number, "start": part.start, "size": part.size, "type": part.type}
    if part.type_name is not None:
        out["type-name"] = part.type_name
    if part.name is not None:
        out["name"] = part.name
    if part.uuid is not None:
        out["uuid"] = part.uuid
    if scheme == "mbr":
        out["bootable"] = part.bootable
        if part.extended:
            out["extended"] = True
    elif part.attributes:
        out["attributes"] = part.attributes
    return out


def _content(content: Content | None) -> dict[str, Any]:
    """``{"content": {...}}`` for what starts a partition or the disk; empty for nothing known."""
    if content is None:
        return {}
    return {"content": {key.replace("_", "-"): value for key, value in content._asdict().items() if value is not None}}
