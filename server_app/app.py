"""The Fed-Grow ServerApp (``flwr run``): the configured mode's rounds, then the final phase.

In the default mode ``fedgrow`` the server builds the initial Global-LiGO from the
run config alone (it never sees a client model or a row of data), runs the
configured strategy over it for ``num-server-rounds`` rounds, then asks every
client to materialise, fine-tune, evaluate and save its grown model. The
modes (``mode``: Fed-Grow and the baselines of the comparison) are in
:mod:`fedgrow_core.modes`, and :mod:`server_app.orchestration.plan` runs them. The run
folder is written by :mod:`server_app.reporting.outputs` and :mod:`server_app.reporting.summary`.
"""

from __future__ import annotations

import tempfile
import time
from datetime import UTC, datetime
from logging import ERROR, INFO
from pathlib import Path

from flwr.app import ArrayRecord, Context
from flwr.common import log
from flwr.serverapp import Grid, ServerApp

from fedgrow_core.growth.diagnostics import relative_change
from fedgrow_core.import_freeze import freeze_imports
from fedgrow_core.modes import get_mode
from fedgrow_core.protocol import initial_global_ligo
from fedgrow_core.run_config import ConfigError, RunConfig

from .orchestration.plan import ModeResult, run_mode
from .orchestration.prompt_grid import PromptGrid
from .orchestration.strategy import check_strategy
from .persistence.checkpoint import Checkpoint, check_resumable, read_checkpoint
from .reporting.outputs import plot_rounds, write_global_ligo, write_round_metrics, write_summary
from .reporting.quiet_log import quiet_strategy_log
from .reporting.summary import build_summary, final_clients, round_rows, summary_problems
from .reporting.tracking import RunTrackers

app = ServerApp()


def run_folder(run: RunConfig) -> Path:
    """``<output-dir>/<UTC stamp>-<task>-<mode>-<strategy>/`` (the default mode, ``fedgrow``, omits the mode)."""
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    mode = f"-{run.mode}" if get_mode(run.mode).in_folder_name else ""
    return Path(run.output_dir) / f"{stamp}-{run.task}{mode}-{run.strategy.replace(':', '.')}"


def check_writable(folder: Path) -> None:
    """Create ``folder`` if needed and check that files can be written in it.

    Raises
    ------
    ConfigError
        Naming ``output-dir`` and the reason.
    """
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder):
            pass
    except OSError as err:
        raise ConfigError([f"output-dir = {str(folder)!r}: cannot write there ({err.strerror or err})"]) from err


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run the configured mode and write the run folder."""
    with quiet_strategy_log():
        _main(PromptGrid(grid), context)  # a round's replies are collected as they arrive, not every 3 s


def _main(grid: Grid, context: Context) -> None:
    start = time.perf_counter()
    run = RunConfig.from_flower(context.run_config)
    num_nodes = len(list(grid.get_node_ids()))
    # an unknown or unconstructible strategy fails before any node sets up; it is built once, for the rounds
    check_strategy(run, max(num_nodes, run.min_train_nodes))
    check_writable(Path(run.output_dir))  # and so does an output-dir the results could not be written to
    resume = None
    if run.resume_from:  # a missing or mismatched checkpoint fails here too
        resume = read_checkpoint(run.resume_from)
        check_resumable(resume, run)
    run_dir = Path(run.resume_from) if run.resume_from else run_folder(run)
    log(
        INFO,
        "Fed-Grow (%s): %s -> %s, %d clients, run folder %s",
        run.mode,
        run.intermediate_shape,
        run.target_shape,
        num_nodes,
        run_dir,
    )
    trackers = RunTrackers(run, run_dir)  # a missing tracker package fails here, before round 1
    try:
        result = run_mode(grid, run, run_dir, resume, on_round=trackers.round)
        _write_results(run, run_dir, result, resume, start, trackers)
    finally:
        trackers.close()


def _write_results(
    run: RunConfig, run_dir: Path, result: ModeResult, resume: Checkpoint | None, start: float, trackers: RunTrackers
) -> None:
    """Write the run folder (rows, plot, Global-LiGO, summary), log the final results and track them."""
    clients = final_clients(result.final_replies, result.entries)
    rows = round_rows(run, result.entries, clients)
    trackers.final(clients, rows[-1]["round"] if rows else 0)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_round_metrics(run_dir, rows)
    plot_rounds(run_dir, rows)
    if result.global_ligo is not None:
        write_global_ligo(run_dir, result.global_ligo.to_torch_state_dict())
    resumed_after = resume.server_round if resume is not None else 0
    extra = {
        "final_rejected": result.final_rejected,
        "preflight_refused": result.preflight_refused,
        "global_ligo_relative_change": None,
    }
    if result.global_ligo is not None:  # how far the whole run moved the shared operator
        initial = {k: v.numpy() for k, v in ArrayRecord(initial_global_ligo(run).state_dict()).items()}
        final = {k: v.numpy() for k, v in result.global_ligo.items()}
        extra["global_ligo_relative_change"] = relative_change(initial, final)
    wall = time.perf_counter() - start
    summary = build_summary(run, result.entries, clients, rows, wall, resumed_after, **extra)
    write_summary(run_dir, summary)
    for problem in summary_problems(summary):  # written first: a schema slip never loses a finished run's results
        log(ERROR, "summary.json departs from fedgrow_core.run_summary.RunSummary: %s", problem)
    for client in clients:
        log(
            INFO,
            "partition %d (%s): accuracy %.3f on %d test rows",
            client["partition_id"],
            client["model"],
            client["accuracy"],
            client["test_examples"],
        )
    mean = summary["mean_accuracy"]
    if summary.get("global_ligo_relative_change") is not None:
        log(INFO, "the Global-LiGO moved %.4g of its norm over the run", summary["global_ligo_relative_change"])
    log(
        INFO,
        "Fed-Grow (%s) done in %.0f s: mean accuracy %s over %d clients; summary in %s",
        run.mode,
        summary["wall_time_s"],
        "n/a" if mean is None else f"{mean:.3f}",
        len(clients),
        (run_dir / "summary.json").resolve(),
    )


freeze_imports()  # last: what the imports above left stays out of the garbage collector's walks
