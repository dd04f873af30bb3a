"""Run chosen modes over seeds (and Dirichlet alphas) with ``flwr run``; write tables and plots.

    python -m experiments.runner --preset presets/results-text.toml --seeds 0 1 2 3 4 \
        --out docs/results/text --work results/text
    python -m experiments.runner --preset presets/results-text.toml --alphas 0.1 0.5 10 --out results/alpha

Each (alpha, mode, seed) is one ``flwr run`` of this app in local simulation
with ``mode``, ``seed``, ``dirichlet-alpha`` and ``output-dir`` set on top of the
preset (and ``--set key=value`` overrides), in ``<work>/runs/<alpha>-<mode>-seed<k>/``.
As each run ends its rows are appended to ``<out>/clients.csv`` and
``<out>/rounds.csv`` (:mod:`experiments.records`); a run already recorded there,
or whose ``summary.json`` exists, is not run again, so an interrupted sweep
resumes, on this machine or, from committed records, on another. A run that
fails is named and the sweep goes on (the runner exits 1 at the end; running it
again retries only the failed runs). Then the
tables (:mod:`experiments.tables`: ``results.md``, ``paired.md`` with Fed-Grow
against each baseline and 95% intervals, ``comparison.md``) and the plots
``accuracy_vs_steps.png`` / ``accuracy_vs_bytes.png`` (:mod:`experiments.plots`).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import tomllib
from pathlib import Path

import pandas as pd
from flwr.common.config import flatten_dict

from fedgrow_core.modes import mode_names
from fedgrow_core.run_config import parse_overrides
from fedgrow_core.run_summary import read_summary

from . import records
from .flower_launcher import FEDERATION_CONFIG, ROOT, flwr_run, prepare_flwr_home, run_failure, stop_local_superlink
from .plots import plot_accuracy
from .tables import write_tables


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
    records.resolved_config(overrides)
    return overrides


def toml_text(config: dict) -> str:
    """Flat ``key = value`` TOML of ``config`` (scalar values, as a run config or a federation config holds)."""
    return "".join(f"{k} = {json.dumps(v)}\n" for k, v in config.items())


PROVENANCE = "provenance.json"


def _read_run(folder: Path) -> tuple[dict, list[dict], dict[str, str], dict] | None:
    """A finished run folder: its newest ``summary.json``, ``metrics.jsonl`` rows, provenance and config.

    The provenance is the folder's ``provenance.json`` (written when the run
    started: commit, date, machine, software, ``num-supernodes``); without one
    every field is ``unknown`` but the date (the summary's modification time).
    The config is the folder's ``run.toml`` without ``output-dir`` (empty if absent).
    Returns ``None`` if there is no ``summary.json``.
    """
    done = sorted(folder.glob("output/*/summary.json"))
    if not done:
        return None
    rows = [json.loads(line) for line in (done[-1].parent / "metrics.jsonl").read_text().splitlines()]
    stamp = folder / PROVENANCE
    if stamp.is_file():
        where = json.loads(stamp.read_text())
    else:
        date = time.strftime("%Y-%m-%d", time.gmtime(done[-1].stat().st_mtime))
        where = {"commit": "unknown", "date": date, "machine": "unknown", "software": "unknown"}
    toml = folder / "run.toml"
    config = tomllib.loads(toml.read_text()) if toml.is_file() else {}
    config.pop("output-dir", None)
    return read_summary(done[-1]), rows, where, config


def read_summaries(work: Path, seeds: list[int] | None = None) -> list[dict]:
    """The ``summary.json`` of every run under ``work/runs/`` (of ``seeds`` only, if given)."""
    found = (_read_run(folder) for folder in sorted((work / "runs").glob("*")))
    return [f[0] for f in found if f is not None and (seeds is None or f[0]["seed"] in seeds)]


def run_grid(
    overrides: dict,
    modes: list[str],
    seeds: list[int],
    alphas: list[float | None],
    out: Path,
    timeout: float = 7200,
    run_missing: bool = True,
    work: Path | None = None,
    federation: Path = FEDERATION_CONFIG,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Run every (alpha, mode, seed) not yet recorded in ``out``; return the records of the whole sweep.

    A run is skipped when its rows are already in ``out/clients.csv``
    (:mod:`experiments.records`: committed records resume a sweep anywhere) or
    its ``summary.json`` is already under ``work/runs/<alpha>-<mode>-seed<k>/``
    (then its rows are added, after checking that its ``run.toml`` and
    federation size give this sweep's config fingerprint). Otherwise it is run there (config, log, run
    folder) and its rows are appended to ``out/clients.csv`` and
    ``out/rounds.csv`` as soon as it ends. With ``run_missing=False`` nothing is
    run (to tabulate a sweep that was cut short). ``federation`` is the simulated
    federation's TOML (:func:`experiments.flower_launcher.flwr_run`).

    Returns
    -------
    (pandas.DataFrame, pandas.DataFrame)
        ``clients.csv`` and ``rounds.csv`` rows of the runs of this grid.

    Raises
    ------
    RuntimeError
        If a run did not finish with a ``summary.json``: ``flwr run`` exited
        non-zero or Flower reports the run failed (the reason and its log are named).
        It is raised after every other run of the grid has been run and recorded,
        so one failed run (a lost heartbeat, a paused machine) costs only itself;
        running the sweep again retries the failed runs.
    ValueError
        If ``out`` holds records of another sweep config (:func:`records.done_runs`),
        or a run folder under ``work`` ran with another config.
    """
    work = work or out
    home = prepare_flwr_home((work / "flwr-home").resolve())
    supernodes = int(tomllib.loads(federation.read_text())["num-supernodes"])
    fingerprint = records.config_fingerprint(overrides, supernodes)
    recorded = records.done_runs(records.load_records(out)[0], fingerprint)
    started, keys, failed = False, [], []
    try:
        for alpha in alphas:
            for mode in modes:
                for seed in seeds:
                    config = {**overrides, "mode": mode, "seed": seed}
                    if alpha is not None:
                        config["dirichlet-alpha"] = alpha
                    run = records.resolved_config(config)
                    key = (run.task, run.dirichlet_alpha, mode, seed)
                    keys.append(key)
                    if key in recorded:
                        continue
                    tag = f"alpha{run.dirichlet_alpha}-{mode}-seed{seed}"
                    folder = (work / "runs" / tag).resolve()
                    finished = _read_run(folder)
                    if finished is None and not run_missing:
                        continue
                    if finished is None:
                        folder.mkdir(parents=True, exist_ok=True)
                        config["output-dir"] = str(folder / "output")
                        (folder / "run.toml").write_text(toml_text(config))
                        where = records.provenance(ROOT) | {"num-supernodes": supernodes}
                        (folder / PROVENANCE).write_text(json.dumps(where))
                        start = time.perf_counter()
                        print(f"[runner] {tag} ...", flush=True)
                        started = True
                        log_file = folder / "flwr.log"
                        status = flwr_run(folder / "run.toml", home, log_file, timeout=timeout, federation=federation)
                        failure = run_failure(log_file.read_text(errors="replace"), home)
                        finished = _read_run(folder)
                        if status != 0 or failure or finished is None:
                            reason = failure or (f"flwr run exited {status}" if status else "no summary.json")
                            failed.append(f"run {tag} failed: {reason}; its log: {log_file}")
                            print(f"[runner] FAILED: {failed[-1]}; going on with the other runs", flush=True)
                            continue
                        print(f"[runner] {tag} done in {time.perf_counter() - start:.0f} s", flush=True)
                    summary, rows, where, ran = finished
                    ran_nodes = int(where.get("num-supernodes", len(summary["clients"])))
                    if records.config_fingerprint(ran, ran_nodes) != fingerprint:
                        raise ValueError(
                            f"{folder} holds a run of another config than this sweep's ({ran_nodes} SuperNodes, "
                            f"{folder / 'run.toml'}): delete it or use another --work folder"
                            + "".join(f"; before that, {f}" for f in failed)
                        )
                    where = {k: str(v) for k, v in where.items() if k != "num-supernodes"}
                    records.append_records(out, *records.run_records(summary, rows, ran, where, ran_nodes))
                    recorded.add(key)
    finally:
        if started:  # the local SuperLink that our first `flwr run` started
            stop_local_superlink(home)
    if failed:
        raise RuntimeError(f"{len(failed)} of the sweep's runs failed (run again to retry): " + "; ".join(failed))
    clients, rounds = records.load_records(out)
    if clients.empty:
        return clients, rounds
    wanted = pd.DataFrame(keys, columns=records.RUN_KEY).drop_duplicates()
    return clients.merge(wanted, on=records.RUN_KEY), rounds.merge(wanted, on=records.RUN_KEY)


def main(argv: list[str] | None = None) -> int:
    """Command line entry point; returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", type=Path, help="TOML file of run-config overrides (e.g. presets/*.toml)")
    parser.add_argument(
        "--modes", nargs="+", default=list(mode_names()), choices=mode_names(), help="modes to run (default: all)"
    )
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    parser.add_argument("--alphas", nargs="+", type=float, help="Dirichlet alphas to sweep (default: the preset's)")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="more run-config overrides")
    parser.add_argument(
        "--out", type=Path, required=True, help="results folder: clients.csv, rounds.csv, tables and plots"
    )
    parser.add_argument("--work", type=Path, help="folder of the runs' logs and outputs (default: --out)")
    parser.add_argument("--timeout", type=float, default=7200, help="seconds per run")
    parser.add_argument(
        "--federation", type=Path, default=FEDERATION_CONFIG, help="simulated federation TOML (SuperNodes, resources)"
    )
    parser.add_argument("--collect-only", action="store_true", help="tabulate the runs already done, run nothing")
    args = parser.parse_args(argv)
    overrides = run_overrides(args.preset, args.set)
    args.out.mkdir(parents=True, exist_ok=True)
    start, status = time.perf_counter(), 0
    try:
        clients, rounds = run_grid(
            overrides,
            args.modes,
            args.seeds,
            args.alphas or [None],
            args.out,
            args.timeout,
            not args.collect_only,
            args.work,
            args.federation,
        )
    except ValueError as err:
        print(f"[runner] FAILED: {err}", file=sys.stderr)
        return 1
    except RuntimeError as err:  # some runs failed; the others are recorded and tabulated below
        print(f"[runner] FAILED: {err}", file=sys.stderr)
        clients, status = records.load_records(args.out)[0], 1
    if clients.empty:
        print(f"[runner] no runs recorded in {args.out}", file=sys.stderr)
        return 1
    clients, rounds = records.load_records(args.out)  # the tables cover every run recorded there
    write_tables(clients, args.out)
    plot_accuracy(rounds, args.out)
    print((args.out / "results.md").read_text(), end="")
    if (args.out / "paired.md").is_file():
        print((args.out / "paired.md").read_text(), end="")
    runs = clients[records.RUN_KEY].drop_duplicates()
    print(f"[runner] {len(runs)} runs, {time.perf_counter() - start:.0f} s; results in {args.out}")
    return status


if __name__ == "__main__":
    sys.exit(main())
