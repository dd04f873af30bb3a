"""One client's growth trial, for tuning: growth steps, then fine-tuning, test accuracy.

Runs a single :class:`~fedgrow_core.growth_client.GrowthClient` in-process (no
Flower) from the default run config plus ``key=value`` overrides, trains
``local-steps`` growth steps from the initial Global-LiGO, evaluates the grown
model, fine-tunes it ``finetune-steps`` steps and evaluates again, on at most
``--test-rows`` rows of the client's test split (``max-test-examples``). Prints one JSON line.

    python -m benchmarks.growth_trial --partition-id 0 local-steps=30 depth-noise=0.0 lr-ligo=1e-4
"""

from __future__ import annotations

import argparse
import json
import time

from fedgrow_core.growth_client import GrowthClient, global_ligo
from fedgrow_core.run_config import RunConfig, pyproject_config


def main(argv: list[str] | None = None) -> dict:
    """Run one trial; returns the printed record."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--partition-id", type=int, default=0)
    parser.add_argument("--num-partitions", type=int, default=3)
    parser.add_argument("--test-rows", type=int, default=300)
    parser.add_argument("overrides", nargs="*", help="run-config key=value")
    args = parser.parse_args(argv)
    overrides = [f"max-test-examples={args.test_rows}", *args.overrides]
    run = RunConfig.from_flower(pyproject_config("pyproject.toml", overrides))
    client = GrowthClient(run, args.partition_id, args.num_partitions)
    start = time.perf_counter()
    state, train = client.train_round(global_ligo(run).state_dict())
    final = client.finetune_and_evaluate(state, None)
    record = {
        "overrides": args.overrides,
        "train_loss": train["train-loss"],
        "train_seconds": train["train-seconds"],
        "finetune_seconds": final["finetune-seconds"],
        "accuracy_after_growth": train["eval-accuracy"],
        "accuracy_after_finetune": final["accuracy"],
        "seconds": time.perf_counter() - start,
    }
    print(json.dumps(record))
    return record


if __name__ == "__main__":
    main()
