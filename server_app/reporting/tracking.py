"""Experiment tracking: the ServerApp logs each round's metrics as the run goes.

The run config's ``trackers`` picks where: ``tensorboard`` writes event files
to ``<run folder>/tensorboard/`` (``torch.utils.tensorboard``; view with
``tensorboard --logdir outputs``), ``mlflow`` logs to the tracking URI MLflow
reads from ``MLFLOW_TRACKING_URI`` (else a local ``./mlruns``). Each round's
scalars (:func:`round_scalars`) are logged at its round number; the final
phase's accuracy per client and their mean at the last round.
"""

from __future__ import annotations

import importlib.util
import statistics
from pathlib import Path
from typing import Protocol

from fedgrow_core.run_config import ConfigError, RunConfig

from .round_log import client_means

_TAGS = {
    "train-loss": "train/loss",
    "train-accuracy": "train/accuracy",
    "eval-accuracy": "eval/accuracy",
    "received-accuracy": "eval/received-accuracy",
}
#: The package each tracker needs.
PACKAGES = {"tensorboard": "tensorboard", "mlflow": "mlflow"}


def round_scalars(entry: dict) -> dict[str, float]:
    """Scalars of one round-log entry (:func:`server_app.reporting.round_log.round_entry`).

    Returns
    -------
    dict of str to float
        ``train/loss``, ``train/accuracy``, ``eval/accuracy``,
        ``eval/received-accuracy`` (means over the accepted clients, where
        reported), ``global-ligo/relative-change`` and
        ``global-ligo/update-cosine`` (shared rounds), ``traffic/upload-bytes`` and
        ``traffic/download-bytes`` (mean bytes per client), ``round/seconds``,
        ``round/accepted``, ``round/rejected``, ``round/failed``,
        ``round/missing``.
    """
    scalars = {_TAGS[key]: mean for key, mean in client_means(entry).items()}
    for key, tag in (("upload_bytes", "traffic/upload-bytes"), ("download_bytes", "traffic/download-bytes")):
        if entry.get(key):
            scalars[tag] = statistics.fmean(entry[key].values())
    for key, tag in (
        ("relative_change", "global-ligo/relative-change"),
        ("update_cosine", "global-ligo/update-cosine"),
    ):
        if entry.get(key) is not None:
            scalars[tag] = float(entry[key])
    scalars["round/seconds"] = float(entry["seconds"])
    scalars["round/accepted"] = float(len(entry["accepted_nodes"]))
    scalars["round/rejected"] = float(len(entry["rejected"]))
    scalars["round/failed"] = float(entry["failed"])
    scalars["round/missing"] = float(len(entry.get("missing_nodes", [])))
    return scalars


class Tracker(Protocol):
    """Where round scalars go; ``step`` is the round number."""

    def log(self, scalars: dict[str, float], step: int) -> None:
        """Log ``scalars`` at ``step``."""

    def close(self) -> None:
        """Flush and release."""


class TensorBoardTracker:
    """Event files in ``folder`` (``torch.utils.tensorboard.SummaryWriter``)."""

    def __init__(self, folder: Path) -> None:
        from torch.utils.tensorboard import SummaryWriter  # imports tensorboard: only when tracking

        self.writer = SummaryWriter(log_dir=str(folder))

    def log(self, scalars: dict[str, float], step: int) -> None:
        """One ``add_scalar`` per scalar, then flush (a run may stop at any round)."""
        for tag, value in scalars.items():
            self.writer.add_scalar(tag, value, global_step=step)
        self.writer.flush()

    def close(self) -> None:
        """Close the event file."""
        self.writer.close()


class MLflowTracker:
    """An MLflow run named after the run folder, with the run config as its parameters."""

    def __init__(self, run_name: str, run: RunConfig) -> None:
        import mlflow  # optional: only a run that asks for it needs the package

        self.mlflow = mlflow
        mlflow.start_run(run_name=run_name)
        mlflow.log_params({k: str(v) for k, v in run.to_flower().items()})

    def log(self, scalars: dict[str, float], step: int) -> None:
        """``mlflow.log_metrics`` at ``step`` (``/`` in names as MLflow allows)."""
        self.mlflow.log_metrics(scalars, step=step)

    def close(self) -> None:
        """End the MLflow run."""
        self.mlflow.end_run()


class RunTrackers:
    """The run's trackers (run config ``trackers``), fed round by round.

    They open on the first scalars logged, so a run that fails before its
    first round (preflight) leaves no run folder behind.

    Raises
    ------
    ConfigError
        From the constructor, if a tracker's package is not installed (named, with
        how to install it), before any round runs.
    """

    def __init__(self, run: RunConfig, run_dir: Path) -> None:
        missing = [name for name in run.trackers if importlib.util.find_spec(PACKAGES[name]) is None]
        if missing:
            raise ConfigError(
                [
                    f"trackers = {n!r}: the {PACKAGES[n]!r} package is not installed; pip install {PACKAGES[n]}"
                    for n in missing
                ]
            )
        self.run, self.run_dir = run, run_dir
        self.trackers: list[Tracker] | None = None  # opened by the first _log

    def round(self, entry: dict) -> None:
        """Log one round-log entry (:func:`round_scalars`) at its round."""
        self._log(round_scalars(entry), int(entry["round"]))

    def final(self, clients: list[dict], step: int) -> None:
        """Log each client's final accuracy (``final/accuracy/partition-<id>``) and their mean, at ``step``."""
        scalars = {f"final/accuracy/partition-{c['partition_id']}": float(c["accuracy"]) for c in clients}
        if clients:
            scalars["final/mean-accuracy"] = statistics.fmean(c["accuracy"] for c in clients)
        self._log(scalars, step)

    def _log(self, scalars: dict[str, float], step: int) -> None:
        if self.trackers is None:
            self.trackers = [
                TensorBoardTracker(self.run_dir / "tensorboard")
                if name == "tensorboard"
                else MLflowTracker(self.run_dir.name, self.run)
                for name in self.run.trackers
            ]
        for tracker in self.trackers:
            tracker.log(scalars, step)

    def close(self) -> None:
        """Close every tracker that was opened."""
        for tracker in self.trackers or []:
            tracker.close()
