"""The Fed-Grow ClientApp: rounds (``train``) and the final phase (``evaluate``) of every mode.

Node config (``--node-config`` in simulation via the federation, or a
SuperNode's own settings): ``partition-id`` and ``num-partitions`` pick the data
partition and, cycling, the small model; a SuperNode may instead name its own
``model`` (zoo name or folder), its own ``dataset`` (a data file that is all its
own) and its private ``output-dir``.

What a client does depends on the run's ``mode`` and the message's ``phase``
(see :mod:`server_app.modes`). Private state (Local-LiGO, head, optimiser
moments; or the small model's weights in ``small-only``) lives in
``Context.state`` between rounds, so it persists in simulation and deployment
alike; only what the mode shares is replied.
"""

from __future__ import annotations

from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedgrow_core.client_setup import ClientSetup
from fedgrow_core.growth_client import GrowthClient
from fedgrow_core.model_client import ModelClient, target_model
from fedgrow_core.run_config import RunConfig

from .egress_audit import egress_audit_mod

app = ClientApp(mods=[egress_audit_mod])

STATE_KEY = "fedgrow-private"
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


def _reply(msg: Message, arrays: dict | None, metrics: dict) -> Message:
    content = RecordDict({"arrays": ArrayRecord(arrays or {}), "metrics": MetricRecord(metrics)})
    return Message(content=content, reply_to=msg)


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Preflight: check the run config, load this node's model and data (cached for round 1), report row counts."""
    _, _, setup = _setup(context)
    metrics = {
        "partition-id": setup.partition_id,
        "train-examples": len(setup.train_rows),
        "test-examples": len(setup.test_rows),
    }
    return Message(content=RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """One round: train ``local-steps`` steps on the node's data; reply with what the mode shares and metrics."""
    run = RunConfig.from_flower(context.run_config)
    config = msg.content["config"]
    phase = str(config.get("phase", "grow"))
    received = msg.content["arrays"].to_torch_state_dict()
    if phase == "grow":
        client = _growth_client(context)
        shared, metrics = client.train_round(received, proximal_mu=float(config.get("proximal-mu", 0.0)))
        context.state[STATE_KEY] = ArrayRecord(client.private_state())
        return _reply(msg, shared, metrics)
    if phase == "train-local":
        client = _model_client(context, "small")
        metrics = client.train_round(run.local_steps)
        context.state[STATE_KEY] = ArrayRecord(client.private_state())
        return _reply(msg, None, metrics)
    if phase == "train-shared":
        client = _model_client(context, "target")
        client.load_weights(received)
        metrics = client.train_round(run.local_steps)
        return _reply(msg, client.weights(), metrics)
    if phase == "collect":
        target = _model_client(context, "target")
        if run.mode == "fedgrow-fedft":  # start federated fine-tuning from this client's grown model
            growth = _growth_client(context)
            growth.load_global_state(received)
            target.load_weights({k: v.cpu() for k, v in growth.grown_model().named_parameters()})
        return _reply(msg, target.weights(), {"num-examples": len(target.setup.train_rows)})
    raise ValueError(f"unknown training phase {phase!r}; expected grow, train-local, train-shared or collect")


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Final phase: fine-tune the mode's model (``finetune-steps``), evaluate it, save it privately."""
    run = RunConfig.from_flower(context.run_config)
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
    else:  # scratch-fedavg, fedgrow-fedft: the final averaged target model
        client = _model_client(context, "target")
        client.load_weights(received)
        steps = run.finetune_steps if run.mode == "scratch-fedavg" else 0
        metrics = client.finetune_and_evaluate(steps, save_to)
    metrics["partition-id"] = setup.partition_id
    info = ConfigRecord({"model": Path(setup.model_name).name})  # never a client's full path
    return Message(content=RecordDict({"metrics": MetricRecord(metrics), "info": info}), reply_to=msg)
