"""What an operator learns: which tensors get gradients, how far they move, how clients' updates agree.

These are the measurements behind docs/method.md ("Every operator tensor
learns", and the per-round diagnostics of "Modes"): gradient norms at
initialisation (:func:`gradient_norms`), the relative change of an operator
(:func:`relative_change`) and the mean pairwise cosine of the clients' updates
of one round (:func:`mean_pairwise_cosine`). The server logs the last two every
Global-LiGO round (``relative-change``, ``update-cosine``; TensorBoard
``global-ligo/relative-change``, ``global-ligo/update-cosine``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch import Tensor, nn


def gradient_norms(model: nn.Module, loss: Tensor, prefix: str = "") -> dict[str, float]:
    """L2 norm of the gradient of ``loss`` for every trainable, non-empty parameter under ``prefix``.

    Parameters
    ----------
    model : torch.nn.Module
        The model ``loss`` was computed with.
    loss : torch.Tensor
        A scalar.
    prefix : str
        Only parameters whose name starts with it (e.g. ``"operator."``).

    Returns
    -------
    dict of str to float
        ``name -> ||dloss/dparam||``; 0.0 for a parameter the loss does not reach.
    """
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad and p.numel() and n.startswith(prefix)]
    grads = torch.autograd.grad(loss, [p for _, p in named], allow_unused=True)
    return {n: 0.0 if g is None else float(g.norm()) for (n, _), g in zip(named, grads, strict=True)}


def flatten(tensors: Mapping[str, Tensor | np.ndarray], names: Sequence[str]) -> np.ndarray:
    """The tensors ``names``, in that order, as one float64 vector.

    Parameters
    ----------
    tensors : mapping of str to Tensor or ndarray
        Any shapes.
    names : sequence of str
        Which tensors, in order.

    Returns
    -------
    ndarray, shape (sum of the tensors' sizes,)
        Their values, raveled and concatenated, in float64.

    Raises
    ------
    KeyError
        If a name is not in ``tensors``.
    """
    return np.concatenate([np.asarray(tensors[k], dtype=np.float64).ravel() for k in names])


def unflatten(
    vector: np.ndarray, like: Mapping[str, Tensor | np.ndarray], names: Sequence[str]
) -> dict[str, np.ndarray]:
    """The inverse of :func:`flatten`: ``vector`` cut into tensors of ``like``'s shapes, in ``vector``'s dtype.

    Parameters
    ----------
    vector : ndarray, shape (sum of the shapes' sizes,)
        As :func:`flatten` returns it.
    like : mapping of str to Tensor or ndarray
        Gives each name's shape.
    names : sequence of str
        The order the tensors were flattened in.

    Returns
    -------
    dict of str to ndarray
        Views of ``vector``, one per name.

    Raises
    ------
    ValueError
        If ``vector``'s length is not the shapes' total size.
    """
    shapes = [tuple(like[k].shape) for k in names]
    sizes = [math.prod(shape) for shape in shapes]
    if vector.shape != (sum(sizes),):
        raise ValueError(
            f"unflatten: vector of shape {vector.shape}, expected ({sum(sizes)},) for {len(names)} tensors"
        )
    parts = np.split(vector, np.cumsum(sizes)[:-1])
    return {k: part.reshape(shape) for k, part, shape in zip(names, parts, shapes, strict=True)}


def relative_change(before: Mapping[str, Tensor | np.ndarray], after: Mapping[str, Tensor | np.ndarray]) -> float:
    """``||after - before|| / ||before||`` over all tensors of ``before`` (L2 of the concatenation).

    NaN when ``before`` is all zeros.

    Raises
    ------
    KeyError
        If ``after`` lacks a tensor of ``before``.
    """
    names = sorted(before)
    base = flatten(before, names)
    norm = float(np.linalg.norm(base))
    return float(np.linalg.norm(flatten(after, names) - base)) / norm if norm else math.nan


class PairwiseCosine:
    """The mean pairwise cosine of flattened updates, added one at a time (:func:`mean_pairwise_cosine`).

    Keeps one float64 vector, the sum of the unit updates, and counts: with
    ``u_i`` the unit updates and ``k`` the non-zero ones, the sum over pairs of
    ``u_i . u_j`` is ``(|sum_i u_i|^2 - k) / 2``, and there are ``n (n - 1) / 2``
    pairs. A zero update counts as cosine 0 with every other.

    Attributes
    ----------
    total : ndarray of shape (d,), float64, or None
        The sum of the unit updates added (``None`` before the first non-zero one).
    count : int
        Updates added.
    nonzero : int
        Non-zero updates added.
    """

    def __init__(self) -> None:
        self.total: np.ndarray | None = None
        self.count = 0
        self.nonzero = 0

    def add(self, flat: np.ndarray, norm: float | None = None) -> None:
        """Add one flattened update (shape ``(d,)``, the same ``d`` every time); ``norm``: its L2 norm, if known.

        Raises
        ------
        ValueError
            If ``flat`` is not 1-D or its length differs from the updates added before.
        """
        if flat.ndim != 1 or (self.total is not None and flat.shape != self.total.shape):
            expected = "(d,)" if self.total is None else str(self.total.shape)
            raise ValueError(f"PairwiseCosine.add: update of shape {flat.shape}, expected {expected}")
        self.count += 1
        norm = float(np.linalg.norm(flat)) if norm is None else norm
        if not norm:
            return
        self.nonzero += 1
        unit = np.divide(flat, norm, dtype=np.float64)
        self.total = unit if self.total is None else np.add(self.total, unit, out=self.total)

    def value(self) -> float:
        """The mean cosine over pairs of the updates added.

        Returns
        -------
        float
            In [-1, 1]; NaN with fewer than two updates added.
        """
        n = self.count
        if n < 2:
            return math.nan
        if self.total is None:
            return 0.0
        return float((self.total @ self.total - self.nonzero) / (n * (n - 1)))


def mean_pairwise_cosine(updates: Sequence[Mapping[str, Tensor | np.ndarray]]) -> float:
    """Mean cosine similarity over all pairs of the clients' updates (each flattened over its tensors).

    An update is ``client's new Global-LiGO - the one it received``. 1: every
    client moved the shared operator the same way; near 0: unrelated
    directions, which averaging mostly cancels.

    Computed in one pass (:class:`PairwiseCosine`), in time and memory linear
    in the number of updates: one flattened update in memory at a time.

    Returns
    -------
    float
        NaN with fewer than two updates; a zero update counts as cosine 0.
    """
    if len(updates) < 2:
        return math.nan
    names = sorted(updates[0])
    cosine = PairwiseCosine()
    for update in updates:
        cosine.add(flatten(update, names))
    return cosine.value()
