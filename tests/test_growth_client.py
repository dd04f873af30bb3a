"""The client's private side: only the Global-LiGO travels, the rest persists between rounds."""

import numpy as np
import pytest
import torch
from conftest import tiny_bert_folder

from fedgrow_core.clients.growth_client import GrowthClient
from fedgrow_core.protocol import initial_global_ligo
from fedgrow_core.run_config import RunConfig
from fedgrow_core.update_encoding import decode_update


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("clients")
    model = tiny_bert_folder(tmp / "bert", 2, 32, 2, 64, 0)
    return RunConfig.from_flower(
        {
            "client-models": model,
            "intermediate-shape": "2x32x64x2",
            "target-shape": "3x64x128x4",
            "local-steps": 3,
            "batch-size": 8,
            "max-train-examples": 64,
            "finetune-steps": 1,
            "max-length": 32,
        }
    )


def test_reply_is_exactly_the_global_ligo_and_state_persists(run):
    sent = initial_global_ligo(run).state_dict()
    client = GrowthClient(run, 0, 3)
    reply, metrics = client.train_round({k: v.clone() for k, v in sent.items()})
    assert {k: (v.shape, v.dtype) for k, v in reply.items()} == {k: (v.shape, v.dtype) for k, v in sent.items()}
    assert any(not torch.equal(reply[k], sent[k]) for k in sent)
    assert metrics["num-examples"] == 64 and metrics["train-loss"] > 0
    private = client.private_state()
    assert not set(private) & set(sent) and all(not k.startswith("operator.global_") for k in private)
    assert any(k.startswith("operator.local.") for k in private) and "head.weight" in private
    assert any(k.startswith("optimizer.") and k.endswith("exp_avg") for k in private)
    # a fresh process restores the Local-LiGO, head and optimiser moments exactly
    other = GrowthClient(run, 0, 3)
    assert not torch.equal(other.model.head.weight, client.model.head.weight)
    other.load_private_state(private)
    for key, value in client.private_state().items():
        assert torch.equal(other.private_state()[key], value), key


def test_an_int8_update_keeps_its_residual_in_the_private_state(run):
    """The reply is the int8 update of a low-rank Global-LiGO; what it rounds away persists with the private state."""
    run = run.model_copy(update={"update_encoding": "int8", "global_rank": 4})
    sent = initial_global_ligo(run).state_dict()
    client = GrowthClient(run, 0, 3)
    new, _ = client.train_round({k: v.clone() for k, v in sent.items()})
    reply = client.encoded_update(sent, new)
    assert {str(v.dtype) for k, v in reply.items() if not k.endswith(".scale")} == {"torch.int8"}
    values, problem = decode_update(
        {k: v.numpy() for k, v in reply.items()}, {k: v.numpy() for k, v in sent.items()}, "int8"
    )
    assert problem is None
    private = client.private_state()
    for k in sent:  # decoded + residual is the client's new Global-LiGO
        np.testing.assert_allclose(values[k] + private[f"update-residual.{k}"].numpy(), new[k].numpy(), atol=1e-6)
    other = GrowthClient(run, 0, 3)
    other.load_private_state(private)
    assert other.update_residual.keys() == client.update_residual.keys()
    assert all(torch.equal(other.update_residual[k], v) for k, v in client.update_residual.items())


def test_fedprox_term_pulls_towards_the_received_global(run):
    sent = initial_global_ligo(run).state_dict()
    far = GrowthClient(run, 1, 3).train_round({k: v.clone() for k, v in sent.items()})[0]
    near = GrowthClient(run, 1, 3).train_round({k: v.clone() for k, v in sent.items()}, proximal_mu=1e4)[0]

    def dist(state):
        return sum(float(((state[k] - sent[k]) ** 2).sum()) for k in sent)

    assert dist(near) < dist(far)


def test_image_clients_pretrain_their_own_vits_then_grow(tmp_path):
    run = RunConfig.from_flower(
        {
            "task": "image",
            "dataset": "digits",
            "client-models": "vit:1x32,vit:2x64",
            "intermediate-shape": "2x64x256x2",
            "target-shape": "3x128x512x4",
            "pretrain-steps": 60,
            "patch-size": 4,
            "local-steps": 2,
            "batch-size": 32,
            "finetune-steps": 2,
            "lr-finetune": 1e-3,
            "cache-dir": str(tmp_path),
        }
    )
    shapes = []
    for pid in (0, 1):
        client = GrowthClient(run, pid, 2)
        shapes.append(client.small.family.shape(client.small.model))
        reply, metrics = client.train_round(initial_global_ligo(run).state_dict())
        assert metrics["num-examples"] == len(client.train_rows)
        result = client.finetune_and_evaluate(reply, tmp_path / f"grown-{pid}")
        assert result["accuracy"] > 0.2  # 10 classes: pre-trained features carry over
        assert (tmp_path / f"grown-{pid}" / "model.safetensors").is_file()
    assert [(s.layers, s.hidden) for s in shapes] == [(1, 32), (2, 64)]
    # each client pre-trained on its own rows, into its own cache folder
    assert len(list((tmp_path / "vits").iterdir())) == 2


def test_a_node_can_bring_its_own_data_file(run, tmp_path):
    text = tmp_path / "own.csv"
    text.write_text("text,label\n" + "\n".join(f"review {i},{'good' if i % 2 else 'bad'}" for i in range(50)))
    client = GrowthClient(run.model_copy(update={"max_train_examples": 0}), 5, 9, dataset=str(text))
    assert len(client.train_rows) + len(client.test_rows) == 50  # all of the file, no partitioning
    assert set(client.train_rows["text"]) <= {f"review {i}" for i in range(50)}


def test_round_evaluation_is_capped_and_can_be_skipped(run):
    from fedgrow_core.training import evaluate

    capped = run.model_copy(update={"eval_max_examples": 5})
    client = GrowthClient(capped, 0, 3)
    assert sum(len(b["labels"]) for b in client._round_test) == min(5, len(client.test_rows))
    assert sum(len(b["labels"]) for b in client._test) == len(client.test_rows) > 5  # the final evaluation: all rows
    sent = initial_global_ligo(run).state_dict()
    _, metrics = client.train_round({k: v.clone() for k, v in sent.items()})
    # the reported accuracy is the grown model's on exactly the first five test rows
    assert metrics["eval-accuracy"] == evaluate(client.grown_model(), client._round_test, client.device).accuracy
    assert metrics["eval-seconds"] > 0
    _, skipped = client.train_round({k: v.clone() for k, v in sent.items()}, with_eval=False)
    assert "eval-accuracy" not in skipped and "eval-seconds" not in skipped
    assert [capped.evaluates_round(r) for r in (1, 2, 3)] == [True, True, True]
    every_other, never = RunConfig(eval_every=2), RunConfig(eval_every=0)
    assert [every_other.evaluates_round(r) for r in (1, 2, 3, 4)] == [False, True, False, True]
    assert not any(never.evaluates_round(r) for r in (1, 2, 3))


def test_a_head_missing_from_the_checkpoint_is_drawn_from_the_client_seed_only(run, tmp_path):
    """In simulation one worker serves several nodes in any order: the draw must not depend on the process's past."""
    from conftest import make_bert
    from transformers import AutoTokenizer

    from fedgrow_core.clients.setup import ClientSetup

    folder = tmp_path / "encoder-only"
    make_bert(2, 32, 2, 64, vocab_size=30522, max_positions=64).bert.save_pretrained(folder)  # no classifier saved
    AutoTokenizer.from_pretrained(run.client_models[0]).save_pretrained(folder)
    headless = run.model_copy(update={"client_models": (str(folder),)})
    heads = []
    for draws in (0, 5):
        torch.manual_seed(123)
        torch.rand(draws)  # another history of the global RNG
        heads.append(ClientSetup.load(headless, 0, 3).small.model.classifier.weight.detach().clone())
    other = ClientSetup.load(headless, 1, 3).small.model.classifier.weight
    assert torch.equal(heads[0], heads[1])
    assert not torch.equal(heads[0], other)
