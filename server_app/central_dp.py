"""Central differential privacy on the Global-LiGO with Flower's server-side clipping wrappers.

``dp-clipping = "fixed"`` wraps the run's strategy in Flower's
``DifferentialPrivacyServerSideFixedClipping`` and ``"adaptive"`` in
``DifferentialPrivacyServerSideAdaptiveClipping`` (Andrew et al. 2021): each
client's update of the shared tensors (reply minus the arrays sent) is clipped to
L2 norm ``dp-clipping-norm`` over all shared tensors together, the clipped
replies are aggregated by the wrapped strategy, and Gaussian noise of std
``dp-noise-multiplier * clipping norm / sampled clients`` is added to the
aggregate. For adaptive clipping the count of clipped updates is noised with
:func:`clipped_count_stddev`. What this does and does not guarantee is in the README
("Reliability and privacy").
"""

from __future__ import annotations

from collections.abc import Callable
from logging import INFO

from flwr.common import log
from flwr.serverapp.strategy import (
    DifferentialPrivacyServerSideAdaptiveClipping,
    DifferentialPrivacyServerSideFixedClipping,
    Strategy,
)

from fedgrow_core.run_config import RunConfig


def with_central_dp(
    strategy: Strategy,
    run: RunConfig,
    num_sampled_clients: int,
    wrap: Callable[[type[Strategy]], type[Strategy]] = lambda cls: cls,
) -> Strategy:
    """``strategy`` inside the central-DP wrapper that ``run.dp_clipping`` names.

    Parameters
    ----------
    strategy : Strategy
        The aggregation strategy (e.g. ``FedAvg``) that receives clipped replies.
    run : RunConfig
        ``dp_clipping`` ("fixed" or "adaptive"), ``dp_noise_multiplier`` and
        ``dp_clipping_norm`` (the initial norm for "adaptive").
    num_sampled_clients : int
        Nodes sampled per round; the noise std divides by it.
    wrap : callable
        Applied to the wrapper class before instantiation (the server passes
        :func:`server_app.strategy.checked`, so replies are checked before clipping).

    Returns
    -------
    Strategy
        The wrapped strategy; its ``min_train_nodes`` is ``run.min_train_nodes``.

    Raises
    ------
    ValueError
        If ``run.dp_clipping`` is not "fixed" or "adaptive", or from Flower's
        wrappers for a negative noise multiplier or non-positive clipping norm.
    """
    if run.dp_clipping == "fixed":
        cls = wrap(DifferentialPrivacyServerSideFixedClipping)
        dp = cls(strategy, run.dp_noise_multiplier, run.dp_clipping_norm, num_sampled_clients)
    elif run.dp_clipping == "adaptive":
        cls = wrap(DifferentialPrivacyServerSideAdaptiveClipping)
        dp = cls(
            strategy,
            run.dp_noise_multiplier,
            num_sampled_clients,
            initial_clipping_norm=run.dp_clipping_norm,
            clipped_count_stddev=clipped_count_stddev(run.dp_noise_multiplier, num_sampled_clients),
        )
    else:
        raise ValueError(f"dp-clipping = {run.dp_clipping!r}: expected 'fixed' or 'adaptive'")
    dp.min_train_nodes = run.min_train_nodes
    log(
        INFO,
        "central DP: %s clipping, norm %g, noise multiplier %g, %d sampled clients",
        run.dp_clipping,
        run.dp_clipping_norm,
        run.dp_noise_multiplier,
        num_sampled_clients,
    )
    return dp


def clipped_count_stddev(noise_multiplier: float, num_sampled_clients: int) -> float:
    """Noise std of the clipped-update count in adaptive clipping (Andrew et al. 2021, Alg. 1).

    Flower's default is ``num_sampled_clients / 20``, but the split of the noise
    budget between the count and the update needs ``stddev > noise_multiplier / 2``
    (the update then gets noise multiplier ``(z^-2 - (2 stddev)^-2)^-1/2``); we use
    ``max(num_sampled_clients / 20, noise_multiplier)``, which always qualifies
    for ``noise_multiplier > 0``.
    """
    return max(num_sampled_clients / 20, noise_multiplier)
