"""A node's policy: what the organisation behind a SuperNode lets a run ask of it.

The run config comes from whoever starts the run, the server side. The node
config (a SuperNode's ``--node-config``) belongs to the organisation that runs
the node. :class:`NodePolicy` reads the node config and decides, for every
message, what the run config may choose:

* the modes the node serves (``allowed-modes``);
* its data (``dataset`` and its columns, or the shared sources the run may
  name, ``allowed-datasets``) and its small model (``model``);
* its folders (``output-dir``, ``state-dir``, ``audit-dir``, ``cache-dir``);
* its hardware (``device``: ``cpu``, ``cuda`` or ``cuda:N``; a strict node never takes the run config's);
* caps on the work one message may ask (``max-local-steps``,
  ``max-finetune-steps``, ``max-pretrain-steps``, ``max-batch-size``,
  ``max-sequence-length``, ``max-model-params``, ``max-message-seconds``);
* how many rounds and final phases it serves per run (``max-rounds``,
  ``max-final-phases``), the fewest test rows an evaluation may use
  (``min-eval-rows``), and the largest value it accepts in a received tensor
  (``max-received-abs``).

Two profiles set the defaults (``node-policy``):

* ``strict``, the default of a deployed SuperNode: mode ``fedgrow`` only; the
  node reads only its own data file or a built-in named source, and only its
  own model or a zoo model; it writes only under its own folders (default
  ``./fedgrow-node`` under its working folder), whatever ``output-dir``,
  ``dataset``, ``cache-dir`` or ``audit-dir`` the run config gives; the caps are
  set; one final phase per run.
* ``open``, the default inside Flower's simulation engine, where every node is
  a process of the user who starts the run: every mode, the run config's data,
  models and folders, no caps but the bound on received values.

Any key set in the node config overrides its profile's default. The policy is
checked on every message before any work (:meth:`NodePolicy.problems`);
``docs/reliability-and-privacy.md`` lists what a server can and cannot make a
node do.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from fedgrow_core.data.sources import BUILTIN_SOURCES
from fedgrow_core.growth.shapes import TransformerShape
from fedgrow_core.modes import mode_names
from fedgrow_core.run_config import DEVICE_PATTERN, RESUMABLE_CHANGES, RunConfig
from fedgrow_core.zoo.registry import zoo_models
from fedgrow_core.zoo.vit_pretrain import VitSpec

PROFILES = ("strict", "open")
#: The folder a strict node writes under when its node config names none (relative to its working folder).
DEFAULT_NODE_FOLDER = "fedgrow-node"

#: Defaults of each profile for the keys whose default depends on it.
_PROFILE_DEFAULTS: dict[str, dict[str, Any]] = {
    "strict": {
        "allowed_modes": "fedgrow",
        "max_local_steps": 1000,
        "max_finetune_steps": 1000,
        "max_pretrain_steps": 5000,
        "max_batch_size": 256,
        "max_sequence_length": 512,
        "max_batch_tokens": 65536,
        "max_model_params": 200_000_000,
        "max_message_seconds": 3600.0,
        "max_final_phases": 1,
        "max_rounds": 200,
        "min_eval_rows": 32,
        "allow_resume": False,
    },
    "open": {
        "allowed_modes": "*",
        "max_local_steps": 0,
        "max_finetune_steps": 0,
        "max_pretrain_steps": 0,
        "max_batch_size": 0,
        "max_sequence_length": 0,
        "max_batch_tokens": 0,
        "max_model_params": 0,
        "max_message_seconds": 0.0,
        "max_final_phases": 0,
        "max_rounds": 0,
        "min_eval_rows": 0,
        "allow_resume": True,
    },
}


class NodePolicyError(ValueError):
    """A node config that is not a valid policy, or a run config outside the policy; ``problems`` lists each."""

    def __init__(self, problems: list[str], what: str = "refused by this node's policy"):
        self.problems = problems
        super().__init__(f"{what}: " + "; ".join(problems))


def _cap(description: str) -> Any:
    return Field(description=description, ge=0)


class NodePolicy(BaseModel):
    """What one node lets a run ask of it; built from its node config by :meth:`from_node_config`.

    Attributes are the snake_case names of the node-config keys (``max_local_steps``
    for ``max-local-steps``). A cap of 0 means no cap.

    Attributes
    ----------
    node_policy : {"strict", "open"}
        The profile that set the defaults.
    partition_id, num_partitions : int
        Which partition of the run's dataset is this node's (Flower's keys).
    allowed_modes : str
        Comma-separated modes the node serves; ``*`` (the ``open`` profile's): every registered mode.
    model, dataset : str
        The node's own small model and data file ("" : the run config's, where allowed).
    allowed_datasets : str
        Comma-separated data sources besides the built-in ones that the run config's ``dataset`` may name
        (a file the organisations share, partitioned by ``partition-id``); ``strict`` only.
    text_column, label_column, image_column : str
        Columns of the node's own data ("" : the run config's in ``open``, the
        canonical ``text``/``label``/``image`` in ``strict``).
    output_dir, state_dir, audit_dir, cache_dir : str
        The node's folders ("" : its profile's default, see :meth:`node_folder`).
    device : str
        The node's torch device (``auto``, ``cpu``, ``cuda``, ``cuda:N``, counting the GPUs its process
        sees). "" : ``auto`` in ``strict`` (the node's hardware is not the server's to pick), the run
        config's ``device`` in ``open``.
    max_local_steps, max_finetune_steps, max_pretrain_steps : int
        Optimiser steps one message may ask (steps).
    max_batch_size, max_sequence_length : int
        Rows per step and tokens per row one message may ask.
    max_batch_tokens : int
        ``batch-size * max-length`` of a text run (activation memory grows with it); image patches are
        bounded by ``max-batch-size`` and ``max-model-params`` only.
    max_model_params : int
        Transformer-body weights (``L * (4 D^2 + 2 D F)``) of a model the run asks the node to build.
    max_message_seconds : float
        Seconds of training and evaluation one message may take (checked each step).
    max_final_phases : int
        Final phases served per run.
    max_rounds : int
        Training rounds served per run (``num-server-rounds`` and each message's ``server-round``).
    min_eval_rows : int
        Fewest test rows an evaluation may use (``eval-max-examples``, ``max-test-examples``, and the node's
        own test split), so that no reported accuracy is about one or a few private rows.
    allow_resume : bool
        Whether a new run may resume the private state that a run of the same tag and run config left
        (``resumed-after``, the server's ``resume-from``); each resumption is a new run with its own rounds
        and final phase.
    max_received_abs : float
        Largest ``|value|`` accepted in a received tensor (the Global-LiGO or a target model).
    """

    model_config = ConfigDict(
        frozen=True,
        strict=True,
        extra="forbid",
        allow_inf_nan=False,
        alias_generator=lambda name: name.replace("_", "-"),
        validate_by_name=True,
        validate_by_alias=True,
    )

    node_policy: Literal[PROFILES] = "strict"
    partition_id: int = Field(0, ge=0)
    num_partitions: int = Field(1, ge=1)
    allowed_modes: str = ""
    model: str = ""
    dataset: str = ""
    allowed_datasets: str = ""
    text_column: str = ""
    label_column: str = ""
    image_column: str = ""
    output_dir: str = ""
    state_dir: str = ""
    audit_dir: str = ""
    cache_dir: str = ""
    device: str = Field("", pattern=r"^$|" + DEVICE_PATTERN)
    max_local_steps: int = _cap("optimiser steps of one round")
    max_finetune_steps: int = _cap("optimiser steps of the final fine-tuning")
    max_pretrain_steps: int = _cap("pre-training steps of a `vit:LxD` small model")
    max_batch_size: int = _cap("rows per optimiser step")
    max_sequence_length: int = _cap("tokens per text row")
    max_batch_tokens: int = _cap("tokens per text batch")
    max_model_params: int = _cap("transformer-body weights of a model to build")
    max_message_seconds: float = _cap("seconds of work per message")
    max_final_phases: int = _cap("final phases per run")
    max_rounds: int = _cap("training rounds per run")
    min_eval_rows: int = _cap("test rows of an evaluation")
    allow_resume: bool = False
    max_received_abs: float = Field(100.0, gt=0)

    @classmethod
    def from_node_config(cls, node_config: Mapping[str, Any], simulation: bool = False) -> NodePolicy:
        """Read a node config; the profile is ``node-policy``, else ``open`` in simulation and ``strict`` elsewhere.

        Parameters
        ----------
        node_config : mapping
            ``Context.node_config``: kebab-case keys to TOML scalars.
        simulation : bool
            Whether the node runs inside Flower's simulation engine.

        Raises
        ------
        NodePolicyError
            Listing every unknown key and bad value (key, value, what was expected).
        """
        profile = node_config.get("node-policy", "open" if simulation else "strict")
        if profile not in PROFILES:
            raise NodePolicyError([f"node-policy = {profile!r}: expected one of {list(PROFILES)}"], "bad node config")
        values = {**_PROFILE_DEFAULTS[profile], **{k.replace("-", "_"): v for k, v in node_config.items()}}
        values["node_policy"] = profile
        try:
            policy = cls(**values)
        except ValidationError as err:
            problems = [
                f"{'.'.join(str(x) for x in e['loc']).replace('_', '-')} = {e.get('input')!r}: {e['msg']}"
                for e in err.errors()
            ]
            raise NodePolicyError(problems, "bad node config") from None
        if policy.strict and policy.allowed_modes.strip() == "*":
            raise NodePolicyError(
                ["allowed-modes = '*': every registered mode is the open profile's; a strict node names its modes"]
            )
        unknown = [m for m in policy.modes if m not in mode_names()]
        if unknown:
            raise NodePolicyError(
                [f"allowed-modes names unknown modes {unknown}; expected some of {list(mode_names())}"]
            )
        return policy

    @property
    def strict(self) -> bool:
        """Whether the ``strict`` profile applies (the run config's paths are never used)."""
        return self.node_policy == "strict"

    @property
    def modes(self) -> tuple[str, ...]:
        """The modes this node serves (``allowed-modes``; ``*``: every registered mode)."""
        if self.allowed_modes.strip() == "*":
            return mode_names()
        return tuple(m.strip() for m in self.allowed_modes.split(",") if m.strip())

    @property
    def shared_sources(self) -> frozenset[str]:
        """Data sources besides the built-in ones that the run config may name (``allowed-datasets``)."""
        return frozenset(s.strip() for s in self.allowed_datasets.split(",") if s.strip())

    def small_model(self, run: RunConfig) -> str:
        """The name or folder of this node's small model: its own ``model``, else the run's for its partition."""
        return self.model or run.client_models[self.partition_id % len(run.client_models)]

    def problems(self, run: RunConfig) -> list[str]:
        """Everything ``run`` asks that this policy does not allow; each names the key, the value and the limit.

        A malformed ``vit:`` spec for this node is one of the problems (nothing is raised).
        """
        out = []
        if run.mode not in self.modes:
            out.append(f"mode = {run.mode!r}: this node serves {list(self.modes)} (node config allowed-modes)")
        caps = [
            ("local-steps", run.local_steps, "max-local-steps", self.max_local_steps),
            ("finetune-steps", run.finetune_steps, "max-finetune-steps", self.max_finetune_steps),
            ("batch-size", run.batch_size, "max-batch-size", self.max_batch_size),
            ("max-length", run.max_length, "max-sequence-length", self.max_sequence_length),
            ("target-shape", body_params(run.target_shape), "max-model-params", self.max_model_params),
            ("num-server-rounds", run.num_server_rounds, "max-rounds", self.max_rounds),
        ]
        if run.task == "text":
            tokens = run.batch_size * run.max_length
            caps.append(("batch-size * max-length", tokens, "max-batch-tokens", self.max_batch_tokens))
        model = self.small_model(run)
        if model.startswith("vit:"):
            caps.append(("pretrain-steps", run.pretrain_steps, "max-pretrain-steps", self.max_pretrain_steps))
            try:
                spec = VitSpec.parse(model[len("vit:") :])
            except ValueError as err:
                out.append(f"client-models names {model[:60]!r} for this node: {err}")
            else:
                body = body_params(TransformerShape(spec.layers, spec.hidden, spec.ffn_width, spec.heads))
                caps.append((f"client model {model!r}", body, "max-model-params", self.max_model_params))
        for key, value, cap_key, cap in caps:
            if cap and value > cap:
                unit = " weights" if cap_key == "max-model-params" else ""
                out.append(f"{key} = {value}{unit}: over this node's {cap_key} = {cap}")
        for key, rows in (("eval-max-examples", run.eval_max_examples), ("max-test-examples", run.max_test_examples)):
            if 0 < rows < self.min_eval_rows:
                out.append(f"{key} = {rows}: under this node's min-eval-rows = {self.min_eval_rows}")
        if self.strict and not self.dataset and run.dataset not in {*BUILTIN_SOURCES, *self.shared_sources}:
            out.append(
                f"dataset = {run.dataset!r}: this node reads only its own data (node config dataset), a built-in "
                f"source {sorted(BUILTIN_SOURCES)} or one its node config allowed-datasets names"
            )
        if self.strict and not self.model and not (model in zoo_models() or model.startswith("vit:")):
            out.append(
                f"client-models names {model!r} for this node: it loads only its own model (node config model), "
                f"a zoo model {sorted(zoo_models())} or a 'vit:LxD' spec"
            )
        return out

    def check(self, run: RunConfig) -> None:
        """Raise :class:`NodePolicyError` listing :meth:`problems`, if there are any."""
        problems = self.problems(run)
        if problems:
            raise NodePolicyError(problems)

    def node_folder(self, run: RunConfig) -> Path:
        """The node's own folder: ``<output-dir>/clients/partition-<id>``.

        ``output-dir`` is the node's; without one, ``./fedgrow-node`` (strict)
        or the run config's ``output-dir`` (open).
        """
        base = self.output_dir or (DEFAULT_NODE_FOLDER if self.strict else run.output_dir)
        return Path(base) / "clients" / f"partition-{self.partition_id}"

    def model_folder(self, run: RunConfig, run_folder: str) -> Path:
        """Where the node saves its final model of the run whose folder is named ``run_folder``.

        In Flower's simulation (``open``, no ``output-dir`` of the node's own)
        inside the run's own folder, beside its ``summary.json``:
        ``<output-dir>/<run folder>/clients/partition-<id>``; otherwise in the
        node's folder: ``<node folder>/models/<run folder>``. ``run_folder`` is
        one path component (the run tag, checked by the client's guards).
        """
        if not self.strict and not self.output_dir:
            return Path(run.output_dir) / run_folder / "clients" / f"partition-{self.partition_id}"
        return self.node_folder(run) / "models" / run_folder

    def state_folder(self, run: RunConfig) -> Path:
        """Where the node keeps private state: its ``state-dir``, else ``<node folder>/state``."""
        return Path(self.state_dir) if self.state_dir else self.node_folder(run) / "state"

    def effective_run(self, run: RunConfig) -> RunConfig:
        """``run`` as this node executes it: the node's data columns, cache and audit folders in place of the run's.

        In ``strict`` the run config's ``cache-dir`` and ``audit-dir`` are never
        used (the node's own, or none); the node's own data, and a shared
        source of ``allowed-datasets``, are read with the node's columns
        (``text``/``label``/``image`` unless it names others). In ``open`` a
        key the node sets wins over the run config's. The device is the
        node's ``device``; without one, ``auto`` in ``strict`` and the run
        config's in ``open``.
        """
        columns = {"text_column": "text", "label_column": "label", "image_column": "image"} if self.strict else {}
        update: dict[str, Any] = {}
        if self.dataset or (self.strict and run.dataset in self.shared_sources):
            for key in ("text_column", "label_column", "image_column"):
                update[key] = getattr(self, key) or columns.get(key, getattr(run, key))
        if self.strict or self.cache_dir:
            update["cache_dir"] = self.cache_dir
        if self.strict or self.audit_dir:
            update["audit_dir"] = self.audit_dir
        if self.device or self.strict:
            update["device"] = self.device or "auto"
        return run.model_copy(update=update) if update else run


def body_params(shape: TransformerShape) -> int:
    """Weights of a transformer body of ``shape``: ``layers * (4 hidden^2 + 2 hidden ffn)`` (attention and FFN)."""
    return shape.layers * (4 * shape.hidden**2 + 2 * shape.hidden * shape.ffn)


def run_fingerprint(run: RunConfig) -> str:
    """SHA-256 (hex) of the run config without the keys a resumption may change (:data:`RESUMABLE_CHANGES`).

    A client's private state on disk is kept under it, so that a resumed run
    finds only the state its own configuration wrote.
    """
    config = run.to_flower()
    keep = {f.alias: config[f.alias] for name, f in type(run).model_fields.items() if name not in RESUMABLE_CHANGES}
    return hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()
