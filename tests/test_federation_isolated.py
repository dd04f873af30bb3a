"""What the federation adds, isolated: independent-dual-ligo differs from fedgrow only in the averaging.

Also the per-round diagnostics the server logs (the Global-LiGO's relative change, the mean cosine
between the clients' updates), checked against direct computations.
"""

import math
from dataclasses import replace

import numpy as np
import pytest
import torch
from conftest import TINY_GROWTH_KEYS, tiny_bert_folder
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from test_strategy import SENT, SPEC, _content, _record, _Reply

import client_app.app as fedgrow_client
from client_app import kept_state
from client_app.guards import sanitised_errors_mod
from fedgrow_core.clients.growth_client import GrowthClient
from fedgrow_core.clients.setup import ClientSetup
from fedgrow_core.growth.diagnostics import mean_pairwise_cosine, relative_change
from fedgrow_core.protocol import initial_global_ligo
from fedgrow_core.run_config import RunConfig
from server_app.orchestration.strategy import run_checks, strategy_for_run
from server_app.reporting.summary import round_rows
from server_app.reporting.tracking import round_scalars

KEYS = TINY_GROWTH_KEYS


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return tiny_bert_folder(tmp_path_factory.mktemp("isolated") / "bert", 1, 32, 2, 64, 0)


def test_one_round_of_fedgrow_and_of_independent_dual_ligo_train_the_same_global_ligo(model):
    """Same seeds, same batches: before any averaging the two modes' Global-LiGOs are equal."""
    run = RunConfig.from_flower({**KEYS, "client-models": model})
    setup = ClientSetup.load(run, 1, 3)
    shared = GrowthClient(run, 1, 3, setup=setup)
    alone = GrowthClient(
        run.model_copy(update={"mode": "independent-dual-ligo"}), 1, 3, share_global=False, setup=setup
    )
    torch.manual_seed(5)
    g_shared, m_shared = shared.train_round(initial_global_ligo(run).state_dict())
    torch.manual_seed(5)
    g_alone, m_alone = alone.train_round({})
    assert set(g_shared) == set(g_alone)
    for k in g_shared:
        torch.testing.assert_close(g_shared[k], g_alone[k], rtol=0, atol=0)
    assert relative_change(initial_global_ligo(run).state_dict(), g_alone) > 0
    assert "received-accuracy" in m_shared and "received-accuracy" not in m_alone  # nothing was received
    # the unshared Global-LiGO is private state; a received one is refused
    assert any(k.startswith("operator.global_.") for k in alone.private_state())
    assert not any(k.startswith("operator.global_.") for k in shared.private_state())
    with pytest.raises(ValueError, match="shares nothing"):
        alone.load_global_state(g_shared)


def _message(phase, arrays=None, **config):
    content = RecordDict({"arrays": arrays or ArrayRecord(), "config": ConfigRecord({"phase": phase, **config})})
    return Message(content, dst_node_id=1, message_type=MessageType.TRAIN)


def test_the_independent_dual_ligo_client_keeps_its_global_ligo_and_sends_nothing(tmp_path, task_identity, model):
    run = {**KEYS, "client-models": model, "mode": "independent-dual-ligo", "output-dir": str(tmp_path)}
    node = {"partition-id": 0, "num-partitions": 3, "node-policy": "open", "state-dir": str(tmp_path / "state")}
    context = Context(1, 1, node, RecordDict(), run)
    first = sanitised_errors_mod(_message("grow", **{"server-round": 1}), context, fedgrow_client.train)
    assert not first.has_error(), first.error.reason if first.has_error() else ""
    assert len(first.content["arrays"]) == 0  # nothing leaves the node
    kept = context.state[kept_state.STATE_KEY].to_torch_state_dict()
    g1 = {k: v.clone() for k, v in kept.items() if k.startswith("operator.global_.")}
    assert g1
    second = sanitised_errors_mod(_message("grow", **{"server-round": 2}), context, fedgrow_client.train)
    assert not second.has_error()
    g2 = {k: v for k, v in context.state[kept_state.STATE_KEY].to_torch_state_dict().items() if k in g1}
    assert relative_change(g1, g2) > 0  # round 2 went on from round 1's private Global-LiGO
    sent = ArrayRecord(initial_global_ligo(RunConfig.from_flower(run)).state_dict())
    refused = sanitised_errors_mod(_message("grow", sent, **{"server-round": 3}), context, fedgrow_client.train)
    assert refused.has_error() and "Global-LiGO" in refused.error.reason


def test_diagnostics_against_direct_computations():
    g = np.random.default_rng(0)
    a = {"x": g.normal(size=(3, 4)), "y": g.normal(size=5)}
    b = {"x": g.normal(size=(3, 4)), "y": g.normal(size=5)}
    flat = lambda d: np.concatenate([d["x"].ravel(), d["y"]])  # noqa: E731
    direct = np.linalg.norm(flat(b) - flat(a)) / np.linalg.norm(flat(a))
    assert relative_change(a, b) == pytest.approx(direct)
    c = {"x": -a["x"], "y": -a["y"]}
    cos = torch.nn.functional.cosine_similarity
    pairs = [(a, b), (a, c), (b, c)]
    want = np.mean([float(cos(torch.tensor(flat(p)), torch.tensor(flat(q)), dim=0)) for p, q in pairs])
    assert mean_pairwise_cosine([a, b, c]) == pytest.approx(want)
    assert math.isnan(mean_pairwise_cosine([a]))
    # many updates, one of them zero (its pairs count 0), against the pairwise loop
    many = [{"x": g.normal(size=(3, 4)) + 0.5, "y": g.normal(size=5)} for _ in range(6)]
    many.append({"x": np.zeros((3, 4)), "y": np.zeros(5)})
    loop = []
    for i in range(len(many)):
        for j in range(i + 1, len(many)):
            p, q = flat(many[i]), flat(many[j])
            n = np.linalg.norm(p) * np.linalg.norm(q)
            loop.append(p @ q / n if n else 0.0)
    assert mean_pairwise_cosine(many) == pytest.approx(np.mean(loop), rel=1e-12)
    assert mean_pairwise_cosine([many[-1], many[-1]]) == 0.0


def test_the_logged_cosine_and_norms_of_clipped_replies_match_a_direct_computation():
    run = RunConfig(clip_update_norm=1.0)
    strategy = strategy_for_run(run, 4, replace(run_checks(run), expected_spec=SPEC))
    strategy.record_round(1, _record(SENT), [1, 2, 3, 4])
    g = np.random.default_rng(3)
    ups = [{k: v + g.normal(scale=s, size=v.shape).astype(v.dtype) for k, v in SENT.items()} for s in (0.01, 2, 5)]
    ups.append(dict(SENT))  # a zero update: cosine 0 with every other
    replies = [_Reply(n + 1, _content(u, 10)) for n, u in enumerate(ups)]
    strategy.aggregate_train(1, replies)
    (entry,) = strategy.round_log
    flat = [np.concatenate([(u[k].astype(np.float64) - SENT[k]).ravel() for k in sorted(SENT)]) for u in ups]
    norms = [np.linalg.norm(f) for f in flat]
    pairs = [
        flat[i] @ flat[j] / (norms[i] * norms[j]) if norms[i] * norms[j] else 0.0
        for i in range(4)
        for j in range(i + 1, 4)
    ]
    assert entry["update_cosine"] == pytest.approx(np.mean(pairs), rel=1e-9)
    clipped = {c["node_id"]: c["norm"] for c in entry["clipped"]}
    assert set(clipped) == {2, 3}  # the two over the bound of 1.0
    assert clipped[2] == pytest.approx(norms[1], rel=1e-12) and clipped[3] == pytest.approx(norms[2], rel=1e-12)


def test_each_round_logs_the_global_ligos_change_and_the_updates_agreement():
    strategy = strategy_for_run(RunConfig(), 3, replace(run_checks(RunConfig()), expected_spec=SPEC))
    strategy.record_round(1, _record(SENT), [1, 2, 3])
    ups = [{k: v + s * np.ones_like(v) for k, v in SENT.items()} for s in (1.0, 1.0, -0.5)]
    replies = [_Reply(n + 1, _content(u, 10)) for n, u in enumerate(ups)]
    arrays, _ = strategy.aggregate_train(1, replies)
    (entry,) = strategy.round_log
    assert entry["update_cosine"] == pytest.approx((1 - 1 - 1) / 3)  # two agree, the third opposes both
    new = {k: v.numpy() for k, v in arrays.items()}
    assert entry["relative_change"] == pytest.approx(relative_change(SENT, new))
    assert entry["relative_change"] > 0
    scalars = round_scalars({**entry, "client_metrics": {}})
    assert scalars["global-ligo/relative-change"] == pytest.approx(entry["relative_change"])
    rows = round_rows(RunConfig(), [{**entry, "phase": "grow"}], [])
    assert rows[0]["update-cosine"] == pytest.approx(entry["update_cosine"])
