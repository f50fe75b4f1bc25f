"""A short readable summary of an :class:`ImageInfo`, shaped like ``qemu-img info``.

Text taken from the image (backing and snapshot names, bitmap names, extents)
is shown with the characters a terminal acts on or hides escaped: control
characters (an escape sequence could rewrite the screen or the clipboard, a
newline forge a line), undecodable bytes, bidirectional overrides. qemu-img
prints them raw; for any other text the lines are the same.
"""

from __future__ import annotations

import re
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from .errors import ProbeError
from .model import ImageInfo
from .qemu_json import extras, full_backing_filename
from .sizes import size_text, size_to_str

if TYPE_CHECKING:
    from .allocation import Allocation
    from .guest import GuestReport
    from .guestfs import Content

#: C0 and C1 controls, lone surrogates (bytes that were not UTF-8), bidirectional controls.
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\ud800-\udfff\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def shown(text: str) -> str:
    """``text`` safe to print on a terminal: what it would act on or hide, as ``\\x1b``-style escapes."""
    return _UNSAFE.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), text)


def _tree(value: Any, indent: int) -> list[str]:
    pad = "    " * indent
    lines: list[str] = []
    if isinstance(value, Mapping):
        for key, item in value.items():
            label = shown(str(key)).replace("-", " ")
            if isinstance(item, (Mapping, list)):
                lines.append(f"{pad}{label}:")
                lines += _tree(item, indent + 1)
            else:
                lines.append(f"{pad}{label}: {_scalar(item)}")
    else:
        for i, item in enumerate(value):
            if isinstance(item, (Mapping, list)):
                lines.append(f"{pad}[{i}]:")
                lines += _tree(item, indent + 1)
            else:
                lines.append(f"{pad}[{i}]: {_scalar(item)}")
    return lines


def _scalar(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return shown(str(value))


def _snapshot_lines(info: ImageInfo) -> list[str]:
    lines = ["Snapshot list:", f"{'ID':<10}{'TAG':<18}{'VM SIZE':>7}{'DATE':>20}{'VM CLOCK':>13}{'ICOUNT':>11}"]
    for s in info.snapshots:
        date = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(s.date_sec))
        secs, ms = divmod(s.vm_clock_nsec // 1_000_000, 1000)
        clock = f"{secs // 3600:02d}:{secs // 60 % 60:02d}:{secs % 60:02d}.{ms:03d}"
        icount = "" if s.icount is None else str(s.icount)
        lines.append(
            f"{shown(s.id):<10}{shown(s.name):<18}{size_to_str(s.vm_state_size):>7} {date:>19}{clock:>13}{icount:>11}"
        )
    return lines


def render(info: ImageInfo, allocated: Allocation | ProbeError | None = None) -> str:
    """The human summary, one fact a line. Where QEMU opens the volume with
    another driver than its format's (an iso, a cow file, LUKS2: raw), the
    qemu-img part is what that driver shows, as in the JSON; our reading
    follows under ``storprobe:``, ending with what the image holds itself
    when ``allocated`` is given (``info --allocated``)."""
    through_driver = info.read_through_other_driver
    lines = [
        f"image: {shown(info.filename)}",
        f"file format: {info.driver if through_driver else info.format}",
        f"virtual size: {size_text(info.driver_virtual_size)}",
    ]
    if info.actual_size is not None:
        lines.append(f"disk size: {size_to_str(info.actual_size)}")
    if not through_driver:
        lines += _format_lines(info)
    lines.append("storprobe:")
    lines += _tree(_pruned(extras(info)), 1)
    if allocated is not None:
        lines.append(f"    allocated: {_allocation_text(allocated)}")
    return "\n".join(lines)


def _allocation_text(held: Allocation | ProbeError) -> str:
    if isinstance(held, ProbeError):
        return f"unknown: {held.code}: {shown(held.reason)}"
    return f"data {size_text(held.data)}, zeros {size_text(held.zero)}"


def _format_lines(info: ImageInfo) -> list[str]:
    """The lines qemu-img adds from the format's own structures."""
    lines = []
    if info.encrypted:
        lines.append("encrypted: yes")
    if info.cluster_size is not None:
        lines.append(f"cluster_size: {info.cluster_size}")
    if info.dirty:
        lines.append("cleanly shut down: no")
    if info.backing is not None:
        full = full_backing_filename(info.filename, info.backing.name)
        suffix = f" (actual path: {shown(full)})" if full != info.backing.name else ""
        lines.append(f"backing file: {shown(info.backing.name)}{suffix}")
        if info.backing.format:
            lines.append(f"backing file format: {shown(info.backing.format)}")
    if info.snapshots:
        lines += _snapshot_lines(info)
    if info.specific:
        lines.append("Format specific information:")
        lines += _tree(info.specific, 1)
    return lines


def _pruned(facts: Mapping[str, Any]) -> dict[str, Any]:
    """``facts`` without the empty lists and mappings in it or in the mappings
    below it, which would be bare ``name:`` lines (qemu-img prints such lines
    in its own section, so they stay there)."""
    kept = {}
    for key, value in facts.items():
        if isinstance(value, Mapping):
            value = _pruned(value)
        if value or not isinstance(value, (Mapping, list)):
            kept[key] = value
    return kept


def render_guest(report: GuestReport) -> str:
    """What a guest disk holds, one fact a line under ``guest:`` (``storprobe
    inspect``, ``info --inspect-guest``); names and labels from the disk escaped."""
    lines = ["guest:", f"    virtual size: {size_text(report.size)}", f"    empty: {'yes' if report.empty else 'no'}"]
    table = report.table
    if table is None:
        lines.append("    partition table: none")
    else:
        disk_id = f", id {shown(table.uuid)}" if table.uuid else ""
        lines.append(f"    partition table: {table.scheme}{disk_id}, {table.sector_size}-byte sectors")
        for entry in report.partitions:
            part = entry.partition
            kind = part.type + (f" ({part.type_name})" if part.type_name else "")
            facts = [f"start {part.start}", f"size {size_text(part.size)}", f"type {kind}"]
            if part.name is not None:
                facts.append(f"name {_quoted(part.name)}")
            if part.uuid is not None:
                facts.append(f"uuid {part.uuid}")
            if table.scheme == "mbr" and part.bootable:
                facts.append("bootable")
            lines.append(f"    partition {part.number}: {', '.join(facts)}")
            held = "the logical partitions (extended)" if part.extended else _content_text(entry.content)
            lines.append(f"        content: {held}")
    if report.content is not None or table is None:
        lines.append(f"    whole disk: {_content_text(report.content)}")
    for problem in report.problems:
        lines.append(f"    problem: {problem.code}: {shown(problem.message)}")
    return "\n".join(lines)


def _quoted(text: str) -> str:
    return '"' + shown(text).replace('"', '\\"') + '"'


def _content_text(content: Content | None) -> str:
    if content is None:
        return "nothing known"
    text = content.type + (f" {shown(content.version)}" if content.version else "")
    if content.label is not None:
        text += f", label {_quoted(content.label)}"
    if content.uuid is not None:
        text += f", uuid {shown(content.uuid)}"
    return text
