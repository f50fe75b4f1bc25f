"""qcow: QEMU copy-on-write version 1 (big-endian)."""

from __future__ import annotations

from storprobe import FormatSpec, hookimpl


@hookimpl
def storprobe_formats() -> list[FormatSpec]:
    return [
        FormatSpec(
            name="qcow",
            description="QEMU copy-on-write v1",
            magic=b"QFI\xfb",
            endian=">",
            version_offset=4,
            versions=(1,),
            size_offset=24,
            crypt_offset=36,
            crypt_methods={1: "aes"},
        )
    ]
