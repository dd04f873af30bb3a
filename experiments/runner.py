"""Run chosen modes over seeds (and Dirichlet alphas) with ``flwr run``; write tables and plots.

    python -m experiments.runner --preset presets/results-text.toml --seeds 0 1 2 --out results/text
    python -m experiments.runner --preset presets/results-text.toml --alphas 0.1 0.5 10 --out results/alpha

Each (alpha, mode, seed) is one ``flwr run`` of this app in local simulation
with ``mode``, ``seed``, ``dirichlet-alpha`` and ``output-dir`` set on top of the
preset (and ``--set key=value`` overrides). A run whose ``summary.json`` already
exists is not run again, so an interrupted sweep resumes. The results are
``results.csv`` / ``results.md`` (:mod:`experiments.tables`) and
``accuracy_vs_rounds.png`` / ``accuracy_vs_bytes.png`` (:mod:`experiments.plots`).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import tomllib
from pathlib import Path

from flwr.common.config import flatten_dict

from fedgrow_core.run_config import MODES, RunConfig, parse_overrides, pyproject_config

from .flower_launcher import ROOT, flwr_run, prepare_flwr_home, run_failure, stop_local_superlink
from .plots import plot_accuracy
from .tables import results_table, write_tables


def run_overrides(preset: Path | None, extra: list[str]) -> dict:
    """The preset's keys plus ``key=value`` overrides (TOML literals), checked against the app's config.

    Raises
    ------
    ValueError
        If an override is not ``key=value`` with a TOML literal value.
    fedgrow_core.run_config.ConfigError
        If the merged config is invalid (before anything runs).
    """
    overrides = flatten_dict(tomllib.loads(preset.read_text())) if preset else {}
    overrides.update(parse_overrides(extra, usage="--set expects key=value"))
    RunConfig.from_flower({**pyproject_config(ROOT / "pyproject.toml"), **overrides})
    return overrides


def _toml(config: dict) -> str:
    return "".join(f"{k} = {json.dumps(v)}\n" for k, v in config.items())


def run_grid(
    overrides: dict,
    modes: list[str],
    seeds: list[int],
    alphas: list[float | None],
    out: Path,
    timeout: float = 7200,
    run_missing: bool = True,
) -> list[dict]:
    """Run every (alpha, mode, seed) not yet done under ``out/runs/``; return all summaries.

    Each run's config, log and run folder are in ``out/runs/<alpha>-<mode>-seed<k>/``.
    With ``run_missing=False`` nothing is run: the summaries of the runs already
    done are returned (to tabulate a sweep that was cut short).

    Raises
    ------
    RuntimeError
        If a run did not finish with a ``summary.json``: ``flwr run`` exited
        non-zero or Flower reports the run failed (the reason and its log are named).
    """
    home = prepare_flwr_home((out / "flwr-home").resolve())
    summaries, started = [], False
    try:
        for alpha in alphas:
            for mode in modes:
                for seed in seeds:
                    config = {**overrides, "mode": mode, "seed": seed}
                    if alpha is not None:
                        config["dirichlet-alpha"] = alpha
                    tag = f"alpha{config.get('dirichlet-alpha', 'default')}-{mode}-seed{seed}"
                    folder = (out / "runs" / tag).resolve()
                    done = sorted(folder.glob("output/*/summary.json"))
                    if not done and not run_missing:
                        continue
                    if not done:
                        folder.mkdir(parents=True, exist_ok=True)
                        config["output-dir"] = str(folder / "output")
                        (folder / "run.toml").write_text(_toml(config))
                        start = time.perf_counter()
                        print(f"[runner] {tag} ...", flush=True)
                        started = True
                        log_file = folder / "flwr.log"
                        status = flwr_run(folder / "run.toml", home, log_file, timeout=timeout)
                        failure = run_failure(log_file.read_text(errors="replace"), home)
                        done = sorted(folder.glob("output/*/summary.json"))
                        if status != 0 or failure or not done:
                            reason = failure or (f"flwr run exited {status}" if status else "no summary.json")
                            raise RuntimeError(f"run {tag} failed: {reason}; its log: {log_file}")
                        print(f"[runner] {tag} done in {time.perf_counter() - start:.0f} s", flush=True)
                    summary = json.loads(done[-1].read_text())
                    summary["rows"] = [
                        json.loads(line) for line in (done[-1].parent / "metrics.jsonl").read_text().splitlines()
                    ]
                    summaries.append(summary)
    finally:
        if started:  # the local SuperLink that our first `flwr run` started
            stop_local_superlink(home)
    return summaries


def main(argv: list[str] | None = None) -> int:
    """Command line entry point; returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", type=Path, help="TOML file of run-config overrides (e.g. presets/*.toml)")
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES, help="modes to run (default: all)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--alphas", nargs="+", type=float, help="Dirichlet alphas to sweep (default: the preset's)")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="more run-config overrides")
    parser.add_argument("--out", type=Path, required=True, help="results folder")
    parser.add_argument("--timeout", type=float, default=7200, help="seconds per run")
    parser.add_argument("--collect-only", action="store_true", help="tabulate the runs already done, run nothing")
    args = parser.parse_args(argv)
    overrides = run_overrides(args.preset, args.set)
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    try:
        summaries = run_grid(
            overrides, args.modes, args.seeds, args.alphas or [None], args.out, args.timeout, not args.collect_only
        )
    except RuntimeError as err:
        print(f"[runner] FAILED: {err}", file=sys.stderr)
        return 1
    table = results_table(summaries)
    write_tables(table, args.out)
    plot_accuracy(summaries, args.out)
    print(table.to_markdown(index=False, floatfmt=".4g"))
    print(f"[runner] {len(summaries)} runs, {time.perf_counter() - start:.0f} s; results in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
