"""JSON text exactly as ``json.dumps(obj, indent=4)`` writes it, faster.

The standard library encodes indented JSON in pure Python, one generator step
per token; here each container is one ``join`` and strings go through the C
string encoder. Anything but str, int, bool, None, list, tuple and dicts with
string keys is left to ``json.dumps`` itself, so the text never differs.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from json.encoder import encode_basestring_ascii as _string
from typing import Any, TextIO

#: A newline and the indentation of each level (grown for deeper documents).
_NEWLINES = ["\n" + " " * (4 * level) for level in range(16)]


#: Escaped ``"key": `` prefixes by key: output keys come from a small vocabulary.
_KEYS: dict[str, str] = {}
#: Most keys remembered (keys from an image, such as backing options, are not a vocabulary).
KEY_CACHE_SIZE = 1024


def indented(obj: Any, level: int = 0) -> str:
    """``json.dumps(obj, indent=4)``, as if nested ``level`` containers deep."""
    kind = type(obj)
    while level + 1 >= len(_NEWLINES):
        _NEWLINES.append("\n" + " " * (4 * len(_NEWLINES)))
    if kind is dict:
        if not obj:
            return "{}"
        inner = _NEWLINES[level + 1]
        items: list[str] = []
        append = items.append
        keys = _KEYS
        try:  # the common scalars inline: a call each would cost a third more
            for key, value in obj.items():
                prefix = keys.get(key)
                if prefix is None:
                    prefix = _string(key) + ": "
                    if len(keys) < KEY_CACHE_SIZE:
                        keys[key] = prefix
                kind = type(value)
                if kind is str:
                    append(prefix + _string(value))
                elif kind is int:
                    append(prefix + int.__repr__(value))
                elif kind is bool:
                    append(prefix + ("true" if value else "false"))
                elif value is None:
                    append(prefix + "null")
                else:
                    append(prefix + _value(value, level + 1))
        except TypeError:  # a key that is not a string: json.dumps converts it (or refuses)
            return json.dumps(obj, indent=4).replace("\n", _NEWLINES[level])
        return "{" + inner + ("," + inner).join(items) + _NEWLINES[level] + "}"
    if kind is list or kind is tuple:
        if not obj:
            return "[]"
        inner = _NEWLINES[level + 1]
        return "[" + inner + ("," + inner).join([_value(value, level + 1) for value in obj]) + _NEWLINES[level] + "]"
    return _value(obj, level)


def _value(obj: Any, level: int) -> str:
    kind = type(obj)
    if kind is str:
        return _string(obj)
    if kind is int:
        return int.__repr__(obj)
    if kind is bool:
        return "true" if obj else "false"
    if obj is None:
        return "null"
    if kind is dict or kind is list or kind is tuple:
        return indented(obj, level)
    return json.dumps(obj, indent=4).replace("\n", _NEWLINES[level])


#: Entries :func:`write_array` joins into one write: the process that writes a
#: scan's output makes a write call per batch, not per volume.
WRITE_BATCH = 64


def write_array(entries: Iterable[str], out: TextIO) -> None:
    """Write a JSON array of entries already rendered by ``indented(item, 1)``,
    as ``json.dumps(items, indent=4)`` and a newline would, :data:`WRITE_BATCH`
    entries at a time as they come (memory stays flat however many there are)."""
    comma, before = "," + _NEWLINES[1], "[" + _NEWLINES[1]
    batch: list[str] = []
    for entry in entries:
        batch.append(entry)
        if len(batch) == WRITE_BATCH:
            out.write(before + comma.join(batch))
            before = comma
            batch.clear()
    if batch:
        out.write(before + comma.join(batch))
        before = comma
    out.write("[]\n" if before[0] == "[" else "\n]\n")
