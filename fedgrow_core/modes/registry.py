"""The registry of modes by name, in the manner of timm's model registry.

A package of a user's own registers its modes where it defines them, and
declares the module in the ``fedgrow.modes`` entry-point group, so every
process of a run (the ServerApp's and every SuperNode's) imports it on the
first lookup::

    [project.entry-points."fedgrow.modes"]
    my-modes = "my_package.modes"
"""

from __future__ import annotations

from fedgrow_core.modes.base import Mode
from fedgrow_core.plugins import load_plugins

#: The entry-point group whose modules register modes when imported.
PLUGIN_GROUP = "fedgrow.modes"

_MODES: dict[str, Mode] = {}


def register_mode(mode: Mode, *, replace: bool = False) -> Mode:
    """Register ``mode`` under ``mode.name`` and return it (so a module can keep it as a constant).

    Raises
    ------
    ValueError
        If a different mode is registered under the name and ``replace`` is false.
    """
    known = _MODES.get(mode.name)
    if known is not None and known != mode and not replace:
        raise ValueError(f"mode {mode.name!r} is already registered; pass replace=True to replace it")
    _MODES[mode.name] = mode
    return mode


def unregister_mode(name: str) -> None:
    """Remove the mode registered under ``name`` (a no-op if none is)."""
    _MODES.pop(name, None)


def get_mode(name: str) -> Mode:
    """The mode registered under ``name``.

    Raises
    ------
    ValueError
        For an unknown name, listing the registered modes.
    """
    load_plugins(PLUGIN_GROUP)
    try:
        return _MODES[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown mode {str(name)[:40]!r}; registered modes: {list(mode_names())}") from None


def mode_names() -> tuple[str, ...]:
    """The registered modes' names, in registration order (Fed-Grow first, then the baselines, then plugins')."""
    load_plugins(PLUGIN_GROUP)
    return tuple(_MODES)
