"""vdi: VirtualBox disk image (little-endian)."""

from __future__ import annotations

from storprobe import FormatSpec, hookimpl


@hookimpl
def storprobe_formats() -> list[FormatSpec]:
    return [
        FormatSpec(
            name="vdi",
            description="VirtualBox disk image",
            magic=b"\x7f\x10\xda\xbe",
            magic_offset=0x40,
            version_offset=0x44,
            versions=(0x00010001,),
            size_offset=0x170,
        )
    ]
