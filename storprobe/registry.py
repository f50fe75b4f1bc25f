"""Plugin loading and the cached format table.

Built-in formats are the modules in :data:`BUILTIN_PLUGINS`, registered with
``pm.register`` under their entry-point names; third-party formats come from
the ``storprobe.formats`` entry-point group, loaded lazily on first use.
``STORPROBE_DISABLE_PLUGIN_AUTOLOAD=1`` switches third-party loading off;
``STORPROBE_PLUGINS=name,name`` limits it to the named entry points.

When there is nothing but the built-ins to load, the table calls their
``storprobe_formats`` hook implementations directly, in registration order,
and no plugin manager is made (so a command does not import pluggy, which
imports ``inspect``: a tenth of a scan's start-up); the first call for the plugin
manager (to register a plugin, say) makes it, and the table is built through it
from then on. tests/test_startup.py holds both ways to the same table.
"""

import importlib
import os
import sys
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from importlib.machinery import PathFinder
from typing import TYPE_CHECKING, NamedTuple, cast

from . import hookspecs
from .errors import InvalidFormatSpec, PluginConflict, UnknownFormat
from .source import HEAD_SIZE
from .spec import FormatSpec, row_problems

if TYPE_CHECKING:
    import pluggy

ENTRY_POINT_GROUP = "storprobe.formats"

#: (entry-point name, module) of every built-in format plugin.
BUILTIN_PLUGINS: tuple[tuple[str, str], ...] = (
    ("raw", "storprobe_plugins.raw"),
    ("dir", "storprobe_plugins.dir"),
    ("iso", "storprobe_plugins.iso"),
    ("qcow", "storprobe_plugins.qcow"),
    ("qcow2", "storprobe_plugins.qcow2"),
    ("qed", "storprobe_plugins.qed"),
    ("vmdk", "storprobe_plugins.vmdk"),
    ("vpc", "storprobe_plugins.vpc"),
    ("vhdx", "storprobe_plugins.vhdx"),
    ("vdi", "storprobe_plugins.vdi"),
    ("luks", "storprobe_plugins.luks"),
    ("bochs", "storprobe_plugins.bochs"),
    ("cloop", "storprobe_plugins.cloop"),
    ("dmg", "storprobe_plugins.dmg"),
    ("parallels", "storprobe_plugins.parallels"),
    ("cow", "storprobe_plugins.cow"),
)


class Row(NamedTuple):
    """A table row with the name of the plugin that provided it."""

    spec: FormatSpec
    plugin: str


class FormatTable:
    """The rows of every registered plugin, in detection order, by name, and
    indexed by magic so detection looks at each fixed window of the head once."""

    def __init__(self, rows: list[Row], *, builtin_only: bool = False) -> None:
        self.rows: tuple[Row, ...] = tuple(sorted(rows, key=lambda r: r.spec.sort_key()))
        #: Whether the rows are the built-in plugins' alone (a scan's fast path runs only then).
        self.builtin_only = builtin_only
        self.specs: tuple[FormatSpec, ...] = tuple(r.spec for r in self.rows)
        #: Rows with a signature: (row, its magic values, whether ``windows`` decides it).
        self.signed: tuple[tuple[FormatSpec, tuple[bytes, ...], bool], ...] = tuple(
            (s, s.magics, _indexable(s)) for s in self.specs if s.magic is not None or s.match is not None
        )
        self.unsigned: tuple[FormatSpec, ...] = tuple(s for s in self.specs if s.magic is None and s.match is None)
        #: Positions in ``signed`` of the rows the index does not decide (a ``match`` callback).
        self.unindexed: frozenset[int] = frozenset(i for i, (_, _, indexed) in enumerate(self.signed) if not indexed)
        self.windows: tuple[Window, ...] = _windows(self.signed)
        self._by_name = {r.spec.name: r.spec for r in self.rows}

    def __getitem__(self, name: str) -> FormatSpec:
        try:
            return self._by_name[name]
        except KeyError:
            raise UnknownFormat(f"unknown format {name!r}") from None

    def __contains__(self, name: object) -> bool:
        return name in self._by_name

    def names(self) -> list[str]:
        return [s.name for s in self.specs]


class Candidate(NamedTuple):
    """A magic value (``is_magic``), or a prefix after which a row's ``match``
    callback is asked, of the row at ``position`` in ``signed`` and its header
    offset of rank ``rank``."""

    signature: bytes
    position: int
    rank: int
    offset: int
    is_magic: bool


class Window(NamedTuple):
    """Where signatures start, in the head (``start`` >= 0) or before the end of
    the file (``start`` < 0): the bytes at ``start`` of the shortest signature's
    length (``key``) select the candidates, each of which its full bytes confirm."""

    start: int
    key: int
    longest: int
    #: key bytes -> the entries it selects
    candidates: dict[bytes, tuple[Candidate, ...]]


def _windows(signed: tuple[tuple[FormatSpec, tuple[bytes, ...], bool], ...]) -> tuple[Window, ...]:
    """The signature index: one window per distinct start, the head's first."""
    by_start: dict[int, list[Candidate]] = {}
    for position, (spec, magics, indexed) in enumerate(signed):
        for rank, offset in enumerate(spec.header_offsets if indexed else ()):
            for magic in magics:
                by_start.setdefault(offset + spec.magic_offset, []).append(
                    Candidate(magic, position, rank, offset, is_magic=True)
                )
            for prefix in spec.match_prefixes:
                by_start.setdefault(offset, []).append(Candidate(prefix, position, rank, offset, is_magic=False))
    windows = []
    for start, entries in sorted(by_start.items(), key=lambda item: (item[0] < 0, item[0])):
        key = min(len(entry.signature) for entry in entries)
        candidates: dict[bytes, tuple[Candidate, ...]] = {}
        for entry in entries:
            candidates[entry.signature[:key]] = (*candidates.get(entry.signature[:key], ()), entry)
        windows.append(Window(start, key, max(len(entry.signature) for entry in entries), candidates))
    return tuple(windows)


def _indexable(spec: FormatSpec) -> bool:
    """A row the index decides: its magic, and the prefixes that gate its
    ``match`` callback (at one header offset), all in the head (offsets from
    the start) or before the end of the file (negative offsets)."""
    if spec.match is not None and (not spec.match_prefixes or len(spec.header_offsets) > 1):
        return False
    return all(
        0 <= start and start + len(signature) <= HEAD_SIZE if offset >= 0 else start + len(signature) <= 0
        for offset in spec.header_offsets
        for start, signature in [(offset + spec.magic_offset, m) for m in spec.magics]
        + [(offset, p) for p in spec.match_prefixes]
    )


class _Registry:
    def __init__(self) -> None:
        self.pm: pluggy.PluginManager | None = None
        self._table: FormatTable | None = None

    def plugin_manager(self) -> "pluggy.PluginManager":
        if self.pm is None:
            import pluggy

            pm = pluggy.PluginManager(hookspecs.PROJECT)
            pm.add_hookspecs(hookspecs)
            for name, module in BUILTIN_PLUGINS:
                pm.register(importlib.import_module(module), name=name)
            _load_third_party(pm)
            self.pm = pm
            self._table = None  # built through the plugin manager from now on
        return self.pm

    def table(self) -> FormatTable:
        if self._table is None:
            if self.pm is None and not _third_party_to_load():
                hooks = [(name, importlib.import_module(module).storprobe_formats) for name, module in BUILTIN_PLUGINS]
                builtin_only = True
            else:
                pm = self.plugin_manager()
                hooks = [
                    (pm.get_name(impl.plugin) or repr(impl.plugin), impl.function)
                    for impl in pm.hook.storprobe_formats.get_hookimpls()
                ]
                builtin = dict(BUILTIN_PLUGINS)
                builtin_only = all(
                    name in builtin and getattr(plugin, "__name__", None) == builtin[name]
                    for name, plugin in pm.list_name_plugin()
                )
            rows: dict[str, Row] = {}
            for plugin, hook in hooks:
                for returned in cast("Iterable[object]", hook() or ()):
                    spec = _checked_row(returned, plugin)
                    if spec.name in rows:
                        raise PluginConflict(
                            f"format {spec.name!r} is provided by both "
                            f"{rows[spec.name].plugin!r} and {plugin!r}"
                        )
                    rows[spec.name] = Row(spec, plugin)
            self._table = FormatTable(list(rows.values()), builtin_only=builtin_only)
        return self._table

    def invalidate(self) -> None:
        self._table = None


def _checked_row(spec: object, plugin: str) -> FormatSpec:
    """``spec``, or InvalidFormatSpec naming the plugin and the row when it cannot work."""
    if not isinstance(spec, FormatSpec):
        raise InvalidFormatSpec(f"plugin {plugin!r} returned {type(spec).__name__} {spec!r}, not a FormatSpec")
    problems = row_problems(spec)
    if problems:
        raise InvalidFormatSpec(f"plugin {plugin!r}, format {spec.name!r}: " + "; ".join(problems))
    return spec


def _third_party_to_load() -> bool:
    """Whether autoload would register a plugin beyond the built-ins (True
    when the entry points cannot be read without importlib.metadata)."""
    if os.environ.get("STORPROBE_DISABLE_PLUGIN_AUTOLOAD"):
        return False
    declared = _declared_names()
    if declared is None:
        return True
    new = declared - {name for name, _ in BUILTIN_PLUGINS}
    only = _only_names()
    return bool(new & only if only else new)


def _only_names() -> set[str]:
    return {n.strip() for n in os.environ.get("STORPROBE_PLUGINS", "").split(",") if n.strip()}


def _load_third_party(pm: "pluggy.PluginManager") -> None:
    if os.environ.get("STORPROBE_DISABLE_PLUGIN_AUTOLOAD"):
        return
    only = _only_names()
    declared = _declared_names()
    if declared is not None:
        new = {n for n in declared if pm.get_plugin(n) is None and not pm.is_blocked(n)}
        if not (new & only if only else new):
            return  # nothing to load: spare importlib.metadata
    if not only:
        pm.load_setuptools_entrypoints(ENTRY_POINT_GROUP)
        return
    from importlib.metadata import entry_points

    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name in only and pm.get_plugin(ep.name) is None:
            pm.register(ep.load(), name=ep.name)


def _declared_names() -> set[str] | None:
    """Names in our entry-point group that the distributions on ``sys.path``
    declare, read from their ``entry_points.txt`` files in a fraction of the time
    importing ``importlib.metadata`` takes. None when the path holds what only
    importlib.metadata can read (a zip file, an egg, another metadata finder)."""
    if any(hasattr(f, "find_distributions") and f is not PathFinder for f in sys.meta_path):
        return None
    names: set[str] = set()
    for entry in sys.path:
        if entry.lower().endswith(".egg"):
            return None
        try:
            with os.scandir(entry or ".") as it:
                infos = [e.path for e in it if e.name.lower().endswith((".dist-info", ".egg-info"))]
        except NotADirectoryError:
            return None
        except OSError:
            continue  # a path entry that does not exist
        for info in infos:
            try:
                with open(os.path.join(info, "entry_points.txt"), encoding="utf-8") as f:
                    text = f.read()
            except OSError:
                continue
            if ENTRY_POINT_GROUP in text:
                found = _group_names(text)
                if not found:
                    return None  # the group is named but we cannot read it: ask importlib.metadata
                names |= found
    return names


def _group_names(text: str) -> set[str]:
    """Entry-point names under our group's section of an ``entry_points.txt``."""
    names: set[str] = set()
    inside = False
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("["):
            inside = line.strip("[]").strip() == ENTRY_POINT_GROUP
        elif inside and "=" in line and not line.startswith(("#", ";")):
            names.add(line.split("=", 1)[0].strip())
    return names


_registry = _Registry()


def plugin_manager() -> "pluggy.PluginManager":
    """The process-wide plugin manager (built on first use)."""
    return _registry.plugin_manager()


def format_table() -> FormatTable:
    """The cached format table."""
    return _registry.table()


def register(plugin: object, name: str | None = None) -> None:
    """Register a plugin object in-process and rebuild the table on next use."""
    plugin_manager().register(plugin, name=name)
    _registry.invalidate()


def unregister(plugin: object) -> None:
    """Remove a plugin registered with :func:`register`."""
    plugin_manager().unregister(plugin)
    _registry.invalidate()


@contextmanager
def registered(plugin: object, name: str | None = None) -> Iterator[None]:
    """Register ``plugin`` for the duration of a ``with`` block."""
    register(plugin, name)
    try:
        yield
    finally:
        unregister(plugin)
