import pytest
import torch

from fedgrow_core import DualLiGO, GrownModel, LiGO, TransformerShape, get_family
from fedgrow_core.growth.ligo import LAYER_PARAMS
from tests.conftest import make_bert, make_vit
from tests.dense_reference import compose, grow_dense, op_matrices

INTERMEDIATE = {"bert": TransformerShape(3, 48, 96, 6), "vit": TransformerShape(3, 48, 96, 3)}
TARGET = {"bert": TransformerShape(4, 64, 128, 8), "vit": TransformerShape(4, 64, 128, 4)}
MAKERS = {"bert": make_bert, "vit": make_vit}


def _inputs(family, token_batch, image_batch):
    return (), token_batch if family == "bert" else (image_batch,), {}


def _call(model, family, token_batch, image_batch):
    if family == "bert":
        return model(**token_batch)
    return model(image_batch)


def _small_logits(small, family, token_batch, image_batch):
    out = _call(small, family, token_batch, image_batch)
    return out.logits if family == "bert" else out


@pytest.mark.parametrize("family", ["bert", "vit"])
def test_identity_growth_reproduces_small_model_logits(family, token_batch, image_batch):
    small = MAKERS[family]()
    fam = get_family(family)
    shape = fam.shape(small)
    grown = GrownModel(fam, small, LiGO(shape, shape, depth_noise=0.0), num_labels=3 if family == "bert" else 10)
    w, b = fam.head_names()
    with torch.no_grad():
        grown.head.weight.copy_(small.state_dict()[w])
        grown.head.bias.copy_(small.state_dict()[b])
    torch.testing.assert_close(
        _call(grown.eval(), family, token_batch, image_batch),
        _small_logits(small, family, token_batch, image_batch),
        rtol=1e-5,
        atol=1e-5,
    )


@pytest.mark.parametrize("family", ["bert", "vit"])
@pytest.mark.parametrize("input_side", ["normalised", "tied"])
def test_global_after_local_equals_one_operator_of_product_matrices(family, input_side):
    small = MAKERS[family]()
    fam = get_family(family)
    source = fam.shape(small)
    local = LiGO(source, INTERMEDIATE[family], tie_layers=True, input_side=input_side, width_noise=0.05, seed=1)
    glob = LiGO(INTERMEDIATE[family], TARGET[family], input_side=input_side, width_noise=0.05, seed=2)
    dual = DualLiGO(local, glob)
    embed, layers = fam.extract(small)
    spaces = fam.embed_spaces(embed)
    with torch.no_grad():
        got_embed, got_layers = dual.grow(embed, layers, spaces)
        depth = {k: glob.depth_coefficients()[k] @ local.depth_coefficients()[k] for k in LAYER_PARAMS}
        mats = compose(op_matrices(glob), op_matrices(local))
        want_embed, want_layers = grow_dense(depth, mats, embed, layers, spaces)
        # and the two-step route: grow to the intermediate shape, then to the target
        mid_embed, mid_layers = grow_dense(local.depth_coefficients(), op_matrices(local), embed, layers, spaces)
        two_embed, two_layers = grow_dense(glob.depth_coefficients(), op_matrices(glob), mid_embed, mid_layers, spaces)
    for k in want_embed:
        torch.testing.assert_close(got_embed[k], want_embed[k], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(got_embed[k], two_embed[k], rtol=1e-4, atol=1e-5)
    for k in want_layers:
        assert got_layers[k].shape[0] == TARGET[family].layers
        torch.testing.assert_close(got_layers[k], want_layers[k], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(got_layers[k], two_layers[k], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("family", ["bert", "vit"])
def test_width_growth_without_noise_preserves_the_function(family, token_batch, image_batch):
    """Doubling width, heads and FFN with one-hot "sel" init: exact up to float error.

    The residual stream grows as x' = A x; giving the task head the weights
    W_head B^T (input side of the same expansion) must reproduce the logits.
    """
    small = MAKERS[family]()
    fam = get_family(family)
    s = fam.shape(small)
    target = TransformerShape(s.layers, 2 * s.hidden, 2 * s.ffn, 2 * s.heads)
    op = LiGO(s, target, depth_noise=0.0, seed=3)
    grown = GrownModel(fam, small, op, num_labels=3 if family == "bert" else 10).eval()
    w, b = fam.head_names()
    b_res = op.expansions()["res"].dense(input_side=True)
    with torch.no_grad():
        grown.head.weight.copy_(small.state_dict()[w] @ b_res.T)
        grown.head.bias.copy_(small.state_dict()[b])
    torch.testing.assert_close(
        _call(grown, family, token_batch, image_batch),
        _small_logits(small, family, token_batch, image_batch),
        rtol=1e-4,
        atol=1e-5,
    )


def test_tied_input_side_is_not_function_preserving(token_batch):
    small = make_bert()
    fam = get_family("bert")
    s = fam.shape(small)
    op = LiGO(s, TransformerShape(2, 64, 128, 8), depth_noise=0.0, input_side="tied")
    grown = GrownModel(fam, small, op, num_labels=3).eval()
    with torch.no_grad():
        grown.head.weight.copy_(small.classifier.weight @ op.expansions()["res"].dense(True).T / 2)
        grown.head.bias.copy_(small.classifier.bias)
        diff = (grown(**token_batch) - small(**token_batch).logits).abs().max()
    assert diff > 1e-3


def test_global_ligo_state_dict_has_stable_names_and_shapes():
    inter, target = INTERMEDIATE["bert"], TARGET["bert"]
    sd = LiGO(inter, target).state_dict()
    expected = {f"depth.{k.replace('.', '_')}": (target.layers, inter.layers) for k in LAYER_PARAMS}
    expected["width.res"] = (target.hidden - inter.hidden, inter.hidden)
    for s in "qkv":
        expected[f"width.{s}"] = (target.layers, target.hidden - inter.hidden, inter.hidden)
    expected["width.ffn"] = (target.layers, target.ffn - inter.ffn, inter.ffn)
    expected["split.res"] = (target.hidden - inter.hidden,)
    expected["split.v"] = (target.layers, target.hidden - inter.hidden)  # q and k have no input side
    expected["split.ffn"] = (target.layers, target.ffn - inter.ffn)
    assert {k: tuple(v.shape) for k, v in sd.items()} == expected
    # built from the config alone: the same seed gives the same operator
    again = LiGO(inter, target).state_dict()
    assert all(torch.equal(sd[k], again[k]) for k in sd)


def test_depth_init_stackbert_and_interlace():
    s, t = TransformerShape(2, 8, 16, 2), TransformerShape(4, 8, 16, 2)
    stack = LiGO(s, t, depth_noise=0.0, depth_init="stackbert").depth_coefficients()["attn.q.weight"]
    inter = LiGO(s, t, depth_noise=0.0, depth_init="interlace").depth_coefficients()["attn.q.weight"]
    assert stack.argmax(1).tolist() == [0, 1, 0, 1]
    assert inter.argmax(1).tolist() == [0, 0, 1, 1]
    noisy = LiGO(s, t).depth_coefficients()["attn.q.weight"]
    torch.testing.assert_close(noisy.sum(1), torch.ones(4))


@pytest.mark.parametrize(
    "target, match",
    [
        (TransformerShape(1, 32, 64, 4), "layers 2 -> 1"),
        (TransformerShape(2, 16, 64, 2), "hidden 32 -> 16"),
        (TransformerShape(2, 32, 32, 4), "ffn 64 -> 32"),
        (TransformerShape(2, 64, 64, 2), "heads 4 -> 2"),
        (TransformerShape(2, 64, 64, 16), "head_dim 8 -> 4"),
    ],
)
def test_shrinking_target_is_rejected_naming_the_dimension(target, match):
    with pytest.raises(ValueError, match=match):
        LiGO(TransformerShape(2, 32, 64, 4), target)


def test_bad_shapes_and_options_are_rejected():
    with pytest.raises(ValueError, match="not divisible by heads=5"):
        TransformerShape(2, 32, 64, 5)
    with pytest.raises(ValueError, match="layers must be a positive integer"):
        TransformerShape(0, 32, 64, 4)
    s = TransformerShape(2, 32, 64, 4)
    with pytest.raises(ValueError, match="depth_init"):
        LiGO(s, s, depth_init="random")
    with pytest.raises(ValueError, match="unknown model family 'gpt'"):
        get_family("gpt")


def test_dual_ligo_checks_its_halves():
    s, m, t = TransformerShape(2, 32, 64, 4), TransformerShape(3, 48, 96, 6), TransformerShape(4, 64, 128, 8)
    with pytest.raises(ValueError, match="intermediate shape"):
        DualLiGO(LiGO(s, m, tie_layers=True), LiGO(s, t))
    with pytest.raises(ValueError, match="tie_layers=True"):
        DualLiGO(LiGO(s, m), LiGO(m, t))


def test_operator_for_another_small_model_is_rejected():
    small = make_bert()
    fam = get_family("bert")
    other = TransformerShape(3, 32, 64, 4)
    with pytest.raises(ValueError, match="small bert model has shape"):
        GrownModel(fam, small, LiGO(other, TransformerShape(4, 64, 128, 8)), num_labels=3)


def test_wrong_family_model_is_rejected():
    with pytest.raises(ValueError, match="expects a timm VisionTransformer"):
        get_family("vit").shape(make_bert())
    with pytest.raises(ValueError, match="expects a transformers BertModel"):
        get_family("bert").shape(make_vit())
