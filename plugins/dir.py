"""dir: a directory used as a volume (libvirt's ``dir`` format)."""

from __future__ import annotations

from storprobe import FormatSpec, hookimpl


@hookimpl
def storprobe_formats() -> list[FormatSpec]:
    return [
        FormatSpec(
            name="dir",
            description="directory",
            file_types=frozenset({"directory"}),
            qemu_driver="vvfat",  # QEMU shows a directory only as vvfat's FAT disk (``fat:DIR``)
        )
    ]
