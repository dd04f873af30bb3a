"""What growth keeps of the small model's function at initialisation (LEMON-style width, identity depth)."""

import logging
import tomllib
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from fedgrow_core import DualLiGO, GrownModel, LiGO, TransformerShape, get_family
from fedgrow_core.growth.expansion import Expansion, residual_selection
from fedgrow_core.growth.ligo import RESIDUAL_OUTPUT_KINDS
from fedgrow_core.growth.preservation import depth_gaps, feature_gap, width_gaps
from tests.conftest import make_bert, make_vit


def _perturbed_bert(**kwargs):
    """A tiny BERT whose LayerNorm gains and biases differ per feature (as in a pre-trained one)."""
    model = make_bert(**kwargs)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "LayerNorm" in name:
                p.add_(0.3 * torch.randn(p.shape, generator=g))
    return model


def _gaps(family, small, op, inputs):
    fam = get_family(family)
    grown = GrownModel(fam, small, op, 3 if family == "bert" else 10).eval()
    big = grown.to_family_model()
    args, kwargs = ((), inputs) if family == "bert" else ((inputs,), {})
    with torch.no_grad():
        feat = feature_gap(fam.final_features(small, *args, **kwargs), fam.final_features(big, *args, **kwargs))
        ref = small(*args, **kwargs)
        logits = float((grown(*args, **kwargs) - getattr(ref, "logits", ref)).abs().max())
    return feat, logits


@pytest.mark.parametrize(
    "target",
    [
        TransformerShape(2, 48, 96, 3),  # 1.5x width, 1.5x FFN, heads 2 -> 3 (indivisible)
        TransformerShape(2, 80, 100, 5),  # 2.5x width: one full copy, then mean rows
        TransformerShape(2, 64, 128, 2),  # head dimension 16 -> 32
        TransformerShape(2, 112, 200, 7),  # 3.5x width, 7 heads of 16
    ],
)
def test_pre_ln_vit_width_growth_is_exact_at_any_width(target, image_batch):
    small = make_vit(hidden=32, heads=2, ffn=64)
    feat, logits = _gaps("vit", small, LiGO(get_family("vit").shape(small), target, depth_noise=0.0), image_batch)
    assert feat < 1e-5 and logits < 1e-5


def test_dual_ligo_of_a_vit_with_identity_depth_is_exact(image_batch):
    small = make_vit(layers=2, hidden=32, heads=2, ffn=64)
    s = get_family("vit").shape(small)
    inter, target = TransformerShape(3, 48, 96, 3), TransformerShape(5, 80, 160, 5)
    local = LiGO(s, inter, tie_layers=True, depth_init="identity", depth_noise=0.0, seed=1)
    op = DualLiGO(local, LiGO(inter, target, depth_init="identity", depth_noise=0.0, seed=2))
    feat, logits = _gaps("vit", small, op, image_batch)
    assert feat < 1e-5 and logits < 1e-5
    # and the stacking init, which copies layers, is not
    stack = DualLiGO(
        LiGO(s, inter, tie_layers=True, depth_noise=0.0, seed=1), LiGO(inter, target, depth_noise=0.0, seed=2)
    )
    assert _gaps("vit", small, stack, image_batch)[0] > 1e-2


def test_post_ln_bert_width_growth_is_exact_for_multiples_and_head_dim_doubling(token_batch):
    small = _perturbed_bert(hidden=32, heads=4, ffn=64)
    s = get_family("bert").shape(small)
    for target in (TransformerShape(2, 64, 128, 8), TransformerShape(2, 64, 96, 4), TransformerShape(2, 96, 200, 6)):
        feat, logits = _gaps("bert", small, LiGO(s, target, depth_noise=0.0), token_batch)
        assert feat < 1e-5 and logits < 1e-5, target


def test_post_ln_bert_at_an_indivisible_width_is_not_exact_and_says_so(token_batch, caplog):
    small = _perturbed_bert(hidden=32, heads=4, ffn=64)
    s = get_family("bert").shape(small)
    target = TransformerShape(2, 48, 96, 6)
    assert width_gaps(s, target, "post") and "hidden 32 -> 48" in width_gaps(s, target, "post")[0]
    assert width_gaps(s, target, "pre") == []
    with caplog.at_level(logging.WARNING, logger="fedgrow_core.growth.grown_model"):
        feat, _ = _gaps("bert", small, LiGO(s, target, depth_noise=0.0), token_batch)
    assert "hidden 32 -> 48" in caplog.text
    assert feat > 1e-3
    # the warning gives the bound it measured on its probe batch
    import re

    from fedgrow_core.growth.preservation import probe_gap

    (stated,) = (float(m) for m in re.findall(r"measured: max \|diff\| (\S+) of the final", caplog.text))
    grown = GrownModel(get_family("bert"), small, LiGO(s, target, depth_noise=0.0), 3)
    assert (
        stated == pytest.approx(probe_gap(get_family("bert"), small, grown.to_family_model()), rel=1e-2)
        and stated > 1e-3
    )


def test_every_width_gap_of_both_legs_is_named_in_one_warning(caplog):
    """A Dual-LiGO through an indivisible intermediate width (as the default 7 x 480) logs one line, not one per gap."""
    small = _perturbed_bert(hidden=32, heads=4, ffn=64)
    s = get_family("bert").shape(small)
    inter, target = TransformerShape(s.layers, 40, 64, 4), TransformerShape(s.layers, 64, 64, 4)
    gaps = width_gaps(s, inter, "post") + width_gaps(inter, target, "post")
    assert len(gaps) == 4  # hidden 32 -> 40 and 40 -> 64, head dim 8 -> 10 and 10 -> 16
    op = DualLiGO(LiGO(s, inter, tie_layers=True, depth_noise=0.0), LiGO(inter, target, depth_noise=0.0))
    with caplog.at_level(logging.WARNING, logger="fedgrow_core.growth.grown_model"):
        GrownModel(get_family("bert"), small, op, 3)
    (record,) = [r for r in caplog.records if "not exact at initialisation" in r.getMessage()]
    named = record.getMessage().split("(", 1)[1].split(")", 1)[0]
    assert (
        named
        == ", ".join(gap.split(":")[0] for gap in gaps)
        == ("hidden 32 -> 40, head_dim 8 -> 10, hidden 40 -> 64, head_dim 10 -> 16")
    )


def test_head_dim_growth_below_twofold_is_named_and_shrinks_logits_by_the_stated_factor():
    s, t = TransformerShape(1, 32, 64, 2), TransformerShape(1, 48, 64, 2)  # head dim 16 -> 24
    (gap,) = width_gaps(s, t, "pre")
    assert "head_dim 16 -> 24" in gap
    op = LiGO(s, t, depth_noise=0.0)
    # the extra key rows cancel in groups (+1, -1, ...), so q'.k' = q.k and the logits shrink by sqrt(16/24)
    k = op.expansions()["k"].dense()[0]
    q = op.expansions()["q"].dense()[0]
    x, y = torch.randn(32), torch.randn(32)
    assert torch.allclose((q @ x) @ (k @ y), x @ y, rtol=1e-5)
    assert width_gaps(s, TransformerShape(1, 64, 64, 2), "pre") == []


def test_average_expansion_keeps_mean_and_scales_variance_as_stated():
    g = torch.Generator().manual_seed(0)
    for d1, d2 in ((6, 9), (6, 12), (6, 16), (5, 5)):
        e, w, scale = residual_selection(d1, d2, g)
        a = torch.cat([torch.eye(d1), e])
        x = torch.randn(7, d1, generator=g)
        xg = x @ a.T
        torch.testing.assert_close(xg.mean(-1), x.mean(-1))
        torch.testing.assert_close(xg.var(-1, unbiased=False), scale**2 * x.var(-1, unbiased=False))
        # mean rows are never read on the input side, copies split one feature's weight to 1
        b = Expansion(e, torch.arange(d2), split=w).dense(input_side=True)
        torch.testing.assert_close(b.T @ a, torch.eye(d1))
        assert torch.all(b[d1 + (d2 // d1 - 1) * d1 :] == 0)


def test_copies_of_one_feature_get_different_gradients():
    """Three copies of a feature (4x growth): unequal split weights break their symmetry (LEMON)."""
    small = make_vit(layers=1, hidden=16, heads=1, ffn=32)
    s = get_family("vit").shape(small)
    op = LiGO(s, TransformerShape(1, 16, 128, 1), depth_noise=0.0)
    grown = GrownModel(get_family("vit"), small, op, 10)
    F.cross_entropy(grown(torch.randn(4, 1, 8, 8)), torch.tensor([0, 1, 2, 3])).backward()
    e, grad = op.width["ffn"].detach()[0], op.width["ffn"].grad[0]
    src = e.argmax(-1)
    rows = (src == src[0]).nonzero().flatten()
    assert len(rows) == 3
    assert not torch.allclose(grad[rows[0]], grad[rows[1]]) and not torch.allclose(grad[rows[1]], grad[rows[2]])


def test_identity_depth_zeroes_only_the_residual_outputs_of_new_layers():
    op = LiGO(TransformerShape(3, 32, 64, 2), TransformerShape(5, 32, 64, 2), depth_init="identity", depth_noise=0.0)
    coeffs = op.depth_coefficients()
    originals = [0, 2, 4]  # interlace: target layers 0, 2, 4 are source layers 0, 1, 2
    for kind, c in coeffs.items():
        assert torch.equal(c[originals], torch.eye(3))
        new_rows = c[[1, 3]]
        if kind in RESIDUAL_OUTPUT_KINDS:
            assert torch.equal(new_rows, torch.zeros(2, 3))
        else:
            assert torch.equal(new_rows.sum(-1), torch.ones(2))
    assert depth_gaps("identity", 3, 5, "pre") == [] and depth_gaps("identity", 3, 5, "post")
    assert depth_gaps("stackbert", 3, 5, "pre") and depth_gaps("stackbert", 3, 3, "post") == []


def test_forward_makes_no_device_to_host_permutation_check(monkeypatch, token_batch):
    small = make_bert()
    s = get_family("bert").shape(small)
    grown = GrownModel(get_family("bert"), small, LiGO(s, TransformerShape(3, 64, 128, 8)), 3)

    def refuse(*args, **kwargs):
        raise AssertionError("torch.equal called in the forward")

    monkeypatch.setattr(torch, "equal", refuse)
    grown(**token_batch)


def test_a_pretrained_vit_grows_to_the_image_presets_widths_within_1e4(tmp_path):
    """A ViT pre-trained here (as an image client's) through the preset's widths: 128 -> 192 -> 384, heads of 32."""
    from fedgrow_core.data.preprocessing import make_dataloader
    from fedgrow_core.data.sources import load_data_source
    from fedgrow_core.run_config import RunConfig
    from fedgrow_core.zoo.registry import load_small_model
    from fedgrow_core.zoo.vit_pretrain import VitSpec, pretrain_small_vits

    data = load_data_source("digits")["train"].train_test_split(test_size=0.2, seed=0, stratify_by_column="label")
    (result,) = pretrain_small_vits(
        [VitSpec.parse("3x128")], data["train"], data["test"], tmp_path, data_tag="digits", steps=60,
        batch_size=64, lr=3e-3, patch_size=4, seed=0, device="cpu",
    )  # fmt: skip
    assert result.test_accuracy > 0.3  # it learned something: weights that are not an initialisation
    small = load_small_model(result.path, 10)
    images = next(iter(make_dataloader(data["test"], small.preprocessor, 16)))["pixel_values"]
    preset = RunConfig.from_flower(tomllib.loads((Path(__file__).parents[1] / "presets" / "image.toml").read_text()))
    inter, target = preset.intermediate_shape, preset.target_shape
    s = get_family("vit").shape(small.model)
    for depth_init, layers in (("stackbert", (s.layers, s.layers)), ("identity", (inter.layers, target.layers))):
        mid = TransformerShape(layers[0], inter.hidden, inter.ffn, inter.heads)
        big = TransformerShape(layers[1], target.hidden, target.ffn, target.heads)
        op = DualLiGO(
            LiGO(s, mid, tie_layers=True, depth_init=depth_init, depth_noise=0.0, seed=1),
            LiGO(mid, big, depth_init=depth_init, depth_noise=0.0, seed=2),
        )
        feat, logits = _gaps("vit", small.model.eval(), op, images)
        assert feat <= 1e-4 and logits <= 1e-4, (depth_init, feat, logits)


def test_a_one_channel_vits_target_config_takes_timms_values_without_its_warning(caplog):
    """timm warns, for mean and std, when a 1-channel ViT carries ImageNet's 3-channel defaults; growth must not."""
    import timm

    small = make_vit(layers=2, hidden=32, heads=2, ffn=64)
    small.pretrained_cfg = {**small.pretrained_cfg, "mean": timm.data.IMAGENET_DEFAULT_MEAN}
    small.pretrained_cfg.pop("std", None)
    with caplog.at_level(logging.WARNING, logger="timm"):
        config = get_family("vit").target_config(small, get_family("vit").shape(small), 10)
    assert not [r for r in caplog.records if r.name.startswith("timm")]
    with caplog.at_level(logging.WARNING, logger="timm"):
        expected = timm.data.resolve_input_data_config(small)  # timm's own values, with its warning
    assert config["data_config"] == {"mean": list(expected["mean"]), "std": list(expected["std"])}
    assert len([r for r in caplog.records if "does not match 1 channels" in r.getMessage()]) == 2
