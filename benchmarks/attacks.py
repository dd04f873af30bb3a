"""Poisoning attacks on the Global-LiGO by one hostile node that sees every honest reply of the round.

:class:`HostileNode` is an :class:`benchmarks.in_process_grid.InProcessGrid`
``tamper`` hook. The hostile node trains honestly (its real ClientApp runs),
then replaces its reply in every Global-LiGO round with a well-formed one
(float32, the right tensors, shapes and metrics, inside every schema) that
carries an attack built from all honest updates of the round, its own
included. That is the omniscient attacker of the robust-aggregation papers,
the worst case for a defence.

Attacks (:data:`ATTACKS`), each an update ``a`` added to the arrays sent:

* ``sign-flip``: the node's own honest update reversed, at the norm ``B`` the
  server's clip would allow (:func:`clip_reach`). With honest updates
  near-orthogonal it looks like any other reply: its cosine with the others'
  is about 0;
* ``reverse-mean``: ``-B * mean(u) / ||mean(u)||``, the mean of every honest
  update (its own included) reversed, at norm ``B``;
* ``random``: a Gaussian direction at norm ``B``;
* ``little-is-enough``: ``mean(u) - z * std(u)`` per coordinate (Baruch,
  Baruch and Goldberg, "A Little Is Enough", NeurIPS 2019, with their
  ``z_max`` for ``n`` nodes and one Byzantine);
* ``lying-weight``: ``reverse-mean`` with ``num-examples = 2**39`` in every reply
  and ``10**12`` training rows claimed in preflight;
* ``absent`` (a reference, not an attack): every reply of the node is an
  error, so the server aggregates without it.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict
from flwr.common import Error
from scipy.stats import norm as gaussian

from fedgrow_core.growth.diagnostics import flatten, unflatten
from fedgrow_core.protocol import Phase
from server_app.trust.bounded_influence import clip_bound

#: Rows a lying node claims in preflight, and the weight it claims per round.
CLAIMED_ROWS = 10**12
CLAIMED_WEIGHT = 2**39


def clip_reach(other_norms: list[float], clip_median: float) -> float:
    """The largest update norm the server's median clip lets through when the other replies have these norms.

    The attacker's own norm counts in the median; a reply at least as large as
    every other one makes it the largest, so the bound is ``clip_median`` times
    the median of the others plus one ``inf`` (:func:`server_app.trust.bounded_influence.clip_bound`).

    Parameters
    ----------
    other_norms : list of float
        L2 norms of the round's other updates.
    clip_median : float
        The run's ``clip-update-median`` (0: off).

    Returns
    -------
    float
        The reach (L2 norm); ``inf`` if the clip is off.
    """
    return clip_bound([*other_norms, math.inf], 0.0, clip_median)


def alie_z(num_nodes: int, num_byzantine: int = 1) -> float:
    """Baruch et al.'s ``z_max`` (NeurIPS 2019, Sec. 3): ``s = floor(n/2 + 1) - f``; ``z = Phi^-1((n - s) / n)``.

    Parameters
    ----------
    num_nodes : int
        ``n``, the nodes of the round.
    num_byzantine : int
        ``f``, the hostile ones.

    Returns
    -------
    float
        The number of standard deviations the attack shifts each coordinate by.
    """
    s = math.floor(num_nodes / 2 + 1) - num_byzantine
    return float(gaussian.ppf((num_nodes - s) / num_nodes))


def _at_norm(direction: np.ndarray, norm: float) -> np.ndarray:
    length = float(np.linalg.norm(direction))
    return direction * (norm / length) if length > 0 else direction


def sign_flip(updates: np.ndarray, own: int, reach: float, rng: np.random.Generator) -> np.ndarray:
    """The node's own honest update (row ``own``) reversed, at norm ``reach``.

    Parameters
    ----------
    updates : ndarray, shape (n, d)
        The round's honest updates (reply minus the arrays sent, flattened, float64), the node's own included.
    own : int
        The row of the node's own update.
    reach : float
        The L2 norm the clip lets through (:func:`clip_reach`).
    rng : numpy.random.Generator
        Randomness (the ``random`` attack's).

    Returns
    -------
    ndarray, shape (d,)
        The hostile update.
    """
    return _at_norm(-updates[own], reach)


def reverse_mean(updates: np.ndarray, own: int, reach: float, rng: np.random.Generator) -> np.ndarray:
    """The mean honest update reversed, at norm ``reach``.

    Parameters
    ----------
    updates : ndarray, shape (n, d)
        The round's honest updates (reply minus the arrays sent, flattened, float64), the node's own included.
    own : int
        The row of the node's own update.
    reach : float
        The L2 norm the clip lets through (:func:`clip_reach`).
    rng : numpy.random.Generator
        Randomness (the ``random`` attack's).

    Returns
    -------
    ndarray, shape (d,)
        The hostile update.
    """
    return _at_norm(-updates.mean(axis=0), reach)


def random_direction(updates: np.ndarray, own: int, reach: float, rng: np.random.Generator) -> np.ndarray:
    """A Gaussian direction at norm ``reach``.

    Parameters
    ----------
    updates : ndarray, shape (n, d)
        The round's honest updates (reply minus the arrays sent, flattened, float64), the node's own included.
    own : int
        The row of the node's own update.
    reach : float
        The L2 norm the clip lets through (:func:`clip_reach`).
    rng : numpy.random.Generator
        Randomness (the ``random`` attack's).

    Returns
    -------
    ndarray, shape (d,)
        The hostile update.
    """
    return _at_norm(rng.standard_normal(updates.shape[1]), reach)


def little_is_enough(updates: np.ndarray, own: int, reach: float, rng: np.random.Generator) -> np.ndarray:
    """``mean - z_max * std`` per coordinate over the honest updates (Baruch et al. 2019); ``reach`` unused.

    Parameters
    ----------
    updates : ndarray, shape (n, d)
        The round's honest updates (reply minus the arrays sent, flattened, float64), the node's own included.
    own : int
        The row of the node's own update.
    reach : float
        The L2 norm the clip lets through (:func:`clip_reach`).
    rng : numpy.random.Generator
        Randomness (the ``random`` attack's).

    Returns
    -------
    ndarray, shape (d,)
        The hostile update.
    """
    return updates.mean(axis=0) - alie_z(updates.shape[0]) * updates.std(axis=0)


#: attack name -> update from (honest updates (n, d), the row of the node's own, clip reach, rng);
#: ``None``: the reference without the node.
ATTACKS: dict[str, Callable | None] = {
    "sign-flip": sign_flip,
    "reverse-mean": reverse_mean,
    "random": random_direction,
    "little-is-enough": little_is_enough,
    "lying-weight": reverse_mean,
    "absent": None,
}


class HostileNode:
    """An ``InProcessGrid`` tamper hook: node ``node_id`` replaces its Global-LiGO replies with ``attack``'s.

    Parameters
    ----------
    node_id : int
        The hostile node.
    attack : str
        A key of :data:`ATTACKS`; ``None`` (or ``"honest"``) tampers with nothing.
    clip_median : float
        The run's ``clip-update-median`` (what the attacker aims its norm at).
    seed : int
        Seed of the ``random`` attack's directions.
    """

    def __init__(self, node_id: int, attack: str | None, clip_median: float, seed: int = 0):
        if attack not in (None, "honest", *ATTACKS):
            raise ValueError(f"attack = {attack!r}: expected one of {['honest', *ATTACKS]}")
        self.node_id = node_id
        self.attack = None if attack == "honest" else attack
        self.clip_median = clip_median
        self.rng = np.random.default_rng(seed)

    def __call__(self, sent: list[Message], replies: list[Message]) -> list[Message]:
        """The round's replies with the hostile node's replaced."""
        if self.attack is None:
            return replies
        out = []
        for msg, reply in zip(sent, replies, strict=True):
            phase = str(msg.content["config"].get("phase", "")) if "config" in msg.content else ""
            if msg.metadata.dst_node_id != self.node_id or reply.has_error():
                out.append(reply)
            elif phase == Phase.GROW and self.attack == "absent":
                out.append(Message(Error(code=0, reason="absent"), reply_to=msg))
            elif phase == Phase.GROW:
                out.append(self._poisoned(msg, reply, replies))
            elif phase == Phase.PREFLIGHT and self.attack == "lying-weight":
                metrics = {**dict(reply.content["metrics"]), "train-examples": CLAIMED_ROWS}
                content = RecordDict({**dict(reply.content.items()), "metrics": MetricRecord(metrics)})
                out.append(Message(content, reply_to=msg))
            else:
                out.append(reply)
        return out

    def _poisoned(self, msg: Message, reply: Message, replies: list[Message]) -> Message:
        arrays = {k: v.numpy() for k, v in msg.content["arrays"].items()}
        keys = sorted(arrays)
        honest = [r for r in replies if not r.has_error() and "arrays" in r.content]
        sent = flatten(arrays, keys)
        updates = np.stack([flatten({k: r.content["arrays"][k].numpy() for k in keys}, keys) for r in honest]) - sent
        senders = [r.metadata.src_node_id for r in honest]
        others = [float(np.linalg.norm(u)) for node, u in zip(senders, updates, strict=True) if node != self.node_id]
        reach = clip_reach(others, self.clip_median)
        if not math.isfinite(reach):  # no clip: as large as the largest honest update times the usual multiple
            reach = 2.0 * max(others or [1.0])
        own = senders.index(self.node_id)
        attack = ATTACKS[self.attack](updates, own, reach, self.rng)
        metrics = dict(reply.content["metrics"])
        if self.attack == "lying-weight":
            metrics["num-examples"] = CLAIMED_WEIGHT
        poisoned = {
            k: Array((arrays[k].astype(np.float64) + part).astype(np.float32))
            for k, part in unflatten(attack, arrays, keys).items()
        }
        return Message(
            RecordDict(
                {**dict(reply.content.items()), "arrays": ArrayRecord(poisoned), "metrics": MetricRecord(metrics)}
            ),
            reply_to=msg,
        )
