"""The Fed-Grow strategy, and any Flower strategy with the same reply checks.

:class:`FedGrow` is Flower's ``FedAvg`` (example-weighted, McMahan et al. 2017)
over the Global-LiGO tensors only, which rejects malformed replies before
aggregation (:mod:`server_app.reply_checks`). :func:`build_strategy` returns
FedGrow or any other Flower strategy, by config name or import path, with the
same checks mixed in.
"""

from __future__ import annotations

import importlib
import time
from collections.abc import Iterable
from logging import INFO, WARNING
from typing import Any

from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.common import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import (
    FedAdagrad,
    FedAdam,
    FedAvg,
    FedAvgM,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
    FedYogi,
    Krum,
    Strategy,
)

from fedgrow_core.run_config import RunConfig

from .central_dp import with_central_dp
from .reply_checks import ArraySpec, array_spec, reply_problem
from .round_log import round_entry

BUILTIN_STRATEGIES: dict[str, type[Strategy]] = {
    "fedavg": FedAvg,
    "fedprox": FedProx,
    "fedadam": FedAdam,
    "fedyogi": FedYogi,
    "fedadagrad": FedAdagrad,
    "fedavgm": FedAvgM,
    "fedmedian": FedMedian,
    "fedtrimmedavg": FedTrimmedAvg,
    "krum": Krum,
}


class ReplyChecks:
    """Mixin for a Flower strategy: drop malformed training replies before aggregation.

    The expected Global-LiGO names, shapes and dtypes are taken from the arrays the
    strategy sends. Rejected replies are logged with node id and reason and
    counted; error replies (a client that raised) and missing ones (a client that
    timed out or is gone) are recorded too. Only replies that pass reach the
    wrapped strategy, and only if there are at least ``min_train_nodes`` of them;
    otherwise the round is skipped and the arrays stay as they were. The
    aggregate is cast back to the dtypes that were sent (:func:`_as_sent`). ``round_log``
    keeps one :func:`server_app.round_log.round_entry` per round.

    ``round_offset`` (rounds done before a resume) is added to the round number
    Flower's ``Strategy.start`` counts from 1, so the wrapped strategy (FedAdam's
    bias correction, the clients' ``server-round``) sees the run's real round.
    """

    expected_spec: ArraySpec | None = None
    round_offset: int = 0

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid):
        """Remember the sent arrays' spec, the sampled nodes and the round's start, then delegate."""
        server_round += self.round_offset
        self.expected_spec = array_spec(arrays)
        self._round_start = time.perf_counter()
        messages = list(super().configure_train(server_round, arrays, config, grid))
        self._sent_nodes = [m.metadata.dst_node_id for m in messages]
        return messages

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        """Reject malformed replies, aggregate the rest with the wrapped strategy."""
        server_round += self.round_offset
        replies = list(replies)
        accepted, rejected = [], []
        for msg in replies:
            problem = None if msg.has_error() else reply_problem(msg.content, self.expected_spec or {})
            if problem is None:
                accepted.append(msg)
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
        needed = getattr(self, "min_train_nodes", 1)
        if len(ok) >= needed:
            arrays, metrics = super().aggregate_train(server_round, ok)
            arrays = _as_sent(arrays, self.expected_spec or {})
        else:
            log(
                WARNING,
                "round %d: %d usable replies < min_train_nodes = %d: round skipped, arrays unchanged",
                server_round,
                len(ok),
                needed,
            )
            arrays, metrics = None, None
        seconds = time.perf_counter() - getattr(self, "_round_start", time.perf_counter())
        entry = round_entry(server_round, replies, accepted, rejected, seconds, getattr(self, "_sent_nodes", ()))
        entry["aggregated"] = arrays is not None
        self.round_log = [*getattr(self, "round_log", []), entry]
        if metrics is None:
            metrics = MetricRecord()
        metrics["rejected-replies"] = len(rejected)
        metrics["failed-replies"] = entry["failed"]
        metrics["missing-replies"] = len(entry["missing_nodes"])
        log(
            INFO,
            "round %d: %d replies, %d accepted, %d rejected, %d failed, %d missing, %.1f s",
            server_round,
            len(replies),
            len(ok),
            len(rejected),
            entry["failed"],
            len(entry["missing_nodes"]),
            seconds,
        )
        return arrays, metrics


class FedGrow(ReplyChecks, FedAvg):
    """Fed-Grow's server strategy: example-weighted FedAvg of the Global-LiGO tensors, with reply checks.

    Parameters are those of ``flwr.serverapp.strategy.FedAvg``; replies are
    weighted by their ``num-examples`` metric.
    """


def checked(strategy_cls: type[Strategy]) -> type[Strategy]:
    """``strategy_cls`` with :class:`ReplyChecks` mixed in (``FedAvg`` gives :class:`FedGrow`)."""
    if strategy_cls is FedAvg:
        return FedGrow
    if issubclass(strategy_cls, ReplyChecks):
        return strategy_cls
    return type(f"Checked{strategy_cls.__name__}", (ReplyChecks, strategy_cls), {})


def resolve_strategy(name: str) -> type[Strategy]:
    """A strategy class from a built-in name or ``package.module:Class``.

    Raises
    ------
    ValueError
        Unknown name, unimportable path, or a class that is not a Flower ``Strategy``.
    """
    if name in BUILTIN_STRATEGIES:
        return BUILTIN_STRATEGIES[name]
    if ":" not in name:
        raise ValueError(f"unknown strategy {name!r}; expected one of {sorted(BUILTIN_STRATEGIES)} or 'module:Class'")
    module_name, _, attr = name.partition(":")
    try:
        cls = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"cannot import strategy {name!r}: {err}") from err
    if not (isinstance(cls, type) and issubclass(cls, Strategy)):
        raise ValueError(f"strategy {name!r} is not a flwr.serverapp.strategy.Strategy subclass")
    return cls


def build_strategy(
    name: str, num_nodes: int, fraction_train: float, min_train_nodes: int = 1, **kwargs: Any
) -> Strategy:
    """Instantiate a checked strategy for ``num_nodes`` clients.

    ``fraction_evaluate`` is 0 (Fed-Grow evaluates once, after growth);
    ``min_available_nodes`` is ``num_nodes`` (the first round waits for every
    node); ``min_train_nodes`` is both Flower's minimum sample size and, through
    :class:`ReplyChecks`, the minimum number of usable replies for a round to
    aggregate. Extra ``kwargs`` go to the class.

    Raises
    ------
    ValueError
        From :func:`resolve_strategy`, for an unknown or unimportable strategy,
        or if ``min_train_nodes`` is not in ``[1, num_nodes]``.
    """
    cls = checked(resolve_strategy(name))
    _check_min_train_nodes(min_train_nodes, num_nodes)
    return cls(
        fraction_train=fraction_train,
        fraction_evaluate=0.0,
        min_train_nodes=min_train_nodes,
        min_evaluate_nodes=0,
        min_available_nodes=num_nodes,
        **kwargs,
    )


def strategy_for_run(run: RunConfig, num_nodes: int) -> Strategy:
    """The run's strategy: ``run.strategy`` with reply checks, inside Flower's central-DP wrapper if configured.

    With ``dp-clipping`` off this is :func:`build_strategy`. Otherwise the named
    strategy (unchecked) is wrapped by :func:`server_app.central_dp.with_central_dp`
    and the reply checks go on the outside, so a malformed reply is dropped
    before it is clipped.

    Raises
    ------
    ValueError
        As :func:`build_strategy`.
    """
    if run.dp_clipping == "off":
        return build_strategy(run.strategy, num_nodes, run.fraction_train, run.min_train_nodes)
    _check_min_train_nodes(run.min_train_nodes, num_nodes)
    inner = resolve_strategy(run.strategy)(
        fraction_train=run.fraction_train,
        fraction_evaluate=0.0,
        min_train_nodes=run.min_train_nodes,
        min_evaluate_nodes=0,
        min_available_nodes=num_nodes,
    )
    sampled = max(int(run.fraction_train * num_nodes), run.min_train_nodes)
    return with_central_dp(inner, run, sampled, checked)


def _as_sent(arrays: ArrayRecord | None, spec: ArraySpec) -> ArrayRecord | None:
    """``arrays`` cast back to the dtypes that were sent.

    Flower's FedOpt family (FedAdam, FedYogi, FedAdagrad) returns float64 arrays
    for float32 input; without the cast the Global-LiGO would double in bytes from
    round 2 on and the dtype check would follow the drift.
    """
    if arrays is None or all(str(a.dtype) == spec.get(k, (None, str(a.dtype)))[1] for k, a in arrays.items()):
        return arrays
    return ArrayRecord({k: Array(a.numpy().astype(spec[k][1]) if k in spec else a.numpy()) for k, a in arrays.items()})


def _check_min_train_nodes(min_train_nodes: int, num_nodes: int) -> None:
    if not 1 <= min_train_nodes <= num_nodes:
        raise ValueError(f"min-train-nodes = {min_train_nodes}: expected an integer in [1, {num_nodes}] (the nodes)")
