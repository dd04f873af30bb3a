import json

import pytest
import timm
import torch

from fedgrow_core import DualLiGO, GrownModel, LiGO, TransformerShape, get_family
from fedgrow_core.growth.families.vit import TIMM_NORM_EPS
from tests.conftest import make_bert, make_vit


def _dual(fam, small, inter, target):
    source = fam.shape(small)
    return DualLiGO(LiGO(source, inter, tie_layers=True, seed=1), LiGO(inter, target, seed=2))


def test_bert_export_reloads_with_auto_model_to_identical_logits(tmp_path, token_batch):
    from transformers import AutoModelForSequenceClassification, BertForSequenceClassification

    small = make_bert()
    fam = get_family("bert")
    target = TransformerShape(4, 64, 128, 8)
    grown = GrownModel(fam, small, _dual(fam, small, TransformerShape(3, 48, 96, 6), target), 3).eval()
    with torch.no_grad():
        expected = grown(**token_batch)
    grown.save_pretrained(tmp_path / "grown")
    assert (tmp_path / "grown" / "model.safetensors").exists()
    reloaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "grown").eval()
    assert isinstance(reloaded, BertForSequenceClassification)
    cfg = reloaded.config
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads) == (4, 64, 128, 8)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**token_batch).logits, expected, rtol=1e-5, atol=1e-6)


def test_vit_export_loads_with_timm_local_dir_to_identical_logits(tmp_path, image_batch):
    small = make_vit()
    fam = get_family("vit")
    target = TransformerShape(4, 64, 128, 4)
    grown = GrownModel(fam, small, _dual(fam, small, TransformerShape(3, 48, 96, 3), target), 10).eval()
    # 32 -> 48 -> 64 is not a multiple: the grown LayerNorms carry an epsilon timm's model_args cannot hold
    assert grown.target_config["norm_eps"] != TIMM_NORM_EPS
    with torch.no_grad():
        expected = grown(image_batch)
    grown.save_pretrained(tmp_path / "vit")
    assert {p.name for p in (tmp_path / "vit").iterdir()} == {"config.json", "model.safetensors"}
    cfg = json.loads((tmp_path / "vit" / "config.json").read_text())
    assert cfg["architecture"] == "vit_base_patch16_224" and cfg["num_classes"] == 10
    args = cfg["model_args"]
    assert (args["embed_dim"], args["depth"], args["num_heads"], args["mlp_ratio"]) == (64, 4, 4, 2.0)
    assert (args["img_size"], args["patch_size"], args["in_chans"], args["num_classes"]) == ([8, 8], [2, 2], 1, 10)
    assert cfg["pretrained_cfg"]["input_size"] == [1, 8, 8]
    # the source's normalisation (timm's default for a fresh model, averaged onto its one channel)
    assert (cfg["pretrained_cfg"]["mean"], cfg["pretrained_cfg"]["std"]) == ([0.5], [0.5])
    for model in (timm.create_model(f"local-dir:{tmp_path / 'vit'}", pretrained=True), fam.load(tmp_path / "vit")):
        assert len(model.blocks) == 4 and model.embed_dim == 64
        with torch.no_grad():
            torch.testing.assert_close(model.eval()(image_batch), expected, rtol=1e-5, atol=1e-6)


def test_vit_layernorm_eps_timm_cannot_carry_is_folded_into_the_residual_stream(tmp_path, image_batch):
    fam = get_family("vit")
    model = make_vit()
    config = fam.target_config(model, fam.shape(model), 10, norm_scale=300.0)  # eps 0.09: a visible change
    rebuilt = fam.build(config)
    rebuilt.load_state_dict(model.state_dict())
    rebuilt.eval()
    with torch.no_grad():
        expected = rebuilt(image_batch)
        assert not torch.allclose(model(image_batch), expected, rtol=1e-3, atol=1e-3)
    before = {k: v.clone() for k, v in rebuilt.state_dict().items()}
    fam.save(rebuilt, config, tmp_path)
    # the model itself is left as it was
    assert all(torch.equal(v, before[k]) for k, v in rebuilt.state_dict().items())
    assert rebuilt.norm.eps == pytest.approx(0.09)
    loaded = timm.create_model(f"local-dir:{tmp_path}", pretrained=True).eval()
    assert {m.eps for m in loaded.modules() if isinstance(m, torch.nn.LayerNorm)} == {TIMM_NORM_EPS}
    with torch.no_grad():
        torch.testing.assert_close(loaded(image_batch), expected, rtol=1e-5, atol=1e-6)


def test_vit_with_mixed_layernorm_eps_is_refused(tmp_path):
    fam = get_family("vit")
    model = make_vit()
    model.blocks[0].norm1.eps = 1e-3
    with pytest.raises(ValueError, match="LayerNorm eps"):
        fam.save(model, fam.target_config(model, fam.shape(model), 10), tmp_path)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_count_non_finite_agrees_with_an_elementwise_count(dtype):
    from fedgrow_core.clients.model_export import count_non_finite

    gen = torch.Generator().manual_seed(0)
    for trial in range(20):
        tensor = torch.randn(int(torch.randint(0, 5000, (1,), generator=gen)), generator=gen).to(dtype)
        if tensor.numel() and trial % 4:
            spots = torch.randint(0, tensor.numel(), (trial % 5 + 1,), generator=gen)
            values = torch.tensor([float("nan"), float("inf"), float("-inf")])[torch.arange(len(spots)) % 3]
            tensor[spots] = values.to(dtype)
        expected = sum(1 for v in tensor.double().tolist() if v != v or v in (float("inf"), float("-inf")))
        assert count_non_finite(tensor) == expected
    big = torch.finfo(dtype).max
    overflowing = torch.full((4,), big, dtype=dtype)  # finite entries whose sum overflows
    assert count_non_finite(overflowing) == 0
    assert count_non_finite(torch.tensor([float("inf"), float("-inf")], dtype=dtype)) == 2
    assert count_non_finite(torch.tensor([1, 2, 3])) == 0
