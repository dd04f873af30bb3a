"""Per-phase schemas of the replies a client may send, and the check of a reply against one.

Every reply is untrusted. Before anything reads it, the server checks it
against the schema of the phase it answers (the records and metrics of
:data:`fedgrow_core.protocol.REPLY_METRICS`):

* the record names and kinds are exactly the phase's (``arrays`` +
  ``metrics``, plus ``info`` in the final phase); nothing else, so no extra
  ``ConfigRecord`` blob travels;
* the ``ArrayRecord`` holds exactly the expected tensor names, shapes and
  dtypes (the Global-LiGO the server sent, nothing in local-only rounds), all
  finite;
* the ``MetricRecord`` holds every required key and no key outside the
  phase's, each a scalar (no lists) of the stated type, finite and in the stated
  range;
* the ``info`` ``ConfigRecord`` of the final phase holds one short string.

A reply that fails is rejected with a one-line reason naming the offending
record, tensor or metric; it is never aggregated nor copied into the logs.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from fedgrow_core.protocol import INFO_KEY, MAX_INFO_CHARS, TRAIN_METRICS, MetricSpec

#: name -> (shape, numpy dtype string)
ArraySpec = Mapping[str, tuple[tuple[int, ...], str]]


@dataclass(frozen=True)
class ReplySchema:
    """What one phase's reply must hold.

    Attributes
    ----------
    metrics : mapping of str to MetricSpec
        The ``metrics`` record's keys.
    arrays : mapping of str to (shape, dtype) or None
        The ``arrays`` record's tensors (empty: the record must be empty);
        ``None``: the reply has no ``arrays`` record.
    info : bool
        Whether the reply carries the final phase's ``info`` ``ConfigRecord``.
    """

    metrics: Mapping[str, MetricSpec]
    arrays: ArraySpec | None = field(default_factory=dict)
    info: bool = False


def array_spec(arrays: ArrayRecord) -> dict[str, tuple[tuple[int, ...], str]]:
    """Names, shapes and dtypes of an ``ArrayRecord`` (what a reply must match)."""
    return {name: (tuple(a.shape), str(a.dtype)) for name, a in arrays.items()}


def train_schema(expected: ArraySpec) -> ReplySchema:
    """The schema of a round's reply that returns the tensors in ``expected`` (empty for local-only rounds)."""
    return ReplySchema(TRAIN_METRICS, expected)


#: Longest rejection reason kept (it goes into logs, the round log and the checkpoint).
MAX_REASON_CHARS = 500


def reply_problem(content: RecordDict, schema: ReplySchema | ArraySpec) -> str | None:
    """Why a reply must be rejected, or ``None`` if it matches ``schema``.

    Parameters
    ----------
    content : RecordDict
        The reply's content.
    schema : ReplySchema or mapping of str to (shape, dtype)
        The phase's schema; a bare array spec (from :func:`array_spec` of what
        the server sent) means :func:`train_schema` of it.

    Returns
    -------
    str or None
        A one-line reason naming the offending record, tensor or metric, at
        most :data:`MAX_REASON_CHARS` characters (a sender's names are cut).
    """
    problem = _reply_problem(content, schema)
    return problem if problem is None else problem[:MAX_REASON_CHARS]


def _reply_problem(content: RecordDict, schema: ReplySchema | ArraySpec) -> str | None:
    if not isinstance(schema, ReplySchema):
        schema = train_schema(schema)
    expected_records = {"metrics": MetricRecord}
    if schema.arrays is not None:
        expected_records["arrays"] = ArrayRecord
    if schema.info:
        expected_records["info"] = ConfigRecord
    names = set(content.keys())
    if names != set(expected_records):
        extra, missing = sorted(names - set(expected_records)), sorted(set(expected_records) - names)
        return f"records: expected {sorted(expected_records)}, got extra {_names(extra)}, missing {missing}"
    for name, kind in expected_records.items():
        if not isinstance(content[name], kind):
            return f"record {name!r} is a {type(content[name]).__name__}, expected a {kind.__name__}"
    if schema.arrays is not None:
        problem = _array_problem(content["arrays"], schema.arrays)
        if problem:
            return problem
    problem = metric_problem(content["metrics"], schema.metrics)
    if problem or not schema.info:
        return problem
    info = content["info"]
    if set(info.keys()) != {INFO_KEY} or not isinstance(info[INFO_KEY], str) or len(info[INFO_KEY]) > MAX_INFO_CHARS:
        return f"record 'info' must hold one string {INFO_KEY!r} of at most {MAX_INFO_CHARS} characters"
    return None


def _array_problem(arrays: ArrayRecord, expected: ArraySpec) -> str | None:
    return decode_arrays(arrays, expected)[1]


def decode_arrays(arrays: ArrayRecord, expected: ArraySpec) -> tuple[dict[str, np.ndarray] | None, str | None]:
    """Decode ``arrays`` and check the decoded tensors against ``expected``.

    An ``Array``'s ``shape`` and ``dtype`` are metadata a sender sets apart from
    its bytes, so both are checked on the decoded ``numpy`` array, and a tensor
    that cannot be decoded (other serialisation type, pickled objects, garbage)
    is a problem, not an exception.

    Returns
    -------
    tuple of (dict or None, str or None)
        ``({name: ndarray}, None)`` if every tensor matches; ``(None, reason)``
        otherwise.
    """
    names = set(arrays.keys())
    extra, missing = sorted(names - set(expected)), sorted(set(expected) - names)
    if extra:
        return None, f"unexpected tensors (only Global-LiGO may travel): {_names(extra)}"
    if missing:
        return None, f"missing Global-LiGO tensors: {missing[:5]}{' ...' if len(missing) > 5 else ''}"
    decoded = {}
    for name, array in arrays.items():
        shape, dtype = expected[name]
        if tuple(array.shape) != shape:
            return None, f"tensor {name!r} has shape {tuple(array.shape)}, expected {shape}"
        if str(array.dtype) != dtype:
            return None, f"tensor {name!r} has dtype {array.dtype}, expected {dtype}"
        try:
            value = array.numpy()
        except Exception as err:  # noqa: BLE001 - any decoding failure of untrusted bytes is a rejection
            return None, f"tensor {name!r} cannot be decoded ({type(err).__name__})"
        if tuple(value.shape) != shape or str(value.dtype) != dtype:
            return None, f"tensor {name!r} decodes to {tuple(value.shape)} {value.dtype}, expected {shape} {dtype}"
        if not np.isfinite(value).all():
            return None, f"tensor {name!r} holds NaN or Inf"
        decoded[name] = value
    return decoded, None


def metric_problem(metrics: MetricRecord, spec: Mapping[str, MetricSpec]) -> str | None:
    """Why ``metrics`` does not match ``spec`` (unknown or missing key, wrong type, out of range), or ``None``."""
    unknown = sorted(k for k in metrics.keys() if k not in spec)
    if unknown:
        return f"unexpected metrics {_names(unknown)}; this phase allows {sorted(spec)}"
    for key, item in spec.items():
        if key not in metrics:
            if item.required:
                return f"metric {key!r} is missing"
            continue
        problem = item.problem(key, metrics[key])
        if problem:
            return problem
    return None


def _names(names: list[str], limit: int = 40) -> str:
    """The first five of a sender's names, each cut to ``limit`` characters (a name can be megabytes long)."""
    shown = [n if len(n) <= limit else n[:limit] + "..." for n in names[:5]]
    return f"{shown}{' ...' if len(names) > 5 else ''}"
