"""Central differential privacy on the Global-LiGO with Flower's server-side clipping wrappers.

``dp-clipping = "fixed"`` wraps the run's strategy in Flower's
``DifferentialPrivacyServerSideFixedClipping`` and ``"adaptive"`` in
``DifferentialPrivacyServerSideAdaptiveClipping`` (Andrew et al. 2021): each
client's update of the shared tensors (reply minus the arrays sent) is clipped to
L2 norm ``dp-clipping-norm`` over all shared tensors together, the clipped
replies are aggregated by the wrapped strategy, and Gaussian noise of std
``dp-noise-multiplier * clipping norm / sampled clients`` is added to the
aggregate. For adaptive clipping the count of clipped updates is noised with
:func:`clipped_count_stddev`.

Both noises are drawn by :func:`secure_gaussian` from the operating system's
cryptographically secure generator (``secrets``/``os.urandom``), never from
NumPy's global generator, whose state the checkpoint stores: no file a run
writes lets anyone regenerate a round's noise. What this does and does not
guarantee is in docs/reliability-and-privacy.md ("Central differential privacy").
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Callable
from logging import INFO
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord
from flwr.common import log
from flwr.serverapp.strategy import (
    DifferentialPrivacyServerSideAdaptiveClipping,
    DifferentialPrivacyServerSideFixedClipping,
    Strategy,
)

from fedgrow_core.run_config import RunConfig

try:  # flwr >= 1.40 keeps the DP maths in flwr.supercore
    from flwr.supercore.differential_privacy import compute_stdv
except ImportError:  # pragma: no cover
    from flwr.common.differential_privacy import compute_stdv


def secure_gaussian(shape: tuple[int, ...], std: float) -> np.ndarray:
    """Gaussian noise of ``std`` drawn from the OS's cryptographically secure generator.

    Box-Muller transform (Box and Muller 1958) of uniforms built from
    ``secrets.token_bytes`` (53 random bits each, in ``(0, 1]``); float64.
    Nothing of the generator's state is held or written anywhere.

    Parameters
    ----------
    shape : tuple of int
        Output shape.
    std : float
        Standard deviation, >= 0.

    Returns
    -------
    ndarray
        float64 array of ``shape``.
    """
    n = math.prod(shape)
    pairs = (n + 1) // 2
    raw = np.frombuffer(secrets.token_bytes(16 * pairs), dtype=np.uint64).reshape(2, pairs)
    u1 = ((raw[0] >> np.uint64(11)).astype(np.float64) + 1.0) / 2.0**53  # (0, 1]
    u2 = (raw[1] >> np.uint64(11)).astype(np.float64) / 2.0**53  # [0, 1)
    radius = np.sqrt(-2.0 * np.log(u1))
    normals = np.concatenate([radius * np.cos(2 * np.pi * u2), radius * np.sin(2 * np.pi * u2)])[:n]
    return (std * normals).reshape(shape)


class SecureNoise:
    """Mixin for Flower's server-side DP wrappers: the same noise std, drawn by :func:`secure_gaussian`."""

    def _add_noise_to_aggregated_arrays(self, aggregated: ArrayRecord) -> ArrayRecord:
        std = compute_stdv(self.noise_multiplier, self.clipping_norm, self.num_sampled_clients)
        noisy = {}
        for name, array in aggregated.items():
            value = array.numpy()
            noisy[name] = Array((value + secure_gaussian(value.shape, std)).astype(value.dtype))
        log(INFO, "central DP: noise of std %.4g added (secure generator)", std)
        return ArrayRecord(noisy)

    def _noisy_fraction(self, count: int, total: int) -> float:
        return float(count + secure_gaussian((1,), self.clipped_count_stddev)[0]) / float(total)


class SecureFixedClipping(SecureNoise, DifferentialPrivacyServerSideFixedClipping):
    """Flower's ``DifferentialPrivacyServerSideFixedClipping`` with :class:`SecureNoise`."""


class SecureAdaptiveClipping(SecureNoise, DifferentialPrivacyServerSideAdaptiveClipping):
    """Flower's ``DifferentialPrivacyServerSideAdaptiveClipping`` with :class:`SecureNoise`."""


def with_central_dp(
    strategy: Strategy,
    run: RunConfig,
    num_sampled_clients: int,
    wrap: Callable[[type[Strategy]], type[Strategy]] = lambda cls: cls,
    **extra: Any,
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
        :func:`server_app.orchestration.strategy.checked`, so replies are checked before clipping).
    **extra
        Further constructor arguments of the wrapped class (the reply checks' ``checks``).

    Returns
    -------
    Strategy
        The wrapped strategy.

    Raises
    ------
    ValueError
        If ``run.dp_clipping`` is not "fixed" or "adaptive", or from Flower's
        wrappers for a negative noise multiplier or non-positive clipping norm.
    """
    if run.dp_clipping == "fixed":
        cls = wrap(SecureFixedClipping)
        dp = cls(strategy, run.dp_noise_multiplier, run.dp_clipping_norm, num_sampled_clients, **extra)
    elif run.dp_clipping == "adaptive":
        cls = wrap(SecureAdaptiveClipping)
        dp = cls(
            strategy,
            run.dp_noise_multiplier,
            num_sampled_clients,
            initial_clipping_norm=run.dp_clipping_norm,
            clipped_count_stddev=clipped_count_stddev(run.dp_noise_multiplier, num_sampled_clients),
            **extra,
        )
    else:
        raise ValueError(f"dp-clipping = {run.dp_clipping!r}: expected 'fixed' or 'adaptive'")
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
