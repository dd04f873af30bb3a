"""Saving a client's final model: only finite weights, and atomically.

A client saves its final model (grown, small or target-shaped) in its family's
own format (``transformers``' ``save_pretrained`` with the tokenizer, or timm's
``save_for_hf``). :func:`save_model` first checks that every weight is finite,
then writes into a temporary folder beside the destination and swaps it in with
``os.replace``, so a reader never sees a half-written model and a model that was
saved before is never replaced by a broken one.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn


class NonFiniteModel(ValueError):
    """Raised when a model to be saved or reported has NaN or infinite weights (names the first such tensor)."""


def check_finite(model: nn.Module, what: str = "model") -> None:
    """Raise :class:`NonFiniteModel` if any parameter or buffer of ``model`` holds NaN or infinity."""
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            raise NonFiniteModel(f"the {what} has {bad} non-finite values in {name!r}; it is not saved or reported")


def write_folder_atomically(folder: str | Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp)`` on a new temporary folder beside ``folder``, then make it ``folder``.

    An existing ``folder`` is moved aside and removed only after the new one is
    in place; if ``write`` raises, the temporary folder is removed and
    ``folder`` is left as it was.

    Returns
    -------
    Path
        ``folder``.
    """
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".tmp", dir=folder.parent))
    try:
        write(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if folder.exists():
        old = folder.with_name(f".{folder.name}.{os.getpid()}.old")
        os.replace(folder, old)
    os.replace(tmp, folder)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return folder


def save_model(family: Any, model: nn.Module, config: Any, preprocessor: Any, folder: str | Path) -> Path:
    """Save ``model`` (its family's format) and its tokenizer, if it has one, atomically into ``folder``.

    Parameters
    ----------
    family : fedgrow_core.growth.families.base.ModelFamily
        Whose ``save`` writes the weights and config.
    model : nn.Module
        The model; moved to CPU for saving.
    config : Any
        Its family config.
    preprocessor : Any
        Saved with ``save_pretrained`` if it has that method (a tokenizer).
    folder : str or Path
        The model's folder.

    Raises
    ------
    NonFiniteModel
        If a weight is not finite; nothing is written.
    """
    check_finite(model)

    def write(tmp: Path) -> None:
        family.save(model.cpu(), config, tmp)
        if hasattr(preprocessor, "save_pretrained"):
            preprocessor.save_pretrained(tmp)

    return write_folder_atomically(folder, write)
