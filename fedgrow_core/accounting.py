"""Parameter and byte accounting of Fed-Grow (what is trained, what travels)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Iterable, Mapping

import numpy as np
import torch
from torch import Tensor, nn

from fedgrow_core.growth.grown_model import GrownModel
from fedgrow_core.update_encoding import ENCODINGS, encoded_spec


def count_parameters(params: nn.Module | Mapping[str, Tensor] | Iterable[Tensor]) -> int:
    """Number of scalar parameters (elements) in a module, dict or iterable of tensors."""
    if isinstance(params, nn.Module):
        params = params.parameters()
    elif isinstance(params, Mapping):
        params = params.values()
    return sum(int(t.numel()) for t in params)


def tensor_bytes(tensors: Mapping[str, Tensor] | nn.Module, dtype: torch.dtype | None = None) -> int:
    """Payload bytes of ``tensors`` (their own dtype, or all cast to ``dtype``).

    Counts array data only; a transport format adds its own metadata (names,
    shapes), a few hundred bytes per tensor.
    """
    if isinstance(tensors, nn.Module):
        tensors = tensors.state_dict()
    return sum(
        int(t.numel()) * (t.element_size() if dtype is None else torch.empty((), dtype=dtype).element_size())
        for t in tensors.values()
    )


def encoded_bytes(tensors: Mapping[str, Tensor], encoding: str) -> int:
    """Tensor bytes of ``tensors`` sent in an ``update-encoding`` (``encoded_spec``'s names and dtypes).

    Returns
    -------
    int
        Bytes of array data (no names or headers): 4 per float32 entry, 2 per
        float16, 1 per int8 plus 4 per row for the int8 scales.

    Raises
    ------
    ValueError
        From :func:`~fedgrow_core.update_encoding.encoded_spec` (unknown encoding, 0-d tensor in int8).
    """
    spec = encoded_spec({k: (tuple(v.shape), "float32") for k, v in tensors.items()}, encoding)
    return sum(math.prod(shape) * np.dtype(dtype).itemsize for shape, dtype in spec.values())


@dataclass(frozen=True)
class GrowthAccounting:
    """Sizes of one client's Fed-Grow set-up.

    Attributes
    ----------
    local_params, global_params, head_params : int
        Trainable parameters of the Local-LiGO (0 for a plain LiGO), the
        Global-LiGO (the operator itself for a plain LiGO) and the task head.
    trainable_params : int
        Their sum: what the client optimises during growth.
    global_bytes : dict
        Tensor bytes of one client's upload per round, per ``update-encoding``
        (:data:`~fedgrow_core.update_encoding.ENCODINGS`: ``"float32"`` values,
        ``"float16"`` update, ``"int8"`` update and per-row float32 scales).
    target_params : int
        Parameters of the materialised target model (head included).
    target_model_bytes : int
        Its float32 bytes: what FedAvg of the full target model would upload.
    """

    local_params: int
    global_params: int
    head_params: int
    trainable_params: int
    global_bytes: dict[str, int]
    target_params: int
    target_model_bytes: int

    def as_dict(self) -> dict:
        """Plain-``dict`` view for JSON summaries."""
        return asdict(self)


def growth_accounting(model: GrownModel) -> GrowthAccounting:
    """Account a :class:`~fedgrow_core.growth.grown_model.GrownModel`.

    The target sizes come from the target template's (meta) parameters, so no
    target-sized memory is allocated.
    """
    op = model.operator
    local = getattr(op, "local", None)
    global_op = getattr(op, "global_", op)
    local_params = count_parameters(local) if local is not None else 0
    global_params = count_parameters(global_op)
    head_params = count_parameters(model.head)
    template = model._template[0]
    target_params = count_parameters(template)
    return GrowthAccounting(
        local_params=local_params,
        global_params=global_params,
        head_params=head_params,
        trainable_params=local_params + global_params + head_params,
        global_bytes={enc: encoded_bytes(global_op.state_dict(), enc) for enc in ENCODINGS},
        target_params=target_params,
        target_model_bytes=target_params * 4,
    )
