"""parallels: Parallels / ploop disk images (little-endian)."""

from __future__ import annotations

from storprobe import FormatSpec, hookimpl


@hookimpl
def storprobe_formats() -> list[FormatSpec]:
    return [
        FormatSpec(
            name="parallels",
            description="Parallels disk image",
            magic=b"WithoutFreeSpace",
            version_offset=16,
            versions=(2,),
            size_offset=36,
            size_multiplier=512,
        )
    ]
