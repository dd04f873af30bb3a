"""Grown linear layers in factored form: every split of the matrix chain against dense matrices."""

import itertools
from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from fedgrow_core import DualLiGO, GrownModel, LiGO, TransformerShape, get_family
from fedgrow_core.growth import template_cache
from fedgrow_core.growth.expansion import Expansion
from fedgrow_core.growth.linear_chain import grow_linear_stack, plan_linear
from tests.conftest import make_bert, make_vit


def _ops(seed=0):
    """A Dual-LiGO with width growth on both legs, moved off its init so every factor matters."""
    small, inter = TransformerShape(2, 32, 64, 4), TransformerShape(3, 48, 96, 4)
    target = TransformerShape(4, 72, 128, 6)
    op = DualLiGO(LiGO(small, inter, tie_layers=True, seed=2), LiGO(inter, target, seed=1))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in op.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    return op


def _dense_chain(chain, layer, input_side):
    """The product A_g A_l (or B_g B_l) of one layer, as a dense matrix."""
    mats = []
    for exp in chain:
        d = exp.dense(input_side=input_side)
        mats.append(d[layer] if d.dim() == 3 else d)
    out = mats[0]
    for m in mats[1:]:
        out = m @ out
    return out


@pytest.mark.parametrize("input_side", [False, True])
def test_contract_cols_is_the_transpose_of_the_dense_matrix(input_side):
    op = _ops()
    for space in ("res", "q", "ffn"):
        exp = op.global_.expansions()[space]
        layer = exp.unbind(4)[2] if exp.e.dim() == 3 else exp
        x = torch.randn(5, 7, layer.d2, dtype=torch.float64)
        split = None if layer.split is None else layer.split.double()
        got = Expansion(layer.e.double(), layer.perm, layer.input_side, split=split, permuted=layer.permuted)
        dense = got.dense(input_side=input_side)  # grow_rows of the identity: A (or B) column by column
        torch.testing.assert_close(got.contract_cols(x, input_side=input_side), x @ dense)


@pytest.mark.parametrize("kind", [("q", "res"), ("res", "v"), ("ffn", "res"), ("res", "ffn")])
@pytest.mark.parametrize("absorb", list(itertools.product(range(3), range(3))))
def test_every_split_gives_the_dense_layer_and_its_gradients(kind, absorb):
    """y = x (A W B^T)^T + b with A, B built densely: outputs and gradients of E, depth-mixed W and x."""
    out_space, in_space = kind
    op = _ops()
    chains = op.width_chains()
    out_chain, in_chain = chains[out_space], chains[in_space]
    d_out, d_in = out_chain[0].d1, in_chain[0].d1
    g = torch.Generator().manual_seed(5)
    w = torch.randn(4, d_out, d_in, generator=g, requires_grad=True)
    x = torch.randn(3, 6, in_chain[-1].d2, generator=g, requires_grad=True)
    bias = torch.randn(4, out_chain[-1].d2, generator=g)

    factors = grow_linear_stack(w, bias, out_chain, in_chain, tokens=18, absorb=absorb)
    got = torch.stack([f(x) for f in factors])
    got_grads = torch.autograd.grad(got.square().sum(), [w, x, *op.parameters()], allow_unused=True)

    dense = []
    for i in range(4):
        a, b = _dense_chain(out_chain, i, False), _dense_chain(in_chain, i, True)
        dense.append(x @ (a @ w[i] @ b.T).T + bias[i])
    want = torch.stack(dense)
    want_grads = torch.autograd.grad(want.square().sum(), [w, x, *op.parameters()], allow_unused=True)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    for a, b in zip(got_grads, want_grads, strict=True):
        assert (a is None) == (b is None)
        if a is not None:
            # float32 sums in different orders; the trainable split weights' gradients reach ~1e3 here
            torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3)


def test_the_plan_factors_small_batches_and_absorbs_the_costly_side_of_large_ones():
    chains = _ops().width_chains()
    out_chain, in_chain = chains["ffn"], chains["res"]
    small = plan_linear(out_chain, in_chain, (64, 32), tokens=1)
    large = plan_linear(out_chain, in_chain, (64, 32), tokens=10**6)
    assert (small.out_absorbed, small.in_absorbed) == (0, 0)
    # rows grow 64 -> 96 -> 128 on 32 columns once per step; the input side 72 -> 48 -> 32 stays on the
    # activations, since contracting it costs (48-32)*32 + (72-48)*48 per token, less than the 128 x (72-32)
    # it would add to the matmul
    assert (large.out_absorbed, large.in_absorbed) == (2, 0)
    assert large.fixed_macs == (96 - 64) * 64 * 32 + (128 - 96) * 96 * 32
    assert large.token_macs == 128 * 32 + (48 - 32) * 32 + (72 - 48) * 48
    assert large.token_macs < 128 * 72  # cheaper per token than the target layer itself


def _counted_flops(fn):
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


@pytest.mark.parametrize("kind", [("q", "res"), ("ffn", "res"), ("res", "ffn")])
def test_the_plan_is_the_split_with_the_fewest_counted_flops(kind):
    """An independent count: torch's FlopCounterMode over the real computation of every split."""
    out_space, in_space = kind
    chains = _ops().width_chains()
    out_chain, in_chain = chains[out_space], chains[in_space]
    shape = (out_chain[0].d1, in_chain[0].d1)
    w = torch.randn(4, *shape)
    splits = list(itertools.product(range(3), range(3)))
    fixed = {
        a: _counted_flops(lambda a=a: grow_linear_stack(w, None, out_chain, in_chain, 1, absorb=a)) / 4 for a in splits
    }
    for tokens in (1, 30, 300, 3000):
        x = torch.randn(tokens, in_chain[-1].d2)
        total = {}
        for a in splits:
            factors = grow_linear_stack(w, None, out_chain, in_chain, tokens, absorb=a)[0]
            total[a] = fixed[a] + _counted_flops(lambda f=factors, x=x: f(x))
        plan = plan_linear(out_chain, in_chain, shape, tokens)
        chosen = (plan.out_absorbed, plan.in_absorbed)
        assert total[chosen] == min(total.values()), (tokens, chosen, total)
        assert total[chosen] == 2 * (plan.fixed_macs + tokens * plan.token_macs)  # FLOPs = 2 x multiply-adds


@pytest.mark.parametrize(
    ("seq", "inter", "input_side"),
    [
        (2, TransformerShape(3, 48, 96, 4), "normalised"),
        (64, TransformerShape(3, 48, 96, 4), "normalised"),
        (64, TransformerShape(3, 48, 96, 4), "tied"),
        (16, TransformerShape(3, 32, 64, 4), "normalised"),  # no local width growth: identity factors dropped
    ],
)
def test_grown_model_factored_forward_equals_materialised_weights(seq, inter, input_side):
    small = make_bert(layers=2, hidden=32, heads=4, ffn=64, num_labels=3, vocab_size=100, max_positions=64)
    fam = get_family("bert")
    target = TransformerShape(4, 72, 128, 6)
    local = LiGO(fam.shape(small), inter, tie_layers=True, input_side=input_side)
    model = GrownModel(fam, small, DualLiGO(local, LiGO(inter, target, input_side=input_side)), 3)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.eval()
    ids = torch.randint(1, 100, (2, seq))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    labels = torch.tensor([0, 2])
    fast = model(**batch)
    fast_grads = torch.autograd.grad(F.cross_entropy(fast, labels), list(model.parameters()), allow_unused=True)
    reference = model.to_family_model()
    torch.testing.assert_close(fast, reference(**batch).logits, rtol=1e-4, atol=1e-5)
    model._factored = {}  # the materialised path
    slow = model(**batch)
    slow_grads = torch.autograd.grad(F.cross_entropy(slow, labels), list(model.parameters()), allow_unused=True)
    torch.testing.assert_close(fast, slow, rtol=1e-4, atol=1e-5)
    for a, b, p in zip(fast_grads, slow_grads, model.parameters(), strict=True):
        if p.numel() == 0:  # a space that does not grow: one path may not touch its empty tensors
            continue
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("images", [1, 64])
def test_vit_fused_qkv_factored_forward_equals_materialised_weights(images):
    """timm's fused qkv: one stand-in computes q, k, v from their own factors; logits, gradients as materialised."""
    small = make_vit(layers=2, hidden=32, heads=2, ffn=64)
    fam = get_family("vit")
    inter, target = TransformerShape(3, 48, 96, 3), TransformerShape(4, 64, 128, 4)  # head_dim 16 kept
    model = GrownModel(fam, small, DualLiGO(LiGO(fam.shape(small), inter, tie_layers=True), LiGO(inter, target)), 10)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.eval()
    x = torch.randn(images, 1, 8, 8)
    labels = torch.arange(images) % 10
    tokens = fam.tokens((x,), {}, model.target_config)
    assert tokens == images * (4 * 4 + 1)  # 8 px / patch 2 = 4 x 4 patches, plus the class token
    _, linears = model._grow_factored(model.small_embed.as_dict(), tokens)
    rest = sum(len(f.in_rest) + len(f.out_rest) for stack in linears.values() for f in stack)
    assert rest > 0  # some factors are applied to the activations, so the fused stand-in is exercised
    fast = model(x)
    fast_grads = torch.autograd.grad(F.cross_entropy(fast, labels), list(model.parameters()), allow_unused=True)
    torch.testing.assert_close(fast, model.to_family_model()(x), rtol=1e-4, atol=1e-5)
    model._factored = {}  # the materialised path
    slow = model(x)
    slow_grads = torch.autograd.grad(F.cross_entropy(slow, labels), list(model.parameters()), allow_unused=True)
    torch.testing.assert_close(fast, slow, rtol=1e-4, atol=1e-5)
    for a, b in zip(fast_grads, slow_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5)


def test_grown_models_of_one_target_share_its_meta_templates_built_once_per_process(monkeypatch):
    """The family's model is built once per process and target; the factored template copies its meta template."""
    fam = get_family("vit")
    small = make_vit(layers=2, hidden=32, heads=2, ffn=64)
    inter, target = TransformerShape(3, 48, 96, 3), TransformerShape(4, 64, 128, 4)
    monkeypatch.setattr(template_cache, "_TEMPLATES", OrderedDict())  # as in a new process
    built = []
    real_build = type(fam).build
    monkeypatch.setattr(type(fam), "build", lambda self, config: built.append(1) or real_build(self, config))

    def model():
        return GrownModel(fam, small, DualLiGO(LiGO(fam.shape(small), inter, tie_layers=True), LiGO(inter, target)), 10)

    first = model()
    assert len(built) == 2  # its build, and the replay check's second build from another random state
    second = model()
    assert len(built) == 2  # the second model replays the first build's random draws (test_template_cache)
    assert first._template[0] is second._template[0] and first._template[1] is second._template[1]
    assert first._factored.keys() == second._factored.keys() and first._factored
    assert all(p.is_meta for t in second._template for p in t.parameters())  # they hold no weights
    x = torch.randn(3, 1, 8, 8)
    second.eval()
    torch.testing.assert_close(second(x), second.to_family_model()(x), rtol=1e-4, atol=1e-5)
    assert all(m.factors == [None] * len(m.factors) for m, _ in second._factored.values())  # cleared after


def _query_and_key(chains):
    """Two fully factored layer stacks that read one input through the residual space, sharing a memo."""
    w = torch.randn(4, 32, 32)
    inputs = {}
    q, k = (
        grow_linear_stack(w, None, chains["q"], chains["res"], 10, absorb=(0, 0), inputs=inputs, space="res")
        for _ in "qk"
    )
    return w, q, k


def test_layers_reading_the_same_input_contract_it_once(monkeypatch):
    op = _ops()
    chains = op.width_chains()
    calls = []
    original = Expansion.contract_cols

    def counted(self, x, input_side=False):
        calls.append(x.shape)
        return original(self, x, input_side)

    monkeypatch.setattr(Expansion, "contract_cols", counted)
    w, q, k = _query_and_key(chains)
    x = torch.randn(2, 5, 72)
    torch.testing.assert_close(q[1](x), k[1](x))
    assert len(calls) == 2  # global then local contraction, once for both layers
    k[1](x.clone())  # another tensor: contracted again
    assert len(calls) == 4


def test_the_memo_is_not_used_for_a_changed_or_differently_tracked_input():
    op = _ops()
    chains = op.width_chains()
    w, q, k = _query_and_key(chains)
    x = torch.randn(2, 5, 72)
    q[0](x)
    x.mul_(2.0)  # in place: the same object, another value
    torch.testing.assert_close(
        k[0](x), x @ (_dense_chain(chains["q"], 0, False) @ w[0] @ _dense_chain(chains["res"], 0, True).T).T
    )
    y = torch.randn(2, 5, 72, requires_grad=True)
    with torch.no_grad():
        q[0](y)
    k[0](y).sum().backward()  # a no-grad entry must not be reused where gradients are wanted
    assert y.grad is not None and y.grad.abs().sum() > 0


def test_width_factors_run_in_float32_under_bf16_autocast(monkeypatch):
    """E and the activations it meets stay float32 (bf16 cannot hold 1 + 1e-3); only the matmul with W is bf16."""
    op = _ops()
    chains = op.width_chains()
    seen = []
    for name in ("grow_cols", "contract_cols"):
        original = getattr(Expansion, name)

        def recorded(self, x, input_side=False, original=original):
            out = original(self, x, input_side)
            seen.append((x.dtype, out.dtype))
            return out

        monkeypatch.setattr(Expansion, name, recorded)
    w = torch.randn(4, 32, 32)
    (factors, *_) = grow_linear_stack(w, torch.randn(4, 72), chains["q"], chains["res"], 3, absorb=(0, 0))
    x = torch.randn(3, 72)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = factors(x)
    assert len(seen) == 4 and set(seen) == {(torch.float32, torch.float32)}
    assert y.dtype == torch.bfloat16  # as nn.Linear under autocast
    want = x @ (_dense_chain(chains["q"], 0, False) @ w[0] @ _dense_chain(chains["res"], 0, True).T).T
    assert (y.float() - want - factors.bias).abs().max() < 0.1 * want.abs().max()


def test_contract_cols_refuses_a_layer_batched_e():
    exp = _ops().global_.expansions()["q"]
    with pytest.raises(ValueError, match="one layer's E"):
        exp.contract_cols(torch.randn(4, 72))


def test_vit_tokens_read_the_image_from_args_or_x_and_refuse_other_inputs():
    fam = get_family("vit")
    small = make_vit(layers=2, hidden=32, heads=2, ffn=64)
    config = fam.target_config(small, TransformerShape(3, 48, 96, 3), 10)
    image = torch.randn(5, 1, 8, 8)
    assert fam.tokens((image,), {}, config) == fam.tokens((), {"x": image}, config) == 5 * (16 + 1)
    assert fam.tokens((torch.randn(5, 17, 32),), {}, config) is None  # not an image batch: materialise


def test_vit_state_dict_refuses_part_of_a_fused_qkv():
    fam = get_family("vit")
    _, layers = fam.extract(make_vit(layers=2, hidden=32, heads=2, ffn=64))
    del layers["attn.k.weight"]
    with pytest.raises(ValueError, match="all present or all absent"):
        fam.to_state_dict({}, layers)
