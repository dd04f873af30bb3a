"""What Flower adds to a Fed-Grow run: the same client work through ``flwr run`` and in-process.

1. **Flower**: ``flwr run .`` in local simulation (the federation of
   ``flwr_home/federation.toml``: three SuperNodes, Ray), with a project-local
   ``FLWR_HOME`` and a fresh local SuperLink, exactly as ``make run``. Timed
   from the command's start to its end; the ServerApp's own wall time
   (``summary.json``'s ``wall_time_s``) and ``wall_over_floor`` are printed too.
2. **In-process**: the same clients (:class:`~fedgrow_core.clients.growth_client.GrowthClient`,
   one per partition) built and called directly in this process, one after the
   other: every round each trains ``local-steps`` steps from the current
   Global-LiGO (and evaluates when the run would), the replies are averaged
   with Flower's own ``aggregate_arrayrecords`` (FedAvg weighted by
   ``num-examples``), and at the end every client fine-tunes and evaluates its
   grown model. Timed from building the first client to the last evaluation.

Both run the default run config (the work of ``make run``) with
``save-models=false`` and the same overrides (``key=value``; ``--short`` for a
quick run: ``num-server-rounds=2 local-steps=5 finetune-steps=5``). Flower's
cost is mostly fixed (SuperLink, FAB install, Ray start, preflight), so the
ratio is higher for shorter runs. Prints one JSON line per variant; the last
line is ``flower_overhead_ratio=<flwr run wall / in-process wall>`` (goal:
<= 1.15).

    python -m benchmarks.flower_overhead [--short] [key=value ...]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from flwr.app import ArrayRecord, MetricRecord, RecordDict
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

from experiments.flower_launcher import flwr_run, prepare_flwr_home, stop_local_superlink
from fedgrow_core.clients.growth_client import GrowthClient
from fedgrow_core.protocol import initial_global_ligo
from fedgrow_core.run_config import RunConfig, pyproject_config

SHORT_RUN = ["num-server-rounds=2", "local-steps=5", "finetune-steps=5"]
NUM_NODES = 3  # flwr_home/federation.toml: num-supernodes


def in_process(run: RunConfig, num_nodes: int = NUM_NODES) -> dict:
    """The run's client work without Flower; returns ``wall_s`` and ``mean_accuracy``."""
    start = time.perf_counter()
    clients = [GrowthClient(run, pid, num_nodes) for pid in range(num_nodes)]
    state = initial_global_ligo(run).state_dict()
    for server_round in range(1, run.num_server_rounds + 1):
        replies = []
        for client in clients:
            arrays, metrics = client.train_round(state, with_eval=run.evaluates_round(server_round))
            replies.append(
                RecordDict({"arrays": ArrayRecord(arrays), "metrics": MetricRecord({"n": metrics["num-examples"]})})
            )
        state = aggregate_arrayrecords(replies, "n").to_torch_state_dict()
    accuracy = [c.finetune_and_evaluate(state, None)["accuracy"] for c in clients]
    wall = time.perf_counter() - start
    return {"variant": "in-process", "wall_s": wall, "mean_accuracy": sum(accuracy) / len(accuracy)}


def through_flower(overrides: list[str], work: Path) -> dict:
    """``flwr run`` with ``overrides`` in local simulation; returns wall times and the run's summary numbers."""
    home = prepare_flwr_home(work / "flwr-home")
    config = work / "run.toml"
    config.write_text("\n".join([*overrides, f'output-dir="{work / "output"}"']) + "\n")
    start = time.perf_counter()
    try:
        status = flwr_run(config, home, work / "flwr.log")
    finally:
        stop_local_superlink(home)
    wall = time.perf_counter() - start
    summaries = sorted((work / "output").glob("*/summary.json"))
    if status != 0 or not summaries:
        raise RuntimeError(f"flwr run failed (exit {status}); see {work / 'flwr.log'}")
    summary = json.loads(summaries[-1].read_text())
    return {
        "variant": "flwr run",
        "wall_s": wall,
        "serverapp_wall_s": summary["wall_time_s"],
        "compute_floor_s": summary["compute_floor_s"],
        "wall_over_floor": summary["wall_over_floor"],
        "mean_accuracy": summary["mean_accuracy"],
    }


def main(argv: list[str] | None = None) -> float:
    """Run both variants; returns the ratio printed last."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--short", action="store_true", help=f"a quick run: {' '.join(SHORT_RUN)}")
    parser.add_argument("overrides", nargs="*", help="run-config key=value")
    args = parser.parse_args(argv)
    overrides = ["save-models=false", *(SHORT_RUN if args.short else []), *args.overrides]
    with tempfile.TemporaryDirectory(prefix="flower-overhead-") as tmp:
        flower = through_flower(overrides, Path(tmp))
    print(json.dumps(flower), flush=True)
    local = in_process(RunConfig.from_flower(pyproject_config("pyproject.toml", overrides)))
    print(json.dumps(local), flush=True)
    ratio = flower["wall_s"] / local["wall_s"]
    print(f"serverapp_overhead_ratio={flower['serverapp_wall_s'] / local['wall_s']:.3f}")
    print(f"flower_overhead_ratio={ratio:.3f}")
    return ratio


if __name__ == "__main__":
    main()
