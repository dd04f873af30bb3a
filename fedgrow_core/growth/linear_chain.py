"""Grown linear layers evaluated in the cheapest order for the batch.

A grown linear weight of Dual-LiGO (Shen et al., arXiv 2406.13450, Sec. 4;
LiGO, Wang et al., ICLR 2023, Eq. 4) is a matrix chain::

    W_t = A_g A_l W B_l^T B_g^T              (target out x target in)

with ``W`` the depth-mixed source weight and ``A``/``B`` the output- and
input-side width expansions of the Local- (``l``) and Global-LiGO (``g``)
(:class:`~fedgrow_core.growth.expansion.Expansion`). Materialising ``W_t`` every step
costs a fixed number of multiply-adds whatever the batch; applying the factors
to the activations instead (row vectors ``x``),
``y = ((x B_g) B_l) W^T A_l^T A_g^T``, costs multiply-adds per token. Matrix
products are associative, so every split point gives the same ``y`` and the
same gradients (up to float rounding): :func:`plan_linear` chooses, per layer
kind and batch, how many factors of each side to absorb into the weight, by
counting multiply-adds of the forward pass (the backward pass costs about
twice the forward for every factor, so the same choice is cheapest there).
This is the matrix-chain ordering problem (Hu and Shing, 1982) restricted to
the two sides of ``W``.

With the ``[I ; E]`` form of ``A``, one expansion ``d1 -> d2`` applied to ``n``
vectors costs ``(d2 - d1) d1 n`` multiply-adds. When the source is at most half
as wide as the target, every factor applied to the activations is cheaper per
token than the part of the target's matmul it replaces, so the factored layer
costs less than the target layer at every batch; the default shapes are such a
case. A per-layer Global-LiGO matrix as large as the target's own layer (an FFN
growing by less than twofold) makes the plan absorb it, and then the step has a
fixed cost.

Mixed precision: the width factors are applied to the activations in float32
with autocast disabled, and only the matmul with ``W`` runs under the caller's
autocast (bf16 cannot hold ``1 + 1e-3``: an update of ``E`` that small would not
reach the loss). The layer's output takes the dtype of that matmul, as
``nn.Linear``'s would.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from fedgrow_core.growth.expansion import Expansion

#: The layer kinds of :data:`~fedgrow_core.growth.ligo.LAYER_PARAMS` that are linear layers
#: (a ``.weight`` of axes ``(out, in)`` and a ``.bias``).
LINEAR_KINDS = ("attn.q", "attn.k", "attn.v", "attn.o", "ffn.in", "ffn.out")
#: Layers that read one input through one input-side chain (query, key and value
#: read the attention block's input): its contraction is computed once per forward.
INPUT_READERS = {"attn.q": 3, "attn.k": 3, "attn.v": 3}


def expansion_cost(exp: Expansion, vectors: int) -> int:
    """Multiply-adds of applying ``exp`` (or its transpose) to vectors.

    Parameters
    ----------
    exp : Expansion
        A ``d1 -> d2`` expansion.
    vectors : int
        Vectors it is applied to.

    Returns
    -------
    int
        ``(d2 - d1) d1 vectors``.
    """
    return (exp.d2 - exp.d1) * exp.d1 * vectors


@dataclass(frozen=True)
class LinearPlan:
    """How many expansions of each side are absorbed into the weight.

    Attributes
    ----------
    out_absorbed, in_absorbed : int
        Factors of the output side (``A_l`` first) and of the input side
        (``B_l`` first) multiplied into ``W`` once per step; the rest are
        applied to the activations.
    fixed_macs, token_macs : int
        Forward multiply-adds per step and per token (one layer; a shared input
        contraction charged ``1 / readers``).
    """

    out_absorbed: int
    in_absorbed: int
    fixed_macs: int
    token_macs: float


def plan_linear(
    out_chain: list[Expansion],
    in_chain: list[Expansion],
    shape: tuple[int, int],
    tokens: int,
    readers: int = 1,
) -> LinearPlan:
    """The cheapest split of one grown linear layer's matrix chain for ``tokens`` tokens.

    Parameters
    ----------
    out_chain, in_chain : list of Expansion
        Output- and input-side expansions in growth order (local, then global).
    shape : tuple of int
        ``(out, in)`` of the source weight ``W``.
    tokens : int
        Vectors the layer is applied to in one forward (batch x sequence).
    readers : int
        Layers that share this layer's input contraction (:data:`INPUT_READERS`);
        its per-token cost is divided among them.

    Returns
    -------
    LinearPlan
        The split with the fewest forward multiply-adds
        ``fixed + tokens * per_token``; ties go to absorbing more (fewer kernels).
    """
    best = None
    for k_out, k_in in itertools.product(range(len(out_chain) + 1), range(len(in_chain) + 1)):
        rows, cols = shape
        fixed = 0
        for exp in out_chain[:k_out]:
            fixed += expansion_cost(exp, cols)
            rows = exp.d2
        for exp in in_chain[:k_in]:
            fixed += expansion_cost(exp, rows)
            cols = exp.d2
        per_token = rows * cols + sum(expansion_cost(e, 1) for e in out_chain[k_out:])
        per_token += sum(expansion_cost(e, 1) for e in in_chain[k_in:]) / readers
        key = (fixed + tokens * per_token, -(k_out + k_in))
        if best is None or key < best[0]:
            best = (key, LinearPlan(k_out, k_in, fixed, per_token))
    return best[1]


@dataclass
class LinearFactors:
    """One grown linear layer, partly materialised.

    ``y = A_rest((x B_rest) weight^T) + bias``: ``in_rest`` is contracted from
    the input in order (outermost expansion first), ``out_rest`` is applied to
    the output in order (innermost first).

    Attributes
    ----------
    weight : torch.Tensor
        ``(out', in')``: the source weight with the absorbed expansions applied.
    bias : torch.Tensor or None
        ``(out_target,)``, fully grown.
    in_rest, out_rest : list of Expansion
        Unbatched expansions still to apply to the activations.
    inputs : dict, optional
        Per-forward memo shared by the layers that read the same input through
        the same expansions (query, key and value): ``key -> (layer, x,
        x._version, grad mode, x B)``. It is used only for the very tensor
        ``x``, unchanged in place, in the same layer and grad mode.
    key : tuple, optional
        This layer's slot in ``inputs``: ``(space, absorbed input factors)``.
    layer : int
        Target layer index.
    """

    weight: Tensor
    bias: Tensor | None
    in_rest: list[Expansion]
    out_rest: list[Expansion]
    inputs: dict | None = None
    key: tuple | None = None
    layer: int = 0

    def _contract(self, x: Tensor) -> Tensor:
        """``x B_rest`` in float32, from the memo when the same input was contracted already."""
        if not self.in_rest:
            return x
        stamp = (self.layer, x, x._version, torch.is_grad_enabled())
        hit = self.inputs.get(self.key) if self.inputs is not None else None
        if hit is not None and hit[0] == stamp[0] and hit[1] is x and hit[2:4] == stamp[2:4]:
            return hit[4]
        out = x.float()
        for exp in self.in_rest:
            out = exp.contract_cols(out, input_side=True)
        if self.inputs is not None:
            self.inputs[self.key] = (*stamp, out)
        return out

    def __call__(self, x: Tensor) -> Tensor:
        """Apply the layer.

        Parameters
        ----------
        x : torch.Tensor
            ``(..., in_target)`` activations.

        Returns
        -------
        torch.Tensor
            ``(..., out_target)``, in the dtype of the matmul with ``weight``
            (bf16 under bf16 autocast, as ``nn.Linear``).
        """
        device = x.device.type
        with torch.autocast(device, enabled=False):
            x = self._contract(x)
        if not self.out_rest:
            return F.linear(x, self.weight, self.bias)
        y = F.linear(x, self.weight)
        with torch.autocast(device, enabled=False):
            grown = y.float()
            for exp in self.out_rest:
                grown = exp.grow_cols(grown)
            if self.bias is not None:
                grown = grown + self.bias
        return grown.to(y.dtype)


def grow_linear_stack(
    weight: Tensor,
    bias: Tensor | None,
    out_chain: list[Expansion],
    in_chain: list[Expansion],
    tokens: int | None,
    absorb: tuple[int, int] | None = None,
    inputs: dict | None = None,
    space: str = "",
    readers: int = 1,
) -> list[LinearFactors]:
    """Grow a stack of depth-mixed linear layers for one forward, split by :func:`plan_linear`.

    Parameters
    ----------
    weight : torch.Tensor
        ``(L, out, in)`` depth-mixed source weights of the target's ``L`` layers.
    bias : torch.Tensor or None
        ``(L, out_target)`` grown biases.
    out_chain, in_chain : list of Expansion
        Expansions of the two sides (local, then global; per-layer ``E`` batched
        ``(L, ...)`` or shared). Identity expansions (``d2 == d1``, no
        permutation) are dropped.
    tokens : int or None
        Tokens of the batch; ``None`` materialises every factor.
    absorb : tuple of int, optional
        ``(out, in)`` factors to absorb, overriding :func:`plan_linear` (for
        tests and benchmarks); counted after dropping identity expansions.
    inputs : dict, optional
        Per-forward memo of contracted inputs (:class:`LinearFactors`); layers
        of one forward whose input side is the same ``space`` with the same
        number of absorbed factors share slots.
    space : str
        Name of the input side's space, part of the memo key.
    readers : int
        Passed to :func:`plan_linear`.

    Returns
    -------
    list of LinearFactors
        One per target layer.

    Raises
    ------
    ValueError
        If ``absorb`` asks for more factors than a side has.
    """
    layers = weight.shape[0]
    out_chain = [e for e in out_chain if not e.is_identity]
    in_chain = [e for e in in_chain if not e.is_identity]
    if absorb is not None:
        k_out, k_in = absorb
        if not (0 <= k_out <= len(out_chain) and 0 <= k_in <= len(in_chain)):
            raise ValueError(
                f"absorb={absorb} but the sides have {len(out_chain)} and {len(in_chain)} non-identity factors"
            )
    elif tokens is None:
        k_out, k_in = len(out_chain), len(in_chain)
    else:
        plan = plan_linear(out_chain, in_chain, tuple(weight.shape[1:]), tokens, readers)
        k_out, k_in = plan.out_absorbed, plan.in_absorbed
    w = weight
    for exp in out_chain[:k_out]:
        w = exp.apply(w, 0, input_side=False, stacked=True)
    for exp in in_chain[:k_in]:
        w = exp.apply(w, 1, input_side=True, stacked=True)
    outs = [e.unbind(layers) for e in out_chain[k_out:]]
    ins = [e.unbind(layers) for e in reversed(in_chain[k_in:])]
    biases = bias.unbind(0) if bias is not None else [None] * layers
    return [
        LinearFactors(wi, bi, [e[i] for e in ins], [e[i] for e in outs], inputs, (space, k_in), i)
        for i, (wi, bi) in enumerate(zip(w.unbind(0), biases, strict=True))
    ]


class GrownLinear(nn.Module):
    """Stand-in for an ``nn.Linear`` of the target template, fed with :class:`LinearFactors`.

    It holds no parameters: :class:`~fedgrow_core.growth.grown_model.GrownModel` sets
    :attr:`factors` before each forward of the template and clears it after,
    so a template with these modules serves one forward at a time (not
    re-entrant, not shared across threads). A fused module (timm's ``qkv``)
    has one part per linear layer it computes; its output is theirs
    concatenated along the last axis, as the fused weight's rows are.

    Parameters
    ----------
    in_features, out_features : int
        Target sizes (``out_features`` of all parts together), for ``repr``.
    parts : int
        Linear layers this module computes (3 for a fused ``qkv``).
    """

    def __init__(self, in_features: int, out_features: int, parts: int = 1) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.factors: list[LinearFactors | None] = [None] * parts

    def forward(self, x: Tensor) -> Tensor:
        """``(..., in_features) -> (..., out_features)``.

        Raises
        ------
        RuntimeError
            When called without factors for every part (outside ``GrownModel.forward``).
        """
        if any(f is None for f in self.factors):
            raise RuntimeError("GrownLinear called outside GrownModel.forward (no factors set)")
        if len(self.factors) == 1:
            return self.factors[0](x)
        return torch.cat([f(x) for f in self.factors], dim=-1)

    def clear(self) -> None:
        """Drop the factors of the last forward (and the graph they hold)."""
        self.factors = [None] * len(self.factors)

    def extra_repr(self) -> str:
        """``in_features=..., out_features=...`` (and ``parts=`` when fused)."""
        parts = f", parts={len(self.factors)}" if len(self.factors) > 1 else ""
        return f"in_features={self.in_features}, out_features={self.out_features}{parts}"
