"""The LiGO growth operator and its Dual-LiGO composition (Fed-Grow).

A LiGO operator (Wang et al., "Learning to Grow Pretrained Models for Efficient
Transformer Training", ICLR 2023, Eq. 3-6) maps the weights of a source
transformer of shape ``(L1, D1, F1, H1)`` to a target ``(L2, D2, F2, H2)``:

* **depth expansion**, in the small space: for every layer-parameter kind ``p``
  (query, key, value, output projection, both norms, FFN-in, FFN-out; weights and
  biases separately) a coefficient matrix ``c_p`` of shape ``(L2, L1)`` gives
  ``W_p[i] = sum_j c_p[i, j] W_p[j]``;
* **width expansion**: every axis of a parameter lives in a *space* that is
  grown by an :class:`~fedgrow_core.growth.expansion.Expansion`, on the output side by
  ``A`` and on the input side by ``B`` (``W' = A W B^T``). Spaces follow the
  bert2BERT ties of the reference code: ``res`` (residual stream: embeddings,
  norms, the input side of Q/K/V and FFN-in, the output side of O and FFN-out)
  is one matrix for the whole model; ``q``, ``k``, ``v`` (O's input side is
  tied to ``v``) and ``ffn`` (FFN-out's input side is tied to FFN-in's output
  side) have one matrix per target layer, or one shared by all layers when
  ``tie_layers=True``. LayerNorm weights (axis side ``"norm"``) are grown by
  ``A`` and multiplied by the space's ``norm_scale`` (LEMON's average expansion,
  :func:`~fedgrow_core.growth.expansion.residual_selection`).

What the initial operator preserves (tested; docs/method.md, "What growth preserves"):
width growth keeps the small model's function exactly for pre-LN models at every
hidden and FFN width the config accepts, and for post-LN models (BERT) when the
target width is a multiple of the source width; in both, a head dimension that is
kept or grows at least twofold is exact, a growth by a factor in (1, 2) is not
(:mod:`fedgrow_core.growth.preservation`). Depth growth keeps the function with
``depth_init="identity"`` for pre-LN models.

Fed-Grow (Shen et al., arXiv 2406.13450, Sec. 4) composes a private
Local-LiGO (client shape -> intermediate shape) with a shared Global-LiGO
(intermediate -> target shape). Both are linear in the weights, so
``Global o Local`` is one LiGO operator: depth coefficients ``c_g @ c_l`` and
width matrices ``A_g A_l`` (:class:`DualLiGO`). The Local-LiGO ties its
per-layer spaces across layers, which is what makes the composition exact (its
width matrices commute with the global depth mixing) and keeps the private
operator small.

Tensor names (the Global-LiGO's ``state_dict``, what travels in an
``ArrayRecord``) are stable: ``depth.<kind>`` with ``<kind>`` one of
:data:`LAYER_PARAMS` with dots replaced by underscores, shape ``(L2, L1)``; and
``width.<space>`` for ``space`` in ``res, q, k, v, ffn``, shape
``(d2 - d1, d1)`` (``res`` and tied spaces) or ``(L2, d2 - d1, d1)``; with a
low-rank operator (``LiGO(rank=r)``) ``width.<space>`` is the factor ``U``,
``(d2 - d1, r)`` or ``(L2, d2 - d1, r)``; and ``split.<space>``, the
input-side split weights ``w`` (:mod:`fedgrow_core.growth.expansion`) of
``space`` in ``res, v, ffn`` (:data:`READ_SPACES`), ``(d2 - d1,)`` or
``(L2, d2 - d1)`` (normalised input side only).
"""

from __future__ import annotations

from typing import Collection, Literal, Mapping

import torch
from torch import Tensor, nn

from fedgrow_core.growth.expansion import (
    INPUT_SIDES,
    Expansion,
    InputSide,
    balanced_choice,
    head_interleave_permutation,
    head_selection,
    residual_selection,
    selection_init,
    split_weights,
)
from fedgrow_core.growth.shapes import TransformerShape, validate_growth

DepthInit = Literal["stackbert", "interlace", "identity"]
DEPTH_INITS = ("stackbert", "interlace", "identity")

#: Axis spec: per tensor axis, ``(space, side)`` with side ``"out"`` (grown by A),
#: ``"in"`` (grown by B) or ``"norm"`` (a LayerNorm weight: A, then the space's
#: ``norm_scale``), or ``None`` for an axis that does not grow.
AxisSpec = tuple[tuple[str, str] | None, ...]

_RES_OUT = ("res", "out")
_RES_NORM = ("res", "norm")
#: The per-layer parameters every family adapter provides, stacked ``(L, ...)``,
#: with the spaces of their axes (``nn.Linear`` layout: ``(out, in)``).
LAYER_PARAMS: dict[str, AxisSpec] = {
    "attn.q.weight": (("q", "out"), ("res", "in")),
    "attn.q.bias": (("q", "out"),),
    "attn.k.weight": (("k", "out"), ("res", "in")),
    "attn.k.bias": (("k", "out"),),
    "attn.v.weight": (("v", "out"), ("res", "in")),
    "attn.v.bias": (("v", "out"),),
    "attn.o.weight": (_RES_OUT, ("v", "in")),
    "attn.o.bias": (_RES_OUT,),
    "attn_norm.weight": (_RES_NORM,),
    "attn_norm.bias": (_RES_OUT,),
    "ffn.in.weight": (("ffn", "out"), ("res", "in")),
    "ffn.in.bias": (("ffn", "out"),),
    "ffn.out.weight": (_RES_OUT, ("ffn", "in")),
    "ffn.out.bias": (_RES_OUT,),
    "ffn_norm.weight": (_RES_NORM,),
    "ffn_norm.bias": (_RES_OUT,),
}
#: The kinds that write into the residual stream: with ``depth_init="identity"``
#: a new layer gets zero coefficients for them, so its sublayers add nothing.
RESIDUAL_OUTPUT_KINDS = ("attn.o.weight", "attn.o.bias", "ffn.out.weight", "ffn.out.bias")
#: Spaces with one width matrix per target layer (unless tied across layers).
LAYER_SPACES = ("q", "k", "v", "ffn")
SPACES = ("res",) + LAYER_SPACES
#: Spaces some weight reads through its input side ``B``: only their split weights are ever used.
READ_SPACES = tuple(s for s in SPACES if any(a == (s, "in") for spec in LAYER_PARAMS.values() for a in spec))


def _kind_key(kind: str) -> str:
    return kind.replace(".", "_")


def width_seed(seed: int) -> int:
    """Seed of a LiGO's width draws (selections, split weights, low-rank projections), derived from ``seed``.

    An integer in ``[0, 2**63)``, distinct from ``seed`` itself, so that the width stream never replays the
    depth stream (:class:`LiGO` draws its depth noise from ``seed``).
    """
    return (seed * 1_000_003 + 7919) % 2**63


def depth_init_matrix(
    l1: int, l2: int, method: DepthInit, noise: float, generator: torch.Generator, *, zero_new: bool = False
) -> Tensor:
    """Initial depth coefficients ``(L2, L1)`` (LiGO reference code; identity option).

    ``stackbert``: target layer ``i`` copies source layer ``i mod L1`` (StackBERT,
    Gong et al. 2019); ``interlace``: copies ``floor(i * L1 / L2)`` (``i // 2``
    for doubling). Uniform noise ``U[0, noise)`` is added and every row is
    normalised to sum 1.

    ``identity``: as ``interlace``, the first target layer that copies source
    layer ``j`` *is* layer ``j`` and the following ones are new layers. With
    ``zero_new=True`` (the kinds of :data:`RESIDUAL_OUTPUT_KINDS`) the rows of
    new layers are zero, so a new pre-LN block adds nothing to the residual
    stream and starts as the identity (the zero-initialised residual branch of
    LEMON, Wang et al. 2024, Sec. 4.2; MSG, Yao et al. 2024, grows from zero
    masks to the same end). Noise is added to non-zero rows only.

    Raises
    ------
    ValueError
        For an unknown ``method``.
    """
    if method not in DEPTH_INITS:
        raise ValueError(f"depth_init must be one of {DEPTH_INITS}, got {method!r}")
    rows = torch.arange(l2)
    cols = rows % l1 if method == "stackbert" else rows * l1 // l2
    c = torch.zeros(l2, l1)
    c[rows, cols] = 1.0
    if noise:
        c += noise * torch.rand(c.shape, generator=generator)
    c = c / c.sum(dim=1, keepdim=True)
    if method == "identity" and zero_new:
        new = torch.zeros(l2, dtype=torch.bool)
        new[1:] = cols[1:] == cols[:-1]
        c[new] = 0.0
    return c


class GrowthOperator(nn.Module):
    """What :class:`LiGO` and :class:`DualLiGO` share: growing canonical weights from their factors.

    A subclass gives :meth:`depth_coefficients` (``kind -> (L_target, L_source)``)
    and :meth:`width_chains` (``space -> [Expansion]``, applied in order).
    """

    def depth_coefficients(self) -> dict[str, Tensor]:
        """Depth coefficients per layer-parameter kind, each ``(L_target, L_source)``."""
        raise NotImplementedError

    def width_chains(self) -> dict[str, list[Expansion]]:
        """``space -> [Expansion]``, the width factors applied in order (:func:`grow_tensor`)."""
        raise NotImplementedError

    def grow(
        self,
        embed: Mapping[str, Tensor],
        layers: Mapping[str, Tensor],
        embed_spaces: Mapping[str, AxisSpec],
        depth_only: Collection[str] = (),
    ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """Grow source weights straight to the target shape (:func:`apply_growth`).

        The small ``(L_t, L_s)`` depth products are formed first; each target
        layer's weights are then grown once, by the width factors in order
        (kinds in ``depth_only`` are left at the source widths). For a
        :class:`DualLiGO`, no intermediate-shape model is materialised.
        """
        return apply_growth(self.depth_coefficients(), self.width_chains(), embed, layers, embed_spaces, depth_only)


class LiGO(GrowthOperator):
    """A learnable LiGO operator growing ``source`` into ``target``.

    Parameters
    ----------
    source, target : TransformerShape
        Shapes before and after growth (checked by
        :func:`~fedgrow_core.growth.shapes.validate_growth` before any allocation).
    tie_layers : bool
        Share the ``q``, ``k``, ``v`` and ``ffn`` width matrices across target
        layers (always for the Local-LiGO; for the Global-LiGO with the run
        config's ``global-tie-layers``); saves ``(L2 - 1)/L2`` of those parameters.
    depth_init : {"stackbert", "interlace", "identity"}
        Depth initialisation (:func:`depth_init_matrix`); ``identity`` makes new
        layers start with zero residual-branch outputs.
    depth_noise : float
        Upper bound of the uniform noise ``U[0, depth_noise)`` added to the depth
        coefficients before row normalisation (reference code: 0.03).
    width_noise : float
        Upper bound of the uniform noise added to every entry of the width
        matrices ``E``. The reference code uses 0.03; we default to 0, which keeps
        width growth function preserving (module doc of
        :mod:`fedgrow_core.growth.expansion`); the copies are told apart by their
        unequal input-side split weights instead. Non-zero-mean noise on all ``d1`` columns
        adds ``~ width_noise / 2 * sum(x)`` to every new feature: on the real
        all-MiniLM-L6-v2 grown to 768 wide, 0.03 drops the cosine similarity of
        the final hidden states to the small model's from 1.0 to about -0.1
        (tests/test_real_minilm.py).
    input_side : {"normalised", "tied"}
        Input-side matrix ``B`` (see :mod:`fedgrow_core.growth.expansion`).
    seed : int
        Seed of the selection and noise draws, so that every party can build the
        same initial operator from the configuration alone.
    rank : int
        0 (default): every width matrix ``E`` is a parameter. ``r > 0``: each is
        ``E = S + U V^T`` with ``S`` the initial ``E`` above and ``V``
        ``(d1, r)`` drawn from ``N(0, 1/r)``, both frozen buffers rebuilt from
        ``seed`` (never sent), and only ``U`` ``(..., d2 - d1, r)``, zero at
        initialisation, a parameter under the name ``width.<space>`` (the split
        weights ``split.<space>`` stay full parameters). The
        initial operator is the same as with ``rank=0``. Because ``E`` is
        linear in ``U`` and every party has the same ``S`` and ``V``, FedAvg of
        ``U`` is exactly FedAvg of ``E`` (frozen-``A`` LoRA, FFA-LoRA: Sun et
        al., "Improving LoRA in Privacy-preserving Federated Learning", ICLR
        2024, Sec. 4).

    Raises
    ------
    ValueError
        For shapes that cannot grow, an unknown ``depth_init`` or
        ``input_side``, or a negative noise bound.
    """

    def __init__(
        self,
        source: TransformerShape,
        target: TransformerShape,
        *,
        tie_layers: bool = False,
        depth_init: DepthInit = "stackbert",
        depth_noise: float = 0.03,
        width_noise: float = 0.0,
        input_side: InputSide = "normalised",
        seed: int = 0,
        rank: int = 0,
    ) -> None:
        validate_growth(source, target)
        if not (isinstance(rank, int) and rank >= 0):
            raise ValueError(f"rank must be an integer >= 0, got {rank!r}")
        if depth_init not in DEPTH_INITS:
            raise ValueError(f"depth_init must be one of {DEPTH_INITS}, got {depth_init!r}")
        if input_side not in INPUT_SIDES:
            raise ValueError(f"input_side must be one of {INPUT_SIDES}, got {input_side!r}")
        for name, value in (("depth_noise", depth_noise), ("width_noise", width_noise)):
            if not value >= 0:
                raise ValueError(f"{name} must be >= 0, got {value!r}")
        super().__init__()
        self.source, self.target = source, target
        self.tie_layers, self.input_side, self.rank = tie_layers, input_side, rank
        gen = torch.Generator().manual_seed(seed)
        # Width draws come from their own stream, so that the width matrices depend on the seed and the
        # widths only, not on the depths: clients of one width that share a seed reach the same
        # coordinates of the grown space whatever their depths (the Local-LiGO convention, docs/method.md).
        wgen = torch.Generator().manual_seed(width_seed(seed))

        self.depth = nn.ParameterDict(
            {
                _kind_key(kind): nn.Parameter(
                    depth_init_matrix(
                        source.layers,
                        target.layers,
                        depth_init,
                        depth_noise,
                        gen,
                        zero_new=kind in RESIDUAL_OUTPUT_KINDS,
                    )
                )
                for kind in LAYER_PARAMS
            }
        )
        width_layers = 1 if tie_layers else target.layers
        head_perm = head_interleave_permutation(source.heads, source.head_dim, target.heads, target.head_dim)
        self.register_buffer("perm_heads", head_perm, persistent=False)
        self.register_buffer("perm_res", torch.arange(target.hidden), persistent=False)
        self.register_buffer("perm_ffn", torch.arange(target.ffn), persistent=False)
        # decided once here: no device-to-host comparison of permutations per forward
        self._permuted = {"res": False, "ffn": False, "heads": not torch.equal(head_perm, torch.arange(target.hidden))}

        e_res, split_res, self.norm_scale = residual_selection(source.hidden, target.hidden, wgen)
        if width_noise:
            e_res = e_res + width_noise * torch.rand(e_res.shape, generator=wgen)
        width, split = {"res": e_res}, {"res": split_res}
        heads, ffn, splits = [], [], []
        n_heads, n_ffn = target.hidden - source.hidden, target.ffn - source.ffn
        for _ in range(width_layers):
            sel, key_scale = head_selection(source.heads, source.head_dim, target.heads, target.head_dim, wgen)
            # q, k and v share the selection so a new head starts as a copy.
            q, k, v = (selection_init(sel, source.hidden, width_noise, wgen) for _ in "qkv")
            k = k * key_scale.unsqueeze(-1)
            heads.append([q, k, v])
            sel_ffn = balanced_choice(n_ffn, source.ffn, wgen)
            ffn.append(selection_init(sel_ffn, source.ffn, width_noise, wgen))
            splits.append([split_weights(n_heads, wgen) for _ in "qkv"] + [split_weights(n_ffn, wgen)])
        for i, space in enumerate(LAYER_SPACES):
            if space != "ffn":
                width[space] = torch.stack([h[i] for h in heads])
            split[space] = torch.stack([s[i] for s in splits])
        width["ffn"] = torch.stack(ffn)
        if tie_layers:
            width = {k: (v[0] if k in LAYER_SPACES else v) for k, v in width.items()}
            split = {k: (v[0] if k in LAYER_SPACES else v) for k, v in split.items()}
        # Read weights are trainable, as LEMON's zero read weights are; the tied input side reads
        # none, and the q and k spaces have no input side.
        trained = READ_SPACES if input_side == "normalised" else ()
        self.split = nn.ParameterDict({k: nn.Parameter(v) for k, v in split.items() if k in trained})
        for space, w in split.items():
            if space not in trained:
                self.register_buffer(f"split_{space}", w, persistent=False)
        if rank:  # drawn after every other initial value, so the initial operator does not depend on the rank
            for space in SPACES:
                e = width[space]
                self.register_buffer(f"base_{space}", e, persistent=False)
                v = torch.randn(e.shape[-1], rank, generator=wgen) / rank**0.5
                self.register_buffer(f"proj_{space}", v, persistent=False)
                width[space] = torch.zeros(e.shape[:-1] + (rank,))
        self.width = nn.ParameterDict({k: nn.Parameter(v) for k, v in width.items()})

    def width_matrix(self, space: str) -> Tensor:
        """``E`` of a space: ``(d2 - d1, d1)`` (``res`` and tied spaces) or ``(L2, d2 - d1, d1)``.

        The parameter itself when ``rank == 0``, else ``S + U V^T`` (class doc).
        """
        if not self.rank:
            return self.width[space]
        return getattr(self, f"base_{space}") + self.width[space] @ getattr(self, f"proj_{space}").T

    def split_weight(self, space: str) -> Tensor:
        """Input-side split weights ``w`` of a space: ``(d2 - d1,)`` or ``(L2, d2 - d1)``.

        The parameter ``split.<space>`` for the spaces of :data:`READ_SPACES`
        with the normalised input side; otherwise a fixed buffer that no weight reads.
        """
        if space in self.split:
            return self.split[space]
        return getattr(self, f"split_{space}")

    def _perm(self, space: str) -> Tensor:
        return {"res": self.perm_res, "ffn": self.perm_ffn}.get(space, self.perm_heads)

    def expansions(self) -> dict[str, Expansion]:
        """The width expansion of every space, as :class:`Expansion` views."""
        return {
            space: Expansion(
                self.width_matrix(space),
                self._perm(space),
                self.input_side,
                split=self.split_weight(space),
                norm_scale=self.norm_scale if space == "res" else 1.0,
                permuted=self._permuted.get(space, self._permuted["heads"]),
            )
            for space in SPACES
        }

    def depth_coefficients(self) -> dict[str, Tensor]:
        """Depth coefficients per layer-parameter kind, each ``(L2, L1)``."""
        return {kind: self.depth[_kind_key(kind)] for kind in LAYER_PARAMS}

    def width_chains(self) -> dict[str, list[Expansion]]:
        """``space -> [Expansion]``, the form :func:`grow_tensor` takes."""
        return {s: [e] for s, e in self.expansions().items()}


class DualLiGO(GrowthOperator):
    """Fed-Grow's Dual-LiGO: ``Global-LiGO o Local-LiGO`` as one operator.

    Parameters
    ----------
    local : LiGO
        Private operator, client shape -> intermediate shape; must have
        ``tie_layers=True``.
    global_ : LiGO
        Shared operator, intermediate shape -> target shape.

    Raises
    ------
    ValueError
        If ``local.target`` differs from ``global_.source``, if the two operators
        use different ``input_side`` choices, or if ``local`` is not layer-tied.
    """

    def __init__(self, local: LiGO, global_: LiGO) -> None:
        if local.target != global_.source:
            raise ValueError(
                f"Local-LiGO grows into {local.target} but the Global-LiGO starts "
                f"from {global_.source}: both must use the intermediate shape"
            )
        if not local.tie_layers:
            raise ValueError(
                "the Local-LiGO must share its q/k/v/ffn width matrices across layers "
                "(tie_layers=True) for Global o Local to be one LiGO operator"
            )
        if local.input_side != global_.input_side:
            raise ValueError(
                f"Local-LiGO input_side={local.input_side!r} differs from Global-LiGO input_side={global_.input_side!r}"
            )
        super().__init__()
        self.local = local
        self.global_ = global_
        self.source, self.target = local.source, global_.target

    @property
    def norm_scale(self) -> float:
        """LayerNorm weight factor of the composed residual expansion, ``local * global``."""
        return self.local.norm_scale * self.global_.norm_scale

    def depth_coefficients(self) -> dict[str, Tensor]:
        """Composed depth coefficients ``c_g @ c_l``, each ``(L_t, L_k)``."""
        cg, cl = self.global_.depth_coefficients(), self.local.depth_coefficients()
        return {kind: cg[kind] @ cl[kind] for kind in LAYER_PARAMS}

    def width_chains(self) -> dict[str, list[Expansion]]:
        """``space -> [local, global]`` expansions, the form :func:`grow_tensor` takes."""
        le, ge = self.local.expansions(), self.global_.expansions()
        return {s: [le[s], ge[s]] for s in SPACES}


def grow_tensor(w: Tensor, spec: AxisSpec, chains: Mapping[str, list[Expansion]], stacked: bool = False) -> Tensor:
    """Grow every axis of ``w`` named in ``spec`` through its space's chain of expansions.

    Parameters
    ----------
    w : torch.Tensor
        A source tensor, or a stack ``(L, ...)`` of per-layer tensors.
    spec : AxisSpec
        Space and side of every axis of the (unstacked) tensor.
    chains : mapping
        ``space -> [Expansion, ...]``, applied in order.
    stacked : bool
        ``w`` carries a leading layer dimension.

    Returns
    -------
    torch.Tensor
        ``w`` with every named axis at its target size.
    """
    # Grow the axis with the largest source size first, while the others are
    # still small: for an FFN weight this saves about a third of the FLOPs.
    lead = 1 if stacked else 0
    order = sorted((d for d, a in enumerate(spec) if a is not None), key=lambda d: -w.shape[d + lead])
    for dim in order:
        axis = spec[dim]
        space, side = axis
        for exp in chains[space]:
            w = exp.apply(w, dim, input_side=(side == "in"), stacked=stacked)
            if side == "norm" and exp.norm_scale != 1.0:
                w = w * exp.norm_scale
    return w


def apply_growth(
    depth: Mapping[str, Tensor],
    chains: Mapping[str, list[Expansion]],
    embed: Mapping[str, Tensor],
    layers: Mapping[str, Tensor],
    embed_spaces: Mapping[str, AxisSpec],
    depth_only: Collection[str] = (),
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Apply depth then width expansion to canonical weights.

    Parameters
    ----------
    depth : mapping
        ``kind -> (L2, L1)`` coefficients for every kind in :data:`LAYER_PARAMS`.
    chains : mapping
        ``space -> [Expansion, ...]`` applied in order (one for LiGO; local then
        global for Dual-LiGO).
    embed : mapping
        Non-layer source tensors (embeddings, final norms, pooler).
    layers : mapping
        Per-layer source tensors stacked ``(L1, ...)``, keys :data:`LAYER_PARAMS`.
    embed_spaces : mapping
        Axis spec of every ``embed`` tensor (from the family adapter).
    depth_only : collection of str
        Layer kinds returned depth-mixed but not width-grown (stacked
        ``(L2, ...)`` at the source widths), for
        :func:`~fedgrow_core.growth.linear_chain.grow_linear_stack`.

    Returns
    -------
    tuple of dict
        Grown ``embed`` and ``layers`` (stacked ``(L2, ...)``).

    Raises
    ------
    KeyError
        If a layer kind or embed tensor has no coefficient or axis spec.
    """
    grown_embed = {name: grow_tensor(t, embed_spaces[name], chains, stacked=False) for name, t in embed.items()}
    grown_layers = {}
    for kind, stack in layers.items():
        mixed = torch.einsum("ij,j...->i...", depth[kind].to(stack.dtype), stack)
        if kind not in depth_only:
            mixed = grow_tensor(mixed, LAYER_PARAMS[kind], chains, stacked=True)
        grown_layers[kind] = mixed
    return grown_embed, grown_layers
