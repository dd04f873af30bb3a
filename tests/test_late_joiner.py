"""A newcomer grows its small model with a published Global-LiGO (fedgrow-grow); bad files are refused."""

import pytest
import torch
from conftest import TINY_GROWTH_KEYS, tiny_bert_folder
from safetensors.torch import save_file

from fedgrow_core.clients.setup import ClientSetup
from fedgrow_core.late_joiner import GlobalLigoFileError, grow_newcomer, load_global_ligo, main
from fedgrow_core.protocol import initial_global_ligo
from fedgrow_core.run_config import RunConfig

KEYS = TINY_GROWTH_KEYS


@pytest.fixture(scope="module")
def newcomer(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("newcomer")
    model = tiny_bert_folder(tmp / "bert", 1, 32, 2, 64, 0)
    run = RunConfig.from_flower({**KEYS, "client-models": model})
    published = {k: v + 0.01 * torch.randn_like(v) for k, v in initial_global_ligo(run).state_dict().items()}
    path = tmp / "global_ligo.safetensors"
    save_file(published, str(path))
    return run, ClientSetup.load(run, 0, 1), path, published


def test_both_arms_record_a_curve_and_leave_the_published_tensors_alone(newcomer):
    run, setup, path, published = newcomer
    state = load_global_ligo(path, run)
    for arm in ("frozen", "trainable"):
        curve = grow_newcomer(run, setup, arm, state, growth_steps=4, eval_every=2)
        assert curve.steps == [0, 2, 4] and len(curve.accuracy) == 3
        assert 0 <= curve.grown_accuracy <= 1 and 0 <= curve.final_accuracy <= 1 and curve.test_examples == 16
    # the published tensors themselves are never modified
    assert all(torch.equal(state[k], published[k]) for k in published)


def test_frozen_keeps_every_global_tensor_and_trains_the_rest(newcomer):
    from fedgrow_core.clients.growth_client import GrowthClient

    run, setup, path, _ = newcomer
    client = GrowthClient(run, 0, 1, setup=setup)
    client.load_global_state(load_global_ligo(path, run))
    client.freeze_global()
    before = {k: v.clone() for k, v in client.model.state_dict().items()}
    client.train_round(client.global_state(), with_eval=False)
    after = client.model.state_dict()
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    assert moved and not any(k.startswith("operator.global_.") for k in moved)
    assert any(k.startswith("operator.local.") for k in moved) and "head.weight" in moved
    trainable = GrowthClient(run, 0, 1, setup=setup)  # the trainable arm: the Global-LiGO moves too
    trainable.load_global_state(load_global_ligo(path, run))
    start = trainable.global_state()
    trainable.train_round(trainable.global_state(), with_eval=False)
    assert any(not torch.equal(start[k], v) for k, v in trainable.global_state().items())


def test_a_budget_that_is_not_a_whole_number_of_evaluations_is_refused(newcomer):
    run, setup, _, _ = newcomer
    with pytest.raises(ValueError, match="growth-steps = 5, eval-every = 2"):
        grow_newcomer(run, setup, "initial", growth_steps=5, eval_every=2)


def test_the_small_arm_trains_a_copy_of_the_small_model(newcomer):
    run, setup, _, _ = newcomer
    before = {k: v.clone() for k, v in setup.small.model.state_dict().items()}
    curve = grow_newcomer(run, setup, "small", growth_steps=2, eval_every=2)
    assert curve.grown_accuracy is None and curve.steps == [0, 2]
    assert all(torch.equal(before[k], v) for k, v in setup.small.model.state_dict().items())


def test_a_global_ligo_of_other_shapes_or_not_finite_is_refused_by_name(newcomer, tmp_path):
    run, _, _, published = newcomer
    bad = dict(published)
    bad["width.res"] = torch.zeros(3, 3)
    bad["depth.attn_q_weight"] = published["depth.attn_q_weight"].clone().fill_(float("nan"))
    bad["extra"] = torch.zeros(1)
    del bad["width.ffn"]
    path = tmp_path / "bad.safetensors"
    save_file(bad, str(path))
    with pytest.raises(GlobalLigoFileError) as err:
        load_global_ligo(path, run)
    text = str(err.value)
    assert f"tensor 'width.res' has shape (3, 3), expected {tuple(published['width.res'].shape)}" in text
    assert "tensor 'depth.attn_q_weight' holds NaN or Inf" in text
    assert "unexpected tensor 'extra'" in text
    assert f"missing tensor 'width.ffn', expected shape {tuple(published['width.ffn'].shape)}" in text
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(GlobalLigoFileError, match="cannot read the Global-LiGO file"):
        load_global_ligo(tmp_path / "junk.safetensors", run)


def test_the_command_refuses_a_bad_file_and_writes_nothing(newcomer, tmp_path, capsys):
    run, setup, _, published = newcomer
    path = tmp_path / "bad.safetensors"
    save_file({**published, "width.res": torch.zeros(3, 3)}, str(path))
    out = tmp_path / "grown"
    keys = [f"{k}={v!r}".replace("'", '"') for k, v in KEYS.items()]
    argv = ["--global-ligo", str(path), "--model", setup.model_name, "--dataset", "rotten-tomatoes", "--out", str(out)]
    with pytest.raises(SystemExit) as exit_:
        main([*argv, *keys])
    assert exit_.value.code == 2
    assert "tensor 'width.res' has shape (3, 3)" in capsys.readouterr().err
    assert not out.exists()
