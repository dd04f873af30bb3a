"""Pre-training small ViTs: a tiny run beats chance, saves a loadable model, and is cached."""

import json
from pathlib import Path

import pytest
import torch

from fedgrow_core.data.preprocessing import make_dataloader
from fedgrow_core.data.sources import load_data_source
from fedgrow_core.growth.shapes import TransformerShape
from fedgrow_core.training import evaluate
from fedgrow_core.zoo.registry import load_small_model
from fedgrow_core.zoo.vit_pretrain import VitSpec, main, pretrain_small_vits


def test_tiny_vits_beat_chance_and_are_cached(tmp_path):
    data = load_data_source("digits")["train"].train_test_split(test_size=0.2, seed=0, stratify_by_column="label")
    specs = [VitSpec.parse("1x32"), VitSpec.parse("2x64x4")]
    kw = dict(data_tag="digits", steps=120, batch_size=64, lr=3e-3, patch_size=4, seed=0, device="cpu")
    first = pretrain_small_vits(specs, data["train"], data["test"], tmp_path, **kw)
    assert [r.cached for r in first] == [False, False]
    for r in first:
        assert r.test_accuracy > 0.5  # chance is 0.1
    # heterogeneous depths and widths, loadable as zoo models with their own transform
    shapes = []
    for r in first:
        small = load_small_model(r.path, 10)
        shapes.append(small.family.shape(small.model))
        acc = evaluate(small.model, make_dataloader(data["test"], small.preprocessor, 128), torch.device("cpu"))
        assert acc.accuracy == pytest.approx(r.test_accuracy)
        saved = json.loads((Path(r.path) / "metrics.json").read_text())
        assert saved["test_accuracy"] == r.test_accuracy and saved["spec"] == str(specs[len(shapes) - 1])
    assert shapes == [TransformerShape(1, 32, 128, 1), TransformerShape(2, 64, 256, 4)]
    again = pretrain_small_vits(specs, data["train"], data["test"], tmp_path, **kw)
    assert [r.cached for r in again] == [True, True]
    assert [r.path for r in again] == [r.path for r in first]
    changed = pretrain_small_vits(specs[:1], data["train"], data["test"], tmp_path, **{**kw, "steps": 121})
    assert not changed[0].cached and changed[0].path != first[0].path


def test_command_line_on_a_client_shard(tmp_path, capsys):
    results = main(
        ["--dataset", "digits", "--specs", "1x32", "--steps", "5", "--patch-size", "4", "--out", str(tmp_path)]
        + ["--num-partitions", "3", "--partition-id", "1", "--device", "cpu"]
    )
    assert len(results) == 1 and Path(results[0].path, "model.safetensors").is_file()
    cfg = json.loads(Path(results[0].path, "config.json").read_text())
    assert cfg["architecture"] == "vit_base_patch16_224"
    assert (cfg["model_args"]["embed_dim"], cfg["model_args"]["depth"], cfg["model_args"]["num_heads"]) == (32, 1, 1)
    # timm's pretrained_cfg keeps the normalisation measured on the shard, one value per channel
    assert len(cfg["pretrained_cfg"]["mean"]) == len(cfg["pretrained_cfg"]["std"]) == cfg["model_args"]["in_chans"]
    assert cfg["pretrained_cfg"]["mean"] != [0.5]
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["spec"] == "1x32x1" and 0 <= line["test_accuracy"] <= 1


@pytest.mark.parametrize("text", ["4", "4x", "ax192", "0x64", "2x64x5"])
def test_bad_spec(text):
    with pytest.raises(ValueError, match=repr(text)):
        VitSpec.parse(text)
