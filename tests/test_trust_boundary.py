"""The trust boundary piece by piece: reply schemas, bounded influence, DP noise, checkpoints, config, client guards.

The end-to-end attacks through the real apps are in ``test_hostile_federation.py``.
"""

import math
import os
import time
from dataclasses import replace

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg
from scipy import stats
from simulated_federation import train_metrics
from test_strategy import SENT, SPEC, _record, _Reply

import client_app.app as fedgrow_client
from client_app.guards import check_phase, check_run_tag, sanitised_errors_mod, sanitised_reason
from fedgrow_core.clients.state_store import ClientStateStore
from fedgrow_core.modes import get_mode, mode_names
from fedgrow_core.node_policy import NodePolicy
from fedgrow_core.protocol import (
    COLLECT_METRICS,
    FINAL_METRICS,
    METRIC_MEANINGS,
    PREFLIGHT_METRICS,
    TRAIN_METRICS,
    Instruction,
    Phase,
    initial_global_ligo,
)
from fedgrow_core.run_config import ConfigError, RunConfig
from server_app.orchestration.phases import FINAL_SCHEMA, collect_average, final_phase
from server_app.orchestration.strategy import build_strategy, run_checks, strategy_for_run
from server_app.persistence.checkpoint import CHECKPOINT_FILE, check_resumable, read_checkpoint, write_checkpoint
from server_app.reporting.round_log import message_bytes
from server_app.trust.bounded_influence import clip_bound, clipped, update_norm
from server_app.trust.central_dp import secure_gaussian
from server_app.trust.checked_round import wait_for_nodes
from server_app.trust.reply_checks import reply_problem


def _content(arrays=None, metrics=None, **records):
    content = RecordDict(
        {"arrays": _record(SENT if arrays is None else arrays), "metrics": MetricRecord(metrics or train_metrics(10))}
    )
    for name, record in records.items():
        content[name] = record
    return content


@pytest.mark.parametrize(
    "metrics,phrase",
    [
        (train_metrics(10, x=1.0), "unexpected metrics ['x']"),
        (train_metrics(10, **{"train-loss": [1.0, 2.0]}), "'train-loss' = [1.0, 2.0]: expected a single number"),
        (train_metrics(10, **{"eval-accuracy": [float("nan")]}), "'eval-accuracy' = [nan]: expected a single number"),
        (train_metrics(10, **{"train-loss": [0.5] * 1_000_000}), "(1000000 values)"),
        (train_metrics(10, **{"train-accuracy": 3.0}), "'train-accuracy' = 3.0: expected a number in [0, 1]"),
        (train_metrics(2**62), "'num-examples' = 4611686018427387904: expected an integer in [1, 1e+12]"),
        (train_metrics(10, **{"compute-threads": 1.5}), "'compute-threads' = 1.5: expected an integer"),
        (train_metrics(10, **{"message-seconds": -1.0}), "'message-seconds' = -1.0: expected a number in [0, "),
        (train_metrics(10, **{"message-seconds": float("nan")}), "'message-seconds' = nan"),
    ],
)
def test_train_metrics_must_match_the_phase_schema(metrics, phrase):
    problem = reply_problem(_content(metrics=metrics), SPEC)
    assert problem is not None and phrase in problem, problem
    assert len(problem) < 400  # the reason never copies a huge value


def test_an_extra_config_record_is_rejected():
    blob = ConfigRecord({"blob": "x" * 10_000_000})
    assert "extra ['blob']" in reply_problem(_content(blob=blob), SPEC)


@pytest.mark.parametrize("where", ["record", "tensor", "metric"])
def test_a_megabyte_long_name_gives_a_short_reason(where):
    # reasons go into the round log, which every checkpoint's header holds (safetensors caps it at 100 MB)
    name = "x" * 1_000_000
    if where == "record":
        content = _content(**{name: ConfigRecord()})
    elif where == "tensor":
        content = _content({**SENT, name: np.zeros(1, np.float32)})
    else:
        content = _content(metrics=train_metrics(10, **{name: 1.0}))
    problem = reply_problem(content, SPEC)
    assert problem is not None and len(problem) <= 500 and "xxx..." in problem


@pytest.mark.parametrize(
    "change,phrase",
    [
        ({"drop": "info"}, "missing ['info']"),
        ({"accuracy": [1.0, 2.0]}, "'accuracy' = [1.0, 2.0]: expected a single number"),
        ({"accuracy": 1e308}, "'accuracy' = 1e+308: expected a number in [0, 1]"),
        ({"precision": float("nan")}, "'precision' = nan"),
        ({"info": ConfigRecord({"model": "m", "path": "/home/x"})}, "record 'info' must hold one string"),
    ],
)
def test_final_replies_are_checked(change, phrase):
    metrics = {
        "num-examples": 4,
        "accuracy": 0.5,
        "precision": 0.5,
        "loss": 0.7,
        "model-params": 10,
        "finetune-seconds": 1.0,
        "eval-seconds": 1.0,
        "compute-threads": 1,
        "partition-id": 0,
    }
    content = RecordDict({"metrics": MetricRecord(metrics), "info": ConfigRecord({"model": "m"})})
    assert reply_problem(content, FINAL_SCHEMA) is None
    if change.get("drop"):
        del content[change["drop"]]
    elif "info" in change:
        content["info"] = change["info"]
    else:
        content["metrics"] = MetricRecord({**metrics, **change})
    problem = reply_problem(content, FINAL_SCHEMA)
    assert problem is not None and phrase in problem, problem


def test_the_schemas_cover_exactly_the_documented_reply_metrics():
    schemas = [TRAIN_METRICS, COLLECT_METRICS, FINAL_METRICS, PREFLIGHT_METRICS]
    assert set().union(*schemas) == set(METRIC_MEANINGS)


def test_update_norm_and_clipping_against_a_direct_computation():
    rng = np.random.default_rng(0)
    sent = {k: rng.standard_normal(v.shape).astype(np.float32) for k, v in SENT.items()}
    reply = {k: v + rng.standard_normal(v.shape).astype(np.float32) for k, v in sent.items()}
    flat = np.concatenate([(reply[k].astype(np.float64) - sent[k]).ravel() for k in SENT])
    assert update_norm(reply, sent) == pytest.approx(np.linalg.norm(flat), rel=1e-12)
    out = clipped(reply, sent, update_norm(reply, sent), 0.5)
    assert update_norm(out, sent) == pytest.approx(0.5, rel=1e-6)
    direction = np.concatenate([(out[k].astype(np.float64) - sent[k]).ravel() for k in SENT])
    assert np.dot(direction, flat) / (np.linalg.norm(direction) * np.linalg.norm(flat)) == pytest.approx(1.0)
    huge = {k: np.full(v.shape, 3e38, np.float32) for k, v in SENT.items()}
    assert math.isfinite(update_norm(huge, sent))  # float64: 3e38 in float32 does not overflow the norm
    assert clip_bound([1.0, 2.0, 300.0], 0.0, 2.0) == 4.0 and clip_bound([1.0], 0.5, 2.0) == 0.5
    assert clip_bound([1.0], 0.0, 0.0) == math.inf


def _strategy(name="fedavg", caps=None, **run):
    strategy = strategy_for_run(
        RunConfig(strategy=name, **run),
        3,
        replace(run_checks(RunConfig(strategy=name, **run), example_caps=caps), expected_spec=SPEC),
    )
    strategy.record_round(1, _record(SENT), [1, 2, 3])
    if hasattr(strategy, "current_arrays"):
        strategy.current_arrays = {k: v.copy() for k, v in SENT.items()}
    return strategy


def test_num_examples_is_capped_at_the_preflight_rows_and_a_poisoned_update_clipped():
    strategy = _strategy(caps={1: 10, 2: 10, 3: 10})
    honest = {k: v + 1.0 for k, v in SENT.items()}
    poison = {k: v - 1000.0 for k, v in SENT.items()}
    replies = [
        _Reply(1, _content(honest, train_metrics(10))),
        _Reply(2, _content(honest, train_metrics(10))),
        _Reply(3, _content(poison, train_metrics(2**39))),  # within the schema's bound, far above preflight
    ]
    arrays, _ = strategy.aggregate_train(1, replies)
    # independent computation: weights 10/10/10; the poison's update scaled to 2 x the median norm
    norm = math.sqrt(sum(v.size for v in SENT.values()))  # every honest update is 1.0 per value
    poison_scaled = {k: SENT[k] + (-1000.0) * (2 * norm) / (1000.0 * norm) for k in SENT}
    for k, value in arrays.items():
        expected = (2 * honest[k] + poison_scaled[k]) / 3
        np.testing.assert_allclose(value.numpy(), expected, rtol=1e-5)
    (entry,) = strategy.round_log
    assert [c["node_id"] for c in entry["clipped"]] == [3]
    assert sorted(entry["accepted_nodes"]) == [1, 2, 3]


def test_the_round_log_keeps_each_replys_handler_seconds_beside_its_compute():
    """``message-seconds`` (the ClientApp's handler, compute included) reaches the round log, as the scale
    benchmark reads it."""
    strategy = _strategy(caps={1: 10, 2: 10, 3: 10})
    honest = {k: v + 1.0 for k, v in SENT.items()}
    replies = [_Reply(n, _content(honest, train_metrics(10, **{"message-seconds": 2.0 + n}))) for n in (1, 2, 3)]
    strategy.aggregate_train(1, replies)
    (entry,) = strategy.round_log
    assert {n: m["message-seconds"] for n, m in entry["client_metrics"].items()} == {"1": 3.0, "2": 4.0, "3": 5.0}


def test_a_reply_from_a_node_without_preflight_is_rejected():
    strategy = _strategy(caps={1: 10})
    arrays, metrics = strategy.aggregate_train(1, [_Reply(2, _content({k: v + 1 for k, v in SENT.items()}))])
    assert arrays is None and "did not take part in preflight" in strategy.round_log[0]["rejected"][0]["reason"]


def test_fedadam_never_takes_infinite_moments_from_huge_finite_values():
    strategy = _strategy("fedadam")
    honest = {k: v + 0.01 for k, v in SENT.items()}
    huge = {k: np.full(v.shape, 3e38, np.float32) for k, v in SENT.items()}
    replies = [_Reply(1, _content(honest)), _Reply(2, _content(honest)), _Reply(3, _content(huge))]
    arrays, _ = strategy.aggregate_train(1, replies)
    assert arrays is not None and all(np.isfinite(a.numpy()).all() for a in arrays.values())
    assert all(np.isfinite(v).all() for v in strategy.v_t.values())


def test_a_non_finite_aggregate_is_refused_and_the_strategy_state_restored():
    strategy = _strategy("fedadam", clip_update_median=0.0)  # no clipping: the overflow reaches FedAdam
    near_max = {k: np.full(v.shape, 3e38, np.float32) for k, v in SENT.items()}
    arrays, _ = strategy.aggregate_train(1, [_Reply(1, _content(near_max)), _Reply(2, _content(near_max))])
    assert arrays is None and not strategy.round_log[0]["aggregated"]
    assert strategy.m_t is None and strategy.v_t is None  # as before the round: nothing poisoned is kept


class Raising(FedAvg):
    """A user's strategy that fails on what it is given (as Flower's metric aggregation can on ragged lists)."""

    def aggregate_train(self, server_round, replies):
        raise ValueError("cannot aggregate these replies")


def test_a_strategy_that_raises_on_a_reply_refuses_the_round_instead_of_ending_the_run():
    strategy = _strategy("tests.test_trust_boundary:Raising")
    honest = {k: v + 1.0 for k, v in SENT.items()}
    arrays, metrics = strategy.aggregate_train(1, [_Reply(n, _content(honest)) for n in (1, 2, 3)])
    assert arrays is None and not strategy.round_log[0]["aggregated"] and metrics["rejected-replies"] == 0


class _Grid:
    """A grid whose online nodes are ``online``; ``send_and_receive`` answers with ``answer(message)``."""

    def __init__(self, online, answer=None):
        self.online, self.answer = list(online), answer

    def get_node_ids(self):
        return list(self.online)

    def send_and_receive(self, messages, timeout=None):
        return [self.answer(m) for m in messages]


def test_waiting_for_nodes_is_bounded():
    start = time.monotonic()
    assert wait_for_nodes(_Grid([1]), 3, timeout=1.5, poll=0.2) == [1]
    assert 1.4 < time.monotonic() - start < 5
    strategy = strategy_for_run(
        RunConfig(min_train_nodes=2, round_timeout=1.0),
        3,
        run_checks(RunConfig(min_train_nodes=2, round_timeout=1.0), example_caps={1: 5, 2: 5, 3: 5}),
    )
    start = time.monotonic()
    messages = strategy.configure_train(1, _record(SENT), ConfigRecord(), _Grid([1]))
    assert messages == [] and time.monotonic() - start < 5
    assert strategy.sent_round.offline_nodes == [2, 3]


def test_each_reply_is_checked_as_it_arrives_not_after_the_last():
    strategy = _strategy(caps={1: 10, 2: 10})
    checked = []
    problem = strategy._problem
    strategy._problem = lambda msg, schema: (checked.append(msg.metadata.src_node_id), problem(msg, schema))[1]
    honest = {k: v + 1.0 for k, v in SENT.items()}

    def arriving():  # a PromptGrid's replies: node 2 is still computing when node 1's reply is handed over
        yield _Reply(1, _content(honest))
        assert checked == [1]
        yield _Reply(2, _content(honest))

    arrays, _ = strategy.aggregate_train(1, arriving())
    assert checked == [1, 2] and arrays is not None
    assert sorted(strategy.round_log[0]["accepted_nodes"]) == [1, 2]


def test_sent_bytes_are_counted_once_the_messages_are_out(monkeypatch, task_identity):
    import server_app.trust.checked_round as checked_round

    counted = []
    monkeypatch.setattr(
        checked_round, "message_bytes", lambda m: counted.append(m.metadata.dst_node_id) or message_bytes(m)
    )
    run = RunConfig(min_train_nodes=2)
    strategy = strategy_for_run(run, 2, run_checks(run, example_caps={1: 5, 2: 5}))
    messages = strategy.configure_train(1, _record(SENT), ConfigRecord(), _Grid([1, 2]))
    assert len(messages) == 2 and counted == []  # nothing serialised before the messages go out (Flower sends them)
    replies = [_Reply(m.metadata.dst_node_id, _content({k: v + 1 for k, v in SENT.items()})) for m in messages]

    def arriving():
        assert len(counted) == 1  # counted while the nodes train, before their first reply is read
        yield from replies

    strategy.aggregate_train(1, arriving())
    assert len(counted) == 1  # one serialisation: both nodes were sent the same content
    expected = message_bytes(messages[0])
    assert strategy.round_log[0]["download_bytes"] == {str(m.metadata.dst_node_id): expected for m in messages}
    assert expected > sum(v.nbytes for v in SENT.values())


def test_collect_takes_the_majority_spec_not_the_first_reply(task_identity):
    foreign = {"not.a.model": np.zeros(3, np.float32)}
    honest = {k: v + 1.0 for k, v in SENT.items()}
    order = {1: foreign, 2: honest, 3: honest}

    def answer(message):
        node = message.metadata.dst_node_id
        return Message(_content(order[node], {"num-examples": 10}), reply_to=message)

    averaged, entry = collect_average(_Grid([1, 2, 3], answer), RunConfig(mode="scratch-fedavg"), ArrayRecord(), 0)
    for k, v in averaged.items():
        np.testing.assert_array_equal(v.numpy(), honest[k])
    assert [r["node_id"] for r in entry["rejected"]] == [1]


def test_the_final_phase_rejects_what_contradicts_preflight(task_identity):
    good = {"num-examples": 4, "accuracy": 0.5, "precision": 0.5, "loss": 0.7, "model-params": 10}
    good.update({"finetune-seconds": 1.0, "eval-seconds": 1.0, "compute-threads": 1, "partition-id": 0})
    claims = {1: good, 2: {**good, "partition-id": 1}, 3: {**good, "num-examples": 400}}

    def answer(message):
        node = message.metadata.dst_node_id
        content = RecordDict({"metrics": MetricRecord(claims[node]), "info": ConfigRecord({"model": "m"})})
        return Message(content, reply_to=message)

    rows = {n: {"partition-id": 0 if n != 2 else 2, "train-examples": 10, "test-examples": 4} for n in (1, 2, 3)}
    accepted, rejected = final_phase(_Grid([1, 2, 3], answer), ArrayRecord(), preflight_rows=rows)
    assert [m.metadata.src_node_id for m in accepted] == [1]
    reasons = {r["node_id"]: r["reason"] for r in rejected}
    assert "partition-id 1, but preflight said 2" in reasons[2] and "> the 4 test rows" in reasons[3]


def test_secure_noise_is_gaussian_and_independent_of_numpys_global_state():
    np.random.seed(0)
    first = secure_gaussian((50_000,), 2.0)
    np.random.seed(0)
    second = secure_gaussian((50_000,), 2.0)
    assert not np.array_equal(first, second)  # reseeding NumPy does not reproduce it
    assert first.std() == pytest.approx(2.0, rel=0.02) and abs(first.mean()) < 0.05
    assert stats.kstest(first / 2.0, "norm").pvalue > 1e-3


@pytest.mark.parametrize(
    "name",
    ["fedadam", "fedyogi", "fedadagrad", "fedavgm", "fedmedian", "krum", "geometric-median", "centred-clipping"],
)
def test_central_dp_refuses_server_optimisers_and_robust_aggregators(name):
    with pytest.raises(ConfigError, match=f"strategy = '{name}' with dp-clipping = 'fixed'"):
        strategy_for_run(RunConfig(strategy=name, dp_clipping="fixed", dp_noise_multiplier=1.0), 3)


def test_central_dp_with_the_default_strategy_says_what_to_set():
    with pytest.raises(ConfigError, match='set strategy = "fedavg"'):
        strategy_for_run(RunConfig(dp_clipping="fixed", dp_noise_multiplier=1.0), 3)


def test_float_keys_reject_nan_and_inf_and_do_nothing_keys_fail():
    with pytest.raises(ConfigError) as err:
        RunConfig.from_flower({"dp-noise-multiplier": float("nan"), "lr-width": float("inf")})
    assert "dp-noise-multiplier = nan: expected a finite number" in str(err.value)
    assert "lr-width = inf: expected a finite number" in str(err.value)
    with pytest.raises(ConfigError, match="strategy 'fedprox' needs proximal-mu > 0"):
        RunConfig.from_flower({"strategy": "fedprox"})
    with pytest.raises(ConfigError, match="dp-clipping = 'fixed': mode 'scratch-fedavg' has no central DP"):
        RunConfig.from_flower({"mode": "scratch-fedavg", "dp-clipping": "fixed"})


def test_strategy_knobs_reach_flowers_classes():
    run = RunConfig(strategy="fedadam", fedopt_eta=0.02, fedopt_tau=1e-4)
    strategy = strategy_for_run(run, 3)
    assert strategy.eta == 0.02 and strategy.tau == 1e-4
    assert strategy_for_run(RunConfig(strategy="fedprox", proximal_mu=0.3), 3).proximal_mu == 0.3
    assert strategy_for_run(RunConfig(strategy="fedtrimmedavg", trimmed_beta=0.1), 3).beta == 0.1
    assert strategy_for_run(RunConfig(strategy="krum", num_malicious_nodes=1), 5).num_malicious_nodes == 1


class Odd(FedAvg):
    """A user's strategy whose constructor differs from FedAvg's."""

    def __init__(self, something):
        super().__init__()


def test_a_strategy_that_cannot_be_constructed_fails_in_config():
    with pytest.raises(ConfigError, match="strategy = 'tests.test_trust_boundary:Odd': cannot be constructed"):
        build_strategy("tests.test_trust_boundary:Odd", 3, 1.0)


# --- checkpoints ---------------------------------------------------------------------------------------------


def _checkpoint(tmp_path, run):
    strategy = build_strategy(run.strategy, 2, 1.0)
    glob = ArrayRecord({k: Array(v.detach().numpy()) for k, v in initial_global_ligo(run).state_dict().items()})
    write_checkpoint(tmp_path, run, 1, glob, strategy, [])
    return tmp_path / CHECKPOINT_FILE


def test_a_checkpoint_with_a_flipped_byte_or_truncated_is_refused_naming_the_file(tmp_path):
    run = RunConfig(num_server_rounds=3)
    path = _checkpoint(tmp_path, run)
    check_resumable(read_checkpoint(tmp_path), run)  # the untouched file is fine
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ConfigError, match="integrity hash does not match"):
        read_checkpoint(tmp_path)
    path.write_bytes(bytes(data[: len(data) // 2]))
    with pytest.raises(ConfigError, match=f"{CHECKPOINT_FILE} cannot be read .* damaged or truncated"):
        read_checkpoint(tmp_path)


def test_restored_contents_are_checked_against_the_run(tmp_path):
    run = RunConfig(num_server_rounds=3, strategy="fedavg", dp_clipping="fixed", dp_noise_multiplier=1.0)
    _checkpoint(tmp_path, run)
    checkpoint = read_checkpoint(tmp_path)
    checkpoint.server_round = -1
    checkpoint.strategy["scalars"] = {"0.noise_multiplier": 0.0, "0.clipping_norm": 1e12}
    name = next(iter(checkpoint.global_ligo.keys()))
    checkpoint.strategy["arrays"] = {"1.m_t.foreign": np.zeros(3, np.float32), f"7.v_t.{name}": np.zeros(1)}
    checkpoint.python_random = [99, [1] * 625, None]  # a version random.setstate() refuses
    checkpoint.entries = [{"round": 1}]  # the summary reads more of an entry than its round
    checkpoint.numpy_random = (np.zeros(5, np.uint32), {"name": "MT19937", "pos": 9999})
    bad = checkpoint.global_ligo[name].numpy().copy()
    bad.flat[0] = np.nan
    checkpoint.global_ligo[name] = Array(bad)
    checkpoint.global_ligo["foreign"] = Array(np.zeros(2, np.float32))
    with pytest.raises(ConfigError) as err:
        check_resumable(checkpoint, run)
    text = str(err.value)
    for phrase in (
        "checkpoint round -1: expected an integer in [1, 3]",
        "'0.noise_multiplier': only ['clipping_norm'] may be restored",
        "'0.clipping_norm' = 1000000000000.0: expected a number in [1, 1]",
        "'1.m_t.foreign': not a known strategy state",
        f"{name!r} holds NaN or Inf",
        "extra ['foreign']",
        f"'7.v_t.{name}': not a known strategy state",
        "python-random: not a Python random state",
        "numpy-random: not a NumPy MT19937 state",
        "checkpoint round log: expected a list of round entries",
    ):
        assert phrase in text, (phrase, text)


# --- the client against a curious or malicious server ---------------------------------------------------------


def _server_message(phase, **config):
    content = RecordDict({"arrays": ArrayRecord(), "config": ConfigRecord({"phase": phase, **config})})
    return Message(content, dst_node_id=1, message_type=MessageType.TRAIN)


def _context(tmp_path, mode="fedgrow", **node):
    node_config = {
        "partition-id": 0,
        "num-partitions": 3,
        "state-dir": str(tmp_path / "state"),
        "allowed-modes": ",".join(mode_names()),
        **node,
    }
    return Context(1, 1, node_config, RecordDict(), {"mode": mode, "output-dir": str(tmp_path)})


@pytest.mark.parametrize("mode,phase", [("fedgrow", "train-shared"), ("fedgrow", "collect"), ("small-only", "grow")])
def test_the_client_refuses_phases_its_mode_does_not_serve(tmp_path, task_identity, mode, phase):
    reply = sanitised_errors_mod(_server_message(phase), _context(tmp_path, mode), fedgrow_client.train)
    assert reply.has_error() and "is not served in mode" in reply.error.reason


@pytest.mark.parametrize(
    "config,expected",
    [
        ({"phase": "x"}, "phase = 'x': expected one of ['preflight', 'grow'"),
        ({"phase": "finetune-evaluate"}, "does not come in a train message"),
        ({"phase": "grow", "server-round": -1}, "server-round = '-1': expected an integer"),
        ({"phase": "grow", "server-round": 1.5}, "server-round = '1.5': expected an integer"),
        ({"phase": "grow", "resumed-after": 10**12}, "resumed-after"),
        ({"phase": "grow", "proximal-mu": -1.0}, "proximal-mu = '-1.0': expected a number in [0, 1000]"),
        ({"phase": "grow", "proximal-mu": 1e308}, "proximal-mu = '1e+308': expected a number in [0, 1000]"),
        ({"phase": "grow", "proximal-mu": float("nan")}, "proximal-mu = 'nan'"),
    ],
)
def test_the_client_refuses_an_instruction_outside_the_protocol(tmp_path, task_identity, config, expected):
    phase = config.pop("phase")
    reply = sanitised_errors_mod(_server_message(phase, **config), _context(tmp_path), fedgrow_client.train)
    assert reply.has_error() and expected in reply.error.reason
    assert not (tmp_path / "state").exists()  # refused before anything was trained or written


def test_every_mode_names_the_phases_its_client_serves_and_an_instruction_round_trips():
    for name in mode_names():  # every phase a mode's plan sends is one its client serves
        mode = get_mode(name)
        sent = {Phase.COLLECT if type(step).__name__ == "Collect" else step.phase for step in mode.plan}
        assert sent | {Phase.PREFLIGHT, Phase.FINAL} <= mode.phases, name
    order = Instruction(Phase.GROW, server_round=3, run_tag="run-1", resumed_after=2, proximal_mu=0.1)
    assert Instruction.from_record(order.to_record()) == order
    assert dict(Instruction(Phase.COLLECT).to_record()) == {"phase": "collect"}


def test_allowed_modes_pins_what_a_node_serves(tmp_path):
    policy = NodePolicy.from_node_config({"allowed-modes": "fedgrow"}, simulation=True)
    check_phase("fedgrow", "grow", policy)
    with pytest.raises(RuntimeError, match="mode 'scratch-fedavg' is not among this node's allowed-modes"):
        check_phase("scratch-fedavg", "train-shared", policy)


@pytest.mark.parametrize("tag", ["../../x", "/etc", "a/b", ".hidden", "x" * 201, "a..b"])
def test_a_path_escaping_run_tag_is_refused_and_nothing_is_written(tmp_path, task_identity, tag):
    reply = sanitised_errors_mod(
        _server_message("grow", **{"run-tag": tag, "server-round": 1}), _context(tmp_path), fedgrow_client.train
    )
    assert reply.has_error() and "run-tag" in reply.error.reason
    assert not (tmp_path / "state").exists() and not (tmp_path.parent / "x").exists()
    assert check_run_tag("20261202-061500-text-fedavg") == "20261202-061500-text-fedavg"


def test_a_resumed_round_without_private_state_is_refused(tmp_path, task_identity):
    message = _server_message("grow", **{"run-tag": "run", "server-round": 3, "resumed-after": 2})
    reply = sanitised_errors_mod(message, _context(tmp_path, **{"allow-resume": True}), fedgrow_client.train)
    assert reply.has_error() and "refusing to start from fresh operators" in reply.error.reason


def test_error_replies_carry_no_paths_and_no_data_values(tmp_path, task_identity):
    secret = tmp_path / "private" / "labels.csv"
    err = FileNotFoundError(f"no such file {secret} (label 7 in row 12)")
    assert sanitised_reason(err) == "FileNotFoundError (details are in the node's own log)"
    refusal = ConfigError([f"model = {str(secret)!r}: not found"])
    assert str(tmp_path) not in sanitised_reason(refusal) and "<path>" in sanitised_reason(refusal)
    for leaky in ("/home/jane doe/labels.csv", "data/private/labels.csv", "~/secret.csv", "C:\\Users\\x.csv"):
        reason = sanitised_reason(ConfigError([f"model = {leaky!r}: not found", f"bare {leaky} too"]))
        assert "labels" not in reason and "secret" not in reason and "Users" not in reason, reason

    def raises(msg, context):
        raise err

    reply = sanitised_errors_mod(_server_message("grow"), _context(tmp_path), raises)
    assert reply.has_error() and str(tmp_path) not in reply.error.reason and "7" not in reply.error.reason


def test_a_truncated_newest_state_file_falls_back_to_the_previous_round(tmp_path):
    store = ClientStateStore(tmp_path / "state")
    store.save(1, {"x": torch.ones(3)})
    store.save(2, {"x": torch.full((3,), 2.0)})
    newest = tmp_path / "state" / "round-2.safetensors"
    newest.write_bytes(newest.read_bytes()[:20])
    server_round, state = store.load_latest(at_most=2)
    assert server_round == 1 and torch.equal(state["x"], torch.ones(3))


def test_state_writes_are_synced(tmp_path, monkeypatch):
    synced = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(fd) or real(fd))
    ClientStateStore(tmp_path / "s").save(1, {"x": torch.ones(1)})
    assert synced
    synced.clear()
    run = RunConfig(num_server_rounds=2)
    _checkpoint(tmp_path, run)
    assert len(synced) == 2  # the file, then its folder after the rename


def test_a_dp_round_with_fewer_nodes_online_than_the_noise_assumes_is_skipped():
    run = RunConfig(strategy="fedavg", dp_clipping="fixed", dp_noise_multiplier=1.0, round_timeout=0.5)
    # noise calibrated for 3 sampled clients
    strategy = strategy_for_run(run, 3, replace(run_checks(run, example_caps={1: 5, 2: 5, 3: 5}), expected_spec=SPEC))
    assert strategy.num_sampled_clients == 3
    strategy.current_arrays = _record(SENT)
    strategy.record_round(1, _record(SENT), [1, 2])  # node 3 was offline: only two were sent the round
    honest = {k: v + 0.1 for k, v in SENT.items()}
    arrays, _ = strategy.aggregate_train(1, [_Reply(1, _content(honest)), _Reply(2, _content(honest))])
    assert arrays is None and not strategy.round_log[0]["aggregated"]


@pytest.mark.parametrize(
    "data,stype,phrase",
    [
        (b"\x00garbage", "numpy.ndarray", "cannot be decoded"),
        (None, "torch", "cannot be decoded"),
        ("other-shape", "numpy.ndarray", "decodes to (5, 7) float32"),
        ("scalar", "numpy.ndarray", "decodes to () float32"),
    ],
)
def test_array_metadata_that_lies_about_its_bytes_is_rejected_not_raised(data, stype, phrase):
    honest = Array(SENT["width.res"] + 1.0)
    if data == "other-shape":
        data = Array(np.zeros((5, 7), np.float32)).data
    elif data == "scalar":
        data = Array(np.array(1.0, dtype=np.float32)).data
    elif data is None:
        data = honest.data
    forged = Array(dtype=honest.dtype, shape=honest.shape, stype=stype, data=data)
    arrays = {**{k: Array(v) for k, v in SENT.items()}, "width.res": forged}
    content = RecordDict({"arrays": ArrayRecord(arrays), "metrics": MetricRecord(train_metrics(10))})
    problem = reply_problem(content, SPEC)
    assert problem is not None and phrase in problem, problem
    strategy = _strategy()
    arrays_out, _ = strategy.aggregate_train(1, [_Reply(1, content)])  # rejected, never raised
    assert arrays_out is None and strategy.round_log[0]["rejected"][0]["node_id"] == 1


@pytest.mark.parametrize(("multiple", "expected"), [(1.0, (10 + 10 - 10) / 30), (3.0, (10 + 10 - 30) / 50)])
def test_weight_is_capped_by_the_median_of_preflight_counts_too(multiple, expected):
    # a node that claimed 10**12 training rows in preflight weighs at most `multiple` times the median node
    strategy = _strategy(caps={1: 10, 2: 10, 3: 10**12}, clip_update_median=0.0, cap_weight_median=multiple)
    honest = {k: v + 1.0 for k, v in SENT.items()}
    poison = {k: v - 1.0 for k, v in SENT.items()}
    replies = [
        _Reply(1, _content(honest, train_metrics(10))),
        _Reply(2, _content(honest, train_metrics(10))),
        _Reply(3, _content(poison, train_metrics(10**12))),
    ]
    arrays, _ = strategy.aggregate_train(1, replies)
    for k, value in arrays.items():  # weights 10, 10 and multiple x 10 (the cap)
        np.testing.assert_allclose(value.numpy(), SENT[k] + expected, rtol=1e-6)
    assert RunConfig().cap_weight_median == 1.0  # by default the liar holds a third: the honest sign wins


def test_two_nodes_clip_against_the_smaller_norm():
    strategy = strategy_for_run(RunConfig(), 2, replace(run_checks(RunConfig()), expected_spec=SPEC))
    strategy.record_round(1, _record(SENT), [1, 2])
    honest = {k: v + 1.0 for k, v in SENT.items()}
    poison = {k: v - 1000.0 for k, v in SENT.items()}
    arrays, _ = strategy.aggregate_train(1, [_Reply(1, _content(honest)), _Reply(2, _content(poison))])
    for k, value in arrays.items():  # the poison is scaled to 2 x the honest norm: -2 per value
        np.testing.assert_allclose(value.numpy(), SENT[k] + (1.0 - 2.0) / 2, rtol=1e-6)
