"""``storprobe measure``: the size a new image would take, as ``qemu-img measure`` says it.

A target format's row answers through its ``measure`` callback, given a
:class:`MeasureRequest`: the creation options (``-o``, read as qemu-img reads
them, against the options the row declares), and either a virtual size
(``--size``) or the :class:`SourceDisk` to be converted: its record, its
virtual size, and the ranges of its guest disk that hold data, through its
backing chain (what QEMU's block status calls data, not zeros). The row
returns a :class:`Measurement`; this module renders it as qemu-img does.

Refusals are :class:`MeasureError`, each holding qemu-img's error reports.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Literal, NamedTuple

from .errors import ProbeError
from .jsontext import indented
from .sizes import parse_size
from .spec import INT64_MAX

if TYPE_CHECKING:
    from .datapath import BackingPolicy, Layer
    from .model import ImageInfo
    from .registry import FormatTable

#: The largest value of a number or size option (QEMU's are unsigned 64-bit).
UINT64_MAX = 2**64 - 1


class MeasureError(ProbeError):
    """qemu-img measure refuses: ``reports`` are its error reports, in order
    (a report's later lines are hints, printed without the program's name)."""

    code = "measure"

    def __init__(self, *reports: str, code: str | None = None) -> None:
        super().__init__("\n".join(reports), code=code)
        self.reports = reports


OptionKind = Literal["string", "bool", "number", "size"]


class CreateOption(NamedTuple):
    """A creation option a format accepts (QEMU's ``QemuOptDesc``): its name and value type."""

    name: str
    kind: OptionKind


#: The file protocol's creation options, which qemu-img accepts beside every target format's.
FILE_OPTIONS = (
    CreateOption("size", "size"),
    CreateOption("preallocation", "string"),
    CreateOption("nocow", "bool"),
    CreateOption("extent_size_hint", "size"),
)


class Measurement(NamedTuple):
    """``qemu-img measure``'s answer: bytes the new image needs now (``required``),
    fully written (``fully_allocated``), and for the source's persistent bitmaps
    (``bitmaps``; None where qemu-img does not print it)."""

    required: int
    fully_allocated: int
    bitmaps: int | None = None


class Options:
    """The creation options given, typed: the last value given for a name wins."""

    def __init__(self, values: Mapping[str, str | bool | int]) -> None:
        self._values = dict(values)

    def string(self, name: str) -> str | None:
        value = self._values.get(name)
        return value if isinstance(value, str) else None

    def flag(self, name: str, default: bool = False) -> bool:
        value = self._values.get(name, default)
        return value if isinstance(value, bool) else default

    def number(self, name: str, default: int) -> int:
        """A number or size option (bytes for a size)."""
        value = self._values.get(name, default)
        return value if isinstance(value, int) and not isinstance(value, bool) else default

    def given(self, name: str) -> bool:
        return name in self._values


class SourceDisk:
    """The guest disk to be converted: its top image's record, the virtual size
    QEMU's driver shows, and its data ranges through the chain opened for it."""

    def __init__(self, layers: list[Layer]) -> None:
        self._layers = layers
        self.info: ImageInfo = layers[0].info
        self.virtual_size = self.info.driver_virtual_size

    def data_ranges(self) -> Iterator[tuple[int, int]]:
        """``(start, length)`` of each range some image of the chain holds as
        data, in order (QEMU's block status: data, not zero). Zero clusters,
        holes in an image's file and ranges no image holds read as zeros and
        are left out."""
        from .datapath import statuses

        for status in statuses(self._layers, 0, self.virtual_size):
            if status.present and status.data and not status.zero:
                yield status.start, status.length

    def close(self) -> None:
        for layer in self._layers:
            layer.host.close()


class MeasureRequest(NamedTuple):
    """What a row's ``measure`` callback answers: the target ``format``'s name,
    the ``-o`` options as given (name, value) and the ``--size`` given, if any,
    the ``source`` to convert, if any, and the ids of the secret objects given
    (``--object secret,id=...``: an encryption key's name, never its value).
    The callback reads its options first, with :meth:`options`, as qemu-img
    refuses bad ones before measuring."""

    format: str
    given: tuple[tuple[str, str], ...] = ()
    size: int | None = None
    source: SourceDisk | None = None
    secrets: frozenset[str] = frozenset()

    def options(self, declared: Iterable[CreateOption]) -> Options:
        """The options given, checked against ``declared`` (and the file
        protocol's), with ``--size`` as the last ``size``: a MeasureError
        with qemu-img's words for an unknown option or a value of the wrong type."""
        kinds = {option.name: option.kind for option in (*declared, *FILE_OPTIONS)}
        values: dict[str, str | bool | int] = {}
        for name, text in self.given:
            if name == "id":  # QEMU takes it for the options' identifier
                continue
            kind = kinds.get(name)
            if kind is None:
                raise self._invalid(f"Invalid parameter '{name}'")
            values.pop(name, None)
            values[name] = self._typed(name, kind, text)
        if self.size is not None:
            values["size"] = self.size
        return Options(values)

    def _typed(self, name: str, kind: OptionKind, text: str) -> str | bool | int:
        if kind == "bool":
            if text in ("on", "yes", "true", "y"):
                return True
            if text in ("off", "no", "false", "n"):
                return False
            raise self._invalid(f"Parameter '{name}' expects 'on' or 'off'")
        if kind == "number":
            number = _strtou64(text)
            if number is None:
                raise self._invalid(f"Parameter '{name}' expects a number")
            if number > UINT64_MAX:
                raise self._invalid(f"Value '{text}' is too large for parameter '{name}'")
            return number
        if kind == "size":
            try:
                return parse_size(text)
            except ValueError as exc:
                if str(exc).startswith("larger than"):
                    raise self._invalid(f"Value '{text}' is out of range for parameter '{name}'") from None
                raise self._invalid(
                    f"Parameter '{name}' expects a non-negative number below 2^64\n"
                    "Optional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, peta-\n"
                    "and exabytes, respectively."
                ) from None
        return text

    def _invalid(self, report: str) -> MeasureError:
        return MeasureError(report, f"Invalid options for file format '{self.format}'", code="measure.options")


#: strtoull's syntax in base 0: white space, a sign, then hexadecimal, octal or decimal digits.
_NUMBER = re.compile(
    r"[ \t\n\v\f\r]*(?P<sign>[+-]?)(?:0[xX](?P<hex>[0-9a-fA-F]+)|(?P<octal>0[0-7]*)|(?P<dec>[1-9][0-9]*))"
)


def _strtou64(text: str) -> int | None:
    """The number ``text`` denotes as QEMU's ``qemu_strtou64`` reads it (a
    negative one wraps around 2**64, as strtoull's does); None if it is not one;
    more than :data:`UINT64_MAX` when it is out of range."""
    match = _NUMBER.fullmatch(text)
    if match is None:
        return None
    if match["hex"]:
        value = int(match["hex"], 16)
    elif match["octal"]:
        value = int(match["octal"], 8)
    else:
        value = int(match["dec"])
    if match["sign"] == "-" and value <= UINT64_MAX:
        value = -value % 2**64
    return value


def option_list(texts: Iterable[str]) -> tuple[tuple[str, str], ...]:
    """``-o`` arguments as qemu-img reads them: each must be a non-empty list not
    starting with a comma nor ending in an odd number of them; the lists join
    with commas into ``name=value`` pairs, ``,,`` a comma inside a value, a bare
    ``name`` meaning ``name=on`` and ``noname`` meaning ``name=off``."""
    joined: list[str] = []
    for text in texts:
        trailing = len(text) - len(text.rstrip(","))
        if not text or text[0] == "," or trailing % 2:
            raise MeasureError(f"Invalid option list: {text}", code="measure.options")
        joined.append(text)
    params, pairs, at = ",".join(joined), [], 0
    while at < len(params):
        name_end = at
        while name_end < len(params) and params[name_end] not in "=,":
            name_end += 1
        name = params[at:name_end]
        if name_end < len(params) and params[name_end] == "=":
            value, at = _value(params, name_end + 1)
        else:
            value = "on"
            if name.startswith("no"):
                name, value = name[2:], "off"
            at = name_end + 1
        pairs.append((name, value))
    return tuple(pairs)


def _value(params: str, at: int) -> tuple[str, int]:
    """The value starting at ``at`` (``,,`` is a comma) and where the next option starts."""
    parts: list[str] = []
    while True:
        comma = params.find(",", at)
        if comma < 0:
            parts.append(params[at:])
            return "".join(parts), len(params)
        if params.startswith(",,", comma):
            parts.append(params[at : comma + 1])
            at = comma + 2
            continue
        parts.append(params[at:comma])
        return "".join(parts), comma + 1


#: The ``--object`` types measure accepts: secrets, whose ids an encrypted target's key-secret names.
SECRET_TYPES = ("secret", "secret_keyring")


def secret_id(text: str) -> str:
    """The id of the secret object ``--object TYPE,id=ID,...`` creates (its
    value is never read: a size does not depend on a key). A MeasureError for
    an object without an id or of another type."""
    kind, _, rest = text.partition(",")
    if kind.startswith("qom-type="):
        kind = kind[len("qom-type=") :]
    ids = [value for name, value in option_list([rest]) if name == "id"] if rest else []
    if kind not in SECRET_TYPES:
        raise MeasureError(f"--object {kind}: measure takes only secret objects ({', '.join(SECRET_TYPES)})",
                           code="measure.object")
    if not ids:
        raise MeasureError("Parameter 'id' is missing", code="measure.object")
    return ids[-1]


def image_size(text: str) -> int:
    """``--size``'s bytes, as qemu-img reads them (a MeasureError in its words)."""
    try:
        return parse_size(text)
    except ValueError as exc:
        if str(exc).startswith("larger than"):
            raise MeasureError(
                f"Invalid image size specified. Must be between 0 and {INT64_MAX}.", code="measure.size"
            ) from None
        raise MeasureError(
            "Invalid image size specified. You may use k, M, G, T, P or E suffixes for",
            "kilobytes, megabytes, gigabytes, terabytes, petabytes and exabytes.",
            code="measure.size",
        ) from None


def measure(
    format: str = "raw",
    options: Iterable[str] = (),
    *,
    size: int | None = None,
    source: str | os.PathLike[str] | None = None,
    source_format: str | None = None,
    backing: BackingPolicy | None = None,
    secrets: Iterable[str] = (),
    max_size: int | None = None,
    table: FormatTable | None = None,
) -> Measurement:
    """What ``qemu-img measure -O format [-o options] (--size size | [-f source_format] source)``
    answers. ``backing``: which backing files of ``source`` are read (default: any
    local one its chain records, as qemu-img does; :data:`~storprobe.datapath.IGNORE`
    reads the top image alone). ``secrets``: the ids of the secret objects an
    encrypted target's ``key-secret`` may name. ``max_size``: the largest virtual
    size of an image of ``source``'s chain that is read (default: the data
    path's, 64 TiB); a larger one is ``datapath.too-large``."""
    if source is None and source_format is not None:
        raise MeasureError("--image-opts, -f, and -l require a filename argument.", code="measure.usage")
    if source is not None and size is not None:
        raise MeasureError("--size N cannot be used together with a filename.", code="measure.usage")
    if source is None and size is None:
        raise MeasureError("Either --size N or one filename must be specified.", code="measure.usage")
    given = option_list(options)
    from .registry import format_table

    table = table or format_table()
    disk = None
    if source is not None:
        from .datapath import LOCAL, open_layers
        from .safety import DEFAULT_MAX_VIRTUAL_SIZE

        bound = DEFAULT_MAX_VIRTUAL_SIZE if max_size is None else max_size
        disk = SourceDisk(open_layers(source, source_format, backing=backing or LOCAL, max_size=bound, table=table))
    try:
        spec = table[format] if format in table.names() else None
        if spec is None or spec.driver(None) != format:  # QEMU has no driver of that name (an iso is raw)
            raise MeasureError(f"Unknown file format '{format}'", code="measure.format")
        if spec.measure is None:
            raise MeasureError(f"Block driver '{format}' does not support size measurement", code="measure.format")
        return spec.measure(MeasureRequest(format, given, size, disk, frozenset(secrets)))
    finally:
        if disk is not None:
            disk.close()


def to_json(measurement: Measurement) -> str:
    """``qemu-img measure --output=json``'s text (its keys in QEMU's dictionary
    order: bitmaps first; its numbers are QAPI's signed 64-bit integers, so a
    sum past INT64_MAX shows negative, where the human lines show it unsigned)."""
    out = {} if measurement.bitmaps is None else {"bitmaps": _int64(measurement.bitmaps)}
    out.update({"required": _int64(measurement.required), "fully-allocated": _int64(measurement.fully_allocated)})
    return indented(out) + "\n"


def _int64(n: int) -> int:
    return n - 2**64 if n > INT64_MAX else n


def to_human(measurement: Measurement) -> str:
    """``qemu-img measure``'s lines."""
    lines = [f"required size: {measurement.required}", f"fully allocated size: {measurement.fully_allocated}"]
    if measurement.bitmaps is not None:
        lines.append(f"bitmaps size: {measurement.bitmaps}")
    return "\n".join(lines) + "\n"
