"""Local training steps and evaluation of a classifier (small, grown or target model).

Works on any module whose forward takes the batch from
:func:`fedgrow_core.data.preprocessing.make_dataloader` and returns logits ``(B, K)``
or an output with ``.logits`` (``transformers``). Precision is macro-averaged
with ``sklearn.metrics.precision_score``.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import re
import time
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import numpy as np
import torch
from sklearn.metrics import precision_score
from torch import Tensor, nn
from torch.nn import functional as F

from fedgrow_core.data.preprocessing import model_inputs
from fedgrow_core.run_config import DEVICE_PATTERN

_LOG = logging.getLogger(__name__)
#: The label of :func:`train_steps`' progress lines in this context (``None``: no lines).
_PROGRESS_LABEL: ContextVar[str | None] = ContextVar("progress_label", default=None)
#: Seconds between two progress lines of one :func:`train_steps` call (the last step always reports).
PROGRESS_SECONDS = 20.0
#: ``(deadline on time.monotonic(), limit in seconds)`` of the work in this context (``None``: no limit).
_DEADLINE: ContextVar[tuple[float, float] | None] = ContextVar("work_deadline", default=None)


class WorkLimitExceeded(RuntimeError):
    """Raised by :func:`train_steps` and :func:`evaluate` when the block's :func:`time_limit` has passed."""


@contextlib.contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """Within the block, :func:`train_steps` and :func:`evaluate` raise :class:`WorkLimitExceeded` after ``seconds``.

    Checked before every optimiser step and every evaluation batch, so the
    overrun is at most one step or batch. ``seconds <= 0`` sets no limit. A
    node bounds the work one server message may ask of it this way
    (node config ``max-message-seconds``).
    """
    token = _DEADLINE.set((time.monotonic() + seconds, seconds) if seconds > 0 else None)
    try:
        yield
    finally:
        _DEADLINE.reset(token)


def _check_deadline(what: str) -> None:
    deadline = _DEADLINE.get()
    if deadline is not None and time.monotonic() > deadline[0]:
        raise WorkLimitExceeded(f"{what} ran past this node's max-message-seconds = {deadline[1]:g} s; stopped")


@contextlib.contextmanager
def reporting_progress(label: str) -> Iterator[None]:
    """Within the block, :func:`train_steps` logs ``"<label>: step i/n, loss L, S s"`` (INFO, logger ``fedgrow_core``).

    One line at most every :data:`PROGRESS_SECONDS` seconds and one after the
    last step; the loss is the mean cross-entropy (nats) of the steps since the
    previous line.
    """
    token = _PROGRESS_LABEL.set(label)
    try:
        yield
    finally:
        _PROGRESS_LABEL.reset(token)


def resolve_device(device: str = "auto") -> torch.device:
    """The torch device of ``device``: ``auto`` (CUDA when available, else CPU), ``cpu``, ``cuda`` or ``cuda:N``.

    Raises
    ------
    ValueError
        If ``device`` is none of these, or names a CUDA device this machine does not have
        (the text names the value and the devices torch sees).
    """
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not re.fullmatch(DEVICE_PATTERN, device):
        raise ValueError(f"device = {device!r}: expected 'auto', 'cpu', 'cuda' or 'cuda:<index>'")
    if device.startswith("cuda"):
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        index = int(device.split(":")[1]) if ":" in device else 0
        if index >= count:
            raise ValueError(f"device = {device!r}, but this machine has {count} CUDA device(s) torch can use")
    return torch.device(device)


def _autocast(device: torch.device):
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def logits_of(output) -> Tensor:
    """Logits from a forward output (a tensor, or an object with ``.logits``)."""
    return output.logits if hasattr(output, "logits") else output


def _to(batch: dict[str, Tensor], device: torch.device) -> dict[str, Tensor]:
    return {k: v.to(device) for k, v in batch.items()}


def cycle(loader: Iterable) -> Iterator:
    """Endless iteration over ``loader``, reshuffling each pass (if the loader shuffles)."""
    for _ in itertools.count():
        yield from loader


def train_steps(
    model: nn.Module,
    batches: Iterator[dict[str, Tensor]],
    optimizer: torch.optim.Optimizer,
    steps: int,
    device: torch.device,
    *,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    max_grad_norm: float | None = 1.0,
    penalty: Callable[[], Tensor] | None = None,
) -> TrainStats:
    """Run ``steps`` optimiser steps of cross-entropy on ``batches``.

    Parameters
    ----------
    model : nn.Module
        Trained in place; put in train mode, left in eval mode.
    batches : iterator of dict
        E.g. ``cycle(loader)``; each batch has ``labels``.
    optimizer : torch.optim.Optimizer
        Over the parameters that should move.
    steps : int
        Number of optimiser steps (local steps), >= 0.
    device : torch.device
        Where to run; bf16 autocast on CUDA.
    scheduler : LRScheduler, optional
        Stepped after every optimiser step.
    max_grad_norm : float, optional
        Gradient-norm clipping; ``None`` disables it.
    penalty : callable, optional
        Extra loss term added each step (e.g. FedProx's proximal term).

    Returns
    -------
    TrainStats
        Loss of every step (cross-entropy only), and correct / seen training rows.

    Raises
    ------
    WorkLimitExceeded
        If the enclosing :func:`time_limit` passes (the model keeps the steps taken).
    """
    model.train()
    losses, correct, seen = [], 0, 0
    params = [p for g in optimizer.param_groups for p in g["params"]]
    label, start = _PROGRESS_LABEL.get(), time.perf_counter()
    reported, last_line = 0, start
    for step in range(steps):
        _check_deadline(f"training (step {step + 1} of {steps})")
        batch = _to(next(batches), device)
        args, kwargs = model_inputs(batch)
        with _autocast(device):
            logits = logits_of(model(*args, **kwargs))
        loss = F.cross_entropy(logits.float(), batch["labels"])
        total = loss + penalty() if penalty is not None else loss
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        if max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        losses.append(float(loss.detach()))
        correct += int((logits.argmax(-1) == batch["labels"]).sum())
        seen += len(batch["labels"])
        now = time.perf_counter()
        if label is not None and (now - last_line >= PROGRESS_SECONDS or step == steps - 1):
            window = losses[reported:]
            _LOG.info(
                "%s: step %d/%d, loss %.4f, %.0f s", label, step + 1, steps, sum(window) / len(window), now - start
            )
            reported, last_line = len(losses), now
    model.eval()
    return TrainStats(losses, correct, seen)


@dataclass(frozen=True)
class TrainStats:
    """Per-step losses (nats) and correct / seen training rows of :func:`train_steps`."""

    losses: list[float]
    correct: int
    seen: int

    @property
    def mean_loss(self) -> float:
        """Mean of the step losses (NaN when no step ran)."""
        return sum(self.losses) / len(self.losses) if self.losses else float("nan")

    @property
    def accuracy(self) -> float:
        """Training accuracy over the rows seen (0 when none)."""
        return self.correct / self.seen if self.seen else 0.0


@dataclass(frozen=True)
class EvalResult:
    """Test metrics: mean cross-entropy (nats), accuracy, macro precision, row count, majority share.

    ``majority_share`` is the fraction of rows given the most often predicted
    class: 1.0 when the model has collapsed to one class.
    """

    loss: float
    accuracy: float
    precision: float
    num_examples: int
    majority_share: float = 0.0


@torch.no_grad()
def evaluate(model: nn.Module, loader: Iterable[dict[str, Tensor]], device: torch.device) -> EvalResult:
    """Loss, accuracy and macro precision of ``model`` over every batch of ``loader``.

    Returns
    -------
    EvalResult
        Mean cross-entropy in nats per row, accuracy in [0, 1], macro precision
        (``sklearn.metrics.precision_score(average="macro", zero_division=0)``)
        and the number of rows.

    Raises
    ------
    ValueError
        If ``loader`` yields no batch.
    WorkLimitExceeded
        If the enclosing :func:`time_limit` passes.
    """
    model.eval()
    total, preds, labels = 0.0, [], []
    for batch in loader:
        _check_deadline("evaluation")
        batch = _to(batch, device)
        args, kwargs = model_inputs(batch)
        with _autocast(device):
            logits = logits_of(model(*args, **kwargs)).float()
        total += float(F.cross_entropy(logits, batch["labels"], reduction="sum"))
        preds.append(logits.argmax(-1).cpu())
        labels.append(batch["labels"].cpu())
    if not labels:
        raise ValueError("evaluate() got an empty loader")
    y, p = torch.cat(labels).numpy(), torch.cat(preds).numpy()
    n = len(y)
    return EvalResult(
        loss=total / n,
        accuracy=float((y == p).mean()),
        precision=float(precision_score(y, p, average="macro", zero_division=0)),
        num_examples=n,
        majority_share=float(np.bincount(p).max() / n),
    )
