"""The fast indented JSON writer: the same text as json.dumps(indent=4), always."""

from __future__ import annotations

import io
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from storprobe.jsontext import indented, write_array

SCALARS = st.none() | st.booleans() | st.integers() | st.floats() | st.text()
KEYS = st.text() | st.integers() | st.booleans() | st.none() | st.floats(allow_nan=False)
VALUES = st.recursive(
    SCALARS,
    lambda children: st.lists(children, max_size=4)
    | st.tuples(children, children)
    | st.dictionaries(st.text(max_size=8), children, max_size=4)
    | st.dictionaries(KEYS, children, max_size=3),
    max_leaves=25,
)


@given(VALUES)
def test_same_text_as_json_dumps(value):
    assert indented(value) == json.dumps(value, indent=4)


@given(st.lists(VALUES, max_size=5))
def test_array_written_item_by_item_is_json_dumps_of_the_list(items):
    out = io.StringIO()
    write_array((indented(item, 1) for item in items), out)
    assert out.getvalue() == json.dumps(items, indent=4) + "\n"


def test_deep_nesting_and_unserializable_values():
    deep: object = ["leaf", {"k": [1]}]
    for _ in range(40):
        deep = [deep]
    assert indented(deep) == json.dumps(deep, indent=4)
    with pytest.raises(TypeError, match="not JSON serializable"):
        indented({"a": object()})
