"""luks: LUKS encrypted volumes (big-endian)."""

from __future__ import annotations

from storprobe import FormatSpec, hookimpl


@hookimpl
def storprobe_formats() -> list[FormatSpec]:
    return [
        FormatSpec(
            name="luks",
            description="LUKS encrypted volume",
            magic=b"LUKS\xba\xbe",
            endian=">",
            version_offset=6,
            version_width=2,
            versions=(1, 2),
        )
    ]
