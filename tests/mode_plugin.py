"""A package's own mode, registered on import: what a ``fedgrow.modes`` entry point names (tests/test_modes.py)."""

from fedgrow_core.modes import Handler, LocalRounds, Mode, register_mode
from fedgrow_core.protocol import Phase

PLUGIN = register_mode(
    Mode(
        name="plugin-small-only",
        description="the small model trained alone (declared by a plugin in a test)",
        plan=(LocalRounds(Phase.TRAIN_LOCAL),),
        handlers={Phase.TRAIN_LOCAL: Handler.TRAIN_SMALL, Phase.FINAL: Handler.FINAL_SMALL},
        model_kind="small_model",
    )
)
