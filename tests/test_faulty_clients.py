"""Hostile, failing and slow ClientApps in Flower's simulation runtime: the Global-LiGO is never harmed.

Each test runs real ``run_simulation`` rounds of the server's
:func:`server_app.orchestration.phases.shared_rounds` (the configured, checked strategy)
against ClientApps that misbehave by partition id, and compares the final shared
tensors with an independent computation from the honest replies alone.
"""

import logging
import sys
import time

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp.strategy import FedAdam
from simulated_federation import WARMUP, phase_of, simulate, train_metrics, warmup_reply

from fedgrow_core.run_config import RunConfig

# Stand-ins for Global-LiGO tensors (names as LiGO's state_dict gives them).
SENT = {"width.res": np.zeros((4, 3), np.float32), "depth.attn_q_weight": np.ones((2, 3), np.float32)}
HONEST = {0: (1.0, 10), 1: (3.0, 30)}  # partition -> (update added to every tensor, num-examples)
HOSTILE = {  # partition -> (what it does wrong, a phrase of the server's reason)
    2: ("extra Local-LiGO tensor", "unexpected tensors"),
    3: ("extra small-model tensor", "unexpected tensors"),
    4: ("missing tensor", "missing Global-LiGO tensors"),
    5: ("wrong shape", "has shape"),
    6: ("wrong dtype", "has dtype float64"),
    7: ("NaN", "NaN or Inf"),
    8: ("Inf", "NaN or Inf"),
    9: ("num-examples 0", "'num-examples' = 0: expected an integer in [1, "),
    10: ("num-examples 2.5", "'num-examples' = 2.5: expected an integer"),
    11: ("num-examples missing", "'num-examples' is missing"),
}


def _reply(msg, arrays, metrics):
    record = ArrayRecord({k: torch.from_numpy(np.asarray(v)) for k, v in arrays.items()})
    return Message(RecordDict({"arrays": record, "metrics": MetricRecord(metrics)}), reply_to=msg)


hostile_app = ClientApp()


@hostile_app.train()
def hostile_train(msg: Message, context: Context) -> Message:
    if phase_of(msg) == WARMUP:
        return warmup_reply(msg, context)
    pid = int(context.node_config["partition-id"])
    received = {k: v.numpy() for k, v in msg.content["arrays"].items()}
    if pid in HONEST:
        step, n = HONEST[pid]
        return _reply(msg, {k: v + step for k, v in received.items()}, train_metrics(n))
    arrays, metrics = {k: v + 100.0 for k, v in received.items()}, train_metrics(10)
    if pid == 2:
        arrays["local.width.res"] = np.zeros((4, 3), np.float32)
    elif pid == 3:
        arrays["small.bert.embeddings.word_embeddings.weight"] = np.zeros((8, 3), np.float32)
    elif pid == 4:
        del arrays["depth.attn_q_weight"]
    elif pid == 5:
        arrays["width.res"] = np.zeros((4, 4), np.float32)
    elif pid == 6:
        arrays["width.res"] = arrays["width.res"].astype(np.float64)
    elif pid == 7:
        arrays["width.res"][0, 0] = np.nan
    elif pid == 8:
        arrays["width.res"][1, 1] = np.inf
    elif pid == 9:
        metrics["num-examples"] = 0
    elif pid == 10:
        metrics["num-examples"] = 2.5
    elif pid == 11:
        del metrics["num-examples"]
    return _reply(msg, arrays, metrics)


def _honest_fedavg(arrays):
    total = sum(n for _, n in HONEST.values())
    return {k: v + sum(step * n for step, n in HONEST.values()) / total for k, v in arrays.items()}


def _honest_fedadam(arrays, rounds):
    """Flower's plain FedAdam fed only the honest replies, round by round (the independent computation)."""
    strategy = FedAdam()
    for server_round in range(1, rounds + 1):
        strategy.current_arrays = {k: v.copy() for k, v in arrays.items()}
        replies = [_content_message({k: v + step for k, v in arrays.items()}, n) for step, n in HONEST.values()]
        aggregated, _ = strategy.aggregate_train(server_round, replies)
        arrays = {k: v.numpy() for k, v in aggregated.items()}
    return arrays


class _Received:
    """A received reply: content, ``has_error()`` and ``metadata.src_node_id``, as FedAdam reads them."""

    def __init__(self, content):
        self.content = content
        self.metadata = type("Meta", (), {"src_node_id": 0})()

    def has_error(self):
        return False

    def has_content(self):
        return True


def _content_message(arrays, n):
    record = ArrayRecord({k: torch.from_numpy(np.asarray(v, np.float32)) for k, v in arrays.items()})
    return _Received(RecordDict({"arrays": record, "metrics": MetricRecord({"num-examples": n})}))


@pytest.mark.parametrize("strategy", ["fedavg", "fedadam"])
def test_hostile_replies_are_rejected_logged_counted_and_never_aggregated(strategy, caplog):
    # clipping off: this test isolates the reply checks (the two honest updates differ 3x in norm)
    run = RunConfig(strategy=strategy, round_timeout=120.0, clip_update_median=0.0, update_encoding="float32")
    rounds = 2
    with caplog.at_level(logging.INFO):
        final, entries, partitions = simulate(hostile_app, run, 12, SENT, rounds, sys.modules[__name__])
    assert sorted(partitions.values()) == list(range(12)), partitions
    node_of = {pid: node for node, pid in partitions.items()}
    assert len(entries) == rounds
    for entry in entries:
        assert sorted(entry["accepted_nodes"]) == sorted(node_of[p] for p in HONEST)
        reasons = {r["node_id"]: r["reason"] for r in entry["rejected"]}
        assert set(reasons) == {node_of[p] for p in HOSTILE}
        for pid, (_, phrase) in HOSTILE.items():
            assert phrase in reasons[node_of[pid]], (pid, reasons[node_of[pid]])
            assert f"rejected reply from node {node_of[pid]}: {reasons[node_of[pid]]}" in caplog.text
    if strategy == "fedavg":
        expected = _honest_fedavg(_honest_fedavg(SENT))
    else:
        expected = _honest_fedadam(SENT, rounds)
    for name, value in expected.items():
        np.testing.assert_allclose(final[name], value, rtol=1e-6, atol=1e-6)
    assert "round 2: 2/12 replies accepted, 10 rejected" in caplog.text
    assert "'rejected-replies': 10" in caplog.text  # the round's aggregated metrics count them


ROUND_TIMEOUT = 5.0
flaky_app = ClientApp()


@flaky_app.train()
def flaky_train(msg: Message, context: Context) -> Message:
    """Partition 0 is honest; 1 raises in rounds 1 and 3; 2 is too slow in round 2 and raises in 3; 3 raises in 3."""
    if phase_of(msg) == WARMUP:
        return warmup_reply(msg, context)
    pid = int(context.node_config["partition-id"])
    seen = int(msg.content["config"]["server-round"])  # set by Flower's FedAvg.configure_train
    if (pid == 1 and seen in (1, 3)) or (pid in (2, 3) and seen == 3):
        raise RuntimeError(f"partition {pid} fails in round {seen}")
    if pid == 2 and seen == 2:
        time.sleep(ROUND_TIMEOUT + 2)
    received = {k: v.numpy() for k, v in msg.content["arrays"].items()}
    return _reply(msg, {k: v + 1.0 for k, v in received.items()}, train_metrics(10))


def test_failing_and_slow_clients_do_not_stop_the_run_and_min_train_nodes_decides():
    run = RunConfig(round_timeout=ROUND_TIMEOUT, min_train_nodes=2, update_encoding="float32")
    final, entries, partitions = simulate(flaky_app, run, 4, SENT, 3, sys.modules[__name__])
    node_of = {pid: node for node, pid in partitions.items()}
    took_part = [sorted(e["accepted_nodes"]) for e in entries]
    assert took_part == [
        sorted(node_of[p] for p in (0, 2, 3)),  # 1 raised
        sorted(node_of[p] for p in (0, 1, 3)),  # 2 timed out
        [node_of[0]],  # 1, 2 and 3 raised: 1 usable reply < min-train-nodes = 2
    ]
    assert [sorted(f["node_id"] for f in e["failed_nodes"]) for e in entries] == [
        [node_of[1]],
        [],
        sorted(node_of[p] for p in (1, 2, 3)),
    ]
    assert "partition 1 fails in round 1" in entries[0]["failed_nodes"][0]["reason"]
    assert [e["missing_nodes"] for e in entries] == [[], [node_of[2]], []]
    assert [e["aggregated"] for e in entries] == [True, True, False]
    for name, value in SENT.items():  # rounds 1 and 2 added 1.0 each; round 3 changed nothing
        np.testing.assert_array_equal(final[name], value + 2.0)
