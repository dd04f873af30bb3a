"""What the server runs in each mode (``mode`` in the run config); see docs/method.md, "Modes".

Every mode gives each client ``num-server-rounds * local-steps + finetune-steps``
optimiser steps on the same rows:

==========================  =====================================================  ==========================
mode                        rounds (``local-steps`` each)                          final phase (per client)
==========================  =====================================================  ==========================
``fedgrow``                 Dual-LiGO growth, Global-LiGO aggregated by strategy   fine-tune ``finetune-steps``
``independent-ligo``        private LiGO small -> target, nothing sent             fine-tune ``finetune-steps``
``independent-dual-ligo``   Fed-Grow's Dual-LiGO, same seeds, never averaged       fine-tune ``finetune-steps``
``small-only``              the small model trained alone, nothing sent            fine-tune ``finetune-steps``
``scratch-fedavg``          target model from random init, all weights averaged    fine-tune ``finetune-steps``
==========================  =====================================================  ==========================

No mode averages the clients' grown models: they share no coordinate system
(docs/method.md, "Why no federated fine-tuning of the grown models").
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from flwr.app import ArrayRecord, Message
from flwr.serverapp import Grid

from fedgrow_core.protocol import Phase, initial_global_ligo
from fedgrow_core.run_config import RunConfig

from .checkpoint import Checkpoint
from .phases import collect_average, final_phase, local_rounds, preflight, shared_rounds


@dataclass
class ModeResult:
    """What a mode leaves for the summary.

    Attributes
    ----------
    entries : list of dict
        Round-log entries in order (:func:`server_app.round_log.round_entry` plus
        ``phase``).
    final_replies : list of Message
        The final phase's accepted replies (accuracy, precision, parameter counts).
    final_rejected : list of dict
        ``{"node_id", "reason"}`` per final reply that failed its checks.
    global_ligo : ArrayRecord or None
        The final Global-LiGO, for modes that train one.
    """

    entries: list[dict]
    final_replies: list[Message]
    final_rejected: list[dict]
    global_ligo: ArrayRecord | None = None


def run_mode(
    grid: Grid,
    run: RunConfig,
    run_dir: Path | None = None,
    resume: Checkpoint | None = None,
    on_round: Callable[[dict], None] | None = None,
) -> ModeResult:
    """Run ``run.mode`` to the end (rounds and final phase).

    Every node first loads its model and data (:func:`server_app.phases.preflight`).
    With ``run_dir``, the growth rounds (``fedgrow``) are checkpointed there
    after every round and clients keep their private state on disk under the
    folder's name; ``resume`` (mode ``fedgrow`` only) continues
    from a checkpoint (:mod:`server_app.checkpoint`). ``on_round`` is called
    with every round's log entry (collection included) as the round ends.

    Raises
    ------
    ValueError
        For an unknown mode (``RunConfig.check`` rejects it earlier).
    server_app.phases.PreflightError
        If a node cannot set up; nothing has been trained then.
    """
    rounds, t = run.num_server_rounds, run.round_timeout  # t: seconds per exchange
    report = on_round or (lambda entry: None)
    rows = preflight(grid, t)
    caps = {node: int(m["train-examples"]) for node, m in rows.items()}

    def final(arrays: ArrayRecord, last_round: int = 0, tag: str = "") -> tuple[list[Message], list[dict]]:
        resumed = resume.server_round if resume is not None else 0
        return final_phase(grid, arrays, t, last_round, tag, preflight_rows=rows, resumed_after=resumed)

    if run.mode == "fedgrow":
        start = ArrayRecord(initial_global_ligo(run).state_dict())
        glob, entries = shared_rounds(
            grid, run, start, rounds, Phase.GROW, 1, run_dir=run_dir, resume=resume, example_caps=caps, on_round=report
        )
        tag = run_dir.name if run_dir is not None else ""
        return ModeResult(entries, *final(glob, rounds, tag), glob)
    if run.mode == "scratch-fedavg":
        averaged, collected = collect_average(grid, run, ArrayRecord(), 0, t, example_caps=caps)
        report(collected)
        last, entries = shared_rounds(
            grid, run, averaged, rounds, Phase.TRAIN_SHARED, 1, example_caps=caps, on_round=report
        )
        return ModeResult([collected, *entries], *final(last))
    if run.mode in ("independent-ligo", "independent-dual-ligo", "small-only"):
        phase = Phase.TRAIN_LOCAL if run.mode == "small-only" else Phase.GROW
        entries = local_rounds(grid, rounds, phase, 1, t, on_round=report)
        return ModeResult(entries, *final(ArrayRecord()))
    raise ValueError(f"unknown mode {run.mode!r}")
