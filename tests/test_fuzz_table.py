"""Every row of the format table against random bytes that carry its signature.

Whatever the bytes, a probe yields an ImageInfo or a named ProbeError; a
"plugin-error" (a stray exception inside a plugin) is a bug. Example counts
come from the hypothesis profile (tests/conftest.py: STORPROBE_FUZZ=long).
"""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from storprobe.registry import format_table
from storprobe.spec import FormatSpec

from oracle import probe_or_named_error

SIGNED = [s for s in format_table().specs if s.magic is not None]


def _with_signature(spec: FormatSpec, body: bytes, version_index: int) -> bytes:
    """``body`` with the row's magic (and one accepted version) written in place."""
    data = bytearray(body)
    start = spec.header_offsets[version_index % len(spec.header_offsets)]
    base = len(data) + start if start < 0 else start
    if base < 0:
        return bytes(data)
    fields = [(spec.magic_offset, spec.magics[version_index % len(spec.magics)])]
    if spec.version_offset is not None and spec.versions:
        version = spec.versions[version_index % len(spec.versions)]
        byteorder = "big" if spec.endian == ">" else "little"
        fields.append((spec.version_offset, version.to_bytes(spec.version_width, byteorder)))
    for offset, value in fields:
        at = base + offset
        if at + len(value) > len(data):
            data.extend(bytes(at + len(value) - len(data)))
        data[at : at + len(value)] = value
    return bytes(data)


def _probe_or_named_error(data: bytes) -> None:
    probe_or_named_error(data)


@pytest.mark.parametrize("spec", SIGNED, ids=lambda s: s.name)
@given(body=st.binary(max_size=2048), version_index=st.integers(0, 7), zeros=st.sampled_from([0, 512, 40000]))
def test_signature_plus_random_bytes(spec, body, version_index, zeros):
    """Random bytes, optionally zero-padded past the head buffer (trailers, deep headers)."""
    _probe_or_named_error(_with_signature(spec, body + bytes(zeros), version_index))


@given(st.binary(max_size=4096))
def test_random_bytes(data):
    _probe_or_named_error(data)
