"""The results table: one row per (Dirichlet alpha, mode), mean and std over seeds (``pandas``).

Metrics per run (from ``summary.json``): mean client test accuracy, mean macro
precision, spread of accuracy across clients (population std over clients),
trainable parameters per client (in the rounds), bytes uploaded per client per
round (mean over rounds) and in total, and wall time in seconds.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from fedgrow_core.run_config import MODES

#: summary.json key -> column name of the table
METRICS = {
    "mean_accuracy": "accuracy",
    "mean_precision": "precision",
    "std_accuracy": "spread",
    "trainable_params_per_client": "trainable_params",
    "upload_bytes_per_round": "upload_bytes_per_round",
    "upload_bytes_total": "upload_bytes_total",
    "payload_bytes_total": "payload_bytes_total",
    "wall_time_s": "wall_time_s",
}


def results_table(summaries: list[dict]) -> pd.DataFrame:
    """Aggregate run summaries over seeds.

    Returns
    -------
    pandas.DataFrame
        Columns ``task``, ``dirichlet_alpha``, ``mode``, ``seeds`` (number of
        runs), then ``<metric>_mean`` and ``<metric>_std`` (sample std over seeds,
        ``ddof=1``; 0 for a single seed) for every metric of :data:`METRICS`.
        Rows in :data:`fedgrow_core.run_config.MODES` order within each alpha.

    Raises
    ------
    ValueError
        If ``summaries`` is empty or a summary lacks a metric.
    """
    if not summaries:
        raise ValueError("no run summaries to tabulate")
    records = []
    for s in summaries:
        missing = [k for k in METRICS if s.get(k) is None]
        if missing:
            raise ValueError(f"summary of mode {s.get('mode')!r} seed {s.get('seed')!r} lacks {missing}")
        records.append(
            {"task": s["task"], "dirichlet_alpha": s["dirichlet_alpha"], "mode": s["mode"], "seed": s["seed"]}
            | {col: float(s[key]) for key, col in METRICS.items()}
        )
    df = pd.DataFrame.from_records(records)
    grouped = df.groupby(["task", "dirichlet_alpha", "mode"], sort=False)
    means = grouped[list(METRICS.values())].mean().add_suffix("_mean")
    stds = grouped[list(METRICS.values())].std(ddof=1).fillna(0.0).add_suffix("_std")
    table = pd.concat([grouped.size().rename("seeds"), means, stds], axis=1).reset_index()
    order = {m: i for i, m in enumerate(MODES)}
    table = table.sort_values(
        ["task", "dirichlet_alpha", "mode"], key=lambda c: c.map(order) if c.name == "mode" else c
    )
    columns = ["task", "dirichlet_alpha", "mode", "seeds"]
    for col in METRICS.values():
        columns += [f"{col}_mean", f"{col}_std"]
    return table[columns].reset_index(drop=True)


def _mb(x: float) -> str:
    return f"{x / 1e6:.1f}"


def markdown(table: pd.DataFrame) -> str:
    """The table as Markdown with ``mean ± std`` cells (bytes in MB = 1e6 bytes, params in millions)."""
    rows = []
    for _, r in table.iterrows():
        rows.append(
            {
                "task": r["task"],
                "alpha": f"{r['dirichlet_alpha']:g}",
                "mode": r["mode"],
                "seeds": int(r["seeds"]),
                "accuracy": f"{r['accuracy_mean']:.3f} ± {r['accuracy_std']:.3f}",
                "macro precision": f"{r['precision_mean']:.3f} ± {r['precision_std']:.3f}",
                "spread (std over clients)": f"{r['spread_mean']:.3f} ± {r['spread_std']:.3f}",
                "trainable params / client (M)": f"{r['trainable_params_mean'] / 1e6:.2f}",
                "upload / client / round (MB)": _mb(r["upload_bytes_per_round_mean"]),
                "upload / client, total (MB)": _mb(r["upload_bytes_total_mean"]),
                "wall time (s)": f"{r['wall_time_s_mean']:.0f} ± {r['wall_time_s_std']:.0f}",
            }
        )
    return pd.DataFrame(rows).to_markdown(index=False, disable_numparse=True)


def write_tables(table: pd.DataFrame, out: Path) -> list[Path]:
    """Write ``results.csv``, ``results.md`` and ``comparison.md`` under ``out``.

    ``results.csv`` holds all columns, ``results.md`` is :func:`markdown`, and
    ``comparison.md`` (:func:`comparison_markdown`) is written when the table
    has a ``fedgrow`` row.
    """
    csv, md = out / "results.csv", out / "results.md"
    table.to_csv(csv, index=False)
    md.write_text(markdown(table) + "\n")
    paths = [csv, md]
    if "fedgrow" in set(table["mode"]):
        paths.append(out / "comparison.md")
        paths[-1].write_text(comparison_markdown(paper_comparison(table)) + "\n")
    return paths


#: The journal version's claims (Shen et al., IEEE TPDS 2026, abstract), as fractions.
PAPER_FEWER_TRAINABLE = 0.5925
PAPER_LESS_COMMUNICATION = 0.7301


def paper_comparison(table: pd.DataFrame) -> pd.DataFrame:
    """Fed-Grow against each other mode, per task and alpha, in the terms of the paper's claims.

    Returns
    -------
    pandas.DataFrame
        One row per (task, alpha, baseline mode): ``accuracy_gain`` and
        ``precision_gain`` (Fed-Grow minus baseline, means over seeds),
        ``spread_change`` (Fed-Grow minus baseline; negative is lower spread),
        ``fewer_trainable`` (``1 - fedgrow / baseline`` trainable parameters per
        client) and ``less_communication`` (``1 - fedgrow / baseline`` total
        upload per client; NaN when the baseline uploads nothing).

    Raises
    ------
    ValueError
        If the table has no ``fedgrow`` row.
    """
    if "fedgrow" not in set(table["mode"]):
        raise ValueError("the results table has no 'fedgrow' row to compare with")
    rows = []
    for (task, alpha), group in table.groupby(["task", "dirichlet_alpha"], sort=False):
        ours = group[group["mode"] == "fedgrow"]
        if ours.empty:
            continue
        ours = ours.iloc[0]
        for _, base in group[group["mode"] != "fedgrow"].iterrows():
            upload = base["payload_bytes_total_mean"]  # tensor data: 0 for modes that share nothing
            rows.append(
                {
                    "task": task,
                    "dirichlet_alpha": alpha,
                    "baseline": base["mode"],
                    "accuracy_gain": ours["accuracy_mean"] - base["accuracy_mean"],
                    "precision_gain": ours["precision_mean"] - base["precision_mean"],
                    "spread_change": ours["spread_mean"] - base["spread_mean"],
                    "fewer_trainable": 1 - ours["trainable_params_mean"] / base["trainable_params_mean"],
                    "less_communication": (1 - ours["payload_bytes_total_mean"] / upload) if upload else float("nan"),
                }
            )
    return pd.DataFrame(rows)


def comparison_markdown(comparison: pd.DataFrame) -> str:
    """:func:`paper_comparison` as Markdown (percentages), with the paper's two figures in the header."""
    rows = []
    for _, r in comparison.iterrows():
        comm = r["less_communication"]
        rows.append(
            {
                "task": r["task"],
                "alpha": f"{r['dirichlet_alpha']:g}",
                "Fed-Grow vs": r["baseline"],
                "accuracy": f"{r['accuracy_gain']:+.3f}",
                "macro precision": f"{r['precision_gain']:+.3f}",
                "spread": f"{r['spread_change']:+.3f}",
                f"fewer trainable params (paper: {PAPER_FEWER_TRAINABLE:.2%})": f"{r['fewer_trainable']:.2%}",
                f"less communication (paper: {PAPER_LESS_COMMUNICATION:.2%})": "n/a (sends nothing)"
                if pd.isna(comm)
                else f"{comm:.2%}",
            }
        )
    return pd.DataFrame(rows).to_markdown(index=False, disable_numparse=True)
