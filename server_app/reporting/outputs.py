"""What a run leaves in its run folder: metrics, final Global-LiGO, plot and summary.

Files (all under ``<output-dir>/<run name>/``):

* ``metrics.jsonl`` and ``metrics.csv``: one row per round
  (:func:`server_app.reporting.summary.round_rows`);
* ``global_ligo.safetensors``: the final Global-LiGO (``safetensors``), in the
  modes that train one;
* ``metrics.png``: training loss and test accuracy per round (``matplotlib``);
* ``summary.json``: the run's result (see :func:`write_summary`).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import torch
from safetensors.torch import save_file


def write_round_metrics(run_dir: Path, rows: list[dict]) -> None:
    """Write the per-round rows as JSON lines and CSV (columns: union of keys, in first-seen order)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / "metrics.jsonl", "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    with open(run_dir / "metrics.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


def write_global_ligo(run_dir: Path, state: dict[str, torch.Tensor]) -> Path:
    """Save the Global-LiGO tensors as ``global_ligo.safetensors``."""
    path = run_dir / "global_ligo.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path


def plot_rounds(run_dir: Path, rows: list[dict]) -> Path:
    """``metrics.png``: mean training loss and mean client test accuracy per round."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    loss = [(r["round"], r["train-loss"]) for r in rows if r.get("train-loss") is not None]
    acc = [(r["round"], r["eval-accuracy"]) for r in rows if r.get("eval-accuracy") is not None]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.5))
    ax1.plot([x for x, _ in loss], [y for _, y in loss], marker="o")
    ax1.set(xlabel="round", ylabel="training loss (nats)", title="training loss (mean over clients)")
    ax2.plot([x for x, _ in acc], [y for _, y in acc], marker="o", color="tab:green")
    ax2.set(xlabel="round", ylabel="test accuracy", title="test accuracy (mean over clients)", ylim=(0, 1))
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    path = run_dir / "metrics.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_summary(run_dir: Path, summary: dict) -> Path:
    """``summary.json`` (indent 2)."""
    path = run_dir / "summary.json"
    path.write_text(json.dumps(summary, indent=2))
    return path
