"""Independent dense re-computation of LiGO growth with plain matrix products.

Builds every expansion matrix explicitly from the operator's parameters
(``A = P [I ; E]``, ``B = diag(w) A diag(1 / diag(A^T diag(max(w, 0)) A))`` with the
split weights ``w``, LayerNorm weights ``norm_scale * A``) and grows each tensor
with ``torch.matmul`` / ``einsum``, without touching ``fedgrow_core.growth.expansion``.
"""

from __future__ import annotations

import torch

from fedgrow_core.growth.ligo import LAYER_PARAMS


def dense_a(e, perm):
    d1 = e.shape[-1]
    eye = torch.eye(d1, dtype=e.dtype).expand(e.shape[:-2] + (d1, d1))
    return torch.cat([eye, e], dim=-2)[..., perm, :]


def dense_b(e, perm, split, input_side="normalised"):
    a = dense_a(e, perm)
    if input_side == "tied":
        return a
    d1 = e.shape[-1]
    w = torch.cat([torch.ones(e.shape[:-2] + (d1,)), split], dim=-1)[..., perm]
    gram_diag = torch.einsum("...r,...rj,...rj->...j", w.clamp(min=0), a, a)  # diag(A^T diag(max(w, 0)) A)
    return w.unsqueeze(-1) * a / gram_diag.unsqueeze(-2)


def op_matrices(op):
    """Dense ``{space: (A, B, N)}`` for one LiGO (N: LayerNorm weights); per-layer spaces carry ``(L, d2, d1)``."""
    perms = {"res": op.perm_res, "ffn": op.perm_ffn, "q": op.perm_heads, "k": op.perm_heads, "v": op.perm_heads}
    out = {}
    for s, perm in perms.items():
        a = dense_a(op.width[s], perm)
        b = dense_b(op.width[s], perm, op.split_weight(s), op.input_side)
        out[s] = (a, b, a * (op.norm_scale if s == "res" else 1.0))
    return out


def compose(mg, ml):
    """Product matrices ``A_g A_l``, ``B_g B_l``, ``N_g N_l`` of two operators."""
    return {s: tuple(g @ loc for g, loc in zip(mg[s], ml[s], strict=True)) for s in mg}


def grow_dense(depth, mats, embed, layers, embed_spaces):
    def grow(w, spec, layer=None):
        for dim, axis in enumerate(spec):
            if axis is None:
                continue
            space, side = axis
            m = mats[space][{"out": 0, "in": 1, "norm": 2}[side]]
            if m.dim() == 3:
                m = m[layer]
            w = torch.movedim(torch.tensordot(m, w, dims=([1], [dim])), 0, dim)
        return w

    out_embed = {k: grow(v, embed_spaces[k]) for k, v in embed.items()}
    out_layers = {}
    for kind, stack in layers.items():
        mixed = torch.einsum("ij,j...->i...", depth[kind], stack)
        out_layers[kind] = torch.stack([grow(mixed[i], LAYER_PARAMS[kind], i) for i in range(mixed.shape[0])])
    return out_embed, out_layers
