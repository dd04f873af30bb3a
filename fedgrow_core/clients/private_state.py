"""A client's training state as named tensors: optimiser moments and batch position, and back.

Both kinds of client (:class:`fedgrow_core.clients.growth_client.GrowthClient`,
:class:`fedgrow_core.clients.model_client.ModelClient`) keep, beside their private
weights, the AdamW state (``torch.optim.Optimizer.state_dict()["state"]``,
flattened to ``optimizer.<param index>.<name>``) and their position in their
:class:`fedgrow_core.data.batch_stream.BatchStream` (``data.steps``, a 0-d int64
tensor), so the whole private state is one flat ``dict[str, Tensor]`` that fits
an ``ArrayRecord`` or a ``safetensors`` file.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fedgrow_core.data.batch_stream import BatchStream

OPTIMIZER_PREFIX = "optimizer."
#: Prefix of the error-feedback residual of an encoded update (:mod:`fedgrow_core.update_encoding`).
RESIDUAL_PREFIX = "update-residual."
#: Key of a client's position in its batch stream (a 0-d int64 tensor).
DATA_STEPS = "data.steps"


def training_state(optimizer: torch.optim.Optimizer, batches: BatchStream, copy: bool = True) -> dict[str, Tensor]:
    """The optimiser's per-parameter state and ``data.steps``.

    Parameters
    ----------
    optimizer : torch.optim.Optimizer
        Its ``state_dict()["state"]``, flattened to ``optimizer.<param index>.<name>``.
    batches : BatchStream
        Its position, ``data.steps``.
    copy : bool
        CPU clones (default); ``False``: the optimiser's own CPU tensors (moved, so copied, when on
        another device), for a caller that reads them at once and keeps nothing, e.g. to write a file.
    """
    out = {
        f"{OPTIMIZER_PREFIX}{i}.{key}": cpu_tensor(torch.as_tensor(value), copy)
        for i, state in optimizer.state_dict()["state"].items()
        for key, value in state.items()
    }
    out[DATA_STEPS] = torch.tensor(batches.position)
    return out


def cpu_tensor(tensor: Tensor, copy: bool) -> Tensor:
    """``tensor`` detached, on the CPU.

    Parameters
    ----------
    tensor : Tensor
        Any tensor.
    copy : bool
        Clone it; ``False``: a detached alias of it where it is on the CPU already
        (a tensor on another device is copied to the CPU either way).

    Returns
    -------
    Tensor
        Of ``tensor``'s shape and dtype.
    """
    tensor = tensor.detach().cpu()
    return tensor.clone() if copy else tensor


def model_tensors(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """The entries of a private state that are the model's own tensors (not :func:`training_state`'s, no residual)."""
    return {k: v for k, v in state.items() if not k.startswith((OPTIMIZER_PREFIX, RESIDUAL_PREFIX)) and k != DATA_STEPS}


def load_training_state(
    state: dict[str, Tensor], optimizer: torch.optim.Optimizer, batches: BatchStream, device: torch.device
) -> None:
    """Put :func:`training_state`'s entries back into ``optimizer`` (moments on ``device``) and ``batches``.

    Raises
    ------
    ValueError
        From ``Optimizer.load_state_dict``, if the saved state does not fit the
        optimiser's parameter groups.
    """
    moments: dict[int, dict[str, Tensor]] = {}
    for key, value in state.items():
        if key.startswith(OPTIMIZER_PREFIX):
            _, i, name = key.split(".", 2)
            moments.setdefault(int(i), {})[name] = value.to(device) if name != "step" else value
    optimizer.load_state_dict({"state": moments, "param_groups": optimizer.state_dict()["param_groups"]})
    if DATA_STEPS in state:
        batches.seek(int(state[DATA_STEPS]))
