"""The Fed-Grow strategy, and any Flower strategy with the same reply checks.

:class:`FedGrow` is Flower's ``FedAvg`` (example-weighted, McMahan et al. 2017)
over the Global-LiGO tensors only, with every reply checked and bounded before
aggregation (:class:`server_app.trust.checked_round.ReplyChecks`). :func:`build_strategy` returns
FedGrow or any other Flower strategy, by config name or import path, with the
same checks mixed in.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from flwr.serverapp.strategy import (
    Bulyan,
    FedAdagrad,
    FedAdam,
    FedAvg,
    FedAvgM,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
    FedYogi,
    Krum,
    MultiKrum,
    Strategy,
)

from fedgrow_core.run_config import ConfigError, RunConfig

from ..trust.central_dp import with_central_dp
from ..trust.checked_round import ReplyChecks, RoundChecks
from ..trust.robust_aggregation import CentredClipping, GeometricMedian

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
    "multikrum": MultiKrum,
    "bulyan": Bulyan,
    "geometric-median": GeometricMedian,
    "centred-clipping": CentredClipping,
}


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


#: Flower constructor parameter -> run-config field, passed to the built-in strategies that take it.
STRATEGY_KNOBS = {
    "proximal_mu": "proximal_mu",
    "eta": "fedopt_eta",
    "eta_l": "fedopt_eta_l",
    "beta_1": "fedopt_beta_1",
    "beta_2": "fedopt_beta_2",
    "tau": "fedopt_tau",
    "server_momentum": "server_momentum",
    "server_learning_rate": "server_lr",
    "num_malicious_nodes": "num_malicious_nodes",
    "beta": "trimmed_beta",
    "num_nodes_to_select": "multikrum_select",
    "radius": "centred_clip_tau",
}
#: Strategies whose aggregate is an average of the clipped updates, which central DP's noise is calibrated for.
DP_STRATEGIES = (FedAvg, FedProx)


def strategy_kwargs(cls: type[Strategy], run: RunConfig) -> dict[str, Any]:
    """The run's knobs for a built-in strategy (``STRATEGY_KNOBS`` it accepts); none for a user's class."""
    if cls not in BUILTIN_STRATEGIES.values():
        return {}
    params = inspect.signature(cls.__init__).parameters
    return {param: getattr(run, field) for param, field in STRATEGY_KNOBS.items() if param in params}


def build_strategy(
    name: str,
    num_nodes: int,
    fraction_train: float,
    min_train_nodes: int = 1,
    checks: RoundChecks | None = None,
    **kwargs: Any,
) -> Strategy:
    """Instantiate a checked strategy for ``num_nodes`` clients, whole: every setting through its constructor.

    ``fraction_evaluate`` is 0 (Fed-Grow evaluates once, after growth);
    ``min_train_nodes`` is Flower's minimum sample size and Flower's
    ``min_available_nodes``; ``checks`` are the reply checks' settings
    (:class:`~server_app.trust.checked_round.RoundChecks`; default: none but
    ``min_replies = min_train_nodes``). Extra ``kwargs`` go to the class.

    Raises
    ------
    ValueError
        From :func:`resolve_strategy`, for an unknown or unimportable strategy,
        or if ``min_train_nodes`` is not in ``[1, num_nodes]``.
    ConfigError
        If the class cannot be constructed with these arguments.
    """
    cls = checked(resolve_strategy(name))
    _check_min_train_nodes(min_train_nodes, num_nodes)
    checks = checks if checks is not None else RoundChecks(min_replies=min_train_nodes)
    return _construct(name, cls, fraction_train, min_train_nodes, {**kwargs, "checks": checks})


def check_strategy(run: RunConfig, num_nodes: int) -> type[Strategy]:
    """Check, without building it, that the run's strategy can be built for ``num_nodes`` nodes.

    The ServerApp calls this before any node sets up, so an unknown,
    unimportable or misconfigured strategy fails first; the strategy itself is
    built once, by :func:`strategy_for_run`, when the rounds start.

    Returns
    -------
    type
        The strategy class ``run.strategy`` names.

    Raises
    ------
    ValueError, ConfigError
        As :func:`strategy_for_run`, except for a constructor that rejects its
        values (only arguments it does not take are found here).
    """
    _check_min_train_nodes(run.min_train_nodes, num_nodes)
    cls = resolve_strategy(run.strategy)
    if run.dp_clipping != "off" and cls not in DP_STRATEGIES and not getattr(cls, "dp_compatible", False):
        raise ConfigError(
            [
                f"strategy = {run.strategy!r} with dp-clipping = {run.dp_clipping!r}: central DP needs an "
                'average of clipped updates: set strategy = "fedavg" (or "fedprox"). Server optimisers '
                "keep state built from the aggregate before noise, and robust aggregators, the default "
                "geometric median included, are not the average the noise is calibrated for (a user's class "
                "may set dp_compatible = True)"
            ]
        )
    try:
        inspect.signature(cls).bind(
            **_flower_args(run.fraction_train, run.min_train_nodes), **strategy_kwargs(cls, run)
        )
    except TypeError as err:
        raise ConfigError(
            [f"strategy = {run.strategy!r}: {_unconstructible(strategy_kwargs(cls, run))}: {err}"]
        ) from err
    return cls


def run_checks(
    run: RunConfig,
    *,
    example_caps: Mapping[int, int] | None = None,
    encoded: bool = False,
    diagnostics: bool = True,
    round_offset: int = 0,
) -> RoundChecks:
    """The reply checks' settings of a run's strategy rounds (:class:`~server_app.trust.checked_round.RoundChecks`).

    ``example_caps`` (node id -> preflight training rows) caps each reply's
    weight; the update-norm bounds are ``clip-update-norm`` and
    ``clip-update-median``; ``encoded``: replies carry ``update-encoding``
    (else float32 values); ``round_offset``: rounds restored from a checkpoint.
    """
    return RoundChecks(
        min_replies=run.min_train_nodes,
        node_wait=run.round_timeout,
        example_caps=example_caps,
        clip_norm=run.clip_update_norm,
        clip_median=run.clip_update_median,
        cap_weight_median=run.cap_weight_median,
        requires_all_replies=run.dp_clipping != "off",
        update_encoding=run.update_encoding if encoded else "float32",
        log_diagnostics=diagnostics,
        round_offset=round_offset,
    )


def strategy_for_run(run: RunConfig, num_nodes: int, checks: RoundChecks | None = None) -> Strategy:
    """The run's strategy, built once and whole: ``run.strategy`` with reply checks, inside central DP if configured.

    With ``dp-clipping`` off this is :func:`build_strategy` with the run's
    knobs (:func:`strategy_kwargs`). Otherwise the named strategy (unchecked)
    is wrapped by :func:`server_app.trust.central_dp.with_central_dp` and the reply
    checks go on the outside, so a malformed reply is dropped before it is
    clipped, and a round in which a sampled reply is unusable is skipped.
    ``checks`` are the reply checks' settings (:func:`run_checks`; default:
    ``run_checks(run)``); their ``min_replies`` and ``requires_all_replies``
    are always the run's (``min-train-nodes``; central DP needs every sampled reply).

    Raises
    ------
    ValueError
        As :func:`build_strategy`.
    ConfigError
        If the strategy cannot be constructed, or central DP is asked for with
        a strategy other than FedAvg or FedProx (a server optimiser such as
        FedAdam keeps moments of the aggregate before noise; a median or Krum
        is not the average the noise is calibrated for). A user's class may
        declare ``dp_compatible = True`` to be allowed.
    """
    cls = check_strategy(run, num_nodes)
    # what the run decides is never left to the caller: inside central DP every sampled reply must be usable
    settings = {"min_replies": run.min_train_nodes, "requires_all_replies": run.dp_clipping != "off"}
    checks = replace(checks, **settings) if checks is not None else run_checks(run)
    kwargs = strategy_kwargs(cls, run)
    if run.dp_clipping == "off":
        return _construct(
            run.strategy, checked(cls), run.fraction_train, run.min_train_nodes, {**kwargs, "checks": checks}
        )
    inner = _construct(run.strategy, cls, run.fraction_train, run.min_train_nodes, kwargs)
    sampled = max(int(run.fraction_train * num_nodes), run.min_train_nodes)
    return with_central_dp(inner, run, sampled, checked, checks=checks)


def _flower_args(fraction_train: float, min_train_nodes: int) -> dict[str, Any]:
    """The arguments every strategy takes as Flower's ``FedAvg`` does."""
    return {
        "fraction_train": fraction_train,
        "fraction_evaluate": 0.0,
        "min_train_nodes": min_train_nodes,
        "min_evaluate_nodes": 0,
        "min_available_nodes": min_train_nodes,
    }


def _unconstructible(kwargs: Mapping[str, Any]) -> str:
    extra = [k for k in kwargs if k != "checks"]
    return (
        "cannot be constructed as Flower's FedAvg is "
        f"(fraction_train, fraction_evaluate, min_*_nodes{', ' if extra else ''}{', '.join(extra)})"
    )


def _construct(
    name: str, cls: type[Strategy], fraction_train: float, min_train_nodes: int, kwargs: dict[str, Any]
) -> Strategy:
    try:
        return cls(**_flower_args(fraction_train, min_train_nodes), **kwargs)
    except (TypeError, ValueError) as err:
        raise ConfigError([f"strategy = {name!r}: {_unconstructible(kwargs)}: {err}"]) from err


def _check_min_train_nodes(min_train_nodes: int, num_nodes: int) -> None:
    if not 1 <= min_train_nodes <= num_nodes:
        raise ValueError(f"min-train-nodes = {min_train_nodes}: expected an integer in [1, {num_nodes}] (the nodes)")
