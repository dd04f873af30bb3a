"""The results table: one row per (task, Dirichlet alpha, mode), mean and std over seeds (``pandas``).

Computed from ``clients.csv`` rows (:mod:`experiments.records`). Per run: mean
client test accuracy and macro precision, spread of accuracy across clients
(population std over clients), trainable parameters per client (in the rounds),
bytes uploaded per client per round (mean over rounds) and in total, and wall
time in seconds; then mean and sample std of each over the seeds.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from fedgrow_core.modes import mode_names

from .records import RUN_KEY

#: table column -> (clients.csv column, how one run's clients are reduced)
METRICS = {
    "accuracy": ("accuracy", "mean"),
    "precision": ("precision", "mean"),
    "spread": ("accuracy", lambda x: x.std(ddof=0)),
    "trainable_params": ("trainable_params", "mean"),
    "upload_bytes_per_round": ("upload_bytes_per_round", "first"),
    "upload_bytes_total": ("upload_bytes_total", "first"),
    "payload_bytes_total": ("payload_bytes_total", "first"),
    "wall_time_s": ("wall_time_s", "first"),
}


def per_run(clients: pd.DataFrame) -> pd.DataFrame:
    """One row per run (:data:`experiments.records.RUN_KEY`) with each :data:`METRICS` column over its clients.

    Raises
    ------
    ValueError
        If ``clients`` is empty or lacks a column.
    """
    if clients.empty:
        raise ValueError("no run records to tabulate")
    missing = sorted({col for col, _ in METRICS.values()} - set(clients.columns))
    if missing:
        raise ValueError(f"the client records lack the columns {missing}")
    grouped = clients.groupby(RUN_KEY, sort=False)
    return grouped.agg(**{name: pd.NamedAgg(col, how) for name, (col, how) in METRICS.items()}).reset_index()


def results_table(clients: pd.DataFrame) -> pd.DataFrame:
    """Aggregate the runs of ``clients.csv`` over seeds.

    Returns
    -------
    pandas.DataFrame
        Columns ``task``, ``dirichlet_alpha``, ``mode``, ``seeds`` (number of
        runs), then ``<metric>_mean`` and ``<metric>_std`` (sample std over seeds,
        ``ddof=1``; 0 for a single seed) for every metric of :data:`METRICS`.
        Rows in :func:`fedgrow_core.modes.mode_names` order within each alpha.

    Raises
    ------
    ValueError
        If ``clients`` is empty or lacks a column.
    """
    runs = per_run(clients)
    grouped = runs.groupby(["task", "dirichlet_alpha", "mode"], sort=False)
    means = grouped[list(METRICS)].mean().add_suffix("_mean")
    stds = grouped[list(METRICS)].std(ddof=1).fillna(0.0).add_suffix("_std")
    table = pd.concat([grouped.size().rename("seeds"), means, stds], axis=1).reset_index()
    order = {m: i for i, m in enumerate(mode_names())}
    table = table.sort_values(
        ["task", "dirichlet_alpha", "mode"], key=lambda c: c.map(order) if c.name == "mode" else c
    )
    columns = ["task", "dirichlet_alpha", "mode", "seeds"]
    for col in METRICS:
        columns += [f"{col}_mean", f"{col}_std"]
    return table[columns].reset_index(drop=True)


def per_client_markdown(clients: pd.DataFrame) -> str:
    """Each client's accuracy per mode (mean ± sample std over seeds) as Markdown, one row per (alpha, client).

    The last column counts the seeds on which ``fedgrow`` beat the best other mode
    of that seed for that client (ties count as not beating).
    """
    rows = []
    modes = [m for m in mode_names() if m in set(clients["mode"])]
    for (alpha, pid), group in clients.groupby(["dirichlet_alpha", "partition_id"], sort=True):
        row = {"alpha": f"{alpha:g}", "client": f"{pid} (`{group['model'].iloc[0]}`)"}
        for mode in modes:
            acc = group.loc[group["mode"] == mode, "accuracy"]
            row[mode] = f"{acc.mean():.3f} ± {acc.std(ddof=1) if len(acc) > 1 else 0.0:.3f}" if len(acc) else "-"
        if "fedgrow" in modes and len(modes) > 1:
            by_seed = group.pivot_table(index="seed", columns="mode", values="accuracy").dropna()
            others = by_seed.drop(columns="fedgrow").max(axis=1)
            row["Fed-Grow best on"] = f"{int((by_seed['fedgrow'] > others).sum())} of {len(by_seed)} seeds"
        rows.append(row)
    return pd.DataFrame(rows).to_markdown(index=False, disable_numparse=True)


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


def write_tables(clients: pd.DataFrame, out: Path) -> list[Path]:
    """Write the tables of a comparison's ``clients.csv`` rows under ``out``; return their paths.

    ``results.csv`` (:func:`results_table`, all columns) and ``results.md``
    (:func:`markdown`); when there are ``fedgrow`` rows also ``paired.csv`` /
    ``paired.md`` (:func:`experiments.significance.paired_differences`: Fed-Grow
    against each baseline, same seed and client, 95% t intervals) and
    ``comparison.md`` (:func:`comparison_markdown`: in the terms of the paper's claims).
    """
    from .significance import paired_differences, paired_markdown

    table = results_table(clients)
    csv, md = out / "results.csv", out / "results.md"
    table.to_csv(csv, index=False)
    md.write_text(markdown(table) + "\n")
    paths = [csv, md]
    if "fedgrow" in set(table["mode"]):
        paired = paired_differences(clients)
        paired.to_csv(out / "paired.csv", index=False)
        (out / "paired.md").write_text(paired_markdown(paired) + "\n")
        (out / "comparison.md").write_text(comparison_markdown(paper_comparison(table)) + "\n")
        paths += [out / "paired.csv", out / "paired.md", out / "comparison.md"]
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
        client in the rounds) and ``less_communication`` (``1 - fedgrow /
        baseline`` upload per client per round, serialised messages; NaN when
        the baseline sends no tensors).

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
            sends = base["payload_bytes_total_mean"] > 0  # tensor data: 0 for modes that share nothing
            upload = base["upload_bytes_per_round_mean"]
            rows.append(
                {
                    "task": task,
                    "dirichlet_alpha": alpha,
                    "baseline": base["mode"],
                    "accuracy_gain": ours["accuracy_mean"] - base["accuracy_mean"],
                    "precision_gain": ours["precision_mean"] - base["precision_mean"],
                    "spread_change": ours["spread_mean"] - base["spread_mean"],
                    "fewer_trainable": 1 - ours["trainable_params_mean"] / base["trainable_params_mean"],
                    "less_communication": (1 - ours["upload_bytes_per_round_mean"] / upload) if sends else float("nan"),
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
                f"fewer params trained in rounds (paper: {PAPER_FEWER_TRAINABLE:.2%})": f"{r['fewer_trainable']:.2%}",
                f"less upload per round (paper: {PAPER_LESS_COMMUNICATION:.2%})": "n/a (sends nothing)"
                if pd.isna(comm)
                else f"{comm:.2%}",
            }
        )
    return pd.DataFrame(rows).to_markdown(index=False, disable_numparse=True)
