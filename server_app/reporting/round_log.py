"""One row of a run's round log: who replied, who was rejected, what each client reported and uploaded.

Built the same way for rounds run by a Flower strategy (``ReplyChecks``) and for
the rounds of the local-only baselines, so every mode's summary has the same
per-round fields.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

from flwr.app import Message, RecordDict
from flwr.common.serde import recorddict_to_proto

#: Client metrics copied into the round log (per node), when a reply carries them.
LOGGED_METRICS = (
    "eval-accuracy",
    "received-accuracy",
    "train-loss",
    "train-accuracy",
    "train-seconds",
    "eval-seconds",
    "received-eval-seconds",
    "message-seconds",
    "compute-threads",
    "trainable-params",
)


def payload_bytes(message: Message) -> int:
    """Bytes of the tensor payload of a reply: sum over its arrays of ``prod(shape) * itemsize``.

    Counts tensor data only (no ``.npy`` headers, names or protobuf framing),
    which is what :func:`fedgrow_core.accounting.tensor_bytes` computes from the
    operator shapes.
    """
    total = 0
    for record in message.content.array_records.values():
        for array in record.values():
            itemsize = {"float64": 8, "float32": 4, "float16": 2, "bfloat16": 2, "int64": 8, "int32": 4}.get(
                str(array.dtype), 1
            )
            total += math.prod(array.shape) * itemsize
    return total


def message_bytes(message: Message) -> int:
    """Bytes of a message's content serialised with Flower's own ``flwr.common.serde.recorddict_to_proto``.

    Everything its records carry: record and tensor names, each array's
    ``.npy`` bytes with their header, metrics and configs; 0 for a message
    without content. Flower's routing metadata and its transport framing
    (arrays travel in chunks of up to 5 MiB) are not counted.
    """
    return content_bytes(message.content) if message.has_content() else 0


def content_bytes(content: RecordDict) -> int:
    """Bytes of a message content (``RecordDict``) serialised as Flower serialises it.

    Returns
    -------
    int
        ``recorddict_to_proto(content).ByteSize()``, in bytes (see :func:`message_bytes`).
    """
    return recorddict_to_proto(content).ByteSize()


def round_entry(
    server_round: int,
    replies: list[Message],
    accepted: Iterable[Message],
    rejected: list[dict],
    seconds: float,
    sent: Iterable[int] = (),
) -> dict:
    """A JSON-ready log entry for one round.

    Parameters
    ----------
    server_round : int
        The round's number.
    replies : list of Message
        Every reply of the round, errors included.
    accepted : iterable of Message
        Replies that passed the checks (error replies among them count as failed).
    rejected : list of dict
        ``{"node_id", "reason"}`` per rejected reply.
    seconds : float
        Wall time from the round's start to its last reply checked, or to the
        round's timeout when a reply is missing (seconds).
    sent : iterable of int
        Node ids the round's messages went to; those with no reply (timed out or
        gone) are listed as ``missing_nodes``.

    Returns
    -------
    dict
        ``round``, ``replies``, ``accepted_nodes``, ``failed``, ``failed_nodes``
        (``{"node_id", "reason"}`` per error reply), ``rejected``,
        ``missing_nodes``, ``seconds``, ``client_metrics`` (node id as str ->
        :data:`LOGGED_METRICS`), ``upload_bytes`` (node id as str ->
        :func:`message_bytes` of its reply) and ``payload_bytes`` (node id as
        str -> :func:`payload_bytes`).
    """
    accepted = list(accepted)
    ok = [m for m in accepted if not m.has_error()]
    failed = [
        {"node_id": m.metadata.src_node_id, "reason": last_line(m.error.reason)} for m in replies if m.has_error()
    ]
    replied = {m.metadata.src_node_id for m in replies}
    client_metrics, upload, payload = {}, {}, {}
    for msg in ok:
        node = str(msg.metadata.src_node_id)
        metrics = next(iter(msg.content.metric_records.values()), {})
        client_metrics[node] = {k: metrics[k] for k in LOGGED_METRICS if k in metrics}
        upload[node] = message_bytes(msg)
        payload[node] = payload_bytes(msg)
    return {
        "round": server_round,
        "replies": len(replies),
        "accepted_nodes": [m.metadata.src_node_id for m in ok],
        "failed": len(failed),
        "failed_nodes": failed,
        "rejected": rejected,
        "missing_nodes": sorted(n for n in set(sent) if n not in replied),
        "seconds": seconds,
        "client_metrics": client_metrics,
        "upload_bytes": upload,
        "payload_bytes": payload,
    }


def last_line(reason: str, limit: int = 500) -> str:
    """The last non-empty line of an error reason, at most ``limit`` characters (a simulation's holds a traceback)."""
    lines = [line.strip() for line in str(reason).splitlines() if line.strip()]
    return (lines[-1] if lines else "")[:limit]


#: The client metrics a round's log line and trackers report as means over the accepted clients.
MEAN_METRICS = ("train-loss", "train-accuracy", "eval-accuracy", "received-accuracy")


def client_means(entry: dict) -> dict[str, float]:
    """Unweighted means over a round entry's accepted clients of :data:`MEAN_METRICS` (those any reported)."""
    clients = list(entry["client_metrics"].values())
    means = {}
    for key in MEAN_METRICS:
        values = [m[key] for m in clients if key in m]
        if values:
            means[key] = sum(values) / len(values)
    return means


def round_summary(entry: dict) -> str:
    """One line for the log: replies by outcome, the clients' mean metrics and the round's seconds.

    E.g. ``3/3 replies accepted, train loss 0.657, train accuracy 0.609, eval
    accuracy 0.703, 27.5 s``; the means are unweighted over the accepted
    clients (each client's own are in ``summary.json``'s round log), and rejected,
    failed and missing replies are named only when there are any.
    """
    parts = [f"{len(entry['accepted_nodes'])}/{entry['replies']} replies accepted"]
    for key, count in (("rejected", len(entry["rejected"])), ("failed", entry["failed"])):
        if count:
            parts.append(f"{count} {key}")
    if entry["missing_nodes"]:
        parts.append(f"{len(entry['missing_nodes'])} missing")
    parts += [f"{key.replace('-', ' ')} {mean:.3f}" for key, mean in client_means(entry).items()]
    parts.append(f"{entry['seconds']:.1f} s")
    return ", ".join(parts)
