"""Fed-Grow (Shen et al., arXiv 2406.13450, Algorithm 1): Dual-LiGO growth with a shared Global-LiGO.

Each client trains its private Local-LiGO (small -> intermediate shape), its
head and the shared Global-LiGO (intermediate -> target shape); the run's
strategy aggregates the Global-LiGO updates every round; each client then
materialises, fine-tunes, evaluates and saves its grown model.
"""

from fedgrow_core.modes.base import GlobalLigo, Handler, Mode, SharedRounds
from fedgrow_core.modes.registry import register_mode
from fedgrow_core.protocol import Phase

FEDGROW = register_mode(
    Mode(
        name="fedgrow",
        description="Dual-LiGO growth, Global-LiGO aggregated by the strategy",
        plan=(SharedRounds(Phase.GROW, from_global_ligo=True, encoded=True, diagnostics=True),),
        handlers={Phase.GROW: Handler.GROW, Phase.FINAL: Handler.FINAL_GROWN},
        global_ligo=GlobalLigo.SHARED,
        checkpointed=True,
        central_dp=True,
        in_folder_name=False,
    )
)
