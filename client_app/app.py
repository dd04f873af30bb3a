"""The Fed-Grow ClientApp: growth rounds (``train``) and the final phase (``evaluate``).

Node config (``--node-config`` in simulation via the federation, or a
SuperNode's own settings): ``partition-id`` and ``num-partitions`` pick the data
partition and, cycling, the small model; a SuperNode may instead name its own
``model`` (zoo name or folder), its own ``dataset`` (a data file that is all its
own) and its private ``output-dir``. The Local-LiGO,
task head and optimiser state live in ``Context.state`` between rounds, so they
persist in simulation and deployment alike; only the Global-LiGO is replied.
"""

from __future__ import annotations

from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedgrow_core.growth_client import GrowthClient
from fedgrow_core.run_config import RunConfig

app = ClientApp()

STATE_KEY = "fedgrow-private"
#: Clients built in this process, most recent last. A simulation actor serves
#: several nodes in turn; rebuilding a client (model, data, tokenisation) costs
#: seconds, so a few are kept. Their private state is always reloaded from
#: ``Context.state``, so a cached object never carries state across nodes or runs.
_CLIENTS: dict[tuple, GrowthClient] = {}
_MAX_CACHED = 4


def _client(context: Context) -> GrowthClient:
    run = RunConfig.from_flower(context.run_config)
    node = context.node_config
    pid, n = int(node["partition-id"]), int(node["num-partitions"])
    model, dataset = node.get("model") or None, node.get("dataset") or None
    key = (context.run_id, pid, n, model, dataset)
    client = _CLIENTS.pop(key, None) or GrowthClient(
        run, pid, n, model=str(model) if model else None, dataset=str(dataset) if dataset else None
    )
    _CLIENTS[key] = client
    while len(_CLIENTS) > _MAX_CACHED:
        _CLIENTS.pop(next(iter(_CLIENTS)))
    if STATE_KEY in context.state:
        client.load_private_state(context.state[STATE_KEY].to_torch_state_dict())
    return client


@app.train()
def train(msg: Message, context: Context) -> Message:
    """One growth round: local steps on the node's data; reply with the Global-LiGO and metrics."""
    client = _client(context)
    config = msg.content["config"]
    mu = float(config.get("proximal-mu", 0.0))
    global_state, metrics = client.train_round(msg.content["arrays"].to_torch_state_dict(), proximal_mu=mu)
    context.state[STATE_KEY] = ArrayRecord(client.private_state())
    content = RecordDict({"arrays": ArrayRecord(global_state), "metrics": MetricRecord(metrics)})
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Final phase: fine-tune the materialised grown model, evaluate it, save it privately."""
    client = _client(context)
    run = client.run
    out = (
        Path(str(context.node_config.get("output-dir", run.output_dir)))
        / "clients"
        / f"partition-{client.partition_id}"
    )
    metrics = client.finetune_and_evaluate(msg.content["arrays"].to_torch_state_dict(), out / "grown_model")
    metrics["partition-id"] = client.partition_id
    content = RecordDict(
        {"metrics": MetricRecord(metrics), "info": ConfigRecord({"model": client.model_name, "saved-to": str(out)})}
    )
    return Message(content=content, reply_to=msg)
