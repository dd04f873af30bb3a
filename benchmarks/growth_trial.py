"""One client's growth trial, for choosing the growth recipe: growth steps, then fine-tuning, test accuracy.

Runs a single :class:`~fedgrow_core.clients.growth_client.GrowthClient` in-process (no
Flower) from the default run config plus ``key=value`` overrides. It evaluates
the grown model before any step, trains ``local-steps`` growth steps from the
initial Global-LiGO (one round), evaluates again, fine-tunes ``finetune-steps``
steps and evaluates a last time, on at most ``--test-rows`` rows of the client's
test split. It also reports how far the operators moved: the largest change of
any depth coefficient, and the largest and mean change of the width matrices
``E``. Prints one JSON line.

    python -m benchmarks.growth_trial --partition-id 0 seed=1 lr-depth=1e-2 lr-width=1e-3
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from fedgrow_core.clients.growth_client import GrowthClient
from fedgrow_core.protocol import initial_global_ligo
from fedgrow_core.run_config import RunConfig, pyproject_config


def _movement(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> dict[str, float]:
    def change(k: str, v: torch.Tensor) -> torch.Tensor:
        return (after[k].detach() - v).abs()

    depth = [change(k, v) for k, v in before.items() if ".depth." in f".{k}" and v.numel()]
    width = [change(k, v) for k, v in before.items() if ".width." in f".{k}" and v.numel()]
    return {
        "depth_max_change": max(float(d.max()) for d in depth),
        "width_max_change": max(float(w.max()) for w in width),
        "width_mean_change": float(sum(w.sum() for w in width) / sum(w.numel() for w in width)),
    }


def main(argv: list[str] | None = None) -> dict:
    """Run one trial; returns the printed record."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--partition-id", type=int, default=0)
    parser.add_argument("--num-partitions", type=int, default=3)
    parser.add_argument("--test-rows", type=int, default=300)
    parser.add_argument("overrides", nargs="*", help="run-config key=value")
    args = parser.parse_args(argv)
    run = RunConfig.from_flower(pyproject_config("pyproject.toml", [f"max-test-examples={args.test_rows}"]))
    steps = run.num_server_rounds * run.local_steps  # the default run's growth steps, in one round here
    overrides = [
        f"max-test-examples={args.test_rows}",
        "num-server-rounds=1",
        f"local-steps={steps}",
        *args.overrides,
    ]
    run = RunConfig.from_flower(pyproject_config("pyproject.toml", overrides))
    torch.manual_seed(run.seed)  # the task head's initialisation
    client = GrowthClient(run, args.partition_id, args.num_partitions)
    start = time.perf_counter()
    initial = client.evaluate()
    before = {k: v.detach().clone() for k, v in client.model.operator.named_parameters()}
    state, train = client.train_round(initial_global_ligo(run).state_dict(), with_eval=False)
    moved = _movement(before, dict(client.model.operator.named_parameters()))
    grown = client.evaluate()
    final = client.finetune_and_evaluate(state, None)
    record = {
        "overrides": args.overrides,
        "partition_id": args.partition_id,
        "growth_steps": run.local_steps,
        "train_loss": train["train-loss"],
        "test_loss_at_init": initial.loss,
        "accuracy_at_init": initial.accuracy,
        "test_loss_after_growth": grown.loss,
        "accuracy_after_growth": grown.accuracy,
        "precision_after_growth": grown.precision,
        "accuracy_after_finetune": final["accuracy"],
        **moved,
        "train_seconds": train["train-seconds"],
        "seconds": time.perf_counter() - start,
    }
    print(json.dumps(record))
    return record


if __name__ == "__main__":
    main()
