"""Robust aggregators Flower lacks: the geometric median (RFA) and centred clipping.

Both are Flower strategies in the style of ``flwr.serverapp.strategy.FedMedian``:
``FedAvg`` with ``aggregate_train`` replaced, so sampling, configuration and
metric aggregation are Flower's own. They aggregate the Global-LiGO tensors
(all of a reply's arrays, flattened together in float64) and return them in
the dtype that was sent.

* :class:`GeometricMedian`: RFA (Pillutla, Kakade and Harchaoui, "Robust
  Aggregation for Federated Learning", IEEE TSP 2022), the example-weighted
  geometric median of the replies by the smoothed Weiszfeld algorithm
  (their Algorithm 2). Breakdown point 1/2: a minority of replies moves it by
  at most a multiple of the honest replies' spread.
* :class:`CentredClipping`: Karimireddy, He and Jaggi, "Learning from History
  for Byzantine Robust Optimization", ICML 2021, Eq. (CC): the aggregate update
  ``v`` is the previous round's, moved by the unweighted mean of each reply's
  update minus ``v``, clipped to radius ``tau``. A reply moves ``v`` by at most
  ``tau / n``, whatever it sends and whatever weight it claims.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from logging import INFO, WARNING

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.common import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from fedgrow_core.growth.diagnostics import flatten, unflatten

from .bounded_influence import robust_median


def geometric_median(
    points: np.ndarray, weights: Sequence[float], smoothing: float = 1e-6, max_iter: int = 100, tol: float = 1e-7
) -> tuple[np.ndarray, int]:
    """The weighted geometric median of ``points`` by the smoothed Weiszfeld algorithm (RFA, Algorithm 2).

    Iterates ``z <- sum_i b_i x_i / sum_i b_i`` with
    ``b_i = a_i / max(smoothing, ||z - x_i||)``, started at the weighted mean
    (Pillutla et al., IEEE TSP 2022). It minimises RFA's smoothed objective,
    which equals ``sum_i a_i ||z - x_i||`` wherever every distance exceeds
    ``smoothing``; the stopping rule tracks that sum.

    Parameters
    ----------
    points : ndarray, shape (n, d)
        One flattened reply per row (float64).
    weights : sequence of float, length n
        Non-negative weights ``a_i`` (examples), not all zero.
    smoothing : float
        ``nu``: distances below it count as it, so a point on the median does not divide by zero.
    max_iter : int
        Weiszfeld iterations at most.
    tol : float
        Stop when the objective improves by less than ``tol`` times itself.

    Returns
    -------
    tuple of (ndarray of shape (d,), int)
        The median and the iterations run.

    Raises
    ------
    ValueError
        If ``points`` is not 2-D, the weights do not match it, or they are not finite, negative or all zero.
    """
    points = np.asarray(points, np.float64)
    alpha = np.asarray(weights, np.float64)
    if points.ndim != 2 or alpha.shape != (points.shape[0],):
        raise ValueError(f"geometric_median: points {points.shape} and weights {alpha.shape} do not match")
    if not np.isfinite(alpha).all() or (alpha < 0).any() or alpha.sum() <= 0:
        raise ValueError(f"geometric_median: weights {alpha.tolist()} must be finite, non-negative, not all zero")
    alpha = alpha / alpha.sum()
    median = alpha @ points

    scratch = np.empty(points.shape[1], np.float64)

    def distance(row: np.ndarray, z: np.ndarray) -> float:
        np.subtract(row, z, out=scratch)
        return math.sqrt(scratch @ scratch)  # what np.linalg.norm computes for a real vector, without a new one

    def objective(z: np.ndarray) -> tuple[float, np.ndarray]:
        # row by row into one scratch vector: no (n, d) temporary beside the points (whole models are large)
        dist = np.maximum(smoothing, np.array([distance(row, z) for row in points]))
        return float(alpha @ dist), dist

    value, dist = objective(median)
    for iteration in range(1, max_iter + 1):
        beta = alpha / dist
        median = (beta @ points) / beta.sum()
        new_value, dist = objective(median)
        if value - new_value <= tol * new_value:
            return median, iteration
        value = new_value
    return median, max_iter


def centred_clip(updates: np.ndarray, centre: np.ndarray, tau: float, iterations: int = 1) -> np.ndarray:
    """Centred clipping (Karimireddy et al., ICML 2021, Eq. CC): ``v <- v + mean_i clip(u_i - v, tau)``, repeated.

    Parameters
    ----------
    updates : ndarray, shape (n, d)
        One flattened update (reply minus the arrays sent) per row.
    centre : ndarray, shape (d,)
        The starting ``v`` (the previous round's aggregate update).
    tau : float
        Clipping radius (L2), ``> 0``.
    iterations : int
        Times the step is applied (the paper's ``l``; 1 with momentum).

    Returns
    -------
    ndarray, shape (d,)
        The aggregate update.

    Raises
    ------
    ValueError
        If ``tau`` is not positive and finite, ``iterations`` is below 1, or the shapes do not match.
    """
    if not (math.isfinite(tau) and tau > 0):
        raise ValueError(f"centred_clip: tau = {tau}: expected a positive finite radius")
    if iterations < 1:
        raise ValueError(f"centred_clip: iterations = {iterations}: expected an integer >= 1")
    updates = np.asarray(updates, np.float64)
    v = np.asarray(centre, np.float64).copy()
    if updates.ndim != 2 or v.shape != (updates.shape[1],):
        raise ValueError(f"centred_clip: updates {updates.shape} and centre {v.shape} do not match")
    for _ in range(iterations):
        diff = updates - v
        norms = np.linalg.norm(diff, axis=1)
        scale = np.minimum(1.0, tau / np.maximum(norms, 1e-300))
        v = v + (scale[:, None] * diff).mean(axis=0)
    return v


def _stacked(records: list[ArrayRecord], keys: list[str]) -> np.ndarray:
    """One float64 row per record (:func:`~fedgrow_core.growth.diagnostics.flatten`), written in place.

    Whole models are large: flattening each reply first would hold a second copy of every one.
    """
    size = sum(records[0][k].numpy().size for k in keys)
    out = np.empty((len(records), size), np.float64)
    for row, record in zip(out, records, strict=True):
        start = 0
        for k in keys:
            value = record[k].numpy()
            row[start : start + value.size] = value.ravel()
            start += value.size
    return out


def _as_record(vector: np.ndarray, like: dict[str, np.ndarray], keys: list[str]) -> ArrayRecord:
    """``vector`` (:func:`~fedgrow_core.growth.diagnostics.unflatten`) as an ``ArrayRecord`` of ``like``'s dtypes."""
    return ArrayRecord({k: Array(v.astype(like[k].dtype)) for k, v in unflatten(vector, like, keys).items()})


class GeometricMedian(FedAvg):
    """RFA: the example-weighted geometric median of the replies (Pillutla et al., IEEE TSP 2022, Algorithm 2).

    Parameters
    ----------
    smoothing : float (default: 1e-6)
        Weiszfeld's ``nu`` (:func:`geometric_median`).
    max_iter : int (default: 100)
        Weiszfeld iterations at most per round.
    **kwargs
        Those of ``flwr.serverapp.strategy.FedAvg``.
    """

    def __init__(self, *, smoothing: float = 1e-6, max_iter: int = 100, **kwargs) -> None:
        super().__init__(**kwargs)
        self.smoothing = smoothing
        self.max_iter = max_iter

    def summary(self) -> None:
        """Log the strategy's settings."""
        log(INFO, "\t├──> GeometricMedian (RFA) settings:")
        log(INFO, "\t│\t├── smoothing: %g", self.smoothing)
        log(INFO, "\t│\t└── max iterations: %d", self.max_iter)
        super().summary()

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """The geometric median of the replies' arrays; metrics aggregated as FedAvg does.

        Parameters
        ----------
        server_round : int
            The round (logged with the Weiszfeld iterations; the geometric median keeps no state).
        replies : iterable of Message
            Replies whose ``arrays`` share names and shapes, weighted by ``num-examples``.

        Returns
        -------
        tuple
            ``(ArrayRecord, MetricRecord)``, the arrays in the first reply's dtypes; ``(None, None)`` without
            valid replies.

        Raises
        ------
        ValueError
            If the weights are not finite and non-negative (:func:`geometric_median`).
        """
        valid, _ = self._check_and_log_replies(replies, is_train=True)
        if not valid:
            return None, None
        first = valid[0].content[self.arrayrecord_key]
        keys = list(first.keys())
        points = _stacked([m.content[self.arrayrecord_key] for m in valid], keys)
        weights = [float(m.content["metrics"][self.weighted_by_key]) for m in valid]
        median, iterations = geometric_median(points, weights, self.smoothing, self.max_iter)
        converged = iterations < self.max_iter
        log(
            INFO if converged else WARNING,
            "round %d: geometric median of %d replies in %d Weiszfeld iterations%s",
            server_round,
            len(valid),
            iterations,
            "" if converged else f" (max-iter {self.max_iter} reached before the tolerance)",
        )
        metrics = self.train_metrics_aggr_fn([m.content for m in valid], self.weighted_by_key)
        return _as_record(median, {k: first[k].numpy() for k in keys}, keys), metrics


class CentredClipping(FedAvg):
    """Centred clipping of the replies' updates around the previous aggregate (Karimireddy et al., ICML 2021).

    Each round: ``u_i = w_i - w`` (reply minus the arrays sent), then
    ``v <- v + (1/n) sum_i clip(u_i - v, tau)`` (:func:`centred_clip`), and the
    new arrays are ``w + v``. ``v`` starts at 0 and is kept between rounds (the
    paper's server momentum) in ``centred_clip_momentum``, per tensor, which the checkpoint
    saves, checks and restores on resume as it does FedAdam's moments. Replies are not weighted by
    their examples: a claimed weight changes nothing.

    Parameters
    ----------
    radius : float (default: 0.0)
        The paper's ``tau``: clipping radius (L2 over all tensors). ``0``: adaptive, the median (the
        smaller of two) of the round's ``||u_i - v||``, which with an honest
        majority is set by honest replies.
    iterations : int (default: 1)
        The paper's ``l``.
    **kwargs
        Those of ``flwr.serverapp.strategy.FedAvg``.
    """

    def __init__(self, *, radius: float = 0.0, iterations: int = 1, **kwargs) -> None:
        super().__init__(**kwargs)
        if not (math.isfinite(radius) and radius >= 0):
            raise ValueError(f"CentredClipping: radius = {radius}: expected 0 (adaptive) or a positive L2 radius")
        if iterations < 1:
            raise ValueError(f"CentredClipping: iterations = {iterations}: expected an integer >= 1")
        self.radius = radius
        self.iterations = iterations
        #: ``v``: the previous round's aggregate update, per tensor (float64); ``None`` before the first round.
        self.centred_clip_momentum: dict[str, np.ndarray] | None = None
        self.current_arrays: ArrayRecord | None = None

    def summary(self) -> None:
        """Log the strategy's settings."""
        log(INFO, "\t├──> CentredClipping settings:")
        log(INFO, "\t│\t├── radius (tau): %s", "adaptive (median distance)" if self.radius == 0 else f"{self.radius:g}")
        log(INFO, "\t│\t└── iterations: %d", self.iterations)
        super().summary()

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid):
        """Keep the arrays sent (updates are measured against them), then configure as FedAvg does."""
        self.current_arrays = arrays
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """``w + v`` after :func:`centred_clip`; metrics aggregated as FedAvg does.

        Parameters
        ----------
        server_round : int
            The round (unused: the centre is the strategy's own state).
        replies : iterable of Message
            Replies whose ``arrays`` have the names and shapes of the arrays sent.

        Returns
        -------
        tuple
            ``(ArrayRecord, MetricRecord)``, the arrays in the sent dtypes; ``(None, None)`` without valid replies.

        Raises
        ------
        ValueError
            With the adaptive radius and fewer than 3 replies (a round
            :class:`~server_app.trust.checked_round.ReplyChecks` then refuses, keeping the Global-LiGO).
        """
        valid, _ = self._check_and_log_replies(replies, is_train=True)
        if not valid or self.current_arrays is None:
            return None, None
        keys = list(self.current_arrays.keys())
        sent_arrays = {k: self.current_arrays[k].numpy() for k in keys}
        sent = flatten(sent_arrays, keys)
        updates = _stacked([m.content[self.arrayrecord_key] for m in valid], keys)
        updates -= sent
        momentum = self.centred_clip_momentum
        centre = np.zeros_like(sent)
        if momentum and set(momentum) == set(keys):
            centre = np.concatenate([np.asarray(momentum[k], np.float64).ravel() for k in keys])
        tau = self.radius or self._adaptive_radius(updates, centre)
        # tau is 0 only if the median reply equals the centre: the step below keeps v as it is
        v = centred_clip(updates, centre, tau, self.iterations) if tau > 0 else centre
        self.centred_clip_momentum = unflatten(v, sent_arrays, keys)
        metrics = self.train_metrics_aggr_fn([m.content for m in valid], self.weighted_by_key)
        return _as_record(sent + v, sent_arrays, keys), metrics

    @staticmethod
    def _adaptive_radius(updates: np.ndarray, centre: np.ndarray) -> float:
        """The median of the replies' distances to the centre; refused with fewer than three replies.

        With two replies the smaller distance would stand in for the median (:func:`robust_median`), and a
        hostile node that sends the centre itself would set it to 0, freezing ``v`` at its last value.
        """
        if updates.shape[0] < 3:
            raise ValueError(
                f"centred clipping's adaptive radius needs at least 3 replies, got {updates.shape[0]}; "
                "set centred-clip-tau for smaller federations"
            )
        return robust_median([float(np.linalg.norm(u - centre)) for u in updates])
