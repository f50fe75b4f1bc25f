"""dmg: Apple disk images (``koly`` trailer, big-endian)."""

from __future__ import annotations

from storprobe import FormatSpec, hookimpl


@hookimpl
def storprobe_formats() -> list[FormatSpec]:
    return [
        FormatSpec(
            name="dmg",
            description="Apple disk image",
            magic=b"koly",
            header_offsets=(-512,),
            endian=">",
            size_offset=0x1EC,
            size_multiplier=512,
        )
    ]
