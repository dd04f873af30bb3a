"""Registries' plugins: modules of installed packages, named by an entry-point group, imported once per process.

A package of a user's own extends a registry (modes, model families) by
registering where it defines its objects and naming that module in the
registry's entry-point group; the registry calls :func:`load_plugins` on its
first lookup, so every process of a run (the ServerApp's and every
SuperNode's) sees the same objects.
"""

from __future__ import annotations

from importlib.metadata import entry_points

_LOADED: set[str] = set()


def load_plugins(group: str) -> None:
    """Import the module of every entry point of ``group``, once per process (importing one registers its objects).

    Raises
    ------
    ImportError
        Naming the entry point whose module failed to import (the group is then
        not loaded again in this process).
    """
    if group in _LOADED:
        return
    _LOADED.add(group)
    for point in entry_points(group=group):
        try:
            point.load()
        except Exception as err:  # noqa: BLE001 - any failure of a plugin's import is reported as one
            raise ImportError(f"{group} plugin {point.name!r} ({point.value}) failed to import: {err}") from err
