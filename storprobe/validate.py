"""Validation of volume XML against storprobe's RelaxNG schemas (xml-schemas/)."""

from __future__ import annotations

from functools import cache
from importlib.resources import files

from lxml import etree

SCHEMA_PACKAGE = "storprobe_schemas"
VOLUME_SCHEMA = "storagevol.rng"


@cache
def volume_schema() -> etree.RelaxNG:
    """Our storage-volume schema (also accepts a ``<volumes>`` scan document)."""
    with files(SCHEMA_PACKAGE).joinpath(VOLUME_SCHEMA).open("rb") as f:
        return etree.RelaxNG(etree.parse(f))


def schema_errors(document: str | bytes, schema: etree.RelaxNG | None = None) -> list[str]:
    """Every reason ``document`` is not valid (empty when it is)."""
    schema = schema or volume_schema()
    try:
        tree = etree.fromstring(document.encode() if isinstance(document, str) else document)
    except etree.XMLSyntaxError as exc:
        return [f"not well-formed XML: {exc}"]
    if schema.validate(tree):
        return []
    return [f"line {e.line}: {e.message}" for e in schema.error_log]
