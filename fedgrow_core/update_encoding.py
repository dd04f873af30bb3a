"""Compressed transport of a client's Global-LiGO update, with error feedback.

A client that trained the Global-LiGO replies with its *update*
``delta = new - received`` instead of the values, in one of
:data:`ENCODINGS`:

* ``"float32"``: no encoding; the reply holds the new values themselves;
* ``"float16"``: ``delta`` cast to float16 (half the bytes);
* ``"int8"``: ``delta`` rounded to int8 in ``[-127, 127]`` with one float32
  scale per row of the last axis, ``scale = max |row| / 127``:
  ``1 + 4 / n`` bytes per entry for rows of ``n`` entries (0.253 of float32 for
  rows of 384, 0.31 for rank-16 factors, 0.5 for rank 4: no better than
  float16 there).

The values are never sent in a 16-bit format: entries near 1 (one-hot
selections, depth coefficients) would lose every update smaller than the
format's step there (float16: 2^-10 at 1.0). Updates are small and centred on
zero, where the formats are fine.

What the encoding rounds away is kept by the client (``residual``) and added to
its next update: error feedback (Seide et al., "1-Bit Stochastic Gradient
Descent", Interspeech 2014; Karimireddy et al., "Error Feedback Fixes SignSGD",
ICML 2019, Alg. 2), so the rounding error is delayed rather than dropped. A
float16 update beyond float16's range (65504) is clipped and the excess kept in
the residual the same way. The residual
is private client state, never sent. What the last round's encoding rounds
away, and updates the server rejects, clips or never receives, are not
recovered.

The server decodes with :func:`decode_update` against what it sent; every
tensor's name, shape and dtype is fixed by :func:`encoded_spec`; an int8 entry
of -128 (never encoded), a negative scale, or values that decode to
non-finite numbers are refused.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from torch import Tensor

ENCODINGS = ("float32", "float16", "int8")
#: Suffix of an int8 tensor's per-row scales.
SCALE_SUFFIX = ".scale"
_INT8_MAX = 127
_FLOAT16_MAX = 65504.0


def encoded_spec(
    spec: Mapping[str, tuple[tuple[int, ...], str]], encoding: str
) -> dict[str, tuple[tuple[int, ...], str]]:
    """Names, shapes and dtypes of a reply in ``encoding``, given those of the float32 values sent.

    Parameters
    ----------
    spec : mapping of str to (shape, dtype)
        The tensors the server sent (float32).
    encoding : str
        One of :data:`ENCODINGS`.

    Returns
    -------
    dict
        ``float32``: ``spec``; ``float16``: the same shapes in float16;
        ``int8``: each tensor in int8 plus ``<name>.scale``, float32, of shape
        ``shape[:-1]`` (one scale per row of the last axis).

    Raises
    ------
    ValueError
        For an unknown encoding, a 0-d tensor in ``int8`` (it has no rows), or
        a tensor named like another's scales.
    """
    if encoding == "float32":
        return dict(spec)
    if encoding == "float16":
        return {name: (shape, "float16") for name, (shape, _) in spec.items()}
    if encoding != "int8":
        raise ValueError(f"unknown update encoding {encoding!r}; expected one of {list(ENCODINGS)}")
    out = {}
    for name, (shape, _) in spec.items():
        if name + SCALE_SUFFIX in spec:
            raise ValueError(f"tensor {name + SCALE_SUFFIX!r} would collide with the int8 scales of {name!r}")
        if not shape:
            raise ValueError(f"tensor {name!r} is 0-d: int8 encoding needs at least one axis")
        out[name] = (shape, "int8")
        out[name + SCALE_SUFFIX] = (shape[:-1], "float32")
    return out


def _quantise(delta: Tensor, encoding: str) -> dict[str, np.ndarray]:
    """The arrays (by suffix) of one tensor's update; ``delta`` becomes what they round away, in place.

    ``delta`` (float32) is a tensor of the caller's own. Updating it in place, and
    finding the int8 scales with one ``aminmax`` pass, spares four tensor-sized
    buffers; the arrays and the residual are bit for bit those of
    ``delta - decoded`` computed the plain way.
    """
    if encoding == "float16":
        q = delta.clamp(-_FLOAT16_MAX, _FLOAT16_MAX).to(torch.float16)
        delta.sub_(q.float())
        return {"": q.numpy()}
    if delta.shape[-1]:
        low, high = torch.aminmax(delta, dim=-1)
        scale = torch.maximum(low.abs(), high.abs()) / _INT8_MAX  # max |row| / 127
    else:
        scale = torch.zeros(delta.shape[:-1])
    safe = torch.where(scale > 0, scale, torch.ones_like(scale)).unsqueeze(-1)
    q = torch.div(delta, safe).round_().clamp_(-_INT8_MAX, _INT8_MAX).add_(0.0)  # + 0.0: -0.0 -> 0.0, as int8
    q8 = q.to(torch.int8)
    delta.sub_(q.mul_(scale.unsqueeze(-1)))  # q holds the int8 values exactly: this is delta - decoded
    return {"": q8.numpy(), SCALE_SUFFIX: scale.numpy()}


def encode_update(
    new: Mapping[str, Tensor],
    received: Mapping[str, Tensor],
    residual: Mapping[str, Tensor],
    encoding: str,
) -> tuple[dict[str, np.ndarray], dict[str, Tensor]]:
    """Encode a client's update with error feedback.

    Parameters
    ----------
    new, received : mapping of str to Tensor
        The client's trained tensors and what the server sent (float32, same
        names and shapes).
    residual : mapping of str to Tensor
        What earlier encodings rounded away (empty at first; missing names count
        as zero).
    encoding : str
        One of :data:`ENCODINGS`.

    Returns
    -------
    tuple of (dict, dict)
        The reply's arrays (named as :func:`encoded_spec`; for ``float32`` the
        new values) and the new residual ``delta + residual - decoded``
        (empty for ``float32``).

    Raises
    ------
    ValueError
        For an unknown encoding, names or shapes of ``new`` and ``received``
        that differ, or an update that is not finite (the residual is then left
        as it was: one broken round does not poison the next).
    """
    if encoding not in ENCODINGS:
        raise ValueError(f"unknown update encoding {encoding!r}; expected one of {list(ENCODINGS)}")
    if set(new) != set(received):
        raise ValueError(f"updated tensors {sorted(set(new) ^ set(received))[:5]} were not received, or not returned")
    if encoding == "float32":
        return {k: v.detach().cpu().float().numpy() for k, v in new.items()}, {}
    arrays, left = {}, {}
    for name, value in new.items():
        base = received[name].detach().cpu().float()
        if value.shape != base.shape:
            raise ValueError(f"tensor {name!r} is {tuple(value.shape)}, but {tuple(base.shape)} was received")
        delta = torch.sub(value.detach().cpu().float(), base)  # a new tensor: the residual, once quantised
        if name in residual:
            delta.add_(residual[name].cpu().float())
        # a finite sum proves every entry finite (one reduction); else the exact check (overflow of finite ones)
        if not torch.isfinite(delta.sum()) and not torch.isfinite(delta).all():
            raise ValueError(f"the update of tensor {name!r} is not finite; nothing encoded")
        parts = _quantise(delta, encoding)
        arrays.update({name + suffix: array for suffix, array in parts.items()})
        left[name] = delta
    return arrays, left


def decode_update(
    arrays: Mapping[str, np.ndarray], sent: Mapping[str, np.ndarray], encoding: str
) -> tuple[dict[str, np.ndarray] | None, str | None]:
    """The float32 values a reply stands for: ``sent + decoded delta``.

    Parameters
    ----------
    arrays : mapping of str to ndarray
        The reply's tensors, already checked against :func:`encoded_spec` of
        ``sent`` (names, shapes, dtypes, finite).
    sent : mapping of str to ndarray
        What the server sent this round (float32).
    encoding : str
        One of :data:`ENCODINGS`.

    Returns
    -------
    tuple of (dict or None, str or None)
        ``({name: float32 ndarray}, None)``, or ``(None, reason)`` when an int8
        entry is -128, a scale is negative, or the decoded values are not
        finite (e.g. an int8 scale near float32's maximum). Large but finite
        updates pass; the server's update-norm clipping bounds them.
    """
    if encoding == "float32":
        return {k: np.asarray(arrays[k], dtype=np.float32) for k in sent}, None
    values = {}
    for name, base in sent.items():
        raw = np.asarray(arrays[name])
        q = raw.astype(np.float32)  # a new array, written in place below
        if encoding == "int8":
            if raw.size and raw.min() == -_INT8_MAX - 1:
                return None, f"tensor {name!r}: int8 value -128, outside the encoding's [-127, 127]"
            scale = np.asarray(arrays[name + SCALE_SUFFIX], dtype=np.float32)
            if scale.size and scale.min() < 0:
                return None, f"tensor {name!r}: negative int8 scale ({float(scale.min()):.3g})"
            with np.errstate(over="ignore", invalid="ignore"):
                np.multiply(q, scale[..., None], out=q)
        with np.errstate(over="ignore", invalid="ignore"):
            value = np.add(np.asarray(base, dtype=np.float32), q, out=q)
        if not _all_finite(value):
            return None, f"tensor {name!r} decodes to NaN or Inf ({encoding} update on the values sent)"
        values[name] = value
    return values, None


def _all_finite(array: np.ndarray) -> bool:
    """Whether every entry of a float array is finite: one sum (non-finite whenever an entry is), exact on overflow."""
    with np.errstate(over="ignore", invalid="ignore"):
        if np.isfinite(array.sum(dtype=np.float64)):
            return True
    return bool(np.isfinite(array).all())
