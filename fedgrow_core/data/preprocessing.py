"""Turning dataset rows into model batches: tokenisation and image transforms.

Text goes through the client's own ``transformers`` tokenizer and
``DataCollatorWithPadding``; images through ``torchvision.transforms.v2``. Every
batch is a dict with ``labels`` and either the tokenizer's fields
(``input_ids``, ``attention_mask``, ...) or ``pixel_values`` ``(B, C, H, W)``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from datasets import Dataset
from torch import Tensor
from torch.utils.data import DataLoader, Sampler
from torchvision.transforms import v2
from transformers import DataCollatorWithPadding, PreTrainedTokenizerBase

from fedgrow_core.data.sources import IMAGE, LABEL, TEXT, task_of, without_progress_bars


@dataclass
class ImageTransform:
    """Image batch transform of a small ViT: scale, resize, channels, normalise.

    Parameters
    ----------
    img_size : sequence of int
        ``(H, W)`` the model expects, in pixels.
    in_chans : int
        Channels the model expects; single-channel images are repeated to 3
        when the model wants 3.
    mean, std : sequence of float
        Per-channel normalisation (timm's ``pretrained_cfg`` convention).

    Notes
    -----
    Input ``(B, C, H, W)`` uint8 (scaled by 1/255) or float (kept as is);
    output float32 ``(B, in_chans, *img_size)``.
    """

    img_size: Sequence[int]
    in_chans: int = 1
    mean: Sequence[float] = (0.5,)
    std: Sequence[float] = (0.5,)
    _pipeline: Any = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._pipeline = v2.Compose(
            [
                v2.ToDtype(torch.float32, scale=True),
                v2.Resize(tuple(self.img_size), antialias=True),
                v2.Normalize(list(self.mean), list(self.std)),
            ]
        )

    def __call__(self, images: Tensor) -> Tensor:
        """Transform a batch ``(B, C, H, W)``; raises ``ValueError`` on a channel mismatch."""
        if images.dim() != 4:
            raise ValueError(f"expected images (B, C, H, W), got shape {tuple(images.shape)}")
        if images.shape[1] != self.in_chans:
            if images.shape[1] == 1:
                images = images.expand(-1, self.in_chans, -1, -1)
            else:
                raise ValueError(f"images have {images.shape[1]} channels, the model expects {self.in_chans}")
        return self._pipeline(images)

    def to_config(self) -> dict:
        """``{"mean": [...], "std": [...]}``, stored as ``data_config`` beside a ViT's config."""
        return {"mean": list(self.mean), "std": list(self.std)}


def _image_collate(transform: ImageTransform, dtype: torch.dtype):
    # ``datasets`` formats uint8 arrays as int64 tensors: restore the stored dtype
    # so that ToDtype scales uint8 by 1/255 and leaves floats alone.
    def collate(rows: list[dict]) -> dict[str, Tensor]:
        images = torch.stack([torch.as_tensor(r[IMAGE]) for r in rows]).to(dtype)
        labels = torch.tensor([int(r[LABEL]) for r in rows])
        return {"pixel_values": transform(images), "labels": labels}

    return collate


def image_dtype(dataset: Dataset) -> torch.dtype:
    """The torch dtype the ``image`` column was stored with (``uint8`` or ``float32``)."""
    return getattr(torch, dataset.features[IMAGE].dtype)


def tokenize(dataset: Dataset, tokenizer: PreTrainedTokenizerBase, max_length: int = 128) -> Dataset:
    """Tokenise the ``text`` column with ``tokenizer`` (truncation, no padding).

    Returns a dataset with the tokenizer's fields (``input_ids`` etc., at most
    ``max_length`` tokens per row) and ``labels``; padding is left to
    ``DataCollatorWithPadding`` so each batch pads only to its own longest row.
    Raises ``KeyError`` if there is no ``text`` column.
    """
    columns = [c for c in dataset.column_names if c != LABEL]
    with without_progress_bars():  # a bar per split and client, for a pass of well under a second
        out = dataset.map(
            lambda rows: tokenizer(rows[TEXT], truncation=True, max_length=max_length),
            batched=True,
            remove_columns=columns,
        )
    return out.rename_column(LABEL, "labels")


def make_dataloader(
    dataset: Dataset,
    preprocessor: PreTrainedTokenizerBase | ImageTransform,
    batch_size: int,
    *,
    shuffle: bool = False,
    seed: int = 0,
    max_length: int = 128,
    sampler: Sampler[int] | None = None,
    by_length: bool = False,
) -> DataLoader:
    """A ``DataLoader`` of model-ready batches for a text or image dataset.

    Parameters
    ----------
    dataset : datasets.Dataset
        Rows with ``label`` and ``text`` or ``image`` (see :mod:`.data_sources`).
    preprocessor : tokenizer or ImageTransform
        The client's own tokenizer (text) or its small model's image transform.
    batch_size : int
        Rows per batch.
    shuffle : bool
        Reshuffle each epoch.
    seed : int
        Seeds the shuffling generator.
    max_length : int
        Token truncation length (text only).
    sampler : torch.utils.data.Sampler, optional
        Row indices in the order to batch them (``torch.utils.data.DataLoader``'s
        ``sampler``); overrides ``shuffle``.
    by_length : bool
        Text only, without ``sampler``: batch the rows in order of token count
        (stable), so each batch pads to little more than its own rows (as
        ``transformers``' ``group_by_length``). For evaluation, whose results
        do not depend on the order of the rows.

    Raises
    ------
    ValueError
        If the preprocessor does not fit the dataset's task.
    """
    task = task_of(dataset)
    generator = torch.Generator().manual_seed(seed)
    order = {"sampler": sampler} if sampler is not None else {"shuffle": shuffle, "generator": generator}
    if task == TEXT:
        if not isinstance(preprocessor, PreTrainedTokenizerBase):
            raise ValueError(f"a text dataset needs a tokenizer, got {type(preprocessor).__name__}")
        tokens = tokenize(dataset, preprocessor, max_length)
        if by_length and sampler is None:
            lengths = [len(ids) for ids in tokens["input_ids"]]
            order = {"sampler": sorted(range(len(lengths)), key=lengths.__getitem__)}
        collate = DataCollatorWithPadding(preprocessor, return_tensors="pt")
        return DataLoader(tokens, batch_size=batch_size, collate_fn=collate, **order)
    if not isinstance(preprocessor, ImageTransform):
        raise ValueError(f"an image dataset needs an ImageTransform, got {type(preprocessor).__name__}")
    rows = dataset.with_format("torch")
    return DataLoader(
        rows,
        batch_size=batch_size,
        collate_fn=_image_collate(preprocessor, image_dtype(dataset)),
        **order,
    )


def model_inputs(batch: dict[str, Tensor]) -> tuple[tuple, dict]:
    """Split a batch into ``(args, kwargs)`` for the model's forward (labels removed)."""
    if "pixel_values" in batch:
        return (batch["pixel_values"],), {}
    return (), {k: v for k, v in batch.items() if k != "labels"}
