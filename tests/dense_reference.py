"""Independent dense re-computation of LiGO growth with plain matrix products.

Builds every expansion matrix explicitly from the operator's parameters
(``A = P [I ; E]``, ``B = A diag(1 / (1 + colsum(E^2)))``) and grows each tensor
with ``torch.matmul`` / ``einsum``, without touching ``fedgrow_core.expansion``.
"""

from __future__ import annotations

import torch

from fedgrow_core.ligo import LAYER_PARAMS


def dense_a(e, perm):
    d1 = e.shape[-1]
    eye = torch.eye(d1, dtype=e.dtype).expand(e.shape[:-2] + (d1, d1))
    return torch.cat([eye, e], dim=-2)[..., perm, :]


def dense_b(e, perm, input_side="normalised"):
    a = dense_a(e, perm)
    if input_side == "tied":
        return a
    s = 1.0 / (1.0 + (e**2).sum(-2))
    return a * s.unsqueeze(-2)


def op_matrices(op):
    """Dense ``{space: (A, B)}`` for one LiGO; per-layer spaces carry ``(L, d2, d1)``."""
    perms = {"res": op.perm_res, "ffn": op.perm_ffn, "q": op.perm_heads, "k": op.perm_heads, "v": op.perm_heads}
    return {s: (dense_a(op.width[s], perms[s]), dense_b(op.width[s], perms[s], op.input_side)) for s in perms}


def compose(mg, ml):
    """Product matrices ``A_g A_l``, ``B_g B_l`` of two operators."""
    return {s: (mg[s][0] @ ml[s][0], mg[s][1] @ ml[s][1]) for s in mg}


def grow_dense(depth, mats, embed, layers, embed_spaces):
    def grow(w, spec, layer=None):
        for dim, axis in enumerate(spec):
            if axis is None:
                continue
            space, side = axis
            m = mats[space][0 if side == "out" else 1]
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
