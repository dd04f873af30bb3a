"""The baselines Fed-Grow is compared with (docs/results.md); none averages grown models.

No mode averages the clients' grown models: they share no coordinate system
(docs/method.md, "Why no federated fine-tuning of the grown models").
"""

from fedgrow_core.modes.base import Collect, GlobalLigo, Handler, LocalRounds, Mode, SharedRounds
from fedgrow_core.modes.registry import register_mode
from fedgrow_core.protocol import Phase

_GROW_ALONE = {Phase.GROW: Handler.GROW, Phase.FINAL: Handler.FINAL_GROWN}

SCRATCH_FEDAVG = register_mode(
    Mode(
        name="scratch-fedavg",
        description="target model from a random initialisation, all weights averaged by the strategy",
        plan=(Collect(), SharedRounds(Phase.TRAIN_SHARED)),
        handlers={
            Phase.COLLECT: Handler.COLLECT_TARGET,
            Phase.TRAIN_SHARED: Handler.TRAIN_TARGET,
            Phase.FINAL: Handler.FINAL_TARGET,
        },
    )
)
INDEPENDENT_LIGO = register_mode(
    Mode(
        name="independent-ligo",
        description="a private LiGO small -> target per client, nothing sent",
        plan=(LocalRounds(Phase.GROW),),
        handlers=_GROW_ALONE,
        operator="single",
    )
)
INDEPENDENT_DUAL_LIGO = register_mode(
    Mode(
        name="independent-dual-ligo",
        description="Fed-Grow's Dual-LiGO with the same seeds, never averaged",
        plan=(LocalRounds(Phase.GROW),),
        handlers=_GROW_ALONE,
        global_ligo=GlobalLigo.PRIVATE,
    )
)
SMALL_ONLY = register_mode(
    Mode(
        name="small-only",
        description="the small model trained alone, nothing sent",
        plan=(LocalRounds(Phase.TRAIN_LOCAL),),
        handlers={Phase.TRAIN_LOCAL: Handler.TRAIN_SMALL, Phase.FINAL: Handler.FINAL_SMALL},
        model_kind="small_model",
    )
)
