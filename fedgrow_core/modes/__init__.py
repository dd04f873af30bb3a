"""The app's modes, each one :class:`Mode` object registered by name (:func:`register_mode`).

Importing this package registers Fed-Grow and its baselines. A mode of a user's
own package registers the same way, from a module the ServerApp and ClientApp
import (docs/architecture.md, "Adding a mode").
"""

from fedgrow_core.modes.base import Collect, GlobalLigo, Handler, LocalRounds, Mode, SharedRounds, Step
from fedgrow_core.modes.registry import get_mode, mode_names, register_mode, unregister_mode

# isort: off
# the built-in modes register themselves on import, Fed-Grow first (mode_names() keeps this order)
from fedgrow_core.modes import fedgrow as _fedgrow  # noqa: F401
from fedgrow_core.modes import baselines as _baselines  # noqa: F401
# isort: on

__all__ = [
    "Collect",
    "GlobalLigo",
    "Handler",
    "LocalRounds",
    "Mode",
    "SharedRounds",
    "Step",
    "get_mode",
    "mode_names",
    "register_mode",
    "unregister_mode",
]
