"""Reading volume XML that storprobe is given: a hardened parser (no document
type declarations, so no entities to expand or fetch), a size cap, and
validation against storprobe's RelaxNG schemas (xml-schemas/).

A reason a document is invalid is libxml2's, as ``virt-xml-validate`` prints
it: the element, its line, and what refused it. Where libxml2 says only that
an element did not fit an ``<interleave>`` (and gives no line), that element
is validated again on its own against the schema's definitions of it, which
names the cause (``Type unsignedLong doesn't allow value '-5'``) and its line.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterator
from functools import cache
from importlib.resources import files
from typing import NamedTuple

from lxml import etree

from .errors import InvalidDocument

SCHEMA_PACKAGE = "storprobe_schemas"
VOLUME_SCHEMA = "storagevol.rng"
#: The largest document read: a scan of 100000 volumes is about 100 MiB.
MAX_DOCUMENT = 256 * 1024 * 1024

_RNG = "{http://relaxng.org/ns/structure/1.0}"
#: libxml2's word for an element no branch of an ``<interleave>`` accepted.
_NOT_INTERLEAVED = re.compile(r"Extra element (\S+) in interleave")


class Reason(NamedTuple):
    """Why a document is invalid: the message, and the line and element it
    concerns when known."""

    message: str
    line: int | None = None
    element: str | None = None

    def __str__(self) -> str:
        where = f"line {self.line}: " if self.line else ""
        return where + (f"element {self.element}: " if self.element else "") + self.message


@cache
def _grammar() -> etree._ElementTree:
    with files(SCHEMA_PACKAGE).joinpath(VOLUME_SCHEMA).open("rb") as f:
        return etree.parse(f)


@cache
def volume_schema() -> etree.RelaxNG:
    """Our storage-volume schema (also accepts a ``<volumes>`` scan document)."""
    return etree.RelaxNG(_grammar())


@cache
def _definitions(name: str) -> tuple[etree.RelaxNG, ...]:
    """One schema for each definition of element ``name`` in ours, starting at it."""
    schemas = []
    for definition in _grammar().getroot().iter(f"{_RNG}element"):
        if definition.get("name") == name:
            grammar = copy.deepcopy(_grammar().getroot())
            start = grammar.find(f"{_RNG}start")
            assert start is not None  # our grammar has its start
            start[:] = [copy.deepcopy(definition)]
            schemas.append(etree.RelaxNG(grammar))
    return tuple(schemas)


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


def invalid_reasons(document: str | bytes, schema: etree.RelaxNG | None = None) -> list[Reason]:
    """Every reason ``document`` is not valid against ``schema`` (default:
    ours), in libxml2's order; empty when it is valid."""
    try:
        root = parse(document)
    except InvalidDocument as exc:
        return [Reason(exc.reason)]
    return _reasons(root, schema)


def schema_errors(document: str | bytes, schema: etree.RelaxNG | None = None) -> list[str]:
    """:func:`invalid_reasons` as text (``line 4: element capacity: ...``)."""
    return [str(reason) for reason in invalid_reasons(document, schema)]


def valid_root(document: str | bytes) -> etree._Element:
    """The root of ``document`` if it is valid against our schema, else InvalidDocument."""
    root = parse(document)
    reasons = _reasons(root, None)
    if reasons:
        raise InvalidDocument("; ".join(str(reason) for reason in reasons))
    return root


def _reasons(root: etree._Element, schema: etree.RelaxNG | None) -> list[Reason]:
    ours = schema is None
    schema = schema or volume_schema()
    if schema.validate(root):
        return []
    reasons: list[Reason] = []
    for entry in schema.error_log:
        extra = _NOT_INTERLEAVED.fullmatch(entry.message)
        explained = list(_explained(root.iter(extra[1]), extra[1])) if extra and ours else []
        reasons += explained or [Reason(entry.message, entry.line or None, _element(entry.path))]
    return list(dict.fromkeys(reasons))


def _explained(elements: Iterator[etree._Element], name: str) -> Iterator[Reason]:
    """Why each of ``elements`` (all named ``name``) that no definition of
    ``name`` accepts is refused: the first error of the first definition,
    followed down to the element inside it that did not fit, if that is the error."""
    definitions = _definitions(name)
    for element in elements:
        if not definitions or any(definition.validate(element) for definition in definitions):
            continue
        yield Reason(f"Extra element {name} in interleave", element.sourceline, name)
        first = definitions[0].error_log[0]
        inner = _NOT_INTERLEAVED.fullmatch(first.message)
        if inner:
            yield from _explained(element.iterdescendants(inner[1]), inner[1])
        else:
            yield Reason(first.message, first.line or element.sourceline, _element(first.path) or name)


def _element(path: str | None) -> str | None:
    """The element's name from libxml2's path to it (``/volume/target[2]`` -> ``target``)."""
    return path.rsplit("/", 1)[-1].split("[", 1)[0] or None if path else None
