"""Server side: reply checks, and every strategy (by name or import path) gets them."""

import logging
import re

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAdam, FedAvg
from simulated_federation import train_metrics

from server_app.orchestration.strategy import BUILTIN_STRATEGIES, FedGrow, build_strategy, resolve_strategy
from server_app.trust.checked_round import ReplyChecks, RoundChecks
from server_app.trust.reply_checks import array_spec, reply_problem

SENT = {"width.res": np.zeros((2, 3), np.float32), "depth.attn_q_weight": np.ones((4, 2), np.float32)}


def _record(arrays):
    return ArrayRecord({k: torch.from_numpy(np.asarray(v)) for k, v in arrays.items()})


def _content(arrays=None, num_examples=10, **metrics):
    arrays = SENT if arrays is None else arrays
    return RecordDict(
        {
            "arrays": _record(arrays),
            "metrics": MetricRecord(train_metrics(num_examples, **metrics)),
        }
    )


SPEC = array_spec(_record(SENT))


def test_a_well_formed_reply_passes():
    assert reply_problem(_content(), SPEC) is None


@pytest.mark.parametrize(
    "arrays,num_examples,match",
    [
        ({**SENT, "local.width.res": np.zeros((2, 3), np.float32)}, 10, "unexpected tensors .*local.width.res"),
        ({"width.res": SENT["width.res"]}, 10, "missing Global-LiGO tensors: \\['depth.attn_q_weight'\\]"),
        (
            {**SENT, "width.res": np.zeros((3, 3), np.float32)},
            10,
            "'width.res' has shape \\(3, 3\\), expected \\(2, 3\\)",
        ),
        ({**SENT, "width.res": np.zeros((2, 3), np.float64)}, 10, "'width.res' has dtype float64, expected float32"),
        ({**SENT, "width.res": np.full((2, 3), np.nan, np.float32)}, 10, "'width.res' holds NaN or Inf"),
        ({**SENT, "width.res": np.full((2, 3), np.inf, np.float32)}, 10, "NaN or Inf"),
        (None, 0, "'num-examples' = 0: expected an integer in \\[1, "),
        (None, 2.5, "'num-examples' = 2.5: expected an integer"),
        (None, -3, "expected an integer in \\[1, "),
    ],
)
def test_malformed_replies_are_named(arrays, num_examples, match):
    problem = reply_problem(_content(arrays, num_examples), SPEC)
    assert problem is not None
    assert re.search(match, problem), problem


def test_nan_metric_is_rejected():
    assert "train-loss" in reply_problem(_content(None, 10, **{"train-loss": float("nan")}), SPEC)


def test_two_array_records_are_rejected():
    content = _content()
    content["more"] = _record({"x": np.zeros(1, np.float32)})
    assert reply_problem(content, SPEC) == "records: expected ['arrays', 'metrics'], got extra ['more'], missing []"


class _Meta:
    def __init__(self, node):
        self.src_node_id = node


class _Reply:
    """A stand-in for a received Message: content, metadata.src_node_id, has_error()."""

    def __init__(self, node, content):
        self.content, self.metadata = content, _Meta(node)

    def has_error(self):
        return False

    def has_content(self):
        return True


@pytest.mark.parametrize("name", ["fedavg", "fedadam"])
def test_bad_replies_never_reach_aggregation(name, caplog):
    strategy = build_strategy(name, 3, 1.0, checks=RoundChecks(expected_spec=SPEC))
    if name == "fedadam":
        strategy.current_arrays = {k: v.copy() for k, v in SENT.items()}
    good = {k: v + 1.0 for k, v in SENT.items()}
    replies = [
        _Reply(1, _content(good, 10)),
        _Reply(2, _content({**good, "width.res": np.full((2, 3), np.nan, np.float32)}, 10)),
        _Reply(3, _content({**good, "small.embeddings": np.zeros(3, np.float32)}, 10)),
    ]
    with caplog.at_level(logging.WARNING):
        arrays, metrics = strategy.aggregate_train(1, replies)
    assert arrays is not None
    got = [a.numpy() for a in arrays.values()]
    if name == "fedavg":  # the one good reply alone is the average
        for key, value in arrays.items():
            np.testing.assert_array_equal(value.numpy(), good[key])
    assert all(np.isfinite(a).all() for a in got)
    assert metrics["rejected-replies"] == 2
    log = strategy.round_log[-1]
    assert [r["node_id"] for r in log["rejected"]] == [2, 3] and log["accepted_nodes"] == [1]
    assert "rejected reply from node 2" in caplog.text and "NaN or Inf" in caplog.text


def test_every_builtin_strategy_is_checked():
    for name, cls in BUILTIN_STRATEGIES.items():
        strategy = build_strategy(name, 3, 2 / 3, min_train_nodes=2)
        assert isinstance(strategy, ReplyChecks) and isinstance(strategy, cls)
        assert strategy.min_train_nodes == 2 and strategy.min_available_nodes == 2
    assert isinstance(build_strategy("fedavg", 3, 1.0), FedGrow)
    assert issubclass(FedGrow, FedAvg)


class MyStrategy(FedAvg):
    """A user's own strategy, found by import path."""


def test_strategy_by_import_path():
    cls = resolve_strategy("tests.test_strategy:MyStrategy")
    assert cls.__name__ == "MyStrategy" and cls.__doc__ == MyStrategy.__doc__
    strategy = build_strategy("tests.test_strategy:MyStrategy", 3, 1.0)
    assert isinstance(strategy, cls) and isinstance(strategy, ReplyChecks)
    assert resolve_strategy("fedadam") is FedAdam


@pytest.mark.parametrize(
    "name,match",
    [
        ("fedfoo", "unknown strategy 'fedfoo'"),
        ("no_such_module:X", "cannot import strategy 'no_such_module:X'"),
        ("logging:getLogger", "is not a flwr.serverapp.strategy.Strategy subclass"),
    ],
)
def test_bad_strategy_names(name, match):
    with pytest.raises(ValueError, match=match):
        resolve_strategy(name)


def test_fedadam_aggregate_keeps_the_sent_dtype():
    # Flower's FedOpt family returns float64 for float32 input; the Global-LiGO must stay float32 on the wire
    strategy = build_strategy("fedadam", 1, 1.0, checks=RoundChecks(expected_spec=SPEC))
    strategy.current_arrays = {k: v.copy() for k, v in SENT.items()}
    arrays, _ = strategy.aggregate_train(1, [_Reply(1, _content({k: v + 1.0 for k, v in SENT.items()}, 10))])
    assert {k: str(a.dtype) for k, a in arrays.items()} == {k: "float32" for k in SENT}
    plain = FedAdam()
    plain.current_arrays = {k: v.copy() for k, v in SENT.items()}
    reference, _ = plain.aggregate_train(1, [_Reply(1, _content({k: v + 1.0 for k, v in SENT.items()}, 10))])
    assert {str(a.dtype) for a in reference.values()} == {"float64"}  # what the cast guards against
    for key, value in reference.items():
        np.testing.assert_allclose(arrays[key].numpy(), value.numpy(), rtol=1e-6)
