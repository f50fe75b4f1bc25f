"""dir: a directory used as a volume (libvirt's ``dir`` format)."""

from __future__ import annotations

from storprobe import FormatSpec, hookimpl


@hookimpl
def storprobe_formats() -> list[FormatSpec]:
    return [FormatSpec(name="dir", description="directory", file_types=frozenset({"directory"}))]
