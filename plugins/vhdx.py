"""vhdx: Hyper-V virtual hard disk v2."""

from __future__ import annotations

from storprobe import FormatSpec, hookimpl


@hookimpl
def storprobe_formats() -> list[FormatSpec]:
    return [FormatSpec(name="vhdx", description="Hyper-V VHDX", magic=b"vhdxfile")]
