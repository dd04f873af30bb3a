"""The server's side of a mode: its plan's steps (``mode`` in the run config), then the final phase.

Every node first loads its model and data (:func:`~server_app.orchestration.phases.preflight`);
then :func:`run_mode` runs the steps of the mode's plan
(:class:`fedgrow_core.modes.Mode`) in order, each given the arrays the
previous one left, and the final phase with the last. The modes and what each
runs are in :mod:`fedgrow_core.modes` (docs/method.md, "Modes").
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from flwr.app import ArrayRecord, Message
from flwr.serverapp import Grid

from fedgrow_core.modes import Collect, GlobalLigo, LocalRounds, SharedRounds, get_mode
from fedgrow_core.protocol import TRAIN_EXAMPLES, initial_global_ligo
from fedgrow_core.run_config import RunConfig

from ..persistence.checkpoint import Checkpoint
from .phases import collect_average, final_phase, local_rounds, preflight, shared_rounds
from .strategy import run_checks, strategy_for_run


@dataclass
class ModeResult:
    """What a mode leaves for the summary.

    Attributes
    ----------
    entries : list of dict
        Round-log entries in order (:func:`server_app.reporting.round_log.round_entry` plus
        ``phase``).
    final_replies : list of Message
        The final phase's accepted replies (accuracy, precision, parameter counts).
    final_rejected : list of dict
        ``{"node_id", "reason"}`` per final reply that failed its checks.
    global_ligo : ArrayRecord or None
        The final Global-LiGO, for modes that train one.
    preflight_refused : list of dict
        ``{"node_id", "reason"}`` per node that refused the run at preflight (left out of it).
    """

    entries: list[dict]
    final_replies: list[Message]
    final_rejected: list[dict]
    global_ligo: ArrayRecord | None = None
    preflight_refused: list[dict] = field(default_factory=list)


def run_mode(
    grid: Grid,
    run: RunConfig,
    run_dir: Path | None = None,
    resume: Checkpoint | None = None,
    on_round: Callable[[dict], None] | None = None,
) -> ModeResult:
    """Run ``run.mode``'s plan to the end (its steps, then the final phase).

    With ``run_dir`` and a checkpointed mode, the strategy rounds are
    checkpointed there after every round and clients keep their private state
    on disk under the folder's name; ``resume`` continues from a checkpoint
    (:mod:`server_app.persistence.checkpoint`). ``on_round`` is called with every round's
    log entry (collection included) as the round ends. The run's strategy is
    built once, whole, for the plan's strategy rounds.

    Raises
    ------
    ValueError
        For a mode that is not registered (``RunConfig`` rejects it earlier).
    server_app.orchestration.phases.PreflightError
        If a node cannot set up, or fewer than ``min-train-nodes`` accept the run; nothing has been trained
        then. Nodes that refuse the run are left out (``preflight_refused``).
    """
    mode = get_mode(run.mode)
    t = run.round_timeout  # seconds per exchange
    report = on_round or (lambda entry: None)
    rows, refused = preflight(grid, t, run.min_train_nodes)
    caps = {node: int(m[TRAIN_EXAMPLES]) for node, m in rows.items()}
    keep_dir = run_dir if mode.checkpointed else None
    arrays, entries = ArrayRecord(), []
    for step in mode.plan:
        if isinstance(step, Collect):
            arrays, collected = collect_average(grid, run, arrays, 0, t, example_caps=caps)
            report(collected)
            entries.append(collected)
        elif isinstance(step, SharedRounds):
            if step.from_global_ligo:
                arrays = ArrayRecord(initial_global_ligo(run).state_dict())
            checks = run_checks(
                run,
                example_caps=caps,
                encoded=step.encoded,
                diagnostics=step.diagnostics,
                round_offset=resume.server_round if resume is not None else 0,
            )
            strategy = strategy_for_run(run, len(list(grid.get_node_ids())), checks)
            arrays, done = shared_rounds(
                grid, run, strategy, arrays, step.phase, run_dir=keep_dir, resume=resume, on_round=report
            )
            entries += done
        elif isinstance(step, LocalRounds):
            entries += local_rounds(grid, run.num_server_rounds, step.phase, 1, t, on_round=report)
        else:
            raise ValueError(f"mode {mode.name!r}: unknown plan step {step!r}")
    resumed = resume.server_round if resume is not None else 0
    tag = run_dir.name if run_dir is not None else ""  # every mode's clients save their models under it
    last_round = run.num_server_rounds if mode.checkpointed else 0
    replies, rejected = final_phase(grid, arrays, t, last_round, tag, preflight_rows=rows, resumed_after=resumed)
    global_ligo = arrays if mode.global_ligo is GlobalLigo.SHARED else None
    return ModeResult(entries, replies, rejected, global_ligo, refused)
