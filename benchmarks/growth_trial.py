"""One client's growth trial, for choosing the growth recipe: growth steps, then fine-tuning, test accuracy.

Runs a single :class:`~fedgrow_core.clients.growth_client.GrowthClient` in-process (no
Flower) from the default run config plus ``key=value`` overrides. It evaluates
the grown model before any step, trains ``local-steps`` growth steps from the
initial Global-LiGO (one round), evaluates again, fine-tunes ``finetune-steps``
steps and evaluates a last time, on at most ``--test-rows`` rows of the client's
test split. It also reports how far the operators moved: the largest change of
any depth coefficient, the largest and mean change of the width matrices
``E``, and the relative change ``||after - before|| / ||before||`` of the
Global- and Local-LiGO (:mod:`fedgrow_core.growth.diagnostics`); and the share
of test rows given the most often predicted class after growth (1.0: collapsed
to one class). Prints one JSON line.

    python -m benchmarks.growth_trial --partition-id 0 seed=1 lr-depth=1e-2 lr-width=1e-3
    python -m benchmarks.growth_trial --preset presets/paper-image.toml --num-partitions 10 seed=1
"""

from __future__ import annotations

import argparse
import json
import time
import tomllib
from pathlib import Path

import torch
from flwr.common.config import flatten_dict

from fedgrow_core.clients.growth_client import GrowthClient
from fedgrow_core.growth.diagnostics import relative_change
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
    parser.add_argument("--preset", type=Path, help="TOML file of run-config overrides, applied first")
    parser.add_argument("overrides", nargs="*", help="run-config key=value")
    args = parser.parse_args(argv)
    preset = []
    if args.preset:
        preset = [f"{k}={json.dumps(v)}" for k, v in flatten_dict(tomllib.loads(args.preset.read_text())).items()]
    run = RunConfig.from_flower(
        pyproject_config("pyproject.toml", [*preset, f"max-test-examples={args.test_rows}", *args.overrides])
    )
    steps = run.num_server_rounds * run.local_steps  # the default run's growth steps, in one round here
    overrides = [
        *preset,
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
    after = {k: v.detach() for k, v in client.model.operator.named_parameters()}
    moved = _movement(before, after)
    for part in ("global_", "local"):
        mine = {k: v for k, v in before.items() if k.startswith(f"{part}.")}
        if mine:
            moved[f"{part.rstrip('_')}_relative_change"] = relative_change(mine, after)
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
        "majority_share_after_growth": getattr(grown, "majority_share", None),
        "accuracy_after_finetune": final["accuracy"],
        **moved,
        "train_seconds": train["train-seconds"],
        "seconds": time.perf_counter() - start,
    }
    print(json.dumps(record))
    return record


if __name__ == "__main__":
    main()
