"""Central DP through config: Flower's server-side clipping wrappers around the checked strategy, in simulation."""

import sys

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp.strategy import (
    DifferentialPrivacyServerSideAdaptiveClipping,
    DifferentialPrivacyServerSideFixedClipping,
)
from simulated_federation import WARMUP, phase_of, simulate, train_metrics, warmup_reply

from fedgrow_core.run_config import ConfigError, RunConfig
from fedgrow_core.update_encoding import encode_update
from server_app.orchestration.strategy import strategy_for_run
from server_app.trust.checked_round import ReplyChecks

SENT = {"width.res": np.zeros((200, 50), np.float32), "depth.attn_q_weight": np.zeros((100, 50), np.float32)}
CLIP, NOISE, UPDATE_NORM = 0.5, 2.0, 300.0
#: Fixed clipping; the test clients reply with values, so float32 transport.
DP_RUN = RunConfig(
    strategy="fedavg",
    dp_clipping="fixed",
    dp_clipping_norm=CLIP,
    dp_noise_multiplier=NOISE,
    round_timeout=120.0,
    update_encoding="float32",
)


def _update(pid):
    """Partition ``pid``'s update of every tensor: a fixed random direction, L2 norm 300 over all tensors."""
    rng = np.random.default_rng(pid)
    parts = {k: rng.standard_normal(v.shape).astype(np.float32) for k, v in SENT.items()}
    norm = np.sqrt(sum(float((p**2).sum()) for p in parts.values()))
    return {k: (UPDATE_NORM * p / norm).astype(np.float32) for k, p in parts.items()}


dp_app = ClientApp()


@dp_app.train()
def dp_train(msg: Message, context: Context) -> Message:
    if phase_of(msg) == WARMUP:
        return warmup_reply(msg, context)
    pid = int(context.node_config["partition-id"])
    arrays = {k: v.numpy() + _update(pid)[k] for k, v in msg.content["arrays"].items()}
    if pid == 2:  # malformed: must be dropped before clipping (clipping would fail on it)
        arrays["width.res"] = np.zeros((3, 3), np.float32)
    record = ArrayRecord({k: torch.from_numpy(v) for k, v in arrays.items()})
    return Message(RecordDict({"arrays": record, "metrics": MetricRecord(train_metrics(10))}), reply_to=msg)


def test_fixed_clipping_clips_each_update_and_adds_the_stated_noise():
    run = DP_RUN
    final, entries, partitions = simulate(dp_app, run, 2, SENT, 1, sys.modules[__name__])
    honest = [0, 1]
    # independent computation: each update scaled to norm CLIP, averaged with equal weights
    noiseless = {k: np.mean([CLIP / UPDATE_NORM * _update(p)[k] for p in honest], axis=0) for k in SENT}
    residual = np.concatenate([(final[k] - noiseless[k]).ravel() for k in SENT])
    expected_std = NOISE * CLIP / 2  # Flower divides by the sampled clients
    assert abs(residual.mean()) < 0.05 * expected_std
    assert residual.std() == pytest.approx(expected_std, rel=0.03)
    # unclipped, the two updates (norm 300) would add a std of about 1.7 per value to the residual: 5x the noise
    (entry,) = entries
    assert sorted(partitions[n] for n in entry["accepted_nodes"]) == honest and entry["aggregated"]


int8_app = ClientApp()


@int8_app.train()
def int8_train(msg: Message, context: Context) -> Message:
    """An honest client that sends its update as int8 (``update-encoding = "int8"``)."""
    if phase_of(msg) == WARMUP:
        return warmup_reply(msg, context)
    pid = int(context.node_config["partition-id"])
    received = {k: torch.from_numpy(v.numpy()) for k, v in msg.content["arrays"].items()}
    new = {k: v + torch.from_numpy(_update(pid)[k]) for k, v in received.items()}
    arrays, _ = encode_update(new, received, {}, "int8")
    record = ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})
    return Message(RecordDict({"arrays": record, "metrics": MetricRecord(train_metrics(10))}), reply_to=msg)


def test_central_dp_clips_and_noises_the_decoded_int8_updates():
    """The server decodes int8 updates before Flower's DP wrapper: clipped to CLIP, noised as with float32 values."""
    run = DP_RUN.model_copy(update={"update_encoding": "int8"})
    final, entries, _ = simulate(int8_app, run, 2, SENT, 1, sys.modules[__name__])
    (entry,) = entries
    assert entry["aggregated"] and len(entry["accepted_nodes"]) == 2
    noiseless = {k: np.mean([CLIP / UPDATE_NORM * _update(p)[k] for p in (0, 1)], axis=0) for k in SENT}
    residual = np.concatenate([(final[k] - noiseless[k]).ravel() for k in SENT])
    # int8 rounding of a norm-300 update moves each clipped value by at most CLIP / 300 * scale / 2: far below the noise
    assert residual.std() == pytest.approx(NOISE * CLIP / 2, rel=0.03)


def test_a_rejected_reply_skips_the_dp_round_instead_of_noising_fewer_clients_for_more():
    # Flower's rule (any failed reply: skip the round) also holds for replies our checks reject
    run = DP_RUN
    final, entries, partitions = simulate(dp_app, run, 3, SENT, 1, sys.modules[__name__])
    (entry,) = entries
    assert [partitions[r["node_id"]] for r in entry["rejected"]] == [2]
    assert not entry["aggregated"]
    for name, value in SENT.items():
        np.testing.assert_array_equal(final[name], value)


@pytest.mark.parametrize(
    "clipping,cls",
    [
        ("fixed", DifferentialPrivacyServerSideFixedClipping),
        ("adaptive", DifferentialPrivacyServerSideAdaptiveClipping),
    ],
)
def test_config_picks_flowers_wrapper_with_checks_outside(clipping, cls):
    run = RunConfig(
        strategy="fedavg", dp_clipping=clipping, dp_noise_multiplier=1.0, dp_clipping_norm=0.3, min_train_nodes=2
    )
    strategy = strategy_for_run(run, 4)
    assert isinstance(strategy, cls) and isinstance(strategy, ReplyChecks)
    assert type(strategy).__mro__.index(ReplyChecks) < type(strategy).__mro__.index(cls)
    if clipping == "fixed":
        assert strategy.noise_multiplier == 1.0
    else:  # Andrew et al. 2021: the count gets std max(4 / 20, z) = 1, the update (z^-2 - (2 * 1)^-2)^-1/2
        assert strategy.clipped_count_stddev == 1.0
        assert strategy.noise_multiplier == pytest.approx((1.0 - 0.25) ** -0.5)
    assert strategy.num_sampled_clients == 4
    assert strategy.checks.min_replies == 2 and strategy.checks.requires_all_replies
    assert not isinstance(strategy.strategy, ReplyChecks)
    assert strategy.clipping_norm == 0.3


def test_bad_dp_config_fails_before_training():
    with pytest.raises(ConfigError) as err:
        RunConfig.from_flower({"dp-clipping": "gaussian", "dp-noise-multiplier": -1.0, "dp-clipping-norm": 0.0})
    text = str(err.value)
    for part in ("dp-clipping = 'gaussian'", "dp-noise-multiplier = -1.0", "dp-clipping-norm = 0.0"):
        assert part in text
    with pytest.raises(ValueError, match="min-train-nodes = 5"):
        strategy_for_run(RunConfig(strategy="fedavg", dp_clipping="fixed", min_train_nodes=5), 4)
