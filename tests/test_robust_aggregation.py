"""The geometric median (RFA) and centred clipping against independent computations, and as Flower strategies."""

import math

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg
from scipy.optimize import minimize

from fedgrow_core.growth.diagnostics import flatten, unflatten
from fedgrow_core.protocol import initial_global_ligo
from fedgrow_core.run_config import RunConfig
from server_app.orchestration.strategy import build_strategy, strategy_for_run
from server_app.persistence.checkpoint import (
    content_problems,
    load_strategy_state,
    read_checkpoint,
    strategy_state,
    write_checkpoint,
)
from server_app.trust.robust_aggregation import CentredClipping, GeometricMedian, centred_clip, geometric_median


def _objective(z, points, weights):
    return float(np.sum(weights * np.linalg.norm(points - z, axis=1)))


def test_geometric_median_minimises_the_weighted_sum_of_distances():
    rng = np.random.default_rng(0)
    points = rng.standard_normal((7, 5))
    weights = rng.uniform(0.5, 3.0, 7)
    median, iterations = geometric_median(points, weights, smoothing=1e-12, max_iter=1000, tol=1e-14)
    best = minimize(
        _objective,
        points.mean(axis=0),
        args=(points, weights),
        method="Nelder-Mead",
        options={"xatol": 1e-10, "fatol": 1e-12, "maxiter": 20000},
    )
    assert iterations > 1
    assert _objective(median, points, weights) <= best.fun + 1e-7
    np.testing.assert_allclose(median, best.x, atol=1e-4)


def test_geometric_median_of_collinear_points_is_the_weighted_median_and_ignores_an_outlier():
    points = np.array([[0.0, 0.0], [1.0, 0.0], [2.0, 0.0], [1e6, 0.0]])
    median, _ = geometric_median(points, [1, 1, 1, 1], smoothing=1e-9, max_iter=1000, tol=1e-15)
    assert 1.0 - 1e-3 <= median[0] <= 2.0 + 1e-3 and abs(median[1]) < 1e-9  # any point of [1, 2] minimises
    median, _ = geometric_median(points, [1, 5, 1, 1], smoothing=1e-9, max_iter=1000, tol=1e-15)
    np.testing.assert_allclose(median, [1.0, 0.0], atol=1e-6)  # a weight above half pins it


@pytest.mark.parametrize(
    ("points", "weights"), [(np.zeros((2, 3, 1)), [1, 1]), (np.zeros((2, 3)), [1]), (np.zeros((2, 3)), [0, 0])]
)
def test_geometric_median_refuses_bad_input_naming_it(points, weights):
    with pytest.raises(ValueError, match="geometric_median"):
        geometric_median(points, weights)


def test_centred_clip_is_the_papers_step():
    rng = np.random.default_rng(1)
    updates, centre = rng.standard_normal((5, 4)), rng.standard_normal(4)
    expected = centre.copy()
    for _ in range(3):
        steps = []
        for u in updates:
            diff = u - expected
            steps.append(diff * min(1.0, 0.7 / np.linalg.norm(diff)))
        expected = expected + sum(steps) / len(steps)
    np.testing.assert_allclose(centred_clip(updates, centre, 0.7, iterations=3), expected, rtol=1e-12)
    # a huge radius is the plain mean; any one update moves the result by at most tau / n
    np.testing.assert_allclose(centred_clip(updates, centre, 1e9), updates.mean(axis=0), rtol=1e-12)
    moved = updates.copy()
    moved[0] = 1e9
    assert np.linalg.norm(centred_clip(moved, centre, 0.7) - centred_clip(updates, centre, 0.7)) <= 2 * 0.7 / 5 + 1e-12


@pytest.mark.parametrize("tau", [0.0, -1.0, math.inf, math.nan])
def test_centred_clip_refuses_a_radius_that_is_not_positive(tau):
    with pytest.raises(ValueError, match="tau"):
        centred_clip(np.zeros((2, 3)), np.zeros(3), tau)


def _reply(arrays: dict, examples: int, task_identity_node: int) -> Message:
    content = RecordDict(
        {
            "arrays": ArrayRecord({k: Array(v.astype(np.float32)) for k, v in arrays.items()}),
            "metrics": MetricRecord({"num-examples": examples, "train-loss": float(task_identity_node)}),
        }
    )
    sent = Message(RecordDict({"config": ConfigRecord({})}), dst_node_id=task_identity_node, message_type="train")
    sent.metadata.__dict__["_message_id"] = f"m{task_identity_node}"
    return Message(content, reply_to=sent)


def test_geometric_median_strategy_aggregates_every_tensor_together(task_identity):
    rng = np.random.default_rng(2)
    replies = [{"a": rng.standard_normal((2, 3)), "b": rng.standard_normal(4)} for _ in range(4)]
    weights = [10, 20, 30, 40]
    strategy = GeometricMedian(fraction_evaluate=0.0)
    arrays, metrics = strategy.aggregate_train(
        1, [_reply(r, w, i + 2) for i, (r, w) in enumerate(zip(replies, weights, strict=True))]
    )
    flat = np.stack(
        [np.concatenate([r["a"].astype(np.float32).ravel(), r["b"].astype(np.float32).ravel()]) for r in replies]
    )
    expected, _ = geometric_median(flat.astype(np.float64), weights)
    got = np.concatenate([arrays["a"].numpy().ravel(), arrays["b"].numpy().ravel()])
    np.testing.assert_allclose(got, expected, rtol=1e-6)
    assert arrays["a"].numpy().dtype == np.float32 and arrays["a"].numpy().shape == (2, 3)
    # metrics are FedAvg's: weighted by num-examples
    assert metrics["train-loss"] == pytest.approx(sum(w * (i + 2) for i, w in enumerate(weights)) / sum(weights))


def test_centred_clipping_strategy_keeps_its_momentum_and_ignores_claimed_weights(task_identity):
    sent = {"w": np.zeros(3, np.float32)}
    strategy = CentredClipping(radius=0.5, fraction_evaluate=0.0)
    strategy.current_arrays = ArrayRecord({k: Array(v) for k, v in sent.items()})
    updates = [np.array([1.0, 0, 0]), np.array([0, 1.0, 0]), np.array([0, 0, 1.0])]
    replies = [_reply({"w": u}, 10 if i else 10**9, i + 2) for i, u in enumerate(updates)]
    arrays, _ = strategy.aggregate_train(1, replies)
    expected = centred_clip(np.stack(updates), np.zeros(3), 0.5)
    np.testing.assert_allclose(arrays["w"].numpy(), expected, rtol=1e-6)  # unweighted: the 10**9 claim counts once
    np.testing.assert_allclose(strategy.centred_clip_momentum["w"], expected)
    # the momentum is checkpointed, checked and restored as FedAdam's moments are
    state = strategy_state(strategy)
    assert set(state["arrays"]) == {"0.centred_clip_momentum.w"}
    fresh = CentredClipping(radius=0.5, fraction_evaluate=0.0)
    load_strategy_state(fresh, state)
    np.testing.assert_allclose(fresh.centred_clip_momentum["w"], expected)
    fresh.current_arrays = strategy.current_arrays
    again = [_reply({"w": u}, 10, i + 2) for i, u in enumerate(updates)]
    second, _ = fresh.aggregate_train(2, again)  # a resumed strategy continues from the same centre
    np.testing.assert_allclose(second["w"].numpy(), centred_clip(np.stack(updates), expected, 0.5), rtol=1e-6)


@pytest.mark.parametrize("name", ["geometric-median", "centred-clipping", "multikrum", "bulyan"])
def test_the_robust_strategies_are_built_by_name_with_the_reply_checks(name):
    from server_app.trust.checked_round import ReplyChecks

    strategy = build_strategy(name, num_nodes=3, fraction_train=1.0)
    assert isinstance(strategy, ReplyChecks)


def test_centred_clipping_refuses_a_negative_radius():
    with pytest.raises(ValueError, match="radius = -1"):
        CentredClipping(radius=-1.0)


def test_a_checkpoint_of_centred_clipping_passes_the_checks_and_restores_the_momentum(tmp_path):
    run = RunConfig(strategy="centred-clipping", num_server_rounds=3)
    strategy = strategy_for_run(run, 3)
    arrays = {k: v.detach().numpy() for k, v in initial_global_ligo(run).state_dict().items()}
    rng = np.random.default_rng(3)
    strategy.centred_clip_momentum = {k: rng.standard_normal(v.shape) for k, v in arrays.items()}
    write_checkpoint(tmp_path, run, 1, ArrayRecord({k: Array(v) for k, v in arrays.items()}), strategy, [])
    checkpoint = read_checkpoint(tmp_path)
    assert content_problems(checkpoint, run) == []
    fresh = strategy_for_run(run, 3)
    load_strategy_state(fresh, checkpoint.strategy)
    for name, value in strategy.centred_clip_momentum.items():
        np.testing.assert_array_equal(fresh.centred_clip_momentum[name], value)
    checkpoint.strategy["arrays"]["0.centred_clip_momentum.x"] = np.zeros(3)  # a name the Global-LiGO does not have
    assert any("0.centred_clip_momentum.x" in p for p in content_problems(checkpoint, run))


def test_with_two_nodes_of_equal_weight_the_geometric_median_is_their_mean():
    rng = np.random.default_rng(4)
    points = rng.standard_normal((2, 6))
    median, _ = geometric_median(points, [1.0, 1.0])
    np.testing.assert_allclose(median, points.mean(axis=0), rtol=1e-12)


def test_centred_clippings_adaptive_radius_refuses_two_replies(task_identity):
    # with two replies a hostile one sending the centre would set the radius to 0 and freeze v
    strategy = CentredClipping(fraction_evaluate=0.0)
    strategy.current_arrays = ArrayRecord({"w": Array(np.zeros(3, np.float32))})
    replies = [_reply({"w": np.array([1.0, 0, 0])}, 10, 2), _reply({"w": np.zeros(3)}, 10, 3)]
    with pytest.raises(ValueError, match="at least 3 replies"):
        strategy.aggregate_train(1, replies)
    fixed = CentredClipping(radius=0.5, fraction_evaluate=0.0)  # a fixed radius serves any number
    fixed.current_arrays = strategy.current_arrays
    arrays, _ = fixed.aggregate_train(1, replies)
    np.testing.assert_allclose(arrays["w"].numpy(), [0.25, 0, 0], rtol=1e-6)


def test_a_users_strategy_may_use_the_state_names_for_other_things():
    class MyStrategy(FedAvg):
        centred_clip_momentum = 0.9  # not a dict of tensors: not state to save
        m_t = "adam"

    state = strategy_state(MyStrategy())
    assert state["arrays"] == {}


def test_multikrums_selection_reaches_flowers_class():
    strategy = strategy_for_run(RunConfig(strategy="multikrum", num_malicious_nodes=1, multikrum_select=2), 5)
    assert strategy.num_nodes_to_select == 2 and strategy.num_malicious_nodes == 1
    tau = strategy_for_run(RunConfig(strategy="centred-clipping", centred_clip_tau=0.3), 5)
    assert tau.radius == 0.3


def test_flatten_and_unflatten_are_inverse_and_unflatten_checks_the_length():
    rng = np.random.default_rng(5)
    tensors = {"a": rng.standard_normal((2, 3)).astype(np.float32), "b": rng.standard_normal(4)}
    vector = flatten(tensors, ["b", "a"])
    np.testing.assert_array_equal(vector, np.concatenate([tensors["b"], tensors["a"].ravel().astype(np.float64)]))
    back = unflatten(vector, tensors, ["b", "a"])
    assert {k: v.shape for k, v in back.items()} == {"a": (2, 3), "b": (4,)}
    for k, v in tensors.items():
        np.testing.assert_array_equal(back[k], v.astype(np.float64))
    with pytest.raises(ValueError, match="expected \\(10,\\)"):
        unflatten(vector[:-1], tensors, ["b", "a"])
