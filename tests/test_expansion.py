import pytest
import torch

from fedgrow_core.growth.expansion import (
    Expansion,
    balanced_choice,
    head_interleave_permutation,
    head_selection,
    selection_init,
)
from tests.dense_reference import dense_a, dense_b


def _random_expansion(batch=(), d1=5, d2=9, input_side="normalised"):
    g = torch.Generator().manual_seed(0)
    e = torch.randn(batch + (d2 - d1, d1), generator=g)
    perm = torch.randperm(d2, generator=g)
    split = 0.5 + torch.rand(batch + (d2 - d1,), generator=g)
    exp = Expansion(e, perm, input_side, split=split)
    return exp, e, perm, split


@pytest.mark.parametrize("batch", [(), (3,)])
@pytest.mark.parametrize("input_side", ["normalised", "tied"])
def test_grow_rows_and_cols_match_dense_products(batch, input_side):
    exp, e, perm, split = _random_expansion(batch, input_side=input_side)
    a, b = dense_a(e, perm), dense_b(e, perm, split, input_side)
    x = torch.randn(batch + (5, 7))
    torch.testing.assert_close(exp.grow_rows(x), a @ x)
    torch.testing.assert_close(exp.grow_rows(x, input_side=True), b @ x)
    torch.testing.assert_close(exp.dense(), a)
    z = torch.randn(batch + (6, 5))
    torch.testing.assert_close(exp.grow_cols(z), z @ a.transpose(-1, -2))
    torch.testing.assert_close(exp.grow_cols(z, input_side=True), z @ b.transpose(-1, -2))


def test_apply_grows_any_axis_of_stacked_tensor():
    exp, e, perm, _ = _random_expansion((2,))
    a = dense_a(e, perm)
    w = torch.randn(2, 3, 5, 4)  # layer, x, grown axis, y
    out = exp.apply(w, dim=1, input_side=False, stacked=True)
    expected = torch.einsum("lod,lxdy->lxoy", a, w)
    torch.testing.assert_close(out, expected)


@pytest.mark.parametrize("dim", [0, 1, 2])
def test_apply_matches_tensordot_on_every_axis_of_stacked_and_plain_tensors(dim):
    exp, e, perm, split = _random_expansion((2,))
    a, b = dense_a(e, perm), dense_b(e, perm, split)
    shape = [3, 4, 6]
    shape[dim] = 5
    w = torch.randn([2] + shape)
    for side, m in ((False, a), (True, b)):
        out = exp.apply(w, dim=dim, input_side=side, stacked=True)
        expected = torch.stack(
            [torch.movedim(torch.tensordot(m[i], w[i], dims=([1], [dim])), 0, dim) for i in range(2)]
        )
        torch.testing.assert_close(out, expected)
    plain, e1, perm1, split1 = _random_expansion(())
    out = plain.apply(w[0], dim=dim, input_side=True, stacked=False)
    expected = torch.movedim(torch.tensordot(dense_b(e1, perm1, split1), w[0], dims=([1], [dim])), 0, dim)
    torch.testing.assert_close(out, expected)


def test_head_permutation_keeps_each_source_head_inside_one_target_head():
    perm = head_interleave_permutation(2, 3, 4, 5)
    assert sorted(perm.tolist()) == list(range(20))
    grid = perm.view(4, 5)
    for h in range(2):
        assert grid[h, :3].tolist() == [h * 3 + t for t in range(3)]
    assert (grid[:, 3:] >= 6).all() and (grid[2:] >= 6).all()


def test_balanced_choice_uses_each_source_equally():
    g = torch.Generator().manual_seed(3)
    counts = torch.bincount(balanced_choice(10, 4, g), minlength=4)
    assert counts.max() - counts.min() <= 1 and counts.sum() == 10


def test_head_selection_copies_whole_heads_when_head_dim_is_kept():
    g = torch.Generator().manual_seed(4)
    sel, key_scale = head_selection(3, 4, 6, 4, g)
    assert torch.equal(key_scale, torch.ones(12))  # head_dim kept: keys copied as they are
    sel = sel.view(3, 4)
    src_heads = sel // 4
    # each new head copies all dims of one source head, in order
    assert (src_heads == src_heads[:, :1]).all()
    assert (sel % 4 == torch.arange(4)).all()
    assert sorted(src_heads[:, 0].tolist()) == [0, 1, 2]


def test_selection_init_is_one_hot_plus_bounded_noise():
    g = torch.Generator().manual_seed(5)
    sel = torch.tensor([2, 0, 1])
    e = selection_init(sel, 4, 0.03, g)
    base = torch.zeros(3, 4)
    base[torch.arange(3), sel] = 1
    noise = e - base
    assert (noise >= 0).all() and (noise < 0.03).all() and noise.abs().sum() > 0


def test_unknown_input_side_is_rejected():
    with pytest.raises(ValueError, match="input_side"):
        Expansion(torch.zeros(1, 2), torch.arange(3), "transpose")


@pytest.mark.parametrize("extra", [1, 2, 3, 5])
def test_extra_head_dims_below_twofold_cancel_in_the_logits_but_read_features(extra):
    """Head dim 8 -> 8 + extra (< 2x): key scales come in groups +1,-1 (+1,+1,-2 for an odd count), zero for one."""
    sel, key_scale = head_selection(2, 8, 2, 8 + extra, torch.Generator().manual_seed(0))
    per_head = key_scale.view(2, extra)
    assert torch.allclose(per_head.sum(-1), torch.zeros(2))  # q'.k' adds 0 to every logit
    if extra == 1:
        assert (key_scale == 0).all()  # nothing to cancel against
        return
    assert (key_scale != 0).all()
    # each group copies one source dimension: with q' = q_j, k' = c k_j the group adds sum(c) q_j k_j = 0
    q, k = torch.randn(2 * 8), torch.randn(2 * 8)
    q_new, k_new = q[sel], k[sel] * key_scale
    torch.testing.assert_close((q_new * k_new).view(2, extra).sum(-1), torch.zeros(2), atol=1e-6, rtol=0)
    groups = sorted(per_head[0].tolist())
    assert groups.count(1.0) >= extra // 2 and min(groups) in (-1.0, -2.0)


def test_a_negative_split_weight_cannot_divide_by_zero():
    """w = -1 on a feature's only copy would make 1 + sum w E^2 = 0; negative weights count as 0 in the scale."""
    e = torch.zeros(1, 3)
    e[0, 1] = 1.0
    exp = Expansion(e, torch.arange(4), split=torch.tensor([-1.0]))
    scale = exp.input_side_scale()
    assert torch.isfinite(scale).all() and (scale > 0).all() and (scale <= 1).all()
    assert torch.isfinite(exp.grow_cols(torch.randn(2, 3), input_side=True)).all()
