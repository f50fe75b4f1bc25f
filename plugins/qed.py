"""qed: QEMU enhanced disk (little-endian)."""

from __future__ import annotations

from storprobe import FormatSpec, hookimpl


@hookimpl
def storprobe_formats() -> list[FormatSpec]:
    return [FormatSpec(name="qed", description="QEMU enhanced disk", magic=b"QED\x00", size_offset=48)]
