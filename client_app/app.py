"""The Fed-Grow ClientApp: rounds (``train``) and the final phase (``evaluate``) of every mode.

Node config (``--node-config`` in simulation via the federation, or a
SuperNode's own settings): ``partition-id`` and ``num-partitions`` pick the data
partition and, cycling, the small model; a SuperNode may instead name its own
``model`` (zoo name or folder), its own ``dataset`` (a data file that is all its
own) and its private ``output-dir``.

What a client does depends on the run's ``mode`` and the message's phase
(:class:`fedgrow_core.protocol.Phase`, read and checked by
:func:`client_app.guards.check_instruction`); one handler serves each phase. Private state (Local-LiGO, head, optimiser
moments; or the small model's weights in ``small-only``) lives in
``Context.state`` between rounds, so it persists in simulation and deployment
alike; only what the mode shares is replied. When the server names its run
(``run-tag`` in the message config), the private state is also written after
every round to the node's state folder (node config ``state-dir``, else
``<output-dir>/clients/partition-<id>/state``) under that tag
(:class:`fedgrow_core.clients.state_store.ClientStateStore`), and a client without it
in memory (a resumed run, a restarted node) picks it up from there.

Every round runs under its own torch seed, derived from ``seed``, the partition,
the phase and the round (:func:`round_seed`), and the batch order is a function
of the client's step count, so a round's result does not depend on which
process serves it.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.logger import console_handler

from fedgrow_core.clients.growth_client import GrowthClient
from fedgrow_core.clients.model_client import ModelClient, target_model
from fedgrow_core.clients.setup import ClientSetup
from fedgrow_core.clients.state_store import ClientStateStore
from fedgrow_core.protocol import Instruction, Phase
from fedgrow_core.run_config import RunConfig
from fedgrow_core.training import reporting_progress

from .egress_audit import egress_audit_mod
from .guards import RefusedMessage, check_instruction, check_phase, sanitised_errors_mod

# In simulation Flower loads this module in the process that then starts Ray. Ray warns (FutureWarning)
# that it will stop hiding GPUs from actors given num-gpus = 0; setting its variable to 0 takes that
# behaviour and silences the warning. Simulated clients given no GPU by flwr_home/federation.toml then
# see the machine's GPUs: run-config device = "cpu" keeps them off.
os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")

app = ClientApp(mods=[sanitised_errors_mod, egress_audit_mod])
# the library's progress lines (logger ``fedgrow_core``, INFO) go out through Flower's console handler
_LIBRARY_LOG = logging.getLogger("fedgrow_core")
_LIBRARY_LOG.setLevel(logging.INFO)
_LIBRARY_LOG.propagate = False
if console_handler not in _LIBRARY_LOG.handlers:
    _LIBRARY_LOG.addHandler(console_handler)

STATE_KEY = "fedgrow-private"
#: ``Context.state`` key of the round ``STATE_KEY`` was saved after (a ConfigRecord ``{"round": int}``).
ROUND_KEY = "fedgrow-private-round"
#: ``Context.state`` key of a shared-model client's batch position (``{"steps": int}``).
DATA_KEY = "fedgrow-data"
_PHASE_CODES = {Phase.GROW: 1, Phase.TRAIN_LOCAL: 2, Phase.TRAIN_SHARED: 3, Phase.COLLECT: 4, Phase.FINAL: 5}
#: Clients built in this process, most recent last. A simulation actor serves
#: several nodes in turn; rebuilding a client (model, data, tokenisation) costs
#: seconds, so a few are kept. Their private state is always reloaded from
#: ``Context.state``, so a cached object never carries state across nodes or runs.
_CLIENTS: dict[tuple, object] = {}
_MAX_CACHED = 6


def _cached(key: tuple, build):
    client = _CLIENTS.pop(key, None) or build()
    _CLIENTS[key] = client
    while len(_CLIENTS) > _MAX_CACHED:
        _CLIENTS.pop(next(iter(_CLIENTS)))
    return client


def _setup(context: Context) -> tuple[tuple, RunConfig, ClientSetup]:
    run = RunConfig.from_flower(context.run_config)
    node = context.node_config
    pid, n = int(node["partition-id"]), int(node["num-partitions"])
    model, dataset = node.get("model") or None, node.get("dataset") or None
    key = (context.run_id, pid, n, model, dataset)
    model = str(model) if model else None
    dataset = str(dataset) if dataset else None
    return key, run, _cached((*key, "setup"), lambda: ClientSetup.load(run, pid, n, model, dataset))


def _growth_client(context: Context) -> GrowthClient:
    key, run, setup = _setup(context)
    independent = run.mode == "independent-ligo"
    client = _cached(
        (*key, "growth"),
        lambda: GrowthClient(run, setup.partition_id, key[2], independent=independent, setup=setup),
    )
    if STATE_KEY in context.state:
        client.load_private_state(context.state[STATE_KEY].to_torch_state_dict())
    return client


def _model_client(context: Context, role: str) -> ModelClient:
    """``role``: ``small`` (the small model, private) or ``target`` (target shape, weights received)."""
    key, run, setup = _setup(context)
    if role == "small":
        small, family = setup.small.model, setup.small.family
        config = family.target_config(small, family.shape(small), setup.num_labels)  # its own config
        client = _cached((*key, role), lambda: ModelClient(setup, small, config, run.lr_finetune))
        if STATE_KEY in context.state:
            client.load_private_state(context.state[STATE_KEY].to_torch_state_dict())
        return client
    return _cached((*key, role), lambda: ModelClient(setup, *target_model(setup, run.seed), run.lr_finetune))


def round_seed(seed: int, partition_id: int, phase: Phase, server_round: int) -> int:
    """The torch seed of one client's round: a ``numpy.random.SeedSequence`` of (seed, partition, phase, round)."""
    entropy = [seed, partition_id, _PHASE_CODES.get(phase, 0), server_round]
    return int(np.random.SeedSequence(entropy).generate_state(1, np.uint64)[0] % 2**63)


@contextlib.contextmanager
def _seeded(context: Context, run: RunConfig, phase: Phase, server_round: int) -> Iterator[None]:
    """Run the block under :func:`round_seed` (the process's torch RNG restored afterwards), reporting progress."""
    partition = int(context.node_config["partition-id"])
    label = f"partition {partition}, {phase.value}" + (f" round {server_round}" if phase is not Phase.FINAL else "")
    with torch.random.fork_rng(), reporting_progress(label):
        torch.manual_seed(round_seed(run.seed, partition, phase, server_round))
        yield


def _state_store(context: Context, run: RunConfig, tag: str) -> ClientStateStore | None:
    """The node's on-disk state for the server's run ``tag`` (``None`` without a tag; checked by the guards)."""
    if not tag:
        return None
    node = context.node_config
    base = node.get("state-dir") or (
        Path(str(node.get("output-dir", run.output_dir))) / "clients" / f"partition-{node['partition-id']}" / "state"
    )
    return ClientStateStore(Path(str(base)) / tag)


def _restore(context: Context, store: ClientStateStore | None, server_round: int, resumed_after: int = 0) -> None:
    """Put the newest private state saved before ``server_round`` into ``Context.state`` (memory or disk).

    Raises
    ------
    RefusedMessage
        If the server resumes a run (``resumed_after`` > 0) in which every node
        trains every round, and this node has no private state from it: a fresh
        start would silently train new operators.
    """
    if store is None:
        return
    have = int(context.state[ROUND_KEY]["round"]) if ROUND_KEY in context.state else 0
    if have < server_round - 1:
        found = store.load_latest(at_most=server_round - 1)
        if found is not None and found[0] > have:
            context.state[STATE_KEY] = ArrayRecord(found[1])
            context.state[ROUND_KEY] = ConfigRecord({"round": found[0]})
            have = found[0]
    run = RunConfig.from_flower(context.run_config)
    if resumed_after > 0 and have == 0 and run.fraction_train >= 1:
        raise RefusedMessage(
            f"resumed run {store.folder.name!r} after round {resumed_after}: this node has no private state from it "
            "(in memory or in its state folder); refusing to start from fresh operators"
        )


def _keep(context: Context, store: ClientStateStore | None, server_round: int, state: dict) -> None:
    """Keep the private state after ``server_round`` in ``Context.state`` and, with a store, on disk."""
    context.state[STATE_KEY] = ArrayRecord(state)
    context.state[ROUND_KEY] = ConfigRecord({"round": server_round})
    if store is not None:
        store.save(server_round, state)


def _shared_model_client(context: Context) -> ModelClient:
    """The target-shaped model client of ``scratch-fedavg``, at this node's batch position."""
    client = _model_client(context, "target")
    if DATA_KEY in context.state:
        client.seek_data(int(context.state[DATA_KEY]["steps"]))
    return client


def _reply(msg: Message, arrays: dict | None, metrics: dict) -> Message:
    content = RecordDict({"arrays": ArrayRecord(arrays or {}), "metrics": MetricRecord(metrics)})
    return Message(content=content, reply_to=msg)


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Preflight: check the run config, load this node's model and data (cached for round 1), report row counts."""
    run = RunConfig.from_flower(context.run_config)
    check_phase(run.mode, Phase.PREFLIGHT, context.node_config)
    _, _, setup = _setup(context)
    metrics = {
        "partition-id": setup.partition_id,
        "train-examples": len(setup.train_rows),
        "test-examples": len(setup.test_rows),
    }
    return Message(content=RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """One round of the instructed phase (``grow``, ``train-local``, ``train-shared`` or ``collect``)."""
    run = RunConfig.from_flower(context.run_config)
    instruction = check_instruction(run.mode, msg.content["config"], context.node_config)
    if instruction.phase not in _TRAIN_PHASES:
        raise RefusedMessage(f"phase {instruction.phase.value!r} does not come in a train message")
    with _seeded(context, run, instruction.phase, instruction.server_round):
        received = msg.content["arrays"].to_torch_state_dict()
        arrays, metrics = _TRAIN_PHASES[instruction.phase](context, run, instruction, received)
    return _reply(msg, arrays, metrics)


def _grow(context: Context, run: RunConfig, order: Instruction, received: dict) -> tuple[dict, dict]:
    """Train Local-LiGO, Global-LiGO and head; reply with the encoded Global-LiGO update (``update-encoding``)."""
    store = _state_store(context, run, order.run_tag)
    _restore(context, store, order.server_round, order.resumed_after)
    client = _growth_client(context)
    shared, metrics = client.train_round(
        received, proximal_mu=order.proximal_mu, with_eval=run.evaluates_round(order.server_round)
    )
    payload = client.encoded_update(received, shared)  # its rounding residual is private state
    _keep(context, store, order.server_round, client.private_state())
    return payload, metrics


def _train_local(context: Context, run: RunConfig, order: Instruction, received: dict) -> tuple[None, dict]:
    """Train the private small model (``small-only``); reply with metrics only."""
    store = _state_store(context, run, order.run_tag)
    _restore(context, store, order.server_round, order.resumed_after)
    client = _model_client(context, "small")
    metrics = client.train_round(run.local_steps, with_eval=run.evaluates_round(order.server_round))
    _keep(context, store, order.server_round, client.private_state())
    return None, metrics


def _train_shared(context: Context, run: RunConfig, order: Instruction, received: dict) -> tuple[dict, dict]:
    """Train the received target model; reply with its weights."""
    client = _shared_model_client(context)
    client.load_weights(received)
    metrics = client.train_round(run.local_steps, with_eval=run.evaluates_round(order.server_round))
    context.state[DATA_KEY] = ConfigRecord({"steps": client.data_steps})
    return client.weights(), metrics


def _collect(context: Context, run: RunConfig, order: Instruction, received: dict) -> tuple[dict, dict]:
    """Reply with the target model's starting weights, its seeded random initialisation (``scratch-fedavg``)."""
    target = _model_client(context, "target")
    return target.weights(), {"num-examples": len(target.setup.train_rows)}


#: The handler of each phase a train message may carry.
_TRAIN_PHASES = {
    Phase.GROW: _grow,
    Phase.TRAIN_LOCAL: _train_local,
    Phase.TRAIN_SHARED: _train_shared,
    Phase.COLLECT: _collect,
}


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Final phase: fine-tune the mode's model (``finetune-steps``), evaluate it, save it privately."""
    run = RunConfig.from_flower(context.run_config)
    config = msg.content["config"] if "config" in msg.content else ConfigRecord()
    order = check_instruction(run.mode, config, context.node_config, default_phase=Phase.FINAL)
    if order.phase is not Phase.FINAL:
        raise RefusedMessage(f"phase {order.phase.value!r} does not come in an evaluate message")
    if run.mode in ("fedgrow", "independent-ligo", "small-only"):
        store = _state_store(context, run, order.run_tag)
        _restore(context, store, order.server_round + 1, order.resumed_after)
    with _seeded(context, run, Phase.FINAL, order.server_round):
        return _finetune_and_evaluate(msg, context, run)


def _finetune_and_evaluate(msg: Message, context: Context, run: RunConfig) -> Message:
    received = msg.content["arrays"].to_torch_state_dict()
    _, _, setup = _setup(context)
    out = (
        Path(str(context.node_config.get("output-dir", run.output_dir)))
        / "clients"
        / f"partition-{setup.partition_id}"
        / ("grown_model" if run.mode != "small-only" else "small_model")
    )
    save_to = out if run.save_models else None
    if run.mode in ("fedgrow", "independent-ligo"):
        metrics = _growth_client(context).finetune_and_evaluate(received, save_to)
    elif run.mode == "small-only":
        metrics = _model_client(context, "small").finetune_and_evaluate(run.finetune_steps, save_to)
    else:  # scratch-fedavg: the final averaged target model
        client = _shared_model_client(context)
        client.load_weights(received)
        metrics = client.finetune_and_evaluate(run.finetune_steps, save_to)
    metrics["partition-id"] = setup.partition_id
    info = ConfigRecord({"model": Path(setup.model_name).name})  # never a client's full path
    return Message(content=RecordDict({"metrics": MetricRecord(metrics), "info": info}), reply_to=msg)
