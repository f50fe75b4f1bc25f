"""cow: User-Mode Linux copy-on-write (big-endian)."""

from __future__ import annotations

from storprobe import FormatSpec, hookimpl


@hookimpl
def storprobe_formats() -> list[FormatSpec]:
    return [
        FormatSpec(
            name="cow",
            description="User-Mode Linux COW",
            magic=b"OOOM",
            endian=">",
            version_offset=4,
            versions=(2,),
            size_offset=1036,
        )
    ]
