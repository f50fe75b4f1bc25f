"""qcow2: QEMU copy-on-write versions 2 and 3 (big-endian; QEMU docs/interop/qcow2.txt)."""

from __future__ import annotations

from storprobe import FormatSpec, hookimpl


@hookimpl
def storprobe_formats() -> list[FormatSpec]:
    return [
        FormatSpec(
            name="qcow2",
            description="QEMU copy-on-write v2/v3",
            magic=b"QFI\xfb",
            endian=">",
            version_offset=4,
            versions=(2, 3),
            size_offset=24,
            crypt_offset=32,
            crypt_methods={1: "aes", 2: "luks"},
        )
    ]
