"""The registry of model families, in the manner of timm's model registry.

A family registers where it is defined, with the :func:`register_family`
decorator on its :class:`~fedgrow_core.growth.families.base.ModelFamily`
subclass; a user's own package adds one the same way (docs/architecture.md,
"Adding a model family"), and declares the module in the ``fedgrow.families``
entry-point group so that every process of a run imports it on the first lookup.
"""

from __future__ import annotations

from torch import nn

from fedgrow_core.growth.families.base import ModelFamily
from fedgrow_core.plugins import load_plugins

#: The entry-point group whose modules register model families when imported.
PLUGIN_GROUP = "fedgrow.families"

_FAMILIES: dict[str, type[ModelFamily]] = {}


class UnknownModelFamilyError(ValueError):
    """No registered family has the name asked for, or grows the model given; the message names those known."""


def register_family(cls: type[ModelFamily]) -> type[ModelFamily]:
    """Class decorator: register a :class:`ModelFamily` subclass under its ``name``.

    Raises
    ------
    TypeError
        If ``cls`` is not a ``ModelFamily`` subclass with a string ``name``.
    ValueError
        If another class is registered under the same name.
    """
    if not (isinstance(cls, type) and issubclass(cls, ModelFamily) and isinstance(getattr(cls, "name", None), str)):
        raise TypeError(f"expected a ModelFamily subclass with a string `name`, got {cls!r}")
    known = _FAMILIES.get(cls.name)
    if known is not None and known is not cls:
        raise ValueError(f"model family {cls.name!r} is already registered ({known.__module__}.{known.__qualname__})")
    _FAMILIES[cls.name] = cls
    return cls


def unregister_family(name: str) -> None:
    """Remove the family registered under ``name`` (a no-op if none is)."""
    _FAMILIES.pop(name, None)


def family_names() -> tuple[str, ...]:
    """The registered families' names, in registration order."""
    load_plugins(PLUGIN_GROUP)
    return tuple(_FAMILIES)


def get_family(name: str) -> ModelFamily:
    """An instance of the family registered under ``name``.

    Raises
    ------
    UnknownModelFamilyError
        For an unknown name, listing the registered families.
    """
    load_plugins(PLUGIN_GROUP)
    if name not in _FAMILIES:
        raise UnknownModelFamilyError(f"unknown model family {name!r}; registered families: {list(_FAMILIES)}")
    return _FAMILIES[name]()


def family_for(model: nn.Module) -> ModelFamily:
    """The first registered family that grows ``model`` (its ``handles``), the most recently registered first.

    So a user's family for a subclass of a built-in model wins over the built-in one.

    Raises
    ------
    UnknownModelFamilyError
        If no registered family handles ``model``; the message names the model's
        class and the registered families.
    """
    load_plugins(PLUGIN_GROUP)
    for cls in reversed(_FAMILIES.values()):
        if cls.handles(model):
            return cls()
    raise UnknownModelFamilyError(
        f"no registered model family grows a {type(model).__name__}; registered families: {list(_FAMILIES)} "
        "(register one with fedgrow_core.growth.families.register_family: docs/architecture.md, "
        "'Adding a model family')"
    )
