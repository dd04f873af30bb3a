"""The message protocol between the Fed-Grow ServerApp and ClientApp.

Both apps build and read messages through this module only. A run is a
sequence of phases (:class:`Phase`); which phases a mode runs, in which order,
is the mode's plan, and which ones a client serves in a mode its handlers
(:class:`fedgrow_core.modes.Mode`). Every message the server sends carries

* ``arrays``: an ``ArrayRecord`` (the Global-LiGO, a target model, or empty);
* ``config``: a ``ConfigRecord`` read by :meth:`Instruction.from_record`:
  ``phase``, ``server-round``, ``run-tag`` (the folder clients keep private
  state under), ``resumed-after`` (rounds restored from a checkpoint) and,
  from FedProx, ``proximal-mu``.

Every reply carries the records and metrics of :data:`REPLY_METRICS` for its
phase (their meanings: :data:`METRIC_MEANINGS`); the server checks each reply
against them (:mod:`server_app.trust.reply_checks`), and nothing else may travel.

Both sides build the same initial Global-LiGO from the run config alone
(:func:`initial_global_ligo`): the server to start the rounds and check a
checkpoint, a client to grow its model before the first round arrives.
Follows Fed-Grow (Shen et al., arXiv 2406.13450, Sec. 4, Algorithm 1).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol

import torch
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from fedgrow_core.growth.ligo import LiGO
from fedgrow_core.growth.shapes import TransformerShape


class Phase(StrEnum):
    """One kind of message from the server; its value is ``config["phase"]``."""

    #: Check the run config, load model and data, report row counts (a ``query`` message).
    PREFLIGHT = "preflight"
    #: Train the private Local-LiGO and the shared Global-LiGO; reply with the Global-LiGO update.
    GROW = "grow"
    #: Train the private small model; reply with metrics only.
    TRAIN_LOCAL = "train-local"
    #: Train the received target model; reply with its weights (FedAvg of whole models).
    TRAIN_SHARED = "train-shared"
    #: Reply with the starting weights of the target model (before ``train-shared`` rounds).
    COLLECT = "collect"
    #: Fine-tune, evaluate and save the mode's model (an ``evaluate`` message).
    FINAL = "finetune-evaluate"


#: Phases served in every mode.
ALWAYS_SERVED = frozenset({Phase.PREFLIGHT, Phase.FINAL})

#: Keys of an instruction's ``config`` record.
PHASE_KEY, ROUND_KEY, RUN_TAG_KEY, RESUMED_KEY, PROXIMAL_MU_KEY = (
    "phase",
    "server-round",
    "run-tag",
    "resumed-after",
    "proximal-mu",
)


#: Largest FedProx proximal weight a client accepts (typical values are 0.001 to 1).
MAX_PROXIMAL_MU = 1000.0


class ProtocolError(ValueError):
    """Raised when a message does not follow this protocol; the text names the key, the value and what was expected."""


@dataclass(frozen=True)
class Instruction:
    """What the server asks of a node in one message (its ``config`` record).

    Attributes
    ----------
    phase : Phase
        What to do.
    server_round : int
        The run's round the message belongs to (0 for preflight).
    run_tag : str
        The run's name, under which a client keeps its private state on disk
        (empty: memory only).
    resumed_after : int
        Rounds restored from a checkpoint (0: not resumed).
    proximal_mu : float
        FedProx's proximal term weight (0: none).
    """

    phase: Phase
    server_round: int = 0
    run_tag: str = ""
    resumed_after: int = 0
    proximal_mu: float = 0.0

    def to_record(self) -> ConfigRecord:
        """The ``config`` record; keys at their defaults are left out."""
        record: dict[str, int | float | str] = {PHASE_KEY: self.phase.value}
        if self.server_round:
            record[ROUND_KEY] = self.server_round
        if self.run_tag:
            record[RUN_TAG_KEY] = self.run_tag
        if self.resumed_after:
            record[RESUMED_KEY] = self.resumed_after
        if self.proximal_mu:
            record[PROXIMAL_MU_KEY] = self.proximal_mu
        return ConfigRecord(record)

    def content(self, arrays: ArrayRecord | None = None) -> RecordDict:
        """The message content: ``arrays`` (empty if ``None``) and :meth:`to_record`."""
        return RecordDict({"arrays": arrays if arrays is not None else ArrayRecord(), "config": self.to_record()})

    @classmethod
    def from_record(cls, config: Mapping[str, object], default_phase: Phase | None = None) -> Instruction:
        """Read an untrusted ``config`` record.

        Parameters
        ----------
        config : mapping
            The message's ``config`` record (any other key is ignored: a
            strategy may add its own).
        default_phase : Phase, optional
            The phase of a message without ``phase`` (Flower's own evaluate
            messages carry none).

        Raises
        ------
        ProtocolError
            For an unknown phase, a round or resume count that is not an integer
            in [0, 10^9], a ``run-tag`` that is not a string, or a
            ``proximal-mu`` outside [0, :data:`MAX_PROXIMAL_MU`] (a huge one
            would turn the client's private operators into NaN).
        """
        raw = config.get(PHASE_KEY, default_phase.value if default_phase else "")
        try:
            phase = Phase(str(raw))
        except ValueError:
            names = [p.value for p in Phase]
            raise ProtocolError(f"{PHASE_KEY} = {str(raw)[:40]!r}: expected one of {names}") from None
        tag = config.get(RUN_TAG_KEY, "")
        if not isinstance(tag, str):
            raise ProtocolError(f"{RUN_TAG_KEY} = {str(tag)[:40]!r}: expected a string")
        mu = config.get(PROXIMAL_MU_KEY, 0.0)
        if isinstance(mu, bool) or not isinstance(mu, (int, float)) or not 0 <= mu <= MAX_PROXIMAL_MU:
            raise ProtocolError(f"{PROXIMAL_MU_KEY} = {str(mu)[:40]!r}: expected a number in [0, {MAX_PROXIMAL_MU:g}]")
        return cls(
            phase=phase,
            server_round=_count(config, ROUND_KEY),
            run_tag=tag,
            resumed_after=_count(config, RESUMED_KEY),
            proximal_mu=float(mu),
        )


def _count(config: Mapping[str, object], key: str) -> int:
    value = config.get(key, 0)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 10**9:
        raise ProtocolError(f"{key} = {str(value)[:40]!r}: expected an integer in [0, 1000000000]")
    return value


@dataclass(frozen=True)
class MetricSpec:
    """One metric key of a reply: its type (``int`` or ``float``), inclusive range, whether it is required.

    ``averaged``: whether the server's strategy aggregates it (a weighted mean
    of losses and accuracies means something; one of parameter counts or
    thread counts does not).
    """

    kind: type
    low: float
    high: float
    required: bool = True
    averaged: bool = False

    def problem(self, key: str, value: object) -> str | None:
        """Why ``value`` is not acceptable for ``key``, or ``None``."""
        if isinstance(value, bool) or isinstance(value, (list, tuple)):
            return f"metric {key!r} = {_short(value)}: expected a single {'integer' if self.kind is int else 'number'}"
        if self.kind is int and not isinstance(value, int):
            return f"metric {key!r} = {_short(value)}: expected an integer"
        if not isinstance(value, (int, float)):
            return f"metric {key!r} = {_short(value)}: expected a number"
        if not math.isfinite(value) or not self.low <= value <= self.high:
            word = "an integer" if self.kind is int else "a number"
            return f"metric {key!r} = {_short(value)}: expected {word} in [{self.low:g}, {self.high:g}]"
        return None


def _short(value: object, limit: int = 60) -> str:
    """``repr(value)``, cut to ``limit`` characters (a reply may hold a million-element list)."""
    if isinstance(value, (list, tuple)) and len(value) > 4:
        return f"[{', '.join(repr(v) for v in value[:3])}, ... ({len(value)} values)]"
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


#: Metric keys both apps read by name: a reply's aggregation weight, and the rows and partition of a node.
NUM_EXAMPLES, PARTITION_ID, TRAIN_EXAMPLES, TEST_EXAMPLES = (
    "num-examples",
    "partition-id",
    "train-examples",
    "test-examples",
)

#: Bound on counts (rows, parameters) a client may report.
MAX_COUNT = 10**12
#: Bound on seconds a client may report (about 115 days).
MAX_SECONDS = 1e7
_COUNT = MetricSpec(int, 1, MAX_COUNT)
_PARAMS = MetricSpec(int, 0, MAX_COUNT)
_SECONDS = MetricSpec(float, 0.0, MAX_SECONDS)
_FRACTION = MetricSpec(float, 0.0, 1.0)
_PARTITION = MetricSpec(int, 0, MAX_COUNT)

#: Metrics of a round's reply (``grow``, ``train-local``, ``train-shared``).
TRAIN_METRICS: dict[str, MetricSpec] = {
    NUM_EXAMPLES: _COUNT,
    "train-loss": MetricSpec(float, 0.0, 1e6, averaged=True),
    "train-accuracy": MetricSpec(float, 0.0, 1.0, averaged=True),
    "train-seconds": _SECONDS,
    "trainable-params": _PARAMS,
    "compute-threads": MetricSpec(int, 1, 1 << 16),
    "eval-accuracy": MetricSpec(float, 0.0, 1.0, required=False),
    "received-accuracy": MetricSpec(float, 0.0, 1.0, required=False),
    "eval-seconds": MetricSpec(float, 0.0, MAX_SECONDS, required=False),
    "received-eval-seconds": MetricSpec(float, 0.0, MAX_SECONDS, required=False),
    "message-seconds": MetricSpec(float, 0.0, MAX_SECONDS, required=False),
}
#: Metrics of a ``collect`` reply.
COLLECT_METRICS: dict[str, MetricSpec] = {NUM_EXAMPLES: _COUNT}
#: Metrics of a final-phase reply (``finetune-evaluate``); it also carries an ``info`` record.
FINAL_METRICS: dict[str, MetricSpec] = {
    NUM_EXAMPLES: _COUNT,
    "accuracy": _FRACTION,
    "grown-accuracy": MetricSpec(float, 0.0, 1.0, required=False),
    "precision": _FRACTION,
    "loss": MetricSpec(float, 0.0, 1e6),
    "trainable-params": MetricSpec(int, 0, MAX_COUNT, required=False),
    "model-params": _PARAMS,
    "finetune-seconds": _SECONDS,
    "eval-seconds": _SECONDS,
    "compute-threads": MetricSpec(int, 1, 1 << 16),
    PARTITION_ID: _PARTITION,
}
#: Metrics of a preflight reply.
PREFLIGHT_METRICS: dict[str, MetricSpec] = {
    PARTITION_ID: _PARTITION,
    TRAIN_EXAMPLES: MetricSpec(int, 0, MAX_COUNT),
    TEST_EXAMPLES: MetricSpec(int, 0, MAX_COUNT),
}
#: The metrics a reply to each phase carries.
REPLY_METRICS: dict[Phase, dict[str, MetricSpec]] = {
    Phase.PREFLIGHT: PREFLIGHT_METRICS,
    Phase.GROW: TRAIN_METRICS,
    Phase.TRAIN_LOCAL: TRAIN_METRICS,
    Phase.TRAIN_SHARED: TRAIN_METRICS,
    Phase.COLLECT: COLLECT_METRICS,
    Phase.FINAL: FINAL_METRICS,
}
#: The final reply's ``info`` record: one string, the model's folder name (never a path).
INFO_KEY = "model"
#: Longest string in a final reply's ``info`` record.
MAX_INFO_CHARS = 256


#: What each metric key of a reply means (every phase's keys; the docs and the privacy tests use it).
METRIC_MEANINGS = {
    "num-examples": "training rows (aggregation weight), or test rows in the final phase",
    "train-loss": "mean training loss over the round's local steps",
    "train-accuracy": "training accuracy over the round's local steps",
    "train-seconds": "seconds spent training in the round",
    "eval-accuracy": "accuracy of the client's current model on its own test rows (at most eval-max-examples)",
    "received-accuracy": "accuracy of the client's grown model with the Global-LiGO it received this round, "
    "before training on it (the previous round's aggregate, at most eval-max-examples rows)",
    "eval-seconds": "seconds spent on the round's (or the final) evaluation",
    "received-eval-seconds": "seconds spent evaluating the received Global-LiGO before training (received-accuracy)",
    "message-seconds": "seconds the ClientApp's train handler spent on the message, from its arrival to the reply "
    "(the round's training and evaluations, building or loading the client, keeping its state, encoding the update)",
    "trainable-params": "parameters the client trains in the rounds",
    "compute-threads": "torch threads the client computes with",
    "accuracy": "final test accuracy on the client's own test rows",
    "grown-accuracy": "test accuracy of the grown model before fine-tuning (growth modes)",
    "precision": "final macro precision on the client's own test rows",
    "loss": "final test loss",
    "model-params": "parameters of the final model",
    "finetune-seconds": "seconds of final fine-tuning",
    "partition-id": "the node's partition id (from its node config)",
    "train-examples": "training rows (preflight)",
    "test-examples": "test rows (preflight)",
}
#: What the final reply's ``info`` record holds.
INFO_MEANINGS = {INFO_KEY: "the small model's name (a folder's last path component, never a full path)"}


def round_metrics(
    num_examples: int, train_loss: float, train_accuracy: float, train_seconds: float, trainable_params: int
) -> dict[str, int | float]:
    """The required :data:`TRAIN_METRICS` of a training round's reply (``compute-threads`` read from torch).

    Units: rows, mean loss, fraction, seconds, parameters.
    """
    return {
        NUM_EXAMPLES: num_examples,
        "train-loss": train_loss,
        "train-accuracy": train_accuracy,
        "train-seconds": train_seconds,
        "trainable-params": trainable_params,
        "compute-threads": torch.get_num_threads(),
    }


def preflight_reply(partition_id: int, train_examples: int, test_examples: int) -> RecordDict:
    """A preflight reply's content: the :data:`PREFLIGHT_METRICS` of a node's partition and row counts."""
    metrics = {PARTITION_ID: partition_id, TRAIN_EXAMPLES: train_examples, TEST_EXAMPLES: test_examples}
    return RecordDict({"metrics": MetricRecord(metrics)})


def train_reply(arrays: Mapping[str, object] | None, metrics: Mapping[str, int | float]) -> RecordDict:
    """A round's reply content: ``arrays`` (torch tensors or numpy arrays; empty if ``None``) and ``metrics``.

    The metrics are those of :data:`REPLY_METRICS` for the round's phase
    (``fedgrow_core.clients.round_metrics`` builds a training round's).
    """
    return RecordDict({"arrays": ArrayRecord(dict(arrays or {})), "metrics": MetricRecord(dict(metrics))})


def final_reply(metrics: Mapping[str, int | float], partition_id: int, model_name: str) -> RecordDict:
    """A final-phase reply's content: :data:`FINAL_METRICS` with the node's partition, and the ``info`` record.

    ``model_name`` is the small model's folder name (:data:`INFO_KEY`), never a path.
    """
    content = {"metrics": MetricRecord({**metrics, PARTITION_ID: partition_id})}
    return RecordDict({**content, "info": ConfigRecord({INFO_KEY: model_name})})


class GlobalLigoKeys(Protocol):
    """The run-config keys that shape the initial Global-LiGO (a :class:`~fedgrow_core.run_config.RunConfig`)."""

    intermediate_shape: TransformerShape
    target_shape: TransformerShape
    global_tie_layers: bool
    global_rank: int
    depth_init: str
    depth_noise: float
    seed: int


def initial_global_ligo(run: GlobalLigoKeys) -> LiGO:
    """The initial Global-LiGO (intermediate -> target shape) from the run config alone, seeded by ``run.seed``.

    Server and clients build the same operator from the same config, so the
    first round's message could be skipped and a checkpoint can be checked
    against it. ``global-tie-layers`` shares the q/k/v/FFN width matrices
    across target layers; ``global-rank`` makes each width matrix ``S + U V^T``
    with only ``U`` trained and sent (:class:`~fedgrow_core.growth.ligo.LiGO`).

    Returns
    -------
    LiGO
        Width matrices ``(D_target, D_intermediate)`` per layer, depth
        coefficients ``(L_target, L_intermediate)`` (LiGO, Wang et al. 2023,
        Eq. 3-6) and the input-side split weights ``split.<space>`` (LEMON,
        Wang et al. 2024, Sec. 4.1), on the CPU in float32.
    """
    return LiGO(
        run.intermediate_shape,
        run.target_shape,
        tie_layers=run.global_tie_layers,
        depth_init=run.depth_init,
        depth_noise=run.depth_noise,
        seed=run.seed,
        rank=run.global_rank,
    )
