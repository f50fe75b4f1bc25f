"""vmdk: VMware disks (KDMV hosted sparse, little-endian)."""

from __future__ import annotations

from storprobe import FormatSpec, hookimpl


@hookimpl
def storprobe_formats() -> list[FormatSpec]:
    return [
        FormatSpec(
            name="vmdk",
            description="VMware virtual disk",
            magic=b"KDMV",
            version_offset=4,
            versions=(1, 2, 3),
            size_offset=12,
            size_multiplier=512,
        )
    ]
