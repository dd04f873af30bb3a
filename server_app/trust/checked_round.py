"""Fed-Grow's checked training round: a mixin that validates and bounds every reply before a Flower strategy sees it.

:class:`ReplyChecks` goes in front of any ``flwr.serverapp.strategy.Strategy``
(:func:`server_app.orchestration.strategy.checked`). It overrides the two hooks Flower's
``Strategy.start`` calls each round: ``configure_train`` (a bounded wait for
nodes, and what the round sent) and ``aggregate_train`` (per-phase reply schema,
weight caps, update-norm clipping, then the wrapped strategy's aggregate, refused
if it fails or is not finite).
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from logging import INFO, WARNING
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.common import log
from flwr.serverapp import Grid

from fedgrow_core.growth.diagnostics import PairwiseCosine, flatten, relative_change
from fedgrow_core.protocol import TRAIN_METRICS, MetricSpec
from fedgrow_core.update_encoding import decode_update, encoded_spec

from ..persistence.checkpoint import restore_state, snapshot_state, state_is_finite
from ..reporting.round_log import message_bytes, round_entry, round_summary
from .bounded_influence import capped_weight, clip_bound, clipped, flat_update, weight_bound
from .reply_checks import (
    ArraySpec,
    ReplySchema,
    array_spec,
    decode_arrays,
    reply_problem,
)


@dataclass
class SentRound:
    """What the server sent in one round: the reference its replies are checked, decoded and logged against.

    Attributes
    ----------
    arrays : dict of str to numpy.ndarray
        The tensors sent (float32); updates are decoded onto and clipped around them.
    nodes : list of int
        The node ids the round's instruction went to.
    bytes_per_node : dict of int to int
        Serialised bytes of the message each node was sent (:meth:`sent_bytes` counts them from
        ``messages``).
    offline_nodes : list of int
        Expected nodes (from preflight) that were not online when the round started.
    started : float
        ``time.perf_counter()`` when the round started (seconds).
    messages : list of flwr.app.Message
        The messages sent, kept until :meth:`sent_bytes` has counted their bytes: serialising a
        Global-LiGO message to count it costs time, spent once they are out, while the nodes train.
    """

    arrays: dict[str, np.ndarray]
    nodes: list[int]
    bytes_per_node: dict[int, int]
    offline_nodes: list[int] = field(default_factory=list)
    started: float = field(default_factory=time.perf_counter)
    messages: list[Message] = field(default_factory=list)

    def sent_bytes(self) -> dict[int, int]:
        """Node id -> serialised bytes of the message it was sent (``message_bytes``).

        Counted from :attr:`messages` on the first call, one serialisation per
        distinct content (Flower's strategies share one content among all nodes),
        into :attr:`bytes_per_node`; the messages are then let go.
        """
        if self.messages:
            sizes: dict[int, int] = {}
            for m in self.messages:
                if id(m.content) not in sizes:
                    sizes[id(m.content)] = message_bytes(m)
            self.bytes_per_node = {m.metadata.dst_node_id: sizes[id(m.content)] for m in self.messages}
            self.messages = []
        return self.bytes_per_node


@dataclass(frozen=True)
class RoundChecks:
    """The settings of :class:`ReplyChecks`, given whole at construction.

    Attributes
    ----------
    min_replies : int
        Usable replies a round needs to aggregate, and online nodes a round waits
        for (``min-train-nodes``).
    node_wait : float
        Seconds ``configure_train`` waits for ``min_replies`` online nodes.
    example_caps : mapping of int to int, optional
        Node id -> training rows from preflight; caps each reply's weight
        (``None``: no cap, no preflight).
    clip_norm, clip_median : float
        Fixed update-norm bound (0: off) and multiple of the round's median norm (0: off).
    cap_weight_median : float
        Cap on a weight as a multiple of the median of the round's preflight row counts (0: off).
    requires_all_replies : bool
        The wrapped strategy is a central-DP wrapper: every sampled reply must be usable.
    reply_metrics : mapping of str to MetricSpec
        The metrics a reply must carry (:data:`fedgrow_core.protocol.TRAIN_METRICS`; the collect phase's are fewer).
    update_encoding : str
        How replies carry the shared tensors (:data:`fedgrow_core.update_encoding.ENCODINGS`).
    log_diagnostics : bool
        Log each round's ``relative_change`` and ``update_cosine`` (Global-LiGO rounds; whole models would cost
        a float64 copy of every reply).
    round_offset : int
        Rounds done before a resume, added to the round Flower's ``Strategy.start`` counts from 1.
    expected_spec : dict, optional
        Names, shapes and dtypes every reply must carry, fixed for a round this strategy does not configure
        (the collection); ``None``: those of the arrays each round sends.
    """

    min_replies: int = 1
    node_wait: float = 600.0
    example_caps: Mapping[int, int] | None = None
    clip_norm: float = 0.0
    clip_median: float = 0.0
    cap_weight_median: float = 0.0
    requires_all_replies: bool = False
    reply_metrics: Mapping[str, MetricSpec] = field(default_factory=lambda: TRAIN_METRICS)
    update_encoding: str = "float32"
    log_diagnostics: bool = True
    round_offset: int = 0
    expected_spec: ArraySpec | None = None


class ReplyChecks:
    """Mixin for a Flower strategy: check, bound and then aggregate training replies.

    Per round, in ``aggregate_train`` (the hook Flower's ``Strategy.start``
    calls), before the wrapped strategy reads anything:

    1. every reply is checked against the round's schema, one by one as the
       grid hands it over (a :class:`~server_app.orchestration.prompt_grid.PromptGrid`
       yields each reply as it arrives, so the checks overlap the round)
       (:func:`server_app.trust.reply_checks.train_schema` of the arrays sent, in
       the run's ``update_encoding``: exact tensor names, shapes, dtypes,
       finite values; exact metric keys, types and ranges; no other record),
       then an encoded update is decoded against what was sent
       (:func:`fedgrow_core.update_encoding.decode_update`; non-finite values
       are a rejection). A failing reply is rejected with its node
       and reason, logged and counted; error replies (a client that raised)
       and missing ones (timed out, gone) are recorded too;
    2. each accepted reply's ``num-examples`` is capped at the node's preflight
       training rows (``example_caps``) and its update norm clipped
       (:mod:`server_app.trust.bounded_influence`, ``clip_norm`` and
       ``clip_median``); its metrics are reduced to the required keys, so
       Flower's reply-consistency check always holds;
    3. the wrapped strategy aggregates the bounded replies if at least
       ``min_train_nodes`` remain (inside central DP: only if every sampled
       node's reply is usable, Flower's own rule). Should it raise, or return
       a non-finite aggregate, the round is refused: the strategy's state is
       restored and the arrays stay as they were.

    Every setting comes whole at construction, as ``checks``
    (:class:`RoundChecks`); every other argument goes to the wrapped strategy.

    Waiting for nodes is bounded: ``configure_train`` waits at most
    ``checks.node_wait`` seconds for ``checks.min_replies`` online nodes, then samples
    from those online (expected nodes that are not are logged as
    ``offline_nodes``). ``sent_round`` (:class:`SentRound`) is what the current
    round sent, set by ``configure_train`` or, for a round this strategy did not
    configure, by :meth:`record_round`; ``round_log`` keeps one
    :func:`server_app.reporting.round_log.round_entry` per round. Its
    ``seconds`` run from the round's start to the last reply checked (to the
    round's timeout when a reply is missing), the sent messages' byte counts
    included (counted while the nodes train); ``aggregate_seconds`` are what
    follows: the replies' byte counts, bounding, the wrapped strategy's
    aggregate and the diagnostics.

    ``checks.round_offset`` (rounds done before a resume) is added to the round number
    Flower's ``Strategy.start`` counts from 1, so the wrapped strategy (FedAdam's
    bias correction, the clients' ``server-round``) sees the run's real round.
    """

    def __init__(self, *args: Any, checks: RoundChecks | None = None, **kwargs: Any) -> None:
        """Take the checks' settings (``checks``), pass every other argument to the wrapped strategy."""
        self.checks = checks if checks is not None else RoundChecks()
        #: The names, shapes and dtypes replies must carry: fixed by ``checks`` or set by each round's arrays.
        self.expected_spec: ArraySpec | None = self.checks.expected_spec
        #: What the current round sent (``None`` before the first round).
        self.sent_round: SentRound | None = None
        super().__init__(*args, **kwargs)

    @property
    def round_log(self) -> list[dict]:
        """One log entry per round this strategy checked (:func:`~server_app.reporting.round_log.round_entry`)."""
        return self.__dict__.setdefault("_round_log", [])

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid):
        """Remember the sent arrays, wait (bounded) for enough nodes, then delegate."""
        server_round += self.checks.round_offset
        self.expected_spec = array_spec(arrays)
        sent = {k: v.numpy() for k, v in arrays.items()}
        started = time.perf_counter()
        online = wait_for_nodes(grid, self.checks.min_replies, self.checks.node_wait)
        offline = sorted(set(self.checks.example_caps or ()) - set(online))
        self.sent_round = SentRound(sent, [], {}, offline, started)
        if len(online) < self.checks.min_replies:
            log(
                WARNING,
                "round %d: %d nodes online < min-train-nodes = %d after %.0f s; nothing sent",
                server_round,
                len(online),
                self.checks.min_replies,
                self.checks.node_wait,
            )
            return []
        messages = list(super().configure_train(server_round, arrays, config, grid))
        self.sent_round.nodes = [m.metadata.dst_node_id for m in messages]
        self.sent_round.messages = messages  # their sizes are counted once they are out (aggregate_train)
        return messages

    def record_round(
        self, server_round: int, sent_arrays: ArrayRecord, sent_nodes: list[int], sent_bytes: int = 0
    ) -> None:
        """Set :attr:`sent_round` as ``configure_train`` does, for a round this strategy did not configure.

        Used for the collection before federated training of whole models.
        ``sent_bytes``: the serialised size of the instruction each node was sent.
        """
        self.expected_spec = self.expected_spec or array_spec(sent_arrays)
        arrays = {k: v.numpy() for k, v in sent_arrays.items()}
        self.sent_round = SentRound(arrays, list(sent_nodes), dict.fromkeys(sent_nodes, sent_bytes))

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        """Reject malformed replies, bound the rest, aggregate them with the wrapped strategy."""
        server_round += self.checks.round_offset
        sent_round = self.sent_round or SentRound({}, [], {})
        sent_bytes = sent_round.sent_bytes()  # the messages are out: counted while the nodes train
        schema = ReplySchema(
            self.checks.reply_metrics, encoded_spec(self.expected_spec or {}, self.checks.update_encoding)
        )
        arrived, accepted, rejected, values = [], [], [], []
        for msg in replies:  # as they arrive from a PromptGrid: each is checked while the other nodes compute
            arrived.append(msg)
            problem, value = (None, None) if msg.has_error() else self._problem(msg, schema)
            if problem is None:
                accepted.append(msg)
                if value is not None:
                    values.append(value)
            else:
                rejected.append({"node_id": msg.metadata.src_node_id, "reason": problem})
                log(
                    WARNING,
                    "round %d: rejected reply from node %d: %s",
                    server_round,
                    msg.metadata.src_node_id,
                    problem,
                )
        ok = [m for m in accepted if not m.has_error()]
        checked = time.perf_counter()
        seconds = checked - sent_round.started
        entry = round_entry(server_round, arrived, accepted, rejected, seconds, sent_round.nodes)
        entry["download_bytes"] = {str(n): b for n, b in sent_bytes.items()}
        entry["offline_nodes"] = list(sent_round.offline_nodes)
        entry["clipped"], cosine = self._bound(ok, values, schema)
        entry["update_cosine"] = cosine
        arrays, metrics = None, None
        needed = self.checks.min_replies
        # inside central DP the noise is calibrated for num_sampled_clients: every one of them must reply usably
        sent = max(len(sent_round.nodes), getattr(self, "num_sampled_clients", 0))
        if self.checks.requires_all_replies and len(ok) < sent:
            log(
                WARNING,
                "round %d: central DP needs every sampled reply (%d of %d usable): round skipped, arrays unchanged",
                server_round,
                len(ok),
                sent,
            )
        elif len(ok) >= needed:
            arrays, metrics = self._aggregate(server_round, ok)
        else:
            log(
                WARNING,
                "round %d: %d usable replies < min_train_nodes = %d: round skipped, arrays unchanged",
                server_round,
                len(ok),
                needed,
            )
        entry["aggregated"] = arrays is not None
        change = None
        if self.checks.log_diagnostics and arrays is not None and sent_round.arrays:
            change = relative_change(sent_round.arrays, {k: v.numpy() for k, v in arrays.items()})
        entry["relative_change"] = change if change is not None and math.isfinite(change) else None
        entry["aggregate_seconds"] = time.perf_counter() - checked
        self.round_log.append(entry)
        if metrics is None:
            metrics = MetricRecord()
        metrics["rejected-replies"] = len(rejected)
        metrics["failed-replies"] = entry["failed"]
        metrics["missing-replies"] = len(entry["missing_nodes"])
        log(INFO, "round %d: %s", server_round, round_summary(entry))
        return arrays, metrics

    def _problem(self, msg: Message, schema: ReplySchema) -> tuple[str | None, dict | None]:
        """``(reason, None)`` for a reply to reject, else ``(None, its decoded float32 tensors)``."""
        problem = reply_problem(msg.content, schema)
        if problem is None and self.checks.example_caps is not None:
            cap = self.checks.example_caps.get(msg.metadata.src_node_id)
            if cap is None:
                problem = "node did not take part in preflight"
            elif cap < 1:
                problem = f"node reported {cap} training rows in preflight; its reply cannot carry weight"
        if problem is not None:
            return problem, None
        # every tensor was decoded and checked by the schema; decode from those values, so nothing
        # downstream reads a sender's own shape or dtype metadata
        arrays = decode_arrays(msg.content["arrays"], schema.arrays or {})[0] or {}
        sent = self.sent_round.arrays if self.sent_round is not None else None
        if self.checks.update_encoding == "float32" or not arrays:
            return None, arrays
        if sent is None:
            return "an encoded update, but no arrays were sent this round", None
        values, problem = decode_update(arrays, sent, self.checks.update_encoding)
        return problem, values

    def _bound(self, ok: list[Message], values: list[dict], schema: ReplySchema) -> tuple[list[dict], float | None]:
        """Cap weights, clip update norms and keep only the averaged metrics, in place.

        ``values`` are the decoded float32 tensors of ``ok``, in order; they replace each reply's arrays.
        Each update (reply minus the arrays sent) is flattened once, in float64, for its norm and, with
        diagnostics, the round's mean pairwise cosine (:class:`~fedgrow_core.growth.diagnostics.PairwiseCosine`;
        clipping scales an update, so the cosine of the bounded updates is that of the replies).

        Returns
        -------
        tuple of (list of dict, float or None)
            The clipped replies (node, norm, bound), and the mean pairwise update
            cosine (``None`` without diagnostics, or with fewer than two replies).
        """
        sent = self.sent_round.arrays if self.sent_round is not None else None
        cosine = PairwiseCosine() if self.checks.log_diagnostics and sent and len(ok) >= 2 else None
        if sent is None or not ok:
            norms, bound = [0.0] * len(ok), math.inf
        else:
            names = sorted(sent)
            base = flatten(sent, names)
            norms = []
            for value in values:
                update = flat_update(value, base, names)
                norms.append(float(np.linalg.norm(update)))  # update_norm, from the vector the cosine reads too
                if cosine is not None:
                    cosine.add(update, norms[-1])
            bound = clip_bound(norms, self.checks.clip_norm, self.checks.clip_median)
        preflight = (
            [self.checks.example_caps.get(m.metadata.src_node_id) for m in ok] if self.checks.example_caps else []
        )
        weight_cap = weight_bound([c for c in preflight if c is not None], self.checks.cap_weight_median)
        clipped_nodes = []
        for msg, value, norm in zip(ok, values, norms, strict=True):
            node = msg.metadata.src_node_id
            if norm > bound:
                value = clipped(value, sent, norm, bound)
                clipped_nodes.append({"node_id": node, "norm": norm, "bound": bound})
                log(INFO, "update of node %d clipped: norm %.4g -> %.4g", node, norm, bound)
            msg.content["arrays"] = ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in value.items()})
            weight = int(msg.content["metrics"]["num-examples"])
            cap = None if self.checks.example_caps is None else self.checks.example_caps.get(node)
            # only what a weighted mean means something for; each client's own metrics are in the round log
            required = {k: msg.content["metrics"][k] for k, s in schema.metrics.items() if s.required and s.averaged}
            required["num-examples"] = max(1, min(capped_weight(weight, cap), weight_cap))
            msg.content["metrics"] = MetricRecord(required)
        return clipped_nodes, (cosine.value() if cosine is not None else None)

    def _aggregate(self, server_round: int, ok: list[Message]):
        """The wrapped strategy's aggregate; ``(None, None)``, state restored, if it fails or is not finite."""
        saved = snapshot_state(self)
        try:
            arrays, metrics = super().aggregate_train(server_round, ok)
        except Exception as err:  # noqa: BLE001 - a strategy's failure on untrusted input must not end the run
            restore_state(self, saved)
            log(WARNING, "round %d: the strategy failed to aggregate (%s): round refused", server_round, err)
            return None, None
        arrays = _as_sent(arrays, self.expected_spec or {})
        finite = arrays is None or all(np.isfinite(a.numpy()).all() for a in arrays.values())
        if not (finite and state_is_finite(self)):
            restore_state(self, saved)
            log(
                WARNING,
                "round %d: the aggregate or the strategy's state is not finite: refused, previous Global-LiGO kept",
                server_round,
            )
            return None, None
        return arrays, metrics


def _as_sent(arrays: ArrayRecord | None, spec: ArraySpec) -> ArrayRecord | None:
    """``arrays`` cast back to the dtypes that were sent.

    Flower's FedOpt family (FedAdam, FedYogi, FedAdagrad) returns float64 arrays
    for float32 input; without the cast the Global-LiGO would double in bytes from
    round 2 on and the dtype check would follow the drift.
    """
    if arrays is None or all(str(a.dtype) == spec.get(k, (None, str(a.dtype)))[1] for k, a in arrays.items()):
        return arrays
    return ArrayRecord({k: Array(a.numpy().astype(spec[k][1]) if k in spec else a.numpy()) for k, a in arrays.items()})


def wait_for_nodes(grid: Grid, needed: int, timeout: float, poll: float = 1.0) -> list[int]:
    """The online node ids, once at least ``needed`` are online or after ``timeout`` seconds, whichever is first.

    Flower's ``sample_nodes`` waits for ``min_available_nodes`` without a bound;
    this is the bounded wait a round takes instead.

    Parameters
    ----------
    grid : Grid
        Asked for ``get_node_ids()`` every ``poll`` seconds.
    needed : int
        Nodes the round needs (``min-train-nodes``).
    timeout, poll : float
        Seconds to wait at most, and between checks.

    Returns
    -------
    list of int
        The node ids online when the wait ended (possibly fewer than ``needed``).
    """
    deadline = time.monotonic() + timeout
    nodes = list(grid.get_node_ids())
    while len(nodes) < needed and time.monotonic() < deadline:
        log(INFO, "waiting for nodes: %d online, %d needed", len(nodes), needed)
        time.sleep(min(poll, max(0.0, deadline - time.monotonic())))
        nodes = list(grid.get_node_ids())
    return nodes
