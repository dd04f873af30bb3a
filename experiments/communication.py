"""Accuracy against bytes sent for each way of making the Global-LiGO message smaller.

    python -m experiments.communication --preset presets/comm-text.toml --seeds 0 1 2 --out results/comm-text

Runs mode ``fedgrow`` once per (variant, seed) with :func:`experiments.runner.run_grid`
(so an interrupted sweep resumes), each variant a set of run-config keys on top
of the preset (:data:`VARIANTS`), and writes ``communication.csv`` /
``communication.md`` and ``accuracy_vs_upload.png``. Per variant: the upload and
download per client per round over the target model's float32 bytes (serialised
messages), mean accuracy and macro precision over seeds (mean and sample std),
and the paired difference in accuracy to the ``float32`` variant (same seed),
with its sample std and a 95% t interval.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import matplotlib
import pandas as pd
from scipy import stats

from fedgrow_core.run_config import RunConfig, pyproject_config

from .flower_launcher import ROOT
from .runner import read_summaries, run_grid, run_overrides

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

#: name -> run-config keys; ``float32`` (full, per-layer width matrices sent as float32 values) is the reference.
VARIANTS: dict[str, dict] = {
    "float32": {"update-encoding": "float32"},
    "float16": {"update-encoding": "float16"},
    "int8": {"update-encoding": "int8"},
    "tied": {"global-tie-layers": True, "update-encoding": "float32"},
    "rank16": {"global-rank": 16, "update-encoding": "float32"},
    "tied+int8": {"global-tie-layers": True, "update-encoding": "int8"},
    "rank16+int8": {"global-rank": 16, "update-encoding": "int8"},
}
REFERENCE = "float32"


def communication_table(runs: dict[str, list[dict]]) -> pd.DataFrame:
    """One row per variant from its runs' summaries (``summary.json`` content).

    Returns
    -------
    pandas.DataFrame
        ``variant``, ``seeds``, ``upload_over_model`` and
        ``download_over_model`` (means over seeds), ``upload_mb`` (per client
        per round), ``accuracy_mean``/``_std``, ``precision_mean``/``_std``,
        and against :data:`REFERENCE` on the same seeds: ``paired_diff_mean``,
        ``paired_diff_std``, ``ci95_low``, ``ci95_high`` (t interval; NaN with
        fewer than two shared seeds).
    """
    ref = {s["seed"]: s["mean_accuracy"] for s in runs.get(REFERENCE, [])}
    rows = []
    for name, summaries in runs.items():
        df = pd.DataFrame(
            {
                "seed": [s["seed"] for s in summaries],
                "accuracy": [s["mean_accuracy"] for s in summaries],
                "precision": [s["mean_precision"] for s in summaries],
                "upload": [s["upload_over_model_bytes"] for s in summaries],
                "download": [s["download_over_model_bytes"] for s in summaries],
                "upload_bytes": [s["upload_bytes_per_round"] for s in summaries],
            }
        )
        diffs = pd.Series([a - ref[s] for s, a in zip(df["seed"], df["accuracy"], strict=True) if s in ref])
        n = len(diffs)
        half = stats.t.ppf(0.975, n - 1) * diffs.std(ddof=1) / n**0.5 if n > 1 else float("nan")
        rows.append(
            {
                "variant": name,
                "seeds": len(df),
                "upload_over_model": df["upload"].mean(),
                "download_over_model": df["download"].mean(),
                "upload_mb": df["upload_bytes"].mean() / 1e6,
                "accuracy_mean": df["accuracy"].mean(),
                "accuracy_std": df["accuracy"].std(ddof=1),
                "precision_mean": df["precision"].mean(),
                "precision_std": df["precision"].std(ddof=1),
                "paired_diff_mean": diffs.mean() if n else float("nan"),
                "paired_diff_std": diffs.std(ddof=1) if n > 1 else float("nan"),
                "ci95_low": diffs.mean() - half if n else float("nan"),
                "ci95_high": diffs.mean() + half if n else float("nan"),
            }
        )
    return pd.DataFrame(rows)


def plot_accuracy_vs_upload(table: pd.DataFrame, path: Path, title: str = "") -> None:
    """Mean accuracy (error bars: std over seeds) against upload / target-model bytes, log x axis."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for _, row in table.iterrows():
        ax.errorbar(row["upload_over_model"], row["accuracy_mean"], yerr=row["accuracy_std"], fmt="o", capsize=3)
        ax.annotate(row["variant"], (row["upload_over_model"], row["accuracy_mean"]), fontsize=8, xytext=(4, 4),
                    textcoords="offset points")  # fmt: skip
    ax.axvline(0.05, color="grey", linestyle=":", linewidth=1)
    ax.set_xscale("log")
    ax.set_xlabel("upload per client per round / target model float32 bytes")
    ax.set_ylabel("mean client accuracy")
    ax.set_title(title or "Fed-Grow: accuracy against bytes sent")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    """Command line entry point; returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", type=Path, help="TOML file of run-config overrides (e.g. presets/*.toml)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="more run-config overrides")
    parser.add_argument("--out", type=Path, required=True, help="results folder")
    parser.add_argument("--timeout", type=float, default=7200, help="seconds per run")
    args = parser.parse_args(argv)
    base = run_overrides(args.preset, args.set)
    args.out.mkdir(parents=True, exist_ok=True)
    runs = {}
    for name in args.variants:
        overrides = {**base, **VARIANTS[name]}
        RunConfig.from_flower({**pyproject_config(ROOT / "pyproject.toml"), **overrides})  # before anything runs
        run_grid(overrides, ["fedgrow"], args.seeds, [None], args.out / name, args.timeout)
        runs[name] = read_summaries(args.out / name, args.seeds)
    table = communication_table(runs)
    table.to_csv(args.out / "communication.csv", index=False)
    (args.out / "communication.md").write_text(table.to_markdown(index=False, floatfmt=".4g") + "\n")
    plot_accuracy_vs_upload(table, args.out / "accuracy_vs_upload.png", title=str(args.preset or "default run"))
    print(table.to_markdown(index=False, floatfmt=".4g"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
