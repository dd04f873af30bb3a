"""The Fed-Grow ClientApp: rounds (``train``) and the final phase (``evaluate``) of every mode.

Node config (``--node-config`` of a SuperNode; in simulation Flower's own
``partition-id`` and ``num-partitions``) is the node's policy
(:class:`fedgrow_core.node_policy.NodePolicy`): the modes it serves, its own
``model`` and ``dataset``, its folders, and caps on the work one message may
ask. A deployed node defaults to the ``strict`` profile (``fedgrow`` only, its
own folders, caps set); inside Flower's simulation engine the ``open`` profile
grants the run config what the local user owns anyway. Every message is checked
against the policy, the protocol and, for its tensors, the expected names,
shapes, dtypes and bounds before any work (:mod:`client_app.guards`).

What a client does depends on the run's ``mode`` and the message's phase
(:class:`fedgrow_core.protocol.Phase`); one handler serves each phase. Private
state (Local-LiGO, head, optimiser moments, update residual; or the small
model's weights in ``small-only``) persists between rounds in simulation and
deployment alike, in the node's state folder with ``Context.state`` naming the
file (:mod:`client_app.kept_state`); only what the mode shares is replied. A
message that is refused or fails changes no private state: ``Context.state`` is
written only after a round succeeds, and the node's cached client objects are
dropped, so the next message starts from the last good state. A client without
state in ``Context.state`` (a restarted node) picks up only state its own run
wrote, and a resumed run (if the node's policy allows resuming) only state a
run of the same tag and configuration wrote.

Every round runs under its own torch seed, derived from ``seed``, the partition,
the phase and the round (:func:`round_seed`), and the batch order is a function
of the client's step count, so a round's result does not depend on which
process serves it, nor on whether the node's client was held or built again
(:func:`_growth_client`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
from flwr.app import ConfigRecord, Context, Message
from flwr.common.logger import console_handler

from fedgrow_core.clients.growth_client import GrowthClient
from fedgrow_core.clients.model_client import ModelClient, target_model
from fedgrow_core.clients.model_export import owner_problem
from fedgrow_core.clients.setup import ClientSetup
from fedgrow_core.growth.template_cache import forked_stream
from fedgrow_core.import_freeze import freeze_imports
from fedgrow_core.modes import GlobalLigo, Handler
from fedgrow_core.protocol import NUM_EXAMPLES, Instruction, Phase, final_reply, preflight_reply, train_reply
from fedgrow_core.training import reporting_progress, time_limit

from .client_cache import ClientCache
from .egress_audit import audit_reply, egress_audit_mod
from .guards import (
    GuardedClientApp,
    RefusedMessage,
    check_finite_reply,
    check_instruction,
    check_phase,
    check_received,
    sanitised_errors_mod,
)
from .kept_state import (
    ROUND_KEY,
    STATE_KEY,
    begin_keep,
    clear_marks,
    keep,
    kept_mark,
    load_kept,
    release,
    restore,
    state_metadata,
    state_store,
)
from .node_view import NodeView, node_view

# In simulation Flower loads this module in the process that then starts Ray. Ray warns (FutureWarning)
# that it will stop hiding GPUs from actors given num-gpus = 0; setting its variable to 0 takes that
# behaviour and silences the warning. Simulated clients given no GPU by flwr_home/federation.toml then
# see the machine's GPUs: run-config device = "cpu" keeps them off.
os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")

app = GuardedClientApp(mods=[sanitised_errors_mod, egress_audit_mod], on_error_reply=audit_reply)
# the library's progress lines (logger ``fedgrow_core``, INFO) go out through Flower's console handler
_LIBRARY_LOG = logging.getLogger("fedgrow_core")
_LIBRARY_LOG.setLevel(logging.INFO)
_LIBRARY_LOG.propagate = False
if console_handler not in _LIBRARY_LOG.handlers:
    _LIBRARY_LOG.addHandler(console_handler)

#: ``Context.state`` key of a shared-model client's batch position (``{"steps": int}``).
DATA_KEY = "fedgrow-data"
#: ``Context.state`` key of the final phases this node has served in the run (``{"served": int}``).
FINAL_KEY = "fedgrow-final-phases"
#: ``Context.state`` key of the last training round this node served in the run (``{"round": int}``).
SERVED_KEY = "fedgrow-served-round"
_PHASE_CODES = {Phase.GROW: 1, Phase.TRAIN_LOCAL: 2, Phase.TRAIN_SHARED: 3, Phase.COLLECT: 4, Phase.FINAL: 5}
#: Clients built in this process (:class:`client_app.client_cache.ClientCache`: least recently used dropped
#: first, within ``FEDGROW_CLIENT_CACHE_MB``). A simulation actor serves several nodes in turn; rebuilding a
#: client (model, data, tokenisation) costs far more than a message's bookkeeping. A cached client is keyed by
#: run and node, and loads the state ``Context.state`` names unless it holds exactly that state already
#: (:func:`client_app.kept_state.load_kept`); a run's clients are dropped when one of its messages fails
#: (:func:`_forget`).
_CLIENTS = ClientCache(group=lambda key: key[:5])  # a node's objects: (run, partition, partitions, model, data)


def _cached(key: tuple, build):
    return _CLIENTS.get(key, build)


def _forget(context: Context) -> None:
    """Drop every cached client object of this run in this process (after a refused or failed message).

    A deployed SuperNode's process serves one node; a simulation worker that serves several nodes of the
    run rebuilds theirs too, from their ``Context.state``.
    """
    _CLIENTS.drop(lambda key: key[0] == context.run_id)
    clear_marks()


#: ``Context.state`` keys of private state, rolled back when a message is refused or fails.
_PRIVATE_KEYS = (STATE_KEY, ROUND_KEY, DATA_KEY)


@contextlib.contextmanager
def _transaction(context: Context) -> Iterator[None]:
    """Serve a message; if it is refused or fails, put back the private ``Context.state`` and drop cached clients.

    Records in ``Context.state`` are replaced, never changed in place, so keeping references is a snapshot.
    """
    before = {k: context.state[k] for k in _PRIVATE_KEYS if k in context.state}
    try:
        yield
    except BaseException:
        for key in _PRIVATE_KEYS:
            if key in before:
                context.state[key] = before[key]
            elif key in context.state:
                del context.state[key]
        _forget(context)
        raise


def _setup(context: Context, node: NodeView) -> tuple[tuple, ClientSetup]:
    policy = node.policy
    key = (context.run_id, *node.key)
    model, dataset = policy.model or None, policy.dataset or None
    setup = _cached(
        (*key, "setup"),
        lambda: ClientSetup.load(node.effective, policy.partition_id, policy.num_partitions, model, dataset),
    )
    if len(setup.test_rows) < policy.min_eval_rows:
        raise RefusedMessage(
            f"this node's split has {len(setup.test_rows)} test rows, under its min-eval-rows = "
            f"{policy.min_eval_rows}: every accuracy it reported would be about a few private rows"
        )
    return key, setup


def _growth_client(context: Context, node: NodeView) -> GrowthClient:
    """The node's growth client: cached, or built; then given the private state ``Context.state`` names.

    A node's first client is built on the round's random stream (its template's
    initialisation draws from it). When the node already has private state, a
    client built again (its cached one was dropped, another process serves the
    node, or the run was resumed) and loading that state (which starts a new
    batch iterator, and a ``DataLoader`` iterator draws its base seed from the
    stream) draw from a fork of the stream, which is then put back: what they
    draw is replaced by the loaded state, and the round then draws (e.g.
    dropout masks) exactly what it would have with the held client.
    """
    independent = node.mode.operator == "single"
    shares = node.mode.global_ligo is GlobalLigo.SHARED
    with _held_stream(context):
        key, setup = _setup(context, node)
        client = _cached(
            (*key, "growth", node.run.mode),
            lambda: GrowthClient(
                node.effective, setup.partition_id, key[2], independent=independent, share_global=shares, setup=setup
            ),
        )
        load_kept(context, client)
    return client


def _held_stream(context: Context) -> contextlib.AbstractContextManager:
    """A fork of torch's random stream once the node has private state (:func:`_growth_client`), else nothing.

    In the fork, a target template kept by this process is handed out without replaying its build's
    draws (:func:`~fedgrow_core.growth.template_cache.forked_stream`): they would be thrown away.
    Private state is what ``Context.state`` names (:func:`~client_app.kept_state.kept_mark`), or a shared
    model's batch position (``scratch-fedavg``).
    """
    kept = kept_mark(context) is not None or DATA_KEY in context.state
    return forked_stream() if kept else contextlib.nullcontext()


def _model_client(context: Context, node: NodeView, role: str) -> ModelClient:
    """``role``: ``small`` (the small model, private) or ``target`` (target shape, weights received)."""
    if role == "small":
        with _held_stream(context):  # as for a growth client: the round draws what it would with the held one
            key, setup = _setup(context, node)
            small, family = setup.small.model, setup.small.family
            config = family.target_config(small, family.shape(small), setup.num_labels)  # its own config
            client = _cached((*key, role), lambda: ModelClient(setup, small, config, node.run.lr_finetune))
            load_kept(context, client)
        return client
    key, setup = _setup(context, node)

    def target() -> ModelClient:  # scratch-fedavg trains it from a random initialisation, at its own rate
        return ModelClient(setup, *target_model(setup, node.run.seed), node.run.lr_scratch)

    return _cached((*key, role), target)


def round_seed(seed: int, partition_id: int, phase: Phase, server_round: int) -> int:
    """The torch seed of one client's round: a ``numpy.random.SeedSequence`` of (seed, partition, phase, round)."""
    entropy = [seed, partition_id, _PHASE_CODES.get(phase, 0), server_round]
    return int(np.random.SeedSequence(entropy).generate_state(1, np.uint64)[0] % 2**63)


@contextlib.contextmanager
def _seeded(node: NodeView, phase: Phase, server_round: int) -> Iterator[None]:
    """Run the block under :func:`round_seed` (the torch RNG restored afterwards), reporting progress, time-limited."""
    partition = node.policy.partition_id
    label = f"partition {partition}, {phase.value}" + (f" round {server_round}" if phase is not Phase.FINAL else "")
    with torch.random.fork_rng(), reporting_progress(label), time_limit(node.policy.max_message_seconds):
        torch.manual_seed(round_seed(node.run.seed, partition, phase, server_round))
        yield


def _check_round(context: Context, node: NodeView, order: Instruction) -> None:
    """Refuse a training round this node already served in this run, or one past the policy's ``max-rounds``.

    Rounds only increase within a run (a node that is not sampled skips some); a replayed round would give
    the server another update and evaluation of its choice.

    Raises
    ------
    RefusedMessage
        Naming the round and the last one served, or the cap.
    """
    served = int(context.state[SERVED_KEY]["round"]) if SERVED_KEY in context.state else 0
    if order.server_round <= served:
        raise RefusedMessage(
            f"server-round = {order.server_round}: this node already served round {served} of this run; "
            "rounds must increase"
        )
    cap = node.policy.max_rounds
    if cap and order.server_round > cap:
        raise RefusedMessage(f"server-round = {order.server_round}: over this node's max-rounds = {cap}")


def _served(context: Context, order: Instruction) -> None:
    context.state[SERVED_KEY] = ConfigRecord({"round": order.server_round})


def _shared_model_client(context: Context, node: NodeView) -> ModelClient:
    """The target-shaped model client of ``scratch-fedavg``, at this node's batch position.

    Once the node has a batch position, building the client and seeking draw from a fork of the round's
    random stream (:func:`_held_stream`), as for a growth client.
    """
    with _held_stream(context):
        client = _model_client(context, node, "target")
        if DATA_KEY in context.state:
            client.seek_data(int(context.state[DATA_KEY]["steps"]))
    return client


def _received(msg: Message) -> dict:
    return msg.content["arrays"].to_torch_state_dict() if "arrays" in msg.content else {}


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Preflight: check the run config against the policy, load this node's model and data, report row counts."""
    node = node_view(context)
    check_phase(node.run.mode, Phase.PREFLIGHT, node.policy)
    with _transaction(context), time_limit(node.policy.max_message_seconds):  # a vit:LxD model pre-trains here
        _, setup = _setup(context, node)
    content = preflight_reply(setup.partition_id, len(setup.train_rows), len(setup.test_rows))
    return Message(content=content, reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """One round of the instructed phase, served by the handler the run's mode names for it.

    A round's reply also reports ``message-seconds``: this handler's seconds on the message, compute included.
    """
    start = time.perf_counter()
    node = node_view(context)
    instruction = check_instruction(node.run.mode, msg.content["config"], node.policy)
    handler = _TRAIN_HANDLERS.get(node.mode.handlers.get(instruction.phase))
    if handler is None:
        raise RefusedMessage(f"phase {instruction.phase.value!r} does not come in a train message")
    if instruction.phase is not Phase.COLLECT:
        _check_round(context, node, instruction)
    with _transaction(context), _seeded(node, instruction.phase, instruction.server_round):
        arrays, metrics = handler(context, node, instruction, _received(msg))
    if instruction.phase is not Phase.COLLECT:
        _served(context, instruction)
        metrics = {**metrics, "message-seconds": time.perf_counter() - start}
    return Message(content=train_reply(arrays, metrics), reply_to=msg)


def _grow(context: Context, node: NodeView, order: Instruction, received: dict) -> tuple[dict, dict]:
    """Train Local-LiGO, Global-LiGO and head; reply with the encoded Global-LiGO update (``update-encoding``)."""
    store = state_store(context, node, order.run_tag)
    restore(context, node, store, order.server_round, order.resumed_after)
    client = _growth_client(context, node)
    expected = client.global_state(copy=False) if client.share_global else {}  # names, shapes and dtypes
    check_received(received, expected, node.policy.max_received_abs, "Global-LiGO")
    done: list = []  # (payload, the private state being kept)

    def trained(shared: dict) -> None:  # before the trained model's evaluation, which the state file's fsync overlaps
        check_finite_reply(shared, {}, "training on the received Global-LiGO")
        # the rounding residual is private state; the independent baselines keep their operators and send nothing
        payload = client.encoded_update(received, shared) if client.share_global else {}
        done.append((payload, begin_keep(context, node, store, order.server_round, client)))

    try:
        shared, metrics = client.train_round(
            received,
            proximal_mu=order.proximal_mu,
            with_eval=node.run.evaluates_round(order.server_round),
            after_training=trained,
        )
        check_finite_reply(None, metrics, "training on the received Global-LiGO")  # its tensors: in trained()
    except BaseException:
        for _, pending in done:
            with contextlib.suppress(OSError):  # the failure that got here is the one to report
                pending.abort()
        raise
    if not done:
        raise RuntimeError("the growth client's train_round did not call its after_training hook: nothing is kept")
    payload, pending = done[0]
    pending.commit()
    return payload, metrics


def _train_small(context: Context, node: NodeView, order: Instruction, received: dict) -> tuple[None, dict]:
    """Train the private small model (``small-only``); reply with metrics only."""
    check_received(received, {}, node.policy.max_received_abs, "message")
    store = state_store(context, node, order.run_tag)
    restore(context, node, store, order.server_round, order.resumed_after)
    client = _model_client(context, node, "small")
    metrics = client.train_round(node.run.local_steps, with_eval=node.run.evaluates_round(order.server_round))
    check_finite_reply(None, metrics, "training the small model")
    keep(context, node, store, order.server_round, client)
    return None, metrics


def _train_target(context: Context, node: NodeView, order: Instruction, received: dict) -> tuple[dict, dict]:
    """Train the received target model; reply with its weights."""
    client = _shared_model_client(context, node)
    check_received(received, client.weights(), node.policy.max_received_abs, "target model")
    client.load_weights(received)
    metrics = client.train_round(node.run.local_steps, with_eval=node.run.evaluates_round(order.server_round))
    weights = client.weights()
    check_finite_reply(weights, metrics, "training the received target model")
    context.state[DATA_KEY] = ConfigRecord({"steps": client.data_steps})
    return weights, metrics


def _collect_target(context: Context, node: NodeView, order: Instruction, received: dict) -> tuple[dict, dict]:
    """Reply with the target model's starting weights, its seeded random initialisation (``scratch-fedavg``)."""
    check_received(received, {}, node.policy.max_received_abs, "message")
    target = _model_client(context, node, "target")
    return target.weights(), {NUM_EXAMPLES: len(target.setup.train_rows)}


#: The train-message handler of each :class:`fedgrow_core.modes.Handler` a mode may name for a round phase.
_TRAIN_HANDLERS = {
    Handler.GROW: _grow,
    Handler.TRAIN_SMALL: _train_small,
    Handler.TRAIN_TARGET: _train_target,
    Handler.COLLECT_TARGET: _collect_target,
}


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Final phase: fine-tune the mode's model (``finetune-steps``), evaluate it, save it privately.

    Served at most ``max-final-phases`` times per run (node policy), by the
    final handler the run's mode names. The received tensors are checked
    before anything is materialised, and a model whose weights or test loss
    are not finite is neither saved nor reported.
    """
    node = node_view(context)
    config = msg.content["config"] if "config" in msg.content else ConfigRecord()
    order = check_instruction(node.run.mode, config, node.policy, default_phase=Phase.FINAL)
    if order.phase is not Phase.FINAL:
        raise RefusedMessage(f"phase {order.phase.value!r} does not come in an evaluate message")
    served = int(context.state[FINAL_KEY]["served"]) if FINAL_KEY in context.state else 0
    cap = node.policy.max_final_phases
    if cap and served >= cap:
        raise RefusedMessage(f"this node has served {served} final phase(s) in this run; its max-final-phases = {cap}")
    prepare = _FINAL_HANDLERS[node.mode.handlers[Phase.FINAL]]
    with _transaction(context):
        if prepare in _FINAL_FROM_PRIVATE_STATE:
            restore(
                context, node, state_store(context, node, order.run_tag), order.server_round + 1, order.resumed_after
            )
        with _seeded(node, Phase.FINAL, order.server_round):
            return _finetune_and_evaluate(msg, context, node, order, served, prepare)


#: A final handler checks what it received and returns the step that fine-tunes, evaluates and saves
#: (to a folder or ``None``, with the owner record) and gives the final metrics.
FinalStep = Callable[[Path | None, dict], dict]


def _final_grown(context: Context, node: NodeView, received: dict) -> FinalStep:
    """The grown model: materialised from the private Local-LiGO and the received (or own) Global-LiGO."""
    client = _growth_client(context, node)
    release(client)  # fine-tuning follows: the client no longer holds the kept state
    check_received(
        received, client.global_state() if client.share_global else {}, node.policy.max_received_abs, "Global-LiGO"
    )
    return lambda save_to, owner: client.finetune_and_evaluate(received, save_to, owner)


def _final_small(context: Context, node: NodeView, received: dict) -> FinalStep:
    """The private small model, fine-tuned further."""
    check_received(received, {}, node.policy.max_received_abs, "message")
    client = _model_client(context, node, "small")
    release(client)  # fine-tuning follows: the client no longer holds the kept state
    origin = (
        f"the small model `{Path(client.setup.model_name).name}`, trained alone {node.run.num_server_rounds} rounds x "
        f"{node.run.local_steps} steps, then fine-tuned {node.run.finetune_steps} steps"
    )
    return lambda save_to, owner: client.finetune_and_evaluate(node.run.finetune_steps, save_to, owner, origin)


def _final_target(context: Context, node: NodeView, received: dict) -> FinalStep:
    """The received (averaged) target model (``scratch-fedavg``)."""
    client = _shared_model_client(context, node)
    check_received(received, client.weights(), node.policy.max_received_abs, "target model")
    client.load_weights(received)
    origin = (
        f"a target-shaped model from a seeded random initialisation, trained with the run's strategy over "
        f"{node.run.num_server_rounds} rounds x {node.run.local_steps} steps, then fine-tuned "
        f"{node.run.finetune_steps} steps by this client"
    )
    return lambda save_to, owner: client.finetune_and_evaluate(node.run.finetune_steps, save_to, owner, origin)


#: The final handler of each :class:`fedgrow_core.modes.Handler` a mode may name for :attr:`Phase.FINAL`.
_FINAL_HANDLERS = {
    Handler.FINAL_GROWN: _final_grown,
    Handler.FINAL_SMALL: _final_small,
    Handler.FINAL_TARGET: _final_target,
}
#: Final handlers whose model is built from private state kept between rounds (restored first).
_FINAL_FROM_PRIVATE_STATE = (_final_grown, _final_small)


def _finetune_and_evaluate(
    msg: Message, context: Context, node: NodeView, order: Instruction, served: int, prepare
) -> Message:
    _, setup = _setup(context, node)
    step = prepare(context, node, _received(msg))
    run_folder = order.run_tag or f"run-{context.run_id}"
    owner = state_metadata(context, node)
    same_run = ("run-fingerprint",) if order.resumed_after else None  # a resumption is a new Flower run
    out = node.policy.model_folder(node.effective, run_folder) / node.mode.model_kind
    if owner_problem(out, owner, same_run):  # another run saved a model under this tag: never replaced
        out = node.policy.model_folder(node.effective, f"{run_folder}.run-{context.run_id}") / node.mode.model_kind
    context.state[FINAL_KEY] = ConfigRecord({"served": served + 1})  # counted once the message is accepted
    metrics = step(out if node.run.save_models else None, owner)
    check_finite_reply(None, metrics, "the final phase")
    content = final_reply(metrics, setup.partition_id, Path(setup.model_name).name)  # never a client's full path
    return Message(content=content, reply_to=msg)


freeze_imports()  # last: what the imports above left stays out of the garbage collector's walks
