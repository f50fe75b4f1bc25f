"""Plugin loading and the cached format table.

Built-in formats are the modules in :data:`BUILTIN_PLUGINS`, registered with
``pm.register`` under their entry-point names; third-party formats come from
the ``storprobe.formats`` entry-point group, loaded lazily on first use.
``STORPROBE_DISABLE_PLUGIN_AUTOLOAD=1`` switches third-party loading off;
``STORPROBE_PLUGINS=name,name`` limits it to the named entry points.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import pluggy

from . import hookspecs
from .errors import PluginConflict, UnknownFormat
from .spec import FormatSpec

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


@dataclass(frozen=True, slots=True)
class Row:
    """A table row with the name of the plugin that provided it."""

    spec: FormatSpec
    plugin: str


class FormatTable:
    """The rows of every registered plugin, in detection order, by name."""

    def __init__(self, rows: list[Row]) -> None:
        self.rows: tuple[Row, ...] = tuple(sorted(rows, key=lambda r: r.spec.sort_key()))
        self.specs: tuple[FormatSpec, ...] = tuple(r.spec for r in self.rows)
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


class _Registry:
    def __init__(self) -> None:
        self.pm: pluggy.PluginManager | None = None
        self._table: FormatTable | None = None

    def plugin_manager(self) -> pluggy.PluginManager:
        if self.pm is None:
            pm = pluggy.PluginManager(hookspecs.PROJECT)
            pm.add_hookspecs(hookspecs)
            for name, module in BUILTIN_PLUGINS:
                pm.register(importlib.import_module(module), name=name)
            _load_third_party(pm)
            self.pm = pm
        return self.pm

    def table(self) -> FormatTable:
        if self._table is None:
            pm = self.plugin_manager()
            rows: dict[str, Row] = {}
            for impl in pm.hook.storprobe_formats.get_hookimpls():
                plugin = pm.get_name(impl.plugin) or repr(impl.plugin)
                for spec in impl.function() or ():
                    if spec.name in rows:
                        raise PluginConflict(
                            f"format {spec.name!r} is provided by both "
                            f"{rows[spec.name].plugin!r} and {plugin!r}"
                        )
                    rows[spec.name] = Row(spec, plugin)
            self._table = FormatTable(list(rows.values()))
        return self._table

    def invalidate(self) -> None:
        self._table = None


def _load_third_party(pm: pluggy.PluginManager) -> None:
    if os.environ.get("STORPROBE_DISABLE_PLUGIN_AUTOLOAD"):
        return
    only = {n.strip() for n in os.environ.get("STORPROBE_PLUGINS", "").split(",") if n.strip()}
    if not only:
        pm.load_setuptools_entrypoints(ENTRY_POINT_GROUP)
        return
    from importlib.metadata import entry_points

    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name in only and pm.get_plugin(ep.name) is None:
            pm.register(ep.load(), name=ep.name)


_registry = _Registry()


def plugin_manager() -> pluggy.PluginManager:
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
