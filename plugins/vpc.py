"""vpc: Microsoft Virtual PC / VHD (big-endian footer ``conectix``)."""

from __future__ import annotations

from storprobe import FormatSpec, hookimpl


@hookimpl
def storprobe_formats() -> list[FormatSpec]:
    return [
        FormatSpec(
            name="vpc",
            description="Virtual PC / VHD",
            magic=b"conectix",
            header_offsets=(0, -512),
            endian=">",
            version_offset=12,
            versions=(0x00010000,),
            size_offset=48,
        )
    ]
