"""The schema of a run folder's ``summary.json``: written by the ServerApp, read by the experiments.

:class:`RunSummary` declares every key once, with its type and meaning
(docs/outputs.md); ``server_app.reporting.summary.build_summary`` fills it and
``experiments.records`` validates what it reads against it, so a key one side
renames or drops fails at once with the key's name.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class ClientSummary(BaseModel):
    """One client's final-phase results (the ``clients`` list of ``summary.json``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    partition_id: int = Field(description="the node's partition id")
    node_id: int | None = Field(default=None, description="the node's Flower id")
    model: str = Field(description="the small model's folder name (never a path)")
    accuracy: float = Field(description="final test accuracy on the client's own test rows")
    grown_accuracy: float | None = Field(
        default=None, description="the grown model's accuracy before fine-tuning (growth modes)"
    )
    precision: float = Field(description="final macro precision")
    trainable_params: int = Field(description="parameters the client trained in the rounds")
    model_params: int = Field(description="parameters of the final model")
    test_examples: int = Field(description="test rows of the final evaluation")
    final_compute_s: float = Field(default=0.0, description="core-seconds of final fine-tuning and evaluation")


class RunSummary(BaseModel):
    """A run folder's ``summary.json``: the run's identity, its clients' results, bytes and times.

    Units: bytes for ``*_bytes*``, seconds for ``*_s``; ``None`` where a value
    does not exist for the run (no client replied, no model bytes).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    mode: str
    strategy: str
    seed: int
    dirichlet_alpha: float
    task: str
    rounds: int = Field(description="rounds run, collection included")
    intermediate_shape: str
    target_shape: str
    clients: list[ClientSummary]
    mean_accuracy: float | None
    mean_grown_accuracy: float | None = None
    std_accuracy: float | None = Field(description="population std over clients: the spread")
    mean_precision: float | None
    trainable_params_per_client: float | None = Field(description="mean over clients")
    model_params: int = Field(description="median over clients of the final model's parameters")
    upload_bytes_per_round: float = Field(description="mean over rounds of one client's serialised reply")
    download_bytes_per_round: float = Field(description="mean over rounds of one client's serialised instruction")
    upload_bytes_total: float = Field(description="per client, over the run")
    payload_bytes_total: float = Field(description="the tensor data of the uploads only")
    model_bytes: int = Field(description="float32 bytes of model_params")
    upload_over_model_bytes: float | None
    download_over_model_bytes: float | None
    participation: list[dict[str, Any]] = Field(description="per round: accepted, rejected, failed, missing nodes")
    rounds_log: list[dict[str, Any]] = Field(description="the server's round-log entries")
    wall_time_s: float
    compute_s: float = Field(description="the clients' reported core-seconds")
    compute_cores: int
    compute_floor_s: float = Field(description="compute_s / compute_cores")
    wall_over_floor: float | None
    final_rejected: list[dict[str, Any]] = Field(default_factory=list, description="final replies that failed checks")
    preflight_refused: list[dict[str, Any]] = Field(
        default_factory=list, description="nodes that refused the run at preflight (left out), with their reasons"
    )
    global_ligo_relative_change: float | None = Field(
        default=None, description="how far the run moved the shared Global-LiGO (modes that share one)"
    )


def read_summary(path: str | Path) -> dict[str, Any]:
    """A ``summary.json`` file's content, checked against :class:`RunSummary`.

    Raises
    ------
    pydantic.ValidationError
        Naming every key that is missing, unknown or of the wrong type.
    """
    return RunSummary.model_validate_json(Path(path).read_text()).model_dump()
