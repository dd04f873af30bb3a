"""Paired differences between Fed-Grow and each baseline, with t confidence intervals (``scipy.stats``).

Every mode of a comparison runs on the same seeds, and a seed fixes the
partition, each client's train/test rows, its small model and its batch
order, so Fed-Grow and a baseline on the same (seed, client) form a pair. The
clients of one seed share one federation and are not independent of each
other, so the unit of the interval is the seed: for each seed, the mean over
its clients of (Fed-Grow's accuracy - the baseline's accuracy); then a
two-sided Student t interval of the mean of those per-seed differences
(``scipy.stats.ttest_1samp`` against 0, ``n - 1`` degrees of freedom; the same
as a paired t test of the per-seed client means). A difference is called
significant when its 95% interval excludes 0. Each baseline is tested on its
own, with no correction for testing several baselines and tasks: were all
three baselines exactly as accurate as Fed-Grow, at least one of the three
would be called significant with probability ``1 - 0.95**3``, about 14%.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
from scipy import stats

REFERENCE = "fedgrow"


def t_interval(differences: np.ndarray | list[float], level: float = 0.95) -> tuple[float, float, float, float]:
    """Mean, ``level`` Student t interval (low, high) and two-sided p-value of paired differences.

    Parameters
    ----------
    differences : array_like
        One difference per independent pair, shape ``(n,)``.
    level : float
        Confidence level in (0, 1).

    Returns
    -------
    (float, float, float, float)
        ``mean, low, high, p_value``; the interval and p-value are NaN when
        ``n < 2`` or when every difference is equal (no spread to test).
    """
    d = np.asarray(differences, dtype=float)
    if d.size == 0:
        return math.nan, math.nan, math.nan, math.nan
    mean = float(d.mean())
    if d.size < 2 or np.all(d == d[0]):
        return mean, math.nan, math.nan, math.nan
    result = stats.ttest_1samp(d, 0.0)
    ci = result.confidence_interval(level)
    return mean, float(ci.low), float(ci.high), float(result.pvalue)


def verdict(low: float, high: float, baseline: str, reference: str = "Fed-Grow") -> str:
    """The interval in words: which of the two is significantly more accurate, or neither."""
    if math.isnan(low) or math.isnan(high):
        return "cannot tell (fewer than two seeds, or no spread over seeds)"
    if low > 0:
        return f"{reference} more accurate (significant)"
    if high < 0:
        return f"{baseline} more accurate (significant)"
    return "no significant difference"


def paired_differences(
    clients: pd.DataFrame, metric: str = "accuracy", reference: str = REFERENCE, level: float = 0.95
) -> pd.DataFrame:
    """Reference minus each baseline on the same (seed, client), per task and Dirichlet alpha.

    Parameters
    ----------
    clients : pandas.DataFrame
        ``clients.csv`` rows (:mod:`experiments.records`): ``task``,
        ``dirichlet_alpha``, ``mode``, ``seed``, ``partition_id`` and ``metric``.
    metric : str
        The column compared (``accuracy``, ``precision``).
    reference : str
        The mode every other mode is compared with.
    level : float
        Confidence level of the interval.

    Returns
    -------
    pandas.DataFrame
        One row per (task, alpha, baseline): ``seeds`` (paired seeds), ``pairs``
        (paired clients), ``difference`` (mean over seeds of the per-seed mean
        over clients of reference - baseline), ``ci_low``, ``ci_high``
        (:func:`t_interval` over seeds), ``p_value``, ``client_wins`` (share of
        the (seed, client) pairs where the reference is more accurate; ties count
        half) and ``verdict`` (:func:`verdict`). Empty when ``reference`` has no rows.
    """
    rows = []
    key = ["seed", "partition_id"]
    for (task, alpha), group in clients.groupby(["task", "dirichlet_alpha"], sort=False):
        ours = group[group["mode"] == reference].set_index(key)[metric]
        if ours.empty:
            continue
        for baseline, theirs in group[group["mode"] != reference].groupby("mode", sort=False):
            pairs = pd.concat([ours, theirs.set_index(key)[metric]], axis=1, keys=["ours", "theirs"]).dropna()
            diff = pairs["ours"] - pairs["theirs"]
            per_seed = diff.groupby(level="seed").mean()
            mean, low, high, p = t_interval(per_seed.to_numpy(), level)
            rows.append(
                {
                    "task": task,
                    "dirichlet_alpha": alpha,
                    "baseline": baseline,
                    "seeds": len(per_seed),
                    "pairs": len(diff),
                    "difference": mean,
                    "ci_low": low,
                    "ci_high": high,
                    "p_value": p,
                    "client_wins": float(((diff > 0) + 0.5 * (diff == 0)).mean()) if len(diff) else math.nan,
                    "verdict": verdict(low, high, baseline),
                }
            )
    return pd.DataFrame(rows)


def paired_markdown(paired: pd.DataFrame, metric: str = "accuracy") -> str:
    """:func:`paired_differences` as a Markdown table (differences in accuracy points, 3 decimals)."""
    rows = [
        {
            "task": r["task"],
            "alpha": f"{r['dirichlet_alpha']:g}",
            "Fed-Grow vs": r["baseline"],
            "seeds / client pairs": f"{r['seeds']} / {r['pairs']}",
            f"{metric} difference": f"{r['difference']:+.3f}",
            "95% CI": f"[{r['ci_low']:+.3f}, {r['ci_high']:+.3f}]",
            "p": f"{r['p_value']:.3f}",
            "Fed-Grow ahead in": f"{r['client_wins']:.0%} of pairs",
            "verdict": r["verdict"],
        }
        for _, r in paired.iterrows()
    ]
    return pd.DataFrame(rows).to_markdown(index=False, disable_numparse=True)
