"""An audit log of everything a client sends: a Flower client mod.

With ``audit-dir`` set (in the SuperNode's node config; the run config's only
under the ``open`` node policy, as in simulation), :func:`egress_audit_mod` appends one JSON line per reply to
``<audit-dir>/egress-<node id>.jsonl``: the message type and phase, every tensor
(record, name, shape, dtype, bytes), every metric and config entry (name and
Python type; config values too, since they are strings a client chose to send),
and the size of the serialised content (``flwr.common.serde``'s protobuf, the
bytes that go on the wire apart from the gRPC envelope). An organisation can
read it to verify what left its machine; the privacy test
(``tests/test_flower_app.py``) asserts on it.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import numpy as np
from flwr.app import Context, Message
from flwr.clientapp.typing import ClientAppCallable
from flwr.common import serde

from fedgrow_core.node_policy import NodePolicyError

from .guards import sanitised_reason
from .node_view import cached_policy


def audit_dir(context: Context) -> str:
    """The node's audit folder: node config ``audit-dir``, else (``open`` policy) the run config's, else "".

    A node whose policy is ``strict`` (or whose node config is not a valid policy) never writes where the run
    config says.
    """
    own = str(context.node_config.get("audit-dir") or "")
    if own:
        return own
    try:
        policy = cached_policy(context)
    except NodePolicyError:
        return ""
    return "" if policy.strict else str(context.run_config.get("audit-dir") or "")


def egress_record(request: Message, reply: Message, node_id: int) -> dict:
    """What ``reply`` carries, as a JSON-ready dict (no tensor values, no metric values).

    Returns
    -------
    dict
        ``time`` (UNIX seconds), ``node_id``, ``message_type``, ``phase``,
        ``error`` (the reason, or None), ``arrays`` (list of ``[record, name,
        shape, dtype, bytes]``), ``tensor_bytes`` (sum of ``prod(shape) *
        itemsize``), ``metrics`` and ``configs`` (``{record: {key: type name}}``),
        ``config_values`` and ``content_bytes`` (serialised ``RecordDict``, bytes).
    """
    record = {
        **_header(request, node_id),
        "error": str(reply.error.reason) if reply.has_error() else None,
        "arrays": [],
        "tensor_bytes": 0,
        "metrics": {},
        "configs": {},
        "config_values": {},
        "content_bytes": 0,
    }
    if reply.has_error():
        return record
    content = reply.content
    for rname, arrays in content.array_records.items():
        for name, array in arrays.items():
            nbytes = math.prod(array.shape) * np.dtype(array.dtype).itemsize
            record["arrays"].append([rname, name, list(array.shape), str(array.dtype), nbytes])
            record["tensor_bytes"] += nbytes
    for rname, metrics in content.metric_records.items():
        record["metrics"][rname] = {k: type(v).__name__ for k, v in metrics.items()}
    for rname, configs in content.config_records.items():
        record["configs"][rname] = {k: type(v).__name__ for k, v in configs.items()}
        record["config_values"][rname] = {k: str(v) for k, v in configs.items()}
    record["content_bytes"] = serde.recorddict_to_proto(content).ByteSize()
    return record


def _header(request: Message, node_id: int) -> dict:
    phase = ""
    if request.content.config_records:
        phase = str(next(iter(request.content.config_records.values())).get("phase", ""))[:40]
    message_type = str(request.metadata.message_type)[:80]
    return {"time": time.time(), "node_id": node_id, "message_type": message_type, "phase": phase}


def egress_audit_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Flower client mod: run the ClientApp, then log what its reply carries (if ``audit-dir`` is set).

    If the ClientApp raises, the reply that leaves is the sanitised error of
    :func:`client_app.guards.sanitised_reason`; that text is logged (``error``)
    and the exception re-raised. One file per node, one ``write`` per line.
    """
    try:
        reply = call_next(msg, context)
    except Exception as err:
        _append(context, {**_header(msg, context.node_id), "error": sanitised_reason(err)})
        raise
    audit_reply(msg, reply, context)
    return reply


def audit_reply(request: Message, reply: Message, context: Context) -> None:
    """Log ``reply`` to ``request`` in the node's audit file (if ``audit-dir`` is set); see :func:`egress_record`."""
    _append(context, egress_record(request, reply, context.node_id))


def _append(context: Context, record: dict) -> None:
    folder = audit_dir(context)
    if folder:
        os.makedirs(folder, exist_ok=True)
        with open(Path(folder) / f"egress-{context.node_id}.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
