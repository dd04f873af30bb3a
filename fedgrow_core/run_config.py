"""The run configuration of a Fed-Grow run, checked before any training starts.

Flower passes ``[tool.flwr.app.config]`` (with ``--run-config`` overrides) as a
flat dict of scalars with kebab-case keys. :class:`RunConfig` declares every key
once (type, range or choices, default, description); :meth:`RunConfig.from_flower`
reads the dict and raises one :class:`ConfigError` that lists every problem
found, each naming the key, the bad value and what was expected.
:func:`config_reference_markdown` renders the declarations as ``docs/config.md``::

    python -m fedgrow_core.run_config --markdown > docs/config.md
"""

from __future__ import annotations

import argparse
import json
import tomllib
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, get_args, get_origin

import click
from flwr.common.config import flatten_dict, parse_config_args
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PlainValidator,
    ValidationError,
)
from pydantic.fields import FieldInfo

from fedgrow_core.data.partitions import PARTITIONERS
from fedgrow_core.growth.shapes import TransformerShape
from fedgrow_core.modes import get_mode, mode_names
from fedgrow_core.update_encoding import ENCODINGS

TASKS = ("text", "image")
DP_CLIPPING = ("off", "fixed", "adaptive")
LR_SCHEDULES = ("cosine", "linear", "constant")
DEPTH_INITS = ("stackbert", "interlace", "identity")
#: Run-config keys (attribute names) that may differ between a run and its resumption.
RESUMABLE_CHANGES = frozenset({"num_server_rounds", "resume_from", "round_timeout", "audit_dir", "device"})
#: A device name: ``auto``, ``cpu``, ``cuda`` or ``cuda:<index>``.
DEVICE_PATTERN = r"^(auto|cpu|cuda(:[0-9]+)?)$"
SHAPE_FORMAT = "'LxDxFxH' (layers x hidden x ffn x heads, e.g. '12x512x2048x16')"


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
        raise ValueError(f"expected {SHAPE_FORMAT}, got {text!r}")
    return TransformerShape(*numbers)


def _shape(value: Any) -> TransformerShape:
    return value if isinstance(value, TransformerShape) else parse_shape(value)


def _model_names(value: Any) -> tuple[str, ...]:
    names = tuple(s.strip() for s in value.split(",")) if isinstance(value, str) else value
    if not isinstance(names, tuple) or not names or not all(isinstance(n, str) and n for n in names):
        raise ValueError("expected comma-separated model names")
    return names


#: Where the ServerApp logs round metrics as the run goes (``trackers``).
TRACKERS = ("tensorboard", "mlflow")


def _trackers(value: Any) -> tuple[str, ...]:
    names = tuple(s.strip() for s in value.split(",") if s.strip()) if isinstance(value, str) else value
    if not isinstance(names, tuple) or any(n not in (*TRACKERS, "none") for n in names):
        raise ValueError(f"expected comma-separated names from {[*TRACKERS, 'none']}")
    return tuple(n for n in names if n != "none")


def _mode_name(value: Any) -> str:
    if not isinstance(value, str) or value not in mode_names():
        raise ValueError(f"expected one of {list(mode_names())} (the registered modes)")
    return value


Shape = Annotated[TransformerShape, PlainValidator(_shape)]
ModeName = Annotated[str, PlainValidator(_mode_name)]
ModelNames = Annotated[tuple[str, ...], PlainValidator(_model_names)]
Trackers = Annotated[tuple[str, ...], PlainValidator(_trackers)]


def _key(default: Any, description: str, requires: str = "", expected: str = "", **bounds: Any) -> Any:
    """One run-config key: its default, one-line description, bounds, and checks against other keys.

    ``expected`` words what a key accepts where its type and bounds do not (a ``pattern``).
    """
    extra = {"requires": requires, "expected": expected}
    return Field(default, description=description, json_schema_extra=extra, **bounds)


class RunConfig(BaseModel):
    """Every knob of a Fed-Grow run (``[tool.flwr.app.config]``, kebab-case keys).

    Each attribute is the snake_case name of a Flower key (``local_steps`` for
    ``local-steps``); its type, range, default and description are declared
    below and rendered in ``docs/config.md``. Built from keyword arguments (by
    attribute name or key) or :meth:`from_flower`, a config is checked whole;
    it is frozen and hashable. ``model_copy(update=...)`` skips the checks
    (:meth:`check` runs them).

    Raises
    ------
    ConfigError
        From the constructor, listing every bad value at once.
    """

    model_config = ConfigDict(
        frozen=True,
        strict=True,  # no "32" -> 32 or True -> 1: Flower passes typed TOML values
        extra="forbid",
        allow_inf_nan=False,
        validate_default=True,  # the checks against other keys also run on defaults
        alias_generator=lambda name: name.replace("_", "-"),
        validate_by_name=True,
        validate_by_alias=True,
    )

    mode: ModeName = _key(
        "fedgrow",
        "Fed-Grow or a baseline it is compared with; every mode gives each client "
        "`num-server-rounds * local-steps + finetune-steps` optimiser steps on the same rows",
    )
    task: Literal[TASKS] = _key("text", "Kind of rows and models; must match the dataset")
    dataset: str = _key(
        "rotten-tomatoes",
        "A `load_data_source` source: `rotten-tomatoes`, `mnist`, `digits`, a `.csv`/`.parquet`/`.npz` file, "
        "a `save_to_disk` folder or a `datasets` hub name; a node naming its own `dataset` uses that, and a "
        "`strict` node accepts only the built-in names",
    )
    text_column: str = _key("text", "Text column of a generic source")
    label_column: str = _key("label", "Label column of a generic source")
    image_column: str = _key("image", "Image column (or `.npz` array) of a generic source")
    client_models: ModelNames = _key(
        ("minilm-l3", "minilm-l6", "minilm-l6-sre"),
        "One small model per partition, cycling: zoo names, folders, hub ids, or `vit:LxD` (pre-trained on the "
        "client's own rows first)",
    )
    intermediate_shape: Shape = _key(
        TransformerShape(7, 480, 1536, 12),
        "Shape of the Global-LiGO's intermediate model, shared by every client; each client's small model must "
        "grow into it",
    )
    target_shape: Shape = _key(
        TransformerShape(8, 768, 1536, 12),
        "Shape of the grown model",
        requires="every dimension, heads and head dim >= `intermediate-shape`'s",
    )
    num_server_rounds: int = _key(3, "Growth rounds", ge=1)
    local_steps: int = _key(10, "Optimiser steps per client per round", ge=1)
    batch_size: int = _key(32, "Rows per optimiser step", ge=1)
    max_length: int = _key(64, "Token truncation of text rows", ge=1)
    max_train_examples: int = _key(0, "Cap on each client's training rows (0: no cap)", ge=0)
    max_test_examples: int = _key(
        0, "Cap on each client's test rows (0: no cap); every evaluation of a run uses the same capped rows", ge=0
    )
    eval_every: int = _key(
        1,
        "Rounds between evaluations of each client's current model (the accuracy-per-round curves; 0: none); "
        "the final evaluation always runs, on every test row",
        ge=0,
    )
    eval_max_examples: int = _key(
        256, "Test rows of a per-round evaluation: the first rows of the client's test split (0: all)", ge=0
    )
    depth_init: Literal[DEPTH_INITS] = _key(
        "stackbert",
        "Depth initialisation of both operators (LiGO reference code's names); `identity`: new layers start with "
        "zero residual-branch outputs, exact for pre-LN ViTs",
    )
    depth_noise: float = _key(0.0, "`U[0, depth-noise)` noise added to the depth coefficients", ge=0)
    lr_depth: float = _key(1e-4, "Peak AdamW learning rate of the depth coefficients in the growth phase", gt=0)
    lr_width: float = _key(1e-4, "Peak AdamW learning rate of the width matrices `E` in the growth phase", gt=0)
    lr_head: float = _key(
        5e-3,
        "Peak AdamW learning rate of the task head in the growth phase, and its rate in the rounds of the modes "
        "that train a whole model (`small-only`, `scratch-fedavg`)",
        gt=0,
    )
    lr_global_depth: float = _key(
        1e-4, "Peak AdamW learning rate of the Global-LiGO's depth coefficients (`lr-depth`: the Local-LiGO's)", gt=0
    )
    lr_global_width: float = _key(
        1e-4,
        "Peak AdamW learning rate of the Global-LiGO's width matrices and split weights (`lr-width`: the Local-LiGO's)",
        gt=0,
    )
    head_warmup_steps: int = _key(
        0,
        "First growth steps of each client in which only the task head trains (the operators' rates are 0), so "
        "that the operators follow a loss read through a fitted head; at most `num-server-rounds * local-steps`",
        ge=0,
    )
    lr_schedule: Literal[LR_SCHEDULES] = _key(
        "constant",
        "Schedule of the growth learning rates over the growth phase's `num-server-rounds * local-steps` "
        "steps (`transformers`' schedules), after the warm-up",
    )
    warmup_steps: int = _key(0, "Linear warm-up steps of the growth learning rates", ge=0)
    weight_decay: float = _key(
        0.0,
        "AdamW decoupled weight decay of the task head in the growth phase and of every whole model trained; "
        "never of the operators, whose selections and depth coefficients it would pull towards 0",
        ge=0,
    )
    fraction_train: float = _key(1.0, "Fraction of the nodes sampled per round", gt=0, le=1)
    partitioner: Literal[PARTITIONERS] = _key("dirichlet", "flwr-datasets partitioner of the rows among the clients")
    dirichlet_alpha: float = _key(0.5, "Concentration of the `dirichlet` partitioner (smaller: more skewed)", gt=0)
    shards_per_partition: int = _key(2, "Label shards per client of the `shards` partitioner", ge=1)
    finetune_steps: int = _key(
        20,
        "Local fine-tuning steps of the final model",
        ge=0,
    )
    pretrain_steps: int = _key(300, "Pre-training steps of a `vit:LxD` client model on the client's own rows", ge=1)
    patch_size: int = _key(7, "Patch side in pixels of `vit:LxD` client models", ge=1)
    lr_finetune: float = _key(5e-5, "Learning rate of the fine-tuning phase and of mode `small-only`'s rounds", gt=0)
    lr_scratch: float = _key(
        1e-4,
        "Learning rate of mode `scratch-fedavg` (rounds and final fine-tuning): a target model trained from a "
        "random initialisation needs a pre-training rate, not a fine-tuning one",
        gt=0,
    )
    strategy: str = _key(
        "geometric-median",
        "`geometric-median` (RFA; what each strategy tolerates: docs/reliability-and-privacy.md), `fedavg`, "
        "`fedprox`, `fedadam`, `fedyogi`, `fedadagrad`, `fedavgm`, `fedmedian`, `fedtrimmedavg`, `krum`, "
        "`multikrum`, `bulyan`, `centred-clipping`, or a strategy class as `package.module:Class`",
    )
    min_train_nodes: int = _key(
        1,
        "Flower's minimum sample size per round, and the fewest usable replies for a round to aggregate (else "
        "the Global-LiGO is kept)",
        ge=1,
    )
    round_timeout: float = _key(
        3600.0,
        "Seconds the server waits for a round's replies (later ones count as missing), and at most for "
        "`min-train-nodes` online nodes before a round",
        gt=0,
    )
    clip_update_norm: float = _key(
        0.0, "L2 bound on each reply's update of the shared tensors, applied before aggregation (0: off)", ge=0
    )
    clip_update_median: float = _key(
        2.0,
        "Bound on each reply's update norm as a multiple of the round's median update norm (0: off); the smaller "
        "of the two bounds applies",
        ge=0,
    )
    cap_weight_median: float = _key(
        1.0,
        "Cap on each reply's `num-examples` (its aggregation weight) as a multiple of the median preflight rows of "
        "the round's nodes, on top of the cap at its node's own preflight rows (0: off)",
        ge=0,
    )
    proximal_mu: float = _key(
        0.0,
        "FedProx's proximal weight (Li et al. 2020), applied by each client to its Global-LiGO",
        requires='> 0 with `strategy = "fedprox"`',
        ge=0,
        le=1000.0,
    )
    fedopt_eta: float = _key(0.1, "Server learning rate of FedAdam, FedYogi and FedAdagrad (Reddi et al. 2021)", gt=0)
    fedopt_eta_l: float = _key(
        0.1, "Client learning rate of FedAdam, FedYogi and FedAdagrad, as Flower records it", gt=0
    )
    fedopt_beta_1: float = _key(0.9, "First-moment decay of FedAdam and FedYogi", ge=0, lt=1)
    fedopt_beta_2: float = _key(0.99, "Second-moment decay of FedAdam and FedYogi", ge=0, lt=1)
    fedopt_tau: float = _key(1e-3, "Adaptivity (tau) of FedAdam, FedYogi and FedAdagrad", ge=0)
    server_momentum: float = _key(0.9, "FedAvgM's server momentum (Hsu et al. 2019)", ge=0, lt=1)
    server_lr: float = _key(1.0, "FedAvgM's server learning rate", gt=0)
    num_malicious_nodes: int = _key(
        0, "`f` of Krum, MultiKrum and Bulyan: nodes that may be Byzantine (Blanchard et al. 2017)", ge=0
    )
    multikrum_select: int = _key(1, "MultiKrum's `m`: replies averaged after Krum scoring (1 is Krum)", ge=1)
    centred_clip_tau: float = _key(
        0.0,
        "Centred clipping's radius `tau` (L2; Karimireddy et al. 2021); 0: the median distance of the round's "
        "updates to the previous aggregate update",
        ge=0,
    )
    trimmed_beta: float = _key(0.2, "FedTrimmedAvg's fraction cut from each end", ge=0, lt=0.5)
    dp_clipping: Literal[DP_CLIPPING] = _key(
        "off",
        "Central DP on the shared tensors with Flower's server-side `fixed` or `adaptive` clipping wrappers "
        "(strategy `fedavg` or `fedprox`)",
        requires="`off` unless the mode allows central DP (`fedgrow`)",
    )
    dp_noise_multiplier: float = _key(0.0, "Gaussian noise std as a multiple of the clipping norm", ge=0)
    dp_clipping_norm: float = _key(
        1.0, "L2 clipping norm of each client's update (the initial norm for `adaptive`)", gt=0
    )
    global_tie_layers: bool = _key(
        False,
        "Share the Global-LiGO's q/k/v/FFN width matrices across the target's layers (about `L_target` times fewer "
        "width parameters to train and send)",
        requires="`false` unless the mode has a Global-LiGO",
    )
    global_rank: int = _key(
        0,
        "0: full Global-LiGO width matrices; `r > 0`: each is `E = S + U V^T` with `S` (the initial selection) "
        "and `V` seeded, frozen and never sent; only `U` is trained and sent",
        requires="[0, hidden of `intermediate-shape`]; 0 unless the mode has a Global-LiGO",
    )
    update_encoding: Literal[ENCODINGS] = _key(
        "int8",
        "What a client sends of its Global-LiGO each growth round: `float32` the values; `float16` or `int8` "
        "(per-row scales) the update `new - received`, with error feedback in its private state",
    )
    audit_dir: str = _key(
        "",
        "If set, every client appends one JSON line per message it sends to `<audit-dir>/egress-<node id>.jsonl` "
        "(a node's own `audit-dir` node config wins; a node under the `strict` node policy, the default of a "
        "deployed SuperNode, uses only its own)",
    )
    resume_from: str = _key(
        "",
        "A run folder to continue from its `checkpoint.safetensors`; every other key but `num-server-rounds`, "
        "`round-timeout`, `audit-dir` and `device` must equal the checkpoint's",
        requires="empty unless the mode is checkpointed (`fedgrow`)",
    )
    seed: int = _key(0, "Seeds partitions, operators and data order")
    output_dir: str = _key(
        "outputs",
        "Folder of the run folders (and, in simulation, of the client folders; a deployed SuperNode writes only "
        "under its own node-config folders)",
    )
    save_models: bool = _key(
        True,
        "Whether each client saves its final model in its node's folder (`<output-dir>/clients/partition-<id>/"
        "models/<run folder name>/`)",
    )
    trackers: Trackers = _key(
        "tensorboard",
        "Where the ServerApp logs each round's metrics as the run goes, comma-separated: `tensorboard` (event "
        "files in the run folder's `tensorboard/`), `mlflow` (the MLflow tracking URI in `MLFLOW_TRACKING_URI`, "
        "else `./mlruns`; needs `pip install mlflow`) or `none`",
    )
    device: str = _key(
        "auto",
        "`auto` (CUDA when available), `cpu`, `cuda` or `cuda:N` (bf16 autocast on CUDA) of simulated nodes; "
        "a node config's `device` wins, and a strict (deployed) node without one uses `auto`",
        expected="'auto', 'cpu', 'cuda' or 'cuda:<index>'",
        pattern=DEVICE_PATTERN,
    )
    cache_dir: str = _key(
        "",
        "Cache of converted and pre-trained small models (empty: `~/.cache/fedgrow`); a node's own `cache-dir` "
        "wins, and a `strict` node never uses this one",
    )

    def __init__(self, **values: Any) -> None:
        """Check ``values`` (by attribute name or key); raises :class:`ConfigError` listing every bad value."""
        try:
            super().__init__(**values)
        except ValidationError as err:
            # every bad key at once: the checks between keys still run on the keys that are good
            failed = {_field_name(e["loc"][0]) for e in err.errors()}
            problems = [_problem(e) for e in err.errors()]
            try:
                super().__init__(**{k: v for k, v in values.items() if _field_name(k) not in failed})
            except ValidationError:
                raise ConfigError(problems) from None
            raise ConfigError(problems + self._cross_key_problems(skip=failed)) from None
        problems = self._cross_key_problems()
        if problems:
            raise ConfigError(problems)

    @classmethod
    def from_flower(cls, config: Mapping[str, Any]) -> RunConfig:
        """Read and check a Flower run config (kebab-case keys; unknown keys are errors).

        Parameters
        ----------
        config : mapping
            ``Context.run_config``: keys of ``[tool.flwr.app.config]`` to TOML scalars;
            a missing key takes its default.

        Returns
        -------
        RunConfig
            The checked config.

        Raises
        ------
        ConfigError
            Listing every bad value at once.
        """
        # attribute names are keys of the constructor, not of a Flower config
        misnamed = [k for k in config if k in cls.model_fields and k != cls.model_fields[k].alias]
        problems = [_unknown(k) for k in misnamed]
        try:
            run = cls(**{k: v for k, v in config.items() if k not in misnamed})
        except ConfigError as err:
            problems += err.problems
        if problems:
            raise ConfigError(problems)
        return run

    def to_flower(self) -> dict[str, bool | int | float | str]:
        """The Flower run config of this run: kebab-case keys and TOML scalars (inverse of :meth:`from_flower`)."""
        return {field.alias: _flower_value(getattr(self, name)) for name, field in type(self).model_fields.items()}

    def evaluates_round(self, server_round: int) -> bool:
        """Whether ``server_round``'s replies carry a per-round ``eval-accuracy`` (see ``eval_every``)."""
        return self.eval_every > 0 and server_round % self.eval_every == 0

    def check(self) -> None:
        """Check every value again (for a copy made with ``model_copy(update=...)``, which skips the checks).

        Raises
        ------
        ConfigError
            Listing every bad value at once.
        """
        type(self)(**dict(self))

    def _cross_key_problems(self, skip: frozenset[str] | set[str] = frozenset()) -> list[str]:
        """Problems between keys, each ``key = value: why``; read after every key is checked on its own.

        So no check depends on the order in which the keys are declared. A check
        that reads a key in ``skip`` (attribute names of keys that failed their
        own check, replaced by defaults) is left out.
        """
        problems = []
        reads = lambda *names: not skip.intersection(names)  # noqa: E731
        inter, target = self.intermediate_shape, self.target_shape
        names = ("layers", "hidden", "ffn", "heads", "head_dim")
        shrink = [
            f"{n} {getattr(inter, n)} > {getattr(target, n)}" for n in names if getattr(inter, n) > getattr(target, n)
        ]
        if shrink and reads("intermediate_shape", "target_shape"):
            problems.append(
                f"target-shape = {_flower_value(target)!r}: intermediate-shape {_flower_value(inter)} does not fit "
                f"in target-shape: {', '.join(shrink)}"
            )
        growth_steps = self.num_server_rounds * self.local_steps
        if self.head_warmup_steps > growth_steps and reads("head_warmup_steps", "num_server_rounds", "local_steps"):
            problems.append(
                f"head-warmup-steps = {self.head_warmup_steps}: {self.head_warmup_steps} head warm-up steps, but the "
                f"growth phase has num-server-rounds * local-steps = {growth_steps} steps"
            )
        if self.strategy == "fedprox" and not self.proximal_mu > 0 and reads("strategy", "proximal_mu"):
            problems.append(
                f"proximal-mu = {self.proximal_mu!r}: strategy 'fedprox' needs proximal-mu > 0 (with 0 it is FedAvg)"
            )
        if not 0 <= self.global_rank <= inter.hidden and reads("global_rank", "intermediate_shape"):
            problems.append(
                f"global-rank = {self.global_rank}: expected an integer in [0, {inter.hidden}] (0: full width "
                "matrices; at most the intermediate hidden width)"
            )
        mode_reads = ("mode", "dp_clipping", "resume_from", "global_tie_layers", "global_rank")
        return problems + (get_mode(self.mode).config_problems(self) if reads(*mode_reads) else [])


def _field_name(key: Any) -> Any:
    """The attribute name of a key given by attribute name or in Flower's kebab case (unknown keys unchanged)."""
    if key in RunConfig.model_fields:
        return key
    return next((name for name, f in RunConfig.model_fields.items() if f.alias == key), key)


def _unknown(key: str) -> str:
    return f"unknown key {key!r}; known keys: {sorted(f.alias for f in RunConfig.model_fields.values())}"


def _problem(error: Any) -> str:
    """``key = value: expected ...`` for one pydantic error (``key`` in Flower's kebab case)."""
    name = error["loc"][0]
    if error["type"] == "extra_forbidden":
        return _unknown(name)
    field = RunConfig.model_fields.get(name) or next(f for f in RunConfig.model_fields.values() if f.alias == name)
    if error["type"] == "value_error":
        why = str(error["ctx"]["error"])
    elif error["type"] == "finite_number":
        why = "expected a finite number"
    else:
        why = f"expected {_expected(field)}"
    return f"{field.alias} = {_flower_value(error['input'])!r}: {why}"


def _expected(field: FieldInfo) -> str:
    """What a key accepts in words: ``an integer >= 1``, ``one of [...]``, ..."""
    kind = field.annotation
    if field.json_schema_extra["expected"]:
        return field.json_schema_extra["expected"]
    if get_origin(kind) is Literal:
        return f"one of {list(get_args(kind))}"
    nouns = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
    if kind is TransformerShape:
        return SHAPE_FORMAT
    if kind not in nouns:
        return "comma-separated model names"
    return " ".join(filter(None, [nouns[kind], _bounds(field)]))


def _bounds(field: FieldInfo) -> str:
    """A key's range: ``>= 1``, ``> 0``, ``in (0, 1]``, or empty."""
    ops = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<"}
    bound = {op: getattr(m, op) for m in field.metadata for op in ops if hasattr(m, op)}
    if len(bound) == 2:  # a lower and an upper bound
        (low, a), (high, b) = sorted(bound.items())
        return f"in {'[' if low == 'ge' else '('}{a}, {b}{']' if high == 'le' else ')'}"
    return " ".join(f"{ops[op]} {value}" for op, value in bound.items())


def _flower_value(value: Any) -> Any:
    """The Flower (TOML scalar) form of a value: shapes as ``"LxDxFxH"``, model lists comma-joined."""
    if isinstance(value, TransformerShape):
        return f"{value.layers}x{value.hidden}x{value.ffn}x{value.heads}"
    if isinstance(value, tuple):
        return ",".join(map(str, value))
    return value


def _toml(value: bool | int | float | str) -> str:
    """A TOML literal: ``true``, ``3``, ``0.0001``, ``"fedavg"``."""
    return json.dumps(value) if isinstance(value, (bool, str)) else repr(value)


def parse_overrides(items: Iterable[str], usage: str = "override must be key=value") -> dict[str, Any]:
    """``key=value`` run-config overrides, parsed by Flower's own ``--run-config`` parser.

    Values are TOML literals (``lr-width=1e-3``, ``strategy="fedadam"``); an item
    may hold several space-separated pairs, as ``flwr run --run-config`` accepts.

    Parameters
    ----------
    items : iterable of str
        The overrides, applied in order (a later key wins).
    usage : str
        Start of the error message for a malformed item.

    Returns
    -------
    dict
        Flat (dotted) keys to values.

    Raises
    ------
    ValueError
        If an item holds no ``key=value`` pair or its value is not a TOML literal.
    """
    overrides: dict[str, Any] = {}
    for item in items:
        try:
            parsed = parse_config_args([item]) if "=" in item else {}
        except click.ClickException as err:
            raise ValueError(f"{usage} with a TOML literal value, got {item!r}") from err
        if not parsed:
            raise ValueError(f"{usage}, got {item!r}")
        overrides.update(parsed)
    return overrides


def pyproject_config(path: str | Path = "pyproject.toml", overrides: Iterable[str] = ()) -> dict[str, Any]:
    """``[tool.flwr.app.config]`` of a pyproject file, with ``key=value`` overrides as ``flwr run --run-config``.

    Values are TOML literals (``lr-width=1e-3``, ``strategy="fedadam"``), parsed
    by :func:`parse_overrides`; keys are not checked here (:meth:`RunConfig.from_flower` does).

    Raises
    ------
    ValueError
        For an override without ``=`` or whose value is not a TOML literal.
    """
    config = tomllib.loads(Path(path).read_text())["tool"]["flwr"]["app"]["config"]
    return {**flatten_dict(config), **parse_overrides(overrides)}


_REFERENCE_INTRO = """\
# Run configuration reference

<!-- Generated from fedgrow_core/run_config.py by
     `python -m fedgrow_core.run_config --markdown > docs/config.md`; do not edit by hand
     (tests/test_run_config.py checks that this file is current). -->

Every key of `[tool.flwr.app.config]` in `pyproject.toml`, with the value a run
uses when it does not set the key. Override keys for one run with

```sh
make run RUN_CONFIG='num-server-rounds=5'
make run RUN_CONFIG=presets/image.toml          # a TOML file of keys
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1   # flwr run itself: use this environment's packages
flwr run . --stream --federation-config flwr_home/federation.toml --run-config 'strategy="fedadam" seed=3'
flwr run . --stream --federation-config flwr_home/federation.toml --run-config presets/image.toml
```

Values are TOML literals: strings in double quotes (`strategy="fedadam"`),
integers without a decimal point (`seed=3`), numbers as written (`lr-width=1e-3`;
an integer is a number too), booleans `true` or `false`. Shapes are strings
`"LxDxFxH"`: layers x hidden x FFN x heads, e.g. `target-shape="8x768x1536x12"`.
Numbers must be finite. The whole config is checked before any training starts:
an unknown key, a value of the wrong type or out of range, or keys that do not
fit each other stop the run with one error that lists every problem.

"""


def config_reference_markdown() -> str:
    """The run-config reference (``docs/config.md``): an intro and one table row per key.

    Returns
    -------
    str
        Markdown: key, type, default, allowed values and description of every key.
    """
    kinds = {bool: "boolean", int: "integer", float: "number", str: "string", TransformerShape: "shape"}
    rows = ["| key | type | default | allowed | description |", "| --- | --- | --- | --- | --- |"]
    for name, field in RunConfig.model_fields.items():
        kind = field.annotation
        if name == "mode":  # the registry's modes, not a fixed list
            kind, allowed = "string", ", ".join(f"`{m}`" for m in mode_names())
        elif get_origin(kind) is Literal:
            kind, allowed = "string", ", ".join(f"`{c}`" for c in get_args(kind))
        else:
            kind = kinds.get(kind, "string (comma-separated)")
            allowed = field.json_schema_extra["expected"] or _bounds(field).removeprefix("in ")
        allowed = "; ".join(filter(None, [allowed, field.json_schema_extra["requires"]]))
        default = _toml(_flower_value(field.default))
        rows.append(f"| `{field.alias}` | {kind} | `{default}` | {allowed} | {field.description} |")
    return _REFERENCE_INTRO + "\n".join(rows) + "\n"


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Print the run-config reference.")
    parser.add_argument("--markdown", action="store_true", required=True, help="as Markdown (docs/config.md)")
    parser.parse_args()
    print(config_reference_markdown(), end="")
