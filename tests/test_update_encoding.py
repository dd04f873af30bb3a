"""Smaller Global-LiGO messages: low-rank and tied width matrices, encoded updates with error feedback, their checks."""

import logging
import re

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, MetricRecord, RecordDict
from simulated_federation import train_metrics
from test_strategy import _Reply

from fedgrow_core import DualLiGO, GrownModel, LiGO, TransformerShape, get_family
from fedgrow_core.accounting import count_parameters
from fedgrow_core.run_config import ConfigError, RunConfig
from fedgrow_core.update_encoding import SCALE_SUFFIX, decode_update, encode_update, encoded_spec
from server_app.orchestration.strategy import build_strategy
from server_app.trust.checked_round import RoundChecks
from server_app.trust.reply_checks import array_spec
from server_app.trust.robust_aggregation import geometric_median
from tests.conftest import make_bert

INTER, TARGET = TransformerShape(2, 32, 64, 4), TransformerShape(3, 48, 96, 6)


def _tensors(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        "depth.attn_q_weight": torch.eye(3, 2) + 0.1 * torch.rand(3, 2, generator=g),
        "width.q": torch.randn(3, 16, 32, generator=g),
        "width.ffn": torch.zeros(3, 0, 64),  # a space that does not grow
    }


@pytest.mark.parametrize(("encoding", "tolerance"), [("float16", 2e-3), ("int8", 2e-2)])
def test_encode_decode_round_trip_and_the_residual_is_what_was_rounded_away(encoding, tolerance):
    received = _tensors(0)
    new = {k: v + 0.05 * torch.randn(v.shape) for k, v in received.items()}
    arrays, residual = encode_update(new, received, {}, encoding)
    spec = {k: (tuple(v.shape), "float32") for k, v in received.items()}
    assert {k: (a.shape, str(a.dtype)) for k, a in arrays.items()} == encoded_spec(spec, encoding)
    values, problem = decode_update(arrays, {k: v.numpy() for k, v in received.items()}, encoding)
    assert problem is None
    assert values["width.ffn"].shape == (3, 0, 64)
    for k in ("depth.attn_q_weight", "width.q"):
        err = np.abs(values[k] - new[k].numpy())
        assert err.max() <= tolerance * max(1e-12, (new[k] - received[k]).abs().max().item()) + 1e-7
        # decoded + residual is the whole update, to float rounding: nothing is lost, only delayed
        np.testing.assert_allclose(values[k] + residual[k].numpy(), new[k].numpy(), atol=1e-6)


def test_float32_sends_the_values_themselves():
    received, new = _tensors(0), _tensors(1)
    arrays, residual = encode_update(new, received, {}, "float32")
    assert residual == {} and all(np.array_equal(arrays[k], new[k].numpy()) for k in new)


@pytest.mark.parametrize("encoding", ["float16", "int8"])
def test_error_feedback_keeps_the_sum_of_decoded_updates_on_the_true_sum(encoding):
    """Over 50 rounds of small updates, what the server applied differs from the truth by the last residual only."""
    g = torch.Generator().manual_seed(3)
    value = {"w": torch.ones(4, 64)}  # entries near 1: a float16 *value* would lose updates of 1e-4
    server = {"w": value["w"].numpy().copy()}
    residual = {}
    for _ in range(50):
        value = {"w": value["w"] + 1e-4 * torch.randn(4, 64, generator=g)}
        arrays, residual = encode_update(value, {"w": torch.from_numpy(server["w"])}, residual, encoding)
        server, problem = decode_update(arrays, server, encoding)
        assert problem is None
    gap = np.abs(server["w"] - value["w"].numpy()).max()
    np.testing.assert_allclose(server["w"] + residual["w"].numpy(), value["w"].numpy(), atol=1e-5)
    assert gap < 2e-5  # one encoding's rounding of a 1e-4-sized update, not 50 of them


def test_int8_rows_are_scaled_independently_and_zero_rows_stay_zero():
    received = {"w": torch.zeros(3, 4)}
    new = {"w": torch.tensor([[1.0, -2.0, 0.5, 0.0], [0.0, 0.0, 0.0, 0.0], [1e-3, 0.0, -1e-3, 2e-3]])}
    arrays, _ = encode_update(new, received, {}, "int8")
    np.testing.assert_allclose(arrays["w" + SCALE_SUFFIX], [2.0 / 127, 0.0, 2e-3 / 127], rtol=1e-6)
    assert arrays["w"][0, 1] == -127 and (arrays["w"][1] == 0).all() and arrays["w"][2, 3] == 127


def _reference_encoding(new, received, residual, encoding):
    """The encoding written out in numpy, float32 throughout: the arrays and ``delta + residual - decoded``."""
    arrays, left = {}, {}
    for name in new:
        delta = new[name].numpy() - received[name].numpy()
        if name in residual:
            delta = delta + residual[name].numpy()
        if encoding == "float16":
            q = np.clip(delta, np.float32(-65504), np.float32(65504)).astype(np.float16)
            arrays[name], left[name] = q, delta - q.astype(np.float32)
            continue
        scale = (
            np.abs(delta).max(axis=-1) / np.float32(127) if delta.shape[-1] else np.zeros(delta.shape[:-1], np.float32)
        )
        safe = np.where(scale > 0, scale, np.float32(1))[..., None]
        q = np.clip(np.round(delta / safe), -127, 127).astype(np.int8)
        arrays[name], arrays[name + SCALE_SUFFIX] = q, scale
        left[name] = delta - q.astype(np.float32) * scale[..., None]
    return arrays, left


@pytest.mark.parametrize("encoding", ["int8", "float16"])
def test_the_encoding_and_its_residual_are_a_plain_numpy_computation_bit_for_bit(encoding):
    """Computed in place, the reply and the residual are exactly the plain ones, and the inputs are left alone."""
    received = {**_tensors(1), "rows": torch.zeros(4, 6)}
    g = torch.Generator().manual_seed(2)
    new = {k: v + 1e-2 * torch.randn(v.shape, generator=g) for k, v in received.items()}
    new["rows"][0] = -0.0  # a row that does not move (signed zeros), and entries that round to -0
    new["rows"][1] = torch.tensor([1.0, -1e-4, 2e-3, -2e-3, 0.0, 1e-9])
    new["width.q"][0, 0, 0] = 1e5  # beyond float16's range: clipped, the excess kept
    residual = {"width.q": 1e-3 * torch.randn(3, 16, 32, generator=g), "rows": torch.full((4, 6), -0.0)}
    inputs = (new, received, residual)
    before = [{k: v.clone() for k, v in d.items()} for d in inputs]
    arrays, left = encode_update(new, received, residual, encoding)
    expected_arrays, expected_left = _reference_encoding(new, received, residual, encoding)
    assert set(arrays) == set(expected_arrays) and set(left) == set(expected_left)
    for name, value in expected_arrays.items():
        assert arrays[name].dtype == value.dtype and arrays[name].tobytes() == value.tobytes(), name
    for name, value in expected_left.items():
        assert left[name].numpy().tobytes() == value.astype(np.float32).tobytes(), name
    for given, kept in zip(inputs, before, strict=True):  # nothing written in place into the caller's tensors
        assert all(given[k].numpy().tobytes() == v.numpy().tobytes() for k, v in kept.items())


SENT = {"width.q": np.zeros((2, 3), np.float32), "depth.x": np.ones((4, 2), np.float32)}


def _encoded_reply(node, encoding, **replace):
    new = {k: torch.from_numpy(v + 0.01 * (node + 1)) for k, v in SENT.items()}
    arrays, _ = encode_update(new, {k: torch.from_numpy(v) for k, v in SENT.items()}, {}, encoding)
    arrays.update(replace)
    content = RecordDict(
        {
            "arrays": ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()}),
            "metrics": MetricRecord(train_metrics(10)),
        }
    )
    return _Reply(node, content)


def _strategy(encoding, name="fedavg"):
    strategy = build_strategy(name, 3, 1.0, checks=RoundChecks(update_encoding=encoding, clip_median=2.0))
    strategy.record_round(1, ArrayRecord({k: Array(v) for k, v in SENT.items()}), [1, 2, 3])
    return strategy


@pytest.mark.parametrize(
    ("encoding", "replace", "reason"),
    [
        ("int8", {"width.q": np.zeros((2, 3), np.float32)}, "'width.q' has dtype float32, expected int8"),
        ("int8", {"width.q" + SCALE_SUFFIX: np.ones(3, np.float32)}, "'width.q.scale' has shape \\(3,\\)"),
        ("int8", {"width.q" + SCALE_SUFFIX: np.full(2, -1.0, np.float32)}, "negative int8 scale"),
        ("int8", {"width.q" + SCALE_SUFFIX: np.full(2, 3e38, np.float32)}, "decodes to NaN or Inf"),
        ("int8", {"width.q" + SCALE_SUFFIX: np.full(2, np.nan, np.float32)}, "'width.q.scale' holds NaN or Inf"),
        ("float16", {"width.q": np.full((2, 3), np.inf, np.float16)}, "'width.q' holds NaN or Inf"),
        ("float16", {"width.q": np.full((2, 3), 6e4, np.float16), "depth.x": np.full((4, 2), 6e4, np.float16)}, None),
        ("int8", {"extra": np.zeros(1, np.int8)}, "unexpected tensors"),
        ("int8", {"width.q": np.full((2, 3), -128, np.int8)}, "int8 value -128"),
    ],
)
def test_malformed_encoded_updates_are_rejected_and_never_aggregated(encoding, replace, reason, caplog):
    strategy = _strategy(encoding)
    replies = [_encoded_reply(1, encoding), _encoded_reply(2, encoding, **replace)]
    with caplog.at_level(logging.WARNING):
        arrays, metrics = strategy.aggregate_train(1, replies)
    entry = strategy.round_log[-1]
    if reason is None:  # large but finite: accepted as far as encoding goes, then bounded by the median clip
        assert entry["accepted_nodes"] == [1, 2] and entry["clipped"][0]["node_id"] == 2
        return
    assert [r["node_id"] for r in entry["rejected"]] == [2] and entry["accepted_nodes"] == [1]
    assert re.search(reason, entry["rejected"][0]["reason"]), entry["rejected"][0]["reason"]
    for k, v in arrays.items():  # the good reply alone, decoded onto what was sent
        np.testing.assert_allclose(v.numpy(), SENT[k] + 0.02, atol=1e-4)


@pytest.mark.parametrize("encoding", ["int8", "float16"])
def test_the_default_geometric_median_aggregates_the_decoded_values(encoding):
    strategy = _strategy(encoding, "geometric-median")
    replies = [_encoded_reply(n, encoding) for n in (1, 2, 3)]
    decoded = [{k: SENT[k] + 0.01 * (n + 1) for k in SENT} for n in (1, 2, 3)]
    arrays, _ = strategy.aggregate_train(1, replies)
    points = np.stack([np.concatenate([d[k].ravel() for k in sorted(SENT)]) for d in decoded]).astype(np.float64)
    expected, _ = geometric_median(points, [10, 10, 10])
    got = np.concatenate([arrays[k].numpy().ravel() for k in sorted(SENT)])
    np.testing.assert_allclose(got, expected, atol=1e-3)  # the encodings round to within 1e-3 here
    assert all(arrays[k].numpy().dtype == np.float32 for k in SENT)


def test_the_server_aggregates_decoded_values_as_fedavg_of_the_clients_values():
    strategy = _strategy("int8")
    arrays, _ = strategy.aggregate_train(1, [_encoded_reply(n, "int8") for n in (1, 2, 3)])
    for k, v in arrays.items():  # clients sent +0.02, +0.03, +0.04 on every entry
        np.testing.assert_allclose(v.numpy(), SENT[k] + 0.03, atol=1e-4)
        assert v.numpy().dtype == np.float32
    assert all(b > 0 for b in strategy.round_log[-1]["upload_bytes"].values())


def test_low_rank_global_ligo_starts_as_the_full_one_and_sends_only_u():
    full, low = LiGO(INTER, TARGET, seed=5), LiGO(INTER, TARGET, seed=5, rank=4)
    for space, exp in full.expansions().items():
        torch.testing.assert_close(low.expansions()[space].e, exp.e, rtol=0, atol=0)
    assert {k: tuple(v.shape) for k, v in low.state_dict().items() if k.startswith("width.")} == {
        "width.res": (16, 4),
        **{f"width.{s}": (3, 16, 4) for s in "qkv"},
        "width.ffn": (3, 32, 4),
    }
    for name, value in full.state_dict().items():  # the depth coefficients are untouched
        if name.startswith("depth."):
            torch.testing.assert_close(low.state_dict()[name], value)


def test_fedavg_of_u_is_exactly_fedavg_of_e():
    """E = S + U V^T with S, V shared: the strategy's FedAvg of the clients' U gives the average of their E's."""
    clients = [LiGO(INTER, TARGET, seed=5, rank=4) for _ in range(3)]
    rows = [10, 30, 60]
    for i, op in enumerate(clients):
        with torch.no_grad():
            for p in op.width.values():
                p.copy_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(i)))
    averaged = LiGO(INTER, TARGET, seed=5, rank=4)
    sent = {k: v.numpy() for k, v in averaged.state_dict().items()}
    strategy = build_strategy("fedavg", 3, 1.0, checks=RoundChecks(clip_median=0.0))  # the plain weighted average
    strategy.record_round(1, ArrayRecord({k: Array(v) for k, v in sent.items()}), [1, 2, 3])
    replies = [
        _Reply(
            i + 1,
            RecordDict(
                {
                    "arrays": ArrayRecord({k: Array(v.numpy()) for k, v in op.state_dict().items()}),
                    "metrics": MetricRecord(train_metrics(n)),
                }
            ),
        )
        for i, (op, n) in enumerate(zip(clients, rows, strict=True))
    ]
    arrays, _ = strategy.aggregate_train(1, replies)
    averaged.load_state_dict({k: torch.from_numpy(a.numpy()) for k, a in arrays.items()})
    for space in averaged.width:
        want = sum(n / 100 * op.width_matrix(space) for n, op in zip(rows, clients, strict=True))
        torch.testing.assert_close(averaged.width_matrix(space), want, rtol=1e-5, atol=1e-6)
    # the averaged U is not any client's: the test would fail if only one reply were used
    assert all(not torch.equal(averaged.width["q"], op.width["q"]) for op in clients)


def test_a_float16_update_beyond_its_range_is_clipped_and_the_excess_kept():
    received, new = {"w": torch.zeros(2, 2)}, {"w": torch.tensor([[1e5, -1e5], [1.0, 0.0]])}
    arrays, residual = encode_update(new, received, {}, "float16")
    assert np.isfinite(arrays["w"]).all() and arrays["w"][0, 0] == np.float16(65504)
    torch.testing.assert_close(residual["w"][0], torch.tensor([1e5 - 65504, -(1e5 - 65504)]))
    arrays, residual = encode_update(new, new, residual, "float16")  # the next round sends the excess
    assert arrays["w"][0, 0] == np.float16(1e5 - 65504)


def test_a_non_finite_update_is_refused_and_leaves_the_residual_as_it_was():
    received = {"w": torch.zeros(2, 2)}
    _, residual = encode_update({"w": torch.full((2, 2), 0.3)}, received, {}, "int8")
    with pytest.raises(ValueError, match="update of tensor 'w' is not finite"):
        encode_update({"w": torch.tensor([[float("nan"), 0.0], [0.0, 0.0]])}, received, residual, "int8")
    assert torch.isfinite(residual["w"]).all()


def test_a_tensor_named_like_another_s_scales_is_refused():
    with pytest.raises(ValueError, match="would collide"):
        encoded_spec({"w": ((2, 2), "float32"), "w.scale": ((2,), "float32")}, "int8")


def test_low_rank_and_tied_global_ligo_train_through_the_grown_model():
    small = make_bert(layers=2, hidden=32, heads=4, ffn=64, num_labels=2)
    fam = get_family("bert")
    local = LiGO(fam.shape(small), INTER, tie_layers=True)
    glob = LiGO(INTER, TARGET, tie_layers=True, rank=4, seed=1)
    model = GrownModel(fam, small, DualLiGO(local, glob), 2)
    ids = torch.randint(1, 100, (2, 8))
    loss = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logsumexp(-1).sum()
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in glob.width.values() if p.numel())
    full = LiGO(INTER, TARGET, seed=1)
    assert count_parameters(glob) < count_parameters(full) / 5


@pytest.mark.parametrize(
    ("overrides", "phrase"),
    [
        ({"update-encoding": "bfloat16"}, "update-encoding = 'bfloat16': expected one of"),
        ({"global-rank": 4, "mode": "independent-ligo"}, "which mode 'independent-ligo' does not have"),
        ({"global-tie-layers": True, "mode": "small-only"}, "which mode 'small-only' does not have"),
        ({"global-rank": -1}, "global-rank = -1: expected an integer in \\[0, 480\\]"),
        ({"global-rank": 481}, "global-rank = 481"),
    ],
)
def test_transport_options_that_do_not_fit_fail_in_config_validation(overrides, phrase):
    with pytest.raises(ConfigError, match=phrase):
        RunConfig.from_flower(overrides)


def test_transport_options_that_fit_are_accepted():
    run = RunConfig.from_flower({"global-rank": 16, "global-tie-layers": True, "update-encoding": "int8"})
    assert (run.global_rank, run.global_tie_layers, run.update_encoding) == (16, True, "int8")


def test_reply_spec_of_an_int8_update():
    spec = array_spec(ArrayRecord({k: Array(v) for k, v in SENT.items()}))
    assert encoded_spec(spec, "int8") == {
        "width.q": ((2, 3), "int8"),
        "width.q.scale": ((2,), "float32"),
        "depth.x": ((4, 2), "int8"),
        "depth.x.scale": ((4,), "float32"),
    }
