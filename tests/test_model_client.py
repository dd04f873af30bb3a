"""Baseline clients: the independent-LiGO growth client and the plain-model client."""

import pytest
import torch
from conftest import tiny_bert_folder

from fedgrow_core.clients.growth_client import GrowthClient
from fedgrow_core.clients.model_client import ModelClient, target_model
from fedgrow_core.clients.setup import ClientSetup
from fedgrow_core.growth.ligo import LiGO
from fedgrow_core.run_config import RunConfig, parse_shape


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("baselines")
    model = tiny_bert_folder(tmp / "bert", 1, 32, 2, 64, 0)
    return RunConfig.from_flower(
        {
            "client-models": model,
            "intermediate-shape": "2x32x64x2",
            "target-shape": "3x64x128x4",
            "local-steps": 2,
            "batch-size": 8,
            "max-train-examples": 32,
            "max-test-examples": 16,
            "finetune-steps": 1,
            "max-length": 32,
        }
    )


@pytest.fixture(scope="module")
def setup(run):
    return ClientSetup.load(run, 0, 3)


def test_test_rows_are_capped_and_shared_by_every_client_of_a_setup(run, setup):
    assert len(setup.test_rows) == 16 and len(setup.train_rows) == 32
    growth = GrowthClient(run, 0, 3, setup=setup)
    assert growth.evaluate().num_examples == 16


def test_independent_ligo_client_shares_nothing_and_grows_straight_to_the_target(run, setup):
    client = GrowthClient(run, 0, 3, independent=True, setup=setup)
    small, target = parse_shape("1x32x64x2"), run.target_shape
    expected = LiGO(small, target).state_dict()  # one untied operator small -> target
    own = {k[len("operator.") :]: v for k, v in client.model.state_dict().items() if k.startswith("operator.")}
    assert {k: v.shape for k, v in own.items()} == {k: v.shape for k, v in expected.items()}
    head = target.hidden * 2 + 2
    assert client.trainable_params == sum(v.numel() for v in expected.values()) + head
    reply, metrics = client.train_round({})
    assert reply == {} and 0 <= metrics["eval-accuracy"] <= 1
    assert set(client.private_state()) >= {f"operator.{k}" for k in expected}
    with pytest.raises(ValueError, match="shares nothing"):
        client.load_global_state({"width.res": torch.zeros(1)})


def test_scratch_target_model_is_seeded_and_target_shaped(setup):
    a, config = target_model(setup, seed=3)
    b, _ = target_model(setup, seed=3)
    c, _ = target_model(setup, seed=4)
    assert config.num_hidden_layers == 3 and config.hidden_size == 64 and config.intermediate_size == 128
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))
    assert any(not torch.equal(p, q) for p, q in zip(a.parameters(), c.parameters(), strict=True))


def test_model_client_trains_all_weights_and_restores_its_private_state(run, setup):
    model, config = target_model(setup, seed=0)
    client = ModelClient(setup, model, config, lr=1e-3)
    before = client.weights()
    assert client.trainable_params == sum(v.numel() for v in before.values())
    metrics = client.train_round(2)
    assert metrics["num-examples"] == 32 and metrics["trainable-params"] == client.trainable_params
    after = client.weights()
    assert sum(not torch.equal(before[k], after[k]) for k in before) > len(before) // 2
    private = client.private_state()
    assert any(k.endswith("exp_avg") for k in private)
    other = ModelClient(setup, target_model(setup, seed=1)[0], config, lr=1e-3)
    other.load_private_state(private)
    for key, value in client.private_state().items():
        assert torch.equal(other.private_state()[key], value), key
    # evaluation is the model's own forward on the capped test rows
    assert other.evaluate().accuracy == pytest.approx(client.evaluate().accuracy)


def test_the_task_head_trains_at_lr_head_and_every_other_weight_at_lr(run, setup):
    model, config = target_model(setup, seed=0)
    client = ModelClient(setup, model, config, lr=1e-4)
    groups = {g["name"]: g for g in client.optimizer.param_groups}
    names = {id(p): n for n, p in client.model.named_parameters()}
    assert sorted(names[id(p)] for p in groups["head"]["params"]) == ["classifier.bias", "classifier.weight"]
    assert groups["head"]["lr"] == run.lr_head and groups["body"]["lr"] == 1e-4
    assert len(groups["body"]["params"]) + 2 == len(names)
    # one step of AdamW moves each weight by about its group's rate: the head 50 times further than the body
    before = client.weights()
    client.train_round(1, with_eval=False)
    after = client.weights()
    moved = {k: (after[k] - before[k]).abs().max().item() for k in before}
    assert moved["classifier.weight"] == pytest.approx(run.lr_head, rel=0.05)
    assert max(v for k, v in moved.items() if not k.startswith("classifier.")) == pytest.approx(1e-4, rel=0.05)


def test_model_client_rejects_weights_of_another_model(setup):
    model, config = target_model(setup, seed=0)
    client = ModelClient(setup, model, config, lr=1e-3)
    weights = client.weights()
    weights.pop(next(iter(weights)))
    with pytest.raises(ValueError, match="missing"):
        client.load_weights(weights)
    weights = {**client.weights(), "extra.weight": torch.zeros(1)}
    with pytest.raises(ValueError, match="extra"):
        client.load_weights(weights)
