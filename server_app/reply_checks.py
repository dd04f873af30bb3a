"""Checks of a client's training reply before it may be aggregated.

A reply is accepted only if it carries exactly the Global-LiGO: one
``ArrayRecord`` whose tensor names, shapes and dtypes equal the ones the server
sent, all finite, and one ``MetricRecord`` whose ``num-examples`` is a positive
integer. Anything else (a missing or extra tensor, e.g. a Local-LiGO or
small-model weight; a wrong shape or dtype; NaN or Inf) is rejected with a reason.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from flwr.app import ArrayRecord, MetricRecord, RecordDict

#: name -> (shape, numpy dtype string)
ArraySpec = Mapping[str, tuple[tuple[int, ...], str]]


def array_spec(arrays: ArrayRecord) -> dict[str, tuple[tuple[int, ...], str]]:
    """Names, shapes and dtypes of an ``ArrayRecord`` (what a reply must match)."""
    return {name: (tuple(a.shape), str(a.dtype)) for name, a in arrays.items()}


def reply_problem(content: RecordDict, expected: ArraySpec, weight_key: str = "num-examples") -> str | None:
    """Why a training reply must be rejected, or ``None`` if it is acceptable.

    Parameters
    ----------
    content : RecordDict
        The reply's content.
    expected : mapping of str to (shape, dtype)
        From :func:`array_spec` of the Global-LiGO the server sent.
    weight_key : str
        The metric used as aggregation weight.

    Returns
    -------
    str or None
        A one-line reason naming the offending tensor or metric.
    """
    arrays = list(content.array_records.values())
    metrics = list(content.metric_records.values())
    if len(arrays) != 1:
        return f"expected one ArrayRecord, got {len(arrays)}"
    if len(metrics) != 1:
        return f"expected one MetricRecord, got {len(metrics)}"
    names = set(arrays[0].keys())
    extra, missing = sorted(names - set(expected)), sorted(set(expected) - names)
    if extra:
        return f"unexpected tensors (only Global-LiGO may travel): {extra[:5]}{' ...' if len(extra) > 5 else ''}"
    if missing:
        return f"missing Global-LiGO tensors: {missing[:5]}{' ...' if len(missing) > 5 else ''}"
    for name, array in arrays[0].items():
        shape, dtype = expected[name]
        if tuple(array.shape) != shape:
            return f"tensor {name!r} has shape {tuple(array.shape)}, expected {shape}"
        if str(array.dtype) != dtype:
            return f"tensor {name!r} has dtype {array.dtype}, expected {dtype}"
        if not np.isfinite(array.numpy()).all():
            return f"tensor {name!r} holds NaN or Inf"
    return _metric_problem(metrics[0], weight_key)


def _metric_problem(metrics: MetricRecord, weight_key: str) -> str | None:
    if weight_key not in metrics:
        return f"metric {weight_key!r} is missing"
    value = metrics[weight_key]
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        return f"metric {weight_key!r} = {value!r}; expected a positive integer"
    for key, v in metrics.items():
        if isinstance(v, float) and not np.isfinite(v):
            return f"metric {key!r} is {v}"
    return None
