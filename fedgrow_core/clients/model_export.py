"""Saving a client's final model: only finite weights, and atomically.

A client saves its final model (grown, small or target-shaped) in its family's
own format (``transformers``' ``save_pretrained`` with the tokenizer, or timm's
``save_for_hf``). :func:`save_model` first checks that every weight is finite,
then writes into a temporary folder beside the destination and swaps it in with
``os.replace``, so a reader never sees a half-written model and a model that was
saved before is never replaced by a broken one. Each folder records the run that
wrote it (:data:`OWNER_FILE`), and :func:`owner_problem` tells a run that a
folder belongs to another, so that one run cannot replace another's model.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from fedgrow_core.clients.model_card import CARD_FILE

#: The file in a saved model's folder that names the run that wrote it (JSON of strings).
OWNER_FILE = "fedgrow_run.json"


class NonFiniteModel(ValueError):
    """Raised when a model to be saved or reported has NaN or infinite weights (names the first such tensor)."""


def count_non_finite(tensor: Tensor) -> int:
    """How many entries of ``tensor`` (any shape) are NaN or infinite; 0 for an integer or boolean tensor.

    A sum is non-finite whenever one of its terms is (IEEE 754: ``inf + x`` is
    ``inf`` or NaN, NaN propagates), so a finite sum proves every entry finite
    in one reduction; only a non-finite sum (a bad entry, or finite entries
    that overflow) is followed by the exact count.
    """
    if not tensor.is_floating_point() or bool(torch.isfinite(tensor.sum())):
        return 0
    return int((~torch.isfinite(tensor)).sum())


def check_finite(model: nn.Module, what: str = "model") -> None:
    """Check that every parameter and buffer of ``model`` is finite.

    Raises
    ------
    NonFiniteModel
        Naming the first tensor that holds NaN or infinity, with how many such values.
    """
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        bad = count_non_finite(tensor)
        if bad:
            raise NonFiniteModel(f"the {what} has {bad} non-finite values in {name!r}; it is not saved or reported")


def write_folder_atomically(folder: str | Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp)`` on a new temporary folder beside ``folder``, then make it ``folder``.

    An existing ``folder`` is moved aside and removed only after the new one is
    in place (between the two renames, for an instant, neither is at
    ``folder``); if ``write`` raises, the temporary folder is removed and
    ``folder`` is left as it was.

    Returns
    -------
    Path
        ``folder``.

    Raises
    ------
    Exception
        Whatever ``write`` raises (``folder`` is left as it was), or ``OSError`` from the renames.
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
        old = folder.with_name(f".{folder.name}.{uuid.uuid4().hex}.old")
        os.replace(folder, old)
    os.replace(tmp, folder)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return folder


def owner_problem(folder: str | Path, owner: Mapping[str, str], keys: tuple[str, ...] | None = None) -> str | None:
    """Why ``folder`` may not be replaced by a model of the run ``owner`` describes, or ``None``.

    A folder that does not exist, or whose :data:`OWNER_FILE` agrees with
    ``owner`` on ``keys`` (default: all of ``owner``'s), may be replaced; one
    without that file, or of another run, may not.
    """
    folder = Path(folder)
    if not folder.exists():
        return None
    try:
        found = json.loads((folder / OWNER_FILE).read_text())
    except (OSError, ValueError):
        return "its folder holds files no run of this node saved there; they are not replaced"
    if not isinstance(found, dict) or any(found.get(k) != owner[k] for k in (keys or tuple(owner))):
        return "its folder holds a model another run saved; it is not replaced"
    return None


def save_model(
    family: Any,
    model: nn.Module,
    config: Any,
    preprocessor: Any,
    folder: str | Path,
    owner: Mapping[str, str] | None = None,
    label_names: Sequence[str] = (),
    card: str | None = None,
) -> Path:
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
    owner : mapping of str to str, optional
        The run that saves it, written to :data:`OWNER_FILE` in the folder.
    label_names : sequence of str
        The class names by index, saved in the family's config (``id2label``, timm's ``label_names``).
    card : str, optional
        The model card's Markdown, written as ``README.md``
        (:func:`fedgrow_core.clients.model_card.model_card`).

    Raises
    ------
    NonFiniteModel
        If a weight is not finite; nothing is written.
    """
    check_finite(model)

    if label_names:
        config = family.with_labels(config, list(label_names))

    def write(tmp: Path) -> None:
        family.save(model.cpu(), config, tmp)
        if card is not None:
            (tmp / CARD_FILE).write_text(card)
        if hasattr(preprocessor, "save_pretrained"):
            preprocessor.save_pretrained(tmp)
        if owner is not None:
            (tmp / OWNER_FILE).write_text(json.dumps(dict(owner), sort_keys=True))

    return write_folder_atomically(folder, write)


def class_names(folder: str | Path) -> list[str]:
    """The class names, by class index, that a saved model's ``config.json`` holds.

    ``id2label`` (``transformers``) or ``label_names`` (timm), as :func:`save_model` writes them.

    Raises
    ------
    ValueError
        Naming the folder, if it has no ``config.json`` or the config holds no
        class names (``transformers``' placeholders ``LABEL_0``, ... are none).
    """
    config_file = Path(folder) / "config.json"
    try:
        config = json.loads(config_file.read_text())
    except (OSError, ValueError) as err:
        raise ValueError(f"{folder}: no readable config.json, so no saved model with class names ({err})") from err
    if config.get("label_names"):
        return [str(name) for name in config["label_names"]]
    id2label = config.get("id2label") or {}
    names = [str(id2label[k]) for k in sorted(id2label, key=int)]
    if not names or names == [f"LABEL_{i}" for i in range(len(names))]:
        raise ValueError(
            f"{config_file} holds no class names (id2label or label_names): a model saved without them; "
            "save it with fedgrow_core.clients.model_export.save_model(..., label_names=...)"
        )
    return names
