"""iso: ISO 9660 (CD001 in the volume descriptor at sector 16)."""

from __future__ import annotations

from storprobe import FormatSpec, hookimpl


@hookimpl
def storprobe_formats() -> list[FormatSpec]:
    return [FormatSpec(name="iso", description="ISO 9660 CD/DVD image", magic=b"CD001", magic_offset=32769)]
