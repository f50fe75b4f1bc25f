"""bochs: Bochs growing disk images (little-endian)."""

from __future__ import annotations

from storprobe import FormatSpec, hookimpl


@hookimpl
def storprobe_formats() -> list[FormatSpec]:
    return [
        FormatSpec(
            name="bochs",
            description="Bochs disk image",
            magic=b"Bochs Virtual HD Image",
            version_offset=64,
            versions=(0x00010000, 0x00020000),
        )
    ]
