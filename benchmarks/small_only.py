"""Baseline for the README: each client's small model fine-tuned alone, same data and step budget.

Reads the run config from ``pyproject.toml`` (plus ``--run-config``-style
``key=value`` overrides), gives each client exactly the optimiser steps a Fed-Grow
client takes (``num-server-rounds * local-steps + finetune-steps``) on the same
partition, batch size and data order, fine-tunes all of its small model with AdamW
at ``lr-finetune``, and evaluates on the same client test split. Prints one JSON
line per client and a final ``mean_accuracy=...`` line.

    python -m benchmarks.small_only [key=value ...]
"""

from __future__ import annotations

import json
import statistics
import sys
import time

import torch

from fedgrow_core.client_setup import client_rows
from fedgrow_core.preprocessing import make_dataloader
from fedgrow_core.run_config import RunConfig, pyproject_config
from fedgrow_core.training import cycle, evaluate, resolve_device, train_steps
from fedgrow_core.zoo import load_small_model

NUM_CLIENTS = 3


def main(argv: list[str]) -> float:
    """Run the baseline; returns the mean client test accuracy."""
    run = RunConfig.from_flower(pyproject_config("pyproject.toml", argv))
    device = resolve_device(run.device)
    steps = run.num_server_rounds * run.local_steps + run.finetune_steps
    accs = []
    for pid in range(NUM_CLIENTS):
        train, test_rows, names = client_rows(run, pid, NUM_CLIENTS)
        name = run.client_models[pid % len(run.client_models)]
        small = load_small_model(name, len(names), run.cache_dir or None)
        model = small.model.to(device)
        loader = make_dataloader(
            train, small.preprocessor, run.batch_size, shuffle=True, seed=run.seed + pid, max_length=run.max_length
        )
        optimizer = torch.optim.AdamW(model.parameters(), lr=run.lr_finetune, weight_decay=run.weight_decay)
        start = time.perf_counter()
        train_steps(model, cycle(loader), optimizer, steps, device)
        test = make_dataloader(test_rows, small.preprocessor, 64, max_length=run.max_length)
        result = evaluate(model, test, device)
        accs.append(result.accuracy)
        row = {
            "partition_id": pid,
            "model": name,
            "steps": steps,
            "accuracy": result.accuracy,
            "precision": result.precision,
            "trainable_params": sum(p.numel() for p in model.parameters()),
            "seconds": time.perf_counter() - start,
        }
        print(json.dumps(row), flush=True)
    mean = statistics.fmean(accs)
    print(f"mean_accuracy={mean:.4f} std_accuracy={statistics.pstdev(accs):.4f}")
    return mean


if __name__ == "__main__":
    main(sys.argv[1:])
