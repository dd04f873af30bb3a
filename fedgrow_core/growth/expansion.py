"""Width expansion matrices of LiGO, kept in factored form.

A width expansion grows a space of size ``d1`` (the residual stream, the query,
key or value features of one layer, or the FFN hidden units) to ``d2``. Following
the reference parametrisation of LiGO (Wang et al. 2023, Eq. 4; bert2BERT for the
ties), the *output-side* matrix keeps the original block and learns only the new
rows::

    A = P [I ; E]                      shape (d2, d1)

with ``E`` of shape ``(d2 - d1, d1)`` learnable and ``P`` a fixed row permutation
(the identity except in attention spaces, where it interleaves the new features
so that every source head stays inside one target head).

The *input-side* matrix (applied to the columns of the next weight) is either the
reference's tied choice ``B = A``, or, by default here, the normalised, weighted

    B = diag(w) A diag(s),   s_j = 1 / sum_r max(w_r, 0) A_rj^2

with a per-row *split weight* ``w`` (1 on the original rows, seeded
values in ``[0.5, 1.5)`` on copies, 0 on LayerNorm-padding rows at
initialisation; a trainable part of the operator, :class:`~fedgrow_core.growth.ligo.LiGO`). With a one-hot
selection ``E`` this gives ``B^T A = I``: a feature copied ``m`` times is read
by the next layer with input-side weights that sum to one, so width growth keeps
the function (Net2Net, Chen et al. 2016). Unequal weights are LEMON's symmetry
breaking (Wang et al., "LEMON: Lossless model expansion", ICLR 2024, Sec. 4.1):
copies of one feature get different gradients and do not stay tied. Rows with
``w = 0`` are written but not read at initialisation (LEMON's "zero expansion"
of LayerNorm outputs; see :func:`residual_selection`); as in LEMON, whose zero
read weights are ordinary trainable weights, training ``w`` lets the next layers
start reading them.

LayerNorm weights grown by ``A`` are also multiplied by a fixed scalar
``norm_scale`` (LEMON's average expansion; :func:`residual_selection`).

Nothing here builds ``A`` densely during training: :meth:`Expansion.grow_rows`
and :meth:`Expansion.grow_cols` use the ``[I ; E]`` structure, so applying a
``d1 -> d2`` expansion to ``n`` columns costs ``2 (d2 - d1) d1 n`` FLOPs.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

InputSide = Literal["normalised", "tied"]
INPUT_SIDES = ("normalised", "tied")


def head_interleave_permutation(src_heads: int, src_head_dim: int, tgt_heads: int, tgt_head_dim: int) -> Tensor:
    """Row permutation that keeps every source head inside one target head.

    The stacked rows ``[original (d1) ; new (d2 - d1)]`` are reordered so that
    target head ``h < src_heads`` starts with the ``src_head_dim`` features of
    source head ``h`` followed by new features, and target heads
    ``h >= src_heads`` are made of new features only.

    Parameters
    ----------
    src_heads, src_head_dim, tgt_heads, tgt_head_dim : int
        Head counts and head widths (features) of the two shapes.

    Returns
    -------
    torch.Tensor
        ``perm`` of shape ``(tgt_heads * tgt_head_dim,)``, int64, such that
        ``grown = stacked[perm]``.
    """
    d1 = src_heads * src_head_dim
    perm = []
    new = d1
    for h in range(tgt_heads):
        for t in range(tgt_head_dim):
            if h < src_heads and t < src_head_dim:
                perm.append(h * src_head_dim + t)
            else:
                perm.append(new)
                new += 1
    return torch.tensor(perm, dtype=torch.long)


def balanced_choice(n: int, k: int, generator: torch.Generator) -> Tensor:
    """Draw ``n`` indices from ``range(k)`` using every index equally often.

    Successive random permutations of ``range(k)`` are concatenated, so each source
    feature is copied ``floor(n / k)`` or ``ceil(n / k)`` times. When the grown width
    is a multiple of the source width, the copied residual stream has exactly the
    source's mean and variance, which keeps LayerNorm function preserving.

    Returns
    -------
    torch.Tensor
        Shape ``(n,)``, int64.
    """
    if n == 0:
        return torch.zeros(0, dtype=torch.long)
    reps = -(-n // k)
    return torch.cat([torch.randperm(k, generator=generator) for _ in range(reps)])[:n]


def head_selection(
    src_heads: int,
    src_head_dim: int,
    tgt_heads: int,
    tgt_head_dim: int,
    generator: torch.Generator,
) -> tuple[Tensor, Tensor]:
    """Source feature copied by each new attention feature ("sel" init, per head), and the key scale.

    New features inside a kept head ``h`` copy a dimension of head ``h``; new heads
    copy whole source heads (chosen by :func:`balanced_choice`). Query, key and
    value of one layer share this selection, so a new head at initialisation is an
    exact copy of a source head.

    When the head dimension grows (``tgt_head_dim > src_head_dim``), the
    attention logits ``q.k / sqrt(head_dim)`` change scale. The extra key rows
    are therefore scaled by ``(sqrt(tgt_head_dim / src_head_dim) - 1) / m_j``,
    where ``m_j`` is how often source dimension ``j`` is copied into the extra
    dimensions, so that ``q'.k' / sqrt(tgt_head_dim) = q.k / sqrt(src_head_dim)``
    exactly. That needs every source dimension copied at least once
    (``tgt_head_dim >= 2 src_head_dim``); otherwise the logits shrink by
    ``sqrt(src_head_dim / tgt_head_dim)``
    (:func:`fedgrow_core.growth.preservation.width_gaps` reports it) and the
    extra dimensions copy source dimensions in groups of two (three when
    their count is odd) whose key rows are scaled ``+1, -1`` (``+1, +1, -2``):
    the group's terms of ``q'.k'`` cancel, so the logits are those of zero key
    rows, but the extra query and key rows read non-zero features and get
    gradients (zero key rows would leave the extra query rows without any).
    A single extra dimension keeps a zero key row.

    Returns
    -------
    tuple of torch.Tensor
        ``sel`` ``(d2 - d1,)`` int64, in the order of the new rows of
        :func:`head_interleave_permutation`, and ``key_scale`` ``(d2 - d1,)``
        float32, the value of the key row's one-hot entry.
    """
    new_heads = balanced_choice(tgt_heads - src_heads, src_heads, generator)
    n_extra = tgt_head_dim - src_head_dim
    new_dims = balanced_choice(n_extra, src_head_dim, generator)
    counts = torch.bincount(new_dims, minlength=src_head_dim)
    covered = tgt_head_dim > src_head_dim and bool((counts > 0).all())
    extra = (tgt_head_dim / src_head_dim) ** 0.5 - 1.0 if covered else 0.0
    if not covered and n_extra >= 2:
        # Fewer extra dimensions than source ones: copy source dimensions in groups of two (three for
        # an odd count), with key scales +1/-1 (+1/+1/-2) that cancel in q'.k'.
        groups = [2] * (n_extra // 2)
        groups[-1] += n_extra % 2
        new_dims = torch.cat([new_dims[i].repeat(g) for i, g in enumerate(groups)])
        cancelling = torch.cat([torch.tensor([1.0] * (g - 1) + [1.0 - g]) for g in groups])
    sel, scale = [], []
    for h in range(tgt_heads):
        src_h = h if h < src_heads else int(new_heads[h - src_heads])
        for t in range(tgt_head_dim):
            if h < src_heads and t < src_head_dim:
                continue
            if t < src_head_dim:
                sel.append(src_h * src_head_dim + t)
                scale.append(1.0)
            else:
                j = int(new_dims[t - src_head_dim])
                sel.append(src_h * src_head_dim + j)
                if covered:
                    scale.append(extra / int(counts[j]))
                else:
                    scale.append(float(cancelling[t - src_head_dim]) if n_extra >= 2 else 0.0)
    return torch.tensor(sel, dtype=torch.long), torch.tensor(scale, dtype=torch.float32)


def split_weights(n: int, generator: torch.Generator, layers: int | None = None) -> Tensor:
    """Seeded input-side split weights ``w`` of ``n`` new rows, uniform in ``[0.5, 1.5)``.

    Unequal weights break the symmetry of copies of one source feature (LEMON,
    Wang et al. 2024, Sec. 4.1); :class:`Expansion` normalises them per source
    feature so that the split still sums to one.

    Returns
    -------
    torch.Tensor
        ``(n,)``, or ``(layers, n)`` when ``layers`` is given; float32.
    """
    shape = (n,) if layers is None else (layers, n)
    return 0.5 + torch.rand(shape, generator=generator)


def residual_selection(d1: int, d2: int, generator: torch.Generator) -> tuple[Tensor, Tensor, float]:
    """LEMON's average expansion of the residual stream ``d1 -> d2``, for any ``d2 >= d1``.

    With ``d2 = k d1 + r`` (``0 <= r < d1``), the new rows are ``(k - 1) d1``
    copies that use every source feature equally often, then ``r`` *mean rows*
    ``(1/d1, ..., 1/d1)``. The grown stream ``x' = A x`` then has exactly the
    mean of ``x`` and the variance ``(k d1 / d2) var(x)``, so a LayerNorm over
    ``x'`` reproduces the source LayerNorm on the copied coordinates once its
    weight is multiplied by ``norm_scale = sqrt(k d1 / d2)`` (Wang et al. 2024,
    "LEMON", Sec. 4.1, average expansion). The mean rows get input-side weight
    0 at initialisation, so no layer reads them and their LayerNorm output is
    ignored (``w`` is trainable, so training can start reading them): for pre-LN
    transformers (timm ViT) width growth is exact at every width. For post-LN
    transformers (BERT) the LayerNorm output *is* the residual stream and the
    mean rows cannot stay means; see :func:`fedgrow_core.growth.preservation.width_gaps`.

    Returns
    -------
    tuple
        ``E`` ``(d2 - d1, d1)`` float32, split weights ``w`` ``(d2 - d1,)``
        (seeded copies, 0 for mean rows) and ``norm_scale`` (float, 1 when
        ``d2`` is a multiple of ``d1``).
    """
    k, r = divmod(d2, d1)
    copies = balanced_choice((k - 1) * d1, d1, generator)
    e = torch.cat([selection_init(copies, d1, 0.0, generator), torch.full((r, d1), 1.0 / d1)])
    w = torch.cat([split_weights(copies.numel(), generator), torch.zeros(r)])
    return e, w, (k * d1 / d2) ** 0.5


def selection_init(sel: Tensor, d1: int, noise: float, generator: torch.Generator) -> Tensor:
    """LiGO "sel" initialisation of ``E``: one-hot rows plus uniform noise.

    Parameters
    ----------
    sel : torch.Tensor
        ``(n,)`` source index of each new row.
    d1 : int
        Source width.
    noise : float
        Upper bound of the uniform noise ``U[0, noise)`` added to every entry
        (reference code: 0.03).
    generator : torch.Generator
        Source of the noise.

    Returns
    -------
    torch.Tensor
        ``E`` of shape ``(n, d1)``, float32.
    """
    e = torch.zeros(sel.numel(), d1)
    e[torch.arange(sel.numel()), sel] = 1.0
    if noise:
        e += noise * torch.rand(e.shape, generator=generator)
    return e


class Expansion:
    """One width expansion ``d1 -> d2`` in factored form, ``A = P [I ; E]``.

    Parameters
    ----------
    e : torch.Tensor
        Learnable new rows, ``(d2 - d1, d1)`` or batched per target layer
        ``(L, d2 - d1, d1)``.
    perm : torch.Tensor
        ``(d2,)`` int64 row permutation (``grown = stacked[perm]``).
    input_side : {"normalised", "tied"}
        How the input-side matrix ``B`` is built (module doc).
    split : torch.Tensor, optional
        Input-side weights ``w`` of the new rows, shape ``e.shape[:-1]``; ones
        when omitted. Ignored when ``input_side="tied"``.
    norm_scale : float
        Factor applied to LayerNorm weights after ``A`` (:func:`residual_selection`).
    permuted : bool, optional
        Whether ``perm`` is not the identity. Pass it to avoid a device-to-host
        comparison; computed from ``perm`` when omitted.
    """

    def __init__(
        self,
        e: Tensor,
        perm: Tensor,
        input_side: InputSide = "normalised",
        split: Tensor | None = None,
        norm_scale: float = 1.0,
        permuted: bool | None = None,
    ):
        if input_side not in INPUT_SIDES:
            raise ValueError(f"input_side must be one of {INPUT_SIDES}, got {input_side!r}")
        self.e = e
        self.perm = perm
        self.input_side = input_side
        self.split = split
        self.norm_scale = float(norm_scale)
        self.d1 = e.shape[-1]
        self.d2 = e.shape[-2] + self.d1
        if permuted is None:
            permuted = not torch.equal(perm.cpu(), torch.arange(perm.numel()))
        self.permuted = permuted

    def _split(self, x: Tensor) -> Tensor | None:
        if self.input_side == "tied" or self.split is None:
            return None
        return self.split.to(x.dtype)

    def input_side_scale(self) -> Tensor:
        """Column scale ``s`` of the input-side matrix ``B = diag(w) A diag(s)``.

        Returns
        -------
        torch.Tensor
            ``(d1,)`` or ``(L, d1)``: ``1 / (1 + sum_r max(w_r, 0) E[r, j]^2)``
            (the inverse diagonal of ``A^T diag(w) A`` for ``w >= 0``) when
            normalised, ones when tied. Negative split weights count as 0 here,
            so the scale stays in ``(0, 1]`` whatever ``w`` a party sends or
            training reaches (``w_r = -1`` on a single copy would divide by 0).
        """
        if self.input_side == "tied":
            return torch.ones(self.e.shape[:-2] + (self.d1,), dtype=self.e.dtype, device=self.e.device)
        sq = self.e.pow(2)
        if self.split is not None:
            sq = sq * self.split.to(sq.dtype).clamp(min=0).unsqueeze(-1)
        return 1.0 / (1.0 + sq.sum(-2))

    def grow_rows(self, x: Tensor, input_side: bool = False) -> Tensor:
        """Compute ``A @ x`` (or ``B @ x``) without forming ``A``.

        Parameters
        ----------
        x : torch.Tensor
            ``(..., d1, n)``; batch dimensions broadcast against ``E``'s.
        input_side : bool
            Use ``B = diag(w) A diag(s)`` instead of ``A``.

        Returns
        -------
        torch.Tensor
            ``(..., d2, n)``.
        """
        if input_side:
            x = x * self.input_side_scale().to(x.dtype).unsqueeze(-1)
        new = torch.matmul(self.e.to(x.dtype), x)
        w = self._split(x) if input_side else None
        if w is not None:
            new = new * w.unsqueeze(-1)
        return self._append_new(x, new, dim=-2)

    def grow_cols(self, x: Tensor, input_side: bool = False) -> Tensor:
        """Compute ``x @ A^T`` (or ``x @ B^T``): grow the last dimension.

        Parameters
        ----------
        x : torch.Tensor
            ``(..., m, d1)``; batch dimensions broadcast against ``E``'s.
        input_side : bool
            Use ``B = diag(w) A diag(s)`` instead of ``A``.

        Returns
        -------
        torch.Tensor
            ``(..., m, d2)``.
        """
        if input_side:
            x = x * self.input_side_scale().to(x.dtype).unsqueeze(-2)
        new = torch.matmul(x, self.e.to(x.dtype).transpose(-1, -2))
        w = self._split(x) if input_side else None
        if w is not None:
            new = new * w.unsqueeze(-2)
        return self._append_new(x, new, dim=-1)

    def contract_cols(self, x: Tensor, input_side: bool = False) -> Tensor:
        """Compute ``x @ A`` (or ``x @ B``): shrink the last dimension from ``d2`` to ``d1``.

        The transpose of :meth:`grow_cols`. It applies the input side of a grown
        weight to activations: ``x (W B^T)^T = (x B) W^T``, so a grown linear
        layer can run on the source weight (:mod:`fedgrow_core.growth.linear_chain`).

        Parameters
        ----------
        x : torch.Tensor
            ``(..., d2)``; ``E`` must not be batched per layer (see :meth:`unbind`).
        input_side : bool
            Use ``B = P [I ; diag(w) E] diag(s)`` instead of ``A = P [I ; E]``.

        Returns
        -------
        torch.Tensor
            ``(..., d1)``.

        Raises
        ------
        ValueError
            If ``E`` is batched per layer (``(L, d2 - d1, d1)``): it would
            broadcast against ``x``'s leading dimension.
        """
        if self.e.dim() != 2:
            raise ValueError(f"contract_cols needs one layer's E (d2 - d1, d1), got shape {tuple(self.e.shape)}")
        if self.permuted:
            x = x.index_select(-1, torch.argsort(self.perm))
        base, new = x[..., : self.d1], x[..., self.d1 :]
        w = self._split(x) if input_side else None
        if w is not None:
            new = new * w
        out = base + torch.matmul(new, self.e.to(x.dtype))
        if input_side:
            out = out * self.input_side_scale().to(x.dtype)
        return out

    def unbind(self, layers: int) -> list[Expansion]:
        """One :class:`Expansion` per target layer.

        Parameters
        ----------
        layers : int
            Number of target layers; a layer-shared ``E`` ``(d2 - d1, d1)`` is
            repeated, a batched ``E`` ``(layers, d2 - d1, d1)`` is unbound
            (one autograd node, no per-layer zero-filled gradient copies).

        Returns
        -------
        list of Expansion
            ``layers`` expansions with unbatched ``E``.

        Raises
        ------
        ValueError
            If a batched ``E`` does not have ``layers`` entries.
        """
        if self.e.dim() == 2:
            return [self] * layers
        if self.e.shape[0] != layers:
            raise ValueError(f"E is batched over {self.e.shape[0]} layers, expected {layers}")
        splits = self.split.unbind(0) if self.split is not None else [None] * layers
        return [
            Expansion(e, self.perm, self.input_side, split=w, norm_scale=self.norm_scale, permuted=self.permuted)
            for e, w in zip(self.e.unbind(0), splits, strict=True)
        ]

    @property
    def is_identity(self) -> bool:
        """``d2 == d1`` and no permutation: the expansion changes nothing."""
        return self.d2 == self.d1 and not self.permuted

    def _append_new(self, x: Tensor, new: Tensor, dim: int) -> Tensor:
        """``P [x ; new]`` along ``dim``; ``x`` takes ``new``'s batch dimensions.

        ``new`` comes from a matmul with ``E``, so it always carries the broadcast
        batch dimensions of both; only ``x`` can lack the per-layer one.
        """
        if new.dim() > x.dim():
            x = x.expand(new.shape[:-2] + x.shape[-2:])
        out = torch.cat([x, new], dim=dim)
        return out.index_select(dim, self.perm) if self.permuted else out

    def dense(self, input_side: bool = False) -> Tensor:
        """The matrix ``A`` (or ``B``) densely, ``(d2, d1)`` or ``(L, d2, d1)``.

        For tests and small spaces; training uses :meth:`grow_rows`.
        """
        eye = torch.eye(self.d1, dtype=self.e.dtype, device=self.e.device)
        return self.grow_rows(eye, input_side=input_side)

    def apply(self, w: Tensor, dim: int, input_side: bool, stacked: bool) -> Tensor:
        """Grow dimension ``dim`` of ``w`` from ``d1`` to ``d2``.

        Parameters
        ----------
        w : torch.Tensor
            A weight, or a stack of per-layer weights with the layer first.
        dim : int
            Dimension to grow, counted in the *unstacked* tensor.
        input_side : bool
            Apply ``B`` (input side of a weight) instead of ``A`` (output side,
            biases, norms, embeddings).
        stacked : bool
            ``w`` carries a leading layer dimension matching a batched ``E``.

        Returns
        -------
        torch.Tensor
            ``w`` with dimension ``dim`` of size ``d2``.
        """
        lead = 1 if stacked else 0
        d = dim + lead
        if d == w.dim() - 1 and w.dim() - lead >= 2:
            flat = w.reshape(w.shape[:lead] + (-1, self.d1))
            grown = self.grow_cols(flat, input_side=input_side)
            return grown.reshape(w.shape[:-1] + (self.d2,))
        moved = w.movedim(d, lead)
        rest = moved.shape[lead + 1 :]
        flat = moved.reshape(moved.shape[: lead + 1] + (-1,))
        grown = self.grow_rows(flat, input_side=input_side)
        return grown.reshape(grown.shape[: lead + 1] + rest).movedim(lead, d)
