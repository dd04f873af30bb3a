"""Server checkpoints: strategy state, RNG and atomic writes (the end-to-end resume is in test_resume.py)."""

import os
import random

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, MetricRecord, RecordDict
from simulated_federation import train_metrics
from test_strategy import SENT, SPEC, _Reply

from fedgrow_core.run_config import RunConfig
from server_app.orchestration.strategy import build_strategy, strategy_for_run
from server_app.persistence.checkpoint import load_strategy_state, read_checkpoint, strategy_state, write_checkpoint
from server_app.trust.checked_round import RoundChecks


def _update(round_number, node):
    """A deterministic client reply for a round."""
    rng = np.random.default_rng(100 * round_number + node)
    arrays = ArrayRecord({k: Array((v + rng.normal(size=v.shape)).astype(np.float32)) for k, v in SENT.items()})
    return _Reply(node, RecordDict({"arrays": arrays, "metrics": MetricRecord(train_metrics(10 * node))}))


def _round(strategy, round_number, current):
    """One aggregation of the clients' replies to run round ``round_number + strategy.checks.round_offset``."""
    strategy.current_arrays = {k: v.numpy() for k, v in current.items()}  # what FedOpt's configure_train sets
    updates = [_update(round_number + strategy.checks.round_offset, n) for n in (1, 2)]
    arrays, _ = strategy.aggregate_train(round_number, updates)
    return arrays


def test_fedadam_resumed_from_a_checkpoint_takes_the_uninterrupted_third_step(tmp_path):
    run = RunConfig(strategy="fedadam")
    start = ArrayRecord({k: Array(v) for k, v in SENT.items()})
    uninterrupted = build_strategy("fedadam", 2, 1.0, checks=RoundChecks(expected_spec=SPEC))
    arrays = start
    for r in (1, 2, 3):
        arrays = _round(uninterrupted, r, arrays)

    first = build_strategy("fedadam", 2, 1.0, checks=RoundChecks(expected_spec=SPEC))
    after_two = _round(first, 2, _round(first, 1, start))
    write_checkpoint(tmp_path, run, 2, after_two, first, first.round_log)
    checkpoint = read_checkpoint(tmp_path)
    assert checkpoint.server_round == 2 and [e["round"] for e in checkpoint.entries] == [1, 2]

    resumed = build_strategy("fedadam", 2, 1.0, checks=RoundChecks(expected_spec=SPEC, round_offset=2))
    load_strategy_state(resumed, checkpoint.strategy)
    third = _round(resumed, 1, checkpoint.global_ligo)  # Strategy.start counts from 1 again
    for key, value in arrays.items():
        np.testing.assert_allclose(third[key].numpy(), value.numpy(), rtol=1e-6)

    # the same round without the moments
    forgetful = build_strategy("fedadam", 2, 1.0, checks=RoundChecks(expected_spec=SPEC, round_offset=2))
    other = _round(forgetful, 1, checkpoint.global_ligo)
    assert not all(np.allclose(other[k].numpy(), v.numpy(), rtol=1e-6) for k, v in arrays.items())


def test_adaptive_clipping_norm_is_part_of_the_strategy_state():
    run = RunConfig(strategy="fedavg", dp_clipping="adaptive", dp_noise_multiplier=0.5)
    strategy = strategy_for_run(run, 3)
    strategy.clipping_norm = 0.37
    state = strategy_state(strategy)
    fresh = strategy_for_run(run, 3)
    assert fresh.clipping_norm != 0.37
    load_strategy_state(fresh, state)
    assert fresh.clipping_norm == 0.37


def test_python_and_numpy_rngs_come_back(tmp_path):
    strategy = build_strategy("fedavg", 2, 1.0)
    random.seed(3)
    np.random.seed(4)
    write_checkpoint(tmp_path, RunConfig(), 1, ArrayRecord({k: Array(v) for k, v in SENT.items()}), strategy, [])
    expected = (random.random(), np.random.normal())
    random.seed(99)
    np.random.seed(99)
    read_checkpoint(tmp_path).restore_rng()
    assert (random.random(), np.random.normal()) == expected


def test_a_crash_while_writing_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    strategy = build_strategy("fedavg", 2, 1.0)
    first = ArrayRecord({k: Array(v) for k, v in SENT.items()})
    write_checkpoint(tmp_path, RunConfig(), 1, first, strategy, [])

    def crash(src, dst):
        raise OSError("disk gone")

    monkeypatch.setattr(os, "replace", crash)
    second = ArrayRecord({k: Array(v + 1) for k, v in SENT.items()})
    with pytest.raises(OSError, match="disk gone"):
        write_checkpoint(tmp_path, RunConfig(), 2, second, strategy, [])
    monkeypatch.undo()
    kept = read_checkpoint(tmp_path)
    assert kept.server_round == 1
    for key, value in SENT.items():
        np.testing.assert_array_equal(kept.global_ligo[key].numpy(), value)
