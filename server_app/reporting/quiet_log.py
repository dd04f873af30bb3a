"""What of Flower's own strategy log a Fed-Grow run leaves out, and why.

``Strategy.start`` logs for a run with federated evaluation every round; Fed-Grow
evaluates in its final phase instead (each client its own model), so those
lines are empty (``Initial global evaluation results: None``,
``MetricRecord: None``, ``Evaluate Metrics: {}``), and its closing ``Final
results`` block repeats averages the round lines already gave.
:class:`StrategyNoiseFilter` drops exactly those records (matched on their format
string, never on a value) from the ``flwr`` logger while installed, and
:func:`quiet_strategy_log` installs it for a block. Everything else, warnings and
errors included, passes.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

from flwr.common.logger import FLOWER_LOGGER

#: Format strings of the records dropped wherever they appear.
DROPPED = frozenset(
    {
        "fraction_evaluate is set to 0.0. Federated evaluation will be skipped.",
        "Initial global evaluation results: %s",
        "Global evaluation",
        "\t└──> MetricRecord: %s",
        "\t└──> Aggregated MetricRecord: %s",
        "%s: Received %s results and %s failures",  # FedAvg's; the round line says it, by outcome
        "aggregate_train: Received %s results and %s failures",  # central DP's
    }
)
#: The record that opens ``Strategy.start``'s closing block (its lines are ``"\t%s"`` and ``""``).
FINAL_BLOCK = "Final results:"


class StrategyNoiseFilter(logging.Filter):
    """Drop :data:`DROPPED` records and the block that :data:`FINAL_BLOCK` opens."""

    def __init__(self) -> None:
        super().__init__()
        self._in_final_block = False

    def filter(self, record: logging.LogRecord) -> bool:
        """``False`` for a record to drop."""
        if record.msg == FINAL_BLOCK:
            self._in_final_block = True
            return False
        if self._in_final_block and record.msg in ("\t%s", ""):
            return False
        self._in_final_block = False
        return record.msg not in DROPPED


@contextlib.contextmanager
def quiet_strategy_log() -> Iterator[None]:
    """Install a :class:`StrategyNoiseFilter` on Flower's logger for the block, then remove it."""
    noise = StrategyNoiseFilter()
    FLOWER_LOGGER.addFilter(noise)
    try:
        yield
    finally:
        FLOWER_LOGGER.removeFilter(noise)
