"""Rows that share a magic tell themselves apart by their version field. When
no row knows the version found, the error is the one of the row whose known
versions lie nearest it (a newer version of the format that knows 2 and 3,
not of the one that knows 1), whatever the rows' order in the table."""

from __future__ import annotations

import pytest

import storprobe
from storprobe import FormatSpec, UnsupportedVersion, hookimpl, probe


class Family:
    """Two third-party rows under one magic: version 1, and versions 5 and 6."""

    def __init__(self, old_first: bool) -> None:
        self.priorities = (1, 2) if old_first else (2, 1)

    @hookimpl
    def storprobe_formats(self):
        common = dict(magic=b"SHAREDMG", version_offset=8, version_width=2, size_offset=12, size_width=4)
        old, new = self.priorities
        return [
            FormatSpec(name="famold", description="old layout", versions=(1,), priority=old, **common),
            FormatSpec(name="famnew", description="new layout", versions=(5, 6), priority=new, **common),
        ]


def image(version: int) -> bytes:
    return b"SHAREDMG" + version.to_bytes(2, "little") + b"\0\0" + (4096).to_bytes(4, "little") + bytes(100)


@pytest.mark.parametrize("old_first", [True, False])
@pytest.mark.parametrize("version, nearest", [
    (0, "famold"), (2, "famold"), (4, "famnew"), (7, "famnew"), (900, "famnew"),
])
def test_an_unknown_version_is_the_nearest_rows(old_first, version, nearest):
    with storprobe.registered(Family(old_first), name="family"):
        assert [probe(image(v)).format for v in (1, 5, 6)] == ["famold", "famnew", "famnew"]
        with pytest.raises(UnsupportedVersion) as refused:
            probe(image(version))
    known = "1" if nearest == "famold" else "5, 6"
    assert str(refused.value) == f"unsupported {nearest} version {version} (known: {known})"
