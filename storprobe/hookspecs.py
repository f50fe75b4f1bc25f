"""The hooks a storprobe plugin implements.

A plugin is a module or object with functions decorated ``@storprobe.hookimpl``
whose names match the specifications below. Built-in formats and third-party
packages use the same hook and the same row type.
"""

# mypy: disable-error-code="empty-body"
# (a hook specification is a signature and a docstring; pluggy never runs its body)

from __future__ import annotations

import pluggy

from .spec import FormatSpec

PROJECT = "storprobe"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


# -------------------------------------------------------------------------
# The format table
# -------------------------------------------------------------------------


@hookspec
def storprobe_formats() -> list[FormatSpec]:
    """Return the format table rows this plugin provides.

    Called once per process (the table is cached until the set of registered
    plugins changes). Every row's ``name`` must be unique across all plugins;
    a duplicate is reported when the table is built, naming both plugins.

    :return: a list of :class:`storprobe.FormatSpec` rows, possibly empty.
    """
