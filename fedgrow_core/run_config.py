"""The run configuration of a Fed-Grow run, checked before any training starts.

Flower passes ``[tool.flwr.app.config]`` (with ``--run-config`` overrides) as a
flat dict of scalars with kebab-case keys. :meth:`RunConfig.from_flower` reads it,
checks every value (type, range, shapes that can grow) and raises one
:class:`ConfigError` that lists every problem found, each naming the key, the bad
value and what was expected.
"""

from __future__ import annotations

import math
import tomllib
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Iterable, Mapping

from fedgrow_core.data.partitions import PARTITIONERS
from fedgrow_core.growth.shapes import TransformerShape
from fedgrow_core.update_encoding import ENCODINGS

TASKS = ("text", "image")
#: What the app runs (the comparison of docs/results.md): Fed-Grow, its baselines, and Fed-Grow
#: followed by federated fine-tuning. See ``server_app/app.py``.
DP_CLIPPING = ("off", "fixed", "adaptive")
MODES = ("fedgrow", "scratch-fedavg", "independent-ligo", "small-only", "fedgrow-fedft")
DEVICES = ("auto", "cpu", "cuda")
LR_SCHEDULES = ("cosine", "linear", "constant")


class ConfigError(ValueError):
    """One or more bad run-config values; ``problems`` lists one message per value."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("invalid run config:\n  - " + "\n  - ".join(problems))


def parse_shape(text: str) -> TransformerShape:
    """``"LxDxFxH"`` (layers x hidden x FFN x heads) to a :class:`TransformerShape`.

    Raises
    ------
    ValueError
        If ``text`` is not four positive integers joined by ``x`` or the shape is
        inconsistent (hidden not divisible by heads).
    """
    parts = str(text).lower().split("x")
    try:
        numbers = [int(p) for p in parts]
    except ValueError:
        numbers = []
    if len(numbers) != 4:
        raise ValueError(f"expected 'LxDxFxH' (layers x hidden x ffn x heads, e.g. '12x512x2048x16'), got {text!r}")
    return TransformerShape(*numbers)


@dataclass(frozen=True)
class RunConfig:
    """Every knob of a Fed-Grow run (``[tool.flwr.app.config]``, kebab-case keys).

    Attributes
    ----------
    mode : {"fedgrow", "scratch-fedavg", "independent-ligo", "small-only", "fedgrow-fedft"}
        Fed-Grow or one of the baselines it is compared with; every mode gives
        each client the same ``num_server_rounds * local_steps + finetune_steps``
        optimiser steps on the same rows.
    task : {"text", "image"}
    dataset : str
        A :func:`fedgrow_core.data.sources.load_data_source` source.
    client_models : tuple of str
        One small model per partition, cycling (``client-models``, comma-separated).
    intermediate_shape, target_shape : TransformerShape
        ``"LxDxFxH"`` strings in the config.
    num_server_rounds : int
        Growth rounds.
    local_steps : int
        Optimiser steps per client per round.
    batch_size : int
    max_length : int
        Token truncation (text).
    max_train_examples : int
        Cap on each client's training rows (0: no cap), to fit a time budget.
    max_test_examples : int
        Cap on each client's test rows (0: no cap); every evaluation of a run uses
        the same capped rows.
    eval_every : int
        Rounds between the per-round evaluations of each client's current model
        (the accuracy-per-round curves): rounds ``eval_every, 2 * eval_every, ...``
        report ``eval-accuracy``; 0 turns them off. The final evaluation always
        runs, on every test row.
    eval_max_examples : int
        Cap on the test rows of a per-round evaluation (the first rows of the
        client's test split, the same every round; 0: all of them).
    depth_init : {"stackbert", "interlace", "identity"}
        Depth initialisation of both operators (LiGO reference code's names;
        ``identity``: new layers start with zero residual-branch outputs, exact
        for pre-LN ViTs, see :mod:`fedgrow_core.growth.preservation`).
    depth_noise : float
        ``U[0, depth_noise)`` added to the depth coefficients, >= 0.
    lr_depth, lr_width, lr_head : float
        Peak AdamW learning rates of the growth phase, one parameter group each:
        the depth coefficients (entries near 1), the width matrices ``E``, and
        the task head.
    lr_schedule : {"cosine", "linear", "constant"}
        Schedule of all three over the growth phase's
        ``num_server_rounds * local_steps`` steps (``transformers``'
        ``get_*_schedule_with_warmup``), after ``warmup_steps`` linear warm-up.
    warmup_steps : int
    weight_decay : float
        AdamW decoupled weight decay of the growth phase.
    fraction_train : float
        Fraction of clients sampled per round, in (0, 1].
    partitioner : {"iid", "dirichlet", "shards"}
    dirichlet_alpha : float
    shards_per_partition : int
    finetune_steps : int
        Local fine-tuning steps of the materialised grown model.
    pretrain_steps, patch_size : int
        For ``vit:LxD`` client models: pre-training steps on the client's own
        rows, and the patch side in pixels.
    lr_finetune : float
    strategy : str
        A built-in strategy name or ``package.module:Class``.
    min_train_nodes : int
        The strategy's ``min_train_nodes``: at least this many nodes are sampled
        per round, and a round aggregates only if at least this many replies pass
        the checks (otherwise the Global-LiGO is kept unchanged).
    round_timeout : float
        Seconds the server waits for a round's replies; a node that has not
        replied by then is recorded as missing for that round. It also bounds
        the wait for ``min_train_nodes`` online nodes before a round.
    clip_update_norm : float
        Fixed L2 bound on each reply's update of the shared tensors (reply minus
        what was sent), applied before aggregation; 0 turns it off.
    clip_update_median : float
        Bound on each reply's update norm as a multiple of the round's median
        update norm (:mod:`server_app.bounded_influence`, median (the smaller of two)); 0 turns
        it off. The bound used is the smaller of the two.
    cap_weight_median : float
        Cap on each reply's ``num-examples`` (its FedAvg weight) as a multiple of
        the median (the smaller of two) of the round's preflight row counts, on top of the cap
        at the node's own preflight count; 0 turns it off.
    proximal_mu : float
        FedProx's proximal weight (Li et al. 2020, Eq. 2); must be > 0 with
        ``strategy = "fedprox"``.
    fedopt_eta, fedopt_eta_l, fedopt_beta_1, fedopt_beta_2, fedopt_tau : float
        Server learning rate, client learning rate (as Flower records it),
        moment decays and adaptivity of FedAdam, FedYogi and FedAdagrad (Reddi
        et al. 2021, Alg. 2); Flower's FedAdam defaults.
    server_momentum, server_lr : float
        FedAvgM's server momentum and learning rate (Hsu et al. 2019).
    num_malicious_nodes : int
        Krum's ``f`` (Blanchard et al. 2017): nodes that may be Byzantine.
    trimmed_beta : float
        FedTrimmedAvg's fraction cut from each end, in [0, 0.5).
    dp_clipping : {"off", "fixed", "adaptive"}
        Central differential privacy on the shared tensors with Flower's
        server-side clipping wrappers (``DifferentialPrivacyServerSideFixedClipping``
        or ``...AdaptiveClipping``).
    dp_noise_multiplier : float
        Gaussian noise std as a multiple of the clipping norm (>= 0).
    dp_clipping_norm : float
        L2 clipping norm of each client's update (the initial norm for
        ``adaptive``), > 0.
    global_tie_layers : bool
        Share the Global-LiGO's q/k/v/ffn width matrices across the target's
        layers (as the Local-LiGO always does): about ``L_target`` times fewer
        width parameters to train and send.
    global_rank : int
        0: full width matrices. ``r > 0``: each Global-LiGO width matrix is
        ``E = S + U V^T`` with ``S`` (the initial selection) and ``V`` seeded,
        frozen and never sent; only ``U`` is trained and sent, and FedAvg of
        ``U`` is exactly FedAvg of ``E`` (:class:`fedgrow_core.growth.ligo.LiGO`).
        At most the intermediate hidden width.
    update_encoding : {"float32", "float16", "int8"}
        How a client sends its Global-LiGO in each growth round (modes
        ``fedgrow`` and ``fedgrow-fedft``; other modes send no Global-LiGO and
        whole target models always travel as float32 values): ``float32`` the
        values; ``float16`` / ``int8`` (default; per-row scales) the update
        ``new - received``, with error feedback kept in the client's private
        state (:mod:`fedgrow_core.update_encoding`). The server checks the
        encoded reply (names, shapes, dtypes, finite), decodes it onto what it
        sent, refuses non-finite results, and only then clips, caps and
        aggregates float32 values (central DP included).
    audit_dir : str
        If set, every client appends one JSON line per message it sends to
        ``<audit-dir>/egress-<node id>.jsonl`` (:mod:`client_app.egress_audit`).
    resume_from : str
        A run folder to continue (mode ``fedgrow``): the server reads its
        ``checkpoint.safetensors`` (written after every growth round), runs the
        remaining rounds up to ``num-server-rounds`` and writes its outputs into
        that folder; clients pick up their private state from their state folders.
        Every other setting must equal the checkpoint's.
    seed : int
    output_dir : str
    save_models : bool
        Whether each client saves its final model under ``output-dir`` (the
        comparison presets turn it off: a grown text model is ~160 MB per client).
    device : {"auto", "cpu", "cuda"}
    cache_dir : str
        Model cache ("" for the default).
    """

    mode: str = "fedgrow"
    task: str = "text"
    dataset: str = "rotten-tomatoes"
    text_column: str = "text"
    label_column: str = "label"
    image_column: str = "image"
    client_models: tuple[str, ...] = ("minilm-l3", "minilm-l6", "minilm-l6-sre")
    intermediate_shape: TransformerShape = TransformerShape(6, 384, 1536, 12)
    target_shape: TransformerShape = TransformerShape(8, 768, 1536, 12)
    num_server_rounds: int = 3
    local_steps: int = 10
    batch_size: int = 32
    max_length: int = 64
    max_train_examples: int = 0
    max_test_examples: int = 0
    eval_every: int = 1
    eval_max_examples: int = 256
    depth_init: str = "stackbert"
    depth_noise: float = 0.0
    lr_depth: float = 1e-4
    lr_width: float = 1e-4
    lr_head: float = 5e-3
    lr_schedule: str = "constant"
    warmup_steps: int = 0
    weight_decay: float = 0.0
    fraction_train: float = 1.0
    partitioner: str = "dirichlet"
    dirichlet_alpha: float = 0.5
    shards_per_partition: int = 2
    finetune_steps: int = 20
    pretrain_steps: int = 300
    patch_size: int = 7
    lr_finetune: float = 5e-5
    strategy: str = "fedavg"
    min_train_nodes: int = 1
    round_timeout: float = 3600.0
    clip_update_norm: float = 0.0
    clip_update_median: float = 2.0
    cap_weight_median: float = 3.0
    proximal_mu: float = 0.0
    fedopt_eta: float = 0.1
    fedopt_eta_l: float = 0.1
    fedopt_beta_1: float = 0.9
    fedopt_beta_2: float = 0.99
    fedopt_tau: float = 1e-3
    server_momentum: float = 0.9
    server_lr: float = 1.0
    num_malicious_nodes: int = 0
    trimmed_beta: float = 0.2
    dp_clipping: str = "off"
    dp_noise_multiplier: float = 0.0
    dp_clipping_norm: float = 1.0
    global_tie_layers: bool = False
    global_rank: int = 0
    update_encoding: str = "int8"
    audit_dir: str = ""
    resume_from: str = ""
    seed: int = 0
    output_dir: str = "outputs"
    save_models: bool = True
    device: str = "auto"
    cache_dir: str = ""

    @classmethod
    def from_flower(cls, config: Mapping[str, Any]) -> RunConfig:
        """Read and check a Flower run config (kebab-case keys; unknown keys are errors).

        Raises
        ------
        ConfigError
            Listing every bad value at once.
        """
        known = {f.name.replace("_", "-"): f for f in fields(cls)}
        problems = [f"unknown key {k!r}; known keys: {sorted(known)}" for k in config if k not in known]
        values: dict[str, Any] = {}
        for key, f in known.items():
            if key not in config:
                continue
            raw = config[key]
            default = getattr(cls, f.name)
            try:
                values[f.name] = _convert(raw, default)
            except (TypeError, ValueError) as err:
                problems.append(f"{key} = {raw!r}: {err}")
        if problems:
            raise ConfigError(problems)
        run = cls(**values)
        run.check()
        return run

    def evaluates_round(self, server_round: int) -> bool:
        """Whether ``server_round``'s replies carry a per-round ``eval-accuracy`` (see ``eval_every``)."""
        return self.eval_every > 0 and server_round % self.eval_every == 0

    def check(self) -> None:
        """Check ranges and shape compatibility; raises :class:`ConfigError` listing every problem."""
        p: list[str] = []
        _one_of(p, "mode", self.mode, MODES)
        _one_of(p, "task", self.task, TASKS)
        _one_of(p, "partitioner", self.partitioner, PARTITIONERS)
        _one_of(p, "device", self.device, DEVICES)
        _one_of(p, "depth_init", self.depth_init, ("stackbert", "interlace", "identity"))
        _one_of(p, "lr_schedule", self.lr_schedule, LR_SCHEDULES)
        _one_of(p, "dp_clipping", self.dp_clipping, DP_CLIPPING)
        _one_of(p, "update_encoding", self.update_encoding, ENCODINGS)
        nonfinite = [
            f"{f.name.replace('_', '-')} = {getattr(self, f.name)!r}: expected a finite number"
            for f in fields(self)
            if isinstance(getattr(self, f.name), float) and not math.isfinite(getattr(self, f.name))
        ]
        if nonfinite:  # the range checks below cannot be trusted on NaN
            raise ConfigError(p + nonfinite)
        for name in ("clip_update_norm", "clip_update_median", "cap_weight_median", "proximal_mu", "fedopt_tau"):
            if getattr(self, name) < 0:
                p.append(f"{name.replace('_', '-')} = {getattr(self, name)!r}: expected a number >= 0")
        if self.strategy == "fedprox" and not self.proximal_mu > 0:
            p.append("proximal-mu = 0.0: strategy 'fedprox' needs proximal-mu > 0 (with 0 it is FedAvg)")
        for name in ("fedopt_eta", "fedopt_eta_l", "server_lr"):
            if not getattr(self, name) > 0:
                p.append(f"{name.replace('_', '-')} = {getattr(self, name)!r}: expected a number > 0")
        for name in ("fedopt_beta_1", "fedopt_beta_2", "server_momentum"):
            if not 0 <= getattr(self, name) < 1:
                p.append(f"{name.replace('_', '-')} = {getattr(self, name)!r}: expected a number in [0, 1)")
        if not 0 <= self.trimmed_beta < 0.5:
            p.append(f"trimmed-beta = {self.trimmed_beta!r}: expected a number in [0, 0.5)")
        if self.num_malicious_nodes < 0:
            p.append(f"num-malicious-nodes = {self.num_malicious_nodes!r}: expected an integer >= 0")
        if self.dp_clipping != "off" and self.mode != "fedgrow":
            p.append(
                f"dp-clipping = {self.dp_clipping!r}: central DP is available in mode 'fedgrow' only, not "
                f"{self.mode!r} (the local baselines aggregate nothing; the collect phase of 'scratch-fedavg' and "
                "'fedgrow-fedft' averages whole models with no shared reference to clip updates against)"
            )
        if self.dp_noise_multiplier < 0:
            p.append(f"dp-noise-multiplier = {self.dp_noise_multiplier!r}: expected a number >= 0")
        if not self.dp_clipping_norm > 0:
            p.append(f"dp-clipping-norm = {self.dp_clipping_norm!r}: expected a number > 0")
        if not self.round_timeout > 0:
            p.append(f"round-timeout = {self.round_timeout!r}: expected a number of seconds > 0")
        if self.depth_noise < 0:
            p.append(f"depth-noise = {self.depth_noise!r}: expected a number >= 0")
        for name in (
            "num_server_rounds",
            "local_steps",
            "batch_size",
            "max_length",
            "shards_per_partition",
            "pretrain_steps",
            "patch_size",
            "min_train_nodes",
        ):
            if getattr(self, name) < 1:
                p.append(f"{name.replace('_', '-')} = {getattr(self, name)!r}: expected an integer >= 1")
        for name in (
            "max_train_examples",
            "max_test_examples",
            "eval_every",
            "eval_max_examples",
            "finetune_steps",
            "warmup_steps",
        ):
            if getattr(self, name) < 0:
                p.append(f"{name.replace('_', '-')} = {getattr(self, name)!r}: expected an integer >= 0")
        for name in ("lr_depth", "lr_width", "lr_head", "lr_finetune", "dirichlet_alpha"):
            if not getattr(self, name) > 0:
                p.append(f"{name.replace('_', '-')} = {getattr(self, name)!r}: expected a number > 0")
        if self.weight_decay < 0:
            p.append(f"weight-decay = {self.weight_decay!r}: expected a number >= 0")
        if not 0 < self.fraction_train <= 1:
            p.append(f"fraction-train = {self.fraction_train!r}: expected a number in (0, 1]")
        if not self.client_models or any(not m for m in self.client_models):
            p.append(f"client-models = {','.join(self.client_models)!r}: expected comma-separated model names")
        if self.resume_from and self.mode != "fedgrow":
            p.append(f"resume-from = {self.resume_from!r}: resuming is supported for mode 'fedgrow', not {self.mode!r}")
        if self.mode == "fedgrow-fedft" and self.finetune_steps % self.local_steps:
            p.append(
                f"finetune-steps = {self.finetune_steps!r}: mode 'fedgrow-fedft' fine-tunes in federated rounds of "
                f"local-steps = {self.local_steps}, so finetune-steps must be a multiple of it"
            )
        inter, target = self.intermediate_shape, self.target_shape
        shrink = [
            f"{n} {getattr(inter, n)} > {getattr(target, n)}"
            for n in ("layers", "hidden", "ffn", "heads")
            if getattr(inter, n) > getattr(target, n)
        ]
        if inter.head_dim > target.head_dim:
            shrink.append(f"head_dim {inter.head_dim} > {target.head_dim}")
        if shrink:
            p.append(f"intermediate-shape {inter} does not fit in target-shape {target}: {', '.join(shrink)}")
        self._check_transport(p)
        if p:
            raise ConfigError(p)

    def _check_transport(self, p: list[str]) -> None:
        """The Global-LiGO's size and transport options fit each other and the mode."""
        if not 0 <= self.global_rank <= self.intermediate_shape.hidden:
            p.append(
                f"global-rank = {self.global_rank!r}: expected an integer in [0, {self.intermediate_shape.hidden}] "
                "(0: full width matrices; at most the intermediate hidden width)"
            )
        shares_global = ("fedgrow", "fedgrow-fedft")
        if (self.global_tie_layers or self.global_rank) and self.mode not in shares_global:
            p.append(
                f"global-tie-layers = {self.global_tie_layers}, global-rank = {self.global_rank}: these shape the "
                f"Global-LiGO, which mode {self.mode!r} does not have (modes {list(shares_global)})"
            )


def pyproject_config(path: str | Path = "pyproject.toml", overrides: Iterable[str] = ()) -> dict[str, Any]:
    """``[tool.flwr.app.config]`` of a pyproject file, with ``key=value`` overrides as ``flwr run --run-config``.

    Values are TOML literals (``lr-width=1e-3``, ``strategy="fedadam"``). Raises
    ``ValueError`` for an override without ``=``.
    """
    config = tomllib.loads(Path(path).read_text())["tool"]["flwr"]["app"]["config"]
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"override must be key=value, got {item!r}")
        config[key.strip()] = tomllib.loads(f"v = {value}")["v"]
    return config


def _one_of(problems: list[str], name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        problems.append(f"{name.replace('_', '-')} = {value!r}: expected one of {list(allowed)}")


def _convert(raw: Any, default: Any) -> Any:
    if isinstance(default, TransformerShape):
        return parse_shape(raw)
    if isinstance(default, tuple):
        if not isinstance(raw, str):
            raise TypeError("expected a comma-separated string")
        return tuple(s.strip() for s in raw.split(","))
    if isinstance(default, bool):
        if not isinstance(raw, bool):
            raise TypeError("expected true or false")
        return raw
    if isinstance(default, int):
        if isinstance(raw, bool) or not isinstance(raw, int):
            raise TypeError("expected an integer")
        return raw
    if isinstance(default, float):
        if isinstance(raw, bool) or not isinstance(raw, (int, float)):
            raise TypeError("expected a number")
        return float(raw)
    if not isinstance(raw, str):
        raise TypeError("expected a string")
    return raw
