"""Hostile participants against the real apps, end to end in Flower's simulation runtime.

Two runs of the real ServerApp and ClientApp (``server_app.app``, and
``client_app.app:app`` with its mods, wrapped by a ClientApp that corrupts its
replies) with 4 tiny BERT clients, mode ``fedgrow``, FedAvg:

* **honest**: every node trains honestly; in the final phase partitions 1-3
  corrupt their replies (one attack each, :data:`FINAL_ATTACKS`);
* **attacked**: partition 3 claims 10**12 training rows in preflight, trains
  honestly, then corrupts its real reply with a different attack every round
  (:data:`TRAIN_ATTACKS`).

Both runs must finish and write their outputs; every hostile reply must be
recorded as rejected with its reason, or, where the reply is well formed but
steers (a huge weight, huge values), bounded: weight capped at the node's
preflight rows and update clipped. The attacked run's final Global-LiGO must
stay within the honest run's own movement of it:
``||G_attacked - G_honest|| <= ||G_honest - G_init||``.

The server-side attacks on an honest client (wrong phase, path-escaping
run-tag, resume without state, error text) are in ``test_trust_boundary.py``.
"""

import json
import math
import sys

import numpy as np
import pytest
from conftest import reviews_csv, tiny_bert_folder
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from safetensors.numpy import load_file
from simulated_federation import simulate_fedgrow_server, with_run_config

import client_app.app as fedgrow_client
from fedgrow_core.protocol import initial_global_ligo
from fedgrow_core.run_config import RunConfig
from server_app.persistence.checkpoint import read_checkpoint

NODES = 4
HOSTILE = 3
#: Set before each simulation; shipped to the Ray workers with this module (by value).
RUN_CONFIG: dict = {}
SCENARIO: dict = {}


def _replace(reply: Message, msg: Message, arrays=None, metrics=None, **records) -> Message:
    """A new reply to ``msg`` with ``reply``'s records, some replaced."""
    content = RecordDict(
        {
            "arrays": reply.content["arrays"] if arrays is None else ArrayRecord(arrays),
            "metrics": MetricRecord({**dict(reply.content["metrics"]), **(metrics or {})}),
        }
    )
    for name, record in records.items():
        content[name] = record
    return Message(content, reply_to=msg)


def _scaled(reply: Message, msg: Message, factor: float) -> dict:
    sent = msg.content["arrays"]
    return {
        k: Array(sent[k].numpy() + factor * (a.numpy() - sent[k].numpy())) for k, a in reply.content["arrays"].items()
    }


#: round -> (attack, what the server must do: "rejected" with this phrase, or "bounded").
TRAIN_ATTACKS = {
    1: ("one extra metric key", "rejected", "unexpected metrics ['x']"),
    2: ("list metric of another length", "rejected", "'train-loss' = [1.0, 2.0]: expected a single number"),
    3: ("NaN inside a list metric", "rejected", "'eval-accuracy' = [nan]"),
    4: ("1,000,000-element metric list", "rejected", "(1000000 values)"),
    5: ("extra ConfigRecord, 10 MB", "rejected", "extra ['blob']"),
    6: ("foreign tensor names", "rejected", "unexpected tensors"),
    7: ("num-examples 2**39 with a 1000x poisoned update", "bounded", ""),
    8: ("finite but huge values (3e38)", "bounded", ""),
    9: ("sign-flipped update, 50x", "bounded", ""),
    10: ("Array metadata that lies about its bytes", "rejected", "decodes to (3,) float32"),
}


def _train_attack(server_round: int, reply: Message, msg: Message) -> Message:
    if server_round == 1:
        return _replace(reply, msg, metrics={"x": 1.0})
    if server_round == 2:
        return _replace(reply, msg, metrics={"train-loss": [1.0, 2.0]})
    if server_round == 3:
        return _replace(reply, msg, metrics={"eval-accuracy": [float("nan")]})
    if server_round == 4:
        return _replace(reply, msg, metrics={"train-accuracy": [0.5] * 1_000_000})
    if server_round == 5:
        return _replace(reply, msg, blob=ConfigRecord({"blob": "x" * 10_000_000}))
    if server_round == 6:
        return _replace(reply, msg, arrays={f"x.{k}": a for k, a in reply.content["arrays"].items()})
    if server_round == 7:
        return _replace(reply, msg, arrays=_scaled(reply, msg, 1000.0), metrics={"num-examples": 2**39})
    if server_round == 8:
        huge = {k: Array(np.full(a.shape, 3e38, np.float32)) for k, a in reply.content["arrays"].items()}
        return _replace(reply, msg, arrays=huge)
    if server_round == 9:
        return _replace(reply, msg, arrays=_scaled(reply, msg, -50.0))
    arrays = dict(reply.content["arrays"].items())
    name, honest = next(iter(arrays.items()))
    small = Array(np.zeros(3, np.float32))  # the right shape declared, three values sent
    arrays[name] = Array(dtype=honest.dtype, shape=honest.shape, stype=honest.stype, data=small.data)
    return _replace(reply, msg, arrays=arrays)


#: partition -> (attack on its final-phase reply, the server's reason)
FINAL_ATTACKS = {
    1: ("no info record", "missing ['info']"),
    2: ("accuracy = [1.0, 2.0]", "'accuracy' = [1.0, 2.0]: expected a single number"),
    3: ("accuracy = 1e308", "'accuracy' = 1e+308: expected a number in [0, 1]"),
}


def _final_attack(pid: int, reply: Message, msg: Message) -> Message:
    metrics = dict(reply.content["metrics"])
    if pid == 1:
        return Message(RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)
    metrics["accuracy"] = [1.0, 2.0] if pid == 2 else 1e308
    return Message(RecordDict({"metrics": MetricRecord(metrics), "info": reply.content["info"]}), reply_to=msg)


client = ClientApp()


def _with_config(context: Context) -> Context:
    return with_run_config(context, RUN_CONFIG)


@client.query()
def query(msg: Message, context: Context) -> Message:
    reply = fedgrow_client.app(msg, _with_config(context))  # the real ClientApp, its mods included
    if SCENARIO.get("train") and int(context.node_config["partition-id"]) == HOSTILE:
        metrics = {**dict(reply.content["metrics"]), "train-examples": 10**12}  # claims to outweigh everyone
        return Message(RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)
    return reply


@client.train()
def train(msg: Message, context: Context) -> Message:
    reply = fedgrow_client.app(msg, _with_config(context))
    pid = int(context.node_config["partition-id"])
    if SCENARIO.get("train") and pid == HOSTILE and not reply.has_error():
        return _train_attack(int(msg.content["config"]["server-round"]), reply, msg)
    return reply


@client.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    reply = fedgrow_client.app(msg, _with_config(context))
    pid = int(context.node_config["partition-id"])
    if SCENARIO.get("final") and pid in FINAL_ATTACKS and not reply.has_error():
        return _final_attack(pid, reply, msg)
    return reply


def _simulate(config: dict, scenario: dict) -> None:
    RUN_CONFIG.clear()
    RUN_CONFIG.update(config)
    SCENARIO.clear()
    SCENARIO.update(scenario)
    simulate_fedgrow_server(client, RUN_CONFIG, NODES, sys.modules[__name__])


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hostile")
    models = [tiny_bert_folder(tmp / "bert-a", 1, 32, 2, 64, 0), tiny_bert_folder(tmp / "bert-b", 2, 32, 2, 64, 1)]
    reviews_csv(tmp / "reviews.csv", 240)
    base = {
        "dataset": str(tmp / "reviews.csv"),
        "client-models": ",".join(models),
        "intermediate-shape": "2x32x64x2",
        "target-shape": "3x48x96x3",
        "num-server-rounds": len(TRAIN_ATTACKS),
        "local-steps": 2,
        "batch-size": 16,
        "max-length": 32,
        "eval-max-examples": 16,
        "finetune-steps": 1,
        "partitioner": "iid",
        "save-models": False,
        "cache-dir": str(tmp / "cache"),
        "round-timeout": 300.0,
        # the attacks rewrite values; attacks on int8 updates: tests/test_update_encoding.py
        "update-encoding": "float32",
    }
    _simulate({**base, "output-dir": str(tmp / "honest")}, {"final": True})
    _simulate({**base, "output-dir": str(tmp / "attacked")}, {"train": True})
    (honest,) = (tmp / "honest").glob("*-text-geometric-median")
    (attacked,) = (tmp / "attacked").glob("*-text-geometric-median")
    return honest, attacked, RunConfig.from_flower(base)


def _node_of(run_dir) -> dict[int, int]:
    summary = json.loads((run_dir / "summary.json").read_text())
    return {c["partition_id"]: c["node_id"] for c in summary["clients"]}


def test_every_training_attack_is_rejected_or_bounded_and_the_run_finishes(runs):
    _, attacked, _ = runs
    assert (attacked / "summary.json").is_file() and (attacked / "global_ligo.safetensors").is_file()
    hostile = _node_of(attacked)[HOSTILE]
    entries = read_checkpoint(attacked).entries
    assert [e["round"] for e in entries] == list(TRAIN_ATTACKS)
    for entry in entries:
        attack, outcome, phrase = TRAIN_ATTACKS[entry["round"]]
        reasons = {r["node_id"]: r["reason"] for r in entry["rejected"]}
        assert entry["aggregated"], attack
        if outcome == "rejected":
            assert phrase in reasons.get(hostile, ""), (attack, reasons)
            assert len(entry["accepted_nodes"]) == NODES - 1 and hostile not in entry["accepted_nodes"]
            assert str(hostile) not in entry["client_metrics"], "a rejected reply's metrics reached the log"
        else:
            assert hostile in entry["accepted_nodes"] and not reasons, (attack, reasons)
            assert [c["node_id"] for c in entry["clipped"]] == [hostile], (attack, entry["clipped"])


def test_the_attacked_global_ligo_stays_within_the_honest_runs_movement(runs):
    honest, attacked, run = runs
    start = {k: v.detach().numpy() for k, v in initial_global_ligo(run).state_dict().items()}
    g_honest = load_file(str(honest / "global_ligo.safetensors"))
    g_attacked = load_file(str(attacked / "global_ligo.safetensors"))
    assert set(g_honest) == set(g_attacked) == set(start)

    def distance(a, b):
        return math.sqrt(sum(float(((a[k].astype(np.float64) - b[k]) ** 2).sum()) for k in start))

    moved, steered = distance(g_honest, start), distance(g_attacked, g_honest)
    assert moved > 0, "the honest run did not move the Global-LiGO: the bound would be empty"
    assert all(np.isfinite(v).all() for v in g_attacked.values())
    assert steered <= moved, f"||G_attacked - G_honest|| = {steered:.4g} > ||G_honest - G_init|| = {moved:.4g}"


def test_hostile_final_replies_are_rejected_and_the_summary_written_from_the_honest_ones(runs):
    honest, _, _ = runs
    summary = json.loads((honest / "summary.json").read_text())
    assert [c["partition_id"] for c in summary["clients"]] == [0]
    assert summary["mean_accuracy"] == summary["clients"][0]["accuracy"] <= 1.0
    reasons = [r["reason"] for r in summary["final_rejected"]]
    assert len(reasons) == len(FINAL_ATTACKS)
    for _, phrase in FINAL_ATTACKS.values():
        assert any(phrase in r for r in reasons), (phrase, reasons)
