"""Accuracy against rounds and against cumulative bytes uploaded, one line per mode (``matplotlib``).

Each line is the mean over seeds of the mean client test accuracy after each
round (``metrics.jsonl`` rows with an ``eval-accuracy``), the last point being the
final phase, and its band is one sample standard deviation over seeds either
side (no band with one seed); one figure panel per Dirichlet alpha.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np

from fedgrow_core.run_config import MODES


def accuracy_curves(
    summaries: list[dict], x_key: str
) -> dict[float, dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]]:
    """Per Dirichlet alpha and mode: x (mean over seeds), accuracy mean and sample std over seeds.

    Runs are cut to the shortest run's number of points; the std is 0 for a
    single seed. ``x_key`` is a ``metrics.jsonl`` column (``round``,
    ``cumulative-upload-bytes``).
    """
    by: dict[float, dict[str, list[list[tuple[float, float]]]]] = defaultdict(lambda: defaultdict(list))
    for s in summaries:
        points = [(r[x_key], r["eval-accuracy"]) for r in s["rows"] if r.get("eval-accuracy") is not None]
        by[s["dirichlet_alpha"]][s["mode"]].append(points)
    out: dict[float, dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]] = {}
    for alpha, modes in by.items():
        out[alpha] = {}
        for mode, runs in modes.items():
            n = min(len(p) for p in runs)
            xs = np.mean([[x for x, _ in p[:n]] for p in runs], axis=0)
            ys = np.array([[y for _, y in p[:n]] for p in runs])
            std = ys.std(axis=0, ddof=1) if len(runs) > 1 else np.zeros(n)
            out[alpha][mode] = (xs, ys.mean(axis=0), std)
    return out


def plot_accuracy(summaries: list[dict], out: Path) -> list[Path]:
    """Write ``accuracy_vs_rounds.png`` and ``accuracy_vs_bytes.png`` under ``out``; return their paths.

    The bytes axis is the cumulative tensor payload uploaded by one client (MB,
    symmetric-log scale so that the local-only modes, at 0 bytes, stay visible).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for x_key, name, xlabel in (
        ("round", "accuracy_vs_rounds.png", "round (final point: after fine-tuning)"),
        ("cumulative-upload-bytes", "accuracy_vs_bytes.png", "cumulative upload per client (MB)"),
    ):
        curves = accuracy_curves(summaries, x_key)
        alphas = sorted(curves)
        fig, axes = plt.subplots(1, len(alphas), figsize=(5 * len(alphas), 3.8), squeeze=False)
        for ax, alpha in zip(axes[0], alphas, strict=True):
            for mode in MODES:
                if mode not in curves[alpha]:
                    continue
                xs, ys, std = curves[alpha][mode]
                xs = xs / 1e6 if x_key != "round" else xs
                (line,) = ax.plot(xs, ys, marker="o", label=mode)
                ax.fill_between(xs, ys - std, ys + std, color=line.get_color(), alpha=0.15, linewidth=0)
            if x_key != "round":
                ax.set_xscale("symlog", linthresh=1.0)
            task = summaries[0]["task"]
            seeds = max(len({s["seed"] for s in summaries if s["dirichlet_alpha"] == alpha}), 1)
            title = f"{task}, Dirichlet alpha {alpha:g}" + (f" (band: ±1 std, {seeds} seeds)" if seeds > 1 else "")
            ax.set(xlabel=xlabel, ylabel="mean client test accuracy", title=title)
            ax.grid(alpha=0.3)
        axes[0][-1].legend(fontsize=8)
        fig.tight_layout()
        path = out / name
        fig.savefig(path, dpi=120)
        plt.close(fig)
        paths.append(path)
    return paths
