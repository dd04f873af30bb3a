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
reference's tied choice ``B = A``, or, by default here, the diagonally
normalised ``B = A diag(A^T A)^{-1}``. With a one-hot selection ``E`` the latter
gives ``B^T A = I``: the grown layer sees a copied feature twice with half the
weight each, so width growth is exactly function preserving (Net2Net, Chen et al.
2016; bert2BERT's function-preserving init). It costs one column sum of ``E**2``.

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
) -> Tensor:
    """Source feature copied by each new attention feature ("sel" init, per head).

    New features inside a kept head ``h`` copy a dimension of head ``h``; new heads
    copy whole source heads (chosen by :func:`balanced_choice`). Query, key and
    value of one layer share this selection, so a new head at initialisation is an
    exact copy of a source head.

    Returns
    -------
    torch.Tensor
        Shape ``(d2 - d1,)``, int64, in the order of the new rows of
        :func:`head_interleave_permutation`.
    """
    new_heads = balanced_choice(tgt_heads - src_heads, src_heads, generator)
    new_dims = balanced_choice(tgt_head_dim - src_head_dim, src_head_dim, generator)
    sel = []
    for h in range(tgt_heads):
        src_h = h if h < src_heads else int(new_heads[h - src_heads])
        for t in range(tgt_head_dim):
            if h < src_heads and t < src_head_dim:
                continue
            src_t = t if t < src_head_dim else int(new_dims[t - src_head_dim])
            sel.append(src_h * src_head_dim + src_t)
    return torch.tensor(sel, dtype=torch.long)


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
    """One width expansion ``d1 -> d2`` in factored form, ``A = P [I ; E] diag(s)``.

    Parameters
    ----------
    e : torch.Tensor
        Learnable new rows, ``(d2 - d1, d1)`` or batched per target layer
        ``(L, d2 - d1, d1)``.
    perm : torch.Tensor
        ``(d2,)`` int64 row permutation (``grown = stacked[perm]``).
    input_side : {"normalised", "tied"}
        How :meth:`input_side_scale` builds the input-side matrix (module doc).
    """

    def __init__(self, e: Tensor, perm: Tensor, input_side: InputSide = "normalised"):
        if input_side not in INPUT_SIDES:
            raise ValueError(f"input_side must be one of {INPUT_SIDES}, got {input_side!r}")
        self.e = e
        self.perm = perm
        self.input_side = input_side
        self.d1 = e.shape[-1]
        self.d2 = e.shape[-2] + self.d1
        # the identity permutation (residual and FFN spaces) costs no copy
        self.permuted = not torch.equal(perm, torch.arange(perm.numel(), device=perm.device))

    def input_side_scale(self) -> Tensor:
        """Column scale ``s`` of the input-side matrix ``B = A diag(s)``.

        Returns
        -------
        torch.Tensor
            ``(d1,)`` or ``(L, d1)``: ``1 / (1 + sum_r E[r, j]^2)`` (the inverse
            diagonal of ``A^T A``) when normalised, ones when tied.
        """
        if self.input_side == "tied":
            return torch.ones(self.e.shape[:-2] + (self.d1,), dtype=self.e.dtype, device=self.e.device)
        return 1.0 / (1.0 + self.e.pow(2).sum(-2))

    def grow_rows(self, x: Tensor, input_side: bool = False) -> Tensor:
        """Compute ``A @ x`` (or ``B @ x``) without forming ``A``.

        Parameters
        ----------
        x : torch.Tensor
            ``(..., d1, n)``; batch dimensions broadcast against ``E``'s.
        input_side : bool
            Use ``B = A diag(s)`` instead of ``A``.

        Returns
        -------
        torch.Tensor
            ``(..., d2, n)``.
        """
        if input_side:
            x = x * self.input_side_scale().unsqueeze(-1)
        return self._append_new(x, torch.matmul(self.e.to(x.dtype), x), dim=-2)

    def grow_cols(self, x: Tensor, input_side: bool = False) -> Tensor:
        """Compute ``x @ A^T`` (or ``x @ B^T``): grow the last dimension.

        Parameters
        ----------
        x : torch.Tensor
            ``(..., m, d1)``; batch dimensions broadcast against ``E``'s.
        input_side : bool
            Use ``B = A diag(s)`` instead of ``A``.

        Returns
        -------
        torch.Tensor
            ``(..., m, d2)``.
        """
        if input_side:
            x = x * self.input_side_scale().unsqueeze(-2)
        return self._append_new(x, torch.matmul(x, self.e.to(x.dtype).transpose(-1, -2)), dim=-1)

    def _append_new(self, x: Tensor, new: Tensor, dim: int) -> Tensor:
        """``P [x ; new]`` along ``dim``; ``x`` takes ``new``'s batch dimensions.

        ``new`` comes from a matmul with ``E``, so it always carries the broadcast
        batch dimensions of both; only ``x`` can lack the per-layer one.
        """
        if new.dim() > x.dim():
            x = x.expand(new.shape[:-2] + x.shape[-2:])
        out = torch.cat([x, new], dim=dim)
        return out.index_select(dim, self.perm.to(x.device)) if self.permuted else out

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
