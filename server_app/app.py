"""The Fed-Grow ServerApp (``flwr run``): growth rounds, then a final fine-tune and evaluation phase.

The server builds the initial Global-LiGO from the run config alone (it never
sees a client model or a row of data), runs the configured strategy over it for
``num-server-rounds`` rounds, then asks every client to materialise, fine-tune,
evaluate and save its grown model, and writes the run folder
(:mod:`server_app.outputs`).
"""

from __future__ import annotations

import statistics
import time
from datetime import UTC, datetime
from logging import INFO
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.common import log
from flwr.serverapp import Grid, ServerApp

from fedgrow_core.accounting import tensor_bytes
from fedgrow_core.growth_client import global_ligo
from fedgrow_core.run_config import RunConfig

from .outputs import plot_rounds, write_global_ligo, write_round_metrics, write_summary
from .strategy import build_strategy

app = ServerApp()

FINAL_PHASE = "finetune-evaluate"


def final_phase(grid: Grid, arrays: ArrayRecord, timeout: float) -> list[Message]:
    """Ask every node to fine-tune and evaluate its grown model; return the replies without errors.

    One ``EVALUATE`` message per node carries the final Global-LiGO and
    ``phase = "finetune-evaluate"``; ``timeout`` is in seconds. Failed replies are
    logged with the node id and left out.
    """
    messages = [
        Message(
            content=RecordDict({"arrays": arrays, "config": ConfigRecord({"phase": FINAL_PHASE})}),
            message_type=MessageType.EVALUATE,
            dst_node_id=node_id,
        )
        for node_id in grid.get_node_ids()
    ]
    replies = list(grid.send_and_receive(messages, timeout=timeout))
    for msg in replies:
        if msg.has_error():
            log(INFO, "final phase: node %d failed: %s", msg.metadata.src_node_id, msg.error.reason)
    return [m for m in replies if not m.has_error()]


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run Fed-Grow: growth rounds with the configured strategy, then the final phase."""
    start = time.perf_counter()
    run = RunConfig.from_flower(context.run_config)
    glob = global_ligo(run)
    arrays = ArrayRecord(glob.state_dict())
    num_nodes = len(list(grid.get_node_ids()))
    strategy = build_strategy(run.strategy, num_nodes, run.fraction_train)
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    run_dir = Path(run.output_dir) / f"{stamp}-{run.task}-{run.strategy.replace(':', '.')}"
    log(
        INFO,
        "Fed-Grow: %s -> %s, %d clients, run folder %s",
        run.intermediate_shape,
        run.target_shape,
        num_nodes,
        run_dir,
    )

    result = strategy.start(
        grid=grid,
        initial_arrays=arrays,
        num_rounds=run.num_server_rounds,
        train_config=ConfigRecord({"phase": "grow"}),
    )
    final_arrays = result.arrays if result.arrays is not None else arrays
    rows = []
    for entry in getattr(strategy, "round_log", []):
        metrics = dict(result.train_metrics_clientapp.get(entry["round"], {}))
        rows.append(
            {
                "round": entry["round"],
                "train-loss": metrics.get("train-loss"),
                "train-accuracy": metrics.get("train-accuracy"),
                "replies": entry["replies"],
                "accepted": len(entry["accepted_nodes"]),
                "rejected": len(entry["rejected"]),
                "failed": entry["failed"],
                "seconds": entry["seconds"],
                "accepted_nodes": " ".join(str(n) for n in entry["accepted_nodes"]),
            }
        )
    run_dir.mkdir(parents=True, exist_ok=True)
    write_round_metrics(run_dir, rows)
    state = final_arrays.to_torch_state_dict()
    write_global_ligo(run_dir, state)
    if rows:
        plot_rounds(run_dir, rows)

    replies = final_phase(grid, final_arrays, timeout=3600)
    clients = sorted(
        (
            {
                "partition_id": int(m.content["metrics"]["partition-id"]),
                "model": str(m.content["info"]["model"]),
                "accuracy": float(m.content["metrics"]["accuracy"]),
                "precision": float(m.content["metrics"]["precision"]),
                "trainable_params": int(m.content["metrics"]["trainable-params"]),
                "test_examples": int(m.content["metrics"]["num-examples"]),
            }
            for m in replies
        ),
        key=lambda c: c["partition_id"],
    )
    accs = [c["accuracy"] for c in clients]
    target_params = max((int(m.content["metrics"]["target-params"]) for m in replies), default=0)
    summary = {
        "mode": "fedgrow",
        "strategy": run.strategy,
        "rounds": run.num_server_rounds,
        "intermediate_shape": str(run.intermediate_shape),
        "target_shape": str(run.target_shape),
        "clients": clients,
        "mean_accuracy": statistics.fmean(accs) if accs else None,
        "std_accuracy": statistics.pstdev(accs) if accs else None,
        "mean_precision": statistics.fmean(c["precision"] for c in clients) if clients else None,
        "upload_bytes_per_round": tensor_bytes(state),
        "target_model_bytes": 4 * target_params,
        "target_params": target_params,
        "rounds_log": getattr(strategy, "round_log", []),
        "wall_time_s": time.perf_counter() - start,
    }
    write_summary(run_dir, summary)
    log(
        INFO,
        "Fed-Grow done: mean accuracy %s over %d clients; run folder %s",
        summary["mean_accuracy"],
        len(clients),
        run_dir,
    )
