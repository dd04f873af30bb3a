"""The server's building blocks for every mode: shared rounds, local rounds, collection, final phase.

Each function sends messages through the ``Grid`` and returns the round-log
entries (:func:`server_app.reporting.round_log.round_entry`) with the round number and the
phase (``grow``, ``train-local``, ``train-shared``, ``collect``) added, so
:mod:`server_app.orchestration.plan` can chain them and the summary can count rounds and bytes
uniformly.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from logging import INFO, WARNING
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, Message, MessageType
from flwr.common import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedgrow_core.protocol import NUM_EXAMPLES, PARTITION_ID, REPLY_METRICS, TEST_EXAMPLES, Instruction, Phase
from fedgrow_core.run_config import RunConfig

from ..persistence.checkpoint import Checkpoint, load_strategy_state, write_checkpoint
from ..reporting.round_log import content_bytes, last_line, round_entry, round_summary
from ..trust.checked_round import RoundChecks
from ..trust.reply_checks import (
    ReplySchema,
    array_spec,
    decode_arrays,
    reply_problem,
    train_schema,
)
from .strategy import build_strategy

#: The schema of a preflight reply (metrics only) and of a final-phase reply (metrics and ``info``).
PREFLIGHT_SCHEMA = ReplySchema(REPLY_METRICS[Phase.PREFLIGHT], arrays=None)
FINAL_SCHEMA = ReplySchema(REPLY_METRICS[Phase.FINAL], arrays=None, info=True)


def _send(grid: Grid, arrays: ArrayRecord, order: Instruction, message_type: str, timeout: float) -> list[Message]:
    """One message per node (:meth:`Instruction.content`); returns the replies that arrived within ``timeout`` s."""
    messages = [
        Message(content=order.content(arrays), message_type=message_type, dst_node_id=node_id)
        for node_id in grid.get_node_ids()
    ]
    replies = list(grid.send_and_receive(messages, timeout=timeout))
    for msg in replies:
        if msg.has_error():
            log(WARNING, "%s: node %d failed: %s", order.phase, msg.metadata.src_node_id, msg.error.reason)
    return replies


class PreflightError(RuntimeError):
    """Raised when a node cannot set up its model and data; names every failing node and why."""


#: Error types whose reply means the node refuses the run (its own policy or hardware), not that the run is broken.
NODE_REFUSALS = ("RefusedMessage", "NodePolicyError")


def preflight(grid: Grid, timeout: float, min_nodes: int = 1) -> tuple[dict[int, dict], list[dict]]:
    """Before any training, ask every node to load its model and data (a ``query`` message).

    Each client builds its setup (the run config checked, its small model and
    data partition loaded, its paths resolved) and replies with its partition
    id and row counts; building it now also warms the client's cache for round 1.

    A node that refuses the run (an error reply of a type in
    :data:`NODE_REFUSALS`: its policy, or hardware it lacks) is left out of the
    run: it is logged with its reason, and a :class:`PromptGrid` stops listing
    it, so it is sent nothing more. The others go on.

    Parameters
    ----------
    grid : flwr.serverapp.Grid
        The run's grid; every node it lists is asked.
    timeout : float
        Seconds to wait for the replies.
    min_nodes : int
        The fewest nodes that must accept the run (``min-train-nodes``).

    Returns
    -------
    tuple of (dict of int to dict, list of dict)
        Node id -> the reply's metrics (``partition-id``, ``train-examples``,
        ``test-examples``; the counts cap the node's later replies), and one
        ``{"node_id", "reason"}`` per node that refused.

    Raises
    ------
    PreflightError
        If any node replied with another error, with a reply that does not match
        :data:`PREFLIGHT_SCHEMA`, or did not reply within ``timeout`` seconds, or
        if fewer than ``min_nodes`` nodes accepted; the message lists every
        such node with its reason.
    """
    sent = list(grid.get_node_ids())
    replies = _send(grid, ArrayRecord(), Instruction(Phase.PREFLIGHT), MessageType.QUERY, timeout)
    problems, refused = [], []
    for m in replies:
        node = m.metadata.src_node_id
        if m.has_error():
            reason = last_line(m.error.reason)
            if reason.split(":", 1)[0] in NODE_REFUSALS:
                refused.append({"node_id": node, "reason": reason})
            else:
                problems.append(f"node {node}: {reason}")
        elif problem := reply_problem(m.content, PREFLIGHT_SCHEMA):
            problems.append(f"node {node}: malformed preflight reply: {problem}")
    replied = {m.metadata.src_node_id for m in replies}
    problems += [f"node {n}: no reply within {timeout:g} s" for n in sent if n not in replied]
    accepted = {m.metadata.src_node_id: dict(m.content["metrics"]) for m in replies if not m.has_error()}
    if not problems and len(accepted) < min_nodes:
        problems = [f"node {r['node_id']} refused: {r['reason']}" for r in refused]
        problems.append(f"{len(accepted)} node(s) accepted the run, fewer than min-train-nodes = {min_nodes}")
    if problems:
        raise PreflightError("preflight failed, no training started:\n  " + "\n  ".join(problems))
    for r in refused:
        log(WARNING, "preflight: node %d refused the run and is left out: %s", r["node_id"], r["reason"])
    if refused and hasattr(grid, "exclude"):
        grid.exclude(r["node_id"] for r in refused)
    return accepted, refused


def shared_rounds(
    grid: Grid,
    run: RunConfig,
    strategy: Strategy,
    arrays: ArrayRecord,
    phase: Phase,
    *,
    run_dir: Path | None = None,
    resume: Checkpoint | None = None,
    on_round: Callable[[dict], None] | None = None,
) -> tuple[ArrayRecord, list[dict]]:
    """``num-server-rounds`` rounds of the run's checked ``strategy`` (built once, whole) over ``arrays``.

    Clients receive ``config["phase"] = phase`` and, with ``run_dir``, the run's
    tag (``run-tag``, the folder's name) under which they keep their private state
    on disk.

    With ``run_dir`` the server writes a checkpoint there after every round
    (:func:`server_app.persistence.checkpoint.write_checkpoint`, through ``Strategy.start``'s
    ``evaluate_fn`` hook). With ``resume`` the Global-LiGO, the strategy's state,
    the RNGs and the log of the checkpoint's rounds are restored and only the
    rounds after ``resume.server_round`` run (the strategy was built with that
    ``round_offset``), and clients are told so (``resumed-after``), so a client
    that finds no private state refuses. ``on_round`` is called with each
    round's log entry as the round ends.

    Returns
    -------
    tuple of (ArrayRecord, list of dict)
        The aggregated arrays after the last round (``arrays`` if no round
        aggregated anything) and one log entry per round.
    """
    num_rounds = run.num_server_rounds
    done, before = 0, []
    if resume is not None:
        done, arrays, before = resume.server_round, resume.global_ligo, resume.entries
        load_strategy_state(strategy, resume.strategy)
        resume.restore_rng()
        log(INFO, "resuming after round %d from %s", done, run_dir)

    def entries() -> list[dict]:
        return [*before, *({**entry, "phase": Phase(phase).value} for entry in strategy.round_log)]

    def checkpoint(server_round: int, current: ArrayRecord) -> None:  # Strategy.start's evaluate_fn: after a round
        if server_round == 0:
            return
        if run_dir is not None:
            write_checkpoint(run_dir, run, server_round + done, current, strategy, entries())
        if on_round is not None:
            on_round(entries()[-1])

    if num_rounds <= done:
        return arrays, before
    order = Instruction(Phase(phase), run_tag=run_dir.name if run_dir is not None else "", resumed_after=done)
    result = strategy.start(
        grid=grid,
        initial_arrays=arrays,
        num_rounds=num_rounds - done,
        timeout=run.round_timeout,
        train_config=order.to_record(),
        evaluate_fn=checkpoint,
    )
    aggregated = result.arrays is not None and len(result.arrays) > 0  # Flower leaves it empty if no round aggregated
    return (result.arrays if aggregated else arrays), entries()


#: A local-only round's reply: metrics and an empty ``arrays`` record.
LOCAL_SCHEMA = train_schema({})


def local_rounds(
    grid: Grid,
    num_rounds: int,
    phase: str,
    first_round: int,
    timeout: float = 3600,
    run_tag: str = "",
    on_round: Callable[[dict], None] | None = None,
) -> list[dict]:
    """``num_rounds`` rounds in which every node trains locally and replies with metrics only.

    The messages carry an empty ``ArrayRecord``, the round (``server-round``) and
    ``run_tag`` (``run-tag``, if any: clients keep their state on disk under it). A reply that does not
    match :data:`LOCAL_SCHEMA` (e.g. one that carries any tensor) is logged as rejected; nothing is
    aggregated in these modes. ``on_round`` is called with each round's log entry as the round ends.
    """
    entries = []
    for r in range(first_round, first_round + num_rounds):
        start = time.perf_counter()
        sent = list(grid.get_node_ids())
        order = Instruction(Phase(phase), server_round=r, run_tag=run_tag)
        replies = _send(grid, ArrayRecord(), order, MessageType.TRAIN, timeout)
        accepted, rejected = [], []
        for msg in replies:
            problem = None if msg.has_error() else reply_problem(msg.content, LOCAL_SCHEMA)
            if problem:
                rejected.append({"node_id": msg.metadata.src_node_id, "reason": problem})
                log(
                    WARNING,
                    "round %d (%s): rejected reply from node %d: %s",
                    r,
                    phase,
                    msg.metadata.src_node_id,
                    problem,
                )
            else:
                accepted.append(msg)
        entry = round_entry(r, replies, accepted, rejected, time.perf_counter() - start, sent)
        size = content_bytes(order.content())
        entry["download_bytes"] = dict.fromkeys(map(str, sent), size)
        entries.append({**entry, "phase": Phase(phase).value, "aggregated": False})
        log(INFO, "round %d (%s): %s", r, phase, round_summary(entry))
        if on_round is not None:
            on_round(entries[-1])
    return entries


def collect_average(
    grid: Grid,
    run: RunConfig,
    arrays: ArrayRecord,
    round_number: int,
    timeout: float = 3600,
    example_caps: dict[int, int] | None = None,
) -> tuple[ArrayRecord, dict]:
    """Ask every node for its starting weights and average them with the strategy's FedAvg.

    Used before federated training of a full model in ``scratch-fedavg``: clients
    build the seeded random initialisation (``arrays`` is empty). The expected
    tensor names, shapes and dtypes are those a strict majority of the replies
    share (:func:`majority_spec`), so no single reply sets them; every reply must
    match them and pass the usual checks and bounds.

    Returns
    -------
    tuple of (ArrayRecord, dict)
        The example-weighted average (``flwr`` FedAvg) and a log entry for the
        collection (counted as a round: its upload is real traffic).

    Raises
    ------
    RuntimeError
        If no strict majority of the replies agrees on the tensors, or every
        reply was rejected.
    """
    sent = list(grid.get_node_ids())
    order = Instruction(Phase.COLLECT)
    replies = _send(grid, arrays, order, MessageType.TRAIN, timeout)
    spec = majority_spec(replies)
    if spec is None:
        raise RuntimeError(f"collect: no strict majority of the {len(replies)} replies agrees on the tensors sent")
    checks = RoundChecks(
        example_caps=example_caps,
        clip_norm=run.clip_update_norm,
        clip_median=run.clip_update_median,
        cap_weight_median=run.cap_weight_median,
        reply_metrics=REPLY_METRICS[Phase.COLLECT],
        log_diagnostics=False,
        expected_spec=spec,
    )
    strategy = build_strategy("fedavg", len(sent), 1.0, checks=checks)
    # Clipping needs a reference: the majority's coordinate-wise median, an estimate no single reply controls.
    reference = _median_arrays(replies, spec)
    if reference is None:
        raise RuntimeError("collect: every reply was rejected (no finite weights)")
    strategy.record_round(round_number, reference, sent, content_bytes(order.content(arrays)))
    averaged, _ = strategy.aggregate_train(round_number, replies)
    if averaged is None:
        raise RuntimeError("collect: every reply was rejected")
    (entry,) = strategy.round_log
    return averaged, {**entry, "phase": Phase.COLLECT.value}


def final_phase(
    grid: Grid,
    arrays: ArrayRecord,
    timeout: float = 3600,
    last_round: int = 0,
    run_tag: str = "",
    preflight_rows: dict[int, dict] | None = None,
    resumed_after: int = 0,
) -> tuple[list[Message], list[dict]]:
    """Ask every node to fine-tune (per its mode), evaluate and save its model.

    One ``EVALUATE`` message per node carries ``arrays`` (the final Global-LiGO,
    the final averaged model, or nothing), ``phase`` :attr:`Phase.FINAL`, the
    last round (``server-round``) and the run's tag (``run-tag``, if any);
    ``timeout`` is in seconds. Every reply is checked against
    :data:`FINAL_SCHEMA` and, with ``preflight_rows``, against the node's
    preflight reply (same ``partition-id``, ``num-examples`` at most its test
    rows). ``resumed_after`` (rounds restored from a checkpoint) tells clients
    that they must hold private state from before.

    Returns
    -------
    tuple of (list of Message, list of dict)
        The accepted replies, and ``{"node_id", "reason"}`` per rejected one
        (failed replies are logged and left out of both).
    """
    order = Instruction(Phase.FINAL, server_round=last_round, run_tag=run_tag, resumed_after=resumed_after)
    accepted, rejected = [], []
    for msg in _send(grid, arrays, order, MessageType.EVALUATE, timeout):
        if msg.has_error():
            continue
        problem = reply_problem(msg.content, FINAL_SCHEMA) or _preflight_mismatch(msg, preflight_rows)
        if problem:
            rejected.append({"node_id": msg.metadata.src_node_id, "reason": problem})
            log(WARNING, "%s: rejected reply from node %d: %s", Phase.FINAL, msg.metadata.src_node_id, problem)
        else:
            accepted.append(msg)
    return accepted, rejected


def _preflight_mismatch(msg: Message, preflight_rows: dict[int, dict] | None) -> str | None:
    """Why a final reply contradicts its node's preflight reply, or ``None``."""
    if preflight_rows is None:
        return None
    before = preflight_rows.get(msg.metadata.src_node_id)
    if before is None:
        return "node did not take part in preflight"
    metrics = msg.content["metrics"]
    if metrics[PARTITION_ID] != before[PARTITION_ID]:
        return f"{PARTITION_ID} {metrics[PARTITION_ID]}, but preflight said {before[PARTITION_ID]}"
    if metrics[NUM_EXAMPLES] > before[TEST_EXAMPLES]:
        return f"{NUM_EXAMPLES} {metrics[NUM_EXAMPLES]} > the {before[TEST_EXAMPLES]} test rows of preflight"
    return None


def majority_spec(replies: list[Message]) -> dict | None:
    """The array spec (names, shapes, dtypes) a strict majority of the content replies share, or ``None``.

    Parameters
    ----------
    replies : list of Message
        A collection's replies; error replies do not count, replies without an
        ``arrays`` ``ArrayRecord`` count against every spec.

    Returns
    -------
    dict or None
        ``{name: (shape, dtype)}`` shared by more than half of the content
        replies; ``None`` if no spec has that majority.
    """
    content = [m for m in replies if not m.has_error()]
    specs = [
        tuple(sorted(array_spec(m.content["arrays"]).items()))
        for m in content
        if isinstance(m.content.get("arrays"), ArrayRecord)
    ]
    if not specs:
        return None
    spec, count = Counter(specs).most_common(1)[0]
    return dict(spec) if 2 * count > len(content) else None


def _median_arrays(replies: list[Message], spec: dict) -> ArrayRecord | None:
    """Coordinate-wise median of the replies whose decoded tensors match ``spec`` (the collect phase's reference)."""
    matching = [
        decoded
        for m in replies
        if not m.has_error() and isinstance(m.content.get("arrays"), ArrayRecord)
        for decoded in [decode_arrays(m.content["arrays"], spec)[0]]
        if decoded is not None
    ]
    if not matching:
        return None
    return ArrayRecord(
        {k: Array(np.median(np.stack([r[k] for r in matching]), axis=0).astype(spec[k][1])) for k in spec}
    )
