"""Bounded influence of one reply on the aggregate: weight caps and update-norm clipping.

Two bounds apply to every accepted training reply before the strategy sees it:

* **Weight cap.** A reply's ``num-examples`` (FedAvg's weight, McMahan et al.
  2017, Eq. 1) is capped at the training rows the node reported in preflight,
  and at ``cap-weight-median`` times the median of the round's preflight
  counts (:func:`weight_bound`), so a node can neither claim ``2**62`` rows in a
  round nor ``10**12`` in preflight to outweigh everyone.
* **Update-norm clipping.** The update ``u_k = w_k - w`` (reply minus the arrays
  sent) over all tensors together is scaled to L2 norm at most
  ``min(clip-update-norm, clip-update-median * median_k ||u_k||)``, as in
  norm-bounded robust aggregation (Sun et al. 2019, "Can you really backdoor
  federated learning?"). The median (:func:`robust_median`: the smaller of two)
  is over the round's accepted replies; with an honest majority, or one honest
  node of two, it is bounded by honest norms, so a hostile reply
  moves an example-weighted average by at most its weight share times the bound.

Both are pure functions of numpy arrays; :class:`server_app.orchestration.strategy.ReplyChecks`
applies them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

from fedgrow_core.growth.diagnostics import flatten


def flat_update(reply: Mapping[str, np.ndarray], base: np.ndarray, names: Sequence[str]) -> np.ndarray:
    """The update ``u = reply - sent`` over the tensors ``names``, as one float64 vector.

    Parameters
    ----------
    reply : mapping of str to ndarray
        Holds every tensor of ``names``, in the shapes that were sent.
    base : ndarray, shape (d,)
        ``flatten(sent, names)`` (float64, :func:`fedgrow_core.growth.diagnostics.flatten`): what was sent,
        flattened once for all of a round's replies.
    names : sequence of str
        The tensors, in ``base``'s order (``sorted(sent)``).

    Returns
    -------
    ndarray, shape (d,)
        A new float64 vector, ``flatten(reply, names) - base``.

    Raises
    ------
    KeyError
        If ``reply`` lacks a tensor of ``names``.
    ValueError
        If the flattened reply is not as long as ``base``.
    """
    update = flatten(reply, names)
    update -= base
    return update


def update_norm(reply: Mapping[str, np.ndarray], sent: Mapping[str, np.ndarray]) -> float:
    """L2 norm of ``reply - sent`` over all tensors, computed in float64 (finite for float32 inputs).

    Parameters
    ----------
    reply, sent : mapping of str to ndarray
        Same names and shapes.

    Returns
    -------
    float
        ``sqrt(sum_k ||reply[k] - sent[k]||^2)``: the norm of :func:`flat_update`.
    """
    names = sorted(sent)
    return float(np.linalg.norm(flat_update(reply, flatten(sent, names), names)))


def robust_median(values: Sequence[float]) -> float:
    """The median of ``values``, but the smaller of two: with an honest majority (or one of two) it is honest-bounded.

    For three or more values the median lies between honest values whenever a
    strict majority is honest. For two, the plain median is their mean, which
    either node could set at will, so the smaller one is used.

    Raises
    ------
    ValueError
        If ``values`` is empty.
    """
    if not values:
        raise ValueError("robust_median: no values")
    if len(values) == 2:
        return float(min(values))
    return float(np.median(np.asarray(values, np.float64)))


def clip_bound(norms: Sequence[float], fixed: float, median_multiple: float) -> float:
    """The round's clipping bound: ``min(fixed, median_multiple * robust_median(norms))``, ``inf`` where a term is off.

    A term is off when its parameter is 0.

    Raises
    ------
    ValueError
        If ``norms`` is empty while ``median_multiple`` is set.
    """
    bound = fixed if fixed > 0 else math.inf
    if median_multiple > 0:
        bound = min(bound, median_multiple * robust_median(norms))
    return bound


def weight_bound(preflight_rows: Sequence[int], median_multiple: float) -> float:
    """Cap on one reply's weight: ``median_multiple`` times :func:`robust_median` of the round's preflight row counts.

    Preflight counts are self-reported, so the per-node cap alone lets a node
    that claimed 10^12 rows outweigh everyone; this second cap bounds its share.
    ``inf`` when ``median_multiple`` is 0 or no count is known.
    """
    if median_multiple <= 0 or not preflight_rows:
        return math.inf
    return median_multiple * robust_median(preflight_rows)


def clipped(
    reply: Mapping[str, np.ndarray], sent: Mapping[str, np.ndarray], norm: float, bound: float
) -> dict[str, np.ndarray]:
    """``sent + min(1, bound / norm) * (reply - sent)``, in each tensor's dtype (``reply`` unchanged if within).

    Parameters
    ----------
    reply, sent : mapping of str to ndarray
        Same names and shapes; the result has them too.
    norm : float
        :func:`update_norm` of ``reply`` against ``sent`` (L2, all tensors together).
    bound : float
        The L2 bound (:func:`clip_bound`).

    Returns
    -------
    dict of str to ndarray
        The clipped reply, computed in float64 and cast back to each tensor's dtype.
    """
    if norm <= bound:
        return dict(reply)
    scale = bound / norm
    return {
        name: (np.asarray(sent[name], np.float64) + scale * (np.asarray(v, np.float64) - sent[name])).astype(v.dtype)
        for name, v in reply.items()
    }


def capped_weight(num_examples: int, cap: int | None) -> int:
    """``min(num_examples, cap)`` rows; ``cap`` ``None`` means no cap is known (no preflight).

    Parameters
    ----------
    num_examples : int
        The reply's claimed training rows (its FedAvg weight).
    cap : int or None
        The node's preflight training rows.

    Returns
    -------
    int
        The weight used, in rows.
    """
    return num_examples if cap is None else min(num_examples, cap)
