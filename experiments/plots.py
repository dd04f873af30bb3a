"""Accuracy against optimiser steps and against bytes uploaded, one line per mode (``matplotlib``).

Computed from ``rounds.csv`` rows (:mod:`experiments.records`). Each line is
the mean over seeds of the mean client test accuracy after each round (on each
client's first ``eval-max-examples`` test rows; the last point: after the final
fine-tuning, on every test row), and its band one sample standard deviation over
seeds either side (no band with one seed); one figure panel per Dirichlet alpha.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from fedgrow_core.modes import mode_names

#: x column of ``rounds.csv`` -> (file name, axis label)
AXES = {
    "steps": ("accuracy_vs_steps.png", "optimiser steps per client (last point: after fine-tuning)"),
    "cumulative_upload_bytes": ("accuracy_vs_bytes.png", "cumulative upload per client (MB)"),
}


def accuracy_curves(rounds: pd.DataFrame, x_key: str) -> dict[float, dict[str, tuple[np.ndarray, ...]]]:
    """Per Dirichlet alpha and mode: x, accuracy mean and sample std over seeds, at each evaluated step.

    Parameters
    ----------
    rounds : pandas.DataFrame
        ``rounds.csv`` rows; rows without ``eval_accuracy`` are left out.
    x_key : str
        ``steps`` or ``cumulative_upload_bytes`` (bytes; the x value is its mean
        over seeds at each step).

    Returns
    -------
    dict
        ``{alpha: {mode: (x, mean, std)}}``, each an array over the steps that
        every seed of the mode evaluated; std is 0 with a single seed.
    """
    rows = rounds.dropna(subset=["eval_accuracy"])
    out: dict[float, dict[str, tuple[np.ndarray, ...]]] = {}
    for (alpha, mode), group in rows.groupby(["dirichlet_alpha", "mode"], sort=False):
        counts = group.groupby("steps")["seed"].transform("nunique")
        per_step = group[counts == group["seed"].nunique()].groupby("steps")
        xs = per_step[x_key].mean().to_numpy(dtype=float)
        mean = per_step["eval_accuracy"].mean().to_numpy(dtype=float)
        std = per_step["eval_accuracy"].std(ddof=1).fillna(0.0).to_numpy(dtype=float)
        out.setdefault(float(alpha), {})[mode] = (xs, mean, std)
    return out


def plot_accuracy(rounds: pd.DataFrame, out: Path, title: str = "") -> list[Path]:
    """Write ``accuracy_vs_steps.png`` and ``accuracy_vs_bytes.png`` under ``out``; return their paths.

    The bytes axis is the cumulative message content uploaded by one client
    (MB = 1e6 bytes, symmetric-log scale so that the local-only modes, at 0
    bytes, stay visible). ``title`` prefixes each panel's title (default: the task).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for x_key, (name, xlabel) in AXES.items():
        curves = accuracy_curves(rounds, x_key)
        alphas = sorted(curves)
        fig, axes = plt.subplots(1, len(alphas), figsize=(5.5 * len(alphas), 4), squeeze=False)
        for ax, alpha in zip(axes[0], alphas, strict=True):
            for mode in mode_names():
                if mode not in curves[alpha]:
                    continue
                xs, ys, std = curves[alpha][mode]
                xs = xs / 1e6 if x_key != "steps" else xs
                (line,) = ax.plot(xs, ys, marker="o", label=mode)
                ax.fill_between(xs, ys - std, ys + std, color=line.get_color(), alpha=0.15, linewidth=0)
            if x_key != "steps":
                ax.set_xscale("symlog", linthresh=1.0)
            seeds = rounds.loc[rounds["dirichlet_alpha"] == alpha, "seed"].nunique()
            label = title or str(rounds["task"].iloc[0])
            band = f" (band: ±1 std over {seeds} seeds)" if seeds > 1 else ""
            ax.set(xlabel=xlabel, ylabel="mean client test accuracy", title=f"{label}, alpha {alpha:g}{band}")
            ax.grid(alpha=0.3)
        axes[0][-1].legend(fontsize=8)
        fig.tight_layout()
        path = out / name
        fig.savefig(path, dpi=120)
        plt.close(fig)
        paths.append(path)
    return paths
