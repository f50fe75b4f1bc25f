"""The hooks a storprobe plugin implements.

A plugin is a module or object with functions decorated ``@storprobe.hookimpl``
whose names match the specifications below. Built-in formats and third-party
packages use the same hook and the same row type.

``hookimpl`` and ``hookspec`` put on a function exactly the mark pluggy's
``HookimplMarker(PROJECT)`` and ``HookspecMarker(PROJECT)`` put (pluggy reads
them as its own; tests/test_startup.py compares them), without importing pluggy:
importing it costs a command a tenth of its start-up (it imports ``inspect``), and a
command that needs only the built-in formats never makes a plugin manager.
"""

# mypy: disable-error-code="empty-body"
# (a hook specification is a signature and a docstring; pluggy never runs its body)

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar, overload

from .spec import FormatSpec

PROJECT = "storprobe"

F = TypeVar("F", bound=Callable[..., Any])


class HookimplMarker:
    """``@hookimpl`` or ``@hookimpl(tryfirst=True, ...)``: pluggy's hook
    implementation mark, with pluggy's options."""

    @overload
    def __call__(self, function: F) -> F: ...

    @overload
    def __call__(
        self,
        function: None = None,
        *,
        hookwrapper: bool = False,
        optionalhook: bool = False,
        tryfirst: bool = False,
        trylast: bool = False,
        specname: str | None = None,
        wrapper: bool = False,
    ) -> Callable[[F], F]: ...

    def __call__(
        self,
        function: F | None = None,
        *,
        hookwrapper: bool = False,
        optionalhook: bool = False,
        tryfirst: bool = False,
        trylast: bool = False,
        specname: str | None = None,
        wrapper: bool = False,
    ) -> F | Callable[[F], F]:
        opts = {
            "wrapper": wrapper,
            "hookwrapper": hookwrapper,
            "optionalhook": optionalhook,
            "tryfirst": tryfirst,
            "trylast": trylast,
            "specname": specname,
        }

        def mark(func: F) -> F:
            setattr(func, f"{PROJECT}_impl", opts)
            return func

        return mark(function) if function is not None else mark


def hookspec(function: F) -> F:
    """A hook specification: pluggy's mark with its default options."""
    opts = {"firstresult": False, "historic": False, "warn_on_impl": None, "warn_on_impl_args": None}
    setattr(function, f"{PROJECT}_spec", opts)
    return function


hookimpl = HookimplMarker()


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
