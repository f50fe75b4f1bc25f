"""Reading volume XML that storprobe is given: a hardened parser (no document
type declarations, so no entities to expand or fetch), a size cap, and
validation against storprobe's RelaxNG schemas (xml-schemas/)."""

from __future__ import annotations

from functools import cache
from importlib.resources import files

from lxml import etree

from .errors import InvalidDocument

SCHEMA_PACKAGE = "storprobe_schemas"
VOLUME_SCHEMA = "storagevol.rng"
#: The largest document read: a scan of 100000 volumes is about 100 MiB.
MAX_DOCUMENT = 256 * 1024 * 1024


@cache
def volume_schema() -> etree.RelaxNG:
    """Our storage-volume schema (also accepts a ``<volumes>`` scan document)."""
    with files(SCHEMA_PACKAGE).joinpath(VOLUME_SCHEMA).open("rb") as f:
        return etree.RelaxNG(etree.parse(f))


def parse(document: str | bytes) -> etree._Element:
    """The root of ``document``; InvalidDocument unless it is well-formed XML
    without a document type declaration (storprobe emits none; one could
    declare entities that expand a billion-fold or name a file or URL)."""
    data = document.encode() if isinstance(document, str) else document
    if len(data) > MAX_DOCUMENT:
        raise InvalidDocument(f"document is larger than {MAX_DOCUMENT} bytes")
    parser = etree.XMLParser(resolve_entities=False, load_dtd=False, no_network=True)
    try:
        root = etree.fromstring(data, parser)
    except etree.XMLSyntaxError as exc:
        raise InvalidDocument(f"not well-formed XML: {exc}") from None
    if root.getroottree().docinfo.doctype:
        raise InvalidDocument("a document type declaration is not accepted")
    return root


def schema_errors(document: str | bytes, schema: etree.RelaxNG | None = None) -> list[str]:
    """Every reason ``document`` is not valid (empty when it is)."""
    try:
        root = parse(document)
    except InvalidDocument as exc:
        return [exc.reason]
    return _errors(root, schema or volume_schema())


def valid_root(document: str | bytes) -> etree._Element:
    """The root of ``document`` if it is valid against our schema, else InvalidDocument."""
    root = parse(document)
    errors = _errors(root, volume_schema())
    if errors:
        raise InvalidDocument("; ".join(errors))
    return root


def _errors(root: etree._Element, schema: etree.RelaxNG) -> list[str]:
    if schema.validate(root):
        return []
    return [f"line {e.line}: {e.message}" for e in schema.error_log]
