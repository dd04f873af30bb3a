"""A comparison's records: one row per client per run (``clients.csv``), one per round per run (``rounds.csv``).

These two CSV files are what a comparison commits (``docs/results/<task>/``):
every table, confidence interval, plot and number of ``docs/results.md`` is
computed from them (:mod:`experiments.results_page`), and the runner skips a
run whose rows are already there, so a sweep resumes on another machine or in
another session from the committed files alone.

Every row carries where it was measured: the commit of the app (``commit``;
``-dirty`` when tracked files other than the records had changes), the UTC date and the machine.
``config`` is a fingerprint of the run config shared by all runs of a sweep
(everything but ``mode``, ``seed``, ``dirichlet-alpha`` and ``output-dir``);
rows of another config are refused rather than mixed.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import math
import os
import platform
import subprocess
from pathlib import Path

import pandas as pd

from fedgrow_core.protocol import Phase
from fedgrow_core.run_config import RunConfig, pyproject_config

CLIENTS_CSV, ROUNDS_CSV = "clients.csv", "rounds.csv"
#: What identifies one run of a sweep.
RUN_KEY = ["task", "dirichlet_alpha", "mode", "seed"]
#: Config keys that vary inside one sweep (not part of its fingerprint).
PER_RUN_KEYS = ("mode", "seed", "dirichlet-alpha", "output-dir")
#: Paths (relative to the repository) of the committed records and the pages made from them; changes
#: there do not make a run's ``commit`` ``-dirty`` (:func:`provenance`).
RECORD_PATHS = ("docs/results", "docs/results.md")
#: Columns read back as text whatever they look like (a hash of digits only stays a string).
_TEXT_COLUMNS = {"config": str, "commit": str, "date": str, "machine": str, "software": str, "model": str}
_TRAINING_PHASES = {Phase.GROW.value, Phase.TRAIN_LOCAL.value, Phase.TRAIN_SHARED.value}


def resolved_config(config: dict) -> RunConfig:
    """The app's run config (``pyproject.toml`` defaults) with ``config``'s keys on top, validated.

    Raises
    ------
    fedgrow_core.run_config.ConfigError
        If a key is unknown or a value invalid (every problem named).
    """
    from .flower_launcher import ROOT

    return RunConfig.from_flower({**pyproject_config(ROOT / "pyproject.toml"), **config})


def config_fingerprint(config: dict, num_supernodes: int = 3) -> str:
    """First 12 hex digits of the SHA-256 of everything that defines a sweep's runs but the per-run keys.

    That is the resolved run config (:func:`resolved_config`: a changed app
    default changes it too) without :data:`PER_RUN_KEYS`, and the number of
    simulated SuperNodes (the federation's ``num-supernodes``).

    Raises
    ------
    fedgrow_core.run_config.ConfigError
        From :func:`resolved_config`.
    """
    run = resolved_config(config)
    resolved = {field.alias or name: str(getattr(run, name)) for name, field in type(run).model_fields.items()}
    shared = {k: v for k, v in resolved.items() if k not in PER_RUN_KEYS} | {"num-supernodes": num_supernodes}
    return hashlib.sha256(json.dumps(shared, sort_keys=True, default=str).encode()).hexdigest()[:12]


def provenance(repo: Path, when: float | None = None) -> dict[str, str]:
    """Where and when a run ran: ``commit``, ``date`` and ``machine``.

    ``commit`` is the short hash of the HEAD of the git checkout holding
    ``repo`` (``-dirty`` if tracked files other than the records and the pages
    made from them, :data:`RECORD_PATHS`, have changes), ``date`` the UTC date of
    the POSIX time ``when`` (default: now), ``machine`` the architecture, the
    number of CPU cores, the memory in GiB and the GPU (``torch.cuda``), e.g.
    ``x86_64, 2 cores, 24 GiB, no GPU``, and ``software`` the versions of Python,
    flwr, torch and transformers.
    """

    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return ""

    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    # the committed records and the pages made from them change as a sweep runs; they are not the app
    if git("status", "--porcelain", "--untracked-files=no", "--", ".", *(f":(exclude){p}" for p in RECORD_PATHS)):
        commit += "-dirty"
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    machine = f"{platform.machine()}, {os.cpu_count()} cores, {memory:.0f} GiB, {gpu}"
    date = dt.datetime.fromtimestamp(when, dt.UTC) if when is not None else dt.datetime.now(dt.UTC)
    from importlib.metadata import version

    software = f"Python {platform.python_version()}, " + ", ".join(
        f"{p} {version(p)}" for p in ("flwr", "torch", "transformers")
    )
    return {"commit": commit, "date": date.strftime("%Y-%m-%d"), "machine": machine, "software": software}


def _number(value: float | None) -> float:
    """A record's optional number: NaN where a run did not report it (what the CSV reads back)."""
    return math.nan if value is None else float(value)


def run_records(
    summary: dict, rows: list[dict], config: dict, where: dict[str, str], num_supernodes: int = 3
) -> tuple[list[dict], list[dict]]:
    """The ``clients.csv`` and ``rounds.csv`` rows of one finished run.

    Parameters
    ----------
    summary : dict
        The run's ``summary.json`` (:class:`fedgrow_core.run_summary.RunSummary`).
    rows : list of dict
        Its ``metrics.jsonl`` rows (:func:`server_app.reporting.summary.round_rows`).
    config : dict
        The run config it ran with (the sweep's overrides, its mode and seed),
        giving ``dataset``, ``local-steps``, ``num-server-rounds`` and ``finetune-steps``
        (the app's defaults where absent).
    where : dict
        :func:`provenance`.
    num_supernodes : int
        The simulated federation's size (part of :func:`config_fingerprint`).

    Returns
    -------
    (list of dict, list of dict)
        Client rows: the run key, ``partition_id``, ``model``, ``accuracy``,
        ``grown_accuracy`` (before fine-tuning; growth modes), ``precision``,
        ``test_examples``, ``trainable_params``, ``model_params``,
        ``steps`` (optimiser steps per client), the run's per-client bytes
        (``upload_bytes_per_round``, ``upload_bytes_total``, ``payload_bytes_total``,
        bytes), ``wall_time_s`` (seconds), the shapes, ``config`` and ``where``.
        Round rows: the run key, ``round``, ``phase``, ``steps`` (local steps
        per client so far: ``k * local-steps`` after the k-th training round, all
        steps after the final fine-tuning), ``eval_accuracy`` (mean over clients),
        ``received_accuracy`` (the received Global-LiGO before training, i.e. the
        previous round's aggregate), ``relative_change`` and ``update_cosine`` (the server's
        Global-LiGO diagnostics, :func:`server_app.reporting.summary.round_rows`),
        ``train_loss``, ``upload_bytes``, ``cumulative_upload_bytes`` (bytes), ``seconds``.

    Raises
    ------
    fedgrow_core.run_config.ConfigError
        If ``config`` is not a valid run config.
    KeyError
        If the summary or a row lacks a field named above.
    """
    run = resolved_config(config)
    steps = run.num_server_rounds * run.local_steps + run.finetune_steps
    key = {k: summary[k] for k in RUN_KEY}
    shared = {
        "steps": steps,
        "upload_bytes_per_round": summary["upload_bytes_per_round"],
        "upload_bytes_total": summary["upload_bytes_total"],
        "payload_bytes_total": summary["payload_bytes_total"],
        "wall_time_s": summary["wall_time_s"],
        "intermediate_shape": summary["intermediate_shape"],
        "target_shape": summary["target_shape"],
        "config": config_fingerprint(config, num_supernodes),
        **where,
    }
    clients = [
        {
            **key,
            "dataset": run.dataset,
            "partition_id": c["partition_id"],
            "model": c["model"],
            "accuracy": c["accuracy"],
            "grown_accuracy": _number(c.get("grown_accuracy")),
            "precision": c["precision"],
            "test_examples": c["test_examples"],
            "trainable_params": c["trainable_params"],
            "model_params": c["model_params"],
            **shared,
        }
        for c in summary["clients"]
    ]
    rounds, trained = [], 0
    for r in rows:
        if r["phase"] in _TRAINING_PHASES:
            trained += 1
        rounds.append(
            {
                **key,
                "round": r["round"],
                "phase": r["phase"],
                "steps": steps if r["phase"] == Phase.FINAL.value else min(trained * run.local_steps, steps),
                "eval_accuracy": r["eval-accuracy"],
                "received_accuracy": _number(r.get("received-accuracy") if r["phase"] != Phase.FINAL.value else None),
                "relative_change": _number(r.get("relative-change")),
                "update_cosine": _number(r.get("update-cosine")),
                "train_loss": r["train-loss"],
                "upload_bytes": r["upload-bytes"],
                "cumulative_upload_bytes": r["cumulative-upload-bytes"],
                "seconds": r["seconds"],
            }
        )
    return clients, rounds


def load_records(folder: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``clients.csv`` and ``rounds.csv`` of ``folder`` (empty frames where a file is absent)."""
    frames = []
    for name in (CLIENTS_CSV, ROUNDS_CSV):
        path = folder / name
        frames.append(pd.read_csv(path, dtype=_TEXT_COLUMNS) if path.is_file() else pd.DataFrame())
    return frames[0], frames[1]


def done_runs(clients: pd.DataFrame, fingerprint: str) -> set[tuple]:
    """The run keys (:data:`RUN_KEY`) recorded in ``clients`` for this sweep config.

    Raises
    ------
    ValueError
        If ``clients`` holds rows of another config (a different preset or
        overrides): they would be mixed into one comparison.
    """
    if clients.empty:
        return set()
    other = sorted(set(clients["config"].astype(str)) - {fingerprint})
    if other:
        raise ValueError(
            f"the records hold runs of config(s) {other}, not of this sweep's config {fingerprint!r}: "
            "use another --out folder for a different preset or overrides"
        )
    return {tuple(row) for row in clients[RUN_KEY].drop_duplicates().itertuples(index=False)}


def append_records(folder: Path, clients: list[dict], rounds: list[dict]) -> None:
    """Add one run's rows to ``folder``'s ``rounds.csv``, then ``clients.csv`` (created with a header).

    Rows of the same run (:data:`RUN_KEY`) already there are replaced. Each
    file is written whole to a temporary file and moved into place
    (``os.replace``), and ``rounds.csv`` first: a run counts as recorded once
    its ``clients.csv`` rows exist, so an interruption never leaves a recorded
    run without its rounds.
    """
    folder.mkdir(parents=True, exist_ok=True)
    old_clients, old_rounds = load_records(folder)
    for name, old, new in ((ROUNDS_CSV, old_rounds, rounds), (CLIENTS_CSV, old_clients, clients)):
        frame = pd.DataFrame(new)
        if not old.empty:
            keys = frame[RUN_KEY].drop_duplicates()
            stale = old.merge(keys, on=RUN_KEY, how="left", indicator=True)["_merge"].eq("both").to_numpy()
            frame = pd.concat([old[~stale], frame], ignore_index=True)
        tmp = folder / f".{name}.tmp"
        frame.to_csv(tmp, index=False)
        os.replace(tmp, folder / name)
